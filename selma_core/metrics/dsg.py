"""DSG-1k scores from VQA answers (Davidsonian Scene Graph, Cho et al., ICLR 2024).

DSG asks yes/no questions about a prompt's entities, attributes and relations; each question may
name parent questions (``dependency``: ``0`` = none, or ids like ``1,2``). A question is *answered
yes* when its answer is exactly ``"yes"`` (anything else, empty included, is a failure, as upstream
compares ``answer == 'yes'``). Two conventions, always reported by name:

``dsg-official`` (github.com/j-min/DSG, ``scripts/t2i_eval_dsg1k.py`` with ``dsg/vqa_utils.py``
``calc_vqa_score`` and ``dsg/data_utils.py``): a question scores 1 when it and each of its *direct*
parents were answered yes (one level deep: a parent's own answer, not its adjusted score); an
item's score is the mean over its questions; a category's score is the mean over its
items; ``all`` is the mean over all items. This reproduces the published PaLI-17B/SD2.1 figures
(88.1 tifa ... 80.5 all).

``selma`` (github.com/jialuli-luka/SELMA, ``DSG/evaluation.py``): a question scores 1 when it and
every ancestor (parent, grandparent, ...; zeroing applied transitively) were answered yes; scores
are pooled over questions (a category's score is the mean over all of its questions, ``all`` over
every question), so long prompts weigh more. SELMA's script zeroes in place in file order, which is
transitive where parents precede children; here ancestry is followed whatever the order (DSG-1k has
forward and self references). SELMA's script grouped its breakdown by ``category_detailed``; here
both conventions group by the item's dataset category, and ``all`` is SELMA's "Average".

Data rules (the real DSG-1k release needs them; each is upstream's behaviour unless noted):

- Categories come from the item id, by upstream's ``get_data_category`` substring rule:
  tifa160 -> tifa, stanford/localized -> paragraph, countbench -> count, vrd -> relation,
  diffusiondb/midjourney -> real_user, posescript -> pose, whoops -> defying, drawtext -> text.
- A dependency string that is not comma-separated non-negative integers (``5, right``: 10 rows of
  DSG-1k; here an empty string too) makes upstream drop the dependencies of the *whole item*;
  ``malformed="drop-item"`` (default) does the same and reports it, ``malformed="error"`` raises
  naming item and question. Both conventions parse alike (SELMA's script instead skipped tokens it
  could not match as strings: ``right``, and ids written after ``", "``).
- A parent id naming no question of its item is ignored (only ``tifa160_134``, whose question 1 is
  absent from the release; upstream never scores it because it has no answers; SELMA ignores such ids).
- ``missing="zero"`` (default): an item with no answers at all scores 0 (upstream; the release has
  no answers to ``tifa160_134``; under ``selma`` each of its questions counts 0); ``"skip"`` leaves
  such items out (e.g. the T2I models answered on tifa160 prompts only); ``"error"`` raises. An
  item with some but not all of its questions answered, or an answer to a question the annotations
  lack, is always an error naming item and question.

Python API: ``load_annotations`` + ``load_answers`` (or any ``{(item_id, question_id): answer}``
mapping, e.g. from a VQA model on generated images) -> ``score_dsg`` -> ``DsgResult``.
CLI: ``python -m selma_core.metrics.dsg --annotations ANN.csv --answers ANS.csv --t2i-model NAME``.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from selma_core.errors import InputError, SelmaError

Convention = Literal["dsg-official", "selma"]
CONVENTIONS: tuple[str, ...] = ("dsg-official", "selma")
MissingPolicy = Literal["zero", "skip", "error"]
MalformedPolicy = Literal["drop-item", "error"]

# Upstream's dataset categories, in the order its script prints them, and the SELMA skill
# (skills/<name>.yaml) each evaluates; None: no skill of its own (tifa160 is general-purpose TIFA
# prompts, pose has no SELMA skill).
DSG_CATEGORY_SKILL: dict[str, str | None] = {
    "tifa": None,
    "paragraph": "long_description",
    "relation": "spatial",
    "count": "counting",
    "real_user": "real_user",
    "pose": None,
    "defying": "commonsense_defying",
    "text": "text",
}
DSG_CATEGORIES: tuple[str, ...] = tuple(DSG_CATEGORY_SKILL)
SKILL_DSG_CATEGORY: dict[str, str] = {s: c for c, s in DSG_CATEGORY_SKILL.items() if s is not None}

# upstream get_data_category: first substring that occurs in the item id wins.
_CATEGORY_RULES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("tifa",), "tifa"),
    (("stanford", "localized"), "paragraph"),
    (("countbench",), "count"),
    (("vrd",), "relation"),
    (("diffusion", "midjourney"), "real_user"),
    (("posescript",), "pose"),
    (("whoops",), "defying"),
    (("drawtext",), "text"),
)
_DEPENDENCY_TOKEN = re.compile(r"[0-9]+", re.ASCII)

ANNOTATION_COLUMNS = ("item_id", "proposition_id", "dependency", "question_natural_language")
ANSWER_COLUMNS = ("item_id", "question_id", "answer", "t2i_model")


class DependencyFormatError(InputError):
    """A dependency string that is not ``0`` or comma-separated question ids."""


def dsg_category(item_id: str) -> str:
    """The DSG-1k dataset category of an item id (upstream's substring rule)."""
    for needles, category in _CATEGORY_RULES:
        if any(n in item_id for n in needles):
            return category
    raise InputError(
        f"DSG item {item_id!r}: no dataset category (expected an id like tifa160_3, vrd_12, ...)"
    )


def parse_dependency(value: str) -> tuple[int, ...]:
    """Parent question ids of ``"0"``, ``"3"``, ``"1,2"`` (spaces allowed; 0 means none, and is dropped).

    Raises ``DependencyFormatError`` for anything else (``"5, right"``, ``""``, ``"-1"``).
    """
    tokens = [t.strip() for t in value.split(",")]
    if not all(_DEPENDENCY_TOKEN.fullmatch(t) for t in tokens):
        raise DependencyFormatError(f"dependency {value!r} is not 0 or comma-separated question ids")
    parents: list[int] = []
    for t in tokens:
        if int(t) != 0 and int(t) not in parents:
            parents.append(int(t))
    return tuple(parents)


@dataclass(frozen=True)
class DsgQuestion:
    question_id: int
    text: str
    parents: tuple[int, ...]  # after the item's rules: empty when the item's dependencies were dropped
    category_broad: str = ""
    category_detailed: str = ""


@dataclass(frozen=True)
class DsgItem:
    item_id: str
    prompt: str
    questions: tuple[DsgQuestion, ...]
    # The malformed dependency strings (question id, string) for which all parents were dropped.
    dropped_dependencies: tuple[tuple[int, str], ...] = ()

    @property
    def category(self) -> str:
        return dsg_category(self.item_id)


def _read_csv(path: Path, required: tuple[str, ...], what: str) -> list[tuple[int, dict[str, str]]]:
    """Rows as (line number, row) with every required column, or an InputError naming the file."""
    if not path.is_file():
        raise InputError(f"DSG {what} file {path} not found")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise InputError(
                    f"DSG {what} file {path}: no column {', '.join(missing)} "
                    f"(has: {', '.join(reader.fieldnames or [])})"
                )
            return [(reader.line_num, row) for row in reader]
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"DSG {what} file {path}: cannot be read as CSV: {e}") from e


