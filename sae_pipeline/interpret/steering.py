"""Steering edits at a hook point, and the KV-cached generation loop that `sae-steer` runs them in.

Interventions, applied at every position (the BOS position excepted with steer.skip_bos) of the prompt and
of every generated token:
  add:    x' = x + scale * W_dec[f] / ||W_dec[f]||  (unit_direction=true: scale is in the hook's raw
          activation-norm units) or x + scale * W_dec[f] (unit_direction=false: the latent's units).
  clamp:  x' = x + (value - a_f(x)) * W_dec[f], a = sae.encode(x): the SAE's reconstruction with latent f
          forced to `value`, plus the SAE's error term x - sae(x), so only latent f's contribution changes.
  ablate: clamp with value 0.
Generation is greedy at temperature 0, otherwise sampling from softmax(logits / T) with a generator seeded
before each continuation, so baseline and steered runs draw the same random numbers.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable

import torch
from torch import Tensor

from sae_pipeline.errors import UserError
from sae_pipeline.sae import SAE


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


def variants(s) -> list[tuple[int, float]]:
    values = [0.0] if s.mode == "ablate" else [float(v) for v in s.scales]
    return [(int(f), v) for f in s.latents for v in values]


def label(mode: str, latent: int, value: float, unit: bool) -> str:
    if mode == "add":
        return f"add latent {latent} x {value:g}" + (" (unit direction)" if unit else " (raw decoder row)")
    return f"ablate latent {latent}" if mode == "ablate" else f"clamp latent {latent} = {value:g}"


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
