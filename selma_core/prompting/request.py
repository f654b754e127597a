"""One in-context request for new prompts, and parsing the list that comes back."""

from __future__ import annotations

import ast
import io
import json
import re
import tokenize
from dataclasses import dataclass

from selma_core.skills import Skill

# A list mark is followed by whitespace: "1. x", "2) x", "(3) x", "[4] x", "#5 x", "Prompt 6: x" (or -),
# "- x", "• x"; never "3-legged" or "2.5 m".
_LIST_MARK = re.compile(
    r"^\s*(?:\(\d+\)|\[\d+\]|#\d+[.):]?|(?i:prompt)\s*#?\d+\s*[.):\-–—]|\d+\s*[.):\]]|\d+\s+-|[-*•‣◦▪–—])(?=\s|$)\s*"
)
# "1.two red cups": a number and its dot or parenthesis before a letter, without the space.
_TIGHT_MARK = re.compile(r"^\s*\d+[.)](?=[^\W\d_])")
# A label the model put before the prompt itself: "Prompt: x", "Prompt 2 - x" (after any bold).
_LABEL = re.compile(r"^(?i:prompt)\s*#?\d*\s*[:.)\-–—]\s+")
# A reasoning model's thinking, when the server leaves it in the reply (no reasoning parser): a
# block, or (a chat template that opens it, as DeepSeek-R1's) everything up to its closing tag.
_THINKING = re.compile(r"<(think|thinking|reasoning)>.*?(?:</\1>|$)", re.IGNORECASE | re.DOTALL)
_THINKING_END = re.compile(r"</(?:think|thinking|reasoning)>", re.IGNORECASE)
# What is left of a JSON array broken up into lines: '["a cat",', '"a dog"]', "[", "]".
_ARRAY_REMAINS = re.compile(r"""^\[\s*["'{]|["'}]\s*\]\s*,?$|^[\[\]]$""")
_FENCE = re.compile(r"^```[a-zA-Z]*\s*$")
_BOLD = re.compile(r"\*\*(.+?)\*\*|__(.+?)__")
# Quotes that may wrap a whole line: straight, curly, single.
_WRAPPING_QUOTES = {'"': '"', "“": "”", "'": "'", "‘": "’"}
# Where a JSON array's entries are objects: the fields that may hold the prompt.
_PROMPT_FIELDS = ("prompt", "text", "caption")


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
    that ends with a line break ended between lines and is whole). A JSON array written on one line
    is cut after its last whole entry instead (``parse_prompt_list`` closes it): its last line is
    all of it."""
    if text.endswith("\n"):
        return text
    head, _, last = text.rpartition("\n")
    start = last.find("[")
    if start >= 0 and last[:start].strip(" `") == "":
        depth, cut = _array_scan(last, start)
        if depth == 0:
            return text  # the array closed on this line: the words after it are the parser's
        return head + "\n" + last[:cut] if cut is not None else head
    return head


def _array_scan(line: str, start: int) -> tuple[int, int | None]:
    """The bracket depth at the end of ``line`` (its array opening at ``start``), and where the
    array's last whole entry ends (the position of the comma after it), strings and their escapes
    read as JSON and Python write them."""
    depth, quote, escaped, cut = 0, None, False, None
    for i in range(start, len(line)):
        c = line[i]
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return 0, None
        elif c == "," and depth == 1:
            cut = i
    return depth, cut


def parse_prompt_list(text: str) -> list[str]:
    """Prompts from a numbered list, a bulleted list or a JSON array (of strings, or of objects
    with a ``prompt``, ``text`` or ``caption``)."""
    ends = list(_THINKING_END.finditer(text))
    if ends:
        text = text[ends[-1].end() :]
    text = _THINKING.sub("", text)
    lines = [line for line in text.strip().splitlines() if not _FENCE.match(line.strip())]
    # A JSON array, possibly after a lead-in line or inside a code fence, maybe with words after it.
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("[")]
    if starts:
        text = "\n".join(lines[starts[0] :]).lstrip()
        # As written; with a trailing comma before its "]"; cut short by the token limit (its last,
        # unfinished entry already dropped): closed after its last whole entry.
        data = None
        for attempt in (text, re.sub(r",\s*\]", "]", text, count=1), text.rstrip().rstrip(",") + "]"):
            try:
                data, _ = json.JSONDecoder().raw_decode(attempt)
                break
            except (ValueError, RecursionError):  # not JSON; or "[[[[...": no prompts either
                continue
        if data is None:  # a Python list (single quotes): ['a cat', 'a dog'], or one cut short
            data = _python_list(text[: text.rfind("]") + 1]) or _python_list(text.rstrip().rstrip(",") + "]")
        # Not "[4] a dog" (a list mark read as the array [4]).
        if isinstance(data, list) and (not data or any(isinstance(x, (str, dict)) for x in data)):
            return [p for p in (_prompt_of(x) for x in data) if p]
    prompts = []
    for line in lines:
        line = _LIST_MARK.sub("", line, count=1)
        line = _TIGHT_MARK.sub("", line, count=1).strip()
        line = _BOLD.sub(lambda m: m.group(1) or m.group(2), line)
        line = _LABEL.sub("", line, count=1)
        close = _WRAPPING_QUOTES.get(line[:1])
        if len(line) > 1 and close and line.endswith(close) and close not in line[1:-1]:
            line = line[1:-1].strip()  # a wrapped line, not a quotation inside it (text skills)
        # A lead-in such as "Here are 20 new prompts:" is not a prompt, nor an array's remains
        # ('["a cat", "a dog"' of one broken JSON); "[trending on artstation]" keywords are.
        if line and not line.endswith(":") and not _ARRAY_REMAINS.search(line):
            prompts.append(line)
    return prompts


def _python_list(text: str) -> list | None:
    """A Python list literal of strings; None for anything else, or for one whose strings Python
    would join (``["a" "b"]``, a JSON array missing a comma, is ``["ab"]``: one prompt of two)."""
    try:
        data = ast.literal_eval(text)
        strings = [
            t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type == tokenize.STRING
        ]
    except (ValueError, SyntaxError, MemoryError, RecursionError, tokenize.TokenError):
        return None
    return data if isinstance(data, list) and len(strings) == len(data) else None


def _prompt_of(entry: object) -> str:
    if isinstance(entry, dict):
        entry = next((entry[f] for f in _PROMPT_FIELDS if isinstance(entry.get(f), str)), "")
    return entry.strip() if isinstance(entry, str) else ""
