"""model=torch_module + data=tensors through the real CLI: harvest -> train -> eval on a tiny nn.Sequential.

Ground truths: the store's rows are the module's hidden layer computed here directly; an identity SAE
(exact on the non-negative ReLU output) spliced changes nothing, so accuracy equals the original and loss
recovered is exactly 1; an SAE whose reconstruction is 0 is the zero ablation, so loss recovered is exactly 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_pipeline import harvest, layout
from sae_pipeline.data.store import read_manifest
from sae_pipeline.errors import UserError
from sae_pipeline.sae import save_sae
from tests.helpers import compose_config, identity_sae, run_cli

FACTORY = """
from torch import nn


def build():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def wide():
    return nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 3))
"""
N, N_EVAL, HIDDEN = 96, 40, 8


def module_and_data(tmp: Path, labels: bool = True):
    """tinymod.py (the factory), its weights, train.safetensors and test.safetensors in tmp."""
    (tmp / "tinymod.py").write_text(FACTORY)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    save_file(model.state_dict(), str(tmp / "w.safetensors"))
    g = torch.Generator().manual_seed(1)
    for name, n in (("train", N), ("test", N_EVAL)):
        x = torch.randn(n, 6, generator=g)
        tensors = {"inputs": x}
        if labels:  # the module's own answer, with every third one replaced: accuracy is neither 0 nor 1
            y = model(x).argmax(1)
            y[::3] = torch.randint(0, 3, (len(y[::3]),), generator=g)
            tensors["labels"] = y
        save_file(tensors, str(tmp / f"{name}.safetensors"))
    return model.eval().requires_grad_(False)


def harvest_args(tmp: Path, *extra: str) -> list[str]:
    return [
        f"paths.root={tmp / 'runs'}",
        "model=torch_module",
        "model.factory=tinymod:build",
        "model.weights=w.safetensors",
        "data=tensors",
        "data.path=train.safetensors",
        "data.eval_path=test.safetensors",
        "hook.names=[module:1]",
        "harvest.shard_size=32",
        "harvest.batch_size=16",
        "harvest.device=cpu",
        *extra,
    ]


def harvested(tmp: Path, *extra: str) -> Path:
    r = run_cli("harvest", harvest_args(tmp, *extra), cwd=tmp)
    assert r.returncode == 0, r.stderr
    (store,) = list((tmp / "runs" / "stores").glob("*/*/module__1__output"))
    return store


def rows_of(store: Path) -> tuple[torch.Tensor, torch.Tensor]:
    shards = [load_file(str(store / s["file"])) for s in read_manifest(store)["shards"]]
    acts = torch.cat([s["activations"] for s in shards])
    ctx = torch.cat([s["context_ids"] for s in shards]).long()
    assert all(bool((s["positions"] == 0).all()) for s in shards)
    return acts, ctx


def run_with(tmp: Path, name: str, sae, store: Path) -> Path:
    folder = tmp / name
    m = read_manifest(store)
    save_sae(
        sae,
        folder / layout.FINAL_SAE,
        extra={"store": str(store), "hook": m["hook"]["name"], "model": m["model"]},
    )
    (folder / layout.CONFIG).write_text(json.dumps({"store": str(store)}))
    return folder


def evaluated(tmp: Path, run: Path) -> dict:
    r = run_cli(
        "eval", [f"sae_path={run}", "logger=none", f"paths.root={tmp / 'runs'}", "eval.device=cpu"], cwd=tmp
    )
    assert r.returncode == 0, r.stderr
    return json.loads((run / layout.EVAL / layout.METRICS).read_text())


def test_harvest_train_eval_through_the_cli(tmp_path):
    model = module_and_data(tmp_path)
    store = harvested(tmp_path)
    man = read_manifest(store)
    assert (man["d_in"], man["context_size"], man["n_tokens"]) == (HIDDEN, 1, N)
    acts, ctx = rows_of(store)
    train = load_file(str(tmp_path / "train.safetensors"))
    assert sorted(ctx.tolist()) == list(range(N))  # context id = the example's index in data.path
    torch.testing.assert_close(acts, model[:2](train["inputs"][ctx]), rtol=0, atol=1e-6)  # batch order only

    run = tmp_path / "trained"
    r = run_cli(
        "train",
        [
            f"store={store}",
            f"train.run_dir={run}",
            "train=tiny",
            "logger=none",
            "train.val_tokens=16",
            "train.device=cpu",
            "train.eval_every=32",
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    m = evaluated(tmp_path, run)
    test = load_file(str(tmp_path / "test.safetensors"))
    logits = model(test["inputs"])
    assert m["task_loss"] == "cross_entropy" and m["n_examples"] == N_EVAL
    assert m["accuracy_clean"] == pytest.approx(float((logits.argmax(1) == test["labels"]).float().mean()))
    ce = torch.nn.functional.cross_entropy(logits, test["labels"]).item()
    assert m["ce_clean"] == pytest.approx(ce, rel=1e-5)
    zero_logits = model[2](torch.zeros(N_EVAL, HIDDEN))
    assert m["ce_zero"] == pytest.approx(
        torch.nn.functional.cross_entropy(zero_logits, test["labels"]).item(), rel=1e-5
    )
    assert 0 <= m["l0"] <= HIDDEN * 4 and "fvu" in m and "loss_recovered" in m
    logged = [json.loads(line) for line in (run / layout.TRAIN_LOG).read_text().splitlines()]
    during = [r for r in logged if "eval/ce_clean" in r]  # training's loss recovered: the task's loss too
    assert len(during) == 2 and during[-1]["eval/ce_clean"] == pytest.approx(ce, rel=1e-5)
    assert during[-1]["eval/ce_sae"] == pytest.approx(m["ce_sae"], rel=1e-5)  # the same final SAE


def test_identity_and_zero_saes_give_loss_recovered_one_and_zero(tmp_path):
    module_and_data(tmp_path)
    store = harvested(tmp_path)
    ident = evaluated(tmp_path, run_with(tmp_path, "identity", identity_sae(HIDDEN), store))
    assert ident["loss_recovered"] == 1.0 and ident["fvu"] == 0.0
    assert ident["accuracy_sae"] == ident["accuracy_clean"] and ident["kl"] == 0.0
    assert ident["accuracy_clean"] != ident["accuracy_zero"]  # the test can tell a splice from no splice
    for stage in ("features", "probe"):  # text-only stages refuse it in one line, exit 2
        r = run_cli(
            stage,
            [f"sae_path={tmp_path / 'identity'}", f"paths.root={tmp_path / 'runs'}"],
            cwd=tmp_path,
        )
        assert r.returncode == 2 and "model=torch_module" in r.stderr, (stage, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr

    zero = identity_sae(HIDDEN)
    with torch.no_grad():
        zero.W_dec_FD.zero_()
    m = evaluated(tmp_path, run_with(tmp_path, "zero", zero, store))
    assert m["loss_recovered"] == 0.0 and m["accuracy_sae"] == m["accuracy_zero"]


def test_without_labels_the_loss_is_the_output_error(tmp_path):
    model = module_and_data(tmp_path, labels=False)
    store = harvested(tmp_path, "data.eval_path=null", "data.eval_fraction=0.25")
    acts, ctx = rows_of(store)
    assert len(set(ctx.tolist())) == len(ctx) == N - N // 4  # the held-out quarter is not harvested
    inputs = load_file(str(tmp_path / "train.safetensors"))["inputs"]
    torch.testing.assert_close(acts, model[:2](inputs[ctx]), rtol=0, atol=1e-6)  # row i is example ctx[i]
    ident = evaluated(tmp_path, run_with(tmp_path, "identity", identity_sae(HIDDEN), store))
    assert ident["task_loss"] == "output_mse" and ident["n_examples"] == N // 4
    assert ident["loss_sae"] == 0.0 and ident["loss_recovered"] == 1.0 and "accuracy_sae" not in ident
    zero = identity_sae(HIDDEN)
    with torch.no_grad():
        zero.W_dec_FD.zero_()
    m = evaluated(tmp_path, run_with(tmp_path, "zero", zero, store))
    assert m["loss_recovered"] == 0.0 and m["loss_sae"] == m["loss_zero"] > 0


def _bad_names(tmp: Path) -> str:
    save_file({"input": torch.zeros(4, 6)}, str(tmp / "bad.safetensors"))
    return "data.path=bad.safetensors"


def _wrong_shape(tmp: Path) -> str:
    torch.manual_seed(0)
    wide = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    save_file(wide.state_dict(), str(tmp / "wide.safetensors"))
    return "model.weights=wide.safetensors"


def _missing_key(tmp: Path) -> str:
    state = load_file(str(tmp / "w.safetensors"))
    state.pop("2.bias")
    save_file(state, str(tmp / "partial.safetensors"))
    return "model.weights=partial.safetensors"


@pytest.mark.parametrize(
    "make, named",
    [
        (lambda tmp: "model.factory=tinymod", "model.factory='tinymod'"),
        (lambda tmp: "model.factory=nosuchmod:build", "nosuchmod"),
        (lambda tmp: "model.factory=tinymod:nofn", "nofn"),
        (lambda tmp: "model.weights=gone.safetensors", "gone.safetensors"),
        (_bad_names, "bad.safetensors"),
        (_wrong_shape, "0.weight has shape [9, 6]"),
        (_missing_key, "missing keys 2.bias"),
    ],
)
def test_bad_inputs_name_the_key_or_file(tmp_path, monkeypatch, make, named):
    module_and_data(tmp_path)
    monkeypatch.chdir(tmp_path)  # where the CLI would run; the factory is imported from here
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "tinymod", raising=False)
    with pytest.raises(UserError) as err:
        harvest.run(compose_config("harvest", harvest_args(tmp_path, make(tmp_path))))
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_bad_input_exits_2_with_one_line(tmp_path):
    module_and_data(tmp_path)
    r = run_cli("harvest", harvest_args(tmp_path, _wrong_shape(tmp_path)), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "0.weight has shape [9, 6]" in lines[0], r.stderr


def test_a_transcoder_on_a_torch_module_store_is_refused_by_sae_eval(tmp_path):
    """Task scoring splices at one hook only; a transcoder there is named, not scored wrongly."""
    module_and_data(tmp_path)
    r = run_cli("harvest", harvest_args(tmp_path, "hook.names=[module:0,module:1]"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    stores = tmp_path / "runs" / "stores"
    (src,) = stores.glob("*/*/module__0__output")
    (dst,) = stores.glob("*/*/module__1__output")
    run = tmp_path / "tc"
    args = [f"store={src}", f"train.target_store={dst}", f"train.run_dir={run}", "train=tiny", "logger=none"]
    r = run_cli(
        "train", [*args, "train.val_tokens=16", "train.device=cpu", "train.eval_every=0"], cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    r = run_cli("eval", [f"sae_path={run}", "logger=none", f"paths.root={tmp_path / 'runs'}"], cwd=tmp_path)
    assert r.returncode == 2 and "transcoder on a model=torch_module store" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
