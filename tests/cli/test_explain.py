"""sae-explain: scores with known answers, prompts, parsing, retries and timeouts, resume, the real CLI.

The model is a real HTTP server speaking the chat-completions API (tests/support/chat_server.py), started here.
Most tests explain a hand-built feature browser whose latents fire exactly on one word each (king, queen,
love; `planted_run`), so the right answers are known: a perfect reader of one-word explanations scores
detection = fuzzing = 1 and, given another latent's word, 0.5 (it says no to everything: right on every
negative, wrong on every positive, and the balanced accuracy is (0 + 1) / 2).
"""

from __future__ import annotations

import json
import random
import shutil
import socket
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from sae_pipeline import layout
from sae_pipeline.errors import UserError
from sae_pipeline.interpret import browser, explanations
from sae_pipeline.interpret import explain_prompts as prompts
from sae_pipeline.interpret.chat import HttpChat, connect
from sae_pipeline.interpret.explain_run import run_explain
from sae_pipeline.interpret.explain_scores import balanced_accuracy, examples, scorable
from sae_pipeline.locks import FolderBusy, hold
from sae_pipeline.schema.explain import ExplainConfig, check_explain_config
from tests.helpers import features_cfg, make_sae_run, run_cli, save_tiny_model
from tests.support.chat_server import ChatServer, rule_answer
from tests.support.wandb_records import summary as wandb_summary

WORDS = ["the", "night", "day", "sword", "art", "thou", "king", "queen", "love"]
PLANTED = {0: "king", 1: "queen", 2: "love"}  # latent -> the one word it fires on
NEUTRAL = WORDS[:6]
SUMMARY_KEYS = {"n_latents", "detection", "fuzzing", "detection_shuffled", "fuzzing_shuffled"}


def _window(rng: random.Random, word: str | None, act: float) -> dict:
    """9 neutral tokens with `word` at two non-adjacent positions (act there, 0 elsewhere)."""
    toks = [WORDS.index(rng.choice(NEUTRAL)) for _ in range(9)]
    acts = [0.0] * 9
    if word is not None:
        for p in (2, 6):
            toks[p], acts[p] = WORDS.index(word), act
    return {"toks": toks, "acts": acts, "act": act, "peak": 2}


def planted_report(seed: int = 0) -> dict:
    rng = random.Random(seed)
    latents = []
    for f, word in PLANTED.items():
        latents.append({
            "id": f, "count": 100 - f, "dead": False,
            "top": [_window(rng, word, 10.0 - 0.1 * i) for i in range(12)],
            "weak": [{**_window(rng, word, 1.0 - 0.1 * q), "quantile": 1 - q / 8} for q in range(8)],
            "silent": [{"toks": _window(rng, None, 0.0)["toks"]} for _ in range(6)],
        })  # fmt: skip
    latents.append({"id": 3, "count": 0, "dead": True, "top": [], "weak": [], "silent": []})
    # the most frequent latent fires in every context: no silent window, so nothing to score detection on
    every = {
        "id": 4,
        "count": 500,
        "dead": False,
        "silent": [],
        "top": [_window(rng, "the", 5.0) for _ in range(12)],
    }
    latents.append({**every, "weak": [{**_window(rng, "the", 0.5), "quantile": 0.5} for _ in range(8)]})
    return {"latents": latents, "tokens": {str(i): w + " " for i, w in enumerate(WORDS)}}


@pytest.fixture
def planted_run(tmp_path) -> Path:
    run = tmp_path / "run"
    (run / layout.FEATURES).mkdir(parents=True)
    browser.write_browser(run / layout.FEATURES, planted_report())
    return run


def cfg(server: ChatServer | None = None, **kw):
    e = OmegaConf.structured(ExplainConfig)
    e.merge_with({"n_latents": 3, "n_score": 3, "n_prompt_top": 4, "retries": 0, "backoff_s": 0.0, **kw})
    if server is not None:
        e.merge_with({"base_url": server.url, "model": "rule-reader"})
    check_explain_config(e)
    return e


def records(run: Path) -> list[dict]:
    return explanations.read(run / layout.EXPLAIN_DIR / layout.EXPLANATIONS)


def summary(run: Path) -> dict:
    return json.loads((run / layout.EXPLAIN_DIR / layout.EXPLAIN_SUMMARY).read_text())


# ----------------------------------------------------------------------------- the mathematics


