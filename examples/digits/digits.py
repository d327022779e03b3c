"""Feature connectors on an MLP digit classifier (seeds/002 on scikit-learn's 8x8 digits instead of MNIST).

    make example-digits                       # or: python examples/digits/digits.py --out runs/digits

1. Train an MLP 64 -> 64 -> 64 -> 64 -> 10 (three ReLU hidden layers, examples/digits/mlp.py:build) on
   load_digits (no download); save it (mlp.safetensors) and the data (train/test.safetensors: inputs, labels).
2. Through the pipeline's own stages (their `run` functions, what the sae-* commands call):
   sae-harvest model=torch_module data=tensors captures two consecutive hidden layers L1 = h1 (module:1) and
   L2 = h2 = ReLU(L1 W^T + b) (module:3), one store row per training digit; sae-train trains a ReLU SAE on each
   (F_i = E_i(L_i), L_i ~ D_i(F_i)); sae-eval splices each into the MLP on the test digits and reports
   L0, FVU, cross-entropy loss recovered and accuracy (runs/sae_h1/eval/metrics.json, ...).
3. Train the seed's connector F2 ~ ReLU(W2 F1 + b2) with an L1 penalty on W2 (interpret.connectors), once from
   a random init and once from the seed's W2 = E2 W D1, b2 = E2 b + e2.
4. Report test accuracy with the neuron layer replaced: h2 := D2(connector(E1(h1))), next to the original
   accuracy and to each SAE spliced alone; print the sparsest strong connections as the seed does and write a
   picture of W2. Everything lands in --out (accuracy.json, W2_random.png, W2_e2wd1.png, runs/).

The same steps by hand, from the repository root after one run of this script (OUT=runs/digits):
    sae-harvest paths.root=$OUT/runs model=torch_module model.factory=examples.digits.mlp:build \
        model.weights=$OUT/mlp.safetensors data=tensors data.path=$OUT/train.safetensors \
        data.eval_path=$OUT/test.safetensors 'hook.names=[module:1,module:3]'
    sae-train store=$OUT/runs/stores/<model id>/<data id>/module__1__output sae=relu train.val_tokens=64 ...
    sae-eval sae_path=<that run folder>
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from sae_pipeline import evaluate as sae_eval
from sae_pipeline import harvest, train
from sae_pipeline.interpret.connectors import (
    ConnectorConfig,
    connector_metrics,
    e2wd1_init,
    format_connections,
    plot_connector,
    train_connector,
)
from sae_pipeline.sae import read_sae
from sae_pipeline.schema import compose

REPO = Path(__file__).resolve().parents[2]


def _load_mlp():
    """examples/digits/mlp.py (the factory sae-harvest imports as examples.digits.mlp:build), whoever runs us."""
    spec = importlib.util.spec_from_file_location("digits_mlp", Path(__file__).with_name("mlp.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_mlp().build
# module indices in the Sequential: Linear 0, ReLU 1 (h1), Linear 2, ReLU 3 (h2), Linear 4, ReLU 5 (h3), Linear 6
H1, LAYER, H2 = 1, 2, 3


def load_data(seed: int):
    """(x_train, y_train, x_test, y_test): pixels scaled to [0, 1], a stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=0.2, random_state=seed, stratify=y)
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return f(x_tr), torch.tensor(y_tr), f(x_te), torch.tensor(y_te)


