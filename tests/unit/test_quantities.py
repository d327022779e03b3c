"""Quantities a hand-mutation campaign found unchecked (issue 19, part 4), each checked against its definition.

Every test here was seen to fail with its bug put back by hand: the KL direction of the splice scorer,
BOS rows counted by the splice scorer's activation metrics, a transcoder's target shards read unverified, probe max-pooling
over masked positions, dead-latent resampling in proportion to |error|, a shard path that leaves its store,
TopK without its ReLU, a doubled input scale or a wrong target scale in training.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from sae_pipeline import layout
from sae_pipeline.data.paired import PairedReader
from sae_pipeline.data.store import ActivationStore, read_manifest
from sae_pipeline.errors import UserError
from sae_pipeline.evaluation.splice import SpliceEvaluator
from sae_pipeline.integrity.manifest import write_manifest
from sae_pipeline.interpret.probing import sequence_features
from sae_pipeline.model.activations import capture, splice
from sae_pipeline.model.hook_points import resolve_hook
from sae_pipeline.sae import CONFIG_CLASSES, build_sae
from sae_pipeline.train import run
from sae_pipeline.training.member import Member
from sae_pipeline.training.resample import resample_dead
from tests.helpers import cfg_for, make_store
from tests.support.synthetic import write_store
from tests.support.tiny_models import D_MODEL, random_tokens, tiny_llama

HOOK = "blocks.2.hook_resid_post"
PLANTED = {"name": "planted", "id": "planted"}  # the model of both stores of one "harvest"


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def peaked_model():
    """A tiny Llama whose LM head is 40 times larger: peaked next-token distributions, so that the two
    directions of KL differ (a random tiny model's near-uniform ones give nearly symmetric KLs)."""
    m = tiny_llama()
    with torch.no_grad():
        m.lm_head.weight.mul_(40.0)
    return m


@pytest.fixture(scope="module")
def data():
    ids = random_tokens(batch=4, seq=12, seed=1)
    ids[:, 0] = 1  # BOS
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    mask[-1, 9:] = False  # a padded tail
    return ids, mask


def random_relu(seed: int = 0):
    return build_sae(
        CONFIG_CLASSES["relu"](expansion_factor=2.0, b_dec_init="zeros"), d_in=D_MODEL, seed=seed
    )


# ---- evaluation ------------------------------------------------------------------------------------
def test_splice_kl_is_kl_of_the_clean_distribution_from_the_spliced_one(peaked_model, data):
    """kl = mean over scored positions of sum_v p_clean(v) (log p_clean(v) - log p_sae(v)), by hand from two
    forwards (clean, and the SAE spliced in at valid positions); the reverse direction differs here by far more
    than float32 rounding of the log-probabilities (~1e-6 relative) could explain."""
    ids, mask = data
    model = peaked_model
    hook, sae = resolve_hook(model, HOOK), random_relu()

    def replace(x):
        out = x.clone()
        out[mask] = sae(x[mask])
        return out

    keep = mask[:, :-1] & mask[:, 1:]
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[:, :-1][keep].double(), -1)
        with splice(model, hook, replace):
            logq = F.log_softmax(model(ids).logits[:, :-1][keep].double(), -1)
    forward = float((logp.exp() * (logp - logq)).sum(-1).mean())
    reverse = float((logq.exp() * (logq - logp)).sum(-1).mean())
    assert abs(forward - reverse) > 0.05 * forward > 0
    out = SpliceEvaluator(model, hook, ids, mask, 3).evaluate(sae, activation=False)
    assert out["kl"] == pytest.approx(forward, rel=1e-3)


def test_activation_metrics_count_only_valid_rows(model, data):
    """BOS and padding rows are neither counted nor measured: n_tokens, L0 and MSE over the valid rows by hand."""
    ids, mask = data
    hook, sae = resolve_hook(model, HOOK), random_relu()
    with torch.no_grad():
        x_ND = capture(model, ids, None, [hook])[HOOK][mask]
        acts_NF, x_hat_ND = sae.encode(x_ND), sae(x_ND)
    out = SpliceEvaluator(model, hook, ids, mask, 3).evaluate(sae)
    assert out["n_tokens"] == int(mask.sum()) < mask.numel()
    assert out["l0"] == pytest.approx(float((acts_NF > 0).sum(1).double().mean()), rel=1e-6)
    assert out["mse_per_token"] == pytest.approx(
        float((x_hat_ND - x_ND).double().pow(2).sum(1).mean()), rel=1e-4
    )