def test_balanced_accuracy_by_hand():
    labels = [True] * 4 + [False] * 2
    assert balanced_accuracy(labels, labels) == 1.0  # perfect
    assert balanced_accuracy(labels, [True] * 6) == 0.5  # always yes: (1 + 0) / 2
    assert balanced_accuracy(labels, [False] * 6) == 0.5  # always no: (0 + 1) / 2
    assert balanced_accuracy(labels, [None] * 6) == 0.0  # junk is wrong in both classes
    assert balanced_accuracy(labels, [True, True, True, None, False, True]) == (3 / 4 + 1 / 2) / 2
    assert balanced_accuracy([True, True], [True, None]) == 0.5  # one class present: its rate


@pytest.mark.parametrize(
    "answer, want",
    [("Yes", True), ("yes.", True), ("  YES, it does", True), ('"Yes"', True), ("**No**", False), ("no", False),
     ("1", True), ("0", False), ("10", None), ("Y", True), ("The feature is not", None), ("", None),
     ("Maybe, who knows.", None), ("Nope", None), ("yesterday", None)],
)  # fmt: skip
def test_parse_yes_no(answer, want):
    assert prompts.parse_yes_no(answer) is want


def test_parse_explanation():
    assert prompts.parse_explanation('\n\nExplanation: "the word king"\nmore') == "the word king"
    assert prompts.parse_explanation("**royal titles**") == "royal titles"
    assert prompts.parse_explanation("  \n ") == prompts.NO_EXPLANATION
    assert prompts.parse_explanation("x" * 500) == "x" * 200
    assert prompts.show([6, 6, 0, 6], {"6": "king ", "0": "the "}, {0, 1, 3}) == "<<king king >>the <<king >>"


# ----------------------------------------------------------------------------- scores with known answers