def _int_field(path: Path, line: int, column: str, value: str | None) -> int:
    if value is None or not _DEPENDENCY_TOKEN.fullmatch(value.strip()):
        raise InputError(f"{path}, line {line}: column {column}: {value!r} is not a question id")
    return int(value)


def load_annotations(path: str | Path, malformed: MalformedPolicy = "drop-item") -> dict[str, DsgItem]:
    """DSG-1k annotations (``dsg-1k-anns.csv``), items in file order, questions by id."""
    path = Path(path)
    rows: dict[str, list[tuple[int, dict[str, str]]]] = {}
    for line, row in _read_csv(path, ANNOTATION_COLUMNS, "annotations"):
        item_id = (row["item_id"] or "").strip()
        if not item_id:
            raise InputError(f"{path}, line {line}: column item_id is empty")
        rows.setdefault(item_id, []).append((line, row))
    if not rows:
        raise InputError(f"DSG annotations file {path}: no rows")
    items: dict[str, DsgItem] = {}
    for item_id, item_rows in rows.items():
        dsg_category(item_id)  # an unknown dataset is an error now, not at scoring time
        parsed: list[tuple[int, dict[str, str], tuple[int, ...] | None]] = []
        dropped: list[tuple[int, str]] = []
        seen: set[int] = set()
        for line, row in item_rows:
            qid = _int_field(path, line, "proposition_id", row["proposition_id"])
            if qid in seen:
                raise InputError(f"{path}, line {line}: item {item_id} has question {qid} twice")
            seen.add(qid)
            dependency = row["dependency"] or ""
            try:
                parents: tuple[int, ...] | None = parse_dependency(dependency)
            except DependencyFormatError as e:
                if malformed == "error":
                    raise DependencyFormatError(
                        f"{path}, line {line}: item {item_id} question {qid}: {e}"
                    ) from e
                parents = None
                dropped.append((qid, dependency))
            parsed.append((qid, row, parents))
        questions = tuple(
            DsgQuestion(
                question_id=qid,
                text=row["question_natural_language"],
                # upstream: one malformed string drops the dependencies of the whole item; ids naming
                # no question of the item are ignored.
                parents=() if dropped else tuple(p for p in parents or () if p in seen),
                category_broad=row.get("category_broad") or "",
                category_detailed=row.get("category_detailed") or "",
            )
            for qid, row, parents in parsed
        )
        items[item_id] = DsgItem(item_id, item_rows[0][1].get("text") or "", questions, tuple(dropped))
    return items


