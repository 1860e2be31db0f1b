"""Training on Ray Train around mirror_core.train (`mirror train-memory`, `mirror train-detector`)."""
