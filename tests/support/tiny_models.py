"""Tiny random causal LMs built from configs, for tests (nothing is downloaded).

    from tests.support.tiny_models import tiny_llama, tiny_gpt2, tiny_gpt_neox, TINY_MODELS
    model = tiny_llama()            # LlamaForCausalLM, 4 layers, hidden 32, vocab 512, eval, float32

Every builder takes keyword overrides for its config (e.g. `tiny_llama(num_hidden_layers=2)`) and a
`seed`; the same seed always gives the same weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

VOCAB_SIZE = 512
N_LAYERS = 4
D_MODEL = 32
MAX_POSITIONS = 128
SEED = 0


def _finish(model: PreTrainedModel) -> PreTrainedModel:
    model = model.to(torch.float32)
    model.eval()
    return model


def _build(model_cls, config) -> PreTrainedModel:
    return _finish(model_cls(config))


def tiny_llama(seed: int = SEED, **overrides) -> LlamaForCausalLM:
    """A 4-layer Llama (RMSNorm, rotary, gated SiLU MLP, grouped-query attention)."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=D_MODEL,
        intermediate_size=4 * D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return _build(LlamaForCausalLM, LlamaConfig(**kwargs))


def tiny_gpt2(seed: int = SEED, **overrides) -> GPT2LMHeadModel:
    """A 4-layer GPT-2 (LayerNorm, learned positions, Conv1D projections)."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        n_embd=D_MODEL,
        n_layer=N_LAYERS,
        n_head=4,
        n_positions=MAX_POSITIONS,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return _build(GPT2LMHeadModel, GPT2Config(**kwargs))


def tiny_gpt_neox(seed: int = SEED, **overrides) -> GPTNeoXForCausalLM:
    """A 4-layer GPT-NeoX (Pythia-style parallel residual, partial rotary)."""
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=D_MODEL,
        intermediate_size=4 * D_MODEL,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        max_position_embeddings=MAX_POSITIONS,
        rotary_pct=0.25,
        use_parallel_residual=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return _build(GPTNeoXForCausalLM, GPTNeoXConfig(**kwargs))


# name -> builder, for pytest parametrisation: `@pytest.mark.parametrize("family", TINY_MODELS)`.
TINY_MODELS: dict[str, Callable[..., PreTrainedModel]] = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "gpt_neox": tiny_gpt_neox,
}


def random_tokens(
    batch: int = 2, seq: int = 16, vocab_size: int = VOCAB_SIZE, seed: int = SEED
) -> torch.Tensor:
    """Int64 token ids [batch, seq] drawn from a fixed generator (avoiding ids 0-2: pad/bos/eos)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (batch, seq), generator=gen)