def load_answers(path: str | Path, t2i_model: str) -> dict[tuple[str, int], str]:
    """One T2I model's answers from an upstream answers CSV (``vqa_answers_release/*_dsg.csv``).

    Keys are ``(item_id, question_id)``; an empty answer is kept as ``""`` (it scores 0, as upstream's NaN).
    """
    path = Path(path)
    rows = _read_csv(path, ANSWER_COLUMNS, "answers")
    answers: dict[tuple[str, int], str] = {}
    models: set[str] = set()
    for line, row in rows:
        model = row["t2i_model"] or ""
        models.add(model)
        if model != t2i_model:
            continue
        key = ((row["item_id"] or "").strip(), _int_field(path, line, "question_id", row["question_id"]))
        if key in answers:
            raise InputError(
                f"{path}, line {line}: t2i_model {t2i_model}: item {key[0]} question {key[1]} twice"
            )
        answers[key] = row["answer"] or ""
    if not answers:
        raise InputError(
            f"DSG answers file {path}: no rows with t2i_model {t2i_model!r} "
            f"(column t2i_model has: {', '.join(sorted(models)) or 'nothing'})"
        )
    return answers


def normalize_answer(text: str) -> str:
    """A VQA model's free text as a yes/no token: lowercased, stripped of spaces and . , ? !

    (upstream's GPT-4o wrapper does the same); ``score_dsg`` itself compares exactly, as upstream.
    """
    return re.sub(r"[.,?!]", "", text.lower()).strip()


@dataclass(frozen=True)
class CategoryScore:
    items: int
    questions: int
    score: float  # a fraction in [0, 1]

    @property
    def percent(self) -> float:
        return round(100.0 * self.score, 1)


