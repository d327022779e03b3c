"""Spliced metrics on a tiny random Llama, the sweep table/plots, launcher configs and the sae-eval CLI."""

from __future__ import annotations

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.evaluation.splice import SpliceEvaluator
from sae_pipeline.evaluation.sweep import collect_rows, pareto_mask, write_sweep
from sae_pipeline.model.activations import capture, splice
from sae_pipeline.model.hook_points import resolve_hook
from sae_pipeline.sae import CONFIG_CLASSES, build_sae, save_sae
from tests.helpers import compose_config, run_cli, save_tiny_model, tiny_overrides, write_corpus
from tests.support.tiny_models import D_MODEL, random_tokens, tiny_llama

HOOK = "blocks.2.hook_resid_post"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class IdentitySAE(nn.Module):
    """A perfect SAE: the latents are the input itself, the decoder returns them."""

    def __init__(self, d: int = D_MODEL):
        super().__init__()
        self.d_in = self.d_sae = d

    def encode(self, x):
        return x

    def decode(self, acts):
        return acts


class ZeroSAE(IdentitySAE):
    """Never fires and reconstructs zero."""

    def encode(self, x):
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def data():
    ids = random_tokens(batch=5, seq=12, seed=1)
    ids[:, 0] = 1  # BOS
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    mask[-1, 9:] = False  # a padded tail
    return ids, mask


def manual_ce(logits, ids, mask):
    """Cross-entropy of the prediction at t of token t+1 where t and t+1 are both valid."""
    keep = mask[:, :-1] & mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][keep], ids[:, 1:][keep]).item()


def manual_spliced_ce(model, hook, ids, mask, replace):
    def fn(x):
        out = x.clone()
        out[mask] = replace(x[mask])
        return out

    with torch.no_grad(), splice(model, hook, fn):
        logits = model(ids).logits
    return manual_ce(logits, ids, mask)


def test_clean_ce_matches_hand_computation(model, data):
    ids, mask = data
    hook = resolve_hook(model, HOOK)
    out = SpliceEvaluator(model, hook, ids, mask, 2).evaluate(IdentitySAE(), activation=False)
    with torch.no_grad():
        logits = model(ids).logits
    assert out["ce_clean"] == pytest.approx(manual_ce(logits, ids, mask), rel=1e-5)
    assert out["n_scored_positions"] == int((mask[:, :-1] & mask[:, 1:]).sum())


