"""How many config keys each command shows a user, and how many its `advanced` nodes hold.

    python scripts/config_keys.py

A key is a leaf of the command's composed config with its default options (a list or a null group is
one key; `hydra` is not counted). `shown` leaves out every `<group>.advanced` node, which `--help`
folds away; `all` counts them too.
"""

from __future__ import annotations

from omegaconf import DictConfig

from sae_pipeline.schema import compose

COMMANDS = (
    "harvest",
    "train",
    "eval",
    "features",
    "explain",
    "steer",
    "probe",
    "export",
    "verify",
    "connect",
)


def leaves(node: DictConfig, prefix: str = "") -> list[str]:
    out = []
    for key in node:
        child = node._get_node(key)
        name = f"{prefix}{key}"
        if isinstance(child, DictConfig) and not child._is_none() and not child._is_missing():
            out += leaves(child, name + ".")
        else:
            out.append(name)
    return out


def counts(command: str) -> tuple[int, int]:
    keys = leaves(compose(command))
    shown = [k for k in keys if ".advanced." not in f".{k}"]
    return len(shown), len(keys)


def main() -> None:
    total_shown = total_all = 0
    print(f"{'command':<13} {'shown':>6} {'all':>6}")
    for command in COMMANDS:
        shown, every = counts(command)
        total_shown, total_all = total_shown + shown, total_all + every
        print(f"sae-{command:<9} {shown:>6} {every:>6}")
    print(f"{'total':<13} {total_shown:>6} {total_all:>6}")


if __name__ == "__main__":
    main()
