"""Shared test fixtures: tiny saved models with a real tokenizer, tiny JSONL corpora, config composition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sae_pipeline.config import compose
from tests.tiny_models import TINY_MODELS

REPO = Path(__file__).resolve().parents[1]
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\n"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3: pad, bos, eos, unk (matching tiny_models' config)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, ids below 100."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(CHARS))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_model(folder: Path, family: str = "llama", **overrides) -> Path:
    """A tiny random causal LM and its tokenizer saved as a Hugging Face folder."""
    model = TINY_MODELS[family](**overrides)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def write_corpus(path: Path, n_docs: int = 12, words_per_doc: int = 400, seed: int = 0) -> Path:
    """JSON lines {title, text} of pseudo-random words (a deterministic function of the seed)."""
    import random

    rng = random.Random(seed)
    words = ["the", "king", "queen", "crown", "sword", "love", "night", "day", "speak", "hath", "thou", "art"]
    with open(path, "w") as f:
        for d in range(n_docs):
            text = " ".join(rng.choice(words) for _ in range(words_per_doc)) + "."
            f.write(json.dumps({"title": f"doc-{d:02d}", "text": text}) + "\n")
    return path


def tiny_overrides(tmp_path: Path, model_dir: Path, corpus: Path, n_tokens: int = 1500) -> list[str]:
    return [
        f"paths.root={tmp_path / 'runs'}",
        f"model.name={model_dir}",
        "model.id=tiny",
        "data.name=json",
        f"data.data_files={corpus}",
        "data.id=corpus",
        "data.eval_documents=2",
        "hook.layer=1",
        "harvest.context_size=32",
        "harvest.batch_size=4",
        f"harvest.n_tokens={n_tokens}",
        "harvest.shard_size=400",
    ]


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    return compose(config_name, overrides)


def run_cli(module: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a stage's real command line (`python -m sae_pipeline.<module> ...`) in a subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", f"sae_pipeline.{module}", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
