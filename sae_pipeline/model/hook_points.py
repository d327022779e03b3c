"""Named hook points on Hugging Face causal LMs: finding the blocks and resolving a hook name to a module.

    hp = resolve_hook(model, "blocks.3.hook_resid_post")      # or "module:model.layers.3.mlp:output"
    acts = capture(model, input_ids_BT, attention_mask_BT, [hp])[hp.name]   # [B, T, D]
    with splice(model, hp, lambda x_BTD: sae(x_BTD)):
        logits = model(input_ids_BT).logits

Hook names:
  blocks.{L}.hook_resid_pre    input hidden states of decoder block L
  blocks.{L}.hook_resid_post   output hidden states of decoder block L (before any final norm)
  blocks.{L}.hook_attn_out     what block L's attention adds to the residual stream
  blocks.{L}.hook_mlp_out      what block L's MLP adds to the residual stream
  module:{dotted.path}:{input|output}   any module of `model.named_modules()` (module:{dotted.path}: its output)

attn_out / mlp_out mean the same vectors as in TransformerLens and SAELens, so for a pre-norm block
resid_post == resid_pre + attn_out + mlp_out. Usually they are the output of the attention module
(element 0 of its tuple) and of the MLP module. Sandwich-norm blocks (Gemma 2/3, OLMo 2/3, EXAONE 4:
a block with a `post_feedforward_layernorm`) add post_norm(attn(...)) and post_norm(mlp(...)), so
there they are the outputs of `post_attention_layernorm` and `post_feedforward_layernorm`. Bloom's
attention and MLP modules add the residual themselves, so there they are the outputs of their output
projections; XGLM blocks have no MLP module, so mlp_out is the output of `fc2` (OPT has no mlp_out).

"input" is the first positional argument of the module's forward (or its `hidden_states`
keyword); "output" is the returned tensor, or element 0 of a returned tuple / ModelOutput.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from torch import nn

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


def get_submodule(model: nn.Module, path: str) -> nn.Module | None:
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
        mod = get_submodule(model, path)
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


# Blocks whose attention / MLP module output is not what they add to the residual stream, by class
# name: Bloom's attention and MLP add the residual inside (dropout_add), after their output projection.
# OPT flattens its MLP activations to [B*T, D] (no [B, T, D] tensor to name), so it has no mlp_out.
_PARTS_BY_BLOCK_CLASS = {
    "BloomBlock": {"attn_out": "self_attention.dense", "mlp_out": "mlp.dense_4h_to_h"},
    "OPTDecoderLayer": {"attn_out": "self_attn", "mlp_out": None},
}


def _block_parts(block: nn.Module) -> dict[str, str | None]:
    """Relative module paths whose outputs are attn_out / mlp_out: what the block adds to the residual."""
    if type(block).__name__ in _PARTS_BY_BLOCK_CLASS:
        return dict(_PARTS_BY_BLOCK_CLASS[type(block).__name__])
    children = dict(block.named_children())
    if "post_feedforward_layernorm" in children and "post_attention_layernorm" in children:
        # Sandwich norms (Gemma 2/3, OLMo 2/3, EXAONE 4): x + post_attention_layernorm(attn(...)), then
        # x + post_feedforward_layernorm(mlp(...)). (In Llama-style blocks `post_attention_layernorm` is
        # the pre-MLP norm instead, and there is no `post_feedforward_layernorm`.)
        return {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"}
    mlp = _find_child(block, _MLP_NAMES, ("mlp", "feedforward", "feed_forward", "ffn"))
    if mlp is None and "fc2" in children:
        mlp = "fc2"  # OPT, XGLM: fc1 / activation / fc2 sit directly in the block
    return {"attn_out": _find_child(block, _ATTN_NAMES, ("attn", "attention")), "mlp_out": mlp}


def _available_points(model: nn.Module) -> tuple[str, ...]:
    _, blocks = find_blocks(model)
    parts = _block_parts(blocks[0])
    return tuple(p for p in POINTS if p not in parts or parts[p] is not None)


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
        if not sep:  # module:<dotted.path> alone is the module's output
            path, sep, io = body, ":", "output"
        if io not in IO_KINDS:
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


def requested_hook_names(hook_cfg) -> list[str]:
    """The full hook names a `hook` config asks for: its named points at `hook.layer`, then `hook.names`."""
    names = [hook_name(p, hook_cfg.layer) for p in hook_cfg.points] + list(hook_cfg.names)
    if not names:
        raise UserError("no hook point requested; set hook.points or hook.names")
    return list(dict.fromkeys(names))
