"""Any `torch.nn.Module` as the model: built by a factory function, optionally loaded from safetensors.

    sae-harvest model=torch_module model.factory=examples.digits.mlp:build model.weights=mlp.safetensors \
        data=tensors data.path=train.safetensors 'hook.names=[module:2:output]'

`model.factory` is `package.module:function` (imported with the working directory and `model.factory_path`
first on sys.path) or `path/to/file.py:function` (a file, relative to the working directory). The function
is called with no argument and returns the module. `model.weights` is a safetensors state dict loaded
strictly: a missing or unexpected key, or a shape that differs, is one sentence naming it.

Hooks are the `module:<dotted.path>:<input|output>` names of hook_points.py (`module:2:output` is the output
of element 2 of an nn.Sequential). An activation of shape [B, ...] is one row of prod(...) values per example.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sae_pipeline.config_access import cfg_value
from sae_pipeline.errors import UserError
from sae_pipeline.model.hook_points import HookPoint

KIND = "torch_module"


def is_torch_module(model_cfg: Any) -> bool:
    """Whether a model config (schema, DictConfig or a manifest's dict) names a plain torch module."""
    return cfg_value(model_cfg, "kind") == KIND


def _import_factory(spec: str, extra_path: str | None):
    where, sep, fn_name = str(spec).rpartition(":")
    if not sep or not where or not fn_name:
        raise UserError(
            f"model.factory={spec!r} must look like package.module:function or path/to/file.py:function"
        )
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UserError(f"model.factory={spec!r}: the file {path} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"_sae_factory_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    else:
        for p in (extra_path, os.getcwd()):
            if p and str(Path(p).resolve()) not in sys.path:
                sys.path.insert(0, str(Path(p).resolve()))
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise UserError(
                f"model.factory={spec!r}: cannot import {where!r} ({err}); run from the folder that holds it "
                "or set model.factory_path"
            ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise UserError(f"model.factory={spec!r}: {where!r} has no function {fn_name!r}")
    return fn


def check_state_dict(model: nn.Module, state: dict[str, Tensor], file: str) -> None:
    """Strict load check: the same keys and shapes as the module's own state dict, else one sentence."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = ([f"missing keys {', '.join(missing)}"] if missing else []) + (
            [f"unexpected keys {', '.join(unexpected)}"] if unexpected else []
        )
        raise UserError(f"model.weights={file} does not fit the factory's module: {'; '.join(parts)}")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(
                f"model.weights={file}: {k} has shape {list(state[k].shape)} but the module's is {list(v.shape)}"
            )


def load_torch_module(model_cfg: Any, device: torch.device) -> nn.Module:
    """The module the config's factory builds, with its weights, in eval mode on `device` (float32)."""
    spec = cfg_value(model_cfg, "factory")
    if not spec:
        raise UserError("model=torch_module needs model.factory=package.module:function")
    fn = _import_factory(spec, cfg_value(model_cfg, "factory_path"))
    model = fn()
    if not isinstance(model, nn.Module):
        raise UserError(f"model.factory={spec!r} returned a {type(model).__name__}, not a torch.nn.Module")
    weights = cfg_value(model_cfg, "weights")
    if weights:
        from safetensors.torch import load_file

        if not Path(weights).is_file():
            raise UserError(f"model.weights={weights}: no such file")
        state = load_file(str(weights))
        check_state_dict(model, state, str(weights))
        model.load_state_dict(state, strict=True)
    return model.to(device).float().eval().requires_grad_(False)


class _Stop(BaseException):
    """Raised from a hook once every requested activation is in hand (early exit)."""


def capture_rows(
    model: nn.Module, x_B: Tensor, points: list[HookPoint], early_exit: bool = True
) -> dict[str, Tensor]:
    """{hook name: [B, D] activation} for one batch of inputs (trailing dimensions flattened)."""
    out: dict[str, Tensor] = {}

    def make(hp: HookPoint):
        def store(x: Tensor) -> None:
            if hp.name in out:
                raise UserError(
                    f"hook {hp.name!r} fired more than once in one forward; hook a module that runs once"
                )
            out[hp.name] = x.detach().reshape(x.shape[0], -1).clone()
            if early_exit and len(out) == len(points):
                raise _Stop

        def pre(_m, args):
            store(args[0])

        def post(_m, _a, y):
            store(y[0] if isinstance(y, (tuple, list)) else y)

        mod = model.get_submodule(hp.module_path)
        return mod.register_forward_pre_hook(pre) if hp.io == "input" else mod.register_forward_hook(post)

    handles = [make(hp) for hp in points]
    try:
        with torch.no_grad():
            model(x_B)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [hp.name for hp in points if hp.name not in out]
    if missing:
        raise UserError(
            f"hook(s) {', '.join(missing)} never fired during the forward pass (is the module unused?)"
        )
    return out
