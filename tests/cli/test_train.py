"""sae-train on tiny synthetic stores: CLI, multirun, exact resume, sweep groups, failure modes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline import layout
from sae_pipeline.data.reader import ShuffledReader
from sae_pipeline.data.store import ActivationStore
from sae_pipeline.errors import UserError
from sae_pipeline.sae import ARCHITECTURES, build_sae, read_sae
from sae_pipeline.schema.train import TrainConfig
from sae_pipeline.train import StopRequested, run
from sae_pipeline.training import checkpoint
from sae_pipeline.training.schedule import lr_at, sparsity_scale_at
from tests.helpers import assert_same, cfg_for, make_store, weights

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, tag_rows=False)


def cli(args: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sae_pipeline.train", *args], cwd=cwd, env={**ENV, **kw.pop("env", {})},
        capture_output=True, text=True, timeout=300, **kw,
    )  # fmt: skip


# ---- the real command line -------------------------------------------------------------------
def test_cli_single_run_writes_the_run_layout_and_wandb_offline(store, tmp_path):
    res = cli(
        [f"store={store}", "train=tiny", f"paths.root={tmp_path}/runs"],
        tmp_path,
        env={"WANDB_DIR": str(tmp_path)},
    )
    assert res.returncode == 0, res.stderr
    (run_dir,) = (tmp_path / "runs" / "train").iterdir()
    assert run_dir.name.endswith("_relu")
    cfg = json.loads((run_dir / layout.CONFIG).read_text())
    assert cfg["store"] == str(store.resolve()) and cfg["arch"] == "relu" and cfg["d_in"] == 16
    assert cfg["store_sha256"] == ActivationStore(store).sha256()
    saved = json.loads((run_dir / layout.FINAL_SAE / "config.json").read_text())
    assert saved["hook"] == "blocks.0.hook_resid_post" and saved["input_scale_folded"] > 0
    lines = [json.loads(ln) for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
    logged = {k for ln in lines for k in ln}
    for key in ("loss", "loss/mse", "loss/l1", "mse", "fvu", "l0", "dead_latents", "dense_latents", "lr",
                "sparsity_coefficient", "tokens_per_s", "val/mse", "val/fvu", "val/l0"):  # fmt: skip
        assert key in logged, key
    assert any("passes over the store" in ln.get("event", "") for ln in lines)
    assert len(checkpoint.list_checkpoints(run_dir)) == 2  # keep_checkpoints
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_cli_multirun_gives_each_job_its_folder(store, tmp_path):
    res = cli(["-m", "sae=relu", "sae.l1_coefficient=1,3", f"store={store}", "train=tiny", "logger=none",
               f"paths.root={tmp_path}/runs"], tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr
    (sweep,) = (tmp_path / "runs" / "sweeps").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert jobs == [
        "0_sae.l1_coefficient=1,sae=relu,train=tiny",
        "1_sae.l1_coefficient=3,sae=relu,train=tiny",
    ]
    for job in jobs:
        assert read_sae(sweep / job / layout.FINAL_SAE).cfg.l1_coefficient in (1.0, 3.0)


def test_cli_reports_user_errors_in_one_line(tmp_path):
    res = cli([f"store={tmp_path}/nowhere", "logger=none", f"paths.root={tmp_path}"], tmp_path)
    assert res.returncode == 2
    assert (
        res.stderr.strip().startswith("error:") and "nowhere" in res.stderr and "Traceback" not in res.stderr
    )


def test_sigkilled_cli_run_resumes_to_the_same_weights(store, tmp_path):
    """The real command SIGKILLed inside its third checkpoint write (sae_pipeline.faults pauses it there and
    writes a mark: the kill waits for that event, never for a deadline), then resumed by the same command.
    The subprocesses compute with this process's thread count (tests/conftest.py), as bit-identity needs."""
    args = [f"store={store}", "train=tiny", "train.total_tokens=8192", "train.checkpoint_every_tokens=512"]
    run(cfg_for(store, tmp_path / "ref", *args[1:]))
    run_dir, mark = tmp_path / "killed", tmp_path / "paused"
    fault = {"SAE_PIPELINE_FAULT": "checkpoint:3", "SAE_PIPELINE_FAULT_MARK": str(mark)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sae_pipeline.train", *args, "logger=none", f"train.run_dir={run_dir}"],
        cwd=tmp_path, env={**ENV, **fault}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    while not mark.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mark.exists(), f"the run exited with {proc.returncode} before its third checkpoint"
    assert [p.name for p in checkpoint.list_checkpoints(run_dir)] == ["step-000000008", "step-000000016"]
    recorded = json.loads((run_dir / layout.CONFIG).read_text())["compute"]
    assert recorded["threads"] == torch.get_num_threads() and recorded["torch"] == torch.__version__
    res = cli([*args, "logger=none", f"train.run_dir={run_dir}", "train.resume=true"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "resume runs with" not in res.stderr  # same device, threads and torch: no note
    assert_same(weights(run_dir), weights(tmp_path / "ref"))


# ---- exact resume, failures -------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["relu", "topk"])
def test_stopped_run_resumes_bit_exact(store, tmp_path, arch):
    run(cfg_for(store, tmp_path / "a", f"sae={arch}"))
    with pytest.raises(StopRequested):
        run(cfg_for(store, tmp_path / "b", f"sae={arch}", "train.advanced.stop_after_steps=41"))
    assert not (tmp_path / "b" / layout.FINAL_SAE).exists()
    (tmp_path / "b" / layout.CHECKPOINTS / "step-000000099.tmp").mkdir()  # a save killed halfway
    with pytest.raises(UserError, match="already holds a run"):
        run(cfg_for(store, tmp_path / "b", f"sae={arch}"))
    run(cfg_for(store, tmp_path / "b", f"sae={arch}", "train.resume=true"))
    assert_same(weights(tmp_path / "a"), weights(tmp_path / "b"))
    last_a, last_b = checkpoint.latest(tmp_path / "a"), checkpoint.latest(tmp_path / "b")
    assert_same(load_file(str(last_a / layout.TRAIN_STATE)), load_file(str(last_b / layout.TRAIN_STATE)))
    steps = [
        json.loads(ln).get("step") for ln in (tmp_path / "b" / layout.TRAIN_LOG).read_text().splitlines()
    ]
    assert steps.count(40) == 1  # log lines of the killed tail are not duplicated


def test_resume_under_another_thread_count_is_allowed_and_says_so(store, tmp_path, capsys):
    """Bit-identity is promised at one device, thread count and torch build: each checkpoint records them,
    and a resume under another thread count continues with one line saying what changed."""
    n, run_dir = torch.get_num_threads(), tmp_path / "r"
    with pytest.raises(StopRequested):
        run(cfg_for(store, run_dir, "train.advanced.stop_after_steps=20"))
    state = json.loads((checkpoint.latest(run_dir) / layout.TRAIN_META).read_text())
    first = {"torch": torch.__version__, "device": "cpu", "threads": n}
    assert state["compute"] == first == json.loads((run_dir / layout.CONFIG).read_text())["compute"]
    capsys.readouterr()
    torch.set_num_threads(n + 1)
    try:
        run(cfg_for(store, run_dir, "train.resume=true"))
    finally:
        torch.set_num_threads(n)
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert (
        len(notes) == 1 and f"{n} CPU threads -> {n + 1} CPU threads" in notes[0] and "last bits" in notes[0]
    )
    record = json.loads((run_dir / layout.CONFIG).read_text())
    assert record["compute"] == {**first, "threads": n + 1}
    assert record["compute_changes"] == [{"step": 16, "from": first, "to": record["compute"]}]


def test_existing_run_is_refused_unless_overwrite(store, tmp_path):
    run(cfg_for(store, tmp_path / "r", "train.total_tokens=640"))
    with pytest.raises(UserError, match=r"already holds a run.*train.resume=true"):
        run(cfg_for(store, tmp_path / "r", "train.total_tokens=640"))
    run(cfg_for(store, tmp_path / "r", "train.total_tokens=640", "train.overwrite=true"))
    assert (tmp_path / "r" / layout.FINAL_SAE).exists()


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(store, tmp_path, monkeypatch):
    original, calls = ShuffledReader.next_batch, {"n": 0}

    def poisoned(self):
        calls["n"] += 1
        x = original(self)
        return x * float("nan") if calls["n"] == 40 else x

    monkeypatch.setattr(ShuffledReader, "next_batch", poisoned)
    with pytest.raises(UserError, match="step 40.*step-000000032"):
        run(cfg_for(store, tmp_path / "r"))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "r")] == [
        "step-000000016",
        "step-000000032",
    ]
    assert not (tmp_path / "r" / layout.FINAL_SAE).exists()
    assert torch.isfinite(
        load_file(str(checkpoint.latest(tmp_path / "r") / layout.SAE_WEIGHTS))["W_dec_FD"]
    ).all()


def test_nan_inside_a_log_window_never_reaches_a_checkpoint(store, tmp_path, monkeypatch):
    """The finiteness check runs per log line, and before every checkpoint: with no log line between the
    non-finite step 30 and the checkpoint at step 32, the run still stops before writing step 32."""
    original, calls = ShuffledReader.next_batch, {"n": 0}

    def poisoned(self):
        calls["n"] += 1
        x = original(self)
        return x * float("inf") if calls["n"] == 30 else x

    monkeypatch.setattr(ShuffledReader, "next_batch", poisoned)
    with pytest.raises(UserError, match="step 30.*step-000000016"):
        run(cfg_for(store, tmp_path / "r", "train.log_every=1000"))
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "r")] == ["step-000000016"]
    assert calls["n"] == 32  # stopped at the checkpoint, not at the step


