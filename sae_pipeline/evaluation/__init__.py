"""Evaluation: scoring an SAE inside its model, and what sae-eval writes.

metrics.py  pure tensor metrics of a reconstruction and of next-token predictions
splice.py   the splice scorer: activation metrics and spliced next-token metrics of an SAE in its model
masked.py   the loss of a masked language model (ESM-2, BERT-style) on evaluation tokens
task.py     scoring an SAE inside a plain torch module (model=torch_module) by the task's loss
report.py   scoring one SAE for sae-eval: metrics.json, the density plot, W&B, one line
sweep.py    tables and L0 <-> quality Pareto plots over many evaluated runs
"""
