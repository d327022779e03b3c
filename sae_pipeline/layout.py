"""Every on-disk file and folder name of the pipeline, defined once.

Where the folders live (`paths.root` and the folders under it) is configuration: the `paths`
group (`schema/common.py`). What the files inside them are called is fixed here.
"""

from __future__ import annotations

import os
from pathlib import Path

# --- activation store (one folder per hook point) -------------------------------------------
MANIFEST = "manifest.json"
LOCK = ".writer.lock"  # in every folder a stage is writing: who writes it (locks.py); gone when it ends
STORE_FORMAT_VERSION = 1


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def tmp_name(final: Path) -> Path:
    """Where a file is written before the atomic rename to `final`."""
    return final.with_name(final.name + ".tmp")


def store_dir(out_dir: Path, hook_name: str) -> Path:
    """Folder of the store for one hook point; `:` and `/` of module hooks become safe characters."""
    safe = hook_name.replace("/", "_").replace(":", "__")
    return Path(out_dir) / safe


# --- a harvest split into parts (data/parts.py) ------------------------------------------------


def part_dir(store: Path, part: int, parts: int) -> Path:
    """<store>/part-001-of-004/: part 1's shards and its own manifest (a store of its shards)."""
    return Path(store) / f"part-{part:03d}-of-{parts:03d}"


# --- SAE run folders ------------------------------------------------------------------------


def train_run_name(arch: str) -> str:
    """<date>_<time>-<ns>_<arch>: a run folder under paths.train when train.run_dir is not given (the
    nanoseconds keep two runs started in the same second apart)."""
    import time

    return f"{time.strftime('%Y-%m-%d_%H-%M-%S')}-{time.time_ns() % 10**9:09d}_{arch}"


CONFIG = "config.json"  # <run>/config.json (how the run was trained) and <run>/sae/config.json (the SAE)
CHECKPOINTS = "checkpoints"
FINAL_SAE = "sae"
SAE_WEIGHTS = "sae.safetensors"
TRAIN_STATE = "state.safetensors"  # optimizer moments
TRAIN_META = "state.json"  # step, tokens, RNG and reader position
TRAIN_LOG = "train_log.jsonl"
EVAL = "eval"
METRICS = "metrics.json"
DENSITY_PLOT = "feature_density.png"
CARD_JSON = "card.json"  # <run>/eval/card.json and card.md: the SAE's card in SAEBench's names
CARD_MD = "card.md"
FEATURES = "features"  # <run>/features/: the latent browser
FEATURES_DATA_JS = "features_data.js"  # the report, as a script the page loads (file:// cannot fetch)
FEATURES_HTML = "index.html"
EXPLAIN_DIR = "explain"
EXPLAIN_SUMMARY = "summary.json"
EXPLANATIONS = "explanations.jsonl"  # <run>/explain/: one JSON line per explained latent, with its scores
EXPLAIN_DRAFTS = "drafts.jsonl"  # explanations before scoring (the shuffled baseline needs them all first)
EXPLAIN_SETTINGS = "settings.json"  # what a resumed sae-explain must match
STEER = "steer"  # <run>/steer/: steering / clamping / ablation results
STEER_JSON = "steer.json"
EXPORT = "export"  # <run>/export/<format>/: the SAE in another library's format
CONNECT = "connect"  # <paths.root>/connect/<in>__<out>/: a feature connector between two SAEs (sae-connect)
CONNECTOR_WEIGHTS = "connector.safetensors"  # W_IO [d_sae in, d_sae out], b_O
CONNECTOR_PLOT = "W2.png"
CONNECTIONS = "connections.txt"  # OF_i = 0.26 IF_j + ... lines

# --- SAELens format (sae-export writes it, load_sae reads it) ---------------------------------
SAELENS_CONFIG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"

PROBE = "probe"  # <run>/probe/<task>/: metrics.json, the table and the score-vs-k plot of sae-probe
PROBE_TABLE_MD = "probe.md"
PROBE_PLOT = "probe_vs_k.png"


def probe_dir(run_dir: Path, task: str) -> Path:
    return Path(run_dir) / PROBE / task


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step-{step:09d}"


LATENT_SHARDS = "latent_shards"  # <run>/latent_shards/shard-1-of-2/: one shard's checkpoints


def latent_shard_dir(run_dir: Path, shard: int, shards: int) -> Path:
    """Where shard `shard` of a latent-sharded run keeps its checkpoints (training/latent_shards.py)."""
    return Path(run_dir) / LATENT_SHARDS / f"shard-{shard}-of-{shards}"


# --- sweeps ---------------------------------------------------------------------------------
SWEEP_TABLE_CSV = "sweep.csv"
SWEEP_TABLE_MD = "sweep.md"
PARETO_LOSS_PLOT = "pareto_l0_loss_recovered.png"
PARETO_FVU_PLOT = "pareto_l0_fvu.png"


# --- embedded default assets ----------------------------------------------------------------
def cache_root() -> Path:
    """Where fetched wheels and converted assets live (override with SAE_PIPELINE_CACHE)."""
    env = os.environ.get("SAE_PIPELINE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae_pipeline"


CONVERTED_SOURCE = "SOURCE.txt"  # in a converted model folder: which GGUF file it came from


def gguf_cache_dir(gguf_name: str, key: str) -> Path:
    """The float32 Hugging Face folder a GGUF file is de-quantized into once (model/gguf_cache.py)."""
    stem = gguf_name[: -len(".gguf")] if gguf_name.endswith(".gguf") else gguf_name
    return cache_root() / "gguf" / f"{stem}-{key}"
