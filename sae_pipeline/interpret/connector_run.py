"""What `sae-connect` needs around the connector itself: the two SAEs and their stores, encoding rows,
the seed's E2·W·D1 start from a layer's weights file, and what replacing the layer costs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.interpret.connectors import e2wd1_init
from sae_pipeline.runs import single_target_only, store_path
from sae_pipeline.sae import read_sae


def sae_and_store(path: str, key: str):
    target, _ = single_target_only(Path(path))
    if target.kind != "native":
        raise UserError(
            f"{key}={path} is not a run trained here: sae-connect needs the store that trained it."
        )
    meta = json.loads((target.sae_dir / layout.CONFIG).read_text())
    return target, read_sae(target.sae_dir).eval().requires_grad_(False), store_path(target, meta)


@torch.no_grad()
def encode(sae, x_ND, device, batch: int = 8192):
    sae = sae.to(device)
    return torch.cat(
        [sae.encode(x_ND[i : i + batch].to(device)).float().cpu() for i in range(0, len(x_ND), batch)]
    )


def layer_init(path: str, sae_in, sae_out):
    try:
        tensors = load_file(path)
    except (OSError, SafetensorError) as err:
        raise UserError(f"connect.layer_weights={path} cannot be read as safetensors ({err}).") from None
    if "weight" not in tensors:
        raise UserError(
            f"connect.layer_weights={path} has no tensor named 'weight' (it has {sorted(tensors)})."
        )
    return e2wd1_init(sae_in, sae_out, tensors["weight"], tensors.get("bias"))


@torch.no_grad()
def layer_fvus(conn, sae_out, f1_NI, f2_NO, x2_ND) -> dict:
    """FVU of the later hook's activations rebuilt from the earlier one (decode2(connector(F1))), next to
    the FVU of sae_out alone (decode2(F2)): what replacing the layer between them by the connector costs."""
    total = (x2_ND - x2_ND.mean(0)).pow(2).sum()

    def fvu(x_hat_ND) -> float:
        return float((x_hat_ND - x2_ND).pow(2).sum() / total) if total > 0 else float("nan")

    return {
        "fvu_out_activations": fvu(sae_out.decode(conn(f1_NI))),
        "fvu_out_sae_alone": fvu(sae_out.decode(f2_NO)),
    }
