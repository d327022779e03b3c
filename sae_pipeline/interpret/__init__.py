"""Interpretation: one-pass feature statistics, the browser and its records, the logit lens, steering,
feature connectors between two SAEs (connectors.py, seeds/002), and automatic explanations of latents
(sae-explain): chat.py (an instruct model over HTTP or in-process), explain_prompts.py (prompts, parsing
answers), explain_scores.py (detection, fuzzing), explanations.py (the explain folder's records),
explain_run.py (the stage's work)."""
