"""PromptRequest (what an LLM is asked) and parse_prompt_list (reading what it answers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from selma_core.prompting.request import PromptRequest, parse_prompt_list
from selma_core.skills import Skill, load_skill

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def counting() -> Skill:
    return load_skill(REPO / "skills", "counting")


# -- parse_prompt_list -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "1. three cats on a sofa\n2. two dogs in a park\n3. four cups on a table",
        "1) three cats on a sofa\n2) two dogs in a park\n3) four cups on a table",
        "(1) three cats on a sofa\n(2) two dogs in a park\n(3) four cups on a table",
        "1: three cats on a sofa\n2] two dogs in a park\n3 - four cups on a table",
        "- three cats on a sofa\n- two dogs in a park\n- four cups on a table",
        "* three cats on a sofa\n* two dogs in a park\n* four cups on a table",
        "• three cats on a sofa\n• two dogs in a park\n• four cups on a table",
        "three cats on a sofa\ntwo dogs in a park\nfour cups on a table",
        '1. "three cats on a sofa"\n2. "two dogs in a park"\n3. "four cups on a table"',
        '["three cats on a sofa", "two dogs in a park", "four cups on a table"]',
        "  \n1. three cats on a sofa\n\n\n2) two dogs in a park\n   \n(3) four cups on a table\n\n",
    ],
    ids=[
        "dot",
        "paren",
        "parens",
        "colon-bracket-dash",
        "dash",
        "star",
        "bullet",
        "plain",
        "quoted",
        "json",
        "blank-lines-mixed",
    ],
)
def test_parse_prompt_list_formats(reply):
    assert parse_prompt_list(reply) == ["three cats on a sofa", "two dogs in a park", "four cups on a table"]


def test_parse_prompt_list_multi_digit_numbers_and_indentation():
    reply = "\n".join(f"   {i}. prompt number {i}" for i in range(1, 13))
    assert parse_prompt_list(reply) == [f"prompt number {i}" for i in range(1, 13)]


def test_parse_prompt_list_strips_only_the_list_mark():
    # Only the first mark goes: a number that is part of the prompt stays.
    reply = "1. 3 red apples\n- 2 cats\n(4) 5 birds"
    assert parse_prompt_list(reply) == ["3 red apples", "2 cats", "5 birds"]
    # A leading number that is not followed by a mark is part of the prompt.
    assert parse_prompt_list("3 red apples on a table") == ["3 red apples on a table"]


def test_parse_prompt_list_json_array_skips_non_strings_and_blanks():
    assert parse_prompt_list('[" two cats ", 3, null, "", "   ", {"a": 1}, "four cups"]') == [
        "two cats",
        "four cups",
    ]


def test_parse_prompt_list_json_that_is_not_a_list_of_prompts_falls_back_to_lines():
    # Not valid JSON: read line by line like any other reply.
    assert parse_prompt_list("[two cats\n1. four cups") == ["[two cats", "four cups"]


def test_parse_prompt_list_reads_what_models_write_around_their_prompts():
    """Found in real replies: a JSON array with a closing sentence after it, an array of objects,
    markdown bold, curly or single quotes around a line, and more kinds of list marks."""
    assert parse_prompt_list(
        '["four blue kites above a beach", "two owls on a branch"]\nHope these help!'
    ) == [
        "four blue kites above a beach",
        "two owls on a branch",
    ]
    assert parse_prompt_list('[{"prompt": "three red apples"}, {"text": "two cats"}, {"x": 1}]') == [
        "three red apples",
        "two cats",
    ]
    reply = "\n".join(
        [
            "1. **Four blue kites** above a beach",
            "2) “two owls on a branch”",
            "Prompt 3: a red car",
            "[4] a dog",
            "#5 a cat",
            "• a cow",
            "- 'a hen'",
        ]
    )
    assert parse_prompt_list(reply) == [
        "Four blue kites above a beach",
        "two owls on a branch",
        "a red car",
        "a dog",
        "a cat",
        "a cow",
        "a hen",
    ]
    assert parse_prompt_list('a sign reading "OPEN" on a door') == ['a sign reading "OPEN" on a door']


def test_parse_prompt_list_drops_empty_marks_and_blank_replies():
    assert parse_prompt_list("") == []
    assert parse_prompt_list("   \n\n  ") == []
    assert parse_prompt_list('1.\n2)\n-\n*\n•\n(3)\n""') == []
    assert parse_prompt_list("[]") == []


# -- PromptRequest -----------------------------------------------------------------------------


def test_messages_carry_skill_rules_examples_and_count(counting):
    examples = ("three red apples on a wooden kitchen table", "two cats sleeping on a blue sofa")
    request = PromptRequest("counting-00000", counting, examples, 7)
    messages = request.messages()

    assert [m["role"] for m in messages] == ["system", "user"]
    system, user = messages[0]["content"], messages[1]["content"]
    assert f"Skill: counting: {counting.description}" in system
    assert counting.rules  # the real skill has rules; every one is shown as a bullet
    for rule in counting.rules:
        assert f"- {rule}" in system
    assert "1. three red apples on a wooden kitchen table" in user
    assert "2. two cats sleeping on a blue sofa" in user
    assert "Write 7 new prompts" in user
    assert "numbered list" in user
    # The examples are numbered in the order given, and only those are shown.
    assert user.index("1. three red apples") < user.index("2. two cats")
    assert "3." not in user.split("\n\n")[0]


def test_messages_for_a_skill_without_rules():
    skill = Skill(name="bare", description="Just a test.", seeds=["one seed"])
    system = PromptRequest("bare-00000", skill, ("one seed",), 2).messages()[0]["content"]
    assert "Rules every prompt must follow:\n- (none)" in system


def test_as_text_joins_the_messages_and_opens_a_numbered_list(counting):
    request = PromptRequest("counting-00001", counting, ("five yellow tulips in a clear glass vase",), 4)
    text = request.as_text()
    system, user = (m["content"] for m in request.messages())
    assert text == f"{system}\n\n{user}\n\n1."
    assert text.endswith("\n\n1.")
    assert "Write 4 new prompts" in text


def test_request_is_immutable(counting):
    request = PromptRequest("counting-00002", counting, ("a",), 1)
    with pytest.raises(AttributeError):
        request.count = 5  # type: ignore[misc]


def test_lead_ins_fences_and_leading_numbers_that_are_not_list_marks():
    from selma_core.prompting.request import parse_prompt_list

    text = (
        'Here are 3 new prompts:\n```json\n["3-legged stool in a barn", "2.5 meter statue of a horse"]\n```'
    )
    assert parse_prompt_list(text) == ["3-legged stool in a barn", "2.5 meter statue of a horse"]
    plain = "Sure! Here you go:\n1. 3-legged stool in a barn\n2) 2.5 meter statue"
    assert parse_prompt_list(plain) == ["3-legged stool in a barn", "2.5 meter statue"]


def test_quotes_inside_a_prompt_are_kept():
    from selma_core.prompting.request import parse_prompt_list

    reply = '1. a neon sign that says "OPEN"\n2. "a cat on a mat"\n3. "EXIT" painted on a door'
    assert parse_prompt_list(reply) == [
        'a neon sign that says "OPEN"',
        "a cat on a mat",
        '"EXIT" painted on a door',
    ]


def test_a_json_array_cut_short_or_with_a_trailing_comma_still_gives_its_prompts():
    cut = '[\n  "four blue kites above a windy beach",\n  "two owls perched on a snowy branch",'
    assert parse_prompt_list(cut) == [
        "four blue kites above a windy beach",
        "two owls perched on a snowy branch",
    ]
    assert parse_prompt_list('["a red cube", "two cats",]') == ["a red cube", "two cats"]


def test_parse_prompt_list_drops_what_models_write_that_is_no_prompt():
    """Found as a user: a reasoning model's thinking left in the reply (a block, or everything up to
    its closing tag when the chat template opened it), a Python-style list, labels, a list mark
    without its space, and the remains of a broken JSON array; closing remarks are rejected later
    as echoes (selma_core.phases.prompts). What is a prompt stays one."""
    thinking = (
        "<think>\nI should vary the settings.\nLet me write a diverse list now.\n</think>\n1. a cat\n2. a dog"
    )
    assert parse_prompt_list(thinking) == ["a cat", "a dog"]
    opened_by_the_template = (
        "Okay. Let me draft:\n1. Two dogs - too close.\n</think>\n\n1. three kites\n2. four bottles"
    )
    assert parse_prompt_list(opened_by_the_template) == ["three kites", "four bottles"]
    assert parse_prompt_list("<think>\nStill thinking when the token limit came") == []
    assert parse_prompt_list("['two red cups on a table', 'three blue mugs on a desk']") == [
        "two red cups on a table",
        "three blue mugs on a desk",
    ]
    assert parse_prompt_list('["two red cups" "three blue mugs"]') == []  # broken JSON: no prompt
    assert parse_prompt_list("1. **Prompt:** two red cups\nPrompt 2 - three blue mugs\n3.four lamps") == [
        "two red cups",
        "three blue mugs",
        "four lamps",
    ]
    assert parse_prompt_list("1. 2.5 m tall giraffe\n2. a cat") == ["2.5 m tall giraffe", "a cat"]
    # A completion continues "1." (its first line has no mark); long descriptions under headings.
    assert parse_prompt_list(" two lemons on a shelf\n2. three kettles") == [
        "two lemons on a shelf",
        "three kettles",
    ]
    paragraphs = "Prompt 1:\nA busy market at dusk, lanterns.\n\nPrompt 2:\nA quiet harbor at dawn, boats."
    assert parse_prompt_list(paragraphs) == [
        "A busy market at dusk, lanterns.",
        "A quiet harbor at dawn, boats.",
    ]
    # Bracketed keywords, as real users write them, are kept.
    assert parse_prompt_list(
        "cyberpunk city, neon [trending on artstation]\n[cinematic] portrait of a sailor"
    ) == [
        "cyberpunk city, neon [trending on artstation]",
        "[cinematic] portrait of a sailor",
    ]
    assert parse_prompt_list("[" * 1000) == ["[" * 1000]  # no RecursionError: a line, rejected later


def test_a_one_line_json_array_cut_by_the_token_limit_keeps_its_whole_entries():
    """The token limit cut a one-line array mid-entry: its last line is all of the reply, which the
    line rule would drop whole; cut after the last whole entry instead (strings and escapes read as
    JSON writes them), and closed by the parser."""
    from selma_core.prompting.request import without_cut_line

    cut = '["two red cups on a table", "three blue mugs on a desk", "four gre'
    assert parse_prompt_list(without_cut_line(cut)) == [
        "two red cups on a table",
        "three blue mugs on a desk",
    ]
    fenced = 'Here they are:\n```json\n[{"prompt": "a cat"}, {"prompt": "a dog"}, {"prompt": "a co'
    assert parse_prompt_list(without_cut_line(fenced)) == ["a cat", "a dog"]
    quoted = (
        '["two apples", "a mug that says \\"HELLO\\", on a desk", "a sign reading \\"[SOLD]\\" here", "a wo'
    )
    assert parse_prompt_list(without_cut_line(quoted)) == [
        "two apples",
        'a mug that says "HELLO", on a desk',
        'a sign reading "[SOLD]" here',
    ]
    python = "['two apples on a plate', 'three cats on a sofa', 'four bi"
    assert parse_prompt_list(without_cut_line(python)) == ["two apples on a plate", "three cats on a sofa"]
    assert parse_prompt_list(without_cut_line('["four gre')) == []
    assert without_cut_line("1. a cat\n2. a do") == "1. a cat"  # a list: the cut line goes
