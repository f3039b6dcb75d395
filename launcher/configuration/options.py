"""The launcher's flags and `jaxlaunch.launch`'s keywords, built from the config's own dataclasses.

A field declared with `jaxlaunch.contract.flags.flag` is, with nothing else written anywhere: a flag
(`--save-every`, its help the field's docstring, its default the field's), a keyword of
`jaxlaunch.launch` (`save_every=`), typed by the field's annotation, and (being a field) a key of the
config file (`checkpoint: {save_every: ...}`). The roots are `JobConfig`, whose sections are walked,
and `LaunchOptions`, what one launch asks beyond the saved configuration.

Flags are "given" or not: an option the user did not give is absent, so it leaves the config file's
value, or on --resume the run's saved one, in place.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any

import cyclopts

from jaxlaunch.contract.flags import FLAG_KEY, FlagSpec
from jaxlaunch.contract.protocol import ConfigError
from jaxlaunch.contract.values import coerce, describe_hint, merge_settings, scalar

HELP_FLAGS = ("--help", "-h")
VERBOSE_FLAGS = ("--verbose", "-v")
RESERVED_FLAGS = ("help", *HELP_FLAGS, "verbose", *VERBOSE_FLAGS)
"""The command line's own flags besides the declared options (`jaxlaunch.launcher.cli`), and their keywords."""
SUGGESTION_CUTOFF = 0.75
"""How alike (difflib's ratio) a mistyped name and a known one must be to suggest it."""
UNIT_SUFFIXES = ("_s",)
"""Unit suffixes of config names that flags and keywords leave out: `hang_timeout_s` is --hang-timeout."""


def flag_name(name: str) -> str:
    """The command line's flag of a keyword or setting: `save_every` is --save-every."""
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Option:
    """One declared field, as a flag and a keyword."""

    keyword: str
    """The keyword of `jaxlaunch.launch`: "save_every"."""
    path: str
    """Where the value goes in its root: "checkpoint.save_every"."""
    root: type
    hint: Any
    """The field's type, resolved."""
    default: Any
    help: str
    spec: FlagSpec
    section: str
    """The help group: the config section that declares the field, and what it is."""

    @property
    def flag(self) -> str:
        return flag_name(self.spec.cli or self.keyword)

    @property
    def value_type(self) -> Any:
        """The annotation without `None` (a `None` default means "not set")."""
        return _without_none(self.hint)

    def default_text(self) -> str | None:
        """What --help says the default is, unless the docstring says it."""
        if "default" in self.help:
            return None
        if isinstance(self.default, dict):
            return ",".join(f"{k}={v}" for k, v in self.default.items()) if self.default else None
        if isinstance(self.default, tuple | list):
            return None if not self.default else ", ".join(map(str, self.default))
        return str(self.default).lower() if isinstance(self.default, bool) else str(self.default)

    def convert(self, value: Any) -> Any:
        """A keyword's value (Python, or a flag's text) as the field takes it; ConfigError if it cannot be."""
        if not self.spec.repeat:
            return self._one(value)
        items = [value] if isinstance(value, str) or not isinstance(value, Sequence | Mapping) else value
        if isinstance(items, Mapping):
            return self._one(items)
        parsed = [self._one(item) for item in items]
        if typing.get_origin(self.value_type) is dict:
            empty: dict[str, Any] = {}
            return functools.reduce(merge_settings, parsed, empty)
        return tuple(parsed)

    def _one(self, value: Any) -> Any:
        """One value: text through the field's parser, anything else checked against its type (an
        item's type, for a repeatable field)."""
        if isinstance(value, str) and self.spec.parse is not None:
            return self.spec.parse(value)
        kind = self.value_type
        if isinstance(value, Mapping):
            value = dict(value)
        if self.spec.repeat and typing.get_origin(kind) is tuple:
            return coerce(value, typing.get_args(kind)[0], f"each {self.keyword}")
        return coerce(value, self.hint, self.keyword)


def _without_none(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]  # noqa: UP007 - built at run time
    return hint


# ---- the table ----------------------------------------------------------------------------------------

@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings under a dataclass's fields (what `help()` cannot see), joined to one line."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _keyword(field: dataclasses.Field, spec: FlagSpec) -> str:
    if spec.name:
        return spec.name
    for suffix in UNIT_SUFFIXES:
        if field.name.endswith(suffix):
            return field.name.removesuffix(suffix)
    return field.name


def _walk(cls: type, root: type, prefix: str) -> list[Option]:
    out = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    what = (inspect.getdoc(cls) or "").splitlines()[0].rstrip(".")
    name = prefix.rstrip(".") or cls.__name__.removesuffix("Config").removesuffix("Options").lower()
    section = f"{name}: {what[:1].lower()}{what[1:]}" if what else name
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            out += _walk(hint, root, f"{prefix}{field.name}.")
            continue
        spec = field.metadata.get(FLAG_KEY)
        if spec is None:
            continue
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        out.append(Option(_keyword(field, spec), f"{prefix}{field.name}", root, hint, default,
                          docs.get(field.name, ""), spec, section))
    return out


