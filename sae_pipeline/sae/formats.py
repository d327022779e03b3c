"""SAEs in other formats: SAELens folders (written and read) and bare safetensors files (read).

    read_sae("runs/train/x")                  # our run folder, our sae/ folder, a SAELens folder,
    read_sae("gemma_scope.safetensors")       # or a bare file with W_enc/b_enc/W_dec/b_dec(/threshold)
    write_saelens(sae, "out/", {"model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"})

Target format: the `cfg.json` + `sae_weights.safetensors` folder that sae_lens 5.x `SAE.save_model` writes
and `SAE.load_from_disk` loads (flat cfg keys). sae_lens 6.x loads such a folder through
its pre-6.0 config conversion (a cfg.json without `sae_lens_version` is treated as pre-6.0). On reading we
also accept 6.x configs (run metadata nested under `metadata`/`meta`, `k` at the top level). Both
directions are checked against sae_lens 6.54.12 itself in tests/unit/sae/test_saelens_roundtrip.py.

SAELens's inference maths, which every export reproduces exactly (apply_b_dec_to_input=True,
normalize_activations="none", no finetuning scaling factor; x in raw activation units like ours):
    h        = (x - b_dec) @ W_enc + b_enc
    standard a = ReLU(h)                         topk     a = ReLU of the k largest h per row, 0 elsewhere
    jumprelu a = ReLU(h) * (h > threshold)       gated    a = (h_gate > 0) * ReLU(h_mag), with
             h_gate = (x - b_dec) @ W_enc + b_gate,  h_mag = (x - b_dec) @ (W_enc * exp(r_mag)) + b_mag
    x_hat    = a @ W_dec + b_dec
Our encoders compute the same h. BatchTopK is exported in its inference form, a JumpReLU with one uniform
threshold max(t, 0) (what SAELens itself saves for a BatchTopK SAE): a = h * (h > t) == ReLU(h) * (h > t).
Importing folds what we do not model into the weights: apply_b_dec_to_input=False moves b_dec @ W_enc into
the encoder biases, a finetuning scaling factor s multiplies the decoder rows, and sae_lens 6.x's TopK
rescale_acts_by_decoder_norm=True (h scaled by the decoder row norms n, a divided by n before decoding)
becomes W_enc * n, b_enc * n, W_dec / n.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.files import save_tensors_atomic, write_json_atomic

from .base import SAE
from .gated import GatedConfig
from .jumprelu import JumpReLUConfig
from .registry import build_sae
from .relu import ReLUConfig
from .saving import load_sae_folder
from .topk import TopKConfig

EXPORT_ARCH = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
}
RUN_META_KEYS = ("model_name", "hook_name", "hook_layer", "hook_head_index", "context_size", "prepend_bos",
                 "dataset_path", "neuronpedia_id")  # fmt: skip


# ----------------------------------------------------------------------------- export


def saelens_tensors(sae: SAE) -> dict[str, Tensor]:
    """The SAELens state dict of `sae` (float32, CPU), named and shaped as SAELens names them."""
    arch = sae.cfg.arch
    if getattr(sae, "transcoder", False):
        raise UserError(
            "a transcoder has no SAELens SAE counterpart; use its own sae/ folder (load_sae reads it)."
        )
    if arch not in EXPORT_ARCH:
        raise UserError(f"sae.arch={arch!r} has no SAELens counterpart; export one of {sorted(EXPORT_ARCH)}.")
    with torch.no_grad():
        t = {"W_enc": sae.W_enc_DF, "W_dec": sae.W_dec_FD, "b_dec": sae.b_dec_D}
        if arch == "gated":
            t.update(b_gate=sae.b_enc_F, r_mag=sae.r_mag_F, b_mag=sae.b_mag_F)
        else:
            t["b_enc"] = sae.b_enc_F
        if arch == "jumprelu":
            t["threshold"] = sae.threshold_F
        elif arch == "batchtopk":
            t["threshold"] = sae.threshold.clamp_min(0).expand(sae.d_sae)
        return {k: v.detach().float().cpu().contiguous().clone() for k, v in t.items()}


def _hook_layer(hook_name: str) -> int:
    parts = hook_name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return int(parts[1])
    return 0


def saelens_config(sae: SAE, meta: dict[str, Any]) -> dict[str, Any]:
    """cfg.json for `sae`; `meta` gives model_name, hook_name, context_size, dataset_path, prepend_bos."""
    arch = EXPORT_ARCH.get(sae.cfg.arch)
    if arch is None:
        saelens_tensors(sae)  # raises the UserError naming the arch
    unknown = sorted(set(meta) - set(RUN_META_KEYS))
    if unknown:
        raise ValueError(f"unknown SAELens metadata keys {unknown}")
    hook_name = str(meta.get("hook_name") or "")
    k = {"k": int(sae.cfg.k)} if arch == "topk" else {}
    return {
        "architecture": arch,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "model_name": str(meta.get("model_name") or ""),
        "hook_name": hook_name,
        "hook_layer": int(meta["hook_layer"])
        if meta.get("hook_layer") is not None
        else _hook_layer(hook_name),
        "hook_head_index": meta.get("hook_head_index"),
        "activation_fn_str": "topk" if arch == "topk" else "relu",
        "activation_fn_kwargs": k,
        "apply_b_dec_to_input": True,
        "finetuning_scaling_factor": False,
        "sae_lens_training_version": None,
        "prepend_bos": bool(meta.get("prepend_bos", True)),
        "dataset_path": str(meta.get("dataset_path") or ""),
        "dataset_trust_remote_code": False,
        "context_size": int(meta.get("context_size") or 0),
        "normalize_activations": "none",
        "neuronpedia_id": meta.get("neuronpedia_id"),
        "model_from_pretrained_kwargs": {},
        "seqpos_slice": [None],
        **k,  # sae_lens 6.x reads k at the top level
    }


def write_saelens(sae: SAE, folder: Path | str, meta: dict[str, Any]) -> Path:
    """Write cfg.json + sae_weights.safetensors into folder (atomic writes); returns the folder."""
    folder = Path(folder)
    cfg = saelens_config(sae, meta)
    tensors = saelens_tensors(sae)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(folder / layout.SAELENS_WEIGHTS, tensors)
    write_json_atomic(folder / layout.SAELENS_CONFIG, cfg)
    return folder


# ----------------------------------------------------------------------------- import


def _read_tensors(path: Path, map_location) -> dict[str, Tensor]:
    try:
        return {k: v.float() for k, v in load_file(str(path), device=str(map_location)).items()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"SAE weights file {path} is not a readable safetensors file ({err}).") from None


def _check_shapes(t: dict[str, Tensor], d_in: int, d_sae: int, where: Path) -> None:
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,), "b_enc": (d_sae,),
            "b_gate": (d_sae,), "b_mag": (d_sae,), "r_mag": (d_sae,)}  # fmt: skip
    for name, shape in want.items():
        if name in t and tuple(t[name].shape) != shape:
            raise UserError(
                f"SAE weights file {where}: tensor {name} has shape {list(t[name].shape)}, expected {list(shape)}."
            )


def from_tensors(
    t: dict[str, Tensor], arch: str, where: Path, k: int | None = None, apply_b_dec_to_input: bool = True
) -> SAE:
    """Our SAE computing what SAELens computes with these tensors (arch: standard|topk|jumprelu|gated)."""
    need = {"W_enc", "W_dec", "b_dec"} | ({"b_gate", "b_mag", "r_mag"} if arch == "gated" else {"b_enc"})
    if arch == "jumprelu":
        need.add("threshold")
    missing = sorted(need - set(t))
    if missing:
        raise UserError(f"SAE weights file {where} lacks tensors {missing} needed by a {arch!r} SAE.")
    if t["W_enc"].ndim != 2 or t["W_dec"].ndim != 2:
        raise UserError(f"SAE weights file {where}: W_enc and W_dec must be 2-D matrices.")
    d_in, d_sae = t["W_enc"].shape
    _check_shapes(t, d_in, d_sae, where)
    W_enc, b_dec = t["W_enc"], t["b_dec"]
    shift = W_enc.new_zeros(d_sae) if apply_b_dec_to_input else b_dec @ W_enc
    cfgs = {
        "standard": lambda: ReLUConfig(d_sae=d_sae, sparsity_penalty="l1_decoder_norm"),
        "topk": lambda: TopKConfig(d_sae=d_sae, k=int(k or 0)),
        "jumprelu": lambda: JumpReLUConfig(d_sae=d_sae),
        "gated": lambda: GatedConfig(d_sae=d_sae),
    }
    if arch == "topk" and not (k and 1 <= int(k) <= d_sae):
        raise UserError(f"the topk SAE at {where} needs k between 1 and d_sae={d_sae}, got {k!r}.")
    cfg = cfgs[arch]()
    cfg.normalize_input = False  # the weights are in raw activation units already
    sae = build_sae(cfg, d_in)
    state = {"W_enc_DF": W_enc, "W_dec_FD": t["W_dec"], "b_dec_D": b_dec}
    if arch == "gated":
        state.update(
            b_enc_F=t["b_gate"] + shift, r_mag_F=t["r_mag"], b_mag_F=t["b_mag"] + shift * t["r_mag"].exp()
        )
    else:
        state["b_enc_F"] = t["b_enc"] + shift
    if arch == "jumprelu":
        theta = t["threshold"].reshape(-1).expand(d_sae) if t["threshold"].numel() == 1 else t["threshold"]
        if tuple(theta.shape) != (d_sae,):
            raise UserError(
                f"SAE weights file {where}: threshold has shape {list(theta.shape)}, expected [{d_sae}]."
            )
        # ReLU(h) * (h > t) == h * (h > max(t, 0)): a threshold <= 0 becomes log(0) = -inf, i.e. theta = 0
        state["log_threshold_F"] = theta.clamp_min(0).log()
    sae.load_state_dict({k_: v.detach().clone() for k_, v in state.items()}, strict=True)
    return sae


def _meta(cfg: dict) -> dict:
    """Flat view of a SAELens cfg: 6.x nests the run metadata under `metadata` (or `meta`)."""
    nested = cfg.get("metadata") or cfg.get("meta") or {}
    return {**(nested if isinstance(nested, dict) else {}), **cfg}


def read_saelens_config(folder: Path) -> dict:
    path = Path(folder) / layout.SAELENS_CONFIG
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"SAELens config file {path} is unreadable ({err}).") from None
    if not isinstance(cfg, dict):
        raise UserError(f"SAELens config file {path} is not a JSON object.")
    return _meta(cfg)


def _fold_decoder_norm(t: dict[str, Tensor]) -> None:
    """sae_lens 6.x TopK with rescale_acts_by_decoder_norm=True: h = (pre @ W_enc + b_enc) * n and
    x_hat = (a / n) @ W_dec with n = |W_dec rows|; the same function with W_enc * n, b_enc * n, W_dec / n."""
    if "W_dec" not in t or "W_enc" not in t or "b_enc" not in t:
        return  # from_tensors names what is missing
    n_F = t["W_dec"].norm(dim=-1)
    t["W_enc"] = t["W_enc"] * n_F
    t["b_enc"] = t["b_enc"] * n_F
    t["W_dec"] = t["W_dec"] / n_F.clamp_min(1e-30).unsqueeze(-1)


def read_saelens(folder: Path | str, map_location: str | torch.device = "cpu") -> SAE:
    """Our SAE from a SAELens folder (cfg.json + sae_weights.safetensors)."""
    folder = Path(folder)
    cfg = read_saelens_config(folder)
    where = folder / layout.SAELENS_CONFIG
    arch = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k") or kwargs.get("k")
    if arch == "standard" and act == "topk":
        arch = "topk"
    if arch not in ("standard", "topk", "jumprelu", "gated"):
        raise UserError(
            f"{where}: architecture {arch!r} is not supported (standard, topk, jumprelu, gated are)."
        )
    if act not in ("relu", "topk"):
        raise UserError(f"{where}: activation_fn {act!r} is not supported (relu, topk are).")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in", False):  # SAELens's forward ignores the latter too
        raise UserError(
            f"{where}: normalize_activations={norm!r} rescales each input at run time; not supported."
        )
    if cfg.get("hook_head_index") is not None or cfg.get("reshape_activations", "none") != "none":
        raise UserError(f"{where}: per-head (hook_z) SAEs are not supported.")
    t = _read_tensors(folder / layout.SAELENS_WEIGHTS, map_location)
    scale = t.pop("finetuning_scaling_factor", None)
    scale = t.pop("scaling_factor", scale)
    if scale is not None and cfg.get("finetuning_scaling_factor"):
        t["W_dec"] = t["W_dec"] * scale.reshape(-1, 1)  # (a * s) @ W_dec == a @ (s[:, None] * W_dec)
    if cfg.get("rescale_acts_by_decoder_norm"):
        if arch != "topk":
            raise UserError(f"{where}: rescale_acts_by_decoder_norm is only supported for topk SAEs.")
        _fold_decoder_norm(t)
    sae = from_tensors(
        t, arch, folder / layout.SAELENS_WEIGHTS, k, bool(cfg.get("apply_b_dec_to_input", True))
    )
    for key, value in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        if key in cfg and int(cfg[key]) != value:
            raise UserError(f"{where} says {key}={cfg[key]} but its weights give {value}.")
    return sae.to(map_location)


def read_bare(
    path: Path | str, map_location="cpu", k: int | None = None, apply_b_dec_to_input: bool = True
) -> SAE:
    """A bare safetensors file: threshold present -> JumpReLU, k given -> TopK, else ReLU."""
    path = Path(path)
    t = _read_tensors(path, map_location)
    arch = "jumprelu" if "threshold" in t else "topk" if k else "standard"
    if arch == "jumprelu" and k:
        raise UserError(f"{path} holds a threshold (a JumpReLU SAE) but k={k} was given too.")
    return from_tensors(t, arch, path, k, apply_b_dec_to_input).to(map_location)


# ----------------------------------------------------------------------------- any format


def sae_format(path: Path | str) -> str | None:
    """'native' (our sae/ folder), 'run' (a run folder holding sae/), 'saelens', 'bare' (a .safetensors file)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".safetensors":
        if p.name == layout.SAE_WEIGHTS and (p.parent / layout.CONFIG).is_file():
            return "native"
        if p.name == layout.SAELENS_WEIGHTS and (p.parent / layout.SAELENS_CONFIG).is_file():
            return "saelens"
        return "bare"
    if (p / layout.CONFIG).is_file() and (p / layout.SAE_WEIGHTS).is_file():
        return "native"
    if (p / layout.FINAL_SAE / layout.CONFIG).is_file():
        return "run"
    if (p / layout.SAELENS_CONFIG).is_file() and (p / layout.SAELENS_WEIGHTS).is_file():
        return "saelens"
    return None


def read_sae(path: Path | str, map_location: str | torch.device = "cpu", **bare_options) -> SAE:
    """Our SAE from any supported format; `bare_options` (k, apply_b_dec_to_input) apply to bare files."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"SAE path {p} does not exist.")
    kind = sae_format(p)
    folder = p.parent if p.is_file() else p
    if kind == "saelens":
        return read_saelens(folder, map_location)
    if kind == "bare":
        return read_bare(p, map_location, **bare_options)
    if kind == "run":
        folder = p / layout.FINAL_SAE
    if (
        kind is None
        and p.is_dir()
        and not (p / layout.CONFIG).exists()
        and (p / layout.SAELENS_CONFIG).exists()
    ):
        raise UserError(f"SAELens folder {p} has {layout.SAELENS_CONFIG} but no {layout.SAELENS_WEIGHTS}.")
    return load_sae_folder(folder, map_location)
