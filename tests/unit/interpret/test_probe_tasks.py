"""The built-in probing tasks on a tiny store harvested from markdown plays written here.

Titles are First Folio play names (plus Pericles, which the Folio lacks), so the genre labels, the
held-out plays and the speaker headings are all known from the construction of the corpus.
"""

from __future__ import annotations

import json
import random

import pytest

from sae_pipeline import harvest, layout, probe
from sae_pipeline.data.store import read_manifest
from sae_pipeline.errors import UserError
from sae_pipeline.sae import CONFIG_CLASSES, build_sae, save_sae
from tests.helpers import compose_config, save_tiny_model, tiny_overrides

PLAYS = {  # title -> First Folio genre (None: not in the Folio)
    "hamlet": "tragedy", "macbeth": "tragedy", "othello": "tragedy", "king-lear": "tragedy",
    "twelfth-night": "comedy", "as-you-like-it": "comedy", "the-tempest": "comedy",
    "henry-v": "history", "richard-ii": "history", "king-john": "history", "pericles": None,
}  # fmt: skip
WORDS = ["the", "king", "crown", "love", "night", "hath", "thou", "art"]


def _play(rng: random.Random) -> str:
    lines = ["# A Play", "", "## ACT I", ""]
    for _ in range(40):
        lines += [f"**{rng.choice(['KING', 'QUEEN', 'FOOL'])}**  "]
        lines += [" ".join(rng.choice(WORDS) for _ in range(6)) + ",  " for _ in range(rng.randint(1, 3))]
        lines += ["", "_Exit KING_", ""] if rng.random() < 0.2 else [""]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def play_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plays")
    rng = random.Random(0)
    corpus = tmp / "plays.jsonl"
    corpus.write_text("".join(json.dumps({"title": t, "text": _play(rng)}) + "\n" for t in PLAYS))
    model_dir = save_tiny_model(tmp / "model")
    (store,) = harvest.run(compose_config("harvest", tiny_overrides(tmp, model_dir, corpus, n_tokens=800)))
    sae = build_sae(
        CONFIG_CLASSES["relu"](d_sae=48, normalize_input=False), d_in=read_manifest(store)["d_in"], seed=0
    )
    m = read_manifest(store)
    save_sae(
        sae,
        tmp / "run" / layout.FINAL_SAE,
        extra={"store": str(store), "hook": m["hook"]["name"], "model": m["model"]},
    )
    (tmp / "run" / layout.CONFIG).write_text(json.dumps({"store": str(store)}))
    return tmp, m


def _probe(tmp, *extra):
    over = [f"sae_path={tmp / 'run'}", f"paths.root={tmp / 'runs'}", "probe.device=cpu", "probe.ks=[1,2]",
            "probe.Cs=[0.1,10.0]", "probe.n_bootstrap=20", "probe.contexts_per_doc=2", "logger=none", *extra]  # fmt: skip
    return probe.run(compose_config("probe", over))["run"]


def test_genre_uses_the_first_folio_and_splits_whole_plays(play_run):
    tmp, m = play_run
    r = _probe(tmp, "probe_task=genre")
    assert r["classes"] == ["comedy", "history", "tragedy"]
    docs = r["documents"]["train"] + r["documents"]["test"]
    assert sorted(docs) == sorted(t for t, g in PLAYS.items() if g)  # Pericles is not in the Folio
    assert not set(r["documents"]["train"]) & set(r["documents"]["test"])
    # 30% of each class's plays, at least one: 1 comedy (of 3), 1 history (of 3), 1 tragedy (of 4)
    assert r["splits"]["test"]["documents"] == 3 and r["splits"]["test"]["examples"] == 6
    held = {list(PLAYS)[i] for i in m["dataset"]["heldout"]["eval_indices"]}
    n_in_store = {s: sum(d not in held for d in r["documents"][s]) for s in ("train", "test")}
    assert r["in_store_training_documents"] == n_in_store


def test_play_task_tells_the_held_out_plays_apart_by_sections(play_run):
    tmp, m = play_run
    r = _probe(tmp, "probe_task=play", "probe.contexts_per_doc=1")
    held = sorted(list(PLAYS)[i] for i in m["dataset"]["heldout"]["eval_indices"])
    assert r["classes"] == held and r["in_store_training_documents"] == {"train": 0, "test": 0}
    # 4 sections per play, 25% held out: one section of each play in probe-test
    assert r["splits"]["test"] == {"examples": 2, "documents": 2, "per_class": dict.fromkeys(held, 1)}
    assert sorted(d.split("#")[0] for d in r["documents"]["test"]) == held


def test_speaker_headings_are_probed_per_token(play_run):
    tmp, _ = play_run
    r = _probe(tmp, "probe_task=speaker")
    assert r["level"] == "token" and list(r["results"]) == ["token"]
    assert (
        r["splits"]["train"]["per_class"]["speaker"] > 0 and r["splits"]["test"]["per_class"]["speaker"] > 0
    )
    # heading characters are upper case or '*', spoken ones lower case: the token itself tells
    assert r["results"]["token"]["dense"]["balanced_accuracy"] >= 0.95


def test_files_task_without_files_is_one_sentence(play_run):
    tmp, _ = play_run
    with pytest.raises(UserError, match="probe.data_files"):
        _probe(tmp, "probe_task=files")
    with pytest.raises(UserError, match="probe.test_fraction"):
        _probe(tmp, "probe.test_fraction=1.5")
