"""bfloat16 autocast for every architecture: float32 master weights, float32 gradients and Adam state.

Each architecture takes a few optimizer steps under `torch.autocast(device, dtype=torch.bfloat16)` on tiny
shapes (CPU autocast stands in for CUDA's; on a CUDA machine the same tests also run on the GPU:
`pytest tests/unit/sae/test_autocast.py` there), and the result is compared with the same steps in float32.

Tolerances come from bf16's 8-bit significand: rounding to nearest has relative error <= u = 2**-8 (0.39%).
Autocast rounds the inputs of every matmul to bf16 and returns bf16 products (accumulated in float32), so
one training step passes a value through about 4 roundings (encoder forward, its output, decoder forward,
the backward product), each <= u. The reconstruction gradient is the residual x_hat - x, which is smaller
than x_hat, so x_hat's rounding error is amplified by |x_hat| / |x_hat - x| (about 3-5 on these untrained
SAEs): 4 roundings x 5 ~ 20u. We allow RTOL = 24u = 9.4% on the norm of each parameter's gradient (measured
worst: 6.9%, TopK's b_dec; a top-k tie that rounding flips is inside this too). After STEPS Adam steps an
update has magnitude ~lr whatever the gradient's scale, so weights are compared by their update
dW = W_after - W_before: ||dW_bf16 - dW_fp32|| / ||dW_fp32|| <= RTOL (measured worst: 7.2%, TopK's W_dec).
JumpReLU's threshold gradient counts pre-activations inside a 0.001-wide window, which any 1e-4 weight
difference changes by whole entries, so after several steps it is compared only for being finite; its
first-step gradient must match (the encoder runs in float32 for that reason, see sae/jumprelu.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from sae_pipeline.sae import ARCHITECTURES, CONFIG_CLASSES, build_sae
from tests.support.synthetic import SyntheticFeatures

U = 2.0**-8  # unit roundoff of bfloat16
RTOL = 24 * U
STEPS, LR = 8, 1e-3
D_IN, D_SAE, BATCH = 16, 64, 128
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")),
]


@pytest.fixture(autouse=True)
def strict_float32_reference():
    """The float32 reference must be float32: the trainer turns TF32 on for CUDA, so restore it after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def make_sae(arch: str, device: str):
    kw = {"k": 4} if arch in ("topk", "batchtopk") else {}
    sae = build_sae(CONFIG_CLASSES[arch](d_sae=D_SAE, **kw), D_IN, seed=0)
    return sae.to(device)


def batches(device: str, n: int = STEPS) -> list[torch.Tensor]:
    """Sparse sums of random directions, scaled to mean norm ~sqrt(D_IN) like the trainer's inputs."""
    gen = SyntheticFeatures(n_features=4 * D_IN, d=D_IN, mean_active=3.0, seed=1)
    torch.manual_seed(2)
    x_ND = gen.sample(n * BATCH) * 2.5 + 0.2
    return [b.to(device) for b in x_ND.split(BATCH)]


def amp(device: str, on: bool):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=on)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def train_steps(sae, xs, device: str, bf16: bool):
    dead_F = torch.zeros(D_SAE, dtype=torch.bool, device=device)
    dead_F[::3] = True  # exercise AuxK
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    for x_BD in xs:
        with amp(device, bf16):
            out = sae.training_forward(x_BD, dead_mask_F=dead_F)
        assert torch.isfinite(out.loss), out.loss
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        for name, p in sae.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, (name, p.grad)
        sae.before_optimizer_step()
        opt.step()
        sae.after_optimizer_step()
    return opt


