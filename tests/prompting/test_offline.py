"""OfflineTemplateGenerator: fills a skill's templates with its words, deterministically."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from selma_core.errors import ConfigError
from selma_core.prompting.offline import OfflineTemplateGenerator
from selma_core.prompting.request import PromptRequest, parse_prompt_list
from selma_core.skills import OfflineVocabulary, Skill, load_skill

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["counting", "spatial"])
def skill(request) -> Skill:
    return load_skill(REPO / "skills", request.param)


def request_for(skill: Skill, request_id: str, count: int = 10) -> PromptRequest:
    return PromptRequest(request_id, skill, tuple(skill.seeds[:3]), count)


def template_regex(template: str, slots: dict[str, list[str]]) -> re.Pattern:
    """A regex matching exactly the texts ``template`` can produce from ``slots``."""
    parts = re.split(r"\{([a-z_][a-z0-9_]*)\}", template)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append("(?:" + "|".join(re.escape(w) for w in slots[part]) + ")")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out))


def test_deterministic_for_seed_and_request_id(skill):
    request = request_for(skill, f"{skill.name}-00003")
    first = OfflineTemplateGenerator(seed=7).complete(request)
    assert OfflineTemplateGenerator(seed=7).complete(request) == first
    # The generator keeps no state between calls either.
    generator = OfflineTemplateGenerator(seed=7)
    generator.complete(request_for(skill, "other"))
    assert generator.complete(request) == first


def test_differs_for_another_request_id_or_seed(skill):
    a = OfflineTemplateGenerator(seed=7).complete(request_for(skill, f"{skill.name}-00000", 20))
    b = OfflineTemplateGenerator(seed=7).complete(request_for(skill, f"{skill.name}-00001", 20))
    c = OfflineTemplateGenerator(seed=8).complete(request_for(skill, f"{skill.name}-00000", 20))
    assert a != b
    assert a != c


@pytest.mark.parametrize("count", [1, 5, 23])
def test_numbered_list_of_count_lines_from_the_skill_vocabulary(skill, count):
    reply = OfflineTemplateGenerator(seed=0).complete(request_for(skill, f"{skill.name}-00042", count))
    lines = reply.split("\n")
    assert len(lines) == count
    vocabulary = skill.offline
    patterns = [template_regex(t, vocabulary.slots) for t in vocabulary.templates]
    words = {w for template in vocabulary.templates for w in re.sub(r"\{[^}]*\}", " ", template).split()}
    words |= {w for values in vocabulary.slots.values() for value in values for w in value.split()}
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"{i}. ")
        text = line[len(f"{i}. ") :]
        assert "{" not in text and "}" not in text
        assert any(p.fullmatch(text) for p in patterns), text
        assert set(text.replace(",", " ").split()) <= words, text
    # What the prompts phase reads back is exactly the generated texts.
    assert parse_prompt_list(reply) == [line.split(". ", 1)[1] for line in lines]


def test_model_name_and_tokens():
    generator = OfflineTemplateGenerator(seed=1)
    assert generator.model_name == "offline-templates"
    generator.complete(request_for(load_skill(REPO / "skills", "counting"), "x", 3))
    assert generator.tokens_used == 0


def test_one_template_one_word_per_slot_is_fully_determined():
    skill = Skill(
        name="tiny",
        description="d",
        seeds=["s"],
        offline=OfflineVocabulary(templates=["{a} and {b}"], slots={"a": ["cat"], "b": ["dog"]}),
    )
    reply = OfflineTemplateGenerator(seed=3).complete(PromptRequest("tiny-00000", skill, ("s",), 3))
    assert reply == "1. cat and dog\n2. cat and dog\n3. cat and dog"


def test_skill_without_templates_raises_config_error_naming_it():
    skill = Skill(name="no-vocab", description="A skill with no offline vocabulary.", seeds=["a seed"])
    with pytest.raises(ConfigError, match=r"skill 'no-vocab' has no offline.templates"):
        OfflineTemplateGenerator(seed=0).complete(PromptRequest("no-vocab-00000", skill, ("a seed",), 4))
