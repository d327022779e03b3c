"""Scoring an SAE inside a plain `torch.nn.Module` (model=torch_module) on held-out examples, by the task's loss.

    ev = TaskEvaluator(model, hook, examples, batch_size=256)
    m = ev.evaluate(sae)     # L0, FVU, ... and the task loss clean / zero- / mean-ablated / SAE-spliced

The module's output on each example is compared in four forwards: clean, the hook's activation replaced
by zeros, by its mean over the examples, and by the SAE's reconstruction (the activation [B, ...] is
flattened to the SAE's rows [B, D] and back). The task loss is
  - with labels: cross-entropy of the output logits [B, C] against the labels (`ce_*`), and accuracy;
  - without: the squared error of the output against the clean output, summed over its elements and
    averaged over examples (`output_mse`; 0 for the clean forward).
loss recovered = (loss_zero - loss_sae) / (loss_zero - loss_clean), as for language models; `kl` is
KL(softmax(clean) || softmax(spliced)) over the last dimension of the output. Same interface as
splice.SpliceEvaluator (`hook`, `baseline`, `evaluate`), so sae-eval's report code serves both.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sae_pipeline.data.tensors import Examples
from sae_pipeline.errors import UserError
from sae_pipeline.evaluation import metrics as M
from sae_pipeline.model.activations import splice
from sae_pipeline.model.hook_points import HookPoint
from sae_pipeline.runtime import model_device

VARIANTS = ("zero", "mean", "sae")


class TaskEvaluator:
    """Scores SAEs at one hook of a torch module on fixed examples; the ablation baselines are measured once."""

    def __init__(self, model: nn.Module, hook: HookPoint, examples: Examples, batch_size: int = 256) -> None:
        self.model, self.hook, self.examples = model, hook, examples
        self.batch_size = max(1, int(batch_size))
        self.baseline: dict | None = None
        self.mean_act_D: Tensor | None = None
        self.source = None  # no transcoders here (the SpliceEvaluator's input hook)

    def _batches(self):
        ex, device = self.examples, model_device(self.model)
        for i in range(0, ex.inputs.shape[0], self.batch_size):
            y = None if ex.labels is None else ex.labels[i : i + self.batch_size].to(device)
            yield ex.inputs[i : i + self.batch_size].to(device), y

    def _forward(self, x_B: Tensor, replace=None) -> tuple[Tensor, Tensor]:
        """(output, the hook's activation as rows [B, D]); `replace(rows_BD)` gives the spliced rows."""
        seen: list[Tensor] = []

        def fn(a: Tensor) -> Tensor:
            rows = a.reshape(a.shape[0], -1)
            seen.append(rows)
            return a if replace is None else replace(rows).reshape(a.shape)

        with splice(self.model, self.hook, fn):
            out = self.model(x_B)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if not seen:
            raise UserError(
                f"hook {self.hook.name!r} never fired during the forward pass (is the module unused?)"
            )
        return out.float(), seen[0]

    def _mean(self) -> Tensor:
        moments = M._Moments()
        with torch.no_grad():
            for x_B, _ in self._batches():
                moments.update(self._forward(x_B)[1])
        return moments.mean_D.float()

    def evaluate(self, sae, activation: bool = True) -> dict:
        """Activation metrics (with `activation`) and the task metrics of one SAE spliced at the hook."""
        device = model_device(self.model)
        if isinstance(sae, nn.Module):
            sae = sae.to(device).eval()
        if self.mean_act_D is None:
            self.mean_act_D = self._mean().to(device)
        labels = self.examples.labels is not None
        variants = ("sae",) if self.baseline is not None else VARIANTS
        loss = dict.fromkeys(("clean", *variants), 0.0)
        correct = dict.fromkeys(("clean", *variants), 0)
        kl = dict.fromkeys(variants, 0.0)
        stats: M.ActivationStats | None = None
        n = 0
        with torch.no_grad():
            for x_B, y_B in self._batches():
                clean, x_BD = self._forward(x_B)
                d_in = getattr(sae, "d_in", x_BD.shape[1])
                if d_in != x_BD.shape[1]:
                    raise UserError(
                        f"the SAE has d_in={d_in} but hook {self.hook.name!r} gives rows of {x_BD.shape[1]}"
                    )
                acts_BF = sae.encode(x_BD.float())
                x_hat_BD = sae.decode(acts_BF).to(x_BD.dtype)
                if activation:
                    stats = stats or M.ActivationStats(acts_BF.shape[-1])
                    stats.update(x_BD.float(), x_hat_BD.float(), acts_BF)
                new = {
                    "zero": lambda r: torch.zeros_like(r),
                    "mean": lambda r: self.mean_act_D.to(r.dtype).expand_as(r),
                    "sae": lambda r, _x=x_hat_BD: _x,
                }
                outs = {"clean": clean} | {v: self._forward(x_B, new[v])[0] for v in variants}
                logp_clean = torch.log_softmax(clean.reshape(clean.shape[0], -1), -1)
                for v, out in outs.items():
                    flat = out.reshape(out.shape[0], -1)
                    if labels:
                        if out.ndim != 2:
                            raise UserError(
                                f"labels need outputs of shape [batch, classes]; the module returned {list(out.shape)}"
                            )
                        loss[v] += nn.functional.cross_entropy(flat, y_B, reduction="sum").double().item()
                        correct[v] += int((flat.argmax(-1) == y_B).sum())
                    else:
                        loss[v] += (flat - clean.reshape(flat.shape)).double().pow(2).sum().item()
                    if v != "clean":
                        kl[v] += (
                            M.kl_divergence(logp_clean, torch.log_softmax(flat, -1)).double().sum().item()
                        )
                n += x_B.shape[0]
        if n == 0:
            raise UserError("there is no held-out example to evaluate on")
        loss = {k: v / n for k, v in loss.items()}
        if self.baseline is None:
            self.baseline = (
                {f"loss_{k}": loss[k] for k in ("zero", "mean")}
                | {f"kl_{k}": kl[k] / n for k in ("zero", "mean")}
                | {f"accuracy_{k}": correct[k] / n for k in ("zero", "mean")}
            )
        b = self.baseline
        out = stats.compute() if stats is not None else {}
        out.update(
            task_loss="cross_entropy" if labels else "output_mse",
            n_examples=n,
            loss_clean=loss["clean"],
            loss_zero=b["loss_zero"],
            loss_mean=b["loss_mean"],
            loss_sae=loss["sae"],
            loss_recovered=M.loss_recovered(loss["clean"], loss["sae"], b["loss_zero"]),
            loss_recovered_mean=M.loss_recovered(loss["clean"], loss["sae"], b["loss_mean"]),
            kl=kl["sae"] / n,
            kl_zero=b["kl_zero"],
            kl_mean=b["kl_mean"],
        )
        if labels:  # the cross-entropy under the language-model names too (W&B, sweep tables, training logs)
            out.update({f"ce_{k}": out[f"loss_{k}"] for k in ("clean", "zero", "mean", "sae")})
            out["ce_increase"] = loss["sae"] - loss["clean"]
            out.update(accuracy_clean=correct["clean"] / n, accuracy_sae=correct["sae"] / n)
            out.update(accuracy_zero=b["accuracy_zero"], accuracy_mean=b["accuracy_mean"])
        return out


def summary_line(name: str, m: dict) -> str:
    acc = ""
    if "accuracy_clean" in m:
        acc = (
            f" | accuracy {100 * m['accuracy_clean']:.1f}% -> {100 * m['accuracy_sae']:.1f}% "
            f"(zero-ablated {100 * m['accuracy_zero']:.1f}%)"
        )
    return (
        f"{name}: L0 {m['l0']:.2f} | FVU {m['fvu']:.4f} | loss recovered {m['loss_recovered']:.4f} "
        f"({m['task_loss']} {m['loss_clean']:.4f} -> {m['loss_sae']:.4f}, zero-ablated {m['loss_zero']:.4f}){acc} | "
        f"KL {m['kl']:.4f} | dead {100 * m['latents']['dead_frac']:.1f}% | {m['n_examples']} examples"
    )


def heldout_task_examples(manifest: dict, eval_cfg) -> tuple:
    """(the store's held-out examples, a description of them for metrics.json).

    eval.n_tokens caps the number of examples; eval.batch_size is examples per forward."""
    from sae_pipeline.data.tensors import heldout_examples

    if eval_cfg.data is not None:
        raise UserError(
            "eval.data names text; a model=torch_module store is evaluated on its held-out examples"
        )
    ex = heldout_examples(manifest, eval_cfg.n_tokens)
    data = manifest.get("dataset", {})
    desc = {
        "source": "store held-out examples",
        "heldout": data.get("heldout"),
        "path": (data.get("config") or {}).get("path"),
        "n_examples": int(ex.inputs.shape[0]),
        "labels": ex.labels is not None,
    }
    return ex, desc
