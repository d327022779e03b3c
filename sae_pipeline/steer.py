"""sae-steer: generate with a latent steered (added, clamped or ablated) at the SAE's hook point.

    sae-steer sae_path=runs/demo/topk 'steer.latents=[12,40]' 'steer.scales=[4,8]'
    sae-steer sae_path=... steer.mode=clamp 'steer.latents=[12]' 'steer.scales=[0,20]' steer.temperature=0.8
    sae-steer sae_path=... steer.mode=ablate 'steer.latents=[12]' 'steer.prompts=["ROMEO:", "To be"]'

Interventions, applied at every position (the BOS position excepted with steer.skip_bos) of the prompt and
of every generated token:
  add:    x' = x + scale * W_dec[f] / ||W_dec[f]||  (steer.unit_direction=true: scale is in the hook's raw
          activation-norm units; compare with the store's mean activation norm, printed and recorded)
          or x + scale * W_dec[f] (unit_direction=false: scale is in the latent's activation units).
  clamp:  x' = x + (value - a_f(x)) * W_dec[f], a = sae.encode(x): the SAE's reconstruction with latent f
          forced to `value`, plus the SAE's error term x - sae(x), so only latent f's contribution changes.
  ablate: clamp with value 0.
Generation is a plain KV-cached loop: greedy at temperature 0, otherwise sampling from softmax(logits / T)
with a generator seeded by steer.seed before each continuation, so baseline and steered runs draw the same
random numbers. Prints each prompt's continuations stacked under headers; writes <run>/steer/steer.json.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sae_pipeline import layout, locks
from sae_pipeline.errors import UserError, report_config_errors, report_user_errors
from sae_pipeline.files import write_json_atomic
from sae_pipeline.interpret.logit_lens import top_logit_tokens
from sae_pipeline.interpret.steering import (
    FromPosition,
    generate,
    intervention,
    label,
    print_report,
    prompt_ids,
    variants,
)
from sae_pipeline.model.activations import capture, splice
from sae_pipeline.model.loading import max_context, token_strings
from sae_pipeline.runs import load_all
from sae_pipeline.schema import register_configs
from sae_pipeline.schema.steer import check_steer_config


def run(cfg: DictConfig) -> Path:
    """Baseline and steered continuations for every prompt x latent x scale; returns steer.json's path."""
    s = cfg.steer
    check_steer_config(s)
    target, spec, model, tokenizer, sae, hook = load_all(cfg.sae_path, s.device, cfg.source)
    bad = [f for f in s.latents if not 0 <= int(f) < sae.d_sae]
    if bad:
        raise UserError(
            f"steer.latents has ids {bad} outside 0..{sae.d_sae - 1} (the SAE has {sae.d_sae} latents)."
        )
    bos = spec.manifest.get("bos", {})
    bos_id = bos.get("token_id") if bos.get("prepended") else None
    start = 1 if (s.skip_bos and bos_id is not None) else 0
    device = sae.W_dec_FD.device
    latents = sorted({int(f) for f in s.latents})
    lens = top_logit_tokens(model, sae.W_dec_FD[latents], 10)
    limit = max_context(model)
    results = []
    strings: set[int] = set()

    def one(ids_1T: Tensor, fn) -> tuple[dict, Tensor]:
        """A continuation (and the log-probabilities of the first new token), with fn spliced in if given."""
        with (
            torch.no_grad(),
            splice(model, hook, FromPosition(fn, start)) if fn else contextlib.nullcontext(),
        ):
            new, first_V = generate(
                model, ids_1T, s.max_new_tokens, s.temperature, s.seed, tokenizer.eos_token_id
            )
        probs_V = torch.softmax(first_V, -1)
        top = probs_V.topk(min(s.n_next_tokens, probs_V.shape[0]))
        strings.update(top.indices.tolist())
        text = tokenizer.decode(new, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        nxt = [[int(t), round(float(p), 5)] for t, p in zip(top.indices, top.values, strict=True)]
        return {"text": text, "tokens": new, "next_tokens": nxt}, first_V.log_softmax(-1)

    for prompt in s.prompts:
        ids_1T = prompt_ids(tokenizer, prompt, bos_id, device)
        if limit is not None and ids_1T.shape[1] + s.max_new_tokens > limit:
            raise UserError(
                f"prompt {prompt[:40]!r} plus steer.max_new_tokens={s.max_new_tokens} exceeds the model's "
                f"{limit}-token context."
            )
        x_TD = capture(model, ids_1T, None, [hook])[hook.name][0, start:]
        acts_TF = sae.encode(x_TD.to(sae.W_dec_FD.dtype))[:, latents] if len(x_TD) else None
        base, base_lp = one(ids_1T, None)
        entry = {
            "prompt": prompt,
            "n_prompt_tokens": int(ids_1T.shape[1]),
            # each latent's largest activation on the prompt (a reference for clamp values)
            "prompt_max_act": {
                str(f): round(float(acts_TF[:, i].max()), 5) if acts_TF is not None else None
                for i, f in enumerate(latents)
            },
            "baseline": base,
            "steered": [],
        }
        for latent, value in variants(s):
            out, lp = one(ids_1T, intervention(sae, s.mode, latent, value, s.unit_direction))
            out.update(latent=latent, value=value, label=label(s.mode, latent, value, s.unit_direction))
            kl = torch.sum(base_lp.exp() * (base_lp - lp))  # KL(baseline || steered) of the first new token
            out["kl_next_token"] = round(float(kl), 6)
            entry["steered"].append(out)
        results.append(entry)
    names = token_strings(tokenizer, strings | ({int(t) for t in lens[0].flatten()} if lens else set()))
    report = {
        "run": str(target.run_dir),
        "sae_dir": str(target.sae_dir),
        "hook": hook.name,
        "mode": s.mode,
        "settings": OmegaConf.to_container(s, resolve=True),
        "activation_norm": spec.manifest.get("norm_stats"),  # of the store's rows: a yardstick for add scales
        "latents": {
            str(f): {
                "decoder_norm": round(float(sae.W_dec_FD[f].norm()), 6),
                "promoted": [names[int(t)] for t in lens[0][i]] if lens else None,
            }
            for i, f in enumerate(latents)
        },
        "tokens": {str(t): names[t] for t in strings},
        "results": results,
    }
    out_dir = Path(s.out_dir) if s.out_dir else target.run_dir / layout.STEER
    with locks.hold(out_dir, "the steering folder", "rerun it when that one has ended"):
        write_json_atomic(out_dir / layout.STEER_JSON, report)
    print_report(report)
    print(f"wrote {out_dir / layout.STEER_JSON}", file=sys.stderr)
    return out_dir / layout.STEER_JSON


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="steer")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
