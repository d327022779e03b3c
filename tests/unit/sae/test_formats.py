"""SAELens format both ways and bare safetensors files, checked against SAELens's documented forward pass.

`saelens_encode` / `saelens_decode` below implement SAELens's inference maths from its format (cfg.json
fields + the named tensors), independently of our SAE classes; every export and import must compute the
same function on random inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.sae import CONFIG_CLASSES, build_sae, read_sae, save_sae, write_saelens
from sae_pipeline.sae.formats import saelens_config
from tests import helpers

D, F_ = 6, 10
FIXTURES = Path(__file__).parent / "fixtures"
META = {"model_name": "gpt2", "hook_name": "blocks.3.hook_resid_post", "context_size": 128,
        "dataset_path": "Skylion007/openwebtext", "prepend_bos": True}  # fmt: skip


# ----------------------------------------------------------------------------- SAELens's maths, from the spec


def saelens_encode(cfg: dict, t: dict, x: torch.Tensor) -> torch.Tensor:
    sae_in = x - t["b_dec"] * float(cfg.get("apply_b_dec_to_input", True))
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (sae_in @ t["W_enc"] + t["b_gate"]) > 0
        return gate * torch.relu(sae_in @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    h = sae_in @ t["W_enc"] + t["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):  # sae_lens 6.x TopK: pre-activations times |W_dec rows|
        h = h * t["W_dec"].norm(dim=-1)
    if arch == "jumprelu":
        return torch.relu(h) * (h > t["threshold"])
    act = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
    if arch == "topk" or act == "topk":
        k = cfg.get("k") or cfg["activation_fn_kwargs"]["k"]
        top = h.topk(k, dim=-1)
        return torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
    return torch.relu(h)


def saelens_decode(cfg: dict, t: dict, a: torch.Tensor) -> torch.Tensor:
    if cfg.get("finetuning_scaling_factor"):
        a = a * t["finetuning_scaling_factor"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        a = a / t["W_dec"].norm(dim=-1)
    return a @ t["W_dec"] + t["b_dec"]


def random_sae(arch: str, seed: int = 0):
    """An SAE of `arch` whose every parameter is random, so each one matters to the function."""
    kwargs = {"k": 3} if arch in ("topk", "batchtopk") else {}
    sae = build_sae(CONFIG_CLASSES[arch](d_sae=F_, **kwargs), D, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.randn(D, F_, generator=g))
        sae.W_dec_FD.copy_(torch.randn(F_, D, generator=g))
        sae.b_enc_F.copy_(torch.randn(F_, generator=g))
        sae.b_dec_D.copy_(torch.randn(D, generator=g))
        if arch == "jumprelu":
            sae.log_threshold_F.copy_((torch.rand(F_, generator=g) * 2 + 0.1).log())
        if arch == "gated":
            sae.r_mag_F.copy_(torch.randn(F_, generator=g) * 0.5)
            sae.b_mag_F.copy_(torch.randn(F_, generator=g))
        if arch == "batchtopk":
            sae.threshold.fill_(1.5)
    return sae.eval()


def x_input(seed: int = 5) -> torch.Tensor:
    return torch.randn(4, 7, D, generator=torch.Generator().manual_seed(seed)) * 2


def read_folder(folder: Path) -> tuple[dict, dict]:
    cfg = json.loads((folder / "cfg.json").read_text())
    return cfg, load_file(str(folder / "sae_weights.safetensors"))


def assert_same_function(sae, cfg: dict, t: dict) -> None:
    x = x_input()
    with torch.no_grad():
        ref_a = saelens_encode(cfg, t, x)
        ours_a = sae.encode(x)
        active = (ref_a > 0).float().mean().item()
        assert 0.02 < active < 0.98, f"test input not informative (active fraction {active})"
        torch.testing.assert_close(ours_a, ref_a, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), saelens_decode(cfg, t, ref_a), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------- export


EXPECTED_TENSORS = {  # SAELens's parameter names and shapes for each exported architecture
    "relu": {"W_enc": (D, F_), "b_enc": (F_,), "W_dec": (F_, D), "b_dec": (D,)},
    "topk": {"W_enc": (D, F_), "b_enc": (F_,), "W_dec": (F_, D), "b_dec": (D,)},
    "batchtopk": {"W_enc": (D, F_), "b_enc": (F_,), "W_dec": (F_, D), "b_dec": (D,), "threshold": (F_,)},
    "jumprelu": {"W_enc": (D, F_), "b_enc": (F_,), "W_dec": (F_, D), "b_dec": (D,), "threshold": (F_,)},
    "gated": {
        "W_enc": (D, F_),
        "b_gate": (F_,),
        "r_mag": (F_,),
        "b_mag": (F_,),
        "W_dec": (F_, D),
        "b_dec": (D,),
    },
}
EXPECTED_ARCH = {
    "relu": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "jumprelu": "jumprelu",
    "gated": "gated",
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_TENSORS))
def test_export_computes_saelens_function(arch, tmp_path):
    sae = random_sae(arch)
    write_saelens(sae, tmp_path / "out", META)
    cfg, t = read_folder(tmp_path / "out")
    assert cfg["architecture"] == EXPECTED_ARCH[arch]
    assert (cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"], cfg["normalize_activations"]) == (
        D, F_, True, "none",
    )  # fmt: skip
    assert {k: tuple(v.shape) for k, v in t.items()} == EXPECTED_TENSORS[arch]
    assert all(v.dtype == torch.float32 for v in t.values())
    assert_same_function(sae, cfg, t)


def test_batchtopk_exports_its_threshold_uniformly(tmp_path):
    sae = random_sae("batchtopk")
    write_saelens(sae, tmp_path / "out", META)
    _, t = read_folder(tmp_path / "out")
    assert torch.equal(t["threshold"], torch.full((F_,), 1.5))


def test_writer_matches_fixture_from_the_format_spec():
    expected = json.loads((FIXTURES / "saelens_topk_cfg.json").read_text())
    assert saelens_config(random_sae("topk"), META) == expected


# ----------------------------------------------------------------------------- import


def write_folder(folder: Path, cfg: dict, tensors: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def random_tensors(names_shapes: dict, seed: int = 3) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g) * (0.5 if k == "r_mag" else 1.0) for k, s in names_shapes.items()}


V5_BASE = {"d_in": D, "d_sae": F_, "dtype": "float32", "device": "cpu", "model_name": "gpt2-small",
           "hook_name": "blocks.8.hook_resid_pre", "hook_layer": 8, "hook_head_index": None,
           "activation_fn_kwargs": {}, "finetuning_scaling_factor": False, "context_size": 128,
           "prepend_bos": True, "dataset_path": "Skylion007/openwebtext", "dataset_trust_remote_code": True,
           "normalize_activations": "none", "sae_lens_training_version": "5.1.0"}  # fmt: skip

HAND_BUILT = {
    # name: (cfg.json overrides, tensors); v5 flat configs and one v6 config with nested metadata
    "standard_v5": ({"architecture": "standard", "activation_fn_str": "relu", "apply_b_dec_to_input": True},
                    EXPECTED_TENSORS["relu"]),
    "standard_no_b_dec_in": ({"architecture": "standard", "activation_fn_str": "relu", "apply_b_dec_to_input": False},
                             EXPECTED_TENSORS["relu"]),
    "topk_as_standard_activation": ({"architecture": "standard", "activation_fn_str": "topk",
                                     "activation_fn_kwargs": {"k": 4}, "apply_b_dec_to_input": True},
                                    EXPECTED_TENSORS["relu"]),
    "jumprelu_no_b_dec_in": ({"architecture": "jumprelu", "activation_fn_str": "relu", "apply_b_dec_to_input": False},
                             EXPECTED_TENSORS["jumprelu"]),
    "gated_no_b_dec_in": ({"architecture": "gated", "activation_fn_str": "relu", "apply_b_dec_to_input": False},
                          EXPECTED_TENSORS["gated"]),
    "standard_finetuning_scale": ({"architecture": "standard", "activation_fn_str": "relu", "apply_b_dec_to_input": True,
                                   "finetuning_scaling_factor": True},
                                  {**EXPECTED_TENSORS["relu"], "finetuning_scaling_factor": (F_,)}),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HAND_BUILT))
def test_import_hand_built_saelens_folder(name, tmp_path):
    overrides, shapes = HAND_BUILT[name]
    cfg = {**V5_BASE, **overrides}
    t = random_tensors(shapes)
    if "threshold" in t:  # some thresholds <= 0 (SAELens's ReLU makes them act as 0), most positive
        t["threshold"] = torch.linspace(-0.5, 2.0, F_)
    folder = write_folder(tmp_path / name, cfg, t)
    sae = read_sae(folder).eval()
    assert (sae.d_in, sae.d_sae) == (D, F_)
    assert_same_function(sae, cfg, t)


def test_import_saelens_6_config(tmp_path):
    cfg = {"architecture": "topk", "d_in": D, "d_sae": F_, "dtype": "float32", "device": "cpu", "k": 2,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": "gpt2", "hook_name": "blocks.2.hook_resid_post", "sae_lens_version": "6.5.0"}}  # fmt: skip
    t = random_tensors(EXPECTED_TENSORS["topk"])
    sae = read_sae(write_folder(tmp_path / "v6", cfg, t)).eval()
    assert sae.cfg.arch == "topk" and sae.cfg.k == 2
    assert_same_function(sae, cfg, t)


def test_import_saelens_6_topk_rescaled_by_decoder_norm(tmp_path):
    cfg = {"architecture": "topk", "d_in": D, "d_sae": F_, "k": 3, "rescale_acts_by_decoder_norm": True,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": {"hook_name": "blocks.2.hook_resid_post"}}  # fmt: skip
    t = random_tensors(EXPECTED_TENSORS["topk"])
    t["W_dec"] = t["W_dec"] * torch.linspace(0.2, 3.0, F_).unsqueeze(-1)  # unequal decoder norms matter
    sae = read_sae(write_folder(tmp_path / "v6", cfg, t)).eval()
    assert_same_function(sae, cfg, t)
    bad = write_folder(
        tmp_path / "gated", {**cfg, "architecture": "gated"}, random_tensors(EXPECTED_TENSORS["gated"])
    )
    with pytest.raises(UserError, match="rescale_acts_by_decoder_norm is only supported for topk"):
        read_sae(bad)


@pytest.mark.parametrize("arch", sorted(EXPECTED_TENSORS))
def test_export_then_import_round_trip(arch, tmp_path):
    sae = random_sae(arch)
    write_saelens(sae, tmp_path / "out", META)
    back = read_sae(tmp_path / "out").eval()
    assert back.cfg.arch == ("jumprelu" if arch == "batchtopk" else arch)
    x = x_input(9)
    with torch.no_grad():
        torch.testing.assert_close(back.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-4)


def test_bare_safetensors_file(tmp_path):
    t = random_tensors(EXPECTED_TENSORS["relu"])
    save_file(t, str(tmp_path / "relu.safetensors"))
    assert_same_function(read_sae(tmp_path / "relu.safetensors").eval(), {"architecture": "standard"}, t)
    t["threshold"] = torch.linspace(0.0, 1.5, F_)
    save_file(t, str(tmp_path / "jump.safetensors"))
    sae = read_sae(tmp_path / "jump.safetensors").eval()
    assert sae.cfg.arch == "jumprelu"
    assert_same_function(sae, {"architecture": "jumprelu"}, t)
    del t["threshold"]
    save_file(t, str(tmp_path / "gemma_scope_style.safetensors"))  # x @ W_enc + b_enc, b_dec only added back
    sae = read_sae(tmp_path / "gemma_scope_style.safetensors", apply_b_dec_to_input=False).eval()
    assert_same_function(sae, {"architecture": "standard", "apply_b_dec_to_input": False}, t)
    sae = read_sae(tmp_path / "gemma_scope_style.safetensors", k=2).eval()
    assert_same_function(sae, {"architecture": "topk", "k": 2}, t)


def test_load_sae_takes_run_folder_sae_folder_and_weights_file(tmp_path):
    sae = random_sae("gated")
    save_sae(sae, tmp_path / "run" / "sae", extra={})
    x = x_input()
    for p in (tmp_path / "run", tmp_path / "run" / "sae", tmp_path / "run" / "sae" / "sae.safetensors"):
        with torch.no_grad():
            assert torch.equal(read_sae(p).eval()(x), sae(x)), p


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architecture": "matryoshka_batchtopk"}, "architecture 'matryoshka_batchtopk'"),
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"activation_fn_str": "tanh-relu"}, "activation_fn 'tanh-relu'"),
        ({"hook_head_index": 3}, "hook_z"),
        ({"d_sae": F_ + 1}, "d_sae=11"),
    ],
)
def test_unsupported_saelens_folders_are_user_errors(change, match, tmp_path):
    cfg = {
        **V5_BASE,
        "architecture": "standard",
        "activation_fn_str": "relu",
        "apply_b_dec_to_input": True,
        **change,
    }
    folder = write_folder(tmp_path / "x", cfg, random_tensors(EXPECTED_TENSORS["relu"]))
    with pytest.raises(UserError, match=match):
        read_sae(folder)


def test_bad_tensors_are_user_errors_naming_the_file(tmp_path):
    t = random_tensors(EXPECTED_TENSORS["relu"])
    save_file({**t, "b_enc": torch.zeros(F_ + 1)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(UserError, match=r"shape.safetensors: tensor b_enc has shape \[11\]"):
        read_sae(tmp_path / "shape.safetensors")
    del t["b_dec"]
    save_file(t, str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserError, match=r"missing.safetensors lacks tensors \['b_dec'\]"):
        read_sae(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------- the command and SAELens itself


def test_sae_export_cli(tmp_path):
    run_dir = helpers.make_sae_run(tmp_path)
    out = tmp_path / "exported"
    res = helpers.run_cli("export", [f"sae_path={run_dir}", f"export.out={out}"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    cfg, t = read_folder(out)
    store = Path(json.loads((run_dir / "config.json").read_text())["store"])
    manifest = json.loads((store / layout.MANIFEST).read_text())
    assert cfg["model_name"] == str(tmp_path / "model") and cfg["hook_name"] == "blocks.1.hook_resid_post"
    assert (cfg["hook_layer"], cfg["context_size"]) == (1, manifest["context_size"])
    assert cfg["dataset_path"] == str(tmp_path / "corpus.jsonl") and cfg["architecture"] == "standard"
    ours = read_sae(run_dir).eval()
    x = load_file(str(store / layout.shard_name(0)))["activations"].float()[:64]  # the SAE's own inputs
    with torch.no_grad():
        acts = saelens_encode(cfg, t, x)
        assert 0 < (acts > 0).float().mean() < 1
        torch.testing.assert_close(acts, ours.encode(x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(saelens_decode(cfg, t, acts), ours(x), rtol=1e-5, atol=1e-4)
    again = helpers.run_cli("export", [f"sae_path={run_dir}", f"export.out={out}"], cwd=tmp_path)
    assert again.returncode == 2 and "export.overwrite=true" in again.stderr


def test_round_trip_through_sae_lens_itself(tmp_path):
    sae_lens = pytest.importorskip(
        "sae_lens", reason="sae-lens is an optional extra: pip install '.[saelens]'"
    )
    for arch in sorted(EXPECTED_TENSORS):
        ours = random_sae(arch)
        write_saelens(ours, tmp_path / arch, META)
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch), device="cpu")
        x = x_input()
        with torch.no_grad():
            torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-4)
        theirs.save_model(str(tmp_path / f"{arch}-saved"))
        back = read_sae(tmp_path / f"{arch}-saved").eval()
        with torch.no_grad():
            torch.testing.assert_close(back(x), ours(x), rtol=1e-5, atol=1e-4)
