"""The pipeline config: every shipped file loads; every mistake is a ConfigError naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from selma_core import typed_yaml
from selma_core.config import PipelineConfig, config_from_dict, load_config, stable_hash
from selma_core.errors import EXIT_INVALID, ConfigError
from selma_core.skills import load_skills

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message, f"the message does not name the file: {message}"
    return message


# -- the shipped configs ---------------------------------------------------------------------------


def test_shipped_configs_are_found():
    names = {p.name for p in CONFIGS}
    assert len(CONFIGS) >= 4
    assert {"demo.yaml", "sd15.yaml", "sd2.yaml", "sdxl.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.source_path == str(path.resolve())
    assert cfg.skills_path == REPO / "skills"
    skills = load_skills(cfg.skills_path, cfg.skills)
    assert list(skills) == cfg.skills
    assert Path(cfg.cache_dir).is_absolute()
    assert Path(cfg.executor.log_dir).is_absolute()
    if cfg.storage.uri.startswith("file://"):
        assert Path(cfg.storage.uri[len("file://") :]).is_absolute()
    if cfg.tracking.uri.startswith("sqlite:///"):
        assert Path(cfg.tracking.uri[len("sqlite:///") :]).is_absolute()
    # Everything survives a dump to YAML and back.
    again = config_from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict())))
    assert again == cfg


def test_demo_values():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.name == "selma-demo"
    assert cfg.base_model == "random:tiny-sd"
    assert cfg.generator == "random:tiny-sd"
    assert cfg.skills == ["counting", "spatial"]
    assert cfg.train.rank == 4
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.prompts.backend == "offline"
    assert cfg.registered_model_name == "selma-demo"


# -- path resolution -------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    path = write(
        tmp_path,
        "name: p\nbase_model: ./models/local-sd\ngenerator_model: org/hub-model\nskills: [counting]\n"
        "skills_dir: " + str(REPO / "skills") + "\n"
        "storage: {uri: 'file://data/store'}\ntracking: {uri: 'sqlite:///data/mlflow.db'}\n"
        "executor: {log_dir: data/logs}\ncache_dir: data/cache\n",
        name="configs/p.yaml",
    )
    cfg = load_config(path)
    base = work.resolve()
    assert cfg.storage.uri == f"file://{base / 'data' / 'store'}"
    assert cfg.tracking.uri == f"sqlite:///{base / 'data' / 'mlflow.db'}"
    assert cfg.tracking.uri.startswith("sqlite:////")  # SQLAlchemy's absolute form
    assert cfg.executor.log_dir == str(base / "data" / "logs")
    assert cfg.cache_dir == str(base / "data" / "cache")
    assert cfg.base_model == str(base / "models" / "local-sd")
    assert cfg.generator_model == "org/hub-model"  # a hub id is not a path


def test_default_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, "name: p\nbase_model: random:tiny-sd\nskills: [counting]\n"))
    base = tmp_path.resolve()
    assert cfg.storage.uri == f"file://{base / 'selma-data' / 'store'}"
    assert cfg.tracking.uri == f"sqlite:///{base / 'selma-data' / 'mlflow.db'}"
    assert cfg.executor.log_dir == str(base / "selma-data" / "logs")
    assert cfg.cache_dir == str(base / "selma-data" / "cache")
    assert cfg.base_model == "random:tiny-sd"


def test_absolute_and_remote_uris_are_kept(tmp_path):
    cfg = load_config(
        write(
            tmp_path,
            "name: p\nbase_model: m\nskills: [a]\n"
            "storage: {uri: 's3://bucket/prefix', endpoint_url: 'http://minio:9000'}\n"
            "tracking: {uri: 'http://mlflow:5000', registered_model_name: reg}\n"
            f"cache_dir: {tmp_path / 'c'}\n",
        )
    )
    assert cfg.storage.uri == "s3://bucket/prefix"
    assert cfg.storage.endpoint_url == "http://minio:9000"
    assert cfg.tracking.uri == "http://mlflow:5000"
    assert cfg.registered_model_name == "reg"
    assert cfg.cache_dir == str(tmp_path / "c")


def test_skills_dir_resolves_against_the_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    text = "name: p\nbase_model: m\nskills: [a]\nskills_dir: ../my-skills\n"
    path = write(tmp_path, text, name="x/y/p.yaml")
    assert load_config(path).skills_dir == str((tmp_path / "x" / "my-skills").resolve())
    default = write(tmp_path, "name: p\nbase_model: m\nskills: [a]\n", name="x/y/q.yaml")
    assert load_config(default).skills_dir == str((tmp_path / "x" / "skills").resolve())


# -- errors ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="file not found") as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert info.value.exit_code == EXIT_INVALID


def test_a_folder_or_a_uri_as_the_config(tmp_path):
    with pytest.raises(ConfigError, match="a folder; expected a YAML file"):
        load_config(tmp_path)
    path = write(
        tmp_path, (REPO / "configs" / "demo.yaml").read_text().replace("../skills", str(REPO / "skills"))
    )
    assert load_config(f"file://{path}").source_path == str(path)  # as the job contract writes it
    with pytest.raises(ConfigError, match="read from a local path \\(or file:// URI\\), not s3://"):
        load_config("s3://bucket/demo.yaml")


def test_invalid_yaml(tmp_path):
    message = config_error(write(tmp_path, "name: [unclosed\nskills: x\n"))
    assert "invalid YAML" in message


def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path):
    """PyYAML keeps the last of two keys silently: a second train section would reset the first's
    settings to their defaults."""
    message = config_error(write(tmp_path, BASE + "train:\n  rank: 4\n  alpha: 4\ntrain:\n  steps: 9\n"))
    assert "found the key 'train' a second time (first on line 4)" in message and "line 7" in message
    nested = config_error(write(tmp_path, BASE + "prompts:\n  num_prompts: 8\n  num_prompts: 9\n"))
    assert "found the key 'num_prompts' a second time (first on line 5)" in nested
    # A merge's keys may be overridden: that is what merges are for.
    merged = BASE + "x-train: &t {rank: 4, alpha: 4}\ntrain:\n  <<: *t\n  rank: 8\n"
    with pytest.raises(ConfigError, match="unknown key x-train"):  # parsed: only the key is unknown
        load_config(write(tmp_path, merged))
    assert typed_yaml.read_yaml(write(tmp_path, merged))["train"] == {"rank": 8, "alpha": 4}
    # Merges within merges, as safe_load reads them; keys compare as values: 1 and '1' are two
    # keys, yes and true (both True) one.
    nested = "b: &b {rank: 4, alpha: 4}\nx:\n  t: &t {<<: *b, rank: 8}\ny:\n  <<: *t\n  alpha: 2\n"
    assert typed_yaml.read_yaml(write(tmp_path, nested)) == yaml.safe_load(nested)
    assert typed_yaml.read_yaml(write(tmp_path, "a:\n  1: x\n  '1': y\n")) == {"a": {1: "x", "1": "y"}}
    with pytest.raises(ConfigError, match="found the key 'true' a second time"):
        typed_yaml.read_yaml(write(tmp_path, "a:\n  yes: 1\n  true: 2\n"))


def test_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    assert "not UTF-8" in config_error(path)


def test_top_level_list(tmp_path):
    message = config_error(write(tmp_path, "- name: p\n- skills: [a]\n"))
    assert "expected a mapping" in message and "list" in message


def test_empty_file_misses_required_keys(tmp_path):
    message = config_error(write(tmp_path, ""))
    assert "missing required key name" in message


def test_missing_required_key(tmp_path):
    message = config_error(write(tmp_path, "name: p\nskills: [a]\n"))
    assert "missing required key base_model" in message


BASE = "name: p\nbase_model: m\nskills: [counting]\n"


def test_unknown_top_level_key(tmp_path):
    message = config_error(write(tmp_path, BASE + "bogus_key: 1\n"))
    assert "unknown key bogus_key" in message
    assert "base_model" in message and "skills" in message  # the expected keys are listed


def test_unknown_nested_key(tmp_path):
    message = config_error(write(tmp_path, BASE + "train:\n  rnak: 4\n"))
    assert "unknown key train.rnak" in message
    assert "rank" in message


def test_unknown_deeply_nested_key(tmp_path):
    message = config_error(write(tmp_path, BASE + "prompts:\n  openai:\n    modle: x\n"))
    assert "unknown key prompts.openai.modle" in message


def test_wrong_type(tmp_path):
    message = config_error(write(tmp_path, BASE + "train:\n  rank: abc\n"))
    assert "train.rank" in message and "integer" in message and "'abc'" in message


def test_bool_where_int_expected(tmp_path):
    message = config_error(write(tmp_path, BASE + "train:\n  rank: true\n"))
    assert "train.rank" in message and "integer" in message and "True" in message


def test_float_where_int_expected(tmp_path):
    message = config_error(write(tmp_path, BASE + "train:\n  steps: 8.5\n"))
    assert "train.steps" in message and "integer" in message


def test_wrong_literal_lists_the_choices(tmp_path):
    message = config_error(write(tmp_path, BASE + "executor:\n  kind: docker\n"))
    assert "executor.kind" in message
    assert "'local'" in message and "'kubernetes'" in message and "'docker'" in message


@pytest.mark.parametrize(
    "section, line, key, value",
    [
        ("train", "mixed_precision: no", "mixed_precision", "no"),
        ("train", "compile: off", "compile", "off"),
        ("images", "compile: Off", "compile", "off"),
    ],
)
def test_a_choice_yaml_reads_as_a_boolean_is_the_choice(tmp_path, section, line, key, value):
    """YAML 1.1 reads unquoted no/off as false: the docs' `mixed_precision: no` means "no"."""
    cfg = load_config(write(tmp_path, BASE + f"{section}:\n  {line}\n"))
    assert getattr(getattr(cfg, section), key) == value


