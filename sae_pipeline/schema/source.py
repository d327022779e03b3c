"""The `source` group of sae-eval / sae-features / sae-steer: what an SAE not trained here reads.

An SAE from elsewhere (a SAELens folder, a bare .safetensors file) has no activation store naming its model,
hook and text, so the user names them here; each key left null falls back to what the SAE's own cfg.json
says. Our own runs ignore this group: their store's manifest says all of it.

    sae-eval sae_path=/saes/gpt2-res-8 source.model=gpt2 source.hook=blocks.8.hook_resid_pre \\
        'source.data={name:json,data_files:/data/heldout.jsonl}'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass
class SourceConfig:
    model: Optional[str] = None  # hub id or local folder of the model (default: cfg.json model_name)
    model_dtype: str = "float32"  # float32 | float16 | bfloat16 | auto
    trust_remote_code: bool = False
    hook: Optional[str] = None  # e.g. blocks.8.hook_resid_pre (default: cfg.json hook_name)
    # The text (a DataConfig-like dict, e.g. {name: json, data_files: /x.jsonl}); its held-out documents
    # (data.eval_documents of them, or data.eval_split) are used. Default: cfg.json dataset_path, streamed.
    data: Optional[Any] = None
    context_size: Optional[int] = None  # tokens per context (default: cfg.json context_size, else 128)
    prepend_bos: Optional[bool] = None  # default: cfg.json prepend_bos, else true
    seed: int = 0  # which documents are held out
    # bare .safetensors files only (a SAELens cfg.json says these itself):
    k: Optional[int] = (
        None  # a TopK SAE keeping k latents per token (default: ReLU, or JumpReLU with threshold)
    )
    apply_b_dec_to_input: bool = True  # false: the encoder reads x, not x - b_dec (e.g. Gemma Scope's params)
