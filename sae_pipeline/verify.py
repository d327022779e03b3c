"""sae-verify: check the recorded checksums of stores, checkpoints and SAEs, naming each damaged file.

    sae-verify path=runs/stores/smollm2-135m/shakespeare/blocks.9.hook_resid_post   # one store
    sae-verify path=runs                                                          # everything under a folder

Prints one line per damaged file and exits with status 2 when there is one; a damaged shard is
rewritten (alone) by rerunning the sae-harvest command that wrote its store.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae_pipeline.data.remote import is_url
from sae_pipeline.errors import UserError, report_config_errors, report_user_errors
from sae_pipeline.integrity.tree import verify_store, verify_tree
from sae_pipeline.schema import register_configs


def run(cfg: DictConfig) -> int:
    """Number of files checked; raises UserError after listing the damaged ones."""
    if is_url(cfg.path):  # a store at an fsspec URL: its manifest, then every object's sha256
        checked, problems = verify_store(cfg.path)
    else:
        checked, problems = verify_tree(Path(cfg.path).expanduser())
    for line in problems:
        print(f"damaged: {line}")
    if problems:
        raise UserError(
            f"{len(problems)} of the {checked} files checked under {cfg.path} are damaged (listed above)"
        )
    print(f"ok: {checked} files under {cfg.path} match their checksums")
    return checked


register_configs()


@report_config_errors  # outside hydra.main: an override it cannot compose is one line too
@hydra.main(version_base="1.3", config_path="conf", config_name="verify")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
