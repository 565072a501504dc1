"""Figures (matplotlib, Agg) that the pipelines log to MLflow and DVC."""
