"""Accuracy on benchmark datasets (`mirror benchmark`): official CSVs, sweeps, nightly history, report."""
