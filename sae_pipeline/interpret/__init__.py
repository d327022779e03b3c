"""Interpretation: one-pass feature statistics, the browser and its records, the logit lens, steering."""
