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
import textwrap
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from sae_pipeline import paths
from sae_pipeline.config import register_configs
from sae_pipeline.errors import UserError, report_user_errors
from sae_pipeline.features import load_all, token_strings, top_logit_tokens
from sae_pipeline.features_config import check_steer_config
from sae_pipeline.hooks import capture, splice
from sae_pipeline.models import max_context
from sae_pipeline.sae import SAE
from sae_pipeline.store import write_json_atomic


def intervention(sae: SAE, mode: str, latent: int, value: float, unit_direction: bool = True):
    """x_BTD -> x'_BTD for one latent (see the module docstring for the formulas)."""
    row_D = sae.W_dec_FD[latent].detach()
    if mode == "add":
        step_D = value * (row_D / row_D.norm().clamp_min(1e-12) if unit_direction else row_D)
        return lambda x_BTD: x_BTD + step_D.to(x_BTD.dtype)
    if mode not in ("clamp", "ablate"):
        raise UserError(f"steer.mode must be add, clamp or ablate, got {mode!r}.")
    target = 0.0 if mode == "ablate" else float(value)

    def through_sae(x_BTD: Tensor) -> Tensor:
        a_BT = sae.encode(x_BTD.reshape(-1, x_BTD.shape[-1]).to(row_D.dtype))[:, latent].view(
            x_BTD.shape[:-1]
        )
        return x_BTD + ((target - a_BT)[..., None] * row_D).to(x_BTD.dtype)

    return through_sae


class FromPosition:
    """Apply fn only at absolute positions >= start, counting positions across KV-cached calls."""

    def __init__(self, fn: Callable[[Tensor], Tensor], start: int):
        self.fn, self.start, self.offset = fn, start, 0

    def __call__(self, x_BTD: Tensor) -> Tensor:
        T = x_BTD.shape[1]
        pos_T = torch.arange(self.offset, self.offset + T, device=x_BTD.device)
        self.offset += T
        if self.offset <= self.start:
            return x_BTD
        return torch.where((pos_T >= self.start)[None, :, None], self.fn(x_BTD), x_BTD)


@torch.no_grad()
def generate(
    model, ids_1T: Tensor, max_new_tokens: int, temperature: float, seed: int, eos_id: int | None
) -> tuple[list[int], Tensor]:
    """KV-cached greedy / temperature sampling; returns (new token ids, logits after the prompt [V])."""
    gen = torch.Generator(device=ids_1T.device).manual_seed(int(seed))
    out = model(input_ids=ids_1T, use_cache=True)
    logits_V = out.logits[0, -1].float()
    first_V, new = logits_V, []
    for step in range(max_new_tokens):
        if temperature == 0:
            nxt = int(logits_V.argmax())
        else:
            probs_V = torch.softmax(logits_V / temperature, dim=-1)
            nxt = int(torch.multinomial(probs_V, 1, generator=gen))
        new.append(nxt)
        if nxt == eos_id or step == max_new_tokens - 1:
            break
        step_ids = torch.tensor([[nxt]], device=ids_1T.device)
        out = model(input_ids=step_ids, past_key_values=out.past_key_values, use_cache=True)
        logits_V = out.logits[0, -1].float()
    return new, first_V


def prompt_ids(tokenizer, prompt: str, bos_id: int | None, device) -> Tensor:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = ([bos_id] if bos_id is not None else []) + list(ids)
    if not ids:
        raise UserError("steer.prompts has an empty prompt and the model has no BOS token to start from.")
    return torch.tensor([ids], device=device)


def _variants(s) -> list[tuple[int, float]]:
    values = [0.0] if s.mode == "ablate" else [float(v) for v in s.scales]
    return [(int(f), v) for f in s.latents for v in values]


def _label(mode: str, latent: int, value: float, unit: bool) -> str:
    if mode == "add":
        return f"add latent {latent} x {value:g}" + (" (unit direction)" if unit else " (raw decoder row)")
    return f"ablate latent {latent}" if mode == "ablate" else f"clamp latent {latent} = {value:g}"


def run(cfg: DictConfig) -> Path:
    """Baseline and steered continuations for every prompt x latent x scale; returns steer.json's path."""
    s = cfg.steer
    check_steer_config(s)
    target, spec, model, tokenizer, sae, hook = load_all(cfg.sae_path, s.device)
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
        for latent, value in _variants(s):
            out, lp = one(ids_1T, intervention(sae, s.mode, latent, value, s.unit_direction))
            out.update(latent=latent, value=value, label=_label(s.mode, latent, value, s.unit_direction))
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
    out_dir = Path(s.out_dir) if s.out_dir else target.run_dir / paths.STEER
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / paths.STEER_JSON, report)
    print_report(report)
    print(f"wrote {out_dir / paths.STEER_JSON}", file=sys.stderr)
    return out_dir / paths.STEER_JSON


def print_report(report: dict) -> None:
    tokens = report["tokens"]
    norm = (report.get("activation_norm") or {}).get("mean")
    if norm is not None:
        print(f"hook {report['hook']}: mean activation norm {norm:.4g} (the yardstick for add scales)\n")

    def block(title: str, r: dict) -> None:
        nxt = ", ".join(f"{tokens[str(t)]!r} {p:.3f}" for t, p in r["next_tokens"])
        print(f"--- {title}" + (f"  (KL {r['kl_next_token']:.4f})" if "kl_next_token" in r else ""))
        print(textwrap.indent(r["text"] or "(empty)", "    "))
        print(f"    next-token top: {nxt}")

    for i, entry in enumerate(report["results"]):
        acts = ", ".join(f"{f}: {a:.3g}" for f, a in entry["prompt_max_act"].items() if a is not None)
        print(f"=== prompt {i + 1}/{len(report['results'])}: {entry['prompt']!r}  (max act on prompt {acts})")
        block("baseline", entry["baseline"])
        for r in entry["steered"]:
            block(r["label"], r)
        print()


register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="steer")
@report_user_errors  # inside hydra.main, so a UserError is one line instead of Hydra's traceback
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
