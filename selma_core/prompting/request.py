"""One in-context request for new prompts, and parsing the list that comes back."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from selma_core.skills import Skill

# A list mark is followed by whitespace: "1. x", "2) x", "(3) x", "- x"; never "3-legged" or "2.5 m".
_LIST_MARK = re.compile(r"^\s*(?:\(\d+\)|\d+\s*[.):\]]|\d+\s+-|[-*•])(?=\s|$)\s*")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*$")


@dataclass(frozen=True)
class PromptRequest:
    request_id: str
    skill: Skill
    examples: tuple[str, ...]
    count: int

    def messages(self) -> list[dict[str, str]]:
        """Chat messages: the skill's instructions, its examples, and the ask for ``count`` more."""
        rules = "\n".join(f"- {r}" for r in self.skill.rules) or "- (none)"
        examples = "\n".join(f"{i}. {e}" for i, e in enumerate(self.examples, 1))
        system = (
            "You write prompts for a text-to-image model, to teach it one skill. "
            f"Skill: {self.skill.name}: {self.skill.description}\n"
            f"Rules every prompt must follow:\n{rules}"
        )
        user = (
            f"Here are example prompts:\n{examples}\n\n"
            f"Write {self.count} new prompts for this skill, different from the examples and from "
            "each other. Answer with a numbered list, one prompt per line, and nothing else."
        )
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def as_text(self) -> str:
        """The same request as one plain text, for completion (non-chat) endpoints."""
        return "\n\n".join(m["content"] for m in self.messages()) + "\n\n1."


def without_cut_line(text: str) -> str:
    """A reply the token limit cut off, without its last line, whose prompt is unfinished (a reply
    that ends with a line break ended between lines and is whole)."""
    if text.endswith("\n"):
        return text
    return text.rpartition("\n")[0]


def parse_prompt_list(text: str) -> list[str]:
    """Prompts from a numbered list, a bulleted list or a JSON array of strings."""
    lines = [line for line in text.strip().splitlines() if not _FENCE.match(line.strip())]
    # A JSON array, possibly after a lead-in line or inside a code fence.
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("[")]
    if starts:
        try:
            data = json.loads("\n".join(lines[starts[0] :]))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, list):
            return [x.strip() for x in data if isinstance(x, str) and x.strip()]
    stripped = "\n".join(lines)
    prompts = []
    for line in stripped.splitlines():
        line = _LIST_MARK.sub("", line, count=1).strip()
        if len(line) > 1 and line[0] == line[-1] == '"' and '"' not in line[1:-1]:
            line = line[1:-1].strip()  # a wrapped line, not a quotation inside it (text skills)
        # A lead-in such as "Here are 20 new prompts:" is not a prompt.
        if line and not line.endswith(":"):
            prompts.append(line)
    return prompts
