"""TIFA v1.0 scores from VQA answers (Hu et al., ICCV 2023; github.com/Yushi-Hu/tifa).

Each prompt has multiple-choice questions (``choices``, the correct ``answer``, an ``element_type``
such as color or counting). As upstream (``tifa/vqa_models.py`` ``multiple_choice_vqa`` and
``tifa/tifa_score.py`` ``tifa_score_benchmark``):

- a VQA model's free-form answer is mapped to a choice: itself when it is one of the choices, else
  the nearest choice by sentence embedding (upstream: SBERT ``all-mpnet-base-v2``, mean-pooled,
  L2-normalised, largest dot product, first on ties);
- a question scores 1 when the mapped choice equals ``answer``;
- a prompt's score is the fraction of its questions scored 1; ``tifa_average`` is the mean over
  prompts (``tifa_stdev`` their sample standard deviation); ``accuracy_by_type`` is the fraction of
  questions of each ``element_type`` scored 1, pooled over prompts (types in first-seen order).

The mapping is a ``ChoiceMatcher``: ``ExactChoiceMatcher`` (the answer is a choice, or is one after
lowercasing and trimming spaces and punctuation; anything else is an error naming it), for answers
that are already choices such as upstream's ``multiple_choice_vqa``; ``EmbeddingChoiceMatcher``
(upstream's rule, with a transformers encoder from a hub id or a local folder; offline it only reads
the local cache and its error says how to provide the model).

Inputs: questions as upstream's ``tifa_v1.0_question_answers.json`` (a list of
``{id, caption, question, choices, answer, element_type, element}``; the same format as
``sample_question_answers.json``), from a path or an http(s) URL with an optional SHA-256. Answers
as upstream's result file (``{"question_details": {prompt id: {question: {..., "free_form_vqa",
"multiple_choice_vqa"}}}}``, e.g. ``sample_evaluation_result.json``; ``--answer-field`` picks which),
or plain ``{prompt id: {question: answer}}``. A question asked twice for one prompt counts twice,
with the one answer (upstream keys answers by question text too).

CLI: ``python -m selma_core.metrics.tifa --questions Q.json --answers A.json`` prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from selma_core.errors import ConfigError, InputError, SelmaError

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-mpnet-base-v2"
TIFA_V1_QUESTIONS_URL = (
    "https://raw.githubusercontent.com/Yushi-Hu/tifa/main/tifa_v1.0/tifa_v1.0_question_answers.json"
)
ANSWER_FIELDS = ("multiple_choice_vqa", "free_form_vqa")
_QUESTION_KEYS = ("id", "question", "choices", "answer", "element_type")


@dataclass(frozen=True)
class TifaQuestion:
    prompt_id: str
    question: str
    choices: tuple[str, ...]
    answer: str  # the correct choice
    element_type: str
    caption: str = ""
    element: str = ""


class ChoiceMatcher(Protocol):
    """Maps a VQA model's answer to one of a question's choices."""

    def match(self, answer: str, choices: Sequence[str]) -> str: ...


class ChoiceMatchError(InputError):
    """An answer that a matcher cannot map to one of the choices."""


def _normalize(text: str) -> str:
    return " ".join(re.sub(r"^[\W_]+|[\W_]+$", "", text.casefold().strip()).split())


class ExactChoiceMatcher:
    """The answer itself when it is a choice, else the one choice equal after normalization.

    Normalization: casefold, trim spaces and leading/trailing punctuation, collapse inner spaces.
    An answer matching no choice, or several, is a ``ChoiceMatchError``.
    """

    def match(self, answer: str, choices: Sequence[str]) -> str:
        if answer in choices:
            return answer
        key = _normalize(answer)
        hits = [c for c in choices if _normalize(c) == key]
        if len(hits) == 1:
            return hits[0]
        if not hits:
            raise ChoiceMatchError(
                f"answer {answer!r} is none of the choices {list(choices)} (use the embedding matcher "
                "for free-form answers: eval.tifa_matcher embedding, or --matcher embedding on the "
                "command line)"
            )
        raise ChoiceMatchError(f"answer {answer!r} matches several choices {hits} after normalization")


Embedder = Callable[[list[str]], Any]  # texts -> array (n, d) of L2-normalised embeddings


class EmbeddingChoiceMatcher:
    """Upstream's rule: the answer when it is a choice, else the choice of largest embedding dot product."""

    def __init__(self, embed: Embedder) -> None:
        self.embed = embed

    @classmethod
    def from_pretrained(
        cls,
        spec: str = DEFAULT_EMBEDDING_MODEL,
        device: str = "cpu",
        offline: bool | None = None,
        cache_dir: str | Path = "selma-data/cache",
    ) -> EmbeddingChoiceMatcher:
        return cls(SentenceEmbedder(spec, device=device, offline=offline, cache_dir=cache_dir))

    def match(self, answer: str, choices: Sequence[str]) -> str:
        import numpy as np

        if answer in choices:
            return answer
        if not choices:
            raise ChoiceMatchError(f"answer {answer!r}: the question has no choices")
        vectors = np.asarray(self.embed([answer, *choices]), dtype=np.float64)
        similarity = vectors[1:] @ vectors[0]
        return choices[int(np.argmax(similarity))]  # first of equal maxima, as torch.argmax upstream


