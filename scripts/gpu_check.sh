#!/usr/bin/env bash
# The GPU check (`make gpu-check`): on a CUDA machine, run the bf16 autocast tests on the GPU, benchmark
# every architecture's training step in bf16 and fp32, then train a demo-sized SAE on CUDA.
#
#   scripts/gpu_check.sh                      # writes everything under runs/gpu_check/<UTC time>/
#   GPU_CHECK_STORE=path/to/store scripts/gpu_check.sh   # train on this store instead of the demo store
#   BENCH_STEPS=20 BENCH_LARGE=0 scripts/gpu_check.sh    # timed steps per arch; skip the large shape
#
# Needs `make setup` with a CUDA build of torch (make setup TORCH_SPEC=torch). Without a GPU it says so
# and exits 2. The demo-sized train uses the demo store (harvested by `make demo`, or here if missing,
# which needs the embedded assets: `make assets`). Every step's output goes to the log; the summary at the
# end lists the JSON files with the numbers for the README's benchmark table.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
ROOT=${ROOT:-runs}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${GPU_CHECK_OUT:-$ROOT/gpu_check/$STAMP}
STORE=${GPU_CHECK_STORE:-$ROOT/stores/smollm2-135m/shakespeare/blocks.9.hook_resid_post}
STEPS=${BENCH_STEPS:-20}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1}
export WANDB_MODE=${WANDB_MODE:-offline} WANDB_SILENT=${WANDB_SILENT:-true} TOKENIZERS_PARALLELISM=false

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: torch sees no CUDA GPU here ($("$PY" -c 'import torch; print(torch.__version__)'))." >&2
    exit 2
fi
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
echo "== gpu-check $STAMP -> $OUT"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, {p.name}, {p.total_memory / 2**30:.0f} GiB')"
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' || true

echo "== 1. bf16 autocast tests on CUDA (and on the CPU)"
"$PY" -m pytest -q -p no:cacheprovider -rs tests/test_autocast.py --junitxml="$OUT/test_autocast.xml"
# the CUDA cases must have run, not been skipped
"$PY" - "$OUT/test_autocast.xml" <<'PYEOF'
import sys, xml.etree.ElementTree as ET
cases = [c for c in ET.parse(sys.argv[1]).iter("testcase") if "cuda" in c.get("name", "")]
ran = [c for c in cases if c.find("skipped") is None]
print(f"CUDA test cases run: {len(ran)} of {len(cases)}")
sys.exit(0 if cases and len(ran) == len(cases) else 1)
PYEOF

echo "== 2. training-step benchmark on CUDA, bf16 autocast and fp32 (TF32), roofline = bf16 matmul"
shapes=("--d-in 576 --expansion 8 --batch 4096")                        # the demo's SmolLM2 shape
[ "${BENCH_LARGE:-1}" = 1 ] && shapes+=("--d-in 2304 --expansion 16 --batch 8192")  # a Gemma-2-2B-wide SAE
for shape in "${shapes[@]}"; do
    tag=$(echo "$shape" | awk '{print "d" $2 "-x" $4 "-b" $6}')
    for dtype in bf16 fp32; do
        # shellcheck disable=SC2086
        "$PY" scripts/bench_sae.py --device cuda --dtype "$dtype" --ref-dtype bf16 --steps "$STEPS" \
            --ref-repeats 5 --dead-frac 0.1 $shape --json "$OUT/bench_${tag}_${dtype}.json"
    done
done

echo "== 3. demo-sized training run on CUDA (TopK k=32, 8x, 409,600 tokens; bf16 autocast)"
if [ ! -f "$STORE/manifest.json" ]; then
    echo "no store at $STORE: harvesting the demo store on CUDA"
    "$VENV/bin/sae-harvest" paths.root="$ROOT" harvest.n_tokens=200000 harvest.device=cuda
fi
start=$(date +%s)
"$VENV/bin/sae-train" paths.root="$ROOT" store="$STORE" experiment=demo train.device=cuda train.autocast=bf16 \
    train.run_dir="$OUT/demo-topk" train.overwrite=true logger=none
echo "demo-sized train: $(( $(date +%s) - start )) s wall (start-up, validation and the final loss recovered included)"

echo "== summary"
"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for f in sorted(out.glob("bench_*.json")):
    b = json.loads(f.read_text())
    c = b["config"]
    print(f"{f.name}: {b['device']}, {c['dtype']}, d_in={c['d_in']} x{c['expansion']:g} batch={c['batch']}, "
          f"{b['roofline_dtype']} matmul {b['matmul_gflops'] / 1e3:.1f} TFLOP/s")
    for arch, r in b["results"].items():
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"  {arch:<10} {r['tokens_per_s']:>14,.0f} tok/s {r['roofline_fraction']:>7.1%} of roofline "
              f"{peak:>8} MiB peak")
log = out / "demo-topk" / "train_log.jsonl"
rows = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
last = [r for r in rows if "tokens_per_s" in r]
val = [r for r in rows if "val/fvu" in r]
ev = [r for r in rows if "eval/loss_recovered" in r]
if last:
    print(f"demo train: {last[-1]['tokens_per_s']:,.0f} tok/s (last window), "
          f"val/fvu {val[-1]['val/fvu'] if val else float('nan'):.3f}, "
          f"loss recovered {ev[-1]['eval/loss_recovered'] if ev else float('nan'):.3f}")
PYEOF
echo "gpu-check done: $OUT"
