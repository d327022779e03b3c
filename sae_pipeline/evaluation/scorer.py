"""Which scorer an SAE trained on a store gets: the one choice sae-eval and training's loss recovered share.

    ev = store_scorer(model, tokenizer, hook_name, target_hook, batch_size, heldout)
    m = ev.evaluate(sae)

A language model's SAE is spliced at its hook (`SpliceEvaluator`); a transcoder's output replaces its
target hook's activations, read from its input hook; a plain torch module (no tokenizer,
model=torch_module) is scored by its task's own loss (`TaskEvaluator`), which has no transcoders.
"""

from __future__ import annotations

from collections.abc import Callable

from sae_pipeline.errors import UserError
from sae_pipeline.evaluation.splice import SpliceEvaluator
from sae_pipeline.evaluation.task import TaskEvaluator
from sae_pipeline.model.hook_points import resolve_hook


def store_scorer(
    model,
    tokenizer,
    hook_name: str,
    target_hook: str | None,
    batch_size: int,
    heldout: Callable[[], object],
    reuse_prefix: bool = True,
    transcoder_refusal: str = "a transcoder on a model=torch_module store cannot be scored",
):
    """The scorer for an SAE at `hook_name` (a transcoder's: `target_hook` too).

    `heldout()` gives the data, called once the scorer is chosen: the store's held-out examples for a
    torch module, else (input_ids [N, T], loss mask [N, T]) of its held-out text."""
    hook = resolve_hook(model, hook_name)
    if tokenizer is None:
        if target_hook:
            raise UserError(transcoder_refusal)
        return TaskEvaluator(model, hook, heldout(), batch_size)
    source = None
    if target_hook:  # the transcoder's output replaces the target hook's activations
        hook, source = resolve_hook(model, target_hook), hook
    ids, mask = heldout()
    return SpliceEvaluator(model, hook, ids, mask, batch_size, reuse_prefix=reuse_prefix, source_hook=source)