def test_perfect_reader_scores_one_and_shuffled_half(planted_run, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with ChatServer("rule") as server:
        run_explain(cfg(server), planted_run)
    recs = {r["latent"]: r for r in records(planted_run)}
    assert sorted(recs) == [0, 1, 2]  # neither the dead latent 3 nor latent 4 that never stays silent
    for f, word in PLANTED.items():
        r = recs[f]
        assert r["explanation"] == f'the word "{word}"'
        assert (r["detection"], r["fuzzing"]) == (1.0, 1.0)
        assert (r["detection_shuffled"], r["fuzzing_shuffled"]) == (0.5, 0.5)
        assert r["shuffled_from"] == (f + 1) % 3 and r["unparsed_answers"] == 0
        assert r["n_detection"] == [3, 3] and r["n_fuzzing"] == [3, 3]
    s = summary(planted_run)
    assert set(s) == SUMMARY_KEYS
    assert s == {
        "n_latents": 3,
        "detection": 1.0,
        "fuzzing": 1.0,
        "detection_shuffled": 0.5,
        "fuzzing_shuffled": 0.5,
    }
    # the requests: model, greedy, token limits, the key from the env var, at /v1/chat/completions
    req = server.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["body"]["model"] == "rule-reader" and req["body"]["temperature"] == 0.0
    assert req["body"]["max_tokens"] == 40 and server.requests[-1]["body"]["max_tokens"] == 4
    # 3 explanations, then per latent 2 explanations x (6 detection + 6 fuzzing) questions
    assert len(server.prompts("explain")) == 3 and len(server.requests) == 3 + 3 * 2 * 12
    # the browser now shows them
    report = browser.read_report(planted_run / layout.FEATURES)
    assert report["latents"][0]["explanation"]["text"] == 'the word "king"'
    assert "explanation" not in report["latents"][3]


def test_prompts_show_top_and_quantile_examples_and_score_only_held_out_ones(planted_run):
    report = planted_report()
    with ChatServer("rule") as server:
        run_explain(cfg(server, n_latents=2, n_prompt_top=4, n_prompt_quantile=2, n_score=2), planted_run)
    king = report["latents"][0]
    strings = report["tokens"]

    def marked(ex):
        return prompts.show(ex["toks"], strings, {i for i, a in enumerate(ex["acts"]) if a > 0})

    explain_prompt = server.prompts("explain")[0]
    shown = king["top"][:4] + king["weak"][0:4:2]  # 4 top contexts, every other quantile example
    for i, ex in enumerate(shown):
        assert f"Example {i + 1}: {marked(ex)}\n" in explain_prompt
    assert f"Example {len(shown) + 1}:" not in explain_prompt
    asked = [p.split("\nText: ")[1].split("\n")[0] for p in server.prompts("detection")[:4]]
    held = [prompts.show(ex["toks"], strings) for ex in [king["weak"][1], king["top"][4]]]
    silent = [prompts.show(ex["toks"], strings) for ex in king["silent"][:2]]
    assert asked == held + silent  # positives the explainer never saw, then contexts where it never fires
    assert not any(marked(ex) in explain_prompt for ex in king["top"][4:] + king["weak"][1::2])


@pytest.mark.parametrize("mode, want, unparsed", [("yes", 0.5, 24), ("junk", 0.0, 24)])
def test_a_scorer_that_always_says_yes_gets_half_and_junk_gets_zero(planted_run, mode, want, unparsed):
    with ChatServer(mode) as server:
        run_explain(cfg(server), planted_run)
    for r in records(planted_run):
        assert [r[k] for k in explanations.SCORES] == [want] * 4
        assert r["unparsed_answers"] == (unparsed if mode == "junk" else 0)
    assert summary(planted_run)["detection"] == want


def test_a_rare_latent_keeps_half_its_top_contexts_for_scoring():
    rng = random.Random(1)
    rec = {
        "top": [_window(rng, "king", 5.0 - i) for i in range(4)],
        "weak": [],
        "silent": [_window(rng, None, 0)],
    }
    ex = examples(rec, planted_report()["tokens"], n_prompt_top=10, n_prompt_quantile=4, n_score=5, seed=0)
    strings = planted_report()["tokens"]
    assert ex.prompt == [prompts.show(w["toks"], strings, {2, 6}) for w in rec["top"][:2]]
    assert ex.positives == [prompts.show(w["toks"], strings) for w in rec["top"][2:]]
    assert len(ex.fuzz_right) == len(ex.fuzz_wrong) == 1 and scorable(ex)
    rec["top"] = rec["top"][:3]  # 2 in the prompt, 1 held out: no wrongly marked example is left to ask about
    assert not scorable(examples(rec, strings, n_prompt_top=10, n_prompt_quantile=4, n_score=5, seed=0))


# ----------------------------------------------------------------------------- the HTTP client


def ask(server_or_url, **kw) -> str:
    url = server_or_url if isinstance(server_or_url, str) else server_or_url.url
    chat = HttpChat(
        url, "m", None, timeout_s=kw.pop("timeout_s", 5.0), retries=kw.pop("retries", 2), backoff_s=0.0
    )
    return chat(prompts.detection_messages('the word "king"', "the king "), 4)


def test_retries_busy_and_garbled_answers_then_succeeds():
    with ChatServer("rule") as server:
        server.fail_next, server.garbled_next = 1, 1
        assert ask(server) == "Yes."
        assert len(server.requests) == 3
        server.fail_next = 3
        with pytest.raises(UserError, match=r"did not answer after 3 tries \(last: HTTP 503\)"):
            ask(server)


def test_timeout_is_retried_and_a_server_that_stays_slow_is_one_sentence():
    # a slow answer sleeps 2 s, twice the timeout; a prompt one has 1 s, however loaded the machine
    with ChatServer("rule", delay_s=2.0) as server:
        server.slow_next = 1
        assert ask(server, timeout_s=1.0) == "Yes."  # the first try timed out, the second answered
        assert len(server.requests) == 2
        server.slow_next = 2
        with pytest.raises(
            UserError, match="did not answer after 2 tries .last: no answer within explain.timeout_s"
        ):
            ask(server, timeout_s=1.0, retries=1)


def test_a_refusal_is_not_retried():
    with ChatServer("rule") as server:
        server.refuse = True
        with pytest.raises(UserError, match=r"refused the request with HTTP 404 .*no such model"):
            ask(server)
        assert len(server.requests) == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_down_server_is_one_sentence():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError) as err:
        ask(url, retries=1)
    msg = str(err.value)
    assert "\n" not in msg and f"explain.base_url={url} did not answer after 2 tries" in msg


# ----------------------------------------------------------------------------- resume, settings, lock


def test_an_interrupted_run_keeps_what_it_wrote_and_continues(planted_run, tmp_path):
    whole = tmp_path / "whole"
    shutil.copytree(planted_run, whole)
    with ChatServer("rule") as server:
        run_explain(cfg(server), whole)
        n_whole = len(server.requests)
        # the server goes down after the explanations and the first latent's 24 questions, plus 5 more
        server.requests.clear()
        server.fail_after = 3 + 24 + 5
        with pytest.raises(UserError, match="did not answer"):
            run_explain(cfg(server), planted_run)
        out = planted_run / layout.EXPLAIN_DIR
        assert [r["latent"] for r in records(planted_run)] == [0]
        assert len(explanations.read(out / layout.EXPLAIN_DRAFTS)) == 3
        with open(out / layout.EXPLANATIONS, "a") as f:  # a line cut short by a kill
            f.write('{"latent": 1, "explanation": "the wo')
        server.requests.clear()
        server.fail_after = None
        run_explain(cfg(server), planted_run)
        assert server.prompts("explain") == []  # every explanation was kept
        assert len(server.requests) == n_whole - 3 - 24  # latents 1 and 2 scored, latent 0 kept
    assert records(planted_run) == records(whole)
    assert summary(planted_run) == summary(whole)