def _hub_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return any(f.strip().upper() in ("1", "ON", "YES", "TRUE") for f in flags)


class SentenceEmbedder:
    """Mean-pooled, L2-normalised last hidden states of a transformers encoder (the SBERT recipe).

    ``spec``: a hub id or a local folder. Offline (``offline=True``, or ``HF_HUB_OFFLINE=1`` /
    ``TRANSFORMERS_OFFLINE=1`` when ``offline`` is None) only the local cache is read: no download is tried.
    """

    def __init__(
        self,
        spec: str = DEFAULT_EMBEDDING_MODEL,
        device: str = "cpu",
        offline: bool | None = None,
        cache_dir: str | Path = "selma-data/cache",
    ):
        from selma_core.models.random_models import is_random_model, materialize_random_model

        if is_random_model(spec):  # a random test model (plumbing only): built into the cache
            spec = str(materialize_random_model(spec, cache_dir))
        local = Path(spec).expanduser()
        if spec.startswith(("/", ".", "~")) and not local.is_dir():
            raise ConfigError(f"sentence-embedding model {spec!r}: local folder not found")
        offline = _hub_offline() if offline is None else offline
        from transformers import AutoModel, AutoTokenizer

        from selma_core.models.loading import model_load_error, weights_kwargs

        source = str(local) if local.is_dir() else spec
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline)
            # Safetensors only, as every loader here: a pickle checkpoint can run code when read.
            self.model = (
                AutoModel.from_pretrained(source, local_files_only=offline, **weights_kwargs(False))
                .to(device)
                .eval()
            )
        except (OSError, ValueError) as e:
            if offline and not local.is_dir():
                raise ConfigError(
                    f"sentence-embedding model {spec!r}: not in the local Hugging Face cache, and downloads "
                    f"are off (offline: HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE); download it where there is a "
                    f"network (hf download {spec}) into this machine's cache, or give a local folder "
                    f"(eval.tifa_embedding_model, or --embedding-model on the command line): {e}"
                ) from e
            raise model_load_error(spec, e) from e
        self.spec = spec
        self.device = device

    def __call__(self, texts: list[str]):
        import torch

        batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            hidden = self.model(**batch)[0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).cpu().numpy()


def _read_json(source: str | Path, what: str, sha256: str | None = None) -> Any:
    text = str(source)
    if text.startswith(("http://", "https://")):
        from selma_core.metrics.benchmarks import fetch_bytes  # one place maps HTTP failures to exit codes

        data = fetch_bytes(text, what=f"TIFA {what}")
    else:
        path = Path(source)
        if not path.is_file():
            raise InputError(f"TIFA {what} file {path} not found")
        data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256.lower():
        raise InputError(
            f"TIFA {what} {text}: SHA-256 {hashlib.sha256(data).hexdigest()} is not the expected {sha256}"
        )
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"TIFA {what} {text}: not JSON: {e}") from e


