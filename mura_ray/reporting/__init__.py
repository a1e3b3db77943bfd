"""Metrics, the evaluation report, plots and the model card."""
