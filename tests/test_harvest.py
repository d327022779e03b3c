"""sae-harvest on tiny random models: stored rows equal transformers' own activations, resume, bad input."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

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


def test_several_hooks_in_one_pass_and_half_precision(tmp_path, assets):
    folders = _harvest(tmp_path, assets, "llama", ["hook=all", "harvest.dtype=bfloat16"])
    assert [f.name for f in folders] == [
        "blocks.1.hook_resid_pre",
        "blocks.1.hook_resid_post",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_attn_out",
    ]
    for f in folders:
        assert _rows(f)["activations"].dtype == torch.bfloat16
    # resid_post = resid_pre + attn_out + mlp_out for a sequential Llama block
    pre, post, mlp, attn = (_rows(f)["activations"].float() for f in folders)
    torch.testing.assert_close(post, pre + attn + mlp, atol=0.1, rtol=0.02)


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
    with pytest.raises(UserError, match="could not load data.name|is empty"):
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
