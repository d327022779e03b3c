"""A model.gguf_file is de-quantized once and cached (model/gguf_cache.py), like the embedded default.

A tiny Llama GGUF (Q8_0 matrices, byte-level BPE vocabulary) is written with the `gguf` package's own
GGUFWriter; the ground truth is transformers loading that GGUF file directly.

.venv/bin/python -m pytest tests/unit/model/test_gguf_cache.py -q
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.model.loading import load_model
from tests import helpers

D, FF, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
TOKENS = ["<unk>", "<s>", "</s>", "ab"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["Ġ", "."]
CONVERTING = "converting tiny.gguf to a float32 Hugging Face folder (once)"


def write_tiny_gguf(path: Path, seed: int) -> None:
    """A 2-layer Llama in GGUF: Q8_0 weight matrices, float32 norms, a 32-token byte-level BPE vocabulary
    (lower-case letters, space, full stop: enough for tests.helpers.write_corpus)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(D // HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_scores([0.0] * len(TOKENS))
    w.add_token_merges(["a b"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def matrix(name: str, rows: int, cols: int) -> None:
        x = (0.2 * rng.standard_normal((rows, cols))).astype(np.float32)
        q = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    def norm(name: str) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(D)).astype(np.float32))

    matrix("token_embd.weight", len(TOKENS), D)
    norm("output_norm.weight")
    matrix("output.weight", len(TOKENS), D)
    kv = KV_HEADS * D // HEADS
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        matrix(f"blk.{i}.attn_q.weight", D, D)
        matrix(f"blk.{i}.attn_k.weight", kv, D)
        matrix(f"blk.{i}.attn_v.weight", kv, D)
        matrix(f"blk.{i}.attn_output.weight", D, D)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", FF, D)
        matrix(f"blk.{i}.ffn_up.weight", FF, D)
        matrix(f"blk.{i}.ffn_down.weight", D, FF)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


TEXT = "abcdxyzab"


def _direct_logits(folder: Path) -> tuple[list[int], torch.Tensor]:
    """Ground truth: transformers de-quantizing the GGUF file itself."""
    tok = AutoTokenizer.from_pretrained(folder, gguf_file="tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ids[0].tolist(), model(ids).logits


def _our_logits(folder: Path) -> tuple[list[int], torch.Tensor]:
    model, tok = load_model({"name": str(folder), "gguf_file": "tiny.gguf"}, "cpu")
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return ids[0].tolist(), model(ids).logits


def _converted(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "gguf").iterdir() if not p.name.startswith("."))


@pytest.fixture()
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SAE_PIPELINE_CACHE", str(root))
    return root


def test_second_load_uses_the_cache_and_equals_the_gguf_model(tmp_path, cache, capfd):
    folder = tmp_path / "model"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny.gguf", seed=0)
    ids, want = _direct_logits(folder)
    capfd.readouterr()

    got_ids, first = _our_logits(folder)
    assert CONVERTING in capfd.readouterr().err
    [converted] = _converted(cache)
    assert converted.name.startswith("tiny-")
    stamp = (converted / "config.json").stat().st_mtime_ns

    again_ids, second = _our_logits(folder)
    assert CONVERTING not in capfd.readouterr().err  # no second conversion
    assert _converted(cache) == [converted]
    assert (converted / "config.json").stat().st_mtime_ns == stamp  # not rewritten

    assert got_ids == again_ids == ids and len(ids) > 1
    torch.testing.assert_close(first, want, rtol=0, atol=1e-6)  # the cached folder is the GGUF model
    assert torch.equal(first, second)


def test_a_rewritten_gguf_file_is_converted_again(tmp_path, cache, capfd):
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "tiny.gguf"
    write_tiny_gguf(path, seed=0)
    _, old = _our_logits(folder)

    write_tiny_gguf(path, seed=1)  # same size (same shapes), new weights
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    _, want = _direct_logits(folder)
    capfd.readouterr()
    _, new = _our_logits(folder)
    assert CONVERTING in capfd.readouterr().err
    assert len(_converted(cache)) == 2
    torch.testing.assert_close(new, want, rtol=0, atol=1e-6)
    assert not torch.allclose(new, old)


def test_sae_harvest_converts_a_gguf_model_once_across_runs(tmp_path, cache):
    """The real command, twice: the first run converts, the second reuses the folder; same activations."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny.gguf", seed=0)
    corpus = helpers.write_corpus(tmp_path / "corpus.jsonl", n_docs=6, words_per_doc=80)
    shards, logs = [], []
    for run in ("first", "second"):
        args = helpers.tiny_overrides(tmp_path / run, folder, corpus, n_tokens=200) + [
            "model.gguf_file=tiny.gguf"
        ]
        res = helpers.run_cli("harvest", args, cwd=tmp_path, env={"SAE_PIPELINE_CACHE": str(cache)})
        assert res.returncode == 0, res.stderr
        logs.append(res.stderr)
        [shard] = (tmp_path / run).rglob(layout.shard_name(0))
        shards.append(load_file(str(shard))["activations"])
    assert CONVERTING in logs[0] and CONVERTING not in logs[1]
    assert len(_converted(cache)) == 1
    assert shards[0].shape[0] > 0 and torch.equal(shards[0], shards[1])


def test_a_gguf_file_in_a_hub_repo_is_converted_once(tmp_path, cache):
    """model.name=<org/repo> from the hub cache (offline): the snapshot's link names the folder, not the blob."""
    folder = tmp_path / "model"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny.gguf", seed=0)
    corpus = helpers.write_corpus(tmp_path / "corpus.jsonl", n_docs=6, words_per_doc=80)
    snapshot = helpers.fake_hub_repo(tmp_path / "hub", "tiny-org/tiny-gguf", folder)
    env = {"SAE_PIPELINE_CACHE": str(cache), "HF_HUB_CACHE": str(tmp_path / "hub")}
    logs = []
    for run in ("first", "second"):
        args = helpers.tiny_overrides(tmp_path / run, folder, corpus, n_tokens=200)
        args += ["model.name=tiny-org/tiny-gguf", "model.gguf_file=tiny.gguf"]
        res = helpers.run_cli("harvest", args, cwd=tmp_path, env=env)
        assert res.returncode == 0, res.stderr
        logs.append(res.stderr)
    assert CONVERTING in logs[0] and CONVERTING not in logs[1]
    [converted] = _converted(cache)
    assert converted.name.startswith("tiny-")
    assert str(snapshot / "tiny.gguf") in (converted / layout.CONVERTED_SOURCE).read_text()


def test_a_missing_gguf_file_names_the_key_and_folder(tmp_path, cache):
    with pytest.raises(UserError, match=r"model.gguf_file='nope.gguf' is not a file in the folder"):
        load_model({"name": str(tmp_path), "gguf_file": "nope.gguf"}, "cpu")
