"""Typed schemas of every config group, one module per stage plus the groups they share.

    common.py    paths, model, data, hook, logger (shared by several stages)
    harvest.py  train.py  eval.py  features.py  explain.py  steer.py  probe.py  export.py  verify.py  connect.py
    source.py    the `source` group: what an SAE not trained here reads (sae-eval, sae-features, sae-steer)
    advanced.py  the `advanced` node of train, harvest, eval and features: knobs --help folds away
    ids.py       the default model.id / data.id, a filesystem-safe name derived from `name`
    help.py      `sae-<stage> --help`: the stage's docstring, its own groups, the composed config

`register_configs()` puts every schema in Hydra's ConfigStore; each stage calls it before
`@hydra.main` composes, and `compose()` calls it for notebooks and tests. A typo in a key or a
wrong type fails at start-up naming the key.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from sae_pipeline.errors import UserError
from sae_pipeline.sae import CONFIG_CLASSES

from . import connect, eval, explain, export, features, harvest, probe, steer, train, verify
from .advanced import moved_sentence
from .common import to_container
from .help import register_resolver as register_help
from .ids import register_resolver

__all__ = ["compose", "register_configs", "to_container"]

register_help()  # ${sae_help:<stage>}, the --help text (conf/hydra/help/stage.yaml)
register_resolver()  # ${sae_id:...}, the default model.id / data.id, resolves wherever a schema is used


def register_configs() -> None:
    """Register every stage's schema; the group YAML files pick theirs up through `defaults`."""
    register_resolver()
    register_help()
    cs = ConfigStore.instance()
    cs.store(name="harvest_schema", node=harvest.HarvestJob)
    cs.store(name="train_schema", node=train.TrainJob)
    cs.store(name="eval_schema", node=eval.EvalJob)
    cs.store(name="features_schema", node=features.FeaturesJob)
    cs.store(name="explain_schema", node=explain.ExplainJob)
    cs.store(name="steer_schema", node=steer.SteerJob)
    cs.store(name="export_schema", node=export.ExportJob)
    cs.store(name="verify_schema", node=verify.VerifyJob)
    cs.store(name="probe_schema", node=probe.ProbeJob)
    cs.store(name="connect_schema", node=connect.ConnectJob)
    for arch, cls in CONFIG_CLASSES.items():
        cs.store(group="sae", name=f"base_{arch}", node=cls)


def compose(config_name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose a stage's config without the command line (notebooks, tests, benchmarks).

    Example: `harvest.run(compose("harvest", ["hook.layer=3"]))`.
    `hydra:` interpolations are not available this way; every stage has a plain default for them.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    register_configs()
    overrides = list(overrides or [])
    for override in overrides:  # an old spelling of a key now under `advanced`: the CLI's sentence
        if sentence := moved_sentence(*override.split("=", 1)) if "=" in override else None:
            raise UserError(sentence)
    with initialize_config_module("sae_pipeline.conf", version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)
