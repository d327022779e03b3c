"""Loading a language model and its tokenizer: hub name, local folder, GGUF, or the embedded default.

A GGUF file (model.gguf_file) is de-quantized once into a cached float32 folder (model/gguf_cache.py).

Causal LMs by default; masked LMs (ESM-2, BERT-style) with model.kind=masked_lm or when the model's config
names a *ForMaskedLM architecture. Activations are read from the base model either way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from sae_pipeline.config_access import cfg_value
from sae_pipeline.errors import UserError
from sae_pipeline.model import assets, gguf_cache
from sae_pipeline.runtime import resolve_device

MODEL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in MODEL_DTYPES:
        raise UserError(
            f"model.dtype={name!r} is not supported; choose one of auto, {', '.join(MODEL_DTYPES)}"
        )
    return MODEL_DTYPES[name]


def resolve_name(name: str) -> str:
    """The folder or hub id transformers should load (the embedded default becomes its cached folder)."""
    if name == assets.EMBEDDED_MODEL:
        return str(assets.smollm2_dir())
    return name


def load_model(model_cfg: Any, device: str | torch.device = "auto"):
    """Return (model, tokenizer), the model in eval mode on `device` (tokenizer None for model.kind=torch_module).

    `model_cfg` is a ModelConfig, a DictConfig or the plain dict a store manifest records."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bars are the ones that matter

    device = device if isinstance(device, torch.device) else resolve_device(device)
    if cfg_value(model_cfg, "kind") == "torch_module":  # any nn.Module from a factory; no tokenizer
        from sae_pipeline.model.torch_module import load_torch_module

        return load_torch_module(model_cfg, device), None
    name = cfg_value(model_cfg, "name")
    if not name:
        raise UserError("model.name is empty; give a hub id, a local folder or embedded:smollm2")
    source = resolve_name(name)
    gguf_file = cfg_value(model_cfg, "gguf_file")
    # A hub id is `name` or `org/name`; a path starts with / . ~ or has more parts.
    looks_local = source.startswith((os.path.sep, ".", "~")) or source.count("/") > 1 or Path(source).exists()
    if looks_local and not Path(source).exists():
        raise UserError(f"model.name={name!r}: no such folder")
    kwargs = dict(
        revision=cfg_value(model_cfg, "revision"),
        trust_remote_code=bool(cfg_value(model_cfg, "trust_remote_code", False)),
    )
    if gguf_file:  # de-quantized once into a cached float32 folder (model/gguf_cache.py)
        source = str(gguf_cache.cached_dir(gguf_cache.gguf_path(source, gguf_file, kwargs["revision"])))
        kwargs["revision"] = None
    dtype = resolve_dtype(cfg_value(model_cfg, "dtype", "float32") or "float32", device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        auto_cls = _auto_class(cfg_value(model_cfg, "kind", "auto") or "auto", source, kwargs)
        model = auto_cls.from_pretrained(source, dtype=dtype, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load model.name={name!r} ({first})") from None
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


MODEL_KINDS = ("auto", "causal_lm", "masked_lm", "torch_module")


def _auto_class(kind: str, source: str, kwargs: dict):
    """AutoModelForMaskedLM for model.kind=masked_lm or a config whose architectures say *ForMaskedLM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    if kind not in MODEL_KINDS:
        raise UserError(f"model.kind={kind!r} is not one of {', '.join(MODEL_KINDS)}")
    if kind == "auto":
        archs = AutoConfig.from_pretrained(source, **kwargs).architectures or []
        kind = "masked_lm" if any(a.endswith("ForMaskedLM") for a in archs) else "causal_lm"
    return AutoModelForMaskedLM if kind == "masked_lm" else AutoModelForCausalLM


def max_context(model) -> int | None:
    """The longest context the model accepts, when its config says."""
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def token_strings(tokenizer, ids) -> dict[int, str]:
    """id -> the text the token decodes to on its own (byte fragments may show as U+FFFD)."""
    ids = sorted({int(i) for i in ids})
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return dict(zip(ids, texts, strict=True))