def test_a_boolean_that_is_no_choice_is_refused(tmp_path):
    message = config_error(write(tmp_path, BASE + "train:\n  mixed_precision: yes\n"))
    assert "train.mixed_precision: expected one of 'auto', 'no', 'bf16', 'fp16', got True" in message


def test_keys_that_yaml_reads_as_booleans_or_numbers_are_named_as_unknown(tmp_path):
    message = config_error(write(tmp_path, BASE + "train:\n  yes: 1\n  foo: 2\n  3: x\n"))
    assert "unknown key train.3;" in message  # sorted as text: 3, True, foo


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            "generator_model_revision: abc\n",
            "generator_model_revision: pins generator_model, which is not set",
        ),
        ("train:\n  vae_model_revision: abc\n", "vae_model_revision: pins vae_model, which is not set"),
    ],
)
def test_a_revision_of_a_model_that_is_not_set_is_refused(tmp_path, lines, message):
    """It would be ignored without a word (or only change a key)."""
    assert message in config_error(write(tmp_path, BASE + lines))


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "CUDA"])
def test_a_device_torch_would_refuse_is_refused_at_load(tmp_path, device):
    """Else torch refuses it inside the first GPU job: an exit 1, retried as an outage."""
    message = config_error(write(tmp_path, BASE + f"device: {device}\n"))
    assert f"device: expected auto, cpu, cuda, cuda:N or mps, got {device!r}" in message


