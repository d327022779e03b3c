"""Evaluation: metric definitions (metrics.py), the splice scorer (splice.py), what sae-eval writes
(report.py), sweep tables and Pareto plots (sweep.py), the SAE card in SAEBench's names (card.py), and the
benchmarks sae-eval runs on request (benchmarks.py): feature absorption on the first-letter task
(first_letter.py: prompts and activations; absorption.py: probes and scores) and sae-probe's tasks."""
