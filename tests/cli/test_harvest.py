"""sae-harvest on tiny random models: stored rows equal transformers' own activations, resume, bad input."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae_pipeline import harvest, layout
from sae_pipeline.data import store
from sae_pipeline.errors import UserError
from tests.helpers import compose_config, run_cli, save_tiny_model, tiny_overrides, write_corpus


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {
        "llama": save_tiny_model(root / "llama", "llama"),
        "gpt2": save_tiny_model(root / "gpt2", "gpt2"),
        "gpt_neox": save_tiny_model(root / "neox", "gpt_neox"),
        "corpus": write_corpus(root / "corpus.jsonl"),
    }


def _harvest(tmp_path: Path, assets, family: str = "llama", extra: list[str] = ()) -> list[Path]:
    cfg = compose_config("harvest", tiny_overrides(tmp_path, assets[family], assets["corpus"]) + list(extra))
    return harvest.run(cfg)


def _rows(folder: Path) -> dict[str, torch.Tensor]:
    manifest = store.read_manifest(folder)
    parts = [load_file(str(folder / s["file"])) for s in manifest["shards"]]
    return {k: torch.cat([p[k] for p in parts]) for k in store.SHARD_KEYS}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_rows_equal_transformers_hidden_states(tmp_path, assets, family):
    (folder,) = _harvest(tmp_path, assets, family, ["hook.points=[resid_post]"])
    manifest = store.read_manifest(folder)
    rows = _rows(folder)
    model = AutoModelForCausalLM.from_pretrained(assets[family]).eval()
    # Rebuild each context from the stored token ids and positions (BOS at position 0 was not stored).
    n_ctx = int(rows["context_ids"].max()) + 1
    ids = torch.full((n_ctx, manifest["context_size"]), -1, dtype=torch.long)
    ids[:, 0] = manifest["bos"]["token_id"]
    ids[rows["context_ids"].long(), rows["positions"].long()] = rows["token_ids"].long()
    assert (ids >= 0).all(), "every non-BOS position of every context is stored exactly once"
    assert int((rows["positions"] == 0).sum()) == 0
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[2]  # output of block 1
    expected = hidden[rows["context_ids"].long(), rows["positions"].long()]
    torch.testing.assert_close(rows["activations"], expected, rtol=1e-5, atol=1e-5)


def test_manifest_checksums_and_shuffled_rows(tmp_path, assets):
    (folder,) = _harvest(tmp_path, assets)
    manifest = store.read_manifest(folder)
    assert manifest["complete"] and manifest["d_in"] == 32 and manifest["dtype"] == "float32"
    assert manifest["hook"]["name"] == "blocks.1.hook_resid_post"
    assert manifest["n_tokens"] >= 1500 and manifest["n_tokens"] % 31 == 0
    assert len(manifest["dataset"]["heldout"]["eval_titles"]) == 2
    assert manifest["contexts_per_shard"] % 4 == 0  # whole forward batches per shard
    total = 0
    for shard in manifest["shards"]:
        file = folder / shard["file"]
        assert store.sha256_file(file) == shard["sha256"]
        t = load_file(str(file))
        assert t["activations"].shape == (shard["n_rows"], 32) and t["token_ids"].dtype == torch.int32
        if shard["n_contexts"] > 1:  # rows are shuffled: the first rows do not all come from one context
            assert len(set(t["context_ids"][:8].tolist())) > 1
        total += shard["n_rows"]
    assert total == manifest["n_tokens"]
    norms = _rows(folder)["activations"].norm(dim=-1)
    assert manifest["norm_stats"]["mean"] == pytest.approx(float(norms.mean()), rel=1e-4)
    assert manifest["norm_stats"]["max"] == pytest.approx(float(norms.max()), rel=1e-5)
    assert not list(folder.glob("*.tmp"))


def _contexts(folder: Path, rows: dict) -> torch.Tensor:
    """Each stored context rebuilt from its rows' token ids and positions (BOS at position 0)."""
    manifest = store.read_manifest(folder)
    n_ctx = int(rows["context_ids"].max()) + 1
    ids = torch.full((n_ctx, manifest["context_size"]), manifest["bos"]["token_id"], dtype=torch.long)
    ids[rows["context_ids"].long(), rows["positions"].long()] = rows["token_ids"].long()
    return ids


