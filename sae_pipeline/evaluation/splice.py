"""Score an SAE inside its model: activation-level metrics and spliced next-token metrics.

    ev = SpliceEvaluator(model, hook, input_ids_NT, loss_mask_NT)   # many SAEs, same tokens:
    ev.evaluate(sae_a); ev.evaluate(sae_b)                           #   baselines measured once
    ev.evaluate(sae, activation=False)                               # spliced metrics only

Only valid positions (loss_mask True: not BOS, not padding) are measured *and* replaced: BOS and
padding keep their clean activations in every variant, since the SAE never saw them in training.
The prediction at position t of token t+1 is scored when t and t+1 are both valid. A masked LM is
scored on a fixed, seeded set of masked valid tokens instead (`masked.py`).

Efficiency: the clean forward records the outputs of every decoder block before the hook's block;
the zero / mean / SAE forwards replay those outputs instead of recomputing them (exact, since a
block's output depends only on earlier blocks), so each variant pays only for the layers after
the hook. The SAE's input at the hook is the same in every variant, so it is encoded once per batch,
and the activation metrics come from the clean forward.

Transcoders (`SpliceEvaluator(..., source_hook=input hook)`, `hook` the target): the clean forward
records both hooks' activations; the transcoder's output from the input hook's replaces the target
hook's, and FVU/MSE compare it with the target's clean activations. The ablation baselines are those
of the target hook.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sae_pipeline.errors import UserError
from sae_pipeline.evaluation import metrics as M
from sae_pipeline.evaluation.masked import is_masked_lm, mask_tokens, masked_logprobs
from sae_pipeline.model.activations import capture, splice
from sae_pipeline.model.hook_points import HookPoint, find_blocks
from sae_pipeline.progress import progress
from sae_pipeline.runtime import model_device

VARIANTS = ("zero", "mean", "sae")


# ----------------------------------------------------------------------------- helpers


def _batches(input_ids_NT: Tensor, loss_mask_NT: Tensor, batch_size: int, device) -> Iterator:
    if input_ids_NT.shape != loss_mask_NT.shape:
        raise UserError(
            f"input_ids {tuple(input_ids_NT.shape)} and loss_mask {tuple(loss_mask_NT.shape)} differ in shape."
        )
    for i in range(0, input_ids_NT.shape[0], batch_size):
        yield (
            input_ids_NT[i : i + batch_size].to(device),
            loss_mask_NT[i : i + batch_size].to(device=device, dtype=torch.bool),
        )


def reconstruct(sae, x_ND: Tensor) -> tuple[Tensor, Tensor]:
    """(x_hat, latent activations) of raw activations, through encode/decode (and a skip transcoder's skip)."""
    acts_NF = sae.encode(x_ND)
    decode_from = getattr(sae, "decode_from", None)
    return (sae.decode(acts_NF) if decode_from is None else decode_from(acts_NF, x_ND)), acts_NF


def check_d_in(sae, x_BTD: Tensor, hook: HookPoint) -> None:
    d_in = getattr(sae, "d_in", None)
    if d_in is not None and d_in != x_BTD.shape[-1]:
        raise UserError(
            f"the SAE has d_in={d_in} but hook {hook.name!r} produces activations of size "
            f"{x_BTD.shape[-1]} (shape {tuple(x_BTD.shape)})."
        )


def _sae_param(sae):
    params = list(sae.parameters()) if isinstance(sae, nn.Module) else []
    return params[0] if params else None


def _prepare_sae(sae, device):
    if isinstance(sae, nn.Module):
        sae.eval()
        p = _sae_param(sae)
        if p is not None and p.device != device:
            sae.to(device)
    return sae


def _replace_valid(mask_BT: Tensor, new_of_valid: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A splice function replacing the activation at valid positions by new_of_valid(x_ND)."""

    def fn(x_BTD: Tensor) -> Tensor:
        out = x_BTD.clone()
        out[mask_BT] = new_of_valid(x_BTD[mask_BT]).to(out.dtype)
        return out

    return fn


# ----------------------------------------------------------------------------- prefix replay


class PrefixReplay:
    """Record the outputs of the decoder blocks before the hook's block once; replay them after.

    Disabled (a no-op) for hooks outside the decoder blocks (layer None) or at layer 0.
    """

    def __init__(self, model: nn.Module, hook: HookPoint, enabled: bool = True) -> None:
        self.blocks: list[nn.Module] = []
        if enabled and hook.layer is not None and hook.layer > 0:
            try:
                blocks_path, blocks = find_blocks(model)
            except UserError:
                blocks = None
            inside = blocks is not None and (
                hook.module_path == f"{blocks_path}.{hook.layer}"
                or hook.module_path.startswith(f"{blocks_path}.{hook.layer}.")
            )
            if inside:
                self.blocks = list(blocks)[: hook.layer]
        self.outputs: list = []

    @contextmanager
    def record(self) -> Iterator[None]:
        self.outputs = [None] * len(self.blocks)

        def make(i: int):
            def post(_mod, _args, out):
                self.outputs[i] = out

            return post

        handles = [b.register_forward_hook(make(i)) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replay(self) -> Iterator[None]:
        if any(o is None for o in self.outputs):
            raise RuntimeError("PrefixReplay.replay() before a complete record()")
        for block, out in zip(self.blocks, self.outputs, strict=True):
            block.forward = lambda *_a, _out=out, **_k: _out  # instance attribute shadows the method
        try:
            yield
        finally:
            for block in self.blocks:
                del block.forward


# ----------------------------------------------------------------------------- spliced metrics


def _scored_logprobs(logits_BTV: Tensor, ids_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
    sel = M.scored_positions(mask_BT)
    return torch.log_softmax(logits_BTV[:, :-1][sel].float(), dim=-1), ids_BT[:, 1:][sel]


def _forward_logits(model, ids_BT) -> Tensor:
    return model(input_ids=ids_BT, use_cache=False).logits


def mean_activation(model, hook: HookPoint, input_ids_NT, loss_mask_NT, batch_size: int = 8) -> Tensor:
    """Mean hook activation over the valid positions (the mean-ablation value; cache it across calls)."""
    device = model_device(model)
    moments = M._Moments()
    with torch.inference_mode():
        for ids_BT, mask_BT in _batches(input_ids_NT, loss_mask_NT, batch_size, device):
            moments.update(capture(model, ids_BT, None, [hook], early_exit=True)[hook.name][mask_BT])
    if moments.mean_D is None:
        raise UserError("the evaluation text has no valid token (every loss_mask position is False).")
    return moments.mean_D.float().to(device)


class SpliceEvaluator:
    """Scores SAEs at one hook on fixed tokens, computing the SAE-independent baselines only once.

    The first `evaluate` runs clean, zero-ablated, mean-ablated and SAE-spliced forwards; later calls
    (other SAEs of a sweep, later training steps) reuse ce_zero / ce_mean / kl_zero / kl_mean and run
    only the clean forward (for the KL reference and the activations) and the SAE-spliced one.
    """

    def __init__(
        self,
        model,
        hook: HookPoint,
        input_ids_NT: Tensor,
        loss_mask_NT: Tensor,
        batch_size: int = 8,
        reuse_prefix: bool = True,
        mean_act_D: Tensor | None = None,
        source_hook: HookPoint | None = None,
    ) -> None:
        self.model, self.hook = model, hook
        self.source = source_hook  # a transcoder's input hook (`hook` is its target), else None
        self.input_ids_NT, self.loss_mask_NT, self.batch_size = input_ids_NT, loss_mask_NT, batch_size
        self.target_ids_NT, self.score_NT = input_ids_NT, None  # masked LM: original ids, masked positions
        if is_masked_lm(model):
            self.input_ids_NT, self.score_NT = mask_tokens(model, input_ids_NT, loss_mask_NT)
        self.replay = PrefixReplay(model, hook, enabled=reuse_prefix)
        self.mean_act_D = mean_act_D
        self.baseline: dict | None = None  # ce_zero, ce_mean, kl_zero, kl_mean once measured

    def _scored(self, logits_BTV: Tensor, b: int, ids_BT: Tensor, mask_BT: Tensor) -> tuple[Tensor, Tensor]:
        if self.score_NT is None:
            return _scored_logprobs(logits_BTV, ids_BT, mask_BT)
        rows = slice(b * self.batch_size, (b + 1) * self.batch_size)
        return masked_logprobs(logits_BTV, self.target_ids_NT[rows], self.score_NT[rows])

    def evaluate(self, sae, activation: bool = True) -> dict:
        """Spliced metrics (and, with `activation`, the activation metrics) of one SAE."""
        model, hook = self.model, self.hook
        device = model_device(model)
        sae = _prepare_sae(sae, device)
        p = _sae_param(sae)
        sae_dtype = torch.float32 if p is None else p.dtype
        if self.mean_act_D is None:
            self.mean_act_D = mean_activation(
                model, hook, self.input_ids_NT, self.loss_mask_NT, self.batch_size
            )
        mean_act_D = self.mean_act_D.to(device)
        variants = ("sae",) if self.baseline is not None else VARIANTS
        replacements = {
            "zero": lambda x_ND: torch.zeros_like(x_ND),
            "mean": lambda x_ND: mean_act_D.to(x_ND.dtype).expand_as(x_ND),
        }
        ce_sum = dict.fromkeys(("clean", *variants), 0.0)
        kl_sum = dict.fromkeys(variants, 0.0)
        n_scored = 0
        stats: M.ActivationStats | None = None
        seen: list[Tensor] = []

        def record_x(x_BTD: Tensor) -> Tensor:
            seen.append(x_BTD)
            return x_BTD

        source_seen: list[Tensor] = []

        def record_source(x_BTD: Tensor) -> Tensor:
            source_seen.append(x_BTD)
            return x_BTD

        bar = progress(int(self.loss_mask_NT.sum()), "eval")
        with torch.inference_mode():
            batches = _batches(self.input_ids_NT, self.loss_mask_NT, self.batch_size, device)
            for b, (ids_BT, mask_BT) in enumerate(batches):
                bar.update(int(mask_BT.sum()))
                seen.clear()
                source_seen.clear()
                with (
                    self.replay.record(),
                    splice(model, hook, record_x),
                    splice(model, self.source or hook, record_source),
                ):
                    logits = _forward_logits(model, ids_BT)
                x_BTD = source_seen[0]  # the SAE's input: the hook's own, or a transcoder's input hook's
                check_d_in(sae, x_BTD, self.source or hook)
                # The hook's input is the same in every variant (same prefix), so x_hat is computed once.
                x_ND, ref_ND = x_BTD[mask_BT], seen[0][mask_BT]
                x_hat_ND, acts_NF = reconstruct(sae, x_ND.to(sae_dtype))
                if x_hat_ND.shape != ref_ND.shape:
                    raise UserError(
                        f"the SAE outputs rows of size {x_hat_ND.shape[-1]} but hook {hook.name!r} has "
                        f"activations of size {ref_ND.shape[-1]}."
                    )
                if activation:
                    if stats is None:
                        stats = M.ActivationStats(acts_NF.shape[-1])
                    stats.update(ref_ND.float(), x_hat_ND.float(), acts_NF)
                replacements["sae"] = lambda x_ND, _x_hat=x_hat_ND: _x_hat
                logp_clean, targets = self._scored(logits, b, ids_BT, mask_BT)
                del logits
                n_scored += targets.numel()
                if targets.numel() == 0:
                    continue
                ce_sum["clean"] += -logp_clean.gather(1, targets[:, None]).double().sum().item()
                for name in variants:
                    with (
                        self.replay.replay(),
                        splice(model, hook, _replace_valid(mask_BT, replacements[name])),
                    ):
                        logits = _forward_logits(model, ids_BT)
                    logp, _ = self._scored(logits, b, ids_BT, mask_BT)
                    del logits
                    ce_sum[name] += -logp.gather(1, targets[:, None]).double().sum().item()
                    kl_sum[name] += M.kl_divergence(logp_clean, logp).double().sum().item()
                self.replay.outputs = []
        bar.close()
        if n_scored == 0:
            raise UserError("the evaluation text has no scored position (no two consecutive valid tokens).")

        ce = {k: v / n_scored for k, v in ce_sum.items()}
        kl = {k: v / n_scored for k, v in kl_sum.items()}
        if self.baseline is None:
            self.baseline = {
                "ce_zero": ce["zero"],
                "ce_mean": ce["mean"],
                "kl_zero": kl["zero"],
                "kl_mean": kl["mean"],
            }
        b = self.baseline
        out = stats.compute() if stats is not None else {}
        out.update(
            n_scored_positions=n_scored,
            ce_clean=ce["clean"],
            ce_zero=b["ce_zero"],
            ce_mean=b["ce_mean"],
            ce_sae=ce["sae"],
            loss_recovered=M.loss_recovered(ce["clean"], ce["sae"], b["ce_zero"]),
            loss_recovered_mean=M.loss_recovered(ce["clean"], ce["sae"], b["ce_mean"]),
            ce_increase=ce["sae"] - ce["clean"],
            kl=kl["sae"],
            kl_zero=b["kl_zero"],
            kl_mean=b["kl_mean"],
        )
        return out
