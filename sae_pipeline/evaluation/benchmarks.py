"""The SAEBench-style evaluations sae-eval runs beside the core metrics, when asked:

    bench = Benchmarks(cfg.eval, model, tokenizer)     # one per loaded model
    extra = bench.run(sae, spec, hook)                # {"absorption": {...}, "sparse_probing": {task: report}}

Absorption (eval.absorption) is the first-letter task (first_letter.py, absorption.py); sparse probing
(eval.probe_tasks) runs sae-probe's tasks through its library code (interpret/probe_report.py). What the
SAEs at one hook share (the words' activations, a task's contexts and dense activations) is computed once.
"""

from __future__ import annotations

import json
import time

import numpy as np

from sae_pipeline.errors import UserError
from sae_pipeline.evaluation import first_letter
from sae_pipeline.evaluation.absorption import AbsorptionSettings, absorption
from sae_pipeline.interpret.probe_report import prepare_task, probe_sae
from sae_pipeline.schema.probe import probe_task_config


def _timed(fn, *args) -> dict:
    """fn(*args), a report, with the seconds it took as `wall_s` (shared inputs count for the first SAE)."""
    started = time.perf_counter()
    report = fn(*args)
    report["wall_s"] = round(time.perf_counter() - started, 3)
    return report


class Benchmarks:
    def __init__(self, eval_cfg, model, tokenizer) -> None:
        self.e, self.model, self.tokenizer = eval_cfg, model, tokenizer
        self._words: dict[str, tuple] = {}  # hook -> (words, letters, activations)
        self._tasks: dict[str, object] = {}  # (task, hook, store text) -> prepared task

    @property
    def wanted(self) -> bool:
        return bool(self.e.absorption or self.e.probe_tasks)

    def run(self, sae, spec, hook, transcoder: bool = False) -> dict:
        if not self.wanted:
            return {}
        if self.tokenizer is None:
            raise UserError(
                "eval.absorption and eval.probe_tasks need a language model; this SAE's store is a model=torch_module one."
            )
        if transcoder:
            raise UserError(
                "eval.absorption and eval.probe_tasks score SAEs, not transcoders; leave them off here."
            )
        out: dict = {}
        if self.e.absorption:
            out["absorption"] = _timed(self.absorption, sae, spec, hook)
        if self.e.probe_tasks:
            out["sparse_probing"] = {t: _timed(self.probe, t, sae, spec, hook) for t in self.e.probe_tasks}
        return out

    def _bos(self, spec) -> int | None:
        bos = spec.manifest.get("bos") or {}
        if not bos.get("prepended", True):
            return None
        return bos.get("token_id", self.tokenizer.bos_token_id)

    def absorption(self, sae, spec, hook) -> dict:
        e = self.e
        if hook.name not in self._words:
            vocab = first_letter.alpha_words(self.tokenizer)
            words = first_letter.sample_words(vocab, int(e.absorption_words), int(e.seed))
            x_ND = first_letter.word_activations(
                self.model, hook, self.tokenizer, words, int(e.absorption_examples), self._bos(spec),
                int(e.batch_size) * 4, int(e.seed),
            )  # fmt: skip
            letters = np.array([w.letter for w in words])
            self._words[hook.name] = (words, letters, x_ND, len(vocab))
        words, letters, x_ND, n_vocab = self._words[hook.name]
        settings = AbsorptionSettings(
            method=str(e.absorption_method), seed=int(e.seed), min_words=int(e.absorption_min_words)
        )
        report = absorption(x_ND, letters, sae, settings, words=[w.text for w in words])
        report["settings"] = {
            **settings.__dict__,
            "words_in_vocabulary": n_vocab,
            "prompt": f"<word>{first_letter.TEMPLATE} <LETTER>",
            "examples_per_prompt": int(e.absorption_examples),
        }
        return report

    def probe(self, task: str, sae, spec, hook) -> dict:
        p_cfg = probe_task_config(task, self.e.probe)
        p_cfg.device, p_cfg.seed = str(self.e.device), int(p_cfg.seed)
        m = spec.manifest
        key = json.dumps(
            [task, hook.name, m.get("dataset"), m.get("context_size"), m.get("bos")], default=str
        )
        if key not in self._tasks:
            self._tasks[key] = prepare_task(p_cfg, spec, self.model, self.tokenizer, hook)
        return probe_sae(self._tasks[key], sae, p_cfg)
