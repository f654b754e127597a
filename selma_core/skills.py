"""Skills as data: ``skills/<name>.yaml`` says what a skill is and how to write prompts for it.

```yaml
name: counting
description: Images with an exact, small number of objects.
rules:                      # shown to the LLM with every request
  - State an exact number of objects between two and six, written as a word.
checks:                     # enforced on every prompt (seeds included): the rules, machine-checked
  min_words: 4
  max_words: 25
  require_any: [[two, three, four, five, six]]   # what it must test: one word of each group
  forbid: [text, sign, letters]                  # what it must avoid
seeds:                      # in-context examples; later requests also sample accepted prompts
  - three red apples on a wooden table
target_count: 1000          # prompts to generate (a config's prompts.num_prompts overrides it)
offline:                    # vocabulary for the offline (non-LLM) generator used by demos and tests
  templates: ["{number} {object} {place}"]
  slots: {number: [two, three], object: [cats, cups], place: [on a table]}
```
A user adds a skill by adding such a file.

A skill may instead name an existing image-text dataset (human captions, say, to compare with the
auto-generated data as the SELMA paper does); it then has no prompts or images job, and its expert
trains on the dataset's pairs (``selma_core.datasets``, docs/datasets.md):

```yaml
name: coco_counting
description: Human-captioned photos with counted objects.
dataset:
  uri: data/coco-counting     # a folder (relative to this file's folder), s3://bucket/prefix, or shards
  layout: auto                # imagefolder (metadata.jsonl) | webdataset (.tar shards) | auto
  caption_column: text        # default: text, caption or prompt, the first present
  max_samples: 5000           # the first N samples in the dataset's order (default: all)
  heldout: 0.1                # share (0 < x < 1) or count (an integer) of captions kept for evaluation
```
Such a skill has no ``seeds``, ``rules``, ``checks`` or ``offline`` vocabulary: its captions are used
as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from selma_core.errors import ConfigError
from selma_core.typed_yaml import from_dict, read_yaml, to_dict

SLOT_PATTERN = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
# Skill names become store keys, file names, MLflow names and Kubernetes labels: no '/', no '..'.
SKILL_NAME_PATTERN = re.compile(r"^[a-z0-9]([a-z0-9_-]{0,61}[a-z0-9])?$")
# More prompts per skill than any run needs (SELMA: about 1,000); a bound, not a target.
MAX_PROMPTS = 1_000_000


# Names the results already use beside the skills': the mean over skills (eval tags, the promotion
# gate, the merge search) and every prompt pooled (the summary and report). A skill so named would
# have its score overwritten by the aggregate, and escape the gate's per-skill check.
RESERVED_SKILL_NAMES = ("all", "mean")


def check_skill_name(name: str) -> str:
    """``name`` if it is a valid skill name, else a ``ValueError`` saying what a name may contain."""
    if not isinstance(name, str) or not SKILL_NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a valid skill name (lowercase letters, digits, '-' and '_', at most 63)"
        )
    if name in RESERVED_SKILL_NAMES:
        raise ValueError(
            f"{name!r} is not a valid skill name: results use it for the aggregate over skills "
            f"({' and '.join(repr(n) for n in RESERVED_SKILL_NAMES)} are reserved)"
        )
    return name


@dataclass
class OfflineVocabulary:
    """Templates with ``{slot}`` fields and the words each slot may take."""

    templates: list[str] = field(default_factory=list)
    slots: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for template in self.templates:
            for slot in SLOT_PATTERN.findall(template):
                if not self.slots.get(slot):
                    raise ValueError(f"template {template!r} uses slot {{{slot}}}, which has no words")


def _phrase_pattern(phrase: str) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9])" + re.escape(phrase.lower()) + r"(?![a-z0-9])")


@dataclass
class PromptChecks:
    """Rules every accepted prompt must obey, checked by machine (the LLM is told them in words)."""

    min_words: int = 1
    max_words: int = 60
    # What the prompt must test: each group lists alternatives, and a prompt contains one of each.
    require_any: list[list[str]] = field(default_factory=list)
    # Words or phrases a prompt must not contain.
    forbid: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.min_words < 1:
            raise ValueError(f"checks.min_words: expected >= 1, got {self.min_words}")
        if self.max_words < self.min_words:
            raise ValueError(
                f"checks: contradictory limits: max_words {self.max_words} < min_words {self.min_words}"
            )
        # A blank word matches every text (a required one is always met, a forbidden one always broken).
        for i, word in enumerate(self.forbid):
            if not word.strip():
                raise ValueError(f"checks.forbid[{i}]: a blank word; give a word or phrase, or remove it")
        for g, group in enumerate(self.require_any):
            for i, word in enumerate(group):
                if not word.strip():
                    raise ValueError(f"checks.require_any[{g}][{i}]: a blank word; give a word or phrase")
        forbidden = {f.lower() for f in self.forbid}
        for group in self.require_any:
            if not group:
                raise ValueError("checks.require_any: an empty group can never be satisfied")
            if all(word.lower() in forbidden for word in group):
                raise ValueError(
                    f"checks: contradictory rules: every word of require_any group {group} is forbidden"
                )
        self._required = [[_phrase_pattern(w) for w in group] for group in self.require_any]
        self._forbidden = [(w, _phrase_pattern(w)) for w in self.forbid]

    def violation(self, text: str) -> str | None:
        """Why ``text`` breaks the checks (a short reason), or None when it obeys them."""
        words = len(text.split())
        if words < self.min_words:
            return "too_short"
        if words > self.max_words:
            return "too_long"
        lowered = text.lower()
        for group, patterns in zip(self.require_any, self._required, strict=True):
            if not any(p.search(lowered) for p in patterns):
                return f"missing_required ({group[0]}...)"
        for word, pattern in self._forbidden:
            if pattern.search(lowered):
                return f"forbidden ({word})"
        return None


DATASET_LAYOUTS = ("auto", "imagefolder", "webdataset")


@dataclass
class DatasetSpec:
    """An existing image-text dataset a skill's expert trains on (``selma_core.datasets`` reads it)."""

    # A local folder (relative to the skill file's folder, or absolute; ``file://`` optional), a
    # WebDataset shard or brace pattern (``shards/train-{0000..0099}.tar``), or ``s3://bucket/prefix``.
    uri: str
    # imagefolder: a metadata.jsonl (Hugging Face imagefolder) whose rows name file_name and a
    # caption; webdataset: .tar shards of <key>.<jpg|jpeg|png|webp> + <key>.txt or <key>.json;
    # auto: imagefolder when there is a metadata.jsonl at the top, else webdataset.
    layout: Literal["auto", "imagefolder", "webdataset"] = "auto"
    # The caption: imagefolder's metadata.jsonl column, or the key of a WebDataset sample's .json.
    # None: "text", "caption" or "prompt", the first present (WebDataset: a .txt first).
    caption_column: str | None = None
    # Only the first max_samples samples in the dataset's order (None: all of them).
    max_samples: int | None = None
    # Captions kept out of training for evaluation (eval's heldout benchmark, merge-search): a share
    # of the distinct captions (a number between 0 and 1) or their count (an integer; 0: none).
    heldout: int | float = 0.1
    # S3 endpoint of an s3:// dataset (MinIO, Ceph); None: the pipeline's storage.endpoint_url.
    endpoint_url: str | None = None

    def __post_init__(self) -> None:
        if not self.uri.strip():
            raise ValueError("uri: expected a folder, shard pattern or s3://bucket/prefix, got ''")
        if self.uri.startswith("s3://") and not self.uri[len("s3://") :].split("/")[0]:
            raise ValueError(f"uri: expected s3://BUCKET/PREFIX, got {self.uri!r}")
        if "://" in self.uri and not self.uri.startswith(("s3://", "file://")):
            raise ValueError(
                f"uri: expected a local path, file://PATH or s3://BUCKET/PREFIX, got {self.uri!r}"
            )
        if self.caption_column is not None and not self.caption_column.strip():
            raise ValueError("caption_column: expected a column name, got ''")
        if self.max_samples is not None and self.max_samples < 2:
            raise ValueError(
                f"max_samples: expected >= 2 (one to train, one held out), got {self.max_samples}"
            )
        if isinstance(self.heldout, bool):
            raise ValueError(f"heldout: expected a share (0 < x < 1) or a count, got {self.heldout!r}")
        if isinstance(self.heldout, int):
            if self.heldout < 0:
                raise ValueError(f"heldout: expected a count >= 0, got {self.heldout}")
        elif not 0.0 < self.heldout < 1.0:
            raise ValueError(
                f"heldout: expected a share between 0 and 1 (exclusive) or an integer count, "
                f"got {self.heldout}"
            )
        if (
            self.max_samples is not None
            and isinstance(self.heldout, int)
            and self.heldout >= self.max_samples
        ):
            raise ValueError(
                f"heldout: {self.heldout} held-out captions leave none of max_samples "
                f"{self.max_samples} to train on"
            )

    def output_dict(self) -> dict:
        """What decides the expert besides the data itself: not where the data lives (the uri or
        endpoint: a copy elsewhere, or the path a pod sees, is the same data)."""
        return {
            "layout": self.layout,
            "caption_column": self.caption_column,
            "max_samples": self.max_samples,
            "heldout": self.heldout,
        }


