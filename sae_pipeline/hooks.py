"""Named hook points on Hugging Face causal LMs: resolve, capture (with early exit) and splice.

    hp = resolve_hook(model, "blocks.3.hook_resid_post")      # or "module:model.layers.3.mlp:output"
    acts = capture(model, input_ids_BT, attention_mask_BT, [hp])[hp.name]   # [B, T, D]
    with splice(model, hp, lambda x_BTD: sae(x_BTD)):
        logits = model(input_ids_BT).logits

Hook names:
  blocks.{L}.hook_resid_pre    input hidden states of decoder block L
  blocks.{L}.hook_resid_post   output hidden states of decoder block L (before any final norm)
  blocks.{L}.hook_attn_out     output of block L's attention module (element 0 of its tuple)
  blocks.{L}.hook_mlp_out      output of block L's MLP module
  module:{dotted.path}:{input|output}   any module of `model.named_modules()`

"input" is the first positional argument of the module's forward (or its `hidden_states`
keyword); "output" is the returned tensor, or element 0 of a returned tuple / ModelOutput.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sae_pipeline.errors import UserError

POINTS = ("resid_pre", "resid_post", "mlp_out", "attn_out")
IO_KINDS = ("input", "output")

# Known decoder-layer lists, relative to the model given (a *ForCausalLM wrapper or a bare base model).
_KNOWN_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3, OLMo, SmolLM, Mixtral...
    "transformer.h",  # GPT-2, GPT-J, GPT-Neo, Bloom, Falcon
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT, XGLM
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-like)
    "transformer.layers",
    "layers",  # bare LlamaModel / GPTNeoXModel
    "h",  # bare GPT2Model
    "decoder.layers",  # bare OPTModel
)
# Submodule names of a decoder block, tried in order; a class-name match is the fallback.
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "block_sparse_moe")

_NAMED_RE = re.compile(r"^blocks\.(-?\d+)\.hook_(\w+)$")
_LAYER_IN_PATH_RE = re.compile(r"^(\d+)(?:\.|$)")


@dataclass(frozen=True)
class HookPoint:
    """Where an activation is read or replaced.

    name:        canonical name, "blocks.{L}.hook_{point}" or "module:{dotted.path}:{input|output}".
    module_path: dotted path (as in `model.named_modules()`) of the module the hook attaches to.
    io:          "input" (first positional arg / `hidden_states` kwarg) or "output" (tensor or element 0).
    layer:       index of the decoder block the point belongs to, or None if it lies outside the blocks.
    """

    name: str
    module_path: str
    io: str
    layer: int | None


def hook_name(point: str, layer: int) -> str:
    """Canonical name of a named hook point, e.g. hook_name("resid_post", 3) -> "blocks.3.hook_resid_post"."""
    if point not in POINTS:
        raise UserError(f"unknown hook point {point!r}; valid points are {', '.join(POINTS)}.")
    return f"blocks.{int(layer)}.hook_{point}"


# ----------------------------------------------------------------------------- model structure


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _is_block_list(mod: nn.Module | None) -> bool:
    return isinstance(mod, nn.ModuleList) and len(mod) > 0


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Dotted path and ModuleList of the model's decoder blocks.

    Known families are looked up by path; otherwise the largest ModuleList whose children all share
    one class (and which is not itself nested inside such a list, e.g. MoE experts) is taken.
    """
    for path in _KNOWN_BLOCK_PATHS:
        mod = _get_submodule(model, path)
        if _is_block_list(mod):  # mixed layer classes allowed here (hybrid attention / SSM stacks)
            return path, mod  # type: ignore[return-value]

    candidates: list[tuple[str, nn.ModuleList]] = []
    for path, mod in model.named_modules():
        if not _is_block_list(mod) or len({type(child) for child in mod}) != 1:
            continue
        if any(path.startswith(outer + ".") for outer, _ in candidates):
            continue  # nested inside a repeated block (named_modules is pre-order, so outer lists come first)
        candidates.append((path, mod))  # type: ignore[arg-type]
    if not candidates:
        raise UserError(
            f"cannot find the decoder blocks of {type(model).__name__}: it has no ModuleList of repeated "
            "layers, so named hook points are unavailable (use module:<dotted.path>:<input|output> hooks)."
        )
    # Largest list wins; on a tie the shallower (earlier in pre-order) one.
    best = max(candidates, key=lambda pm: len(pm[1]))
    return best


def num_layers(model: nn.Module) -> int:
    """Number of decoder blocks."""
    return len(find_blocks(model)[1])


