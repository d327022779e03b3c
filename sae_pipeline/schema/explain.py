"""Schema of `sae-explain` (ConfigStore name `explain_schema`) and its checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, ListConfig

from sae_pipeline.errors import UserError, check_choice

from .common import LOGGER_MODES, LoggerConfig, PathsConfig

CHOOSERS = ("top", "random")


@dataclass
class ExplainConfig:
    # which latents: `top` (the n_latents that fire most often), `random` (n_latents live ones drawn with
    # `seed`) or an explicit list of latent ids, e.g. [3,17,42]
    latents: Any = "top"
    n_latents: int = 8
    seed: int = 0  # the random choice of latents and of fuzzing's wrongly marked tokens
    # the model: null base_url runs it in this process through transformers (model null: the embedded
    # SmolLM2-135M-Instruct); a base_url such as http://localhost:8000/v1 speaks the OpenAI
    # chat-completions API (vLLM, `transformers serve`, a hosted API), and then `model` names the served model
    base_url: Optional[str] = None
    model: Optional[str] = None
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the API key (sent only when it is set)
    timeout_s: float = 120.0  # per request
    retries: int = 3  # further tries of a request that got no answer, waiting backoff_s, 2x, 4x, ...
    backoff_s: float = 1.0
    device: str = "auto"  # in-process model: auto | cpu | cuda | cuda:N
    explanation_tokens: int = 40  # longest explanation generated
    answer_tokens: int = 4  # longest yes/no answer generated
    n_prompt_top: int = 10  # top contexts shown to the explainer
    n_prompt_quantile: int = 4  # quantile (weak) examples shown to the explainer (every other one)
    n_score: int = 5  # examples per class for detection and for fuzzing (held out from the prompt)
    features_dir: Optional[str] = None  # the browser to explain from; null: <run>/features
    overwrite: bool = False  # start again instead of resuming the explanations already written


@dataclass
class ExplainJob:
    sae_path: str = MISSING  # the run folder sae-features browsed
    paths: PathsConfig = field(default_factory=PathsConfig)
    explain: ExplainConfig = field(default_factory=ExplainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # the scores and explanations to W&B


def check_explain_job(cfg) -> None:
    """Raise a UserError naming the first bad key of the whole sae-explain config."""
    check_explain_config(cfg.explain)
    check_choice("logger.mode", cfg.logger.mode, LOGGER_MODES)


def check_explain_config(e) -> None:
    """Raise a UserError naming the first bad key of `explain`."""
    if isinstance(e.latents, (list, ListConfig)):
        if not all(isinstance(i, int) and i >= 0 for i in e.latents):
            raise UserError(f"explain.latents must list latent ids >= 0, got {list(e.latents)}.")
    elif e.latents not in CHOOSERS:
        raise UserError(f"explain.latents must be top, random or a list of latent ids, got {e.latents!r}.")
    for key in ("n_latents", "explanation_tokens", "answer_tokens", "n_prompt_top", "n_score"):
        if int(e[key]) < 1:
            raise UserError(f"explain.{key} must be >= 1, got {e[key]}.")
    for key in ("retries", "n_prompt_quantile"):
        if int(e[key]) < 0:
            raise UserError(f"explain.{key} must be >= 0, got {e[key]}.")
    if float(e.timeout_s) <= 0 or float(e.backoff_s) < 0:
        raise UserError("explain.timeout_s must be > 0 and explain.backoff_s >= 0.")