def test_probe_max_pooling_ignores_bos_and_padding():
    """The largest values of every context sit at its BOS and padding positions; max-pooling must take the
    maximum over the valid positions only (dense activations and SAE latents), by hand per context."""
    g = torch.Generator().manual_seed(0)
    acts_NTD = torch.randn(3, 6, D_MODEL, generator=g)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[:, 0] = False
    valid[1, 4:] = False
    acts_NTD[~valid] = 100.0
    sae = random_relu()
    got = sequence_features(acts_NTD, valid, sae)["max"]
    with torch.no_grad():
        want_dense = torch.stack([acts_NTD[n][valid[n]].amax(0) for n in range(3)])
        want_lat = torch.stack([sae.encode(acts_NTD[n][valid[n]]).amax(0) for n in range(3)])
    torch.testing.assert_close(got[0], want_dense)
    torch.testing.assert_close(got[1], want_lat, rtol=1e-5, atol=1e-6)


# ---- training ----------------------------------------------------------------------------------------
def test_resampling_draws_rows_in_proportion_to_the_square_of_their_squared_error():
    """A ReLU SAE with every weight zero reconstructs 0, so row i's squared error is ||x_i||^2 = i + 1 for
    x_i = sqrt(i + 1) e_i, and each of 6000 dead latents gets the direction of the row it drew: row i must be
    drawn with probability (i + 1)^2 / 14. The counts are fixed by the seed; the bound is 5 binomial standard
    deviations (|error| or squared error weights give 1/6 or 1/(1 + sqrt 2 + sqrt 3) for row 0, > 10 sd away)."""
    n = 6000
    sae = build_sae(CONFIG_CLASSES["relu"](d_sae=n), d_in=3, seed=0)
    with torch.no_grad():
        for p in sae.parameters():
            p.zero_()
    x = torch.diag(torch.tensor([1.0, 2.0, 3.0]).sqrt())
    opt = torch.optim.Adam(sae.parameters())
    resample_dead(sae, opt, x, torch.ones(n, dtype=torch.bool), seed=0)
    drawn = sae.W_dec_FD.abs().argmax(1)
    assert torch.allclose(sae.W_dec_FD.abs().amax(1), torch.ones(n))  # one unit direction e_i each
    counts = torch.bincount(drawn, minlength=3).double()
    p = torch.tensor([1.0, 4.0, 9.0], dtype=torch.float64) / 14
    sd = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() <= 5 * sd).all(), counts


def test_topk_activations_are_never_negative_when_fewer_than_k_preactivations_are_positive():
    """k = 6 of 8 latents with only 2 positive pre-activations per row: the 4 other kept latents are 0, not
    their negative pre-activations. By hand: pre = (x - b_dec) W_enc + b_enc, keep the 6 largest, ReLU."""
    sae = build_sae(CONFIG_CLASSES["topk"](d_sae=8, k=6), d_in=4, seed=0)
    with torch.no_grad():
        sae.b_enc_F.copy_(torch.tensor([20.0, 20.0] + [-20.0] * 6))
        sae.b_dec_D.normal_(generator=torch.Generator().manual_seed(1))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pre = (x - sae.b_dec_D) @ sae.W_enc_DF + sae.b_enc_F
        top = pre.topk(6, dim=1)
        want = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        assert int((want > 0).sum()) == 10 and bool((top.values < 0).any())
        torch.testing.assert_close(sae.encode(x), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae(x), want @ sae.W_dec_FD + sae.b_dec_D, rtol=1e-5, atol=1e-5)
        out = sae.training_forward(x)
        torch.testing.assert_close(out.x_hat_BD, want @ sae.W_dec_FD + sae.b_dec_D, rtol=1e-5, atol=1e-5)


def _rows_of_norm(n: int, d: int, norm: float, seed: int) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=1, keepdim=True) * norm


