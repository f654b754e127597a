"""The five phases of SELMA, one module each; every entry takes a ``JobContext`` and a skill name.

prompts -> images -> train (per skill) -> merge -> eval. No phase calls another: each reads its
inputs from the store and commits its output there.
"""

from __future__ import annotations

import importlib
from typing import Any

from selma_core.faults import fault_point

_ENTRIES = {
    "prompts": ("selma_core.phases.prompts", "generate_prompts"),
    "images": ("selma_core.phases.images", "generate_images"),
    "train": ("selma_core.phases.train", "train_expert"),
    "merge-search": ("selma_core.phases.merge_search", "select_best"),
    "merge-search-candidate": ("selma_core.phases.merge_search", "score_candidate"),
    "merge": ("selma_core.phases.merge", "merge_skill_experts"),
    "eval": ("selma_core.phases.evaluate", "evaluate"),
}


def run_phase(phase: str, ctx: Any, skill: str | None, shard: int | None = None, **options: Any) -> dict:
    """Run one phase's entry function (imported on use: a job loads only what its phase needs).

    ``options`` go to the entry function as keywords (the images phase's process index and count)."""
    fault_point("job.start")
    if shard is not None:  # one of a phase's parallel jobs
        module, name = _ENTRIES[f"{phase}-candidate"]
        return getattr(importlib.import_module(module), name)(ctx, shard, **options)
    module, name = _ENTRIES[phase]
    return getattr(importlib.import_module(module), name)(ctx, skill, **options)
