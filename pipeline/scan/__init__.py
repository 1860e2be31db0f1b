"""The scan core: plan -> decode (CPU tasks) -> score (actor pool) -> exactly-once unit parts -> summary."""
