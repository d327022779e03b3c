"""Hook points on tiny random Llama / GPT-2 / GPT-NeoX: capture, early exit, splice, errors.

.venv/bin/python -m pytest tests/unit/model/test_activations.py -q
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sae_pipeline.errors import UserError
from sae_pipeline.model.activations import capture, splice
from sae_pipeline.model.hook_points import (
    POINTS,
    HookPoint,
    find_blocks,
    hook_name,
    num_layers,
    resolve_hook,
)
from tests.support.tiny_models import N_LAYERS, TINY_MODELS, random_tokens

FAMILIES = list(TINY_MODELS)
LAYERS = (0, 1, N_LAYERS - 1)

# Written out by hand per family, independently of hook_points.py's discovery.
STRUCTURE = {
    # family: (base attr, blocks attr on base, attention child, mlp child, final norm on base)
    "llama": ("model", "layers", "self_attn", "mlp", "norm"),
    "gpt2": ("transformer", "h", "attn", "mlp", "ln_f"),
    "gpt_neox": ("gpt_neox", "layers", "attention", "mlp", "final_layer_norm"),
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _blocks(model, family):
    base_attr, blocks_attr, *_ = STRUCTURE[family]
    return getattr(getattr(model, base_attr), blocks_attr)


def _no_hooks_left(model: nn.Module) -> bool:
    """No hook of ours is left (transformers 5 installs its own permanent output-recording hooks)."""
    for m in model.modules():
        for fn in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]:
            if not getattr(fn, "__module__", "").startswith("transformers"):
                return False
    return True


def _reference(model, family, input_ids, attention_mask=None):
    """What transformers gives, plus plain forward hooks on every block / attention / MLP output."""
    _, _, attn_name, mlp_name, _ = STRUCTURE[family]
    ref: dict[str, torch.Tensor] = {}
    handles = []

    def grab(key):
        def hook(_mod, _args, out):
            ref[key] = _first(out).detach().clone()

        return hook

    for i, block in enumerate(_blocks(model, family)):
        handles.append(block.register_forward_hook(grab(f"post{i}")))
        handles.append(getattr(block, attn_name).register_forward_hook(grab(f"attn{i}")))
        handles.append(getattr(block, mlp_name).register_forward_hook(grab(f"mlp{i}")))
    try:
        with torch.no_grad():
            # use_cache=False as in capture: filling a KV cache changes the matmul layout (~1e-9 differences).
            out = model(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
            )
    finally:
        for h in handles:
            h.remove()
    return out, ref


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread; with other jobs on the cores, threads spin (4x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, TINY_MODELS[request.param]()


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(batch=3, seq=12)


# ----------------------------------------------------------------------------- names and structure


def test_structure(family_model):
    family, model = family_model
    base_attr, blocks_attr, attn, mlp, _ = STRUCTURE[family]
    path, blocks = find_blocks(model)
    assert path == f"{base_attr}.{blocks_attr}"
    assert blocks is _blocks(model, family)
    assert num_layers(model) == N_LAYERS
    for layer in range(N_LAYERS):  # every named point of every block resolves to its block
        assert {resolve_hook(model, hook_name(p, layer)).layer for p in POINTS} == {layer}

    assert resolve_hook(model, "blocks.2.hook_resid_pre") == HookPoint(
        "blocks.2.hook_resid_pre", f"{path}.2", "input", 2
    )
    assert resolve_hook(model, "blocks.2.hook_resid_post") == HookPoint(
        "blocks.2.hook_resid_post", f"{path}.2", "output", 2
    )
    assert resolve_hook(model, "blocks.1.hook_attn_out").module_path == f"{path}.1.{attn}"
    assert resolve_hook(model, "blocks.1.hook_mlp_out").module_path == f"{path}.1.{mlp}"
    hp = resolve_hook(model, f"module:{path}.3.{mlp}:input")
    assert (hp.name, hp.module_path, hp.io, hp.layer) == (
        f"module:{path}.3.{mlp}:input",
        f"{path}.3.{mlp}",
        "input",
        3,
    )
    assert resolve_hook(model, f"module:{base_attr}:output").layer is None


# ----------------------------------------------------------------------------- capture values


@pytest.mark.parametrize("early_exit", [True, False])
@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("point", POINTS)
def test_capture_matches_transformers(family_model, tokens, point, layer, early_exit):
    family, model = family_model
    out, ref = _reference(model, family, tokens)
    hp = resolve_hook(model, hook_name(point, layer))
    acts = capture(model, tokens, None, [hp], early_exit=early_exit)[hp.name]
    assert acts.shape == (*tokens.shape, model.config.hidden_size)
    if point == "resid_pre":
        expected = out.hidden_states[layer]
    elif point == "resid_post":
        # hidden_states[-1] has the final norm applied: compare the last layer with the block hook.
        expected = out.hidden_states[layer + 1] if layer < N_LAYERS - 1 else ref[f"post{layer}"]
    else:
        expected = ref[f"{'attn' if point == 'attn_out' else 'mlp'}{layer}"]
    torch.testing.assert_close(acts, expected, rtol=0, atol=0)
    assert not acts.requires_grad and not acts.is_inference()
    assert _no_hooks_left(model)


def test_last_resid_post_before_final_norm(family_model, tokens):
    family, model = family_model
    out, ref = _reference(model, family, tokens)
    name = hook_name("resid_post", N_LAYERS - 1)
    acts = capture(model, tokens, None, [resolve_hook(model, name)])[name]
    torch.testing.assert_close(acts, ref[f"post{N_LAYERS - 1}"], rtol=0, atol=0)
    assert not torch.allclose(acts, out.hidden_states[-1])  # that one is normed


def test_several_points_one_pass(family_model, tokens):
    family, model = family_model
    out, ref = _reference(model, family, tokens)
    names = [
        hook_name("resid_pre", 0),
        hook_name("attn_out", 1),
        hook_name("mlp_out", 2),
        hook_name("resid_post", 1),
    ]
    calls = []
    h = _blocks(model, family)[0].register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        acts = capture(model, tokens, None, [resolve_hook(model, n) for n in names])
    finally:
        h.remove()
    assert len(calls) == 1  # a single forward
    assert list(acts) == names
    torch.testing.assert_close(acts[names[0]], out.hidden_states[0], rtol=0, atol=0)
    torch.testing.assert_close(acts[names[1]], ref["attn1"], rtol=0, atol=0)
    torch.testing.assert_close(acts[names[2]], ref["mlp2"], rtol=0, atol=0)
    torch.testing.assert_close(acts[names[3]], out.hidden_states[2], rtol=0, atol=0)
    # Names (strings) are accepted too, and duplicates are captured once.
    again = capture(model, tokens, None, [names[1], names[1]])
    assert list(again) == [names[1]]
    torch.testing.assert_close(again[names[1]], ref["attn1"], rtol=0, atol=0)


def test_module_paths_input_and_output(family_model, tokens):
    family, model = family_model
    out, ref = _reference(model, family, tokens)
    path, _ = find_blocks(model)
    _, _, _, mlp, norm = STRUCTURE[family]
    base = STRUCTURE[family][0]
    names = [
        f"module:{path}.1:input",
        f"module:{path}.1:output",
        f"module:{path}.2.{mlp}:output",
        f"module:{base}.{norm}:output",  # final norm: after every block
    ]
    acts = capture(model, tokens, None, [resolve_hook(model, n) for n in names])
    torch.testing.assert_close(acts[names[0]], out.hidden_states[1], rtol=0, atol=0)
    torch.testing.assert_close(acts[names[1]], out.hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(acts[names[2]], ref["mlp2"], rtol=0, atol=0)
    torch.testing.assert_close(acts[names[3]], out.hidden_states[-1], rtol=0, atol=0)

    # An MLP's input is the post-attention-norm residual: check it against a hand-made pre-hook.
    seen = {}
    mlp_mod = getattr(_blocks(model, family)[2], mlp)
    h = mlp_mod.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0].clone()))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        h.remove()
    name = f"module:{path}.2.{mlp}:input"
    torch.testing.assert_close(capture(model, tokens, None, [resolve_hook(model, name)])[name], seen["x"])

    # A module outside the base model (the LM head) is reachable too: the full model then runs.
    head = capture(model, tokens, None, [resolve_hook(model, "module:lm_head:output")])[
        "module:lm_head:output"
    ]
    torch.testing.assert_close(head, out.logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- early exit


def _count_calls(model, family):
    base_attr, _, _, _, norm = STRUCTURE[family]
    counts: dict[str, int] = {}
    handles = []

    def counter(key):
        def hook(*_):
            counts[key] = counts.get(key, 0) + 1

        return hook

    for i, block in enumerate(_blocks(model, family)):
        handles.append(block.register_forward_pre_hook(counter(f"block{i}")))  # block entered
        handles.append(block.register_forward_hook(counter(f"done{i}")))  # block completed
    handles.append(getattr(getattr(model, base_attr), norm).register_forward_pre_hook(counter("norm")))
    handles.append(model.lm_head.register_forward_pre_hook(counter("lm_head")))
    return counts, handles


@pytest.mark.parametrize("point", POINTS)
def test_early_exit_skips_later_layers(family_model, tokens, point):
    family, model = family_model
    layer = 1
    counts, handles = _count_calls(model, family)
    try:
        capture(model, tokens, None, [resolve_hook(model, hook_name(point, layer))], early_exit=True)
        ran = dict(counts)
        counts.clear()
        capture(model, tokens, None, [resolve_hook(model, hook_name(point, layer))], early_exit=False)
        full = dict(counts)
    finally:
        for h in handles:
            h.remove()
    assert ran.get("block0") == 1 and ran.get("done0") == 1
    # Block L is entered; it completes only for resid_post (resid_pre stops before it computes anything,
    # attn_out / mlp_out stop inside it).
    assert ran.get(f"block{layer}") == 1
    assert ran.get(f"done{layer}", 0) == (1 if point == "resid_post" else 0)
    for later in range(layer + 1, N_LAYERS):
        assert f"block{later}" not in ran, ran
    assert "norm" not in ran and "lm_head" not in ran
    # Without early exit every block and the final norm run, but never the LM head.
    assert all(full.get(f"block{i}") == 1 for i in range(N_LAYERS))
    assert full.get("norm") == 1 and "lm_head" not in full
    assert _no_hooks_left(model)


def test_model_still_works_after_early_exit(family_model, tokens):
    family, model = family_model
    before, _ = _reference(model, family, tokens)
    capture(model, tokens, None, [resolve_hook(model, hook_name("resid_pre", 0))])
    after, _ = _reference(model, family, tokens)
    assert len(after.hidden_states) == N_LAYERS + 1
    torch.testing.assert_close(after.logits, before.logits, rtol=0, atol=0)
    assert _no_hooks_left(model)


def test_hook_that_never_fires(family_model, tokens):
    family, model = family_model
    # A module the forward never calls.
    unused = nn.Linear(2, 2)
    model.add_module("unused_probe", unused)
    try:
        with pytest.raises(UserError, match="never fired"):
            capture(model, tokens, None, [resolve_hook(model, "module:unused_probe:output")])
    finally:
        del model.unused_probe
    assert _no_hooks_left(model)


# ----------------------------------------------------------------------------- padding


def test_padding_right_and_left(family_model):
    family, model = family_model
    ids = random_tokens(batch=2, seq=10, seed=1)
    short = 6
    names = [hook_name("resid_post", 1), hook_name("attn_out", 2), hook_name("resid_pre", 3)]
    hooks = [resolve_hook(model, n) for n in names]

    # Right padding: the valid positions equal those of the unpadded sequence alone.
    mask = torch.ones_like(ids)
    mask[1, short:] = 0
    padded = ids.clone()
    padded[1, short:] = 0
    acts = capture(model, padded, mask, hooks)
    alone = capture(model, ids[1:, :short], None, hooks)
    for n in names:
        assert torch.isfinite(acts[n]).all()
        torch.testing.assert_close(acts[n][1, :short], alone[n][0], rtol=1e-5, atol=1e-5)

    # Left padding: identical to what transformers computes for the same masked batch.
    lmask = torch.ones_like(ids)
    lmask[1, : ids.shape[1] - short] = 0
    out, ref = _reference(model, family, padded, lmask)
    acts = capture(model, padded, lmask, hooks)
    assert all(torch.isfinite(a).all() for a in acts.values())
    torch.testing.assert_close(acts[names[0]], out.hidden_states[2], rtol=0, atol=0)
    torch.testing.assert_close(acts[names[1]], ref["attn2"], rtol=0, atol=0)
    torch.testing.assert_close(acts[names[2]], out.hidden_states[3], rtol=0, atol=0)


# ----------------------------------------------------------------------------- splice


@pytest.mark.parametrize("point", POINTS)
def test_splice_identity_keeps_logits(family_model, tokens, point):
    _, model = family_model
    with torch.no_grad():
        clean = model(tokens).logits
        with splice(model, resolve_hook(model, hook_name(point, 1)), lambda x: x):
            spliced = model(tokens).logits
        # A fresh tensor equal to the activation works as well.
        with splice(model, hook_name(point, 2), lambda x: x.clone() * 1.0):
            spliced2 = model(tokens).logits
    torch.testing.assert_close(spliced, clean, rtol=0, atol=0)
    torch.testing.assert_close(spliced2, clean, rtol=0, atol=0)
    assert _no_hooks_left(model)


@pytest.mark.parametrize("layer", [0, 2])
def test_splice_zeros_at_resid_post(family_model, tokens, layer):
    family, model = family_model
    hp = resolve_hook(model, hook_name("resid_post", layer))
    other = random_tokens(batch=3, seq=12, seed=7)
    with torch.no_grad():
        clean = model(tokens).logits
        with splice(model, hp, torch.zeros_like):
            zeroed = model(tokens).logits
            zeroed_other = model(other).logits
            # Downstream sees the spliced (zero) activation, and so do transformers' own hidden states.
            nxt = capture(model, tokens, None, [resolve_hook(model, hook_name("resid_pre", layer + 1))])
            here = capture(model, tokens, None, [hp])
            hs = model(tokens, output_hidden_states=True).hidden_states
    assert not torch.allclose(zeroed, clean)
    assert torch.count_nonzero(next(iter(nxt.values()))) == 0
    assert torch.count_nonzero(here[hp.name]) == 0
    assert torch.count_nonzero(hs[layer + 1]) == 0
    # Everything after the splice depends only on zeros: the input tokens no longer matter, and
    # every position gets the same logits (identical values at every position, causal attention).
    torch.testing.assert_close(zeroed_other, zeroed, rtol=1e-5, atol=1e-6)
    flat = zeroed.reshape(-1, zeroed.shape[-1])
    torch.testing.assert_close(flat, flat[:1].expand_as(flat), rtol=1e-5, atol=1e-6)
    if family == "llama":  # no biases: zero stays zero through attention, MLP and RMSNorm.
        assert torch.count_nonzero(zeroed) == 0
    assert _no_hooks_left(model)


def test_splice_input_and_module_paths(family_model, tokens):
    family, model = family_model
    path, _ = find_blocks(model)
    mlp = STRUCTURE[family][3]
    with torch.no_grad():
        # Zeroing the input of block L+1 equals zeroing the output of block L.
        with splice(model, hook_name("resid_post", 1), torch.zeros_like):
            a = model(tokens).logits
        with splice(model, f"module:{path}.2:input", torch.zeros_like):
            b = model(tokens).logits
        torch.testing.assert_close(a, b, rtol=0, atol=0)

        # Doubling the MLP output of block 2 is what capture sees at mlp_out while the splice is active.
        name = hook_name("mlp_out", 2)
        clean = capture(model, tokens, None, [name])[name]
        with splice(model, f"module:{path}.2.{mlp}:output", lambda x: 2 * x) as hp:
            assert hp.io == "output"
            doubled = capture(model, tokens, None, [name])[name]
        torch.testing.assert_close(doubled, 2 * clean)

    assert _no_hooks_left(model)


def test_splice_removes_hook_on_exception(family_model, tokens):
    _, model = family_model
    with pytest.raises(RuntimeError, match="boom"):
        with splice(model, hook_name("resid_post", 0), torch.zeros_like):
            raise RuntimeError("boom")
    assert _no_hooks_left(model)
    with pytest.raises(UserError, match="expected shape"):
        with torch.no_grad(), splice(model, hook_name("resid_post", 0), lambda x: x[..., :3]):
            model(tokens)
    assert _no_hooks_left(model)


# ----------------------------------------------------------------------------- user errors


def test_errors_name_the_problem(family_model):
    family, model = family_model
    path, _ = find_blocks(model)
    with pytest.raises(UserError) as e:
        resolve_hook(model, "blocks.0.hook_resid_mid")
    assert "resid_mid" in str(e.value) and all(p in str(e.value) for p in POINTS)
    with pytest.raises(UserError) as e:
        resolve_hook(model, "layer3.resid")
    assert "layer3.resid" in str(e.value) and "0..3" in str(e.value) and "module:" in str(e.value)
    with pytest.raises(UserError) as e:
        resolve_hook(model, f"blocks.{N_LAYERS}.hook_resid_post")
    assert f"layer {N_LAYERS}" in str(e.value) and f"{N_LAYERS} layers" in str(e.value)
    with pytest.raises(UserError) as e:
        resolve_hook(model, "blocks.-1.hook_resid_post")
    assert "out of range" in str(e.value)
    with pytest.raises(UserError) as e:
        resolve_hook(model, f"module:{path}.1.mlpp:output")
    assert f"{path}.1.mlpp" in str(e.value) and f"{path}.1.mlp" in str(e.value)
    with pytest.raises(UserError) as e:
        resolve_hook(model, f"module:{path}.1:sideways")
    assert "sideways" in str(e.value) and "input" in str(e.value) and "output" in str(e.value)
    with pytest.raises(UserError, match="resid_mid"):
        hook_name("resid_mid", 0)
    with pytest.raises(UserError, match="at least one"):
        capture(model, random_tokens(), None, [])
    hooks = [resolve_hook(model, hook_name("resid_post", 0))]
    with pytest.raises(UserError, match=r"\[batch, seq\]"):
        capture(model, random_tokens()[0], None, hooks)
    with pytest.raises(UserError, match="attention_mask has shape"):
        capture(model, random_tokens(seq=8), torch.ones(2, 7, dtype=torch.long), hooks)


# ----------------------------------------------------------------------------- other architectures


def test_generic_fallback_and_no_blocks():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attention_thing = nn.Linear(8, 8)
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))  # bigger, but nested

        def forward(self, hidden_states):
            x = hidden_states
            return x + self.attention_thing(x) + sum(e(x) for e in self.experts)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 8)
            self.stack = nn.ModuleList(Block() for _ in range(3))

        def forward(self, input_ids, attention_mask=None):
            x = self.embed(input_ids)
            for b in self.stack:
                x = b(hidden_states=x)  # keyword-style input
            return x

    net = Net().eval()
    assert find_blocks(net)[0] == "stack" and num_layers(net) == 3
    # No recognisable MLP child: the other points resolve, and mlp_out asked for by name is a UserError.
    for point in ("resid_pre", "resid_post", "attn_out"):
        assert resolve_hook(net, f"blocks.0.hook_{point}").layer == 0
    with pytest.raises(UserError, match="no recognisable MLP"):
        resolve_hook(net, "blocks.1.hook_mlp_out")
    hp = resolve_hook(net, "blocks.1.hook_attn_out")
    assert hp.module_path == "stack.1.attention_thing"
    assert resolve_hook(net, "module:stack.2.experts.4:output").layer == 2
    ids = torch.randint(0, 10, (2, 5))
    acts = capture(net, ids, None, [resolve_hook(net, "blocks.2.hook_resid_post")])
    with torch.no_grad():
        torch.testing.assert_close(acts["blocks.2.hook_resid_post"], net(ids))
        x1 = capture(net, ids, None, ["blocks.1.hook_resid_pre"])["blocks.1.hook_resid_pre"]
        # Inputs passed as `hidden_states=` are read and replaced as well.
        with splice(net, "blocks.1.hook_resid_pre", lambda x: x + 1):
            shifted = capture(net, ids, None, ["module:stack.1.attention_thing:input"])
        torch.testing.assert_close(shifted["module:stack.1.attention_thing:input"], x1 + 1)

    with pytest.raises(UserError, match="cannot find the decoder blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(UserError, match="cannot find the decoder blocks"):
        resolve_hook(nn.Sequential(nn.Linear(2, 2)), "blocks.0.hook_resid_post")


def test_opt_layout():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=300,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        word_embed_proj_dim=32,
    )
    model = OPTForCausalLM(cfg).eval()
    assert find_blocks(model)[0] == "model.decoder.layers"
    ids = random_tokens(batch=2, seq=8, vocab_size=300)
    name = hook_name("resid_post", 0)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    torch.testing.assert_close(capture(model, ids, None, [name])[name], out.hidden_states[1], rtol=0, atol=0)
    assert resolve_hook(model, hook_name("attn_out", 1)).module_path == "model.decoder.layers.1.self_attn"