@functools.cache
def table(*roots: type) -> dict[str, Option]:
    """Every declared option of the roots, by keyword. Two fields may not claim one name."""
    out: dict[str, Option] = {}
    for root in roots:
        for option in _walk(root, root, ""):
            clash = out.get(option.keyword)
            if clash is not None:
                raise TypeError(f"{option.path} and {clash.path} both declare the flag {option.flag}")
            out[option.keyword] = option
    return out


def split_by_root(given: Mapping[str, Any], roots: Sequence[type]) -> tuple[dict[type, dict[str, Any]], dict[str, Any]]:
    """Keywords to typed values by root and path, and the keywords no root declares (left to the entry)."""
    options = table(*roots)
    by_root: dict[type, dict[str, Any]] = {root: {} for root in roots}
    rest = {}
    for keyword, value in given.items():
        option = options.get(keyword)
        if option is None:
            rest[keyword] = value
        else:
            by_root[option.root][option.path] = option.convert(value)
    return by_root, rest


def suggestion(word: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, known, n=1, cutoff=SUGGESTION_CUTOFF)
    return f" (did you mean {close[0]}?)" if close else ""


# ---- the command line ---------------------------------------------------------------------------------

def parameters(roots: Sequence[type]) -> list[inspect.Parameter]:
    """One keyword-only parameter per option, annotated for cyclopts: its flag, its help with its
    default, and its group, the section that declares it. An option not given is absent from the
    bound arguments, so that it changes nothing."""
    groups: dict[str, cyclopts.Group] = {}
    out = []
    for option in table(*roots).values():
        if option.section not in groups:
            groups[option.section] = cyclopts.Group(option.section, sort_key=len(groups))
        default = option.default_text()
        help_text = option.help + (f" (default: {default})" if default is not None else "")
        names = [option.flag] + ([option.spec.short] if option.spec.short else [])
        kind = option.value_type
        spec: dict[str, Any] = dict(name=names, group=groups[option.section], help=help_text, show_default=False,
                                    allow_repeating=True)
        if kind is bool:
            annotation: Any = bool
        elif typing.get_origin(kind) in (typing.Union, types.UnionType) and bool in typing.get_args(kind):
            annotation = kind  # bool | Literal["auto"]: the flag alone is True, or it takes a literal value
            spec.update(converter=_text_to(option), show_choices=False, negative=(),
                        metavar=f"\\[{option.spec.metavar}]")  # escaped: Rich would read [auto] as markup
        elif typing.get_origin(kind) is typing.Literal:
            annotation = kind
        elif option.spec.repeat:
            annotation = list[str]  # every text, to the field's parser (`Option.convert`)
            spec.update(metavar=option.spec.metavar or _metavar(option), negative=())
        else:
            annotation = str if option.spec.parse is not None else kind
            spec.update(metavar=option.spec.metavar or _metavar(option), show_choices=False,
                        converter=None if option.spec.parse is not None else _text_to(option))
        out.append(inspect.Parameter(option.keyword, inspect.Parameter.KEYWORD_ONLY, default=None,
                                     annotation=Annotated[annotation | None, cyclopts.Parameter(**spec)]))
    return out


def _metavar(option: Option) -> str:
    if option.path.endswith(UNIT_SUFFIXES):
        return "SECONDS"
    return "N" if option.value_type is int else option.keyword.upper()


def _text_to(option: Option) -> Callable[[Any, Sequence[Any]], Any]:
    """A cyclopts converter: a flag's text as its field takes it, the text itself, else the YAML scalar
    it reads as ("5", "0.5", "auto" for `int | Literal["auto"]`), through the one type check."""
    kind = option.value_type

    def convert(_: Any, tokens: Sequence[Any]) -> Any:
        text = tokens[0].value
        for candidate in (text, scalar(text)):
            try:
                return coerce(candidate, kind, option.flag)
            except ConfigError:
                continue
        raise ValueError(f"expected {describe_hint(kind)}, got {text!r}")

    return convert


def command(params: Iterable[inspect.Parameter]) -> Callable[..., dict[str, Any]]:
    """A function of `params` (keyword-only) that returns what it was given: cyclopts parses into it."""
    def given(**keywords: Any) -> dict[str, Any]:
        return keywords

    given.__signature__ = inspect.Signature(list(params))  # type: ignore[attr-defined]
    return given


def parse_known(app: cyclopts.App, tokens: Sequence[str]) -> tuple[Callable[..., Any], dict[str, Any], list[str]]:
    """The command `tokens` name, the arguments given to it (only those), and the tokens it does not
    declare; ConfigError with cyclopts' one-line message for a bad value."""
    try:
        chosen, bound, unused, _ = app.parse_known_args(list(tokens))
    except cyclopts.CycloptsError as err:
        err.verbose = False
        raise ConfigError(str(err)) from None
    return chosen, dict(bound.arguments), unused


def quiet_app(**kwargs: Any) -> cyclopts.App:
    """A cyclopts App that raises instead of printing or exiting, for `parse_known`."""
    return cyclopts.App(exit_on_error=False, print_error=False, version_flags=(), **kwargs)
