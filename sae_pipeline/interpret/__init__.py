"""Interpretation: what an SAE's latents are and what they do.

feature_stats.py   one pass of per-latent statistics for the browser, as [F, k] tensors
feature_report.py  per-latent records of the browser, assembled from those statistics
browser.py         the static latent browser: index.html + features_data.js
logit_lens.py      which output tokens a decoder row promotes and suppresses
steering.py        steering edits at a hook point and sae-steer's KV-cached generation loop
probe_tasks.py     labelled text for probing (genre, play, speaker, files), cut into contexts
probing.py         probes on latents next to dense activations: are the latents useful features?
probe_report.py    one probing task for one SAE, end to end (sae-probe)
connectors.py      feature connectors (seeds/002): a sparse map between two SAEs' features
connector_run.py   what sae-connect needs around a connector: the two SAEs, their stores, encoded rows
chat.py            an instruct model over the chat-completions API or in-process (sae-explain)
explain_prompts.py the explain and score prompts, and parsing of the answers
explain_scores.py  detection and fuzzing scores of an explanation
explanations.py    the explain folder's records: drafts, scored explanations, summary
explain_run.py     sae-explain's work: pick latents, explain, score, resume
"""
