"""Capturing activations at hook points (with early exit) and splicing functions into them.

hp = resolve_hook(model, "blocks.3.hook_resid_post")      # see hook_points.py for the names
acts = capture(model, input_ids_BT, attention_mask_BT, [hp])[hp.name]   # [B, T, D]
with splice(model, hp, lambda x_BTD: sae(x_BTD)):
    logits = model(input_ids_BT).logits
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sae_pipeline.errors import UserError
from sae_pipeline.model.hook_points import HookPoint, get_submodule, resolve_hook

# ----------------------------------------------------------------------------- reading / writing activations


def _read_input(hook: HookPoint, args: tuple, kwargs: dict) -> Tensor:
    if args:
        x = args[0]
    elif "hidden_states" in kwargs:
        x = kwargs["hidden_states"]
    else:
        raise UserError(
            f"hook {hook.name!r}: module {hook.module_path!r} was called with no positional argument and no "
            "`hidden_states` keyword, so it has no input activation to read."
        )
    if not isinstance(x, Tensor):
        raise UserError(
            f"hook {hook.name!r}: the input of {hook.module_path!r} is a {type(x).__name__}, not a tensor."
        )
    return x


def _write_input(args: tuple, kwargs: dict, new: Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": new}


def _read_output(hook: HookPoint, out) -> Tensor:
    x = out
    if isinstance(out, (tuple, list)):
        x = out[0] if len(out) else None
    elif isinstance(out, dict):  # ModelOutput (an OrderedDict) or a plain dict
        x = next(iter(out.values()), None)
    if not isinstance(x, Tensor):
        raise UserError(
            f"hook {hook.name!r}: the output of {hook.module_path!r} is a {type(out).__name__} whose first "
            "element is not a tensor."
        )
    return x


def _write_output(out, new: Tensor):
    if isinstance(out, Tensor):
        return new
    if isinstance(out, tuple):
        items = (new, *out[1:])
        if type(out) is tuple:
            return items
        return type(out)(*items) if hasattr(out, "_fields") else type(out)(items)  # namedtuple / subclass
    if isinstance(out, list):
        return [new, *out[1:]]
    # dict / ModelOutput: replace the first value in place (ModelOutput keeps key and attribute in sync)
    out[next(iter(out.keys()))] = new
    return out


def _resolve_all(model: nn.Module, hooks: list[HookPoint | str]) -> list[HookPoint]:
    resolved: dict[str, HookPoint] = {}
    for h in hooks:
        hp = resolve_hook(model, h) if isinstance(h, str) else h
        if not isinstance(hp, HookPoint):
            raise UserError(f"expected a HookPoint or hook name, got {type(h).__name__} {h!r}.")
        resolved.setdefault(hp.name, hp)
    return list(resolved.values())


def _module(model: nn.Module, hook: HookPoint) -> nn.Module:
    mod = get_submodule(model, hook.module_path)
    if mod is None:
        raise UserError(
            f"hook {hook.name!r} attaches to {hook.module_path!r}, which {type(model).__name__} lacks."
        )
    return mod


# ----------------------------------------------------------------------------- capture


class _StopForward(BaseException):
    """Raised from a hook once every requested activation is in hand; caught by `capture`.

    A BaseException so that no `except Exception` fallback inside a model's forward can swallow it.
    """


def _runner(model: nn.Module, modules: list[nn.Module]) -> nn.Module:
    """The base model (no LM head) if every hooked module lives inside it, else the model itself."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, nn.Module) or base is model:
        return model
    inside = {id(m) for m in base.modules()}
    return base if all(id(m) in inside for m in modules) else model


