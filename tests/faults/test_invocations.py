"""Malformed invocations of the real command lines (`python -m sae_pipeline.<stage> ...`, run in this
process to keep the table fast): each ends with exit code 2 and one line naming the key or file, and
none with a traceback."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from sae_pipeline import layout
from tests.faults import harness
from tests.faults.tally import record
from tests.helpers import make_store, save_tiny_model, tiny_overrides, write_corpus

# (stage, arguments, what the one line must name); {store}, {bad_manifest}, ... are filled in below
TABLE = [
    ("train", ["train.lr=-1"], "train.lr"),
    ("train", ["train.lr=nan"], "train.lr"),
    ("train", ["train.lr=abc"], "train.lr"),
    ("train", ["train.lrr=1"], "lrr"),
    ("train", ["train.log_every=0"], "train.log_every"),
    ("train", ["train.total_tokens=0"], "train.total_tokens"),
    ("train", ["train.val_tokens=100000"], "train.val_tokens"),
    ("train", ["train.batch_size=0"], "train.batch_size"),
    ("train", ["train.advanced.chunk_rows=-5"], "train.advanced.chunk_rows"),
    ("train", ["train.advanced.adam_beta1=1.5"], "train.advanced.adam_beta1"),
    ("train", ["train.advanced.adam_eps=0"], "train.advanced.adam_eps"),
    ("train", ["train.lr_decay_fraction=2"], "train.lr_decay_fraction"),
    ("train", ["train.max_grad_norm=-1"], "train.max_grad_norm"),
    ("train", ["train.keep_checkpoints=0"], "train.keep_checkpoints"),
    ("train", ["train.val_every=-1"], "train.val_every"),
    ("train", ["train.advanced.stop_after_steps=0"], "train.advanced.stop_after_steps"),
    ("train", ["train.seed=x"], "train.seed"),
    ("train", ["train.resume=maybe"], "train.resume"),
    ("train", ["sae=nope"], "sae/nope"),
    ("train", ["sae.l1_coefficient=much"], "sae.l1_coefficient"),
    ("train", ["train.group=[{"], "train.group"),
    ("train", ["train.group=[{nope:1}]"], "nope"),
    ("train", ["logger=wandb", "logger.mode=bogus"], "logger.mode"),
    ("train", ["train.device=tpu"], "device='tpu'"),
    ("train", ["train.advanced.buffer_rows=0"], "train.advanced.buffer_rows"),
    ("train", ["sae=topk", "sae.k=0"], "sae.k"),
    # keys that moved under their group's `advanced` node: the old spelling names the new key and value
    ("train", ["train.stop_after_steps=20"], "pass train.advanced.stop_after_steps=20"),
    ("train", ["+train.buffer_rows=512"], "pass train.advanced.buffer_rows=512"),
    ("harvest", ["harvest.stop_after_shards=1"], "pass harvest.advanced.stop_after_shards=1"),
    ("eval", ["sae_path={existing_run}", "eval.reuse_prefix=false"], "pass eval.advanced.reuse_prefix=false"),
    ("features", ["sae_path={existing_run}", "features.reservoir=4"], "pass features.advanced.reservoir=4"),
    ("train", ["sae.d_sae=-1"], "sae.d_sae"),
    ("train", ["paths.root=${{oc.env:SAE_NO_SUCH_VARIABLE}}"], "SAE_NO_SUCH_VARIABLE"),
    ("train", ["NO_STORE"], "store is not set; pass store="),  # the case: no store= at all
    ("train", ["store=null"], "store"),
    ("train", ["~store"], "store"),
    ("train", ["store=/nowhere/at/all"], "/nowhere/at/all"),
    ("train", ["store={no_shards}"], "manifest.json"),
    ("train", ["store={not_json}"], "manifest.json"),
    ("train", ["store={zero_sha}"], "manifest.json"),
    ("train", ["store={damaged}"], "shard-00001.safetensors"),
    ("train", ["store={truncated}"], "shard-00002.safetensors"),
    ("train", ["store={missing_shard}"], "shard-00000.safetensors"),
    ("train", ["train.run_dir={existing_run}"], "{existing_run}"),
    ("train", ["train.run_dir={existing_run}", "train.resume=true", "train.lr=0.5"], "train.lr"),
    ("harvest", ["harvest.dtype=int8"], "harvest.dtype"),
    ("harvest", ["harvest.batch_size=0"], "harvest.batch_size"),
    ("harvest", ["harvest.n_tokens=-1"], "harvest.n_tokens"),
    ("harvest", ["harvest.contex_size=3"], "contex_size"),
    ("harvest", ["harvest.context_size=4096"], "harvest.context_size"),
    ("harvest", ["hook.points=[resid_mid]"], "resid_mid"),
    ("harvest", ["data.text_column=body"], "data.text_column"),
    ("harvest", ["model.name=/nowhere/model"], "model.name"),
    ("eval", [], "sae_path"),
    ("eval", ["sae_path=/nowhere/run"], "/nowhere/run"),
    ("features", [], "sae_path"),
    ("steer", [], "sae_path"),
    ("explain", [], "sae_path"),
    ("explain", ["sae_path={existing_run}"], "run sae-features"),
    ("explain", ["sae_path={existing_run}", "explain.latents=most"], "explain.latents"),
    ("explain", ["sae_path={existing_run}", "explain.n_score=0"], "explain.n_score"),
    ("explain", ["sae_path={existing_run}", "explain.timeout_s=abc"], "explain.timeout_s"),
    ("verify", [], "path"),
    ("verify", ["path=/nowhere/store"], "/nowhere/store"),
    ("verify", ["path={damaged}"], "{damaged}"),
]


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("invocations")
    clean = make_store(root / "clean", n_contexts=32, d_in=8, contexts_per_shard=8, tag_rows=False)
    out = {"root": str(root), "store": str(clean)}

    def variant(name: str, damage) -> None:
        folder = Path(shutil.copytree(clean, root / name))
        damage(folder)
        out[name] = str(folder)

    def manifest_edit(edit):
        def damage(folder: Path) -> None:
            path = folder / layout.MANIFEST
            manifest = json.loads(path.read_text())
            edit(manifest)
            path.write_text(json.dumps(manifest))

        return damage

    variant("no_shards", manifest_edit(lambda m: (m.pop("shards"), m.pop("manifest_sha256", None))))
    variant("zero_sha", manifest_edit(lambda m: m["shards"][1].update(sha256="0" * 64)))
    variant("not_json", lambda f: (f / layout.MANIFEST).write_text('{"format_version": 1,'))
    variant("damaged", lambda f: harness.flip_bytes(f / layout.shard_name(1), random.Random(0), lo=200))
    variant("truncated", lambda f: harness.truncate(f / layout.shard_name(2), random.Random(1)))
    variant("missing_shard", lambda f: (f / layout.shard_name(0)).unlink())
    run = root / "run"
    code, err = harness.invoke(
        "train", [f"store={clean}", "train=tiny", "logger=none", f"paths.root={root}", f"train.run_dir={run}",
                  "train.total_tokens=640", "train.val_tokens=16"],
    )  # fmt: skip
    assert code == 0, err
    out["existing_run"] = str(run)
    out["model"] = str(save_tiny_model(root / "model"))
    out["corpus"] = str(write_corpus(root / "corpus.jsonl", n_docs=6, words_per_doc=100))
    return out


def _args(stage: str, args: list[str], places: dict) -> list[str]:
    root = Path(places["root"])
    if stage == "harvest":
        base = tiny_overrides(root, Path(places["model"]), Path(places["corpus"]), n_tokens=200)
    elif stage == "train":
        base = [f"store={places['store']}", "train=tiny", "logger=none", f"paths.root={root}"]
        if "NO_STORE" in args:
            base, args = base[1:], [a for a in args if a != "NO_STORE"]
    else:
        base = {"eval": [f"paths.root={root}", "logger=none"], "verify": []}.get(
            stage, [f"paths.root={root}"]
        )
    return base + [_fill(a, places) for a in args]


def _fill(text: str, places: dict) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text.replace("{{", "{").replace("}}", "}")


@pytest.mark.parametrize(("stage", "args", "names"), TABLE, ids=[" ".join([s, *a]) for s, a, _ in TABLE])
def test_malformed_invocation_is_one_line_and_exit_code_2(places, stage, args, names):
    code, err = harness.invoke(stage, _args(stage, args, places))
    record("invocations")
    record("tracebacks", int("Traceback" in err))
    # progress bars (lines redrawn with \r, e.g. datasets' "Generating train split") are not messages
    lines = [ln for ln in err.split("\n") if ln.strip() and "\r" not in ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err)
    assert _fill(names, places) in lines[0], lines[0]
    record("invocations_one_line")


def test_the_table_is_large_enough():
    assert len(TABLE) >= 40
