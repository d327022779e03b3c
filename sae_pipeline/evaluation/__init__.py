"""Evaluation: metric definitions (metrics.py), the splice scorer (splice.py), what sae-eval writes
(report.py), and sweep tables and Pareto plots (sweep.py)."""
