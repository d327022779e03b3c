# sae_pipeline — `make help` lists every target. `make demo` and `make test` set themselves up.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch stays small; a GPU user runs `make setup TORCH_SPEC=torch` (a CUDA build)
# or installs torch before `make setup` (an installed torch is kept).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
ROOT ?= runs
DEMO_STORE := $(ROOT)/stores/smollm2-135m/shakespeare/blocks.9.hook_resid_post
DEMO_RUN := $(ROOT)/demo/topk
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
export WANDB_SILENT ?= true

.PHONY: help setup assets browser demo card sweep steer explain probe example-digits example-transcoder test test-fast faults lint format bench gpu-bundle gpu-check gpu-check-rehearsal clean distclean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,s3]"
	touch $(STAMP)

setup: $(STAMP) browser ## create .venv, install everything (Chromium too, as root: the only target that does), fetch the embedded model and text
	$(PY) -m sae_pipeline.model.assets

assets: $(STAMP) ## fetch and convert the embedded model and text only
	$(PY) -m sae_pipeline.model.assets

demo: assets ## the main job: harvest -> train -> eval -> feature browser on the embedded default (CPU: ~8 min)
	$(VENV)/bin/sae-harvest paths.root=$(ROOT) harvest.n_tokens=200000
	$(VENV)/bin/sae-train paths.root=$(ROOT) store=$(DEMO_STORE) experiment=demo train.run_dir=$(DEMO_RUN) train.overwrite=true
	$(VENV)/bin/sae-eval paths.root=$(ROOT) sae_path=$(DEMO_RUN) eval.n_tokens=4096
	$(VENV)/bin/sae-features paths.root=$(ROOT) sae_path=$(DEMO_RUN) features.n_tokens=8192
	@echo "feature browser: open $(DEMO_RUN)/features/index.html"

card: assets ## the demo SAE's card: core metrics, first-letter absorption, sparse probing, in SAEBench's names (run `make demo` first)
	$(VENV)/bin/sae-eval paths.root=$(ROOT) sae_path=$(DEMO_RUN) eval.n_tokens=4096 eval.absorption=true 'eval.probe_tasks=[genre,speaker]'
	@echo "card: $(DEMO_RUN)/eval/card.md (card.json beside it)"

steer: assets ## steer SmolLM2 with a latent of the demo SAE (run `make demo` first)
	$(VENV)/bin/sae-steer paths.root=$(ROOT) sae_path=$(DEMO_RUN) 'steer.latents=[0]' 'steer.scales=[8.0]'

explain: assets ## explanations of 6 random latents of the demo SAE by SmolLM2-135M-Instruct, scored (run `make demo` first; ~4 min CPU)
	OMP_NUM_THREADS=1 $(VENV)/bin/sae-explain paths.root=$(ROOT) sae_path=$(DEMO_RUN) explain.latents=random explain.n_latents=6 explain.n_score=4 explain.overwrite=true

probe: assets ## sparse probing of the demo SAE vs dense activations: play genre, held-out play, speaker headings (run `make demo` first)
	$(VENV)/bin/sae-probe -m paths.root=$(ROOT) sae_path=$(DEMO_RUN) probe_task=genre,play,speaker
	@echo "tables: $(DEMO_RUN)/probe/{genre,play,speaker}/probe.md (plots: probe_vs_k.png beside them)"

sweep: assets ## a small L1 sweep (Hydra multirun) on the embedded default, then its Pareto table and plots
	$(VENV)/bin/sae-harvest paths.root=$(ROOT) harvest.n_tokens=200000
	$(VENV)/bin/sae-train -m paths.root=$(ROOT) store=$(DEMO_STORE) sae=relu train=demo train.eval_every=0 train.overwrite=true \
		sae.l1_coefficient=0.5,1,2,4 hydra.sweep.dir=$(ROOT)/sweeps/demo-relu
	$(VENV)/bin/sae-eval paths.root=$(ROOT) sae_path=$(ROOT)/sweeps/demo-relu eval.n_tokens=4096
	@echo "Pareto plots: $(ROOT)/sweeps/demo-relu/pareto_l0_loss_recovered.png, pareto_l0_fvu.png"

example-digits: $(STAMP) ## feature connectors on an MLP digit classifier (seeds/002 on sklearn digits; CPU: ~25 s)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) examples/digits/digits.py --out $(ROOT)/digits
	@echo "W2 pictures and accuracy table: $(ROOT)/digits/"

