"""Every checksum the pipeline records, checked over a folder: stores, checkpoints and final SAEs.

    checked, problems = verify_tree(Path("runs"))   # one sentence per damaged file

A store is a folder with manifest.json (the manifest's seal, then every shard's sha256), a
checkpoint a checkpoints/step-*/ folder (state.json's seal, both safetensors files, finite
values), a final SAE an sae/ folder (its weights' sha256 in its config.json).
"""

from __future__ import annotations

from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.data.verify import verify_store
from sae_pipeline.errors import UserError
from sae_pipeline.sae import load_sae
from sae_pipeline.training import checkpoint


def verify_tree(path: Path) -> tuple[int, list[str]]:
    """(files checked, one sentence per problem) for every store, checkpoint and final SAE under path."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"path={path} does not exist")
    checked, problems = 0, []
    for manifest in sorted(path.rglob(layout.MANIFEST)):
        n, found = verify_store(manifest.parent)
        checked, problems = checked + n, problems + found
    for folder in sorted(path.rglob(layout.CHECKPOINTS)):
        for ckpt in checkpoint.list_checkpoints(folder.parent):
            checked += 1
            why = checkpoint.problem(ckpt)
            if why:
                problems.append(f"the checkpoint {ckpt} is damaged: {why}")
    for weights in sorted(path.rglob(f"{layout.FINAL_SAE}/{layout.SAE_WEIGHTS}")):
        checked += 1
        try:
            load_sae(weights.parent)
        except UserError as err:
            problems.append(str(err))
    if checked == 0:
        raise UserError(f"path={path} holds no activation store, checkpoint or SAE to verify")
    return checked, problems