def load_questions(source: str | Path, sha256: str | None = None) -> list[TifaQuestion]:
    """TIFA questions from a path or an http(s) URL (upstream's question_answers JSON format)."""
    data = _read_json(source, "questions", sha256)
    if not isinstance(data, list) or not data:
        raise InputError(f"TIFA questions {source}: expected a non-empty JSON list of questions")
    questions: list[TifaQuestion] = []
    for i, q in enumerate(data):
        where = f"TIFA questions {source}, entry {i}"
        if not isinstance(q, dict):
            raise InputError(f"{where}: expected an object, got {q!r:.80}")
        missing = [k for k in _QUESTION_KEYS if k not in q]
        if missing:
            raise InputError(f"{where}: no key {', '.join(missing)}")
        choices = q["choices"]
        if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
            raise InputError(
                f"{where} (question {q['question']!r}): choices {choices!r} is not a list of strings"
            )
        for key in ("id", "question", "answer", "element_type"):
            if not isinstance(q[key], str):
                raise InputError(f"{where}: {key} {q[key]!r} is not a string")
        questions.append(
            TifaQuestion(
                prompt_id=q["id"],
                question=q["question"],
                choices=tuple(choices),
                answer=q["answer"],
                element_type=q["element_type"],
                caption=str(q.get("caption", "")),
                element=str(q.get("element", "")),
            )
        )
    return questions


def load_answers(path: str | Path, field: str = "multiple_choice_vqa") -> dict[tuple[str, str], str]:
    """``{(prompt id, question): answer}`` from upstream's result file or ``{prompt id: {question: answer}}``.

    ``field`` picks the answer in upstream's per-question objects (``multiple_choice_vqa`` or
    ``free_form_vqa``).
    """
    data = _read_json(path, "answers")
    if isinstance(data, dict) and "question_details" in data:
        data = data["question_details"]
    if not isinstance(data, dict):
        raise InputError(f"TIFA answers {path}: expected an object keyed by prompt id")
    answers: dict[tuple[str, str], str] = {}
    for prompt_id, per_question in data.items():
        if not isinstance(per_question, dict):
            raise InputError(f"TIFA answers {path}: prompt {prompt_id}: expected an object keyed by question")
        for question, value in per_question.items():
            where = f"TIFA answers {path}: prompt {prompt_id} question {question!r}"
            if isinstance(value, dict):
                if field not in value:
                    raise InputError(f"{where}: no key {field!r} (has: {', '.join(value)})")
                value = value[field]
            if not isinstance(value, str):
                raise InputError(f"{where}: answer {value!r} is not a string")
            answers[(prompt_id, question)] = value
    if not answers:
        raise InputError(f"TIFA answers {path}: no answers")
    return answers


@dataclass(frozen=True)
class TifaQuestionScore:
    prompt_id: str
    question: str
    element_type: str
    vqa_answer: str  # as given
    choice: str  # after the matcher
    correct: bool


@dataclass(frozen=True)
class TifaResult:
    tifa_average: float
    tifa_stdev: float | None  # None with a single prompt
    accuracy_by_type: dict[str, float]
    prompt_scores: dict[str, float]  # upstream's caption_scores
    questions: tuple[TifaQuestionScore, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "tifa_average": self.tifa_average,
            "tifa_stdev": self.tifa_stdev,
            "accuracy_by_type": self.accuracy_by_type,
            "caption_scores": self.prompt_scores,
            "prompts": len(self.prompt_scores),
            "questions": len(self.questions),
        }


