"""SLURM without a cluster: the submissions submitit generates for our launcher configs.

The real commands (`sae-train -m hydra/launcher=slurm ...`) run as subprocesses with a stand-in `sbatch`
(and an `srun` that submitit only looks for) first on PATH: `sbatch` records the batch script submitit wrote and refuses the job, as sbatch does on a
machine with no cluster. The test then reads the recorded `#SBATCH` lines and the pickled jobs (each
job's overrides) that submitit left in the sweep folder before calling sbatch.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_module

from sae_pipeline.schema import register_configs
from sae_pipeline.schema.help import stage_module
from tests.helpers import REPO

STAND_IN_SBATCH = """#!/bin/sh
cp "$1" "$SBATCH_RECORD/$(basename "$1")"
echo "sbatch: error: no SLURM cluster on this machine (test stand-in; the batch script was recorded)" >&2
exit 1
"""


def _submit(tmp_path: Path, stage: str, args: list[str]) -> tuple[dict[str, str], str, list[list[str]]]:
    """Run `sae-<stage> -m ...`; returns the #SBATCH flags, the whole script, and each job's overrides."""
    import submitit

    bin_dir, record, sweep = tmp_path / "bin", tmp_path / "record", tmp_path / "sweep"
    bin_dir.mkdir()
    record.mkdir()
    # submitit looks for srun on PATH before it submits; the submitting side never runs it
    for name, script in [("sbatch", STAND_IN_SBATCH), ("srun", "#!/bin/sh\nexit 1\n")]:
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_RECORD": str(record)}
    cmd = [sys.executable, "-m", stage_module(stage), "-m", f"paths.root={tmp_path / 'runs'}"]
    cmd += [f"hydra.sweep.dir={sweep}", *args]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "no SLURM cluster on this machine" in res.stderr, res.stderr[-3000:]
    (script,) = record.iterdir()
    text = script.read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=(.*)$", text, flags=re.M))
    jobs = [submitit.helpers.DelayedSubmission.load(p) for p in sorted((sweep / ".submitit").rglob("*.pkl"))]
    overrides = sorted(job.args[0] for job in jobs)  # the launcher is called with (overrides, ...)
    return flags, text, overrides


def test_launcher_configs_carry_the_resources():
    register_configs()
    with initialize_config_module("sae_pipeline.conf", version_base="1.3"):
        slurm = compose("train", ["store=x", "hydra/launcher=slurm"], return_hydra_config=True)
        ddp = compose(
            "train",
            ["store=x", "hydra/launcher=slurm_ddp", "hydra.launcher.partition=gpu8"],
            return_hydra_config=True,
        )
    s, d = slurm.hydra.launcher, ddp.hydra.launcher
    assert s._target_.endswith("SlurmLauncher") and d._target_ == s._target_
    assert (s.gpus_per_node, s.tasks_per_node, s.timeout_min, s.array_parallelism) == (1, 1, 240, 64)
    assert (d.gpus_per_node, d.tasks_per_node, d.nodes, d.timeout_min, d.partition) == (4, 4, 1, 720, "gpu8")
    assert d.cpus_per_task == 8 and d.array_parallelism == 64  # inherited from slurm.yaml
    assert any("MASTER_ADDR" in line for line in d.setup) and any("MASTER_PORT" in line for line in d.setup)


def test_l1_sweep_is_one_array_of_gpu_jobs(tmp_path):
    flags, _, overrides = _submit(
        tmp_path,
        "train",
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "store=/data/stores/x",
            "sae=relu",
            "logger=none",
            "sae.l1_coefficient=1e-4,3e-4,1e-3",
        ],
    )
    assert flags["array"] == "0-2%3"  # 3 jobs, all at once (array_parallelism 64 caps nothing here)
    assert flags["partition"] == "gpu" and flags["gpus-per-node"] == "1" and flags["ntasks-per-node"] == "1"
    assert flags["time"] == "240" and flags["cpus-per-task"] == "8" and flags["mem"] == "64GB"
    coefficients = sorted(o for job in overrides for o in job if o.startswith("sae.l1_coefficient="))
    assert coefficients == [
        "sae.l1_coefficient=0.0001",
        "sae.l1_coefficient=0.0003",
        "sae.l1_coefficient=0.001",
    ]


def test_ddp_training_is_one_job_with_a_task_per_gpu(tmp_path):
    flags, text, overrides = _submit(
        tmp_path,
        "train",
        ["hydra/launcher=slurm_ddp", "hydra.launcher.partition=gpu", "store=/data/stores/x", "sae=topk"],
    )
    assert "array" not in flags  # one job
    assert flags["ntasks-per-node"] == "4" and flags["gpus-per-node"] == "4" and flags["nodes"] == "1"
    assert flags["time"] == "720" and flags["partition"] == "gpu"
    setup = text.index("export MASTER_ADDR=$(scontrol show hostnames")
    assert (
        setup < text.index("export MASTER_PORT=") < text.index("srun ")
    )  # exported before srun starts the ranks
    assert re.search(r"^srun .*-m submitit\.core\._submit", text, flags=re.M)  # srun runs every task
    assert len(overrides) == 1 and "sae=topk" in overrides[0]


def test_sharded_harvest_is_one_array_task_per_part(tmp_path):
    flags, _, overrides = _submit(
        tmp_path,
        "harvest",
        [
            "hydra/launcher=slurm",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.array_parallelism=2",
            "harvest.parts=4",
            "harvest.part=range(4)",
        ],
    )
    assert flags["array"] == "0-3%2" and flags["gpus-per-node"] == "1"
    parts = sorted(o for job in overrides for o in job if o.startswith("harvest.part="))
    assert parts == [f"harvest.part={i}" for i in range(4)]
    assert all("harvest.parts=4" in job for job in overrides)