def _find_child(block: nn.Module, names: tuple[str, ...], hints: tuple[str, ...]) -> str | None:
    """Name of the attention / MLP child of a block: known attribute names first, then a name/class hint."""
    children = dict(block.named_children())
    for name in names:
        if name in children:
            return name
    for name, child in children.items():
        text = f"{name} {type(child).__name__}".lower()
        if "norm" not in text and any(h in text for h in hints):
            return name
    return None


def _block_parts(block: nn.Module) -> dict[str, str | None]:
    return {
        "attn_out": _find_child(block, _ATTN_NAMES, ("attn", "attention")),
        "mlp_out": _find_child(block, _MLP_NAMES, ("mlp", "feedforward", "feed_forward", "ffn")),
    }


def _available_points(model: nn.Module) -> tuple[str, ...]:
    _, blocks = find_blocks(model)
    parts = _block_parts(blocks[0])
    return tuple(p for p in POINTS if p not in parts or parts[p] is not None)


def list_hooks(model: nn.Module) -> list[str]:
    """All named hook points of this model, layer by layer."""
    points = _available_points(model)
    return [hook_name(p, layer) for layer in range(num_layers(model)) for p in points]


def _layer_of(module_path: str, blocks_path: str) -> int | None:
    prefix = blocks_path + "." if blocks_path else ""
    if not module_path.startswith(prefix):
        return None
    m = _LAYER_IN_PATH_RE.match(module_path[len(prefix) :])
    return int(m.group(1)) if m else None


def _valid_names_hint(model: nn.Module) -> str:
    try:
        n = num_layers(model)
        points = _available_points(model)
        named = f"blocks.<L>.hook_<point> with L in 0..{n - 1} and point one of {', '.join(points)}"
    except UserError:
        named = "no named points (decoder blocks not found)"
    return f"valid hooks are {named}, or module:<dotted.path>:<input|output>"


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """Parse and validate a hook name against this model."""
    if not isinstance(name, str):
        raise UserError(f"hook name must be a string, got {type(name).__name__} {name!r}.")
    name = name.strip()

    if name.startswith("module:"):
        body = name[len("module:") :]
        path, sep, io = body.rpartition(":")
        if not sep or io not in IO_KINDS:
            raise UserError(
                f"hook {name!r} must look like module:<dotted.path>:<input|output> (the part after the last "
                f"':' is {io!r}, expected one of {', '.join(IO_KINDS)})."
            )
        modules = [p for p, _ in model.named_modules() if p]
        if path not in modules:
            close = difflib.get_close_matches(path, modules, n=5, cutoff=0.6)
            hint = (
                f"closest matches: {', '.join(close)}"
                if close
                else f"some valid paths: {', '.join(modules[:8])}"
            )
            raise UserError(
                f"hook {name!r} names module {path!r}, which {type(model).__name__} does not have; {hint}."
            )
        try:
            blocks_path, _ = find_blocks(model)
            layer = _layer_of(path, blocks_path)
        except UserError:
            layer = None
        return HookPoint(name=f"module:{path}:{io}", module_path=path, io=io, layer=layer)

    m = _NAMED_RE.match(name)
    if m is None:
        raise UserError(f"unknown hook name {name!r}; {_valid_names_hint(model)}.")
    layer, point = int(m.group(1)), m.group(2)
    if point not in POINTS:
        raise UserError(f"unknown hook point {point!r} in {name!r}; valid points are {', '.join(POINTS)}.")
    blocks_path, blocks = find_blocks(model)
    n = len(blocks)
    if not 0 <= layer < n:
        raise UserError(
            f"layer {layer} in hook {name!r} is out of range: {type(model).__name__} has {n} layers (0..{n - 1})."
        )
    block_path = f"{blocks_path}.{layer}" if blocks_path else str(layer)
    if point == "resid_pre":
        return HookPoint(name, block_path, "input", layer)
    if point == "resid_post":
        return HookPoint(name, block_path, "output", layer)
    child = _block_parts(blocks[layer])[point]
    if child is None:
        kids = ", ".join(n for n, _ in blocks[layer].named_children())
        raise UserError(
            f"hook {name!r} is unavailable: block {block_path} has no recognisable "
            f"{'attention' if point == 'attn_out' else 'MLP'} submodule (its children are {kids}); "
            f"use module:{block_path}.<child>:output instead."
        )
    return HookPoint(name, f"{block_path}.{child}", "output", layer)


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
    mod = _get_submodule(model, hook.module_path)
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
