"""Running MIRROR on Ray: scan core, evaluation, audit, training, entry points (see ARCHITECTURE.md)."""
