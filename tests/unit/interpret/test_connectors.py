"""Feature connectors (seeds/002): support recovery on planted data, the E2 W D1 init's algebra, the digits example."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from sae_pipeline.errors import UserError
from sae_pipeline.interpret.connectors import (
    ConnectorConfig,
    FeatureConnector,
    e2wd1_init,
    format_connections,
    train_connector,
)
from sae_pipeline.sae import ReLUConfig, build_sae
from tests.helpers import identity_sae, planted

ROOT = Path(__file__).resolve().parents[3]


def load_example():
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples/digits/digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_connector_recovers_planted_support():
    f1, f2, W_true = planted()
    cfg = ConnectorConfig(l1_coefficient=3e-3, steps=1500, lr=1e-2, prune_fraction=0.1)
    conn, metrics = train_connector(f1, f2, cfg)
    W = conn.W_IO
    strong = W.abs() >= 0.1 * W.abs().max(0).values  # per output: inputs above a tenth of its largest
    assert torch.equal(strong, W_true != 0), "the strong connections are not the planted ones"
    pos, neg = W_true > 0, W_true < 0
    assert torch.allclose(W[pos], W_true[pos], atol=0.1)  # excitatory weights, up to the L1 shrinkage
    # An inhibitory weight is seen only through rows it does not silence: any weight at least as negative as
    # the one that zeroes those rows fits equally, so the L1 term picks a smaller magnitude of the right sign.
    assert (W[neg] < 0).all() and (W[neg] >= W_true[neg] - 0.05).all()
    on = W_true != 0
    # the L1 penalty drives unused connections to (near) exactly zero, not merely small: an L2 penalty
    # leaves them ~1e-2 here, the L1 one ~1e-5
    assert W[~on].abs().max() < 1e-3
    assert metrics["fvu"] < 0.02
    assert metrics["inputs_per_output"] == pytest.approx(float(on.sum(0).float().mean()))


def test_format_connections_names_the_planted_terms():
    W = torch.zeros(4, 3)
    W[2, 0], W[3, 0] = 0.26, -0.10
    W[0, 1], W[1, 1], W[3, 1] = 0.5, 0.4, 0.3
    W[1, 2] = 0.001  # a weak output: below the median peak, never listed
    lines = format_connections(W, n_outputs=5)
    assert lines == ["OF_0 = 0.26 IF_2 - 0.10 IF_3", "OF_1 = 0.50 IF_0 + 0.40 IF_1 + 0.30 IF_3"]


def test_e2wd1_init_with_identity_saes_is_the_layer_and_keeps_the_logits():
    """With E = D = I (exact on post-ReLU activations), W2 = E2 W D1 and b2 = E2 b + e2 give ReLU(h1 W^T + b)
    exactly: the spliced classifier's logits equal the original's, so its accuracy does too."""
    digits = load_example()
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.LazyLinear(16), nn.ReLU())], nn.Linear(16, 10))
    x = torch.randn(50, 8)
    model(x)
    model.eval().requires_grad_(False)
    sae1, sae2 = identity_sae(16), identity_sae(16)
    layer = model[digits.LAYER]
    W_IO, b_O = e2wd1_init(sae1, sae2, layer.weight, layer.bias)
    assert torch.allclose(W_IO, layer.weight.t()) and torch.allclose(b_O, layer.bias)
    conn = FeatureConnector(16, 16)
    with torch.no_grad():
        conn.W_IO.copy_(W_IO)
        conn.b_O.copy_(b_O)
    y = torch.randint(0, 10, (50,))
    spliced = digits.connector_logits(model, x, sae1, sae2, conn)
    assert torch.allclose(spliced, model(x), atol=1e-5)
    assert digits.accuracy(spliced, y) == digits.accuracy(model(x), y)


def test_e2wd1_init_matches_the_formula_for_general_saes():
    """The seed's formula written out by hand, with biases, on random SAEs and layer."""
    g = torch.Generator().manual_seed(1)
    sae1 = build_sae(ReLUConfig(d_sae=12), 5, seed=2)
    sae2 = build_sae(ReLUConfig(d_sae=9), 4, seed=3)
    with torch.no_grad():
        for p in (*sae1.parameters(), *sae2.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    W, b = torch.randn(4, 5, generator=g), torch.randn(4, generator=g)
    f1 = torch.rand(7, 12, generator=g)
    # pre-activation of F2 when L2 = L1 W^T + b (inner ReLU dropped) and L1 = decode1(F1)
    l2 = sae1.decode(f1) @ W.t() + b
    expected = (l2 - sae2.b_dec_D) @ sae2.W_enc_DF + sae2.b_enc_F
    W_IO, b_O = e2wd1_init(sae1, sae2, W, b)
    assert torch.allclose(f1 @ W_IO + b_O, expected, atol=1e-4)
    with pytest.raises(UserError, match="layer weight"):
        e2wd1_init(sae1, sae2, W.t(), b)


def test_connector_config_errors_name_the_key():
    f1, f2, _ = planted(n=10)
    with pytest.raises(UserError, match="connect.init"):
        train_connector(f1, f2, ConnectorConfig(init="xavier"))
    with pytest.raises(UserError, match="e2wd1 needs"):
        train_connector(f1, f2, ConnectorConfig(init="e2wd1"))
    with pytest.raises(UserError, match="aligned"):
        train_connector(f1, f2[:5], ConnectorConfig())


def test_digits_example_quick(tmp_path):
    lines: list[str] = []
    report = load_example().run(tmp_path, quick=True, log=lines.append)
    acc = report["accuracy"]
    assert set(acc) >= {"original", "sae_h1_spliced", "sae_h2_spliced", "connector_random", "connector_e2wd1"}
    assert acc["original"] > 0.85  # even the quick MLP classifies held-out digits far above chance (0.1)
    assert acc["connector_random"] > 0.3  # the connector carries the class information through
    assert json.loads((tmp_path / "accuracy.json").read_text())["accuracy"] == acc
    # sae-eval (model=torch_module, the MLP and digits read back from files, the SAE spliced by a hook) agrees
    # with the example's own in-memory forward on the same test digits
    for h in ("h1", "h2"):
        assert report["sae"][h]["accuracy_clean"] == pytest.approx(acc["original"])
        assert report["sae"][h]["accuracy_sae"] == pytest.approx(acc[f"sae_{h}_spliced"])
    for name in ("random", "e2wd1"):
        assert (tmp_path / f"W2_{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert report["connectors"][name]["connections"]
    assert any(re.fullmatch(r"\s*OF_\d+ = -?\d\.\d\d IF_\d+( [+-] \d\.\d\d IF_\d+)*", x) for x in lines)


def test_trained_sae_recovers_planted_directions_in_raw_units(tmp_path):
    """sae-train on a store of raw activations (mean norm far from sqrt(d)): the true directions are found,
    and the saved SAE takes raw inputs (its input scale folded in), so its FVU on raw data is small."""
    from sae_pipeline.api import load_sae
    from sae_pipeline.train import run
    from tests.helpers import cfg_for
    from tests.support.synthetic import SyntheticFeatures, recovered_fraction, write_store

    gen = SyntheticFeatures(32, 16, mean_active=3.0, seed=0)
    x = gen.sample(4096) * 40.0 + 3.0  # raw units: training must scale in and fold back out
    store = write_store(tmp_path / "store", [x[:2048], x[2048:]], context_size=16)
    settings = ("sae.d_sae=64", "sae.l1_coefficient=2.0", "train.total_tokens=384000", "train.batch_size=256",
                "train.lr=3e-3", "train.advanced.buffer_rows=4096", "train.log_every=500", "train.val_every=0")  # fmt: skip
    sae = load_sae(run(cfg_for(store, tmp_path / "run", *settings)))
    assert recovered_fraction(gen.dirs_FD, sae.W_dec_FD, threshold=0.9) >= 0.75
    with torch.no_grad():
        fvu = ((sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()
        l0 = (sae.encode(x) > 0).float().sum(1).mean().item()
    assert fvu < 0.4 and l0 < 8


def test_normalize_makes_the_penalty_independent_of_feature_units():
    """F1 * a and F2 * c describe the same connections with W * c / a: trained with normalize=True (the
    default) the connector finds exactly that rescaled W, so one l1_coefficient fits any model's units."""
    f1, f2, _ = planted(n=600)
    cfg = ConnectorConfig(l1_coefficient=3e-3, steps=300, lr=1e-2)
    conn, _ = train_connector(f1, f2, cfg)
    a, c = 50.0, 0.02
    scaled, _ = train_connector(f1 * a, f2 * c, cfg)
    assert torch.allclose(scaled.W_IO, conn.W_IO * (c / a), atol=1e-3 * c / a)
    assert torch.allclose(scaled.b_O, conn.b_O * c, atol=1e-3 * c)
