"""The one type check of a setting's value, the one merge of nested settings, and text as a YAML scalar.

Keywords of `jaxlaunch.launch`, keys of a config file, a run's saved config and an entry's declared
settings are all checked here, by pydantic in strict mode: a value of the field's type, an int where
a float is wanted (made a float), a list where a tuple is wanted; nothing else ("2" is no int, 2.5 no
int, 1 no bool). A wrong value is a ConfigError naming the setting, the type and the value.
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import yaml

from jaxlaunch.contract.protocol import ConfigError

if TYPE_CHECKING:
    import pydantic


@functools.cache
def _adapter(hint: Any) -> pydantic.TypeAdapter[Any]:
    import pydantic  # on first use: `import jaxlaunch` (and every host) stays light

    return pydantic.TypeAdapter(hint)


def _kinds(hint: Any) -> list[Any]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [k for a in typing.get_args(hint) for k in _kinds(a)]
    if typing.get_origin(hint) is typing.Literal:
        return list(typing.get_args(hint))
    return [hint]


def describe_hint(hint: Any) -> str:
    """A type as the user reads it: "int", "bool or 'auto'", "float or None", "a list of str"."""
    return " or ".join(_name(k) for k in _kinds(hint))


def _name(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return f"a list of {_name(typing.get_args(kind)[0])}"
    if typing.get_origin(kind) is dict:
        return "a mapping"
    if kind is type(None):
        return "None"
    return kind.__name__ if isinstance(kind, type) else repr(kind)


def coerce(value: Any, hint: Any, where: str) -> Any:
    """`value` as a field annotated `hint` takes it; ConfigError "WHERE must be TYPE, got VALUE"."""
    given = value
    if typing.get_origin(hint) is tuple and isinstance(value, list | str):
        value = (value,) if isinstance(value, str) else tuple(value)  # YAML: one name, or a list
    import pydantic

    try:
        return _adapter(hint).validate_python(value, strict=True)
    except pydantic.ValidationError:
        raise ConfigError(f"{where} must be {describe_hint(hint)}, got {given!r}") from None


def merge_settings(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `changes` applied, nested mappings merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_settings(out[key], value)
        else:
            out[key] = value
    return out


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one,
    so `steps: 100` above `steps: 10` would silently be 10)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: keys given after it override it, as YAML means
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice (line {key_node.start_mark.line + 1}): keep one",
                    key_node.start_mark)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML text as Python values, with the safe loader; a key given twice is a yaml.YAMLError."""
    return yaml.load(text, Loader=_UniqueKeys)  # noqa: S506 - a SafeLoader subclass


def scalar(text: str) -> Any:
    """A YAML scalar; numbers YAML 1.1 leaves as text (3e-4) are numbers too."""
    if not text.strip():
        return ""
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str):
        try:
            return float(text)
        except ValueError:
            return value
    return value


class Given(str):
    """A command line's text for an entry's setting (`--set KEY=TEXT`, `--KEY TEXT`), typed once the
    setting's default is known (`as_setting`): a text setting keeps it as written ("1.10", "007"),
    any other reads it as a YAML scalar."""


def as_setting(value: Any, default: Any) -> Any:
    """`value` with every `Given` in it made the value it stands for next to `default`."""
    if isinstance(value, Given):
        return str(value) if isinstance(default, str) else scalar(value)
    if isinstance(value, Mapping):
        return {k: as_setting(v, default.get(k) if isinstance(default, Mapping) else None) for k, v in value.items()}
    return value