def test_bad_yaml_is_named_with_the_line_and_what_is_wrong(tmp_path):
    message = config_error(write(tmp_path, BASE + "train:\n\trank: 4\n"))
    assert "invalid YAML" in message and "found character '\\t' that cannot start any token" in message
    assert "line 5" in message


def test_section_that_is_not_a_mapping(tmp_path):
    message = config_error(write(tmp_path, BASE + "train: 5\n"))
    assert "train" in message and "a mapping" in message


def test_list_item_of_wrong_type(tmp_path):
    message = config_error(write(tmp_path, "name: p\nbase_model: m\nskills: [counting, 3]\n"))
    assert "skills[1]" in message and "string" in message


def test_optional_field_wrong_type(tmp_path):
    message = config_error(write(tmp_path, BASE + "images:\n  height: tall\n"))
    assert "images.height" in message and "int or null" in message


def test_dict_value_of_wrong_type(tmp_path):
    message = config_error(write(tmp_path, BASE + "merge:\n  weights: {counting: heavy}\n"))
    assert "merge.weights" in message


def named(name: str) -> str:
    return yaml.safe_dump({"name": name, "base_model": "m", "skills": ["a"]})


@pytest.mark.parametrize(
    "name", ["Selma", "../x", "a/b", "-lead", "trail-", "has space", "a" * 64, "under_score"]
)
def test_invalid_name(tmp_path, name):
    message = config_error(write(tmp_path, named(name)))
    assert "name:" in message and repr(name) in message