def test_each_hook_of_a_multi_hook_harvest_lands_in_its_own_folder(tmp_path, assets):
    """Every folder of `hook=all` holds exactly its own point's vectors: the ground truth comes from
    torch forward hooks placed by hand on the Llama block's modules, not from the project's hook code,
    so a swapped MLP/attention folder or resid_pre written as resid_post fails."""
    folders = _harvest(tmp_path, assets, "llama", ["hook=all"])
    assert [f.name for f in folders] == [
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_post",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_attn_out",
    ]
    model = AutoModelForCausalLM.from_pretrained(assets["llama"]).eval()
    block = model.model.layers[1]
    seen: dict[str, torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("resid_pre", (a or (kw["hidden_states"],))[0]), with_kwargs=True),
        block.register_forward_hook(lambda m, a, out: seen.__setitem__("resid_post", out[0] if isinstance(out, tuple) else out)),
        block.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp_out", out)),
        block.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn_out", out[0])),
    ]  # fmt: skip
    rows = {f.name.split("hook_")[1]: _rows(f) for f in folders}
    with torch.no_grad():
        model(_contexts(folders[0], rows["resid_pre"]))
    for h in handles:
        h.remove()
    for point, r in rows.items():
        want = seen[point][r["context_ids"].long(), r["positions"].long()]
        scale = float(want.abs().max())
        torch.testing.assert_close(r["activations"], want, rtol=0, atol=1e-6 * scale, msg=point)
    # and the folders differ from each other by far more than that tolerance
    assert float((rows["mlp_out"]["activations"] - rows["attn_out"]["activations"]).abs().max()) > 0.1 * scale


def test_half_precision_store_keeps_values_to_bf16_precision(tmp_path, assets):
    (full,) = _harvest(tmp_path / "f32", assets)
    (half,) = _harvest(tmp_path / "bf16", assets, extra=["harvest.dtype=bfloat16"])
    a, b = _rows(full), _rows(half)
    assert b["activations"].dtype == torch.bfloat16 and torch.equal(a["context_ids"], b["context_ids"])
    # bfloat16 keeps 8 significant bits: relative rounding error at most 2^-8 per element
    x, y = a["activations"], b["activations"].float()
    assert bool(((x - y).abs() <= x.abs() * 2**-8 + 1e-30).all())


