"""Round trips against SAELens itself (the optional extra: pip install '.[saelens]'); skipped without it.

Export: each of our architectures is saved as our own sae/ folder, exported by the real
`sae-export ... export.format=saelens` command, and loaded by sae_lens's own `SAE.load_from_disk`;
its encode / decode / forward must give ours on random inputs. Import: SAEs built and saved by
sae_lens itself (`save_model`, and `save_inference_model` for its training SAEs, which is how its
trainer writes BatchTopK and decoder-norm-rescaled TopK SAEs) load with our `load_sae` and compute
what sae_lens computes. sae_lens's classes and methods are the ground truth here, never our formats.py.

/tmp/saelens-venv/bin/python -m pytest tests/unit/sae/test_saelens_roundtrip.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline import layout
from sae_pipeline.data.store import read_manifest
from sae_pipeline.sae import CONFIG_CLASSES, build_sae, read_sae, save_sae
from tests import helpers

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is an optional extra: pip install '.[saelens]'")

D, F_, K = 8, 16, 3
TOL = dict(rtol=1e-5, atol=1e-5)
# our arch -> the SAELens class that must load its export (BatchTopK in its inference form)
SAELENS_CLASS = {
    "relu": "StandardSAE",
    "topk": "TopKSAE",
    "batchtopk": "JumpReLUSAE",
    "jumprelu": "JumpReLUSAE",
    "gated": "GatedSAE",
}


def _x(seed: int = 7) -> torch.Tensor:
    return 2 * torch.randn(3, 5, D, generator=torch.Generator().manual_seed(seed))


def _assert_same(ours, theirs, x: torch.Tensor) -> None:
    """encode, decode and forward agree; the input leaves some latents on and some off."""
    with torch.no_grad():
        a = theirs.encode(x)
        active = (a > 0).float().mean().item()
        assert 0.05 < active < 0.95, f"uninformative input (active fraction {active:.2f})"
        torch.testing.assert_close(ours.encode(x), a, **TOL)
        torch.testing.assert_close(ours.decode(a), theirs.decode(a), **TOL)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-4)


def _our_random_sae(arch: str):
    kwargs = {"k": K} if arch in ("topk", "batchtopk") else {}
    sae = build_sae(CONFIG_CLASSES[arch](d_sae=F_, **kwargs), D, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        if arch == "jumprelu":
            sae.log_threshold_F.copy_((torch.rand(F_, generator=g) * 2 + 0.1).log())
        if arch == "batchtopk":
            sae.threshold.fill_(1.5)
    return sae.eval()


@pytest.mark.parametrize("arch", sorted(SAELENS_CLASS))
def test_sae_export_folder_loads_in_sae_lens(arch, tmp_path):
    ours = _our_random_sae(arch)
    save_sae(ours, tmp_path / "sae")
    out = tmp_path / "exported"
    res = helpers.run_cli(
        "export",
        [
            f"sae_path={tmp_path / 'sae'}",
            "export.format=saelens",
            f"export.out={out}",
            "export.model_name=gpt2",
        ],
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu")
    assert type(theirs).__name__ == SAELENS_CLASS[arch]
    assert (theirs.cfg.d_in, theirs.cfg.d_sae) == (D, F_)
    assert theirs.cfg.metadata.model_name == "gpt2"
    if arch == "topk":
        assert theirs.cfg.k == K
    _assert_same(ours, theirs.eval(), _x())


def test_export_of_a_run_carries_model_hook_and_context_into_sae_lens(tmp_path):
    """A trained run (tiny model + store): sae_lens reads the hook, model and context size we wrote, and
    its SAE encodes and reconstructs the stored activations as ours does."""
    run_dir = helpers.make_sae_run(tmp_path)
    out = tmp_path / "exported"
    res = helpers.run_cli("export", [f"sae_path={run_dir}", f"export.out={out}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    theirs = sae_lens.SAE.load_from_disk(str(out), device="cpu").eval()
    store = Path(json.loads((run_dir / layout.CONFIG).read_text())["store"])
    meta = theirs.cfg.metadata
    assert (meta.hook_name, meta.model_name) == ("blocks.1.hook_resid_post", str(tmp_path / "model"))
    assert meta.context_size == read_manifest(store)["context_size"]
    x = load_file(str(store / layout.shard_name(0)))["activations"].float()[:64]  # the SAE's own inputs
    _assert_same(read_sae(run_dir).eval(), theirs, x)


# ----------------------------------------------------------------------------- SAELens -> us


def _randomise(sae, seed: int) -> None:
    """Every parameter random (decoder rows of unequal norms), thresholds positive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g))
            if name == "threshold":
                p.copy_(torch.rand(p.shape, generator=g) * 2 + 0.1)
        sae.W_dec.mul_(torch.rand(F_, 1, generator=g) * 3 + 0.2)


def _inference(name: str, **cfg):
    config_cls = getattr(sae_lens, f"{name}Config")
    return getattr(sae_lens, name)(config_cls(d_in=D, d_sae=F_, **cfg))


SAVED_BY_SAELENS = {  # what sae_lens builds and saves, the way a sae_lens user would
    "standard": lambda: _inference("StandardSAE"),
    "standard-no-b_dec-on-input": lambda: _inference("StandardSAE", apply_b_dec_to_input=False),
    "topk": lambda: _inference("TopKSAE", k=K),
    "topk-rescaled-by-decoder-norm": lambda: _inference("TopKSAE", k=K, rescale_acts_by_decoder_norm=True),
    "jumprelu": lambda: _inference("JumpReLUSAE"),
    "gated": lambda: _inference("GatedSAE"),
}
TRAINED_BY_SAELENS = {  # training SAEs, written in their inference form as sae_lens's trainer does
    "batchtopk": lambda: sae_lens.BatchTopKTrainingSAE(
        sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=F_, k=K)
    ),
    "topk-training": lambda: sae_lens.TopKTrainingSAE(sae_lens.TopKTrainingSAEConfig(d_in=D, d_sae=F_, k=K)),
}


@pytest.mark.parametrize("name", sorted(SAVED_BY_SAELENS))
def test_sae_saved_by_sae_lens_loads_with_load_sae(name, tmp_path):
    theirs = SAVED_BY_SAELENS[name]()
    _randomise(theirs, seed=3)
    theirs.save_model(tmp_path / name)
    ours = read_sae(tmp_path / name).eval()
    _assert_same(ours, theirs.eval(), _x())
    reloaded = sae_lens.SAE.load_from_disk(str(tmp_path / name), device="cpu").eval()
    _assert_same(ours, reloaded, _x(seed=8))


@pytest.mark.parametrize("name", sorted(TRAINED_BY_SAELENS))
def test_sae_lens_training_sae_inference_form_loads_with_load_sae(name, tmp_path):
    trained = TRAINED_BY_SAELENS[name]()
    _randomise(trained, seed=4)
    if name == "batchtopk":
        trained.topk_threshold = torch.tensor(0.8, dtype=torch.double)
    trained.save_inference_model(tmp_path / name)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / name), device="cpu").eval()
    ours = read_sae(tmp_path / name).eval()
    _assert_same(ours, theirs, _x())
