"""VQA backends' plumbing on random test models (their answers are noise: these tests check shapes,
types, batching, determinism, caching and errors, never accuracy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from selma_core.errors import ConfigError, EndpointError
from selma_core.metrics.answer_cache import AnswerCache
from selma_core.metrics.vqa import (
    Blip2Vqa,
    ChatVlmVqa,
    InstructBlipVqa,
    VqaBackend,
    cached_backend,
    clean_answer,
    image_png_bytes,
    load_vqa_backend,
)

BACKENDS = {
    "blip2": (Blip2Vqa, "random:tiny-blip2"),
    "instructblip": (InstructBlipVqa, "random:tiny-instructblip"),
    "chat-vlm": (ChatVlmVqa, "random:tiny-vlm"),
}
QUESTIONS = ["how many cats are there?", "what color is it?", "is the red ball left of the box?"]


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend(request, model_cache):
    cls, spec = BACKENDS[request.param]
    # batch_size 2 with 3 questions: one full batch and one short one
    return cls(spec, model_cache, batch_size=2, max_new_tokens=6, progress=False)


def test_plumbing_answers_are_short_clean_strings_and_prob_yes_is_a_probability(backend):
    assert isinstance(backend, VqaBackend)
    answers = backend.answer(images(3), QUESTIONS)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert all(a == clean_answer(a) for a in answers)
    probs = backend.prob_yes(images(3), ["two cats", "a red ball", "three cups on a table"])
    assert len(probs) == 3 and all(isinstance(p, float) and 0.0 <= p <= 1.0 for p in probs)
    assert backend.answer([], []) == [] and backend.prob_yes([], []) == []


def test_plumbing_a_batch_equals_one_by_one(backend):
    imgs, texts = images(3), ["two cats", "a red ball left of a box", "cups"]
    answers = backend.answer(imgs, QUESTIONS)
    probs = backend.prob_yes(imgs, texts)
    assert answers == [backend.answer([i], [q])[0] for i, q in zip(imgs, QUESTIONS, strict=True)]
    alone = [backend.prob_yes([i], [t])[0] for i, t in zip(imgs, texts, strict=True)]
    assert probs == pytest.approx(alone, abs=1e-5)


def test_plumbing_two_calls_give_the_same_results(backend):
    imgs = images(2, seed=1)
    assert backend.answer(imgs, QUESTIONS[:2]) == backend.answer(imgs, QUESTIONS[:2])
    assert backend.prob_yes(imgs, QUESTIONS[:2]) == backend.prob_yes(imgs, QUESTIONS[:2])


def test_plumbing_version_names_the_model_dtype_and_prompt_version(backend):
    assert backend.spec in backend.version and "#v" in backend.version
    assert "dtype=float32" in backend.version and "prompts=v" in backend.version


def test_plumbing_prob_yes_is_the_next_token_probability_of_yes(model_cache):
    """P("Yes") by hand: softmax over the whole vocabulary at the last prompt position (no padding)."""
    vqa = ChatVlmVqa("random:tiny-vlm", model_cache, progress=False)
    image, text = images(1)[0], "a red ball"
    inputs = vqa._inputs([image], [vqa.yes_template.format(text=text)])
    with torch.no_grad():
        logits = vqa.model(**inputs).logits[0, -1]
    expected = torch.softmax(logits.float(), dim=-1)[vqa.tokenizer.convert_tokens_to_ids("▁Yes")].item()
    assert vqa.yes_token_id == vqa.tokenizer.convert_tokens_to_ids("▁Yes")
    assert vqa.prob_yes([image], [text])[0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "cls, spec", [(InstructBlipVqa, "random:tiny-instructblip"), (Blip2Vqa, "random:tiny-blip2")]
)
def test_flan_t5_backends_score_the_lower_case_yes_as_t2v_metrics_does(model_cache, cls, spec):
    """T5's vocabulary has both '▁yes' and '▁Yes'; FlanT5 answers 'yes', and t2v_metrics scores it."""
    vqa = cls(spec, model_cache, progress=False)
    assert vqa.yes_answer == "yes" and "|yes=yes|" in vqa.version
    assert vqa.yes_token_id == vqa.tokenizer("yes", add_special_tokens=False).input_ids[0]
    assert vqa.yes_template.startswith("Question: Does this figure show")
    assert cls(spec, model_cache, progress=False, yes_answer="Yes").yes_answer == "Yes"  # still settable


class Counting:
    """A VqaBackend that counts the model calls (and pairs) reaching the backend it wraps."""

    def __init__(self, inner: VqaBackend) -> None:
        self.inner, self.name, self.version = inner, inner.name, inner.version
        self.answer_template = inner.answer_template
        self.yes_template = inner.yes_template
        self.calls: list[tuple[str, int]] = []

    def answer(self, imgs, questions):
        self.calls.append(("answer", len(questions)))
        return self.inner.answer(imgs, questions)

    def prob_yes(self, imgs, texts):
        self.calls.append(("prob_yes", len(texts)))
        return self.inner.prob_yes(imgs, texts)