@dataclass(frozen=True)
class DsgResult:
    convention: str
    categories: dict[str, CategoryScore]  # DSG_CATEGORIES present, in that order, then "all"
    item_scores: dict[str, float]  # per item: mean of its (adjusted) question scores
    question_scores: dict[tuple[str, int], float]  # adjusted, under this convention
    missing_items: tuple[str, ...] = ()  # items with no answers (scored 0, or skipped)
    dropped_dependencies: tuple[tuple[str, int, str], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        """The CLI's object: scores in percent with one decimal."""
        return {
            "convention": self.convention,
            "categories": {
                name: {"items": c.items, "questions": c.questions, "score": c.percent}
                for name, c in self.categories.items()
            },
            "missing_items": list(self.missing_items),
            "dropped_dependencies": [
                {"item_id": i, "question_id": q, "dependency": d} for i, q, d in self.dropped_dependencies
            ],
        }


def _ancestors(qid: int, parents: Mapping[int, tuple[int, ...]]) -> set[int]:
    seen: set[int] = set()
    stack = list(parents.get(qid, ()))
    while stack:
        p = stack.pop()
        if p not in seen:
            seen.add(p)
            stack.extend(parents.get(p, ()))
    seen.discard(qid)
    return seen


def adjusted_scores(item: DsgItem, answers: Mapping[int, str], convention: Convention) -> dict[int, float]:
    """Per question of one item, 1.0 or 0.0 after the dependency rule of ``convention``.

    ``answers`` maps every question id of the item to its answer.
    """
    if convention not in CONVENTIONS:
        raise InputError(f"DSG convention {convention!r}: expected one of {', '.join(CONVENTIONS)}")
    yes = {q.question_id: answers[q.question_id] == "yes" for q in item.questions}
    parents = {q.question_id: q.parents for q in item.questions}
    scores: dict[int, float] = {}
    for qid in yes:
        ancestors = parents[qid] if convention == "dsg-official" else _ancestors(qid, parents)
        scores[qid] = float(yes[qid] and all(yes[p] for p in ancestors))
    return scores


def score_dsg(
    items: Mapping[str, DsgItem] | Iterable[DsgItem],
    answers: Mapping[tuple[str, int], str],
    convention: Convention = "dsg-official",
    missing: MissingPolicy = "zero",
) -> DsgResult:
    """Score ``answers`` (``{(item_id, question_id): answer}``) on ``items`` under ``convention``.

    Pass a subset of the items to score part of DSG-1k (say one category); answers to items or
    questions not in ``items`` are an error.
    """
    if convention not in CONVENTIONS:
        raise InputError(f"DSG convention {convention!r}: expected one of {', '.join(CONVENTIONS)}")
    if missing not in ("zero", "skip", "error"):
        raise InputError(f"DSG missing-answer policy {missing!r}: expected zero, skip or error")
    item_list = list(items.values()) if isinstance(items, Mapping) else list(items)
    by_id = {item.item_id: item for item in item_list}
    known = {(item.item_id, q.question_id) for item in item_list for q in item.questions}
    stray = sorted(k for k in answers if k not in known)
    if stray:
        item_id, qid = stray[0]
        what = "no such question" if item_id in by_id else "no such item"
        raise InputError(
            f"DSG answer to item {item_id} question {qid}: the annotations have {what} "
            f"({len(stray)} answer(s) without a question)"
        )

    item_scores: dict[str, float] = {}
    question_scores: dict[tuple[str, int], float] = {}
    missing_items: list[str] = []
    for item in item_list:
        qids = [q.question_id for q in item.questions]
        have = [qid for qid in qids if (item.item_id, qid) in answers]
        if not have:
            if missing == "error":
                raise InputError(f"DSG item {item.item_id}: no answers (question {qids[0]} and the rest)")
            missing_items.append(item.item_id)
            if missing == "skip":
                continue
            scores = dict.fromkeys(qids, 0.0)
        elif len(have) < len(qids):
            absent = [qid for qid in qids if qid not in have]
            raise InputError(
                f"DSG item {item.item_id}: no answer to question {absent[0]}"
                + (f" (nor {', '.join(map(str, absent[1:]))})" if absent[1:] else "")
                + f"; {len(have)} of its {len(qids)} questions are answered"
            )
        else:
            scores = adjusted_scores(item, {qid: answers[(item.item_id, qid)] for qid in qids}, convention)
        item_scores[item.item_id] = sum(scores.values()) / len(scores) if scores else 0.0
        question_scores.update({(item.item_id, qid): s for qid, s in scores.items()})

    groups: dict[str, list[DsgItem]] = {}
    for item in item_list:
        if item.item_id in item_scores:
            groups.setdefault(item.category, []).append(item)
    order = [c for c in DSG_CATEGORIES if c in groups] + ["all"]
    groups["all"] = [item for item in item_list if item.item_id in item_scores]
    categories: dict[str, CategoryScore] = {}
    for name in order:
        members = groups[name]
        if not members:
            raise InputError("DSG: no item has answers to score")
        pooled = [question_scores[(i.item_id, q.question_id)] for i in members for q in i.questions]
        if convention == "dsg-official":
            score = sum(item_scores[i.item_id] for i in members) / len(members)
        else:
            score = sum(pooled) / len(pooled)
        categories[name] = CategoryScore(items=len(members), questions=len(pooled), score=score)
    return DsgResult(
        convention=convention,
        categories=categories,
        item_scores=item_scores,
        question_scores=question_scores,
        missing_items=tuple(missing_items),
        dropped_dependencies=tuple((i.item_id, q, d) for i in item_list for q, d in i.dropped_dependencies),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m selma_core.metrics.dsg",
        description=(
            "Score DSG-1k VQA answers and print one JSON object: per dataset category and 'all', the "
            "number of items and questions and the score in percent (one decimal). "
            "Conventions: dsg-official (upstream j-min/DSG: a question counts 0 when a direct parent "
            "was not answered yes; items averaged) or selma (SELMA's code: zeroing through all "
            "ancestors; questions pooled). Exit 2 on invalid input."
        ),
    )
    parser.add_argument(
        "--annotations", required=True, help="dsg-1k-anns.csv (item_id, proposition_id, dependency, ...)"
    )
    parser.add_argument(
        "--answers",
        required=True,
        help="answers CSV in upstream's release format (item_id, question_id, answer, t2i_model, ...)",
    )
    parser.add_argument("--t2i-model", required=True, help="score the rows of this t2i_model (e.g. sd2dot1)")
    parser.add_argument(
        "--convention", choices=CONVENTIONS, default="dsg-official", help="default: dsg-official"
    )
    parser.add_argument(
        "--missing-items",
        choices=("zero", "skip", "error"),
        default="zero",
        help="an item without answers: scores 0 (upstream, default), is left out, or is an error",
    )
    parser.add_argument(
        "--malformed-dependencies",
        choices=("drop-item", "error"),
        default="drop-item",
        help="a dependency string like '5, right': drop the item's dependencies (upstream, default) or fail",
    )
    args = parser.parse_args(argv)
    try:
        items = load_annotations(args.annotations, malformed=args.malformed_dependencies)
        answers = load_answers(args.answers, args.t2i_model)
        result = score_dsg(items, answers, convention=args.convention, missing=args.missing_items)
    except SelmaError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if result.missing_items:
        fate = "were left out" if args.missing_items == "skip" else "scored 0"
        print(
            f"note: {len(result.missing_items)} item(s) have no {args.t2i_model} answers and {fate} "
            f"(--missing-items {args.missing_items}): {', '.join(result.missing_items[:5])}"
            + (", ..." if len(result.missing_items) > 5 else ""),
            file=sys.stderr,
        )
    out = result.to_json()
    print(json.dumps({"convention": out.pop("convention"), "t2i_model": args.t2i_model, **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