TC_STORES := $(ROOT)/stores/smollm2-135m/shakespeare
example-transcoder: assets ## transcoders (plain and skip) from SmolLM2 layer 9's MLP input to its output (CPU: ~10-15 min)
	$(VENV)/bin/sae-harvest paths.root=$(ROOT) hook=mlp_out 'hook.names=[module:model.layers.9.mlp:input]' \
		harvest.n_tokens=100000 harvest.dtype=float16
	$(VENV)/bin/sae-train paths.root=$(ROOT) store=$(TC_STORES)/module__model.layers.9.mlp__input \
		train.target_store=$(TC_STORES)/blocks.9.hook_mlp_out sae=topk sae.k=32 sae.d_sae=4608 \
		train.total_tokens=409600 train.batch_size=1024 train.lr=1e-3 train.lr_warmup_steps=20 \
		'train.group=[{skip:false,name:plain},{skip:true,name:skip}]' train.run_dir=$(ROOT)/transcoder/l9 train.overwrite=true
	$(VENV)/bin/sae-eval paths.root=$(ROOT) sae_path=$(ROOT)/transcoder/l9 eval.n_tokens=4096

browser: ## install Debian's Chromium for the feature-browser test (part of setup; the test skips without it)
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
		|| echo "note: chromium is not installed; the browser test will be skipped"

test: setup ## the test suite CI runs (unit tests, CLI tests, one end-to-end run on SmolLM2)
	$(PY) -m pytest -q

test-fast: $(STAMP) ## the tests without the end-to-end SmolLM2 ones
	$(PY) -m pytest -q -m "not slow"

faults: $(STAMP) ## the fault-injection suite alone (part of `make test`): kills, damaged files, bad invocations, full disk
	mkdir -p $(ROOT) && SAE_FAULTS_REPORT=$(ROOT)/faults.json $(PY) -m pytest -q tests/faults
	@echo "counts: $(ROOT)/faults.json"

lint: $(STAMP) ## ruff lint and format check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: assets ## benchmarks: harvest early exit, SAE training roofline, loop vs step, reader throughput, quality at one pass, streaming/S3/bounded disk
	$(PY) scripts/bench_harvest.py
	$(PY) scripts/bench_sae.py
	$(PY) scripts/bench_reader.py
	$(PY) scripts/bench_loop.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_sweep_group.py
	$(PY) scripts/bench_quality.py --root $(ROOT)/bench/quality
	$(PY) scripts/bench_stream.py

# The GPU check runs on a node that has only python3 with torch, transformers, safetensors, numpy, fsspec and
# pyarrow: the project's other imports travel as pure-Python wheels in gpu_bundle/ (`make gpu-bundle`, here).
GPU_PYTHON ?= python3
gpu-bundle: $(STAMP) ## fetch the wheels the GPU check needs on a bare GPU node (Python 3.12) into gpu_bundle/
	$(PY) scripts/gpu_bundle.py --python 3.12 --out gpu_bundle

gpu-check: ## on a GPU node (bare python3 + torch etc.): install gpu_bundle/ into .gpu-site/, write runs/gpu_check/gpu_check.json + log
	rm -rf .gpu-site && $(GPU_PYTHON) -m pip install -q --no-index --no-deps --target .gpu-site gpu_bundle/*.whl
	mkdir -p $(ROOT)/gpu_check && set -o pipefail && PYTHONPATH=.gpu-site $(GPU_PYTHON) scripts/gpu_check.py \
		--out $(ROOT)/gpu_check 2>&1 | tee $(ROOT)/gpu_check/gpu_check.log

REHEARSAL := .gpu-rehearsal/venv
gpu-check-rehearsal: gpu-bundle ## the GPU check on the CPU, in a fresh venv holding only the node's packages + gpu_bundle/
	rm -rf $(REHEARSAL) && python3 -m venv $(REHEARSAL)
	$(REHEARSAL)/bin/pip install -q "$(TORCH_SPEC)" transformers safetensors numpy fsspec pyarrow
	$(MAKE) gpu-check GPU_PYTHON=$(REHEARSAL)/bin/python ROOT=$(ROOT)/rehearsal

clean: ## remove outputs and caches of this checkout (keeps .venv and the asset cache)
	rm -rf $(ROOT) outputs multirun wandb .pytest_cache .ruff_cache .gpu-site .gpu-rehearsal

distclean: clean ## also remove the virtual environment
	rm -rf $(VENV)
