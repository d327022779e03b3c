"""Feature connectors on an MLP digit classifier (seeds/002 on scikit-learn's 8x8 digits instead of MNIST).

    make example-digits                       # or: python examples/digits/digits.py --out runs/digits

1. Train an MLP 64 -> 64 -> 64 -> 64 -> 10 (three ReLU hidden layers) on load_digits (no download).
2. Record two consecutive hidden layers L1 = h1, L2 = h2 = ReLU(L1 W^T + b) and train a ReLU SAE on each
   (sae_pipeline's ReLUSAE through training.in_memory.fit_sae): F_i = E_i(L_i), L_i ~ D_i(F_i).
3. Train the seed's connector F2 ~ ReLU(W2 F1 + b2) with an L1 penalty on W2 (interpret.connectors), once from
   a random init and once from the seed's W2 = E2 W D1, b2 = E2 b + e2.
4. Report test accuracy with the neuron layer replaced: h2 := D2(connector(E1(h1))), next to the original
   accuracy and to each SAE spliced alone; print the sparsest strong connections as the seed does and write a
   picture of W2. Everything lands in --out (accuracy.json, W2_random.png, W2_e2wd1.png).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sae_pipeline.interpret.connectors import (
    ConnectorConfig,
    connector_metrics,
    e2wd1_init,
    format_connections,
    plot_connector,
    train_connector,
)
from sae_pipeline.sae import ReLUConfig
from sae_pipeline.training.in_memory import fit_sae

HIDDEN = 64
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
    layers: list[nn.Module] = []
    d = x.shape[1]
    for _ in range(3):
        layers += [nn.Linear(d, HIDDEN), nn.ReLU()]
        d = HIDDEN
    model = nn.Sequential(*layers, nn.Linear(d, 10))
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


def run(out: Path, quick: bool = False, seed: int = 0, log=print) -> dict:
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    x_tr, y_tr, x_te, y_te = load_data(seed)
    model = train_mlp(x_tr, y_tr, epochs=10 if quick else 40, seed=seed)
    h1_tr, h2_tr = hidden(model, x_tr, H1), hidden(model, x_tr, H2)
    sae_steps = 200 if quick else 1200
    sae_cfg = dict(expansion_factor=4.0, l1_coefficient=1.0, sparsity_penalty="l1_decoder_norm")
    sae1, m1 = fit_sae(h1_tr, ReLUConfig(**sae_cfg), steps=sae_steps, lr=3e-3, seed=seed)
    sae2, m2 = fit_sae(h2_tr, ReLUConfig(**sae_cfg), steps=sae_steps, lr=3e-3, seed=seed + 1)
    log(f"SAE on h1: d_sae {sae1.d_sae}, L0 {m1['l0']:.1f}, FVU {m1['fvu']:.3f}")
    log(f"SAE on h2: d_sae {sae2.d_sae}, L0 {m2['l0']:.1f}, FVU {m2['fvu']:.3f}")

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
    report = {"accuracy": table, "sae": {"h1": m1, "h2": m2}, "connectors": results, "seconds": seconds}
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
