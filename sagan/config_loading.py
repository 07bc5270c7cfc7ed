"""How YAML and `key=value` overrides become a validated config tree, and how a refusal reads.

The sections themselves are in sagan/config.py. Nothing here knows them: every function takes the root model
class, so a package can build a tree of its own (its sections beside sagan's) on the same machinery.

- `ConfigModel`: the base of every section: strict types (pydantic's lax mode would take "16" or true for an
  int), unknown keys refused, the docstring under each key as its description in the JSON schema.
- Field types for what YAML 1.1 (PyYAML) writes: `1e-4` without a dot is a string and `0` an int where a float
  is meant, lists where tuples are kept, a word (`auto`) for null.
- `load_into(root, path, overrides)`: defaults, then the YAML file, then the overrides; a ValidationError
  becomes a one-line ConfigError naming the key, what is allowed, and the file's line and column.
"""

import math
import typing
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config key that does not exist, or a value of the wrong type; the message names the key."""


@dataclass(frozen=True)
class Rule:
    """Field metadata: what the field allows, in words, for a value it refuses ("must be positive"). An
    `{input}` in the text places the value; otherwise ", got <value>" follows."""

    text: str


def cross_field(key: str, message: str) -> PydanticCustomError:
    """The error a model validator raises for a check across keys: `message` names `key` itself, and `key`
    finds the value's line in the YAML file."""
    return PydanticCustomError("cross_field", "{message}", {"key": key, "message": message})


class ConfigModel(BaseModel):
    """A config section (or the root): strict, closed, documented by the docstring under each key."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        use_attribute_docstrings=True,
        json_schema_extra={"type": ["object", "null"]},  # null: a section whose keys are all commented out
    )

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, data):
        return {} if data is None else data  # YAML reads a section whose keys are all commented out as null


# --- Field types: strict, with the few readings of YAML 1.1 that today's files rely on ---


def yaml_float(value):
    """YAML 1.1 reads "1e-4" (no dot) as a string and "0" as an int: both are fine floats."""
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # refused by the float type, naming the value
    return value


def number_as_text(value):
    """A name or path that YAML read as a number (`run.name=2024`) is that text."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def auto_is_null(value):
    """`auto` is the documented word for null (chosen per device)."""
    return None if value == "auto" else value


def as_tuple(value, length: int | None = None):
    """A YAML list as the tuple the field keeps (hashable, comparable); a single value as a one-item list."""
    items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if length is not None and len(items) != length:
        text = f"expected {length} values, got {shown(value)}"
        raise PydanticCustomError("value_count", "{text}", {"text": text})
    return items


def off_or_above_one(value: float) -> float:
    """0 turns a check off; a factor must be above 1 (train.diverge_factor)."""
    if not (value == 0 or value > 1) or not math.isfinite(value):
        raise PydanticCustomError("out_of_range", "out of range")
    return value


YAML_FLOAT = BeforeValidator(yaml_float)
TUPLE = BeforeValidator(as_tuple)
PAIR = BeforeValidator(partial(as_tuple, length=2))

Str = Annotated[str, BeforeValidator(number_as_text)]
AutoBool = Annotated[
    bool | None,
    BeforeValidator(auto_is_null),
    WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "null"}, {"const": "auto"}]}),
]
Ints = Annotated[tuple[int, ...], TUPLE]
Positive = Annotated[int, Field(gt=0)]
NonNegative = Annotated[int, Field(ge=0)]
# Constraints go before YAML_FLOAT: only there does pydantic write them into the JSON schema (exclusiveMinimum).
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False), YAML_FLOAT, Rule("must be a finite number above 0")]
Unit = Annotated[float, Field(ge=0, lt=1), YAML_FLOAT, Rule("must be in [0, 1)")]
OffOrAboveOne = Annotated[
    float,
    YAML_FLOAT,
    AfterValidator(off_or_above_one),
    Rule("must be 0 (off) or above 1"),
    WithJsonSchema({"anyOf": [{"const": 0}, {"type": "number", "exclusiveMinimum": 1}]}),
]


# --- Reading: YAML with positions, overrides, merging ---


@dataclass
class Origin:
    """Where the values came from: the YAML file (its path and node tree) and the override tree."""

    path: Path | None = None
    node: yaml.Node | None = None
    overrides: dict = field(default_factory=dict)

    def position(self, loc: tuple, key_itself: bool = False) -> str:
        """The message's " (FILE line L, column C)" for the value at `loc` (the key itself for an unknown key),
        when the file set that value; "" for a default or an override."""
        if self.node is None or _overridden(self.overrides, loc):
            return ""
        node = _node_at(self.node, loc, key_itself)
        if node is None:
            return ""
        mark = node.start_mark
        return f" ({self.path} line {mark.line + 1}, column {mark.column + 1})"


def _node_at(node: yaml.Node, loc: tuple, key_itself: bool) -> yaml.Node | None:
    key = node
    for part in loc:
        if isinstance(part, int) and not isinstance(node, yaml.MappingNode):  # an item of a list
            if isinstance(node, yaml.SequenceNode) and part < len(node.value):
                node = node.value[part]
            continue  # a single value stands for a one-item list
        if not isinstance(node, yaml.MappingNode):
            return None
        pairs = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)]
        if not pairs:
            return None  # a default: not in the file
        key, node = pairs[-1]  # PyYAML keeps the last of repeated keys
    return key if key_itself else node


def _overridden(tree: dict, loc: tuple) -> bool:
    """Whether an override set the value at `loc` (or a value holding it)."""
    for part in (p for p in loc if isinstance(p, str)):
        if not isinstance(tree, dict):
            return True
        if part not in tree:
            return False
        tree = tree[part]
    return True