def capture(
    model: nn.Module,
    input_ids_BT: Tensor,
    attention_mask_BT: Tensor | None,
    hooks: list[HookPoint],
    early_exit: bool = True,
) -> dict[str, Tensor]:
    """Run the model on a batch and return {hook name: activation} (detached, [B, T, D] for the named points).

    The forward runs under `torch.inference_mode()` on the base model, so the LM head never runs. With
    `early_exit` it stops as soon as the last of the requested hooks has fired (so no later block, final
    norm or head runs); the values are identical to those of a full forward. Hooks may also be given
    as names (strings). Each hooked module must run exactly once per forward.
    """
    points = _resolve_all(model, hooks)
    if not points:
        raise UserError("capture needs at least one hook point; none were given.")
    if not isinstance(input_ids_BT, Tensor) or input_ids_BT.ndim != 2:
        got = tuple(input_ids_BT.shape) if isinstance(input_ids_BT, Tensor) else type(input_ids_BT).__name__
        raise UserError(f"capture needs input_ids of shape [batch, seq], got {got}.")
    if attention_mask_BT is not None and tuple(attention_mask_BT.shape) != tuple(input_ids_BT.shape):
        raise UserError(
            f"attention_mask has shape {tuple(attention_mask_BT.shape)} but input_ids has "
            f"{tuple(input_ids_BT.shape)}; they must match."
        )
    modules = [_module(model, hp) for hp in points]
    runner = _runner(model, modules)

    captured: dict[str, Tensor] = {}
    pending = {hp.name for hp in points}

    def store(hp: HookPoint, x: Tensor) -> None:
        if hp.name in captured:
            raise UserError(
                f"hook {hp.name!r} fired more than once in one forward ({hp.module_path!r} is called repeatedly), "
                "so its activation is ambiguous; hook a module that runs once."
            )
        with torch.inference_mode(False):
            captured[hp.name] = x.detach().clone()  # a normal tensor, usable outside inference mode
        pending.discard(hp.name)
        if early_exit and not pending:
            raise _StopForward

    def make_pre(hp: HookPoint):
        def pre_hook(_mod, args, kwargs):
            store(hp, _read_input(hp, args, kwargs))

        return pre_hook

    def make_post(hp: HookPoint):
        def post_hook(_mod, _args, out):
            store(hp, _read_output(hp, out))

        return post_hook

    handles = []
    try:
        for hp, mod in zip(points, modules, strict=True):
            if hp.io == "input":
                handles.append(mod.register_forward_pre_hook(make_pre(hp), with_kwargs=True))
            else:
                handles.append(mod.register_forward_hook(make_post(hp)))
        device = next(runner.parameters(), input_ids_BT).device  # the embedding's device
        kwargs = {"input_ids": input_ids_BT.to(device)}
        if attention_mask_BT is not None:
            kwargs["attention_mask"] = attention_mask_BT.to(device)
        if getattr(getattr(runner, "config", None), "use_cache", None) is not None:
            kwargs["use_cache"] = False
        with torch.inference_mode():
            try:
                runner(**kwargs)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()

    if pending:
        missing = ", ".join(sorted(pending))
        raise UserError(f"hook(s) {missing} never fired during the forward pass (is the module unused?).")
    return {hp.name: captured[hp.name] for hp in points}


# ----------------------------------------------------------------------------- splice


@contextmanager
def splice(model: nn.Module, hook: HookPoint | str, fn: Callable[[Tensor], Tensor]) -> Iterator[HookPoint]:
    """Within the block, every forward replaces the activation at `hook` by fn(activation).

    `fn` maps [B, T, D] -> [B, T, D]; its result is cast back to the activation's dtype and device. For
    io="input" the module's input is replaced (forward pre-hook), for "output" its output (tuple
    structure kept). The hook runs before any other hook on that module, so capture() and
    `output_hidden_states` see the spliced value. Removed on exit, also on exceptions. Yields the
    resolved HookPoint. Nested splices on one module apply innermost first.
    """
    hp = resolve_hook(model, hook) if isinstance(hook, str) else hook
    mod = _module(model, hp)

    def apply(x: Tensor) -> Tensor:
        y = fn(x)
        if not isinstance(y, Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise UserError(
                f"splice function at {hp.name!r} returned {got}, expected shape {tuple(x.shape)}."
            )
        return y.to(dtype=x.dtype, device=x.device)

    def pre_hook(_mod, args, kwargs):
        return _write_input(args, kwargs, apply(_read_input(hp, args, kwargs)))

    def post_hook(_mod, _args, out):
        return _write_output(out, apply(_read_output(hp, out)))

    # prepend: every other hook on the module (capture, transformers' output_hidden_states recorder)
    # sees the spliced value, whichever was registered first.
    if hp.io == "input":
        handle = mod.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
    else:
        handle = mod.register_forward_hook(post_hook, prepend=True)
    try:
        yield hp
    finally:
        handle.remove()
