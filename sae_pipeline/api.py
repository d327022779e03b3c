"""The Python API for notebooks and scripts; `sae_pipeline` re-exports these names lazily.

    from sae_pipeline import load_sae, load_model, tokenize, capture_activations, splice_sae, steering
    sae = load_sae("runs/train/<run>")        # or its sae/ folder, a SAELens folder, a .safetensors file
    model, tokenizer = load_model(sae.meta["model_name"])
    input_ids = tokenize(tokenizer, "To be, or not to be")     # [1, T], BOS first as the stages have it
    with capture_activations(model, [sae.meta["hook_name"]]) as acts:
        model(input_ids)
    latents = sae.encode(acts[sae.meta["hook_name"]])           # [..., d_in] -> [..., d_sae]
    with splice_sae(model, sae):          # the model now runs on the SAE's output (BOS position left alone)
        logits = model(input_ids).logits

The stages run as functions with command-line overrides (a list of "key=value" or a dict) and return what
they wrote: `harvest_activations(...)` the store folders, `train_sae(...)` the run folder, `evaluate_sae(...)`
the metrics, `browse_features(...)` the browser folder, `explain_latents(...)` the explain folder,
`export_sae(...)` the exported folder. (They are not
called `harvest`, `train`, ... because those names are the stage modules `sae_pipeline.harvest`, ...)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sae_pipeline.errors import UserError
from sae_pipeline.sae import SAE

Overrides = list[str] | dict[str, Any] | None


# ----------------------------------------------------------------------------- SAEs and models


def load_sae(path: str | Path, device: str = "cpu", **bare_options) -> SAE:
    """An SAE in eval mode without gradients, from our run folder, our sae/ folder, a SAELens folder or a
    bare .safetensors file (`bare_options`: k=..., apply_b_dec_to_input=False for such files).

    `sae.meta` says what it was trained on when known: model_name, hook_name, context_size, dataset_path...
    """
    from sae_pipeline.runs import training_metadata
    from sae_pipeline.runtime import resolve_device
    from sae_pipeline.sae.formats import read_sae

    sae = read_sae(path, map_location=resolve_device(device), **bare_options).eval().requires_grad_(False)
    try:
        sae.meta = training_metadata(path)[0]
    except UserError:
        sae.meta = {}
    return sae


def tokenize(tokenizer, text: str, prepend_bos: bool = True) -> Tensor:
    """[1, T] token ids as the stages make them: BOS first (a masked LM's CLS), then the text's tokens with no
    other special token. `splice_sae` leaves that first position alone, as `sae-eval` does, so a notebook's
    cross-entropy matches the stage's."""
    from sae_pipeline.data.text import bos_token_id
    from sae_pipeline.interpret.steering import prompt_ids

    return prompt_ids(tokenizer, text, bos_token_id(tokenizer, prepend_bos), "cpu")


def load_model(model: str | dict | Any = "embedded:smollm2", device: str = "cpu", dtype: str = "float32"):
    """(model, tokenizer): a hub id, a local folder, embedded:smollm2, or a dict of model.* keys."""
    from sae_pipeline.model.loading import load_model as _load

    cfg = {"name": model, "dtype": dtype} if isinstance(model, str) else model
    return _load(cfg, device)


# ----------------------------------------------------------------------------- hooks


@contextmanager
def capture_activations(model: nn.Module, hooks: list[str]) -> Iterator[dict[str, Tensor]]:
    """Within the block, every forward records the activation at each hook: yields {hook name: tensor}
    holding the latest forward's [B, T, D] activation (detached)."""
    from sae_pipeline.model.activations import splice

    acts: dict[str, Tensor] = {}

    def recorder(name: str) -> Callable[[Tensor], Tensor]:
        def record(x: Tensor) -> Tensor:
            acts[name] = x.detach().clone()
            return x

        return record

    with ExitStack() as stack:
        for name in hooks:
            stack.enter_context(splice(model, name, recorder(name)))
        yield acts


def _hook_of(sae: SAE, hook: str | None) -> str:
    hook = hook or getattr(sae, "meta", {}).get("hook_name")
    if not hook:
        raise UserError(
            "the SAE does not say which hook it reads; pass hook='blocks.<L>.hook_resid_post' (or another)."
        )
    return hook


@contextmanager
def splice_sae(
    model: nn.Module,
    sae: SAE,
    hook: str | None = None,
    error_term: bool = False,
    edit: Callable[[Tensor], Tensor] | None = None,
    skip_bos: bool = True,
) -> Iterator[None]:
    """Within the block the activation x at the SAE's hook becomes decode(edit(encode(x))), plus the SAE's
    error term x - sae(x) when `error_term` (then with no edit the model's output is unchanged, and an edit
    changes only what it touches). `edit` maps latents [B, T, d_sae] to new latents.

    With `skip_bos` the first position of each forward keeps its activation: it holds BOS (`tokenize` puts it
    there), which the stages never store, train on or splice. For KV-cached generation pass skip_bos=False."""
    from sae_pipeline.model.activations import splice

    if getattr(sae, "transcoder", False):
        raise UserError(
            "splice_sae splices an SAE at one hook; a transcoder reads one hook and replaces another: "
            "score it with evaluate_sae / sae-eval, which splice it at its target hook."
        )
    param = next(sae.parameters())

    def fn(x_BTD: Tensor) -> Tensor:
        x = x_BTD.to(param.device, param.dtype)
        acts = sae.encode(x)
        out = sae.decode(edit(acts) if edit is not None else acts)
        if error_term:
            out = out + (x - sae.decode(acts))
        if skip_bos:
            out = torch.cat([x[:, :1], out[:, 1:]], dim=1)
        return out

    with splice(model, _hook_of(sae, hook), fn):
        yield


@contextmanager
def steering(
    model: nn.Module,
    sae: SAE,
    latent: int,
    value: float,
    mode: str = "add",
    hook: str | None = None,
    unit_direction: bool = True,
) -> Iterator[None]:
    """Steer with one latent as `sae-steer` does: add value x its (unit) decoder direction at every position,
    or clamp it to value / ablate it through the SAE keeping its error term (mode add | clamp | ablate)."""
    from sae_pipeline.interpret.steering import intervention
    from sae_pipeline.model.activations import splice

    if not 0 <= int(latent) < sae.d_sae:
        raise UserError(f"latent={latent} is not a latent of this SAE (0..{sae.d_sae - 1}).")
    with splice(
        model, _hook_of(sae, hook), intervention(sae, mode, int(latent), float(value), unit_direction)
    ):
        yield


# ----------------------------------------------------------------------------- stages as functions


def _override_list(overrides: Overrides) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, dict):

        def value(v: Any) -> str:
            if isinstance(v, bool) or v is None:
                return json.dumps(v)
            return json.dumps(v) if isinstance(v, (list, dict)) else str(v)

        return [f"{k}={value(v)}" for k, v in overrides.items()]
    return [str(o) for o in overrides]


