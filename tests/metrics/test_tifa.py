"""TIFA scoring: upstream's sample result reproduced, the choice matchers, and the scoring rules by hand."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import BENCHMARKS, REPO, needs_benchmarks

from selma_core.errors import ConfigError, InputError
from selma_core.metrics.tifa import (
    ChoiceMatchError,
    EmbeddingChoiceMatcher,
    ExactChoiceMatcher,
    SentenceEmbedder,
    TifaQuestion,
    load_answers,
    load_questions,
    score_tifa,
)

BENCH = BENCHMARKS
TIFA = BENCH / "tifa"
needs_bench = needs_benchmarks


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "selma_core.metrics.tifa", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def sample_args() -> list[str]:
    return [
        "--questions",
        str(TIFA / "sample_question_answers.json"),
        "--answers",
        str(TIFA / "sample_evaluation_result.json"),
    ]


@needs_bench
def test_cli_reproduces_upstreams_sample_result():
    expected = json.loads((TIFA / "sample_evaluation_result.json").read_text())
    proc = run_cli(*sample_args())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tifa_average"] == expected["tifa_average"] == 0.8125
    assert out["tifa_stdev"] == expected["tifa_stdev"]
    assert out["accuracy_by_type"] == expected["accuracy_by_type"]
    assert list(out["accuracy_by_type"]) == list(expected["accuracy_by_type"])
    assert out["accuracy_by_type"]["counting"] == 1 / 3
    assert out["caption_scores"] == expected["caption_scores"]
    assert (out["prompts"], out["questions"]) == (2, 19)


@needs_bench
def test_sample_free_form_answers_need_the_embedding_matcher():
    # One free-form answer ('0' dogs) is not a choice; upstream's SBERT mapped it to '1'.
    proc = run_cli(*sample_args(), "--answer-field", "free_form_vqa")
    assert proc.returncode == 2
    assert "drawbench_52" in proc.stderr and "how many dogs" in proc.stderr and "'0'" in proc.stderr
    assert "--matcher embedding" in proc.stderr
    questions = load_questions(TIFA / "sample_question_answers.json")
    free_form = load_answers(TIFA / "sample_evaluation_result.json", "free_form_vqa")
    result = score_tifa(questions, free_form, EmbeddingChoiceMatcher(digit_embed))
    assert result.tifa_average == 0.8125
    assert {(s.vqa_answer, s.choice) for s in result.questions if s.vqa_answer != s.choice} == {("0", "1")}


def test_embedding_model_offline_error_names_it_and_how_to_provide_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError) as e:
        SentenceEmbedder("selma-test/no-such-sentence-model")
    assert "selma-test/no-such-sentence-model" in str(e.value)
    assert "local folder" in str(e.value) and "hf download" in str(e.value)


def test_help():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "tifa_average" in proc.stdout and "--matcher" in proc.stdout


def digit_embed(texts: list[str]) -> np.ndarray:
    """A fake embedder: numbers on a quarter circle, so '0' is nearest '1'."""
    return np.array([[math.cos(float(t) * 0.3), math.sin(float(t) * 0.3)] for t in texts])


def test_exact_matcher_normalizes_and_names_what_fails():
    m = ExactChoiceMatcher()
    assert m.match("yes", ["yes", "no"]) == "yes"
    assert m.match("Yes.", ["yes", "no"]) == "yes"
    assert m.match("  a  Surfer ", ["a surfer", "swimmer"]) == "a surfer"
    with pytest.raises(ChoiceMatchError, match=r"'maybe' is none of the choices \['yes', 'no'\]"):
        m.match("maybe", ["yes", "no"])
    with pytest.raises(ChoiceMatchError, match="several"):
        m.match("red", ["Red", "red!", "blue"])


def test_embedding_matcher_exact_first_then_nearest_first_on_ties():
    calls: list[list[str]] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(texts)
        return digit_embed(texts)

    m = EmbeddingChoiceMatcher(embed)
    assert m.match("2", ["1", "2", "3"]) == "2" and calls == []
    assert m.match("0", ["3", "1", "2"]) == "1"
    tied = EmbeddingChoiceMatcher(
        lambda texts: np.array([[1.0, 0.0] if t == "x" else [0.6, 0.8] for t in texts])
    )
    assert tied.match("x", ["b", "a"]) == "b"  # equally near: the first, as upstream's argmax


def test_sentence_embedder_from_a_local_folder(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "blue", "green", "dog", "cat", "pale"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "model")
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    )
    BertModel(config).save_pretrained(tmp_path / "model")
    embedder = SentenceEmbedder(str(tmp_path / "model"), offline=True)
    vectors = embedder(["pale green", "green", "dog"])
    assert vectors.shape == (3, 16)
    assert np.linalg.norm(vectors, axis=1) == pytest.approx(np.ones(3), abs=1e-5)
    m = EmbeddingChoiceMatcher.from_pretrained(str(tmp_path / "model"), offline=True)
    assert m.match("pale green", ["red", "blue", "green"]) in ("red", "blue", "green")
    with pytest.raises(ConfigError, match="local folder not found"):
        SentenceEmbedder(str(tmp_path / "nowhere"))


def q(prompt: str, question: str, answer: str, kind: str, choices=("yes", "no")) -> TifaQuestion:
    return TifaQuestion(prompt, question, tuple(choices), answer, kind)


def test_prompt_mean_and_per_type_accuracy():
    questions = [
        q("p1", "a?", "yes", "object"),
        q("p1", "b?", "yes", "color"),
        q("p1", "c?", "2", "counting", ("1", "2", "3")),
        q("p1", "d?", "yes", "counting"),
        q("p2", "e?", "yes", "object"),
    ]
    answers = {
        ("p1", "a?"): "yes",
        ("p1", "b?"): "no",
        ("p1", "c?"): "2",
        ("p1", "d?"): "no",
        ("p2", "e?"): "yes",
    }
    result = score_tifa(questions, answers)
    assert result.prompt_scores == {"p1": 0.5, "p2": 1}
    assert result.tifa_average == 0.75  # mean over prompts, not over the 5 questions (0.6)
    assert result.accuracy_by_type == {"object": 1, "color": 0, "counting": 0.5}
    assert result.to_json()["questions"] == 5 and result.tifa_stdev == pytest.approx(math.sqrt(0.125))
    # A question asked twice for a prompt counts twice, with its one answer (as upstream).
    twice = score_tifa([*questions, questions[0]], answers)
    assert twice.prompt_scores["p1"] == 0.6


def test_missing_and_stray_answers_are_named():
    questions = [q("p1", "a?", "yes", "object"), q("p1", "b?", "yes", "color")]
    with pytest.raises(InputError, match=r"no answer to prompt p1 question 'b\?'"):
        score_tifa(questions, {("p1", "a?"): "yes"})
    with pytest.raises(InputError, match=r"answer to prompt p9 question 'z\?': no such question"):
        score_tifa(questions, {("p1", "a?"): "yes", ("p1", "b?"): "no", ("p9", "z?"): "no"})


def test_answer_and_question_files(tmp_path):
    (tmp_path / "plain.json").write_text(json.dumps({"p1": {"a?": "yes"}}))
    assert load_answers(tmp_path / "plain.json") == {("p1", "a?"): "yes"}
    (tmp_path / "nofield.json").write_text(
        json.dumps({"question_details": {"p1": {"a?": {"free_form_vqa": "x"}}}})
    )
    with pytest.raises(InputError, match=r"prompt p1 question 'a\?': no key 'multiple_choice_vqa'"):
        load_answers(tmp_path / "nofield.json")
    (tmp_path / "q.json").write_text(json.dumps([{"id": "p1", "question": "a?", "choices": ["yes", "no"]}]))
    with pytest.raises(InputError, match=r"q.json, entry 0: no key answer, element_type"):
        load_questions(tmp_path / "q.json")
    with pytest.raises(InputError, match="not found"):
        load_questions(tmp_path / "missing.json")


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def test_questions_from_a_url_with_a_checksum(tmp_path):
    body = [
        {"id": "p1", "question": "a?", "choices": ["yes", "no"], "answer": "yes", "element_type": "object"}
    ]
    (tmp_path / "qa.json").write_text(json.dumps(body))
    digest = hashlib.sha256((tmp_path / "qa.json").read_bytes()).hexdigest()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(tmp_path)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/qa.json"
        assert load_questions(url, sha256=digest)[0] == q("p1", "a?", "yes", "object")
        with pytest.raises(InputError, match="SHA-256"):
            load_questions(url, sha256="0" * 64)
        with pytest.raises(InputError, match="HTTP 404"):
            load_questions(url.replace("qa.json", "nope.json"))
    finally:
        server.shutdown()
        server.server_close()


def test_the_sentence_embedder_refuses_pickle_weights(tmp_path, model_cache):
    """Safetensors only, as every loader: a folder holding only pytorch_model.bin is refused."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from selma_core.errors import SelmaError
    from selma_core.metrics.tifa import SentenceEmbedder
    from selma_core.models.random_models import materialize_random_model

    source = materialize_random_model("random:tiny-lm", model_cache)
    folder = tmp_path / "pickled"
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises((SelmaError, OSError), match="safetensors|pytorch_model.bin"):
        SentenceEmbedder(str(folder), offline=True)
    assert SentenceEmbedder(str(source), offline=True)(["a cat"]).shape[0] == 1
