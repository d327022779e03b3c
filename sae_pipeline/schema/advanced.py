"""The `advanced` node of a stage's own group: knobs whose defaults suit every run.

Reader and writer internals (memory, threads, queues), optimiser constants, speed-ups that leave the
numbers unchanged, and debug switches that exist for tests. They are set as `<group>.advanced.<key>`,
e.g. `sae-train ... train.advanced.stop_after_steps=20`; `--help` folds the node away and
`sae-<stage> --cfg job -p <group>.advanced` prints it.

The old spelling (`train.stop_after_steps`) is refused in one sentence naming the new key
(`moved_key`); a resume of a run folder that recorded the old spelling reads it as the new one
(`nest_advanced`). Nothing from the package is imported here: errors.py reads `moved_key` lazily.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass
class TrainAdvanced:
    # --- the shuffled reader (data/reader.py) ---
    buffer_rows: int = 65_536  # shuffle buffer (rows); bounds the reader's memory
    chunk_rows: int = 4096  # contiguous rows read at a time from one shard
    prefetch: int = 1  # shuffle buffers prepared ahead by the background reader thread
    read_threads: int = 4  # threads reading a shuffle buffer's chunks from the shard files at once
    # --- a streamed run (train.stream=true, data/stream.py) ---
    # shards per shuffle window (its memory: this many shards); the order is fixed by shard sequence + seed
    stream_window_shards: int = 4
    stream_wait_s: float = 3600.0  # give up when no new shard arrives for this long
    # --- optimiser constants and initialisation ---
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    init_tokens: int = 16_384  # data sample for b_dec init (and the input scale without norm stats)
    # --- debug ---
    stop_after_steps: Optional[int] = None  # stop as if killed after this step (tests of resume)


@dataclass
class HarvestAdvanced:
    early_exit: bool = True  # stop the forward after the deepest hook (false: the whole model, same rows)
    writer_queue: int = 2  # shards buffered for the background writer
    # debug: sleep this long after each shard (a slow harvest, for streaming tests)
    shard_delay_s: float = 0.0
    stop_after_shards: Optional[int] = None  # debug: the process kills itself after writing this many shards


@dataclass
class EvalAdvanced:
    # replay the clean pass's early blocks in the ablated/spliced passes (the same numbers, faster)
    reuse_prefix: bool = True


@dataclass
class FeaturesAdvanced:
    reservoir: int = 64  # size of the uniform sample of firing positions per latent (the weak examples)


ADVANCED = {
    "train": TrainAdvanced,
    "harvest": HarvestAdvanced,
    "eval": EvalAdvanced,
    "features": FeaturesAdvanced,
}


def advanced_keys(group: str) -> tuple[str, ...]:
    schema = ADVANCED.get(group)
    return tuple(f.name for f in dataclasses.fields(schema)) if schema else ()


def moved_key(key: str) -> str | None:
    """`train.stop_after_steps` -> `train.advanced.stop_after_steps`; None for a key that did not move."""
    group, _, leaf = key.lstrip("+~").partition(".")
    return f"{group}.advanced.{leaf}" if leaf in advanced_keys(group) else None


def moved_sentence(key: str, value: str | None = None, config_file: str | None = None) -> str | None:
    """The one sentence that refuses the old spelling of a moved key (an override, or a key of the YAML
    `config_file`), or None."""
    new = moved_key(key)
    if new is None:
        return None
    old = key.lstrip("+~")
    group, leaf = new.split(".advanced.")
    advice = (
        f"write it in {config_file} as `advanced: {{{leaf}: ...}}`"
        if config_file
        else f"pass {new}={value if value is not None else '<value>'}"
    )
    return f"{old} moved to {new} (settings most runs never change, folded away by --help): {advice}"


def nest_advanced(group: str, record: dict) -> dict:
    """A group's recorded settings with keys written before they moved put under `advanced` (an older run
    folder's config.json), so that they compare equal to today's."""
    moved = [k for k in advanced_keys(group) if k in record]
    if not moved:
        return record
    out = {k: v for k, v in record.items() if k not in moved}
    out["advanced"] = {**{k: record[k] for k in moved}, **(record.get("advanced") or {})}
    return out