def train_mlp(x, y, epochs: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = build(d_in=x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval().requires_grad_(False)


def run_from(model: nn.Sequential, h, start: int, replace: dict | None = None):
    """Run modules start.. on h; replace[i](h) rewrites the output of module i."""
    replace = replace or {}
    for i in range(start, len(model)):
        h = model[i](h)
        if i in replace:
            h = replace[i](h)
    return h


def accuracy(logits, y) -> float:
    return float((logits.argmax(1) == y).float().mean())


def hidden(model, x, index: int):
    return model[: index + 1](x)


def connector_logits(model, x, sae1, sae2, conn):
    """The neuron layer h1 -> h2 replaced by encode -> connector -> decode."""
    h2_hat = sae2.decode(conn(sae1.encode(hidden(model, x, H1))))
    return run_from(model, h2_hat, H2 + 1)


def pipeline(out: Path, model, x_tr, y_tr, x_te, y_te, steps: int, seed: int) -> dict[str, Path]:
    """Save the MLP and the digits as files, then sae-harvest -> sae-train -> sae-eval on h1 and h2 through
    the stages' run functions; returns {"h1": run folder, "h2": run folder}."""
    save_file(model.state_dict(), str(out / "mlp.safetensors"))
    save_file({"inputs": x_tr, "labels": y_tr}, str(out / "train.safetensors"))
    save_file({"inputs": x_te, "labels": y_te}, str(out / "test.safetensors"))
    root = out / "runs"
    common = [f"paths.root={root}"]
    stores = harvest.run(
        compose(
            "harvest",
            common
            + [
                "model=torch_module",
                "model.factory=examples.digits.mlp:build",
                f"model.factory_path={REPO}",
                f"model.weights={out / 'mlp.safetensors'}",
                "data=tensors",
                f"data.path={out / 'train.safetensors'}",
                f"data.eval_path={out / 'test.safetensors'}",
                f"hook.names=[module:{H1},module:{H2}]",
                "harvest.batch_size=512",
                "harvest.device=cpu",
                "harvest.overwrite=true",
            ],
        )
    )
    runs = {}
    for i, (h, store) in enumerate(zip(("h1", "h2"), stores, strict=True)):
        run_dir = root / f"sae_{h}"
        train_args = [
            f"store={store}",
            f"train.run_dir={run_dir}",
            "train.overwrite=true",
            "sae=relu",
            "sae.expansion_factor=4",
            "sae.l1_coefficient=1.0",
            "sae.sparsity_penalty=l1_decoder_norm",
            f"train.total_tokens={steps * 256}",
            "train.batch_size=256",
            "train.advanced.buffer_rows=2048",
            "train.advanced.chunk_rows=256",
            "train.lr=3e-3",
            "train.lr_warmup_steps=0",
            "train.sparsity_warmup_steps=0",
            "train.max_grad_norm=0",
            "train.val_tokens=0",
            "train.val_every=0",
            "train.eval_every=0",
            "train.checkpoint_every_tokens=0",
            "train.log_every=100",
            f"train.seed={seed + i}",
            "train.device=cpu",
            "logger=none",
        ]
        with contextlib.redirect_stdout(io.StringIO()) as printed:  # a line per pass over the 1437 digits
            runs[h] = train.run(compose("train", common + train_args))
        print(f"sae-train {h}: {printed.getvalue().strip().splitlines()[-2]} ({runs[h]}/train_log.jsonl)")
        eval_args = [f"sae_path={runs[h]}", "eval.device=cpu", "eval.batch_size=512", "logger=none"]
        sae_eval.run(compose("eval", common + eval_args))
    return runs


def run(out: Path, quick: bool = False, seed: int = 0, log=print) -> dict:
    """The whole example at one thread (tiny matrices), the caller's thread count restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run(out, quick, seed, log)
    finally:
        torch.set_num_threads(threads)


def _run(out: Path, quick: bool, seed: int, log) -> dict:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_data(seed)
    model = train_mlp(x_tr, y_tr, epochs=10 if quick else 40, seed=seed)
    h1_tr, h2_tr = hidden(model, x_tr, H1), hidden(model, x_tr, H2)
    runs = pipeline(out, model, x_tr, y_tr, x_te, y_te, steps=200 if quick else 800, seed=seed)
    sae1, sae2 = (read_sae(runs[h] / "sae").eval().requires_grad_(False) for h in ("h1", "h2"))
    m1, m2 = (json.loads((runs[h] / "eval" / "metrics.json").read_text()) for h in ("h1", "h2"))
    for h, m in (("h1", m1), ("h2", m2)):
        log(
            f"SAE on {h} (sae-eval, test digits): L0 {m['l0']:.1f}, FVU {m['fvu']:.3f}, loss recovered "
            f"{m['loss_recovered']:.3f}, accuracy {100 * m['accuracy_clean']:.1f}% -> {100 * m['accuracy_sae']:.1f}%"
        )

    f1_tr, f2_tr = sae1.encode(h1_tr), sae2.encode(h2_tr)
    f1_te, f2_te = sae1.encode(hidden(model, x_te, H1)), sae2.encode(hidden(model, x_te, H2))
    layer = model[LAYER]
    table = {
        "original": accuracy(model(x_te), y_te),
        "sae_h1_spliced": accuracy(run_from(model, x_te, 0, {H1: sae1}), y_te),
        "sae_h2_spliced": accuracy(run_from(model, x_te, 0, {H2: sae2}), y_te),
        "both_saes_spliced": accuracy(run_from(model, x_te, 0, {H1: sae1, H2: sae2}), y_te),
    }
    init = e2wd1_init(sae1, sae2, layer.weight, layer.bias)
    init_only = ConnectorConfig(init="e2wd1", steps=1, lr=1e-12)
    conn0, _ = train_connector(f1_tr, f2_tr, init_only, init=init)
    table["connector_e2wd1_untrained"] = accuracy(connector_logits(model, x_te, sae1, sae2, conn0), y_te)
    alive_O = (f2_tr > 0).any(0)
    results = {}
    for name in ("random", "e2wd1"):
        cfg = ConnectorConfig(
            init=name,
            l1_coefficient=3e-4,
            steps=200 if quick else 1200,
            lr=5e-3,
            seed=seed,
            batch_size=256,
        )
        conn, train_metrics = train_connector(f1_tr, f2_tr, cfg, init=init)
        test_metrics = connector_metrics(conn, f1_te, f2_te, cfg.prune_fraction)
        table[f"connector_{name}"] = accuracy(connector_logits(model, x_te, sae1, sae2, conn), y_te)
        results[name] = {"train": train_metrics, "test": test_metrics}
        plot_connector(conn.W_IO, out / f"W2_{name}.png", title=f"W2 ({name} init), digits MLP h1 -> h2")
        lines = format_connections(conn.W_IO, n_outputs=6, alive_O=alive_O)
        results[name]["connections"] = lines
        log(
            f"\nconnector ({name} init): test FVU of F2 {test_metrics['fvu']:.3f}, "
            f"{test_metrics['inputs_per_output']:.1f} strong inputs per output "
            f"(density {test_metrics['density_W']:.3f})"
        )
        for line in lines:
            log("  " + line)
    seconds = time.perf_counter() - t0
    log("\ntest accuracy (360 held-out digits)")
    for key, value in table.items():
        log(f"  {key:28s} {100 * value:5.1f}%")
    log(f"({seconds:.1f} s)")
    keys = ("l0", "fvu", "loss_recovered", "accuracy_clean", "accuracy_sae", "accuracy_zero", "accuracy_mean")
    sae = {h: {k: m[k] for k in keys} | {"run": str(runs[h])} for h, m in (("h1", m1), ("h2", m2))}
    report = {"accuracy": table, "sae": sae, "connectors": results, "seconds": seconds}
    (out / "accuracy.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/digits"))
    p.add_argument("--quick", action="store_true", help="fewer steps (the test's reduced version)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run(args.out, quick=args.quick, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
