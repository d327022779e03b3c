"""What a research run costs, on paper: Gemma-2-2B (d_in 2304) SAEs at 16k, 65k and 1M latents over 500M tokens.

    .venv/bin/python scripts/research_cost.py                    # the README's table (markdown)
    .venv/bin/python scripts/research_cost.py --loop-share 0.7 --reader-gb-s 1.4 --json cost.json

Every number is *projected*: arithmetic on what this project measures and an H100's published dense bf16
rate (989 TFLOP/s, SXM), until a GPU run replaces it (`make gpu-check` measures the inputs on the device).
  store:    bytes per row of a bf16 store at d_in 2304, measured by writing a shard here (activations,
            token ids, context ids, positions, header) x tokens;
  harvest:  FLOP per token of the forward as far as the hook (layer 12 of 26, early exit: this project
            stops the forward there), 2 FLOP per weight used + attention over the context, from Gemma-2-2B's
            published config; at --harvest-mfu of the roofline;
  training: TopK with the sparse kernels: one dense GEMM per step (the encoder, 2 * d_in * F FLOP per
            token) at --gemm-efficiency of the roofline, the loop reaching --loop-share of that GEMM's rate
            (bench_loop.py measures the share; 0.44 on the CPU in issue 21) -- plus whether the reader
            (--reader-gb-s, from bench_reader.py's feed) keeps up;
  GPUs:     float32 weights, gradients and Adam state (16 bytes per weight) of W_enc and W_dec, plus the
            bf16 pre-activations of one batch (B x F), on 80 GB cards: the latent shards needed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.synthetic import write_store  # noqa: E402

# Gemma-2-2B's published config (no download): hidden 2304, MLP 9216 (gated), 26 layers, 8 query heads and
# 4 key/value heads of 256
GEMMA2_2B = {"d": 2304, "d_mlp": 9216, "layers": 26, "q_heads": 8, "kv_heads": 4, "head_dim": 256}
H100_BF16_FLOPS = 989e12  # dense, SXM, published
H100_BYTES = 80e9
TOKENS = 500e6
WIDTHS = {"16k": 2**14, "65k": 2**16, "1M": 2**20}


def bytes_per_row(d_in: int) -> float:
    """Measured: one bf16 shard of 16,384 rows written by the store writer, divided by its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_store(Path(tmp) / "s", [torch.zeros(16_384, d_in, dtype=torch.bfloat16)], 128)
        shard = next(folder.glob("shard-*.safetensors"))
        return shard.stat().st_size / 16_384


def forward_flop_per_token(cfg: dict, hook_layer: int, context: int) -> float:
    d, h = cfg["d"], cfg["head_dim"]
    attn_weights = d * h * (cfg["q_heads"] + 2 * cfg["kv_heads"]) + cfg["q_heads"] * h * d
    mlp_weights = 3 * d * cfg["d_mlp"]
    scores = 2 * 2 * cfg["q_heads"] * h * context / 2  # QK^T and AV, causal: half the context on average
    return (hook_layer + 1) * (2 * (attn_weights + mlp_weights) + scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hook-layer", type=int, default=12)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument(
        "--harvest-mfu", type=float, default=0.4, help="share of the roofline a 2B forward reaches"
    )
    ap.add_argument("--gemm-efficiency", type=float, default=0.7, help="encoder GEMM rate / roofline")
    ap.add_argument("--loop-share", type=float, default=0.44, help="training loop rate / encoder GEMM rate")
    ap.add_argument(
        "--reader-gb-s",
        type=float,
        default=5.04,
        help="one reader's feed, GB/s (bench_reader.py, bf16, d_in 2304)",
    )
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    d_in = GEMMA2_2B["d"]
    row = bytes_per_row(d_in)
    harvest_flop = forward_flop_per_token(GEMMA2_2B, args.hook_layer, args.context)
    harvest_h = TOKENS * harvest_flop / (H100_BF16_FLOPS * args.harvest_mfu) / 3600
    out = {
        "inputs": vars(args) | {"json": None},
        "bytes_per_row": row,
        "harvest_flop_per_token": harvest_flop,
    }
    out["store_tb"], out["harvest_gpu_hours"], out["widths"] = TOKENS * row / 1e12, harvest_h, {}
    for name, F in WIDTHS.items():
        gemm_rate = H100_BF16_FLOPS * args.gemm_efficiency
        tok_s = gemm_rate / (2 * d_in * F) * args.loop_share
        reader_tok_s = args.reader_gb_s * 1e9 / (d_in * 2)
        state = 2 * d_in * F * 16  # W_enc + W_dec: weight, gradient, Adam's two moments, float32
        acts = 2 * args.batch * F * 2  # bf16 pre-activations and their gradient, one batch
        out["widths"][name] = {
            "d_sae": F,
            "train_tokens_per_s_per_gpu": tok_s,
            "reader_tokens_per_s": reader_tok_s,
            "train_gpu_hours": TOKENS / min(tok_s, reader_tok_s) / 3600,
            "bound_by": "reader" if reader_tok_s < tok_s else "GEMM",
            "memory_gb": (state + acts) / 1e9,
            "gpus_needed": int(-(-(state + acts) // (0.9 * H100_BYTES))),
        }
    print(
        f"Gemma-2-2B, d_in {d_in}, {TOKENS / 1e6:.0f}M tokens, H100 bf16 {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s; all *projected*"
    )
    print(f"store: {row:,.0f} bytes/row (measured) -> *{out['store_tb']:.2f} TB*; harvest to layer {args.hook_layer}: "
          f"{harvest_flop / 1e9:.2f} GFLOP/token -> *{harvest_h:.1f} GPU-hours* at {args.harvest_mfu:.0%} MFU")  # fmt: skip
    print(
        "| latents | train tok/s per GPU | bound by | training GPU-hours | weights+Adam+batch | H100s needed |"
    )
    print("|---|---|---|---|---|---|")
    for name, w in out["widths"].items():
        print(f"| {name} ({w['d_sae']:,}) | *{w['train_tokens_per_s_per_gpu']:,.0f}* | {w['bound_by']} | "
              f"*{w['train_gpu_hours']:.2f}* | *{w['memory_gb']:.1f} GB* | *{w['gpus_needed']}* |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