def test_plumbing_the_cache_answers_a_second_call_without_the_model(model_cache, tmp_path):
    counting = Counting(Blip2Vqa("random:tiny-blip2", model_cache, batch_size=4, progress=False))
    imgs = images(2)
    # one image asked two questions, and one pair asked twice: 3 distinct pairs reach the model
    batch_images = [imgs[0], imgs[0], imgs[1], imgs[1]]
    batch_questions = [QUESTIONS[0], QUESTIONS[1], QUESTIONS[2], QUESTIONS[2]]
    with AnswerCache(tmp_path / "answers.sqlite") as cache:
        vqa = cached_backend(counting, cache)
        assert isinstance(vqa, VqaBackend) and vqa.version == counting.version
        answers = vqa.answer(batch_images, batch_questions)
        probs = vqa.prob_yes(batch_images, batch_questions)
        assert counting.calls == [("answer", 3), ("prob_yes", 3)]
        assert answers == counting.inner.answer(batch_images, batch_questions)
        counting.calls.clear()

        assert vqa.answer(batch_images, batch_questions) == answers
        assert vqa.prob_yes(batch_images, batch_questions) == pytest.approx(probs, abs=1e-12)
        # the committed PNG bytes of an image are the same key as the image itself
        assert vqa.answer([image_png_bytes(imgs[1])], [QUESTIONS[2]]) == [answers[2]]
        assert counting.calls == []
        assert len(cache) == 6  # 3 answers + 3 scores (their prompt templates differ)

        other = images(1, seed=5)[0]
        vqa.answer([imgs[0], other], [QUESTIONS[0], QUESTIONS[0]])
        assert counting.calls == [("answer", 1)]


def test_plumbing_long_lists_show_a_progress_bar(model_cache, capsys):
    vqa = ChatVlmVqa("random:tiny-vlm", model_cache, batch_size=2, max_new_tokens=2)
    assert len(vqa.answer(images(3), QUESTIONS)) == 3
    assert "chat-vlm answer" in capsys.readouterr().err
    assert len(vqa.answer(images(2), QUESTIONS[:2])) == 2  # one batch: no bar
    assert "chat-vlm answer" not in capsys.readouterr().err


def test_plumbing_clean_answer():
    assert clean_answer("  Yes.\n") == "yes"
    assert clean_answer("Two  red\tBalls") == "two red balls"
    assert clean_answer("") == ""


def test_mismatched_lengths_are_an_error(model_cache):
    vqa = load_vqa_backend("chat-vlm", "random:tiny-vlm", model_cache, progress=False)
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        vqa.answer(images(2), ["x"])
    with pytest.raises(ConfigError, match="unknown VQA backend"):
        load_vqa_backend("pali", "random:tiny-vlm", model_cache)


@pytest.mark.parametrize("kind", list(BACKENDS))
def test_offline_an_uncached_hub_model_is_a_config_error_naming_it(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cls = BACKENDS[kind][0]
    with pytest.raises(ConfigError) as error:
        cls("selma-test/no-such-vqa-model", tmp_path)
    message = str(error.value)
    assert (
        "'selma-test/no-such-vqa-model'" in message and "hf download selma-test/no-such-vqa-model" in message
    )
    assert "local folder" in message


def test_a_missing_local_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="local folder not found"):
        Blip2Vqa(str(tmp_path / "no-model"), tmp_path)


def hub_cache_with(model_cache, tmp_path, monkeypatch, repo_id: str, commit: str):
    """A Hugging Face hub cache (HF_HUB_CACHE) holding the random tiny VLM as ``repo_id`` at ``commit``."""
    import shutil

    import huggingface_hub.constants

    from selma_core.models.random_models import materialize_random_model

    repo = tmp_path / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(materialize_random_model("random:tiny-vlm", model_cache), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_offline_a_model_in_the_hub_cache_loads_and_its_version_names_the_snapshot(
    model_cache, tmp_path, monkeypatch
):
    commit = "0123456789abcdef0123456789abcdef01234567"
    hub_cache_with(model_cache, tmp_path, monkeypatch, "selma-test/cached-vlm", commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vqa = ChatVlmVqa("selma-test/cached-vlm", tmp_path, progress=False)
    assert vqa.version.startswith(f"selma-test/cached-vlm@{commit}|")
    assert len(vqa.answer(images(1), ["what?"])) == 1


@pytest.mark.parametrize(
    ("problem", "error", "words"),
    [
        (("unreachable", "ConnectError: no route"), EndpointError, "hub is unreachable"),
        (("missing", "RepositoryNotFoundError: 404"), ConfigError, "no such model"),
    ],
)
def test_online_when_the_hub_cannot_serve_the_model_the_cache_is_tried_then_the_error_names_it(
    problem, error, words, model_cache, tmp_path, monkeypatch
):
    import selma_core.metrics.vqa as vqa_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(vqa_module, "_probe_hub", lambda repo_id, revision: problem)
    with pytest.raises(error) as raised:
        Blip2Vqa("selma-test/no-such-vqa-model", tmp_path)
    assert "'selma-test/no-such-vqa-model'" in str(raised.value) and words in str(raised.value)
    # ... while a cached copy loads from the cache, without the hub
    hub_cache_with(model_cache, tmp_path, monkeypatch, "selma-test/cached-vlm", "f" * 40)
    assert ChatVlmVqa("selma-test/cached-vlm", tmp_path, progress=False).version.startswith(
        f"selma-test/cached-vlm@{'f' * 40}|"
    )


def test_a_local_model_folders_reference_changes_when_its_weights_are_replaced(tmp_path):
    """The answer cache is keyed by it: weights replaced in place must not reuse old answers."""
    import os

    from selma_core.metrics.vqa import model_reference

    folder = tmp_path / "my-vqa"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"first weights")
    first = model_reference(str(folder), str(folder))
    assert first.startswith(f"{folder.resolve()}#") and model_reference(str(folder), str(folder)) == first
    (folder / "model.safetensors").write_bytes(b"other weights")  # same size, written later
    os.utime(folder / "model.safetensors", ns=(1, 10**18))
    assert model_reference(str(folder), str(folder)) != first