def score_tifa(
    questions: Sequence[TifaQuestion],
    answers: Mapping[tuple[str, str], str],
    matcher: ChoiceMatcher | None = None,
) -> TifaResult:
    """Score ``answers`` (``{(prompt id, question): VQA answer}``) on ``questions``.

    Every question needs an answer, and every answer a question (errors name prompt and question).
    ``matcher`` defaults to ``ExactChoiceMatcher()``.
    """
    matcher = matcher or ExactChoiceMatcher()
    if not questions:
        raise InputError("TIFA: no questions to score")
    asked = {(q.prompt_id, q.question) for q in questions}
    stray = [k for k in answers if k not in asked]
    if stray:
        raise InputError(
            f"TIFA answer to prompt {stray[0][0]} question {stray[0][1]!r}: no such question "
            f"({len(stray)} answer(s) without a question)"
        )
    scored: list[TifaQuestionScore] = []
    by_prompt: dict[str, list[int]] = {}
    by_type: dict[str, list[int]] = {}
    for q in questions:
        key = (q.prompt_id, q.question)
        if key not in answers:
            raise InputError(f"TIFA: no answer to prompt {q.prompt_id} question {q.question!r}")
        try:
            choice = matcher.match(answers[key], q.choices)
        except ChoiceMatchError as e:
            raise ChoiceMatchError(f"TIFA prompt {q.prompt_id} question {q.question!r}: {e}") from e
        correct = choice == q.answer
        scored.append(
            TifaQuestionScore(q.prompt_id, q.question, q.element_type, answers[key], choice, correct)
        )
        by_prompt.setdefault(q.prompt_id, []).append(int(correct))
        by_type.setdefault(q.element_type, []).append(int(correct))
    # statistics.mean/stdev as upstream, so the floats are the same.
    prompt_scores = {p: statistics.mean(s) for p, s in by_prompt.items()}
    values = list(prompt_scores.values())
    return TifaResult(
        tifa_average=statistics.mean(values),
        tifa_stdev=statistics.stdev(values) if len(values) > 1 else None,
        accuracy_by_type={t: statistics.mean(s) for t, s in by_type.items()},
        prompt_scores=prompt_scores,
        questions=tuple(scored),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selma_core.metrics.tifa",
        description=(
            "Score TIFA v1.0 VQA answers and print one JSON object: tifa_average (mean over prompts of "
            "the fraction of questions answered correctly), tifa_stdev, accuracy_by_type (per "
            "element_type, pooled over questions), caption_scores. Exit 2 on invalid input."
        ),
    )
    parser.add_argument(
        "--questions",
        required=True,
        help="questions JSON, a path or an http(s) URL (e.g. sample_question_answers.json; "
        f"the full v1.0 file: {TIFA_V1_QUESTIONS_URL})",
    )
    parser.add_argument("--questions-sha256", help="expected SHA-256 of the questions file (checked)")
    parser.add_argument(
        "--answers",
        required=True,
        help="answers JSON: upstream's result file (question_details) or {prompt id: {question: answer}}",
    )
    parser.add_argument(
        "--answer-field",
        choices=ANSWER_FIELDS,
        default="multiple_choice_vqa",
        help="which answer of upstream's per-question objects to score (default: multiple_choice_vqa)",
    )
    parser.add_argument(
        "--matcher",
        choices=("exact", "embedding"),
        default="exact",
        help="map answers to choices exactly (after normalization; default) or by sentence embedding",
    )
    parser.add_argument(
        "--embedding-model",
        default=DEFAULT_EMBEDDING_MODEL,
        help=f"hub id or local folder for --matcher embedding (default: {DEFAULT_EMBEDDING_MODEL})",
    )
    parser.add_argument("--device", default="cpu", help="torch device for --matcher embedding (default: cpu)")
    args = parser.parse_args(argv)
    try:
        questions = load_questions(args.questions, args.questions_sha256)
        answers = load_answers(args.answers, args.answer_field)
        matcher: ChoiceMatcher = (
            EmbeddingChoiceMatcher.from_pretrained(args.embedding_model, device=args.device)
            if args.matcher == "embedding"
            else ExactChoiceMatcher()
        )
        result = score_tifa(questions, answers, matcher)
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps({**result.to_json(), "answer_field": args.answer_field, "matcher": args.matcher}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
