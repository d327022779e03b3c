"""sae_pipeline: harvest activations, train sparse autoencoders on them, evaluate and interpret them.

The package's folders are its architecture. Stage modules (one `sae-*` command each) hold `run(cfg)`
and `main` only; they import the library below them and never each other
(`python scripts/check_imports.py` checks it, and so does tests/test_layout.py).

    harvest.py train.py eval.py features.py steer.py probe.py   the stages: sae-harvest, sae-train, ...
    schema/       every config group's dataclass (one module per stage + common groups) and checks
    conf/         the Hydra YAML files (only values that differ from the schema), shipped in the wheel
    data/         the activation store (shards + manifest), the shuffled reader, text packing
    model/        loading models, hook names and points, capture/splice, the embedded assets
    sae/          one file per architecture, registry, sparse kernels, saving and loading
    training/     trainer loop, members, schedules, statistics, checkpoints, run folders, validation
    evaluation/   metrics, the splice scorer, eval reports, sweep tables and Pareto plots
    interpret/    feature statistics and browser, logit lens, steering edits
    runs.py       finding an SAE run on disk and what trained it
    layout.py     every file and folder name, defined once
    files.py      atomic writes (temporary name, fsync, rename) and checksums
    tracking.py   Weights & Biases start-up shared by the stages
    runtime.py    the device and process-wide CPU settings
    errors.py     UserError: one sentence, exit code 2
"""
