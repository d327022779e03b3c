"""What a run trains: one SAE, or a sweep group (`train.group`) of SAEs that share every batch."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from sae_pipeline.errors import UserError, check_known_keys
from sae_pipeline.sae import CONFIG_CLASSES, config_class


def sae_config(node, store, where: str):
    """The SAE dataclass for a config node or dict; `d_in`, when given, must match the store."""
    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    cls = config_class(data.get("arch"), f"{where}.arch")
    d_in = data.pop("d_in", None)
    if d_in is not None and int(d_in) != store.d_in:
        raise UserError(
            f"{where}.d_in={d_in} does not match the store {store.folder}, whose activations have d_in={store.d_in}"
        )
    check_known_keys(data, cls, where)
    cfg = cls(**data)
    cfg.validate()
    return cfg


def member_specs(cfg: DictConfig, store) -> list[tuple[str, object]]:
    """[(name, sae config)]: one unnamed member for a plain run, one per train.group entry."""
    if not cfg.train.group:
        return [("", sae_config(cfg.sae, store, "sae"))]
    base = OmegaConf.to_container(cfg.sae, resolve=True)
    specs = []
    for i, entry in enumerate(cfg.train.group):
        if not isinstance(entry, (dict, DictConfig)):
            raise UserError(
                f"train.group[{i}] must be a dict of sae overrides like {{l1_coefficient: 1e-4}}, got {entry!r}"
            )
        over = dict(OmegaConf.to_container(entry, resolve=True) if isinstance(entry, DictConfig) else entry)
        name = str(over.pop("name", None) or ",".join(f"{k}={v}" for k, v in over.items()) or f"member{i}")
        merged = dict(base)
        if "arch" in over and over["arch"] != base["arch"]:  # another arch: keep only the shared keys
            known = set(CONFIG_CLASSES.get(over["arch"], CONFIG_CLASSES[base["arch"]]).__dataclass_fields__)
            merged = {k: v for k, v in base.items() if k in known}
        merged.update(over)
        specs.append((name.replace("/", "_"), sae_config(merged, store, f"train.group[{i}]")))
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"train.group has members with the same name {names}; give each a distinct `name`")
    return specs