@pytest.mark.parametrize("name", ["a", "selma-demo", "x1", "a" * 63])
def test_valid_name(tmp_path, name):
    assert load_config(write(tmp_path, named(name))).name == name


def test_empty_skills(tmp_path):
    message = config_error(write(tmp_path, "name: p\nbase_model: m\nskills: []\n"))
    assert "skills" in message and "at least one" in message


def test_duplicate_skills(tmp_path):
    message = config_error(write(tmp_path, "name: p\nbase_model: m\nskills: [counting, spatial, counting]\n"))
    assert "skills" in message and "duplicate" in message


def test_invalid_skill_name(tmp_path):
    message = config_error(write(tmp_path, "name: p\nbase_model: m\nskills: [../etc]\n"))
    assert "skills" in message and "'../etc'" in message


@pytest.mark.parametrize("name", ["mean", "all"])
def test_skill_names_the_results_use_for_aggregates_are_reserved(tmp_path, name):
    message = config_error(write(tmp_path, f"name: p\nbase_model: m\nskills: [counting, {name}]\n"))
    assert f"{name!r} is not a valid skill name" in message and "reserved" in message


@pytest.mark.parametrize(
    ("alias", "why"),
    [
        ("latest", "reserved by MLflow"),
        ("V3", "reserved by MLflow"),
        ("champion", "jobs.promote's"),
        ("", "letters, digits"),
        ("rc.1", "letters, digits"),
    ],
)
def test_merge_aliases_mlflow_or_the_gate_own_are_refused(tmp_path, alias, why):
    message = config_error(write(tmp_path, BASE + f"merge: {{alias: '{alias}'}}\n"))
    assert "merge" in message and "alias" in message and why in message


def test_bad_storage_uri(tmp_path):
    message = config_error(write(tmp_path, BASE + "storage: {uri: 'ftp://host/x'}\n"))
    assert "storage" in message and "uri" in message and "'ftp://host/x'" in message
    assert "file://" in message and "s3://" in message


def test_negative_storage_retries(tmp_path):
    message = config_error(write(tmp_path, BASE + "storage: {connect_retries: -1}\n"))
    assert "storage" in message and "connect_retries" in message
    message = config_error(write(tmp_path, BASE + "storage: {transfer_threads: 0}\n"))
    assert "storage" in message and "transfer_threads: expected >= 1, got 0" in message


def test_bad_tracking_uri(tmp_path):
    message = config_error(write(tmp_path, BASE + "tracking: {uri: 'postgresql://db/mlflow'}\n"))
    assert "tracking" in message and "uri" in message and "'postgresql://db/mlflow'" in message


def test_post_init_range_checks_name_the_section(tmp_path):
    message = config_error(write(tmp_path, BASE + "executor: {max_parallel: 0}\n"))
    assert "executor" in message and "max_parallel" in message
    message = config_error(write(tmp_path, BASE + "prompts: {heldout_fraction: 1.5}\n"))
    assert "prompts" in message and "heldout_fraction" in message


def test_negative_tracking_retries(tmp_path):
    text = BASE + "tracking: {uri: 'http://mlflow:5000', connect_retries: -1}\n"
    message = config_error(write(tmp_path, text))
    assert "tracking" in message and "connect_retries" in message


def test_name_with_trailing_newline_is_rejected(tmp_path):
    config_error(write(tmp_path, 'name: "selma\\n"\nbase_model: m\nskills: [a]\n'))


# -- floats, hashing, round trips ------------------------------------------------------------------


