"""A real HTTP server speaking the OpenAI chat-completions API, started by sae-explain's tests.

    with ChatServer() as server:              # http://127.0.0.1:<port>/v1, answering on a thread
        ... explain.base_url=server.url ...
        server.requests                        # every request: path, headers, JSON body

Answers are a deterministic function of the prompt (`mode`):
- "rule": a perfect reader of one-word explanations. An explanation request is answered
  `the word "X"`, X the marked span seen most often; a detection question "yes" exactly when X occurs in
  the text; a fuzzing question "yes" exactly when every marked word is X.
- "yes": always "Yes."; "junk": never yes or no.
Faults, counted down per request (and `fail_after`: every request after that many answered 503): `fail_next` requests answered HTTP 503, `slow_next` answered after
`delay_s`, `garbled_next` answered with a body that is not JSON; `refuse` answers every request 404.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EXPLAINED = re.compile(r'Explanation of a feature: "(.*)"\.\nText: (.*)\nQuestion', re.DOTALL)
MARKED = re.compile(r"<<(.*?)>>")
WORD = re.compile(r'the word "(.*)"')


def rule_answer(prompt: str) -> str:
    if "What does the feature detect?" in prompt:
        spans = Counter(s.strip() for s in MARKED.findall(prompt))
        return f'the word "{spans.most_common(1)[0][0]}"' if spans else "nothing"
    m = EXPLAINED.search(prompt)
    if m is None:
        return "I cannot read this prompt."
    word = WORD.fullmatch(m.group(1))
    word, text = (word.group(1) if word else m.group(1)), m.group(2)
    if "are the tokens between" in prompt:
        marked = [w for s in MARKED.findall(text) for w in s.split()]
        return "Yes." if marked and all(w == word for w in marked) else "No."
    return "Yes." if word in text else "No."


class ChatServer:
    def __init__(self, mode: str = "rule", delay_s: float = 0.0):
        self.mode, self.delay_s = mode, delay_s
        self.fail_next = self.slow_next = self.garbled_next = 0
        self.refuse = False
        self.fail_after: int | None = None
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    fail, slow = server.fail_next > 0, server.slow_next > 0
                    garbled = not fail and server.garbled_next > 0  # one fault per request, failures first
                    server.fail_next -= fail
                    server.slow_next -= slow
                    server.garbled_next -= garbled
                    fail = fail or (
                        server.fail_after is not None and len(server.requests) > server.fail_after
                    )
                if slow:
                    time.sleep(server.delay_s)
                if server.refuse or self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": {"message": "no such model"}}')
                if fail:
                    return self._send(503, b'{"error": "busy"}')
                if garbled:
                    return self._send(200, b"<html>not json")
                prompt = body["messages"][-1]["content"]
                text = {"rule": rule_answer, "yes": lambda p: "Yes.", "junk": lambda p: "Maybe, who knows."}[
                    server.mode
                ](prompt)
                reply = {"object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}]}  # fmt: skip
                self._send(200, json.dumps(reply).encode())

            def _send(self, code: int, data: bytes):
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def prompts(self, kind: str) -> list[str]:
        """The user prompts of one kind of request: explain, detection or fuzzing."""
        key = {"explain": "What does the feature detect?", "detection": "does this text contain",
               "fuzzing": "are the tokens between"}[kind]  # fmt: skip
        return [r["body"]["messages"][-1]["content"] for r in self.requests
                if key in r["body"]["messages"][-1]["content"]]  # fmt: skip

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
