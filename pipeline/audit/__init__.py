"""Corpus audits (`mirror audit`): flagged manifest, group summary, filtered copy, heatmaps, report."""
