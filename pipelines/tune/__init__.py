"""Tune stage: Optuna search of the mask ratios (opt-in: `make tune`)."""
