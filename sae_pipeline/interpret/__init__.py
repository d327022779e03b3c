"""Interpretation: one-pass feature statistics, the browser and its records, the logit lens, steering,
feature connectors between two SAEs (connectors.py, seeds/002)."""