def test_changed_settings_are_refused_and_overwrite_starts_again(planted_run):
    with ChatServer("yes") as server:
        run_explain(cfg(server, n_latents=2), planted_run)
        with pytest.raises(UserError, match=r"other settings \(explain.n_latents\).*explain.overwrite=true"):
            run_explain(cfg(server, n_latents=3), planted_run)
        server.mode = "rule"
        run_explain(cfg(server, n_latents=3, overwrite=True), planted_run)
    assert [r["detection"] for r in records(planted_run)] == [1.0, 1.0, 1.0]


def test_a_second_writer_of_the_explain_folder_is_refused(planted_run):
    (planted_run / layout.EXPLAIN_DIR).mkdir()
    with hold(planted_run / layout.EXPLAIN_DIR), ChatServer("rule") as server:
        with pytest.raises(FolderBusy, match="explain folder"):
            run_explain(cfg(server), planted_run)
        assert server.requests == []


def test_choices_and_bad_input(planted_run):
    with ChatServer("yes") as server:
        run_explain(cfg(server, latents="random", n_latents=2, seed=3), planted_run)
        chosen = sorted(r["latent"] for r in records(planted_run))
        assert len(chosen) == 2 and set(chosen) <= {0, 1, 2}  # live latents only
        for bad, match in [([3, 0], r"\[3\] never fired"), ([0, 9], r"\[9\] are not in the feature browser"),
                           ([1], "at least 2 latents"), ([4, 0], r"\[4\] have too few browser examples")]:  # fmt: skip
            with pytest.raises(UserError, match=match):
                run_explain(cfg(server, latents=bad, overwrite=True), planted_run)
        with pytest.raises(UserError, match="no feature browser"):
            run_explain(cfg(server), planted_run.parent / "elsewhere")
    with pytest.raises(UserError, match="explain.latents must be top, random or a list"):
        cfg(latents="most")


# ----------------------------------------------------------------------------- a model in this process


def test_in_process_model_answers_through_its_chat_template(tmp_path):
    """explain.base_url=null: the answer is transformers' greedy generate on the chat-templated prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = save_tiny_model(tmp_path / "chat", max_position_embeddings=4096)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    tok.save_pretrained(model_dir)
    ask = connect(cfg(None, model=str(model_dir), device="cpu"))
    messages = prompts.detection_messages('the word "king"', "the king said")
    got = ask(messages, 6)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert enc["input_ids"].shape[1] > 60  # the whole prompt went in (character tokens)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert got == tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(out[0]) == enc["input_ids"].shape[1] + 6  # a random model does not stop early: all 6 tokens


def test_in_process_model_without_chat_template_is_one_sentence(planted_run, tmp_path):
    model_dir = save_tiny_model(tmp_path / "base")
    with pytest.raises(UserError, match="has no chat template; give an instruct model"):
        run_explain(cfg(None, model=str(model_dir), device="cpu"), planted_run)


# ----------------------------------------------------------------------------- the real command, a tiny model


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny Llama, its store and a random SAE (helpers.make_sae_run), browsed by sae-features."""
    from sae_pipeline import features

    run = make_sae_run(tmp_path_factory.mktemp("explain"))
    features.run(features_cfg(run))
    return run


