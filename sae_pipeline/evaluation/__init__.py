"""Evaluation: scoring an SAE inside its model, and what sae-eval writes.

metrics.py  pure tensor metrics of a reconstruction and of next-token predictions
splice.py   the splice scorer: activation metrics and spliced next-token metrics of an SAE in its model
masked.py   the loss of a masked language model (ESM-2, BERT-style) on evaluation tokens
task.py     scoring an SAE inside a plain torch module (model=torch_module) by the task's loss
scorer.py   which of those scores an SAE trained on a store (sae-eval and loss recovered in training)
report.py   scoring one SAE for sae-eval: metrics.json, the density plot, W&B, one line
card.py     the SAE card (card.md, card.json) in SAEBench's names
benchmarks.py  the benchmarks sae-eval runs on request: first-letter absorption, sae-probe's tasks
first_letter.py  the first-letter task: single-token words, prompts, activations at the hook
absorption.py  first-letter probes, main latents by k-sparse probing, absorption scores
letter_probes.py  SAEBench's probe training (Adam, class-weighted, L1) and its k-sparse main-latent rule
sweep.py    tables and L0 <-> quality Pareto plots over many evaluated runs
"""