@dataclass
class Skill:
    name: str
    description: str
    # Generated skills: at least one seed prompt. Dataset skills: none.
    seeds: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)
    target_count: int = 1000
    checks: PromptChecks = field(default_factory=PromptChecks)
    offline: OfflineVocabulary = field(default_factory=OfflineVocabulary)
    # An existing image-text dataset to train on instead of generated prompts and images.
    dataset: DatasetSpec | None = None

    @property
    def is_dataset(self) -> bool:
        """Trained on an external dataset: no prompts or images jobs."""
        return self.dataset is not None

    def __post_init__(self) -> None:
        try:
            check_skill_name(self.name)
        except ValueError as e:
            raise ValueError(f"name: {e}") from None
        if self.dataset is not None:
            # Its captions are the data: generation settings would be silently ignored.
            unused = [
                key
                for key, value, default in (
                    ("seeds", self.seeds, []),
                    ("rules", self.rules, []),
                    ("checks", self.checks, PromptChecks()),
                    ("offline", self.offline, OfflineVocabulary()),
                )
                if value != default
            ]
            if unused:
                raise ValueError(
                    f"{', '.join(unused)}: a skill with a dataset trains on the dataset's own captions; "
                    f"remove {'it' if len(unused) == 1 else 'them'} (or remove dataset: to generate prompts)"
                )
            return
        if not [s for s in self.seeds if s.strip()]:
            raise ValueError(
                "seeds: expected at least one seed prompt, got none (or a dataset: to train on an "
                "existing image-text dataset instead)"
            )
        for seed in self.seeds:
            reason = self.checks.violation(seed.strip())
            if reason:  # the seeds are the examples: rules they break are contradictory
                raise ValueError(f"seeds: {seed!r} breaks the skill's own checks: {reason}")
        if self.target_count < 2:
            raise ValueError(
                f"target_count: expected >= 2 (one to train, one held out), got {self.target_count}"
            )
        if self.target_count > MAX_PROMPTS:
            raise ValueError(f"target_count: expected at most {MAX_PROMPTS:,}, got {self.target_count:,}")

    def to_dict(self) -> dict:
        data = to_dict(self)
        if data.get("dataset") is None:  # generated skills hash (and key) as they did before datasets
            data.pop("dataset", None)
        return data


