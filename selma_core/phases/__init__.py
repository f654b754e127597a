"""The five phases of SELMA, one module each; every entry takes a ``JobContext`` and a skill name.

prompts -> images -> train (per skill) -> merge -> eval. No phase calls another: each reads its
inputs from the store and commits its output there.
"""

from __future__ import annotations

import importlib
from typing import Any

_ENTRIES = {
    "prompts": ("selma_core.phases.prompts", "generate_prompts"),
    "images": ("selma_core.phases.images", "generate_images"),
    "train": ("selma_core.phases.train", "train_expert"),
    "merge": ("selma_core.phases.merge", "merge_skill_experts"),
    "eval": ("selma_core.phases.evaluate", "evaluate"),
}


def run_phase(phase: str, ctx: Any, skill: str | None) -> dict:
    """Run one phase's entry function (imported on use: a job loads only what its phase needs)."""
    module, name = _ENTRIES[phase]
    return getattr(importlib.import_module(module), name)(ctx, skill)