@pytest.mark.parametrize("transcoder", [False, True])
def test_training_sees_inputs_and_targets_at_mean_norm_sqrt_d(tmp_path, monkeypatch, transcoder):
    """Every row of a store has norm 5 (and every target row norm 0.25), so the scale that gives a mean norm of
    sqrt(d) is sqrt(d) / 5 (and sqrt(d_out) / 0.25): each row the SAE is trained on must have exactly that norm
    (to float32 rounding), and config.json must record those factors."""
    d_in, d_out = 16, 8
    a = write_store(tmp_path / "a", _rows_of_norm(1024, d_in, 5.0, 0).split(256), 16, model=PLANTED, seed=1)
    extra = []
    if transcoder:
        b = write_store(
            tmp_path / "b", _rows_of_norm(1024, d_out, 0.25, 1).split(256), 16, model=PLANTED, seed=1
        )
        extra = [f"train.target_store={b}", "sae=topk", "sae.k=4", "sae.d_sae=32"]
    seen = {"x": [], "y": []}
    original = Member.train_step

    def spy(self, x_BD, *args, **kwargs):
        sae_forward = self.sae.training_forward

        def record(xs_BD, **kw):
            seen["x"].append(xs_BD.detach().norm(dim=1))
            if kw.get("target_BD") is not None:
                seen["y"].append(kw["target_BD"].detach().norm(dim=1))
            return sae_forward(xs_BD, **kw)

        self.sae.training_forward = record
        try:
            return original(self, x_BD, *args, **kwargs)
        finally:
            del self.sae.training_forward

    monkeypatch.setattr(Member, "train_step", spy)
    run(cfg_for(a, tmp_path / "run", "train=tiny", "train.total_tokens=1024", *extra))
    record = json.loads((tmp_path / "run" / layout.CONFIG).read_text())
    assert record["input_scale"] == pytest.approx(math.sqrt(d_in) / 5.0, rel=1e-5)
    torch.testing.assert_close(torch.cat(seen["x"]), torch.full((1024,), math.sqrt(d_in)), rtol=1e-5, atol=0)
    if transcoder:
        assert record["target_scale"] == pytest.approx(math.sqrt(d_out) / 0.25, rel=1e-5)
        want = torch.full((1024,), math.sqrt(d_out))
        torch.testing.assert_close(torch.cat(seen["y"]), want, rtol=1e-5, atol=0)


# ---- stores --------------------------------------------------------------------------------------------
def test_transcoder_target_shards_are_checksum_verified(tmp_path):
    """A damaged target shard (its activation bytes changed, header intact) is named, never trained on."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 6, generator=g)
    a = write_store(tmp_path / "a", x.split(256), 16, model=PLANTED, seed=1)
    b = write_store(tmp_path / "b", (x[:, :3] * 2).split(256), 16, model=PLANTED, seed=1)
    shard = b / layout.shard_name(2)
    raw = bytearray(shard.read_bytes())
    raw[-40] ^= 0xFF  # inside the last tensor's data
    shard.write_bytes(bytes(raw))
    reader = PairedReader(ActivationStore(a), ActivationStore(b), 32, seed=0, buffer_rows=128, chunk_rows=32)
    with pytest.raises(UserError, match=rf"{shard}"):
        for _ in range(2 * reader.epoch_rows // 32):
            reader.next_batch()
    reader.close()


@pytest.mark.parametrize("where", ["../elsewhere.safetensors", "ABSOLUTE"])
def test_a_shard_path_outside_the_store_is_refused(tmp_path, where):
    """A manifest (sealed again after the edit) whose shard file lies outside the store folder is refused by
    name, although that outside file is an intact copy of the shard with the recorded checksum."""
    folder = make_store(tmp_path / "stores" / "s")
    outside = tmp_path / "stores" / "elsewhere.safetensors"
    shutil.copy(folder / layout.shard_name(0), outside)
    manifest = read_manifest(folder)
    manifest["shards"][0]["file"] = str(outside) if where == "ABSOLUTE" else where
    write_manifest(folder, manifest)
    with pytest.raises(UserError, match=r"shard 0 .*outside the store folder"):
        ActivationStore(folder)