def test_d_in_mismatch_is_one_sentence(store, tmp_path):
    with pytest.raises(UserError, match="d_in=99 does not match the store"):
        run(_with_d_in(store, tmp_path))
    other = make_store(tmp_path / "wide", n_contexts=8, d_in=24, contexts_per_shard=4, tag_rows=False)
    with pytest.raises(StopRequested):
        run(cfg_for(store, tmp_path / "r", "train.advanced.stop_after_steps=20"))
    with pytest.raises(UserError, match="d_in=16 but the store .* has d_in=24"):
        run(cfg_for(other, tmp_path / "r", "train.resume=true"))


def _with_d_in(store: Path, tmp_path: Path):
    from omegaconf import OmegaConf, open_dict

    cfg = cfg_for(store, tmp_path / "x")
    OmegaConf.set_struct(cfg, False)
    with open_dict(cfg):
        cfg.sae = {**OmegaConf.to_container(cfg.sae), "d_in": 99}
    return cfg


def test_truncated_shard_is_named(tmp_path):
    folder = make_store(tmp_path / "s", n_contexts=16, d_in=16, contexts_per_shard=4, tag_rows=False)
    shard = folder / layout.shard_name(2)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(UserError, match="shard-00002"):
        run(cfg_for(folder, tmp_path / "r"))


