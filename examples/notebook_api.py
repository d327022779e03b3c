import torch

from sae_pipeline import (
    capture_activations,
    evaluate_sae,
    harvest_activations,
    load_model,
    load_sae,
    splice_sae,
    steering,
    tokenize,
    train_sae,
)

harvest_settings = ["hook.layer=3", "harvest.n_tokens=50000"]  # embedded SmolLM2 on Shakespeare by default
train_settings = ["sae=topk", "sae.k=32", "train.total_tokens=500000", "logger=none"]

(store,) = harvest_activations(harvest_settings)  # one store folder per hook point
run_dir = train_sae([f"store={store}", *train_settings])  # the run folder; its SAE is run_dir/sae
metrics = evaluate_sae(run_dir, ["eval.n_tokens=2048", "logger=none"])
print(f"L0 {metrics['l0']:.1f}, loss recovered {metrics['loss_recovered']:.3f}")

sae = load_sae(run_dir)  # also a SAELens folder, or a .safetensors file with W_enc/b_enc/W_dec/b_dec
hook = sae.meta["hook_name"]  # e.g. blocks.3.hook_resid_post
model, tokenizer = load_model(sae.meta["model_name"])
ids = tokenize(tokenizer, "To be, or not to be, that is the question")  # [1, T], BOS first as in the stages

with capture_activations(model, [hook]) as acts:
    clean = model(ids).logits
x = acts[hook]  # [1, T, d_in]
latents = sae.encode(x)  # [1, T, d_sae]: any leading shape works, and so do decode and sae(x)
idx, vals = sae.encode_sparse(x)  # [1, T, K] each: the active latents and their values
top = int(idx[0, -1, 0])  # the strongest latent on the last token

with splice_sae(model, sae):  # the model runs on the SAE's reconstruction (BOS kept, as sae-eval does)
    spliced = model(ids).logits
with splice_sae(model, sae, error_term=True, edit=lambda a: a.index_fill(-1, torch.tensor([top]), 0.0)):
    ablated = model(ids).logits  # exact model + the error term, minus that one latent's contribution
with steering(model, sae, latent=top, value=8.0):  # add 8 x the latent's unit decoder direction
    steered = model(ids).logits