def read_yaml(path: Path) -> tuple[dict, yaml.Node | None]:
    """The mapping in the YAML file at `path` and its node tree (for line and column of a refused value)."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    loader = yaml.SafeLoader(path.read_text())
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        context = f" ({e.context})" if getattr(e, "context", None) else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}: {what}{context}") from None
    finally:
        loader.dispose()
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections (model:, optim:, ...), got {type(data).__name__}"
        )
    return data, node


def _set_dotted(tree: dict, key: str, value) -> None:
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is a value, not a section")
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> dict:
    """Nested dict from ["a.b=value", ...]; values are read as YAML (numbers, lists, true/false, null)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key.strip(), value)
    return tree


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` applied key by key (a section in both is merged, anything else replaced)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build(root: type[BaseModel], data, origin: Origin | None = None):
    """`root` validated from `data`, or ConfigError in one line naming the key (and its place in the file)."""
    try:
        return root.model_validate(data)
    except ValidationError as e:
        raise ConfigError(one_line(root, e, origin or Origin())) from None


def load_into(root: type[BaseModel], path: str | Path | None = None, overrides: list[str] | None = None):
    """`root` from its defaults, then the YAML file at `path` (if any), then dotted `key=value` overrides."""
    origin = Origin(overrides=parse_overrides(overrides or []))
    data: dict = {}
    if path is not None:
        origin.path = Path(path)
        data, origin.node = read_yaml(origin.path)
    return build(root, merge(data, origin.overrides), origin)


def plain(value):
    """Nested dicts and lists (tuples become lists) for YAML, JSON, checkpoints and MLflow params."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


# --- Errors: one line, in the words of the key's rule ---

_TYPES = {"int_type": "int", "bool_type": "bool", "float_type": "float", "string_type": "str"}
_RANGES = {
    "greater_than": "must be above {gt}",
    "greater_than_equal": "must be at least {ge}",
    "less_than": "must be below {lt}",
    "less_than_equal": "must be at most {le}",
    "finite_number": "must be a finite number",
    "string_pattern_mismatch": "must match {pattern}",
    "out_of_range": "is out of range",
}


def shown(value) -> str:
    """A value as the message quotes it: text in quotes, lists as YAML wrote them."""
    return f"'{value}'" if isinstance(value, str) else repr(plain(value))


def one_line(root: type[BaseModel], error: ValidationError, origin: Origin) -> str:
    """The first refusal of `error` (an unknown key before anything else) as one line."""
    errors = error.errors()
    e = next((x for x in errors if x["type"] in ("extra_forbidden", "invalid_key")), errors[0])
    loc, kind, ctx = e["loc"], e["type"], e.get("ctx", {})
    if kind == "cross_field":
        return ctx["message"] + origin.position(tuple(ctx["key"].split(".")))
    if kind in ("extra_forbidden", "invalid_key"):  # invalid_key: a key YAML read as a number
        valid = ", ".join(sorted(_model_at(root, loc[:-1]).model_fields))
        key = ".".join(map(str, loc))
        return f"unknown config key '{key}'; valid keys here: {valid}" + origin.position(loc, key_itself=True)
    key = ".".join(p for p in loc if isinstance(p, str)) or "config"  # list indices stay out of the key
    return f"{key}: {_what(root, e)}" + origin.position(loc)


def _what(root: type[BaseModel], e: dict) -> str:
    """What is wrong with the value, and what the key allows."""
    kind, value, loc = e["type"], e["input"], e["loc"]
    if kind in _TYPES:
        return f"expected {_TYPES[kind]}, got {shown(value)}"
    if kind == "model_type":
        return f"expected a mapping of keys, got {shown(value)}"
    if kind == "value_count":
        return e["msg"]
    parts = _field_parts(root, loc)
    choices = next((typing.get_args(p) for p in parts if typing.get_origin(p) is typing.Literal), ())
    if kind == "literal_error" and not any(type(value) is type(c) for c in choices):
        return f"expected {type(choices[0]).__name__}, got {shown(value)}"  # '32' for 32: the type is what is wrong
    rule = next((p.text for p in parts if isinstance(p, Rule)), None) or _allowed(e, choices)
    text = rule.replace("{input}", shown(value)) if "{input}" in rule else f"{rule}, got {shown(value)}"
    return f"each value {text}" if loc and isinstance(loc[-1], int) else text


def _allowed(e: dict, choices: tuple) -> str:
    """What a declared constraint allows, in words, for a field without a Rule of its own."""
    if e["type"] == "literal_error":
        return "{input} is not one of " + ", ".join(map(str, choices))
    ctx = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in e.get("ctx", {}).items()}
    if ctx in ({"gt": 0}, {"ge": 0}):
        return "must be positive" if "gt" in ctx else "must be 0 or more"
    return _RANGES[e["type"]].format(**ctx) if e["type"] in _RANGES else e["msg"]


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The section class at the key path `loc`."""
    for part in loc:
        root = root.model_fields[part].annotation
    return root


def _field_parts(root: type[BaseModel], loc: tuple) -> list:
    """The field's annotation and everything inside it (metadata such as Rule, Literal, item types), flat."""
    keys = [p for p in loc if isinstance(p, str)]
    if not keys:
        return []
    info = _model_at(root, tuple(keys[:-1])).model_fields[keys[-1]]
    out, todo = list(info.metadata), [info.annotation]
    while todo:
        tp = todo.pop()
        out.append(tp)
        todo.extend(typing.get_args(tp))
    return out
