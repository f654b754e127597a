"""The prompts an evaluation draws images for, grouped into skills, with what each benchmark asks.

- ``heldout``: each skill's held-out prompts from the prompts phase (never trained on); groups are
  the pipeline's skills.
- ``dsg1k``: DSG-1k (``dsg-1k-anns.csv``): one prompt per item, its dependency-linked yes/no
  questions; groups are DSG's dataset categories (count, relation, paragraph, ...), each mapped to
  the SELMA skill it measures (``DSG_CATEGORY_SKILL``).
- ``tifa``: TIFA v1.0 (``tifa_v1.0_question_answers.json``): one prompt per caption id, its
  multiple-choice questions; groups are the caption's source (coco, drawbench, partiprompt,
  paintskill: the id's prefix).

``max_per_group`` keeps the first N prompts of each group, in file order: the same N every run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from selma_core.errors import InputError

__all__ = ["EvalPrompt", "EvalSet", "dsg1k_set", "heldout_set", "tifa_set"]


@dataclass(frozen=True)
class EvalPrompt:
    skill: str  # the group it is reported under: a skill, or a benchmark's category
    prompt_id: str
    text: str


@dataclass
class EvalSet:
    benchmark: str
    prompts: list[EvalPrompt]
    skills: list[str]  # the groups, in report order
    # Each group's SELMA skill (None: none of its own); heldout groups are skills themselves.
    skill_of_group: dict[str, str | None] = field(default_factory=dict)
    dsg_items: dict[str, Any] | None = None  # item id -> DsgItem
    tifa_questions: list[Any] | None = None  # TifaQuestion

    def __post_init__(self) -> None:
        ids = [p.prompt_id for p in self.prompts]
        if len(set(ids)) != len(ids):
            duplicate = next(i for i in ids if ids.count(i) > 1)
            raise InputError(f"{self.benchmark}: prompt id {duplicate!r} occurs twice")
        if not self.prompts:
            raise InputError(f"{self.benchmark}: no prompts to evaluate")


def _first_per_group(prompts: list[EvalPrompt], cap: int | None) -> list[EvalPrompt]:
    if cap is None:
        return prompts
    kept: list[EvalPrompt] = []
    counts: dict[str, int] = {}
    for prompt in prompts:
        if counts.get(prompt.skill, 0) < cap:
            kept.append(prompt)
            counts[prompt.skill] = counts.get(prompt.skill, 0) + 1
    return kept


def heldout_set(records_of: Callable[[str], list[dict]], skills: list[str], cap: int | None) -> EvalSet:
    """``records_of(skill)``: that skill's prompt records (``id``, ``text``, ``split``)."""
    prompts: list[EvalPrompt] = []
    for skill in skills:
        held = [r for r in records_of(skill) if r["split"] == "heldout"]
        if not held:
            raise InputError(f"skill {skill!r} has no held-out prompts to evaluate on")
        prompts += [EvalPrompt(skill, r["id"], r["text"]) for r in (held[:cap] if cap else held)]
    return EvalSet("heldout", prompts, list(skills), {s: s for s in skills})


def dsg1k_set(annotations: str, cap: int | None) -> EvalSet:
    from selma_core.metrics.dsg import DSG_CATEGORIES, DSG_CATEGORY_SKILL, load_annotations

    items = load_annotations(annotations)
    prompts = _first_per_group(
        [EvalPrompt(item.category, item.item_id, item.prompt) for item in items.values()], cap
    )
    kept = {p.prompt_id for p in prompts}
    groups = [c for c in DSG_CATEGORIES if any(p.skill == c for p in prompts)]
    return EvalSet(
        "dsg1k",
        prompts,
        groups,
        {c: DSG_CATEGORY_SKILL.get(c) for c in groups},
        dsg_items={i: item for i, item in items.items() if i in kept},
    )


def tifa_group(prompt_id: str) -> str:
    """The caption's source, the id's prefix: ``coco_301091`` -> ``coco``."""
    return prompt_id.split("_", 1)[0] if "_" in prompt_id else "other"


def tifa_set(questions_path: str, sha256: str | None, cap: int | None) -> EvalSet:
    from selma_core.metrics.tifa import load_questions

    questions = load_questions(questions_path, sha256)
    captions: dict[str, str] = {}
    for q in questions:
        if not q.caption:
            raise InputError(f"TIFA questions {questions_path}: prompt {q.prompt_id} has no caption")
        captions.setdefault(q.prompt_id, q.caption)
    prompts = _first_per_group([EvalPrompt(tifa_group(i), i, text) for i, text in captions.items()], cap)
    kept = {p.prompt_id for p in prompts}
    groups = list(dict.fromkeys(p.skill for p in prompts))
    return EvalSet(
        "tifa",
        prompts,
        groups,
        dict.fromkeys(groups),
        tifa_questions=[q for q in questions if q.prompt_id in kept],
    )
