"""One writer per folder (sae_pipeline/locks.py), with real concurrent processes.

A writer is held still inside its run by a fault point (sae_pipeline.faults, SAE_PIPELINE_FAULT) while a
second command runs, and let go afterwards (SAE_PIPELINE_FAULT_GO): who holds the lock never depends on
timing. Expected outcomes: the second writer exits 2 with one sentence naming the folder and the first
one's pid and host, and nothing it could write changed; the first finishes as if alone. A lock left by a
SIGKILLed process is taken over; the record-file kind used where flock is unavailable refuses the same.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_pipeline import layout, locks
from sae_pipeline.data import store as store_mod
from sae_pipeline.sae import read_sae
from sae_pipeline.schema.help import stage_module
from tests.helpers import make_sae_run, make_store, save_tiny_model, tiny_overrides, write_corpus

ENV = {
    **os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}  # fmt: skip
MODES = ["flock", "file"]  # file: the fallback where flock is unavailable


def _cmd(module: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", stage_module(module), *args]


class Paused:
    """A stage's command line started in a subprocess and held at a fault point until `go()`."""

    def __init__(self, module: str, args: list[str], cwd: Path, point: str, env: dict | None = None):
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        self.mark, self.go_file = cwd / f"mark-{tag}", cwd / f"go-{tag}"
        self.out, self.err = cwd / f"out-{tag}", cwd / f"err-{tag}"
        fault = {"SAE_PIPELINE_FAULT": point, "SAE_PIPELINE_FAULT_MARK": str(self.mark)}
        fault["SAE_PIPELINE_FAULT_GO"] = str(self.go_file)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                _cmd(module, args), cwd=cwd, env={**ENV, **(env or {}), **fault}, stdout=out, stderr=err
            )
        while not self.mark.exists():  # no deadline: a slow machine only waits longer
            if self.proc.poll() is not None:
                pytest.fail(f"exited {self.proc.returncode} before {point}: {self.err.read_text()[-2000:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> tuple[int, str]:
        self.go_file.write_text("go")
        return self.proc.wait(), self.err.read_text()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def _run(module: str, args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        _cmd(module, args), cwd=cwd, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=900
    )


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and modification time (what a writer would change)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _refused(res: subprocess.CompletedProcess, folder: Path, holder_pid: int) -> None:
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert str(folder) in lines[0] and f"pid {holder_pid} on host {socket.gethostname()}" in lines[0]


def _logged_steps(run_dir: Path) -> list[int]:
    """The step of every metrics line of the training log, in file order."""
    lines = [json.loads(ln) for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
    return [ln["step"] for ln in lines if "loss" in ln]


# ---- sae-train ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, tag_rows=False)


def _train_args(store: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"store={store}", "train=tiny", "logger=none", f"train.run_dir={run_dir}", *extra]


@pytest.mark.parametrize("mode", MODES)
def test_a_second_train_on_a_run_folder_being_written_is_refused(store, tmp_path, mode):
    """Four checkpoints (4096 tokens / 1024); the first writer is held inside its second checkpoint."""
    run_dir, env = tmp_path / "run", {"SAE_PIPELINE_LOCK": mode}
    first = Paused("train", _train_args(store, run_dir), tmp_path, "checkpoint:2", env)
    before = _files(run_dir)
    second = _run("train", _train_args(store, run_dir), tmp_path, env)
    _refused(second, run_dir, first.pid)
    assert _files(run_dir) == before  # the refused command wrote nothing
    rc, err = first.go()
    assert rc == 0, err[-2000:]
    assert _logged_steps(run_dir) == [8 * i for i in range(1, 9)]  # 64 steps, one line per 8, once each
    assert read_sae(run_dir / layout.FINAL_SAE).d_in == 16
    assert not (run_dir / layout.LOCK).exists()  # released at the end


def test_two_resumes_at_once_one_refused_and_the_log_has_no_duplicate(store, tmp_path):
    run_dir = tmp_path / "run"
    stop = _run("train", _train_args(store, run_dir, "train.advanced.stop_after_steps=20"), tmp_path)
    assert stop.returncode == 0 and "stopped after step 20" in stop.stdout, stop.stderr[-2000:]
    first = Paused("train", _train_args(store, run_dir, "train.resume=true"), tmp_path, "checkpoint:1")
    before = _files(run_dir)
    _refused(_run("train", _train_args(store, run_dir, "train.resume=true"), tmp_path), run_dir, first.pid)
    assert _files(run_dir) == before
    rc, err = first.go()
    assert rc == 0, err[-2000:]
    # the stopped run logged steps 8 and 16 and checkpointed at 16; the resume goes on from 16
    assert _logged_steps(run_dir) == [8 * i for i in range(1, 9)]


def test_two_trains_started_at_once_one_trains_and_the_other_is_refused(store, tmp_path):
    """No pause: whichever comes second is refused, by the lock or (if the first already ended) by the
    finished run it finds; either way one run's lines are in the log, once."""
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen(
            _cmd("train", _train_args(store, run_dir)), cwd=tmp_path, env=ENV,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    (err,) = [e for rc, e in results if rc == 2]
    assert str(run_dir) in err and ("is being written by another process" in err or "already holds" in err)
    assert _logged_steps(run_dir) == [8 * i for i in range(1, 9)]


@pytest.mark.parametrize("mode", MODES)
def test_the_lock_of_a_sigkilled_train_is_taken_over(store, tmp_path, mode):
    run_dir, env = tmp_path / "run", {"SAE_PIPELINE_LOCK": mode}
    killed = Paused("train", _train_args(store, run_dir), tmp_path, "checkpoint:2", env)
    killed.kill()
    record = json.loads((run_dir / layout.LOCK).read_text())
    assert record["pid"] == killed.pid  # left behind
    res = _run("train", _train_args(store, run_dir, "train.resume=true"), tmp_path, env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (
        f"locked by pid {killed.pid} on host {socket.gethostname()}, which is no longer running" in res.stderr
    )
    assert (run_dir / layout.FINAL_SAE).exists() and not (run_dir / layout.LOCK).exists()


@pytest.mark.distributed
def test_a_refused_two_rank_train_says_so_on_both_ranks(store, tmp_path):
    """Under torchrun rank 0 alone locks the run folder; its refusal reaches rank 1 as well (which would
    otherwise wait for rank 0 in a collective until torchrun kills it), so each rank says it in one line."""
    run_dir = tmp_path / "run"
    with locks.hold(run_dir, "the run folder"):
        res = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
             "sae_pipeline.train", *_train_args(store, run_dir), f"hydra.run.dir={tmp_path / 'hydra'}"],
            cwd=tmp_path, env={**ENV, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
    said = f"error: the run folder {run_dir} is being written by another process"
    assert res.returncode != 0 and (res.stdout + res.stderr).count(said) == 2, res.stderr[-3000:]
    assert not run_dir.exists()  # nothing written: the folder our lock made was empty, and went with it


# ---- sae-harvest --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harvest")
    return {"root": root, "model": save_tiny_model(root / "model"), "corpus": write_corpus(root / "c.jsonl")}


def _harvest_args(s, *extra: str) -> list[str]:
    return tiny_overrides(s["root"], s["model"], s["corpus"], 1200) + list(extra)


def _store_dir(s) -> Path:
    return layout.store_dir(s["root"] / "runs" / "stores" / "tiny" / "corpus", "blocks.1.hook_resid_post")


def test_a_harvest_twice_on_one_store_and_the_parts_of_a_split_one(text_setup):
    """A one-process harvest held in its first manifest write refuses a second; then a 2-part harvest:
    part 0 held in its folder refuses part 0 again and a one-process harvest of the same store, while
    part 1 writes its own folder at the same time; released, part 0 finishes last and merges."""
    s, root = text_setup, text_setup["root"]
    folder = _store_dir(s)
    first = Paused("harvest", _harvest_args(s), root, "write:manifest.json:1")
    before = _files(folder)
    _refused(_run("harvest", _harvest_args(s), root), folder, first.pid)
    assert _files(folder) == before
    rc, err = first.go()
    assert rc == 0 and store_mod.read_manifest(folder)["complete"], err[-2000:]

    split = ("harvest.parts=2", "harvest.overwrite=true")
    part0 = Paused("harvest", _harvest_args(s, *split, "harvest.part=0"), root, "write:manifest.json:1")
    part0_dir = layout.part_dir(folder, 0, 2)
    _refused(_run("harvest", _harvest_args(s, *split, "harvest.part=0"), root), part0_dir, part0.pid)
    _refused(_run("harvest", _harvest_args(s, "harvest.overwrite=true"), root), part0_dir, part0.pid)
    part1 = _run("harvest", _harvest_args(s, *split, "harvest.part=1"), root)
    assert part1.returncode == 0 and "waiting for other parts" in part1.stderr, part1.stderr[-2000:]
    rc, err = part0.go()
    assert rc == 0 and "merged into" in err, err[-2000:]
    merged = store_mod.read_manifest(folder)
    assert merged["complete"] and merged["parts"] == 2
    assert not list(folder.rglob(layout.LOCK + "*"))


# ---- sae-eval ------------------------------------------------------------------------------------
def test_a_second_eval_of_a_run_being_evaluated_is_refused(tmp_path):
    run_dir = make_sae_run(tmp_path)
    args = [f"sae_path={run_dir}", "logger=none", "eval.n_tokens=64", f"paths.root={tmp_path / 'runs'}"]
    first = Paused("eval", args, tmp_path, f"write:{layout.METRICS}:1")
    eval_dir = run_dir / layout.EVAL
    before = _files(eval_dir)
    _refused(_run("eval", args, tmp_path), eval_dir, first.pid)
    assert _files(eval_dir) == before
    rc, err = first.go()
    assert rc == 0 and (eval_dir / layout.METRICS).is_file(), err[-2000:]
    assert not (eval_dir / layout.LOCK).exists()


# ---- the lock itself, against a live holder in another process ---------------------------------
HOLDER = "import sys; from sae_pipeline import locks; locks.hold(sys.argv[1]); print('held', flush=True); sys.stdin.read()"


def _holder(folder: Path, mode: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], env={**ENV, "SAE_PIPELINE_LOCK": mode},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("holder_mode", MODES)
def test_without_flock_the_record_file_still_refuses_a_live_holder(tmp_path, monkeypatch, holder_mode):
    """flock made to fail as on a filesystem without it (ENOLCK): the lock falls back to the record
    file, which refuses a live holder of either kind, and is taken once the holder has ended."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    folder = tmp_path / "f"
    proc = _holder(folder, holder_mode)
    with pytest.raises(locks.FolderBusy, match=rf"{folder} is being written by .*pid {proc.pid} on host"):
        locks.hold(folder)
    proc.stdin.close()  # the holder ends, releasing its lock
    assert proc.wait() == 0
    lock = locks.hold(folder)
    assert json.loads((folder / layout.LOCK).read_text())["kind"] == "file"
    lock.release()
    assert not (folder / layout.LOCK).exists()


@pytest.mark.parametrize("mode", MODES)
def test_records_that_cannot_be_checked_are_refused_and_reused_pids_are_stale(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("SAE_PIPELINE_LOCK", mode)
    folder = tmp_path / "f"
    folder.mkdir()
    elsewhere = {"host": "another-host", "pid": 1, "start": "1", "token": "t", "kind": "file"}
    (folder / layout.LOCK).write_text(json.dumps(elsewhere))
    with pytest.raises(locks.FolderBusy, match=rf"pid 1 on host another-host.*delete {folder / layout.LOCK}"):
        locks.hold(folder)
    # this very pid, but started at another time: a process that died and whose pid was given again
    reused = {**elsewhere, "host": socket.gethostname(), "pid": os.getpid(), "start": "-1"}
    (folder / layout.LOCK).write_text(json.dumps(reused))
    with locks.hold(folder) as lock:
        assert lock.taken_over["start"] == "-1"
        assert json.loads((folder / layout.LOCK).read_text())["token"] == lock.record["token"]


# ---- the stages that write one folder at the end: sae-features, sae-steer, sae-export ------------
@pytest.mark.parametrize(
    "stage, args, folder",
    [
        ("features", ["features.n_tokens=300", "features.max_latents=4", "features.device=cpu"], layout.FEATURES),
        ("steer", ["steer.device=cpu", "steer.max_new_tokens=2", "steer.prompts=[the king]", "steer.latents=[0]"],
         layout.STEER),
        ("export", [], f"{layout.EXPORT}/saelens"),
    ],
)  # fmt: skip
def test_a_stage_writing_a_folder_another_process_holds_is_refused(tmp_path, stage, args, folder):
    """The folder's lock held on its own open file (as another process would hold it): the stage refuses in
    one sentence naming the folder, writes nothing there, and runs once the lock is released."""
    import importlib

    from tests.helpers import compose_config

    run_dir = make_sae_run(tmp_path)
    out = run_dir / folder
    cfg = compose_config(stage, [f"sae_path={run_dir}", f"paths.root={tmp_path / 'runs'}", *args])
    module = importlib.import_module(stage_module(stage))
    with locks.hold(out):
        with pytest.raises(locks.FolderBusy, match=rf"{out} is being written by .*pid {os.getpid()}"):
            module.run(cfg)
        assert [p.name for p in out.iterdir()] == [layout.LOCK]
    module.run(cfg)
    assert any(p.name != layout.LOCK for p in out.iterdir()) and not (out / layout.LOCK).exists()