def load_skill(skills_dir: str | Path, name: str) -> Skill:
    """Load ``<skills_dir>/<name>.yaml``; an unknown skill names the ones that exist."""
    try:  # the name becomes a file name here: nothing that leaves skills_dir
        check_skill_name(name)
    except ValueError as e:
        raise ConfigError(f"skill {e}") from None
    skills_dir = Path(skills_dir)
    path = skills_dir / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in skills_dir.glob("*.yaml")) if skills_dir.is_dir() else []
        where = "" if known else " (skills_dir, resolved against the config file's folder, may be wrong)"
        raise ConfigError(
            f"unknown skill {name!r}: no file {path}; known skills: {', '.join(known) or 'none'}{where}"
        )
    data = read_yaml(path)
    if "seeds" not in data and data.get("dataset") is None:
        raise ConfigError(
            f"{path}: missing required key seeds (a list of seed prompts), or a dataset: section to "
            "train on an existing image-text dataset instead"
        )
    if isinstance(data.get("dataset"), dict):
        # Checked alone first: as an optional section its precise error (which key, what was
        # expected) would otherwise read "expected a mapping or null".
        from_dict(DatasetSpec, data["dataset"], source=str(path), prefix="dataset.")
    skill = from_dict(Skill, data, source=str(path))
    if skill.name != name:
        raise ConfigError(f"{path}: name: expected {name!r} (the file name), got {skill.name!r}")
    return skill


def load_skills(skills_dir: str | Path, names: list[str]) -> dict[str, Skill]:
    return {name: load_skill(skills_dir, name) for name in names}