def test_sae_explain_cli_end_to_end_on_a_tiny_model(tiny_run, tmp_path):
    from sae_pipeline import features

    common = [f"sae_path={tiny_run}", f"paths.root={tmp_path / 'runs'}", "explain.n_latents=3",
              "explain.n_prompt_top=2", "explain.n_score=2"]  # fmt: skip
    with ChatServer("rule") as server:
        res = run_cli(
            "explain", [*common, f"explain.base_url={server.url}", "explain.model=tiny-chat"], tmp_path
        )
    assert res.returncode == 0, res.stderr
    report = browser.read_report(tiny_run / layout.FEATURES)
    live = sorted((r for r in report["latents"] if not r["dead"]), key=lambda r: (-r["count"], r["id"]))
    ok = [r["id"] for r in live if scorable(examples(r, report["tokens"], 2, 4, 2, seed=0))]
    assert len(ok) < len(live)  # the densest latents fire in every context: nothing silent to score on
    recs = records(tiny_run)
    assert [r["latent"] for r in recs] == ok[:3]  # the three scorable ones that fire most often
    assert [r["explanation"] for r in recs] == [rule_answer(p) for p in server.prompts("explain")]
    s = summary(tiny_run)
    assert set(s) == SUMMARY_KEYS and s["n_latents"] == 3
    for k in explanations.SCORES:
        assert s[k] == pytest.approx(sum(r[k] for r in recs) / 3, abs=1e-12) and 0.0 <= s[k] <= 1.0
    by_id = {r["id"]: r for r in report["latents"]}
    assert [by_id[r["latent"]]["explanation"]["text"] for r in recs] == [r["explanation"] for r in recs]
    # the same scores and explanations in an (offline) W&B run beside them
    (log,) = (tiny_run / layout.EXPLAIN_DIR).glob("wandb/offline-run-*/run-*.wandb")
    wb = wandb_summary(log)
    assert wb["name"] == f"explain-{tiny_run.name}" and wb["config"]["latent_ids"] == ok[:3]
    assert {k: wb["summary"][f"explain/{k}"] for k in SUMMARY_KEYS} == s
    (row,) = [h for h in wb["history"] if "explain/explanations/path" in h]
    table = json.loads((log.parent / "files" / row["explain/explanations/path"]).read_text())
    assert table["columns"] == ["latent", "explanation", *explanations.SCORES]
    assert table["data"] == [[r[c] for c in table["columns"]] for r in recs]
    # a rebuilt browser keeps showing them
    features.run(features_cfg(tiny_run))
    rebuilt = {r["id"]: r for r in browser.read_report(tiny_run / layout.FEATURES)["latents"]}
    assert [rebuilt[r["latent"]]["explanation"]["detection"] for r in recs] == [r["detection"] for r in recs]
    # a server that is down: one sentence, exit code 2
    down = f"http://127.0.0.1:{free_port()}/v1"
    res = run_cli("explain", [*common, f"explain.base_url={down}", "explain.model=m", "explain.retries=0",
                              "explain.overwrite=true"], tmp_path)  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: the model server at explain.base_url={down} did not answer after 1 tries (last: [Errno 111] "
        "Connection refused); start it or point explain.base_url at a running one"
    ]


def test_explain_latents_is_the_stage_as_a_function(tiny_run, tmp_path):
    from sae_pipeline import explain_latents

    run = shutil.copytree(tiny_run, tmp_path / "run")
    shutil.rmtree(run / layout.EXPLAIN_DIR, ignore_errors=True)
    with ChatServer("rule") as server:
        out = explain_latents(
            run,
            {
                "explain.base_url": server.url,
                "explain.model": "tiny-chat",
                "explain.n_latents": 2,
                "explain.n_score": 2,
                "logger": "none",
            },
        )
    assert out == run / layout.EXPLAIN_DIR
    assert [r["explanation"] for r in records(run)] == [rule_answer(p) for p in server.prompts("explain")]
    assert summary(run)["n_latents"] == 2 and not (out / "wandb").exists()


def test_silent_contexts_never_fire(tiny_run):
    """Every silent window of the browser is in a held-out context where its latent is 0 at every token."""
    import torch

    from sae_pipeline.data import text
    from sae_pipeline.runs import load_all

    _, spec, model, tok, sae, hook = load_all(str(tiny_run), "cpu")
    report = browser.read_report(tiny_run / layout.FEATURES)
    ids_NT, mask_NT = text.heldout_contexts(spec.manifest, tok, report["settings"]["n_tokens"])
    with torch.no_grad():
        x_NTD = model(ids_NT, output_hidden_states=True).hidden_states[hook.layer + 1]  # resid_post
        acts_NTF = (
            sae.encode(x_NTD.reshape(-1, x_NTD.shape[-1])).reshape(*ids_NT.shape, -1) * mask_NT[..., None]
        )
    n_checked = 0
    for r in report["latents"]:
        quiet = int(((acts_NTF[..., r["id"]].amax(dim=1) == 0) & mask_NT.any(dim=1)).sum())
        assert len(r["silent"]) == min(8, quiet)  # features.n_silent, or every quiet context when fewer
        for ex in r["silent"]:
            assert acts_NTF[ex["ctx"], :, r["id"]].max() == 0 and bool(mask_NT[ex["ctx"], ex["pos"]])
            assert ex["toks"] == ids_NT[ex["ctx"], ex["start"] : ex["start"] + len(ex["toks"])].tolist()
            n_checked += 1
    assert n_checked > 40  # not vacuous: the dense latents of make_sae_run leave few quiet contexts
