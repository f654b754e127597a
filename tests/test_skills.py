"""Skills as data: every shipped skill file loads; a broken one is a ConfigError naming the file."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import yaml

from selma_core.errors import ConfigError
from selma_core.prompting.offline import OfflineTemplateGenerator
from selma_core.prompting.request import PromptRequest
from selma_core.skills import OfflineVocabulary, Skill, load_skill, load_skills

REPO = Path(__file__).resolve().parents[1]
SKILLS_DIR = REPO / "skills"
SKILL_FILES = sorted(SKILLS_DIR.glob("*.yaml"))
SLOT = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def test_shipped_skills_are_found():
    assert "counting" in {p.stem for p in SKILL_FILES}


@pytest.mark.parametrize("path", SKILL_FILES, ids=lambda p: p.stem)
def test_shipped_skill_loads(path):
    skill = load_skill(SKILLS_DIR, path.stem)
    assert isinstance(skill, Skill)
    assert skill.name == path.stem
    assert skill.description.strip()
    assert all(seed.strip() for seed in skill.seeds) and skill.seeds
    assert skill.target_count >= 1
    raw = yaml.safe_load(path.read_text())
    assert skill.seeds == raw["seeds"]
    assert skill.to_dict()["name"] == path.stem


@pytest.mark.parametrize("path", SKILL_FILES, ids=lambda p: p.stem)
def test_offline_vocabulary_covers_every_slot(path):
    vocabulary = load_skill(SKILLS_DIR, path.stem).offline
    assert vocabulary.templates, f"{path}: the offline generator needs templates"
    used = set()
    for template in vocabulary.templates:
        slots = SLOT.findall(template)
        assert slots, f"{path}: template {template!r} has no slots"
        for slot in slots:
            assert vocabulary.slots.get(slot), f"{path}: {template!r} uses {{{slot}}}, which has no words"
            used.add(slot)
        filled = SLOT.sub(lambda m: random.Random(0).choice(vocabulary.slots[m.group(1)]), template)
        assert "{" not in filled and "}" not in filled
    assert all(words and all(w.strip() for w in words) for words in vocabulary.slots.values())
    assert used == set(vocabulary.slots), f"{path}: unused slots {set(vocabulary.slots) - used}"


def test_offline_generator_fills_templates():
    skill = load_skill(SKILLS_DIR, "counting")
    request = PromptRequest(skill=skill, examples=tuple(skill.seeds[:3]), count=5, request_id="r1")
    reply = OfflineTemplateGenerator(seed=0).complete(request)
    lines = reply.splitlines()
    assert [line.split(". ", 1)[0] for line in lines] == ["1", "2", "3", "4", "5"]
    assert all("{" not in line for line in lines)
    assert OfflineTemplateGenerator(seed=0).complete(request) == reply  # deterministic


def test_load_skills_keeps_the_order():
    skills = load_skills(SKILLS_DIR, ["spatial", "counting"])
    assert list(skills) == ["spatial", "counting"]
    assert skills["counting"].name == "counting"


def test_unknown_skill_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_skill(SKILLS_DIR, "juggling")
    message = str(info.value)
    assert "'juggling'" in message
    assert str(SKILLS_DIR / "juggling.yaml") in message
    known = message.split("known skills: ", 1)[1]
    assert known == ", ".join(p.stem for p in SKILL_FILES)


def test_unknown_skill_in_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"known skills: none \(skills_dir, resolved against the config"):
        load_skill(tmp_path / "no-such-folder", "counting")


# -- broken skill files ----------------------------------------------------------------------------

GOOD = {
    "name": "colors",
    "description": "Objects of a stated color.",
    "seeds": ["a red car"],
    "offline": {"templates": ["a {color} {object}"], "slots": {"color": ["red"], "object": ["car"]}},
}


def skill_error(tmp_path: Path, data, name: str = "colors") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_skill(tmp_path, name)
    message = str(info.value)
    assert str(path) in message, f"the message does not name the file: {message}"
    return message


def test_good_custom_skill_loads(tmp_path):
    (tmp_path / "colors.yaml").write_text(yaml.safe_dump(GOOD))
    skill = load_skill(tmp_path, "colors")
    assert skill.offline.slots == {"color": ["red"], "object": ["car"]}
    assert skill.rules == [] and skill.target_count == 1000


def test_skill_without_seeds(tmp_path):
    assert "seeds" in skill_error(tmp_path, {**GOOD, "seeds": []})


def test_skill_with_only_blank_seeds(tmp_path):
    assert "seeds" in skill_error(tmp_path, {**GOOD, "seeds": ["  ", ""]})


def test_skill_missing_seeds_key(tmp_path):
    data = {k: v for k, v in GOOD.items() if k != "seeds"}
    message = skill_error(tmp_path, data)
    assert "missing required key seeds" in message and "dataset:" in message


def test_skill_unknown_key(tmp_path):
    message = skill_error(tmp_path, {**GOOD, "examples": ["x"]})
    assert "unknown key examples" in message and "seeds" in message


def test_skill_unknown_nested_key(tmp_path):
    message = skill_error(tmp_path, {**GOOD, "offline": {**GOOD["offline"], "words": {}}})
    assert "unknown key offline.words" in message


def test_skill_name_differs_from_file_name(tmp_path):
    message = skill_error(tmp_path, {**GOOD, "name": "colours"})
    assert "name" in message and "'colors'" in message and "'colours'" in message


def test_skill_template_with_undefined_slot(tmp_path):
    offline = {"templates": ["a {color} {animal}"], "slots": {"color": ["red"]}}
    message = skill_error(tmp_path, {**GOOD, "offline": offline})
    assert "{animal}" in message and "offline" in message


def test_skill_template_with_empty_slot(tmp_path):
    offline = {"templates": ["a {color} car"], "slots": {"color": []}}
    assert "{color}" in skill_error(tmp_path, {**GOOD, "offline": offline})


def test_skill_wrong_types(tmp_path):
    assert "target_count" in skill_error(tmp_path, {**GOOD, "target_count": "many"})
    assert "target_count" in skill_error(tmp_path, {**GOOD, "target_count": 0})
    assert "seeds" in skill_error(tmp_path, {**GOOD, "seeds": "a red car"})


def test_skill_file_not_a_mapping(tmp_path):
    assert "expected a mapping" in skill_error(tmp_path, "- a\n- b\n")


def test_skill_invalid_yaml(tmp_path):
    assert "invalid YAML" in skill_error(tmp_path, "name: [colors\n")


def test_vocabulary_checks_directly():
    assert OfflineVocabulary().templates == []
    with pytest.raises(ValueError, match="slot"):
        OfflineVocabulary(templates=["{x}"], slots={})


@pytest.mark.parametrize(
    "checks, message",
    [
        ({"min_words": 10, "max_words": 5}, "contradictory limits: max_words 5 < min_words 10"),
        ({"require_any": [["two", "three"]], "forbid": ["two", "three"]}, "every word of require_any group"),
        ({"require_any": [[]]}, "an empty group can never be satisfied"),
        ({"max_words": 3}, "breaks the skill's own checks: too_long"),
        ({"require_any": [["left of"]]}, "breaks the skill's own checks: missing_required"),
        ({"forbid": ["apples"]}, "breaks the skill's own checks: forbidden (apples)"),
        ({"forbid": ["odd", " "]}, "checks.forbid[1]: a blank word"),
        ({"require_any": [["two", "three"], ["", "red"]]}, "checks.require_any[1][0]: a blank word"),
    ],
)
def test_contradictory_rules_are_rejected(tmp_path, checks, message):
    (tmp_path / "odd.yaml").write_text(
        yaml.safe_dump(
            {"name": "odd", "description": "d", "seeds": ["three red apples on a table"], "checks": checks}
        )
    )
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_skill(tmp_path, "odd")
    assert "odd.yaml" in str(info.value)


def test_checks_give_their_reason():
    from selma_core.skills import PromptChecks

    checks = PromptChecks(min_words=3, max_words=8, require_any=[["two", "three"]], forbid=["sign that says"])
    assert checks.violation("two cats on a mat") is None
    assert checks.violation("two cats") == "too_short"
    assert checks.violation("two cats " * 5) == "too_long"
    assert checks.violation("a cat on a mat").startswith("missing_required")
    assert checks.violation("a sign that says two") == "forbidden (sign that says)"
    assert checks.violation("twosome cats on a mat").startswith("missing_required")  # whole words only


# -- skills trained on an external dataset ---------------------------------------------------------

DATASET = {"name": "human", "description": "Human captions.", "dataset": {"uri": "data/human"}}


def test_dataset_skill_needs_no_seeds(tmp_path):
    (tmp_path / "human.yaml").write_text(yaml.safe_dump(DATASET))
    skill = load_skill(tmp_path, "human")
    assert skill.is_dataset and skill.seeds == [] and skill.rules == []
    assert skill.dataset.uri == "data/human" and skill.dataset.layout == "auto"
    assert skill.dataset.heldout == 0.1 and skill.dataset.caption_column is None
    assert skill.to_dict()["dataset"]["uri"] == "data/human"
    generated = load_skill(SKILLS_DIR, "counting")
    assert not generated.is_dataset and "dataset" not in generated.to_dict()  # keys as before


def test_dataset_skill_settings_load(tmp_path):
    dataset = {
        "uri": "s3://bucket/coco",
        "layout": "webdataset",
        "caption_column": "caption",
        "max_samples": 500,
        "heldout": 50,
        "endpoint_url": "http://minio:9000",
    }
    (tmp_path / "human.yaml").write_text(yaml.safe_dump({**DATASET, "dataset": dataset}))
    spec = load_skill(tmp_path, "human").dataset
    assert spec.heldout == 50 and isinstance(spec.heldout, int) and spec.max_samples == 500
    assert spec.output_dict() == {
        "layout": "webdataset",
        "caption_column": "caption",
        "max_samples": 500,
        "heldout": 50,
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"seeds": ["a red car"]}, "seeds: a skill with a dataset trains on the dataset's own captions"),
        ({"rules": ["x"], "offline": GOOD["offline"]}, "rules, offline: a skill with a dataset"),
        ({"dataset": {"uri": "data", "layout": "parquet"}}, "dataset.layout: expected one of 'auto'"),
        ({"dataset": {"uri": "data", "heldout": 1.5}}, "heldout: expected a share between 0 and 1"),
        ({"dataset": {"uri": "data", "heldout": -1}}, "heldout: expected a count >= 0"),
        ({"dataset": {"uri": "data", "heldout": True}}, "dataset.heldout: expected int or float"),
        ({"dataset": {"uri": "data", "heldout": 5, "max_samples": 5}}, "leave none of max_samples 5"),
        ({"dataset": {"uri": "data", "max_samples": 1}}, "max_samples: expected >= 2"),
        ({"dataset": {"uri": "http://host/data"}}, "uri: expected a local path, file://PATH or s3://"),
        ({"dataset": {"uri": "s3:///data"}}, "uri: expected s3://BUCKET/PREFIX"),
        ({"dataset": {"uri": "data", "captions": "text"}}, "unknown key dataset.captions"),
        ({"dataset": {"layout": "imagefolder"}}, "missing required key dataset.uri"),
    ],
)
def test_bad_dataset_skills_are_named(tmp_path, extra, message):
    assert message in skill_error(tmp_path, {**DATASET, **extra}, name="human")