# ---- sweep groups, all architectures, input-scale folding ---------------------------------------
@pytest.mark.parametrize("arch,key,values", [("relu", "l1_coefficient", [1.0, 10.0]), ("topk", "k", [4, 8])])
def test_sweep_group_equals_separate_runs(store, tmp_path, arch, key, values):
    group = "[" + ",".join(f"{{{key}:{v}}}" for v in values) + "]"
    if arch == "relu":  # the group is also killed and resumed on the way
        with pytest.raises(StopRequested):
            run(
                cfg_for(
                    store,
                    tmp_path / "g",
                    f"sae={arch}",
                    f"train.group={group}",
                    "train.advanced.stop_after_steps=37",
                )
            )
        run(cfg_for(store, tmp_path / "g", f"sae={arch}", f"train.group={group}", "train.resume=true"))
    else:
        run(cfg_for(store, tmp_path / "g", f"sae={arch}", f"train.group={group}"))
    assert json.loads((tmp_path / "g" / layout.CONFIG).read_text())["group"] == [f"{key}={v}" for v in values]
    for v in values:
        run(cfg_for(store, tmp_path / f"solo{v}", f"sae={arch}", f"sae.{key}={v}"))
        member = tmp_path / "g" / f"{key}={v}"
        assert (member / layout.TRAIN_LOG).exists() and checkpoint.latest(member) is not None
        assert_same(weights(member), weights(tmp_path / f"solo{v}"))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_arch_trains_and_saved_sae_takes_raw_activations(store, tmp_path, arch):
    run_dir = run(cfg_for(store, tmp_path / "r", f"sae={arch}"))
    saved = read_sae(run_dir / layout.FINAL_SAE)
    meta = json.loads((run_dir / layout.CONFIG).read_text())
    scale = meta["input_scale"]
    assert scale != 1.0
    trained = build_sae(saved.cfg, saved.d_in)  # the last checkpoint holds training-unit weights
    trained.load_state_dict(load_file(str(checkpoint.latest(run_dir) / layout.SAE_WEIGHTS)))
    x = ShuffledReader(ActivationStore(store), 256, val_tokens=64).validation_rows()
    with torch.no_grad():
        torch.testing.assert_close(saved(x), trained(x * scale) / scale, rtol=1e-4, atol=1e-4)
    log = [json.loads(ln) for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
    val = [ln for ln in log if "val/fvu" in ln]
    assert len(val) == 4 and val[-1]["val/fvu"] < 1.0, val  # better than predicting the mean after 64 steps


def test_schedules():
    cfg = TrainConfig(lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.2, sparsity_warmup_steps=4)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[50] == 1.0 and lrs[80] == 1.0
    assert lrs[99] == pytest.approx(1 / 20) and all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert [sparsity_scale_at(s, cfg) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_a_short_run_warms_up_over_at_most_a_tenth_of_its_steps():
    """The default 100 warm-up steps on a 146-step run would leave it at its peak rate for 17 steps."""
    cfg = TrainConfig(lr=1.0, lr_warmup_steps=100, lr_decay_fraction=0.2)
    lrs = [lr_at(s, 146, cfg) for s in range(146)]
    assert lrs[0] == pytest.approx(1 / 14) and lrs[13] == 1.0 and lrs[100] == 1.0  # 146 // 10 = 14 steps
    assert [lr_at(s, 5000, cfg) for s in (0, 99)] == [pytest.approx(0.01), 1.0]  # a long run: all 100 steps


def test_loss_recovered_is_logged_for_a_harvested_store(tmp_path):
    """A real (tiny) model harvested by sae-harvest: training logs loss recovered and KL."""
    from tests.helpers import run_cli, save_tiny_model, tiny_overrides, write_corpus

    model, corpus = save_tiny_model(tmp_path / "model"), write_corpus(tmp_path / "corpus.jsonl")
    res = run_cli("harvest", tiny_overrides(tmp_path, model, corpus), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    (manifest,) = (tmp_path / "runs" / "stores").rglob(layout.MANIFEST)
    overrides = ("train.eval_every=32", "train.eval_tokens=256", "train.val_tokens=31")  # last shard: 31 rows
    run_dir = run(cfg_for(manifest.parent, tmp_path / "r", *overrides))
    log = [json.loads(ln) for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
    evals = [ln for ln in log if "eval/loss_recovered" in ln]
    assert [ln["step"] for ln in evals] == [32, 64] and all(ln["eval/kl"] >= 0 for ln in evals)


def test_unloadable_model_skips_loss_recovered_once(store, tmp_path):
    run_dir = run(cfg_for(store, tmp_path / "r", "train.eval_every=16"))
    events = [json.loads(ln).get("event", "") for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
    assert sum("loss recovered is skipped" in e for e in events) == 1
