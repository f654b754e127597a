"""The offline prompt generator: NOT an LLM. It fills the skill's templates with its vocabulary.

It exists for demos and tests that must run without any model or network. It answers the same
``PromptRequest`` an LLM gets, with a numbered list, deterministically for (seed, request id), so
the prompts phase runs its real loop (parsing, rules, deduplication) on its output.
"""

from __future__ import annotations

import random

from selma_core.errors import ConfigError
from selma_core.prompting.request import PromptRequest
from selma_core.skills import SLOT_PATTERN


class OfflineTemplateGenerator:
    model_name = "offline-templates"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.tokens_used = 0
        self.replies_cut = 0  # a template reply has no token limit
        self.token_limit = ""

    def complete(self, request: PromptRequest) -> str:
        vocabulary = request.skill.offline
        if not vocabulary.templates:
            raise ConfigError(
                f"skill {request.skill.name!r} has no offline.templates: the offline generator needs them "
                "(or use prompts.backend: openai)"
            )
        rng = random.Random(f"{self.seed}:{request.request_id}")
        lines = []
        for i in range(request.count):
            template = rng.choice(vocabulary.templates)
            text = SLOT_PATTERN.sub(lambda m: rng.choice(vocabulary.slots[m.group(1)]), template)
            lines.append(f"{i + 1}. {text}")
        return "\n".join(lines)

    def complete_batch(self, requests: list[PromptRequest]) -> list[str]:
        return [self.complete(r) for r in requests]
