"""Shared test fixtures: tiny saved models with a real tokenizer, tiny JSONL corpora, config composition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from sae_pipeline import layout
from sae_pipeline.data.store import read_manifest
from sae_pipeline.sae import CONFIG_CLASSES, build_sae, save_sae
from sae_pipeline.schema import compose
from sae_pipeline.schema.help import stage_module
from tests.support.synthetic import SyntheticFeatures, write_store
from tests.support.tiny_models import TINY_MODELS

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


def fake_hub_repo(hub_cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """Lay the files of `folder` out as the Hugging Face hub cache holds a downloaded repo (blobs named by
    hash, snapshots/<commit>/<file> links to them, refs/main), so HF_HUB_CACHE=hub_cache with
    HF_HUB_OFFLINE=1 loads `repo_id` without a network. Returns the snapshot folder."""
    import hashlib

    repo = Path(hub_cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in sorted(Path(folder).iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


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
        [sys.executable, "-m", stage_module(module), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def make_store(
    folder: Path,
    n_contexts: int = 48,
    context_size: int = 16,
    d_in: int = 8,
    contexts_per_shard: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    model: dict | None = None,
    tag_rows: bool = True,
) -> Path:
    """A tiny finished store of random activations (no model needed).

    With `tag_rows`, the first element of each row is its global id (context * context_size +
    position) so tests can tell rows apart; the rest is Gaussian. Without it, rows are sparse
    sums of random directions (sae_pipeline.synthetic), something an SAE can learn."""
    features = SyntheticFeatures(n_features=4 * d_in, d=d_in, mean_active=3.0, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    shards = []
    for first in range(0, n_contexts, contexts_per_shard):
        n = min(contexts_per_shard, n_contexts - first) * context_size
        if tag_rows:
            acts = torch.randn(n, d_in, generator=gen) * 3.0 + 0.5
            acts[:, 0] = torch.arange(first * context_size, first * context_size + n).float()
        else:
            acts = features.sample(n) * 7.0 + 0.3
        shards.append(acts.to(dtype))
    return write_store(folder, shards, context_size, model=model, seed=seed)


D_SAE = 48
DEAD = (5, 17)


def make_sae_run(tmp: Path, family: str = "llama", seed: int = 0) -> Path:
    """A tiny model, a harvested store, and a random ReLU SAE with varied densities and two dead latents."""
    from sae_pipeline import harvest

    model_dir = save_tiny_model(tmp / "model", family)
    with torch.no_grad():  # a non-trivial final-norm scale, so the logit lens must apply it
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_dir)
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if name.endswith(("model.norm.weight", "ln_f.weight", "final_layer_norm.weight")):
                p.copy_(torch.rand(p.shape, generator=g) * 2 + 0.2)
        model.save_pretrained(model_dir)
    corpus = write_corpus(tmp / "corpus.jsonl", n_docs=8, words_per_doc=200)
    cfg = compose_config("harvest", tiny_overrides(tmp, model_dir, corpus))
    (store,) = harvest.run(cfg)
    manifest = read_manifest(store)
    x_ND = load_file(str(store / layout.shard_name(0)))["activations"].float()
    sae = build_sae(CONFIG_CLASSES["relu"](d_sae=D_SAE, normalize_input=False), d_in=x_ND.shape[1], seed=seed)
    with torch.no_grad():
        pre_NF = x_ND @ sae.W_enc_DF
        frac_F = torch.linspace(0.5, 0.995, D_SAE)  # latent f fires on roughly 1 - frac of tokens
        b_F = -torch.stack([pre_NF[:, f].quantile(frac_F[f]) for f in range(D_SAE)])
        b_F[list(DEAD)] = -1e4
        sae.b_enc_F.copy_(b_F)
    run_dir = tmp / "run"
    extra = {"store": str(store), "hook": manifest["hook"]["name"], "model": manifest["model"]}
    save_sae(sae, run_dir / layout.FINAL_SAE, extra=extra)
    (run_dir / layout.CONFIG).write_text(json.dumps({"store": str(store)}))
    return run_dir


def features_cfg(run_dir: Path, *extra: str):
    return compose_config(
        "features",
        [
            f"sae_path={run_dir}",
            f"paths.root={run_dir.parent / 'runs'}",
            "features.n_tokens=600",
            "features.top_k=5",
            "features.batch_size=3",
            "features.device=cpu",
            *extra,
        ],
    )


def identity_sae(d: int):
    """A ReLU SAE that is exact on non-negative rows (E = D = I, no biases): its latents are the rows."""
    sae = build_sae(CONFIG_CLASSES["relu"](d_sae=d, b_dec_init="zeros"), d, seed=0)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.eye(d))
        sae.W_dec_FD.copy_(torch.eye(d))
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
    return sae.eval().requires_grad_(False)


def cfg_for(store: Path, run_dir: Path, *overrides: str) -> DictConfig:
    """sae-train's config for a tiny run on `store` into `run_dir` (no W&B)."""
    return compose(
        "train", [f"store={store}", f"train.run_dir={run_dir}", "train=tiny", "logger=none", *overrides]
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / layout.FINAL_SAE / layout.SAE_WEIGHTS))


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def planted(n=2000, d_in=24, d_out=12, seed=0):
    """Sparse non-negative F1 (each input feature on 15% of rows) and F2 = ReLU(F1 @ W + b) for a W with 1-3
    non-zero inputs per output, every weight |w| in [0.5, 1.5] and at most one negative weight per output."""
    g = torch.Generator().manual_seed(seed)
    f1_NI = torch.rand(n, d_in, generator=g) * (torch.rand(n, d_in, generator=g) < 0.15)
    W_IO = torch.zeros(d_in, d_out)
    for o in range(d_out):
        k = 1 + o % 3
        rows = torch.randperm(d_in, generator=g)[:k]
        w = 0.5 + torch.rand(k, generator=g)
        if k == 3:
            w[2] = -w[2]
        W_IO[rows, o] = w
    b_O = torch.full((d_out,), 0.05)
    return f1_NI, (f1_NI @ W_IO + b_O).relu(), W_IO
