"""attn_out / mlp_out are what a block adds to the residual stream, for every family hook_points.py names.

For a pre-norm decoder block (and for parallel-residual ones: GPT-J, GPT-NeoX, Falcon)
    resid_post = resid_pre + attn_out + mlp_out
holds exactly when attn_out and mlp_out are the vectors added to the residual stream (TransformerLens /
SAELens meaning). Sandwich-norm blocks (Gemma 2/3, OLMo 2/3, EXAONE 4) add post_norm(attn(...)), so
hooking the attention module itself breaks the identity. Tiny random models from config classes;
norm weights are randomised so that a missing (or extra) norm cannot pass by accident.

.venv/bin/python -m pytest tests/unit/model/test_hook_points.py -q
"""

from __future__ import annotations

import pytest
import torch
import transformers

from sae_pipeline.errors import UserError
from sae_pipeline.model.activations import capture
from sae_pipeline.model.hook_points import hook_name, resolve_hook

VOCAB = 128
LAYER = 1  # of 2: a block with a block before it
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

# family: (config class name, model class name, config kwargs). Every family named in hook_points.py.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA_LIKE),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**LLAMA_LIKE, "num_local_experts": 4}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**LLAMA_LIKE, "head_dim": 8}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", LLAMA_LIKE),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", LLAMA_LIKE),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**LLAMA_LIKE, "head_dim": 8}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**LLAMA_LIKE, "head_dim": 8}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**LLAMA_LIKE, "head_dim": 8}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", LLAMA_LIKE),
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", LLAMA_LIKE),
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", LLAMA_LIKE),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, rotary_dim=4),
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
        ),
    ),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {**LLAMA_LIKE, "rotary_pct": 0.25}),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)),
    "falcon": ("FalconConfig", "FalconForCausalLM", {**LLAMA_LIKE, "num_kv_heads": 1}),
    "falcon_new_arch": (
        "FalconConfig",
        "FalconForCausalLM",
        {**LLAMA_LIKE, "new_decoder_architecture": True, "num_kv_heads": 2},
    ),
    "xglm": (
        "XGLMConfig",
        "XGLMForCausalLM",
        dict(vocab_size=VOCAB, d_model=32, ffn_dim=64, num_layers=2, attention_heads=4),
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
        ),
    ),
}
NO_MLP_OUT = {"opt"}  # OPT flattens its MLP activations to [B*T, D]: mlp_out is refused with a UserError
SANDWICH = {"gemma2", "gemma3_text", "olmo2", "olmo3", "exaone4"}


def _tiny(family: str):
    config_name, model_name, kwargs = FAMILIES[family]
    if not hasattr(transformers, config_name):
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    config = getattr(transformers, config_name)(**kwargs, **IDS, attn_implementation="eager")
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).float().eval()
    with torch.no_grad():  # norms away from their init (ones, or zeros for Gemma's 1 + w)
        for name, p in model.named_parameters():
            if "norm" in name or ".ln" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model


def _ids():
    return torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - NO_MLP_OUT))
def test_attn_out_plus_mlp_out_is_the_block_update(family):
    model = _tiny(family)
    names = [hook_name(p, LAYER) for p in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    acts = capture(model, _ids(), None, names, early_exit=False)  # one forward pass
    pre, attn, mlp, post = (acts[n] for n in names)
    assert pre.shape == attn.shape == mlp.shape == post.shape == (2, 8, 32)
    assert attn.abs().max() > 1e-3 and mlp.abs().max() > 1e-3  # both parts contribute
    torch.testing.assert_close(attn + mlp, post - pre, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", sorted(SANDWICH))
def test_sandwich_blocks_hook_the_post_norms(family):
    """The module the attention module feeds is the post-attention norm, not the residual add."""
    model = _tiny(family)
    attn = resolve_hook(model, hook_name("attn_out", LAYER))
    mlp = resolve_hook(model, hook_name("mlp_out", LAYER))
    assert attn.module_path.endswith(f".{LAYER}.post_attention_layernorm")
    assert mlp.module_path.endswith(f".{LAYER}.post_feedforward_layernorm")


def test_opt_refuses_mlp_out_and_names_the_block():
    model = _tiny("opt")
    with pytest.raises(UserError, match=r"hook_mlp_out.*no recognisable MLP"):
        resolve_hook(model, hook_name("mlp_out", LAYER))
    names = [hook_name(p, LAYER) for p in ("resid_pre", "attn_out")]
    acts = capture(model, _ids(), None, names)
    assert acts[names[1]].shape == (2, 8, 32)