def test_float_fields_accept_numeric_strings(tmp_path):
    # YAML 1.1 reads 3e-4 (no dot) as a string.
    path = write(tmp_path, BASE + "train:\n  learning_rate: 3e-4\n  alpha: 8\n")
    assert yaml.safe_load(path.read_text())["train"]["learning_rate"] == "3e-4"
    cfg = load_config(path)
    assert cfg.train.learning_rate == pytest.approx(3e-4)
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.train.alpha == 8.0 and isinstance(cfg.train.alpha, float)


def test_float_field_rejects_non_numbers(tmp_path):
    message = config_error(write(tmp_path, BASE + "train:\n  learning_rate: fast\n"))
    assert "train.learning_rate" in message and "number" in message
    message = config_error(write(tmp_path, BASE + "train:\n  learning_rate: true\n"))
    assert "train.learning_rate" in message and "number" in message


def test_int_fields_do_not_accept_strings(tmp_path):
    message = config_error(write(tmp_path, BASE + "train:\n  rank: '4'\n"))
    assert "train.rank" in message and "integer" in message


def test_config_hash_is_stable_and_sensitive(tiny_config):
    path = tiny_config()
    first = load_config(path)
    second = load_config(path)
    assert first.config_hash() == second.config_hash()
    assert len(first.config_hash()) == 16
    int(first.config_hash(), 16)
    # Where this machine keeps things is not part of it (a Kubernetes pod sees other paths).
    moved = load_config(tiny_config(cache_dir="/elsewhere/cache", executor={"log_dir": "/elsewhere/logs"}))
    assert moved.config_hash() == first.config_hash()
    assert first.config_hash() != stable_hash({**first.to_dict(), "name": "x"})

    changed = load_config(tiny_config(train={"rank": 8}))
    assert changed.train.rank == 8
    assert changed.config_hash() != first.config_hash()
    renamed = load_config(tiny_config(name="selma-other"))
    assert renamed.config_hash() != first.config_hash()


def test_config_hash_ignores_where_the_file_was_read(tiny_config, tmp_path):
    cfg = load_config(tiny_config())
    copy = tmp_path / "elsewhere" / "copy.yaml"
    copy.parent.mkdir()
    copy.write_text(Path(cfg.source_path).read_text())
    other = load_config(copy)
    assert other.source_path != cfg.source_path
    assert other.config_hash() == cfg.config_hash()
    assert "source_path" not in cfg.to_dict()


def test_stable_hash_ignores_key_order():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert len(stable_hash({}, length=8)) == 8


def test_to_dict_round_trips_through_from_dict(tiny_config):
    cfg = load_config(tiny_config(merge={"weights": {"counting": 2.0, "spatial": 1.0}}))
    data = typed_yaml.to_dict(cfg)
    assert isinstance(data["train"], dict) and data["train"]["rank"] == 4
    assert data["merge"]["weights"] == {"counting": 2.0, "spatial": 1.0}
    rebuilt = typed_yaml.from_dict(PipelineConfig, data, source="<test>")
    assert rebuilt == cfg
    assert typed_yaml.to_dict(rebuilt) == data
    # config_from_dict is the same, for data without source_path (PipelineConfig.to_dict).
    again = config_from_dict(cfg.to_dict(), source="<round-trip>")
    assert again == cfg
    assert again.source_path == "<round-trip>"
    assert again.config_hash() == cfg.config_hash()


def test_overrides_replace_top_level_keys(tiny_config):
    cfg = load_config(tiny_config(), overrides={"skills": ["spatial"], "device": "cpu"})
    assert cfg.skills == ["spatial"]
    assert cfg.device == "cpu"
    with pytest.raises(ConfigError, match="unknown key nonsense"):
        load_config(tiny_config(), overrides={"nonsense": 1})


def test_a_weight_search_needs_a_method_that_applies_its_weights(tmp_path):
    text = BASE + "merge_search: {enabled: true}\nmerge: {method: ties}\n"
    message = config_error(write(tmp_path, text))
    assert "merge_search scores linear combinations" in message and "'ties'" in message
