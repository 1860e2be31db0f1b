"""Entry points: the `mirror` command, its console, the demo, ingest."""