def test_perfect_sae_recovers_everything(model, data):
    ids, mask = data
    out = SpliceEvaluator(model, resolve_hook(model, HOOK), ids, mask, 2).evaluate(IdentitySAE())
    assert out["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert out["kl"] == pytest.approx(0.0, abs=1e-5)
    assert out["ce_increase"] == pytest.approx(0.0, abs=1e-5)
    assert out["fvu"] == pytest.approx(0.0, abs=1e-6) and out["cosine"] == pytest.approx(1.0)
    assert out["n_tokens"] == int(mask.sum())
    assert out["kl_zero"] > 0


def test_zero_sae_equals_zero_ablation(model, data):
    ids, mask = data
    out = SpliceEvaluator(model, resolve_hook(model, HOOK), ids, mask, 3).evaluate(
        ZeroSAE(), activation=False
    )
    assert out["ce_sae"] == pytest.approx(out["ce_zero"], abs=1e-6)
    assert out["loss_recovered"] == pytest.approx(0.0, abs=1e-4)
    act = SpliceEvaluator(model, resolve_hook(model, HOOK), ids, mask).evaluate(ZeroSAE())
    assert act["l0"] == 0 and act["latents"]["dead"] == D_MODEL and act["norm_ratio"] == 0


def test_mean_ablation_and_sae_splice_match_manual_splices(model, data):
    ids, mask = data
    hook = resolve_hook(model, HOOK)
    x = capture(model, ids, None, [hook])[HOOK]
    mean_D = x[mask].mean(0)
    sae = build_sae(CONFIG_CLASSES["relu"](expansion_factor=2.0, b_dec_init="zeros"), d_in=D_MODEL, seed=0)
    out = SpliceEvaluator(model, hook, ids, mask, 2).evaluate(sae, activation=False)
    expected_mean = manual_spliced_ce(model, hook, ids, mask, lambda v: mean_D.expand_as(v))
    expected_zero = manual_spliced_ce(model, hook, ids, mask, torch.zeros_like)
    with torch.no_grad():
        expected_sae = manual_spliced_ce(model, hook, ids, mask, lambda v: sae(v))
    # Tolerances from float32 error bounds, not from one machine's result. Each CE is a mean over n scored
    # tokens of a logsumexp over V logits (each logit a d-term dot product), here and by hand in batches of
    # other shapes, so in another summation order: the recursive-summation bound gamma_k = k * u (u = 2^-24)
    # over the k = n + V + d terms on a value's path bounds their relative difference (first order).
    n_scored = int((mask[:, :-1] & mask[:, 1:]).sum())
    ce_rel = (n_scored + model.config.vocab_size + D_MODEL) * 2.0**-24
    assert out["ce_mean"] == pytest.approx(expected_mean, rel=ce_rel)
    assert out["ce_zero"] == pytest.approx(expected_zero, rel=ce_rel)
    assert out["ce_sae"] == pytest.approx(expected_sae, rel=ce_rel)
    assert out["ce_clean"] == pytest.approx(
        manual_spliced_ce(model, hook, ids, mask, lambda v: v), rel=ce_rel
    )
    # Both loss-recovered scores follow their definitions from the CEs just checked. (Against the hand CEs the
    # ratio would need ce_rel times its condition number, (|a| + |s|) / |a - s| + (|a| + |c|) / |a - c|, about
    # 7000 here as the mean ablation barely moves the CE: a 1e-4 tolerance failed on another CPU.) The ratio
    # of Python floats is exact to a few float64 roundings (2^-53) times that same condition number.
    for key, ablated in (("loss_recovered", out["ce_zero"]), ("loss_recovered_mean", out["ce_mean"])):
        a, s, c = ablated, out["ce_sae"], out["ce_clean"]
        cond = (abs(a) + abs(s)) / abs(a - s) + (abs(a) + abs(c)) / abs(a - c)
        assert out[key] == pytest.approx((a - s) / (a - c), rel=4 * cond * 2.0**-53), key
    assert abs(expected_mean - expected_zero) > 1e-3  # so the two scores would tell their baselines apart


@pytest.mark.parametrize(
    "family,hook_name",
    [
        ("llama", "blocks.2.hook_resid_pre"),
        ("llama", "blocks.1.hook_mlp_out"),
        ("llama", "blocks.3.hook_resid_post"),
        ("gpt2", "blocks.2.hook_resid_post"),
        ("gpt_neox", "blocks.1.hook_attn_out"),
    ],
)
def test_prefix_replay_is_exact_and_skips_early_blocks(model, data, family, hook_name):
    from sae_pipeline.model.hook_points import find_blocks
    from tests.support.tiny_models import TINY_MODELS

    model = model if family == "llama" else TINY_MODELS[family]()
    ids, mask = data
    hook = resolve_hook(model, hook_name)
    sae = build_sae(CONFIG_CLASSES["topk"](k=4, expansion_factor=2.0), d_in=D_MODEL, seed=0)
    calls = []
    first_child = next(iter(find_blocks(model)[1][0].children()))  # runs only when block 0 computes
    handle = first_child.register_forward_hook(lambda *_: calls.append(1))
    try:
        fast = SpliceEvaluator(model, hook, ids, mask, 5, reuse_prefix=True).evaluate(sae, activation=False)
        n_fast = len(calls)
        slow = SpliceEvaluator(model, hook, ids, mask, 5, reuse_prefix=False).evaluate(sae, activation=False)
    finally:
        handle.remove()
    assert n_fast == 2  # the mean-activation capture and the clean forward; the 3 variants replay block 0
    assert len(calls) - n_fast == 5
    for key, value in slow.items():
        assert fast[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_pareto_mask_hand_example():
    # (L0, loss recovered): C is dominated by B (lower L0, higher score); D ties B's L0 with a lower score.
    l0 = [5.0, 10.0, 20.0, 10.0, 40.0, float("nan")]
    lr = [0.50, 0.80, 0.70, 0.60, 0.95, 0.99]
    assert pareto_mask(l0, lr, higher_is_better=True) == [True, True, False, False, True, False]
    fvu = [0.5, 0.2, 0.1, 0.3, 0.1, 0.0]
    # lower FVU is better: (20, 0.1) dominates (40, 0.1) on L0 with an equal score
    assert pareto_mask(l0, fvu, higher_is_better=False) == [True, True, True, False, False, False]


def _fake_metrics(arch: str, key: str, value, l0: float, lr: float, fvu: float) -> dict:
    return {
        "l0": l0,
        "loss_recovered": lr,
        "fvu": fvu,
        "ce_increase": 0.1,
        "kl": 0.05,
        "n_tokens": 100,
        "latents": {"dead_frac": 0.1, "dense_frac": 0.0},
        "sae": {"arch": arch, "d_sae": 64, "cfg": {"arch": arch, key: value}},
    }


def test_sweep_tables_and_plots(tmp_path):
    import matplotlib.image

    runs = {
        "0_sae=relu,sae.l1_coefficient=1": _fake_metrics("relu", "l1_coefficient", 1.0, 40.0, 0.95, 0.10),
        "1_sae=relu,sae.l1_coefficient=3": _fake_metrics("relu", "l1_coefficient", 3.0, 20.0, 0.85, 0.20),
        "2_sae=topk,sae.k=8": _fake_metrics("topk", "k", 8, 8.0, 0.80, 0.25),
        "3_sae=topk,sae.k=32/member": _fake_metrics("topk", "k", 32, 32.0, 0.80, 0.15),
        "4_sae=jumprelu": _fake_metrics("jumprelu", "l0_coefficient", 1.0, 10.0, 0.90, 0.18),
    }
    for name, m in runs.items():
        folder = tmp_path / name / layout.EVAL
        folder.mkdir(parents=True)
        (folder / layout.METRICS).write_text(json.dumps(m))
    assert len(collect_rows(tmp_path)) == 5
    out = write_sweep(tmp_path)
    with open(out["csv"]) as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert len(rows) == 5
    assert (
        rows["2_sae=topk,sae.k=8"]["sparsity_key"] == "k"
        and rows["2_sae=topk,sae.k=8"]["sparsity_value"] == "8"
    )
    assert rows["3_sae=topk,sae.k=32/member"]["arch"] == "topk"
    # loss recovered frontier: (8, .80), (10, .90), (40, .95); (20, .85) and (32, .80) are dominated
    front = {r for r, row in rows.items() if row["pareto_loss_recovered"] == "True"}
    assert front == {"2_sae=topk,sae.k=8", "4_sae=jumprelu", "0_sae=relu,sae.l1_coefficient=1"}
    md = out["md"].read_text()
    assert md.count("\n| ") == 6 and "l1_coefficient" in md
    for key in ("loss_plot", "fvu_plot"):
        raw = out[key].read_bytes()
        assert raw[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(out[key])
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # they are redone from the metrics files alone; a folder without any is one sentence
    assert write_sweep(tmp_path)["md"].read_text() == out["md"].read_text()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no eval/metrics.json found"):
        write_sweep(tmp_path / "empty")


def test_launcher_configs_compose():
    from hydra import compose, initialize_config_module

    from sae_pipeline.schema import register_configs

    register_configs()  # what each stage does before @hydra.main composes
    with initialize_config_module("sae_pipeline.conf", version_base="1.3"):
        for launcher, target in [
            ("local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
            ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
        ]:
            cfg = compose(
                "eval", overrides=["sae_path=x", f"hydra/launcher={launcher}"], return_hydra_config=True
            )
            assert cfg.hydra.launcher._target_ == target
    assert cfg.hydra.launcher.gpus_per_node == 1
    assert cfg.eval.n_tokens == 16384


# ----------------------------------------------------------------------------- the real CLI


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """A harvested store from a saved tiny Llama, and a multirun folder of two saved SAEs trained on it."""
    from sae_pipeline import harvest

    tmp = tmp_path_factory.mktemp("eval_cli")
    model_dir = save_tiny_model(tmp / "model", "llama")
    corpus = write_corpus(tmp / "corpus.jsonl", n_docs=8, words_per_doc=150)
    overrides = tiny_overrides(tmp, model_dir, corpus, n_tokens=300)
    (store,) = harvest.run(compose_config("harvest", overrides))
    manifest = json.loads((store / layout.MANIFEST).read_text())
    sweep = tmp / "sweep"
    for i, cfg in enumerate([CONFIG_CLASSES["relu"](expansion_factor=2.0), CONFIG_CLASSES["topk"](k=4)]):
        sae = build_sae(cfg, d_in=manifest["d_in"], seed=i)
        extra = {
            "store": str(store),
            "hook": manifest["hook"],
            "model": manifest["model"],
            "input_scale_folded": True,
        }
        save_sae(sae, sweep / f"{i}_sae={cfg.arch}" / layout.FINAL_SAE, extra)
    return tmp, store, sweep


def test_sae_eval_cli_on_a_multirun_folder(tiny_sweep):
    tmp, _store, sweep = tiny_sweep
    result = run_cli(
        "eval", [f"sae_path={sweep}", "eval.n_tokens=200", f"paths.root={tmp / 'runs'}"], cwd=tmp
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [ln for ln in result.stdout.splitlines() if "loss recovered" in ln]
    assert len(lines) == 2 and "0_sae=relu" in lines[0]
    for run in ("0_sae=relu", "1_sae=topk"):
        m = json.loads((sweep / run / layout.EVAL / layout.METRICS).read_text())
        assert m["n_tokens"] >= 200 and m["eval_data"]["source"] == "store held-out documents"
        for key in (
            "l0",
            "fvu",
            "loss_recovered",
            "ce_increase",
            "kl",
            "ce_clean",
            "ce_mean",
            "explained_variance",
        ):
            assert isinstance(m[key], float), key
        assert m["definitions"]["version"] >= 1
        assert (sweep / run / layout.EVAL / layout.DENSITY_PLOT).read_bytes()[:8] == PNG_SIGNATURE
        assert list((sweep / run / layout.EVAL).glob("wandb/offline-run-*")), "no offline W&B run folder"
    assert m["l0"] <= 4  # TopK k=4
    assert m["baseline_reused"]  # the second SAE at the same hook reused the zero/mean-ablation CE
    for name in (
        layout.SWEEP_TABLE_CSV,
        layout.SWEEP_TABLE_MD,
        layout.PARETO_LOSS_PLOT,
        layout.PARETO_FVU_PLOT,
    ):
        assert (sweep / name).is_file(), name


def test_sae_eval_errors_are_one_sentence(tiny_sweep, tmp_path):
    from sae_pipeline.errors import UserError
    from sae_pipeline.evaluate import run

    tmp, store, _ = tiny_sweep
    result = run_cli("eval", [f"sae_path={tmp / 'nope'}", "logger=none"], cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: sae_path")
    assert "Traceback" not in result.stderr

    (tmp_path / "empty").mkdir()
    cfg = compose_config("eval", [f"sae_path={tmp_path / 'empty'}", "logger=none"])
    with pytest.raises(UserError, match="no SAE found under"):
        run(cfg)

    manifest = json.loads((store / layout.MANIFEST).read_text())
    bad = tmp_path / "bad_run"
    sae = build_sae(CONFIG_CLASSES["relu"](expansion_factor=2.0), d_in=manifest["d_in"] + 3, seed=0)
    save_sae(sae, bad / layout.FINAL_SAE, {"store": str(store), "hook": manifest["hook"]})
    cfg = compose_config("eval", [f"sae_path={bad}", "logger=none", "eval.n_tokens=64"])
    with pytest.raises(UserError, match=f"d_in={manifest['d_in'] + 3}"):
        run(cfg)


def test_sae_eval_run_folder_with_a_data_override_and_skip_existing(tiny_sweep, capsys):
    from sae_pipeline.evaluate import run

    tmp, _store, sweep = tiny_sweep
    run_dir = tmp / "single_run"
    import shutil

    shutil.copytree(sweep / "1_sae=topk" / layout.FINAL_SAE, run_dir / layout.FINAL_SAE)
    (run_dir / layout.CONFIG).write_text("{}")
    data = f"{{name:json,data_files:{tmp / 'corpus.jsonl'},eval_documents:3}}"
    overrides = [
        f"sae_path={run_dir}",
        "logger=none",
        "eval.n_tokens=90",
        f"eval.data={data}",
        "eval.skip_existing=true",
    ]
    out = run(compose_config("eval", overrides))
    (m,) = out["metrics"].values()
    assert out["sweep"] is None
    assert m["eval_data"]["source"] == "eval.data override" and m["eval_data"]["data"]["eval_documents"] == 3
    assert m["n_tokens"] == 93 and m["eval_data"]["n_contexts"] == 3  # whole contexts of 31 scored tokens
    assert (run_dir / layout.EVAL / layout.METRICS).is_file()
    assert not (run_dir / layout.EVAL / "wandb").exists()
    again = run(compose_config("eval", overrides))  # same settings and weights: kept, not recomputed
    assert (
        again["metrics"] == out["metrics"] or next(iter(again["metrics"].values()))["wall_s"] == m["wall_s"]
    )
    assert "(kept)" in capsys.readouterr().out


def test_evaluator_reuses_baselines_across_saes(model, data):

    ids, mask = data
    hook = resolve_hook(model, HOOK)
    sae_a = build_sae(CONFIG_CLASSES["relu"](expansion_factor=2.0), d_in=D_MODEL, seed=0)
    sae_b = build_sae(CONFIG_CLASSES["topk"](k=3, expansion_factor=2.0), d_in=D_MODEL, seed=1)
    ev = SpliceEvaluator(model, hook, ids, mask, batch_size=5)
    ev.evaluate(sae_a)
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *_: calls.append(1))
    try:
        second = ev.evaluate(sae_b)
    finally:
        handle.remove()
    assert len(calls) == 2  # the clean and the SAE-spliced forward; zero/mean ablations were kept
    fresh = SpliceEvaluator(model, hook, ids, mask, 2).evaluate(sae_b)
    for key, value in fresh.items():
        if isinstance(value, float):
            assert second[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert second["l0"] <= 3


def test_find_targets_layouts(tmp_path):
    from sae_pipeline.errors import UserError
    from sae_pipeline.runs import find_targets

    def fake_sae(folder):
        folder.mkdir(parents=True)
        (folder / layout.CONFIG).write_text("{}")
        (folder / layout.SAE_WEIGHTS).write_bytes(b"")

    run = tmp_path / "run"
    (run / layout.FINAL_SAE).parent.mkdir(parents=True)
    (run / layout.CONFIG).write_text("{}")
    with pytest.raises(UserError, match="has no final SAE"):
        find_targets(run)
    fake_sae(run / layout.FINAL_SAE)
    (t,), many = find_targets(run)
    assert not many and t.run_dir == run and t.eval_dir == run / layout.EVAL
    (t,), _ = find_targets(run / layout.FINAL_SAE)  # the SAE folder itself
    assert t.run_dir == run
    for member in ("sweep/0_a/sae", "sweep/1_b/m0/sae", "sweep/1_b/m1/sae"):
        fake_sae(tmp_path / member)
    targets, many = find_targets(tmp_path / "sweep")
    assert many and [t.name for t in targets] == ["0_a", "1_b/m0", "1_b/m1"]
    with pytest.raises(UserError, match="does not exist"):
        find_targets(tmp_path / "missing")
