"""sae_pipeline: harvest activations, train sparse autoencoders on them, evaluate and interpret them.

The package's folders are its architecture. Stage modules (one `sae-*` command each) hold `run(cfg)`
and `main` only; they import the library below them and never each other
(`python scripts/check_imports.py` checks it, and so does tests/project/test_import_rules.py).

    harvest.py train.py evaluate.py features.py explain.py steer.py probe.py export.py verify.py connect.py   the stages
    api.py        the Python API for notebooks (load_sae, tokenize, splice_sae, ...), re-exported here
    schema/       every config group's dataclass (one module per stage + common groups) and checks
    conf/         the Hydra YAML files (only values that differ from the schema), shipped in the wheel
    data/         the activation store (shards + manifest), harvest parts and their merge, the shuffled
                  reader, text packing, rows of two stores matched by (context, position), the paired
                  reader of a transcoder (input and target rows of each token), tensor datasets
    model/        loading models (any nn.Module too), hook names and points, capture/splice, the
                  embedded assets, the de-quantized GGUF cache
    sae/          one file per architecture, registry, sparse kernels, saving and loading, the
                  training step of one latent shard
    training/     trainer loop, members, schedules, statistics, checkpoints, run folders, validation,
                  transcoder targets, dead-latent resampling, data-parallel and latent-sharded jobs
    evaluation/   metrics, the splice scorer, a torch module's task scorer, eval reports, sweep tables
                  and Pareto plots
    interpret/    feature statistics and browser, logit lens, steering edits, feature connectors (seeds/002),
                  explanations of latents by an instruct model and their scores
    runs.py       finding an SAE run on disk and what trained it
    layout.py     every file and folder name, defined once
    files.py      atomic writes (temporary name, fsync, rename) and checksums
    integrity/    every checksum: seals of JSON records, store manifests and shards, checkpoints, and
                  whole folders (sae-verify); faults.py: pause points for tests/faults
    locks.py      one writer per folder: the exclusive lock a stage holds on every folder it writes
    progress.py   progress bars on a terminal, plain lines in a log ($SAE_PIPELINE_PROGRESS_S apart)
    tracking.py   Weights & Biases start-up shared by the stages
    runtime.py    the device and process-wide CPU settings
    config_access.py  one key of a config group, whatever its form (DictConfig, dict, dataclass)
    errors.py     UserError: one sentence, exit code 2

The public Python API (`from sae_pipeline import load_sae, splice_sae, ...`) is loaded on first use, so
`import sae_pipeline` stays light.
"""

from __future__ import annotations

_API = (
    "capture_activations",
    "evaluate_sae",
    "export_sae",
    "explain_latents",
    "browse_features",
    "harvest_activations",
    "load_model",
    "load_sae",
    "splice_sae",
    "steering",
    "tokenize",
    "train_sae",
)
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from sae_pipeline import api

        return getattr(api, name)
    raise AttributeError(f"module 'sae_pipeline' has no attribute {name!r}")