def _compose(name: str, overrides: Overrides, **set_keys: Any):
    from sae_pipeline.schema import compose

    extra = [f"{k}={v}" for k, v in set_keys.items() if v is not None]
    return compose(name, _override_list(overrides) + extra)


def harvest_activations(overrides: Overrides = None) -> list[Path]:
    """sae-harvest as a function; returns one store folder per hook point."""
    from sae_pipeline import harvest as stage

    return stage.run(_compose("harvest", overrides))


def train_sae(overrides: Overrides = None) -> Path:
    """sae-train as a function (give store=...); returns the run folder (the final SAE is its sae/).

    Without train.run_dir the run goes to <paths.train>/<date>_<arch>, as on the command line."""
    from sae_pipeline import train as stage

    return stage.run(_compose("train", overrides))


def evaluate_sae(sae_path: str | Path, overrides: Overrides = None) -> dict:
    """sae-eval as a function: the metrics of the SAE at sae_path (for a folder of many runs, {run: metrics})."""
    from sae_pipeline import evaluate as stage

    results = stage.run(_compose("eval", overrides, sae_path=sae_path))["metrics"]
    return next(iter(results.values())) if len(results) == 1 else results


def browse_features(sae_path: str | Path, overrides: Overrides = None) -> Path:
    """sae-features as a function; returns the folder holding the browser's index.html."""
    from sae_pipeline import features as stage

    return stage.run(_compose("features", overrides, sae_path=sae_path))


def explain_latents(sae_path: str | Path, overrides: Overrides = None) -> Path:
    """sae-explain as a function (run browse_features first); returns <run>/explain, which holds
    explanations.jsonl and summary.json."""
    from sae_pipeline import explain as stage

    return stage.run(_compose("explain", overrides, sae_path=sae_path))


def export_sae(sae_path: str | Path, out: str | Path | None = None, overrides: Overrides = None) -> Path:
    """sae-export as a function (SAELens format); returns the folder written."""
    from sae_pipeline import export as stage

    return stage.run(_compose("export", overrides, sae_path=sae_path, **{"export.out": out}))