def test_resume_after_kill_equals_uninterrupted(tmp_path, assets, monkeypatch):
    (clean,) = _harvest(tmp_path / "a", assets)
    real_write = store.StoreWriter.write_shard

    def dying_write(self, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt  # killed while writing shard 2
        return real_write(self, index, *args, **kwargs)

    monkeypatch.setattr(store.StoreWriter, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        _harvest(tmp_path / "b", assets)
    monkeypatch.setattr(store.StoreWriter, "write_shard", real_write)
    killed = layout.store_dir(
        tmp_path / "b" / "runs" / "stores" / "tiny" / "corpus", "blocks.1.hook_resid_post"
    )
    assert len(store.read_manifest(killed)["shards"]) == 2 and not store.read_manifest(killed)["complete"]
    (resumed,) = _harvest(tmp_path / "b", assets)
    a, b = store.read_manifest(clean), store.read_manifest(resumed)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    assert b["complete"]


def test_existing_store_with_other_settings_is_refused(tmp_path, assets):
    (folder,) = _harvest(tmp_path, assets)
    before = (folder / layout.MANIFEST).read_text()
    with pytest.raises(UserError, match="already exists with different settings.*harvest.overwrite=true"):
        _harvest(tmp_path, assets, extra=["harvest.seed=1"])
    assert (folder / layout.MANIFEST).read_text() == before
    assert _harvest(tmp_path, assets) == [folder]  # same settings: complete, nothing to do
    (replaced,) = _harvest(tmp_path, assets, extra=["harvest.seed=1", "harvest.overwrite=true"])
    assert store.read_manifest(replaced)["seed"] == 1


def test_no_space_left_keeps_complete_shards(tmp_path, assets, monkeypatch):
    from sae_pipeline import files

    real_save = files.save_file
    calls = []

    def full_disk(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(files, "save_file", full_disk)
    with pytest.raises(
        UserError,
        match="no space left on the device while writing .*shard-00002.*keeps its 2 complete shards",
    ):
        _harvest(tmp_path, assets)
    folder = layout.store_dir(tmp_path / "runs" / "stores" / "tiny" / "corpus", "blocks.1.hook_resid_post")
    manifest = store.read_manifest(folder)
    assert len(manifest["shards"]) == 2
    for s in manifest["shards"]:
        assert files.sha256_file(folder / s["file"]) == s["sha256"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["hook.points=[resid_mid]"], "unknown hook point 'resid_mid'"),
        (["hook.layer=7"], "layer"),
        (["hook.points=[]", "hook.names=[module:model.nope:output]"], "model.nope"),
        (["data.text_column=body"], "data.text_column='body' is not a column.*'text'"),
        (
            ["harvest.context_size=4096"],
            "harvest.context_size=4096 is longer than the model's maximum of 128",
        ),
        (["harvest.dtype=int8"], "harvest.dtype='int8' is not a store dtype"),
        (["data.eval_documents=12"], "data.eval_documents=12 holds out every one"),
        (["model.gguf_file=missing.gguf"], "model.gguf_file='missing.gguf' is not a file"),
    ],
)
def test_bad_input_is_one_clear_sentence(tmp_path, assets, extra, message):
    with pytest.raises(UserError, match=message):
        _harvest(tmp_path, assets, extra=extra)


def test_missing_model_folder_and_empty_dataset(tmp_path, assets):
    with pytest.raises(UserError, match="model.name=.*no such folder"):
        _harvest(tmp_path, {**assets, "llama": tmp_path / "nowhere"})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match=r"could not load data\.(name|data_files)|is empty"):
        _harvest(tmp_path, {**assets, "corpus": empty})


def test_cli_harvests_and_reports_bad_input(tmp_path, assets):
    args = tiny_overrides(tmp_path, assets["llama"], assets["corpus"])
    ok = run_cli("harvest", args, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    folder = layout.store_dir(tmp_path / "runs" / "stores" / "tiny" / "corpus", "blocks.1.hook_resid_post")
    assert json.loads((folder / layout.MANIFEST).read_text())["complete"]
    bad = run_cli("harvest", args + ["hook.points=[resid_mid]"], cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown hook point 'resid_mid'")
    assert "Traceback" not in bad.stderr
    typo = run_cli("harvest", args + ["harvest.contex_size=3"], cwd=tmp_path)
    assert typo.returncode != 0 and "contex_size" in typo.stderr


def test_held_out_documents_never_reach_the_store(tmp_path, assets):
    """Ground truth by construction: document d is written only with its own letter, so any token of a
    held-out document's letter in the store means held-out text was harvested for training."""
    letters = "abcdefghij"
    corpus = tmp_path / "letters.jsonl"
    with open(corpus, "w") as f:
        for ch in letters:
            f.write(json.dumps({"title": f"doc-{ch}", "text": " ".join([ch * 3] * 150)}) + "\n")
    cfg = compose_config("harvest", tiny_overrides(tmp_path, assets["llama"], corpus, n_tokens=1200))
    (folder,) = harvest.run(cfg)
    heldout = store.read_manifest(folder)["dataset"]["heldout"]["eval_titles"]
    assert len(heldout) == 2
    tokenizer = AutoTokenizer.from_pretrained(assets["llama"])
    stored = set(tokenizer.convert_ids_to_tokens(_rows(folder)["token_ids"].unique().tolist()))
    held_letters = {t.removeprefix("doc-") for t in heldout}
    assert stored & set(letters), "the store holds the training documents' letters"
    assert not stored & held_letters, f"held-out documents {sorted(held_letters)} leaked into the store"