def start(arch: str, device: str):
    xs = batches(device)
    sae = make_sae(arch, device)
    sae.init_from_data(xs[0])
    return sae, xs


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_first_step_gradients_are_float32_and_close_to_float32(arch, device):
    sae, xs = start(arch, device)
    dead_F = torch.zeros(D_SAE, dtype=torch.bool, device=device)
    dead_F[::3] = True
    grads = []
    for bf16 in (False, True):
        s = copy.deepcopy(sae)
        with amp(device, bf16):
            out = s.training_forward(xs[0], dead_mask_F=dead_F)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        grads.append({n: p.grad for n, p in s.named_parameters()})
    for name, g32 in grads[0].items():
        g16 = grads[1][name]
        assert g16.dtype == torch.float32, name
        assert rel(g16, g32) <= RTOL, (name, rel(g16, g32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adam_steps_keep_float32_state_and_track_float32(arch, device):
    sae, xs = start(arch, device)
    runs = {}
    for bf16 in (False, True):
        s = copy.deepcopy(sae)
        opt = train_steps(s, xs, device, bf16)
        runs[bf16] = s
        for name, p in s.named_parameters():
            assert p.dtype == torch.float32 and torch.isfinite(p).all(), name
            for key, v in opt.state[p].items():
                assert v.dtype == torch.float32, (name, key)
    before = dict(sae.named_parameters())
    for (name, p32), (_, p16) in zip(
        runs[False].named_parameters(), runs[True].named_parameters(), strict=True
    ):
        if name == "log_threshold_F":
            continue  # see the module docstring; its first-step gradient is compared above
        d32, d16 = (p32 - before[name]).detach(), (p16 - before[name]).detach()
        assert rel(d16, d32) <= RTOL, (name, rel(d16, d32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_encode_decode_forward_and_save_under_autocast(arch, device, tmp_path):
    from sae_pipeline.sae import read_sae, save_sae

    sae, xs = start(arch, device)
    train_steps(sae, xs[:2], device, True)
    x_BD = xs[-1]
    with torch.no_grad():
        ref_BF, ref_BD = sae.encode(x_BD), sae(x_BD)
        with amp(device, True):
            acts_BF = sae.encode(x_BD)
            dec_BD = sae.decode(acts_BF)
            fwd_BD = sae(x_BD)
    for got, want in ((acts_BF, ref_BF), (dec_BD, ref_BD), (fwd_BD, ref_BD)):
        assert got.shape == want.shape and torch.isfinite(got).all()
        assert rel(got, want) <= RTOL, rel(got, want)
    save_sae(sae, tmp_path / "sae")
    loaded = read_sae(tmp_path / "sae")
    for name, t in loaded.state_dict().items():
        assert t.dtype == sae.state_dict()[name].dtype, name
        assert torch.equal(t, sae.state_dict()[name].cpu()), name
    assert all(p.dtype == torch.float32 for p in loaded.parameters())


# ---- through the trainer (train.autocast=bf16 turns CPU autocast on) ----------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from tests.helpers import make_store

    return make_store(tmp_path_factory.mktemp("store") / "s", n_contexts=64, d_in=16, tag_rows=False)


def train_run(store, run_dir, *overrides):
    from sae_pipeline.schema import compose
    from sae_pipeline.train import run

    cfg = compose(
        "train", [f"store={store}", f"train.run_dir={run_dir}", "train=tiny", "logger=none", *overrides]
    )
    return run(cfg)


def final(run_dir):
    from safetensors.torch import load_file

    from sae_pipeline import layout

    return load_file(str(run_dir / layout.FINAL_SAE / layout.SAE_WEIGHTS))


def last_val(run_dir) -> dict:
    import json

    from sae_pipeline import layout

    log = [json.loads(ln) for ln in (run_dir / layout.TRAIN_LOG).read_text().splitlines()]
    return [ln for ln in log if "val/fvu" in ln][-1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_trainer_bf16_switch_trains_float32_weights_to_the_float32_quality(store, tmp_path, arch, device):
    from safetensors.torch import load_file

    from sae_pipeline import layout
    from sae_pipeline.training import checkpoint

    where = f"train.device={device}"
    off = train_run(store, tmp_path / "off", f"sae={arch}", where, "train.autocast=off")
    on = train_run(store, tmp_path / "bf16", f"sae={arch}", where, "train.autocast=bf16")
    w_off, w_on = final(off), final(on)
    assert w_on.keys() == w_off.keys()
    for name, t in w_on.items():
        assert t.dtype == w_off[name].dtype and torch.isfinite(t.float()).all(), name
    assert any(not torch.equal(w_on[k], w_off[k]) for k in w_on), "train.autocast=bf16 changed nothing"
    state = load_file(str(checkpoint.latest(on) / layout.TRAIN_STATE))
    adam = {k: v.dtype for k, v in state.items() if k.startswith("opt.")}
    assert any(k.endswith("exp_avg_sq") for k in adam) and set(adam.values()) == {torch.float32}, adam
    fvu_off, fvu_on = last_val(off)["val/fvu"], last_val(on)["val/fvu"]
    assert fvu_off < 1.0 and abs(fvu_on - fvu_off) <= RTOL * fvu_off, (fvu_on, fvu_off)


def test_auto_is_off_on_the_cpu_and_a_bad_value_is_one_sentence(store, tmp_path):
    from sae_pipeline.errors import UserError

    auto = train_run(store, tmp_path / "auto", "sae=topk")  # train.autocast defaults to auto
    off = train_run(store, tmp_path / "off", "sae=topk", "train.autocast=off")
    for name, t in final(auto).items():
        assert torch.equal(t, final(off)[name]), name
    with pytest.raises(UserError, match="train.autocast"):
        train_run(store, tmp_path / "bad", "sae=topk", "train.autocast=fp8")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("arch", ["topk", "jumprelu"])
def test_bf16_store_trains_through_the_cli(tmp_path, arch):
    from tests.helpers import make_store, run_cli

    st16 = make_store(tmp_path / "s16", n_contexts=64, d_in=16, tag_rows=False, dtype=torch.bfloat16)
    st32 = make_store(tmp_path / "s32", n_contexts=64, d_in=16, tag_rows=False)
    runs = {}
    for name, st in (("s16", st16), ("s32", st32)):
        runs[name] = tmp_path / f"run-{name}"
        args = [f"store={st}", f"train.run_dir={runs[name]}", "train=tiny", "logger=none", f"sae={arch}"]
        res = run_cli("train", [*args, "train.autocast=bf16"], cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
    assert all(t.dtype != torch.bfloat16 for t in final(runs["s16"]).values())
    # the bf16 store holds the float32 store's rows rounded to bf16 (relative error <= u each)
    fvu16, fvu32 = last_val(runs["s16"])["val/fvu"], last_val(runs["s32"])["val/fvu"]
    assert fvu32 < 1.0 and abs(fvu16 - fvu32) <= RTOL * fvu32, (fvu16, fvu32)
