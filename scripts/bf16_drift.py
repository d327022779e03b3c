"""How far bf16 autocast training drifts from float32, per architecture, on the autocast tests' tiny shapes.

    .venv/bin/python -m scripts.bf16_drift                 # CPU autocast
    .venv/bin/python -m scripts.bf16_drift --device cuda   # CUDA autocast

For each architecture, from the same initial SAE and batches (tests/unit/sae/test_autocast.py): the first step's
gradient error ||g_bf16 - g_fp32|| / ||g_fp32||, and after STEPS Adam steps the update error
||dW_bf16 - dW_fp32|| / ||dW_fp32|| and max |W_bf16 - W_fp32| / max |W_fp32|, per parameter.
"""

from __future__ import annotations

import argparse
import copy

import torch

from tests.unit.sae.test_autocast import ARCHITECTURES, D_SAE, STEPS, amp, rel, start, train_steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    device = parser.parse_args().device
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"{'arch':<10} {'parameter':<16} {'grad err':>9} {f'upd err@{STEPS}':>11} {'max w diff':>11}")
    for arch in ARCHITECTURES:
        sae, xs = start(arch, device)
        dead_F = torch.zeros(D_SAE, dtype=torch.bool, device=device)
        dead_F[::3] = True
        grads, after = [], []
        for bf16 in (False, True):
            s = copy.deepcopy(sae)
            with amp(device, bf16):
                s.training_forward(xs[0], dead_mask_F=dead_F).loss.backward()
            grads.append({n: p.grad for n, p in s.named_parameters()})
            s = copy.deepcopy(sae)
            train_steps(s, xs, device, bf16)
            after.append({n: p.detach() for n, p in s.named_parameters()})
        for name, p0 in sae.named_parameters():
            w32, w16 = after[0][name], after[1][name]
            upd = rel(w16 - p0.detach(), w32 - p0.detach())
            wmax = float((w16 - w32).abs().max() / w32.abs().max())
            print(
                f"{arch:<10} {name:<16} {rel(grads[1][name], grads[0][name]):>9.4f} {upd:>11.4f} {wmax:>11.2e}"
            )


if __name__ == "__main__":
    main()
