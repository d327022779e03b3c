"""Stores at s3:// URLs against a real S3-compatible server (moto's standalone server, started here).

Harvest uploads each shard whole and the manifest last; train (a shuffled pass over a fetched copy, and a
streamed pass), eval and verify read it with the same checksums; kills on both sides resume; a damaged
object, missing credentials and a missing bucket are one sentence each. Skipped without `.[s3]`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sae_pipeline import harvest, layout
from sae_pipeline.data.store import read_manifest
from sae_pipeline.schema.help import stage_module
from tests.helpers import (
    assert_same,
    cfg_for,
    compose_config,
    save_tiny_model,
    tiny_overrides,
    weights,
    write_corpus,
)

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

HOOK = "blocks.1.hook_resid_post"
HARVEST = ["harvest.n_tokens=1488", "harvest.shard_size=100"]  # 48 contexts, 4 per shard: 12 shards
TRAIN = ["train=tiny", "logger=none", "train.total_tokens=2048", "train.checkpoint_every_tokens=512"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_CONFIG_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true",
    }  # fmt: skip  # no metadata endpoint: without credentials, botocore would try 169.254.169.254 (network)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bucket")
    yield env, fs
    srv.stop()
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-assets")
    return save_tiny_model(root / "llama", "llama"), write_corpus(root / "corpus.jsonl")


def cli(module: str, args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", **env}
    return subprocess.run(
        [sys.executable, "-m", stage_module(module), *args], cwd=cwd, env=full, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow  # 10 processes against the server: ~2-5 min on 2 cores
def test_harvest_train_eval_verify_on_s3_equal_local(server, assets, tmp_path):
    env, fs = server
    args = [*tiny_overrides(tmp_path, *assets), *HARVEST]
    url = "s3://bucket/stores/a"
    store_url = f"{url}/{HOOK}"
    # killed after 3 shards, then rerun: the bucket never lists a shard that is not complete
    res = cli(
        "harvest", [*args, f"harvest.out_dir={url}", "harvest.advanced.stop_after_shards=3"], tmp_path, env
    )
    assert res.returncode == -signal.SIGKILL, res.stderr
    partial = read_manifest(store_url)
    assert len(partial["shards"]) == 3 and not partial["complete"]
    for s in partial["shards"]:
        assert fs.info(f"bucket/stores/a/{HOOK}/{s['file']}")["size"] > 0
    res = cli("harvest", [*args, f"harvest.out_dir={url}"], tmp_path, env)
    assert res.returncode == 0, res.stderr
    remote = read_manifest(store_url)

    # the same harvest into a local folder writes the same shards (row counts and checksums)
    (local,) = harvest.run(compose_config("harvest", [*args, f"harvest.out_dir={tmp_path}/local"]))
    want = read_manifest(local)
    assert [(s["file"], s["n_rows"], s["sha256"]) for s in remote["shards"]] == [
        (s["file"], s["n_rows"], s["sha256"]) for s in want["shards"]
    ]
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"bucket/stores/a/{HOOK}")) == sorted(
        [layout.MANIFEST] + [s["file"] for s in want["shards"]]
    )

    # training: a shuffled pass (the store fetched, checked) and a streamed pass stopped and resumed
    from sae_pipeline.train import run

    run(cfg_for(local, tmp_path / "ref", *TRAIN[1:]))
    run(cfg_for(local, tmp_path / "ref-stream", *TRAIN[1:], "train.stream=true"))
    res = cli("train", [f"store={store_url}", *TRAIN, f"train.run_dir={tmp_path}/s3"], tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert_same(weights(tmp_path / "s3"), weights(tmp_path / "ref"))
    stream = [f"store={store_url}", *TRAIN, "train.stream=true", f"train.run_dir={tmp_path}/s3-stream"]
    res = cli("train", [*stream, "train.advanced.stop_after_steps=12"], tmp_path, env)
    assert res.returncode == 0 and "stopped after step 12" in res.stdout, res.stderr
    res = cli("train", [*stream, "train.resume=true"], tmp_path, env)
    assert res.returncode == 0, res.stderr
    assert_same(weights(tmp_path / "s3-stream"), weights(tmp_path / "ref-stream"))

    # eval finds the model and held-out text through the manifest at the URL; verify checks every object
    res = cli(
        "eval", [f"sae_path={tmp_path}/s3", "eval.n_tokens=256", f"paths.root={tmp_path}/runs"], tmp_path, env
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "s3" / layout.EVAL / layout.METRICS).exists()
    res = cli("verify", [f"path={store_url}"], tmp_path, env)
    assert res.returncode == 0 and "ok: 13 files" in res.stdout, res.stdout + res.stderr

    # a damaged object is named by verify and by a streamed run
    victim = remote["shards"][1]["file"]
    data = bytearray(fs.cat(f"bucket/stores/a/{HOOK}/{victim}"))
    data[-5] ^= 0xFF
    fs.pipe(f"bucket/stores/a/{HOOK}/{victim}", bytes(data))
    res = cli("verify", [f"path={store_url}"], tmp_path, env)
    assert res.returncode == 2 and f"{store_url}/{victim} is damaged" in res.stdout, res.stdout
    res = cli("train", [*stream[:-1], f"train.run_dir={tmp_path}/bad"], tmp_path, env)
    assert res.returncode == 2 and f"the shard {store_url}/{victim} is damaged" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_missing_credentials_and_bucket_are_one_sentence(server, assets, tmp_path):
    env, _ = server
    args = [*tiny_overrides(tmp_path, *assets), *HARVEST]
    no_creds = {**env, "AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": ""}
    res = cli("harvest", [*args, "harvest.out_dir=s3://bucket/x"], tmp_path, no_creds)
    assert res.returncode == 2 and "no credentials to reach the store s3://bucket/x" in res.stderr, res.stderr
    res = cli("harvest", [*args, "harvest.out_dir=s3://no-such-bucket/x"], tmp_path, env)
    assert res.returncode == 2 and "the bucket 'no-such-bucket'" in res.stderr, res.stderr
    res = cli("train", ["store=s3://no-such-bucket/x/y", *TRAIN], tmp_path, env)
    assert res.returncode == 2 and "no-such-bucket" in res.stderr, res.stderr
    for r in (res,):
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
