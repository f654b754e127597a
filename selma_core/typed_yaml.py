"""Turn parsed YAML into typed dataclasses, with errors that name the file, the key and the expectation.

Why not pydantic: the configs are plain dataclasses (peft/torchtune style) that phases import without
extra dependencies; the checks needed here (unknown keys, types, ``Literal`` choices) fit in one page.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from selma_core.errors import ConfigError

T = TypeVar("T")


def _check_unique_keys(loader: yaml.SafeLoader, node: yaml.Node, seen_nodes: set[int]) -> None:
    """Refuse a key given twice in one mapping of the composed document: PyYAML keeps the last
    silently, so a second ``train:`` section would reset the first one's settings to defaults.
    Checked before construction, whose merges (``<<: *anchor``) rewrite mappings: keys a merge
    brings in may be overridden. Keys compare as the values they construct to (``yes`` and
    ``true`` are one key, ``1`` and ``'1'`` two)."""
    if id(node) in seen_nodes:  # an anchored node, met again through an alias
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _check_unique_keys(loader, item, seen_nodes)
    if not isinstance(node, yaml.MappingNode):
        return
    seen: dict[Any, yaml.Mark] = {}
    for key_node, value_node in node.value:
        _check_unique_keys(loader, value_node, seen_nodes)
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
            continue
        construct = loader.yaml_constructors.get(key_node.tag)
        key = (type(value := construct(loader, key_node)), value) if construct else (str, key_node.value)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found the key {key_node.value!r} a second time (first on line {seen[key].line + 1}); "
                "give each key once",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``, refusing a key given twice in one mapping (``_check_unique_keys``)."""
    # libyaml's loader where built (15x faster: every job reads every skill file); the same nodes.
    # Bad YAML is read again by the Python loader, whose messages show the line and a caret.
    try:
        return _load_with(getattr(yaml, "CSafeLoader", yaml.SafeLoader), text)
    except yaml.YAMLError:
        return _load_with(yaml.SafeLoader, text)


def _load_with(loader_class: type, text: str) -> Any:
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_unique_keys(loader, node, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file, bad YAML (a key given twice too) or a non-mapping is a
    ``ConfigError``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder; expected a YAML file (for example {path / 'demo.yaml'})")
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = _load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"a mapping of {_type_name(get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


# The words YAML 1.1 (PyYAML) reads as booleans, lower-cased.
YAML_BOOL_SPELLINGS = {False: ("no", "off", "false"), True: ("yes", "on", "true")}


def _fail(source: str, key: str, expected: str, value: Any) -> ConfigError:
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return ConfigError(f"{source}: {key}: expected {expected}, got {shown}")


def convert(tp: Any, value: Any, source: str, key: str) -> Any:
    """Convert ``value`` to type ``tp`` or raise a ``ConfigError`` naming ``source`` and ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        if isinstance(value, bool):
            # YAML 1.1 reads unquoted no/off (yes/on) as false (true): `mixed_precision: no` means "no".
            spelled = [c for c in choices if isinstance(c, str) and c.lower() in YAML_BOOL_SPELLINGS[value]]
            if len(spelled) == 1:
                return spelled[0]
        raise _fail(source, key, f"one of {', '.join(repr(a) for a in choices)}", value)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return convert(arg, value, source, key)
            except ConfigError:
                continue
        raise _fail(source, key, _type_name(tp), value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(source, key, "a mapping", value)
        return from_dict(tp, value, source, prefix=f"{key}.")
    if origin is list:
        if not isinstance(value, list):
            raise _fail(source, key, _type_name(tp), value)
        (item_tp,) = get_args(tp)
        return [convert(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, key, _type_name(tp), value)
        key_tp, item_tp = get_args(tp)
        return {
            convert(key_tp, k, source, f"{key}.{k}"): convert(item_tp, v, source, f"{key}.{k}")
            for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(source, key, "true or false", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(source, key, "an integer", value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept numeric strings for floats only.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise _fail(source, key, "a number", value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(source, key, "a string", value)
    raise TypeError(f"typed_yaml cannot convert to {tp!r}")  # a programming error, not user input


def from_dict(cls: type[T], data: dict[str, Any], source: str, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys, wrong types and missing keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields), key=str)  # YAML keys may be numbers or booleans
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {prefix}{unknown[0]!s}; expected one of: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = convert(hints[name], data[name], source, f"{prefix}{name}")
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required key {prefix}{name} ({_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:
        # __post_init__ validation speaks of the field; add where it came from.
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {e}") from e


def execution_only(default: Any) -> Any:
    """A config field that changes how a job runs but not what it produces (batch size for
    sampling, retries, logging intervals): left out of output hashes, so changing it redoes nothing."""
    return dataclasses.field(default=default, metadata={"affects_output": False})


def hashed_unless_default(default: Any) -> Any:
    """A setting added after outputs were made without it, whose default does what was done before
    (a filter that is off): left out of output hashes while at that default, so upgrading keeps every
    committed output's key; any other value is hashed like any setting."""
    return dataclasses.field(default=default, metadata={"hashed_unless_default": True})


def output_dict(obj: Any) -> Any:
    """``to_dict`` without execution-only fields (nor ``hashed_unless_default`` ones at their
    default): what determines an output."""
    if dataclasses.is_dataclass(obj):
        return {
            f.name: output_dict(getattr(obj, f.name))
            for f in dataclasses.fields(obj)
            if f.init
            and f.metadata.get("affects_output", True)
            and not (f.metadata.get("hashed_unless_default") and getattr(obj, f.name) == f.default)
        }
    if isinstance(obj, (list, tuple)):
        return [output_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: output_dict(v) for k, v in obj.items()}
    return obj


def to_dict(obj: Any) -> Any:
    """The inverse of ``from_dict``: plain data that ``yaml.safe_dump`` and ``json.dumps`` accept."""
    if dataclasses.is_dataclass(obj):
        # init=False fields (e.g. where a config was read from) are not YAML keys.
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
