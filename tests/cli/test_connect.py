"""sae-connect on two stores that share contexts: rows matched by (context, position), planted W recovered."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_pipeline import layout
from sae_pipeline.data.aligned import aligned_rows
from sae_pipeline.sae import save_sae
from tests.helpers import identity_sae, planted, run_cli
from tests.support.synthetic import write_store

CTX, SHARD_CTX = 16, 32


def stores(tmp: Path):
    """Store a holds F1 rows, store b F2 = ReLU(F1 W + b) for the same tokens; each shard is shuffled with its
    own seed, so row i of a shard in a is (almost surely) not row i of the same shard in b."""
    f1, f2, W = planted(n=2048)
    rows = SHARD_CTX * CTX
    a = write_store(tmp / "a", f1.split(rows), CTX, seed=1)
    b = write_store(tmp / "b", f2.split(rows), CTX, seed=2)
    return a, b, f1, f2, W


def identity_run(folder: Path, store: Path, d: int) -> Path:
    """A run folder whose SAE is exact on non-negative rows (E = D = I), so F_i is the store's rows."""
    save_sae(identity_sae(d), folder / layout.FINAL_SAE, extra={"store": str(store)})
    (folder / layout.CONFIG).write_text(json.dumps({"store": str(store)}))
    return folder


def test_aligned_rows_match_contexts_and_positions(tmp_path):
    a, b, f1, f2, _ = stores(tmp_path)
    x1, x2 = aligned_rows(a, b)
    assert x1.shape == f1.shape and x2.shape == f2.shape
    # key order is context-major, position-minor: the order the rows were generated in
    assert torch.equal(x1, f1) and torch.equal(x2, f2)
    x1, x2 = aligned_rows(a, b, max_rows=100)
    assert torch.equal(x1, f1[:100]) and torch.equal(x2, f2[:100])


def test_sae_connect_cli_recovers_planted_connections(tmp_path):
    a, b, f1, f2, W_true = stores(tmp_path)
    run_in = identity_run(tmp_path / "run_in", a, f1.shape[1])
    run_out = identity_run(tmp_path / "run_out", b, f2.shape[1])
    common = [
        f"sae_in={run_in}",
        f"sae_out={run_out}",
        f"paths.root={tmp_path / 'runs'}",
        "connect.steps=1500",
        "connect.lr=1e-2",
        "connect.l1_coefficient=3e-3",
        "connect.batch_size=0",
        "connect.device=cpu",
    ]
    res = run_cli("connect", common, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "runs" / layout.CONNECT / "run_in__run_out"
    W = load_file(str(out / layout.CONNECTOR_WEIGHTS))["W_IO"]
    strong = W.abs() >= 0.1 * W.abs().max(0).values
    assert torch.equal(strong, W_true != 0)
    metrics = json.loads((out / layout.METRICS).read_text())
    assert metrics["val"]["fvu"] < 0.02 and metrics["n_rows"] == {"train": 1843, "val": 205}
    # identity SAEs: F2 is the later hook's activations, so both FVUs agree and the SAE alone is exact
    assert metrics["val"]["fvu_out_activations"] == pytest.approx(metrics["val"]["fvu"], rel=1e-4)
    assert metrics["val"]["fvu_out_sae_alone"] < 1e-10
    lines = (out / layout.CONNECTIONS).read_text().splitlines()
    assert lines
    for line in lines:  # every listed term is a planted connection of that output, with its sign
        head, terms = line.split(" = ")
        o = int(head.removeprefix("OF_"))
        signs = re.findall(r"(^|[+-]) ?(-?)[\d.]+ IF_(\d+)", terms)
        for op, minus, i in signs:
            negative = (op == "-") or (minus == "-")
            assert W_true[int(i), o] != 0 and (W_true[int(i), o] < 0) == negative, line
    assert (out / layout.CONNECTOR_PLOT).read_bytes()[:4] == b"\x89PNG"

    # a second run into the same folder is refused; e2wd1 without the layer is a one-line error
    again = run_cli("connect", common, cwd=tmp_path)
    assert again.returncode == 2 and "connect.overwrite=true" in again.stderr
    bad = run_cli("connect", [*common, "connect.init=e2wd1", "connect.overwrite=true"], cwd=tmp_path)
    assert bad.returncode == 2 and "connect.layer_weights" in bad.stderr


def test_sae_connect_e2wd1_starts_at_the_layer(tmp_path):
    """With identity SAEs, E2 W D1 init from the true layer is already exact: one tiny step keeps FVU ~ 0."""
    a, b, f1, f2, W_true = stores(tmp_path)
    layer = tmp_path / "layer.safetensors"
    save_file({"weight": W_true.t().contiguous(), "bias": torch.full((W_true.shape[1],), 0.05)}, str(layer))
    args = [
        f"sae_in={identity_run(tmp_path / 'i', a, f1.shape[1])}",
        f"sae_out={identity_run(tmp_path / 'o', b, f2.shape[1])}",
        f"paths.root={tmp_path / 'runs'}",
        "connect.init=e2wd1",
        f"connect.layer_weights={layer}",
        "connect.steps=1",
        "connect.lr=1e-9",
        "connect.device=cpu",
    ]
    res = run_cli("connect", args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "runs" / layout.CONNECT / "i__o"
    assert torch.allclose(load_file(str(out / layout.CONNECTOR_WEIGHTS))["W_IO"], W_true, atol=1e-6)
    assert json.loads((out / layout.METRICS).read_text())["val"]["fvu"] < 1e-10
