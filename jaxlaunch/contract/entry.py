"""The user's function: found and checked on the driver before anything starts, found again in every
host process, and shipped to a cluster with the job.

An entry is "package.module:function" or "path/to/file.py:function" (the function defaults to
`main`). It takes one argument, the host context. An entry may declare, with `@entrypoint(...)`,
the defaults of its settings (then --set accepts only known keys, typed like the defaults), a check
of its settings against a mesh (run before any host starts, and to choose host counts the job fits
on), and a fingerprint of its input (compared on --resume, so a run never silently trains on other
data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import os
import pathlib
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar, overload

from jaxlaunch.contract import by_value, entry_code
from jaxlaunch.contract.protocol import ConfigError, EntryRef
from jaxlaunch.contract.values import as_setting, coerce

DEFAULT_FUNCTION = "main"
BUILTIN_ENTRY = "jaxlaunch.models.lm:main"
"""The built-in language model, the default entry."""
LEGACY_ENTRIES = {"models.lm:main": BUILTIN_ENTRY}
"""Entries as runs written before the one installed package named them (kept in their config.json)."""
ENTRY_SPEC_ATTRIBUTE = "__jaxlaunch_entry__"
"""Where `@entrypoint` keeps an entry's `EntrySpec`, on the function."""
_BY_VALUE_NAME = re.compile(r"^(?P<function>\S+) \(by value, code (?P<fingerprint>[0-9a-f]+)\)$")


class LaunchInsideHostError(RuntimeError):
    """`jaxlaunch.launch` was called inside a host process of a running job."""


class EntryChangedError(ConfigError):
    """The entry's file differs from the one the run was launched with: a host would run other code."""


@dataclasses.dataclass(frozen=True)
class EntrySpec:
    """What an entry declares about itself (all optional)."""

    defaults: Mapping[str, Any] | None = None
    """Its settings' defaults: with them, --set keys are checked and typed."""
    check: Check | None = None
    """check(config, mesh_sizes) raises ValueError when the settings do not suit a mesh."""
    fingerprint: Fingerprint | None = None
    """fingerprint(config) -> JSON-able value describing the input (e.g. a hash of the data)."""


Check = Callable[[dict[str, Any], dict[str, int]], None]
Fingerprint = Callable[[dict[str, Any]], Any]
F = TypeVar("F", bound=Callable[..., Any])


@overload
def entrypoint(function: F, *, defaults: Mapping[str, Any] | None = None, check: Check | None = None,
               fingerprint: Fingerprint | None = None) -> F: ...
@overload
def entrypoint(function: None = None, *, defaults: Mapping[str, Any] | None = None, check: Check | None = None,
               fingerprint: Fingerprint | None = None) -> Callable[[F], F]: ...
def entrypoint(function: F | None = None, *, defaults: Mapping[str, Any] | None = None, check: Check | None = None,
               fingerprint: Fingerprint | None = None) -> F | Callable[[F], F]:
    """Declares an entry's settings, their check and its input fingerprint:

        @jaxlaunch.entrypoint(defaults={"learning_rate": 1e-3, "batch_size": 32})
        def main(ctx): ...
    """
    def mark(fn: F) -> F:
        # The spec travels on the function object itself, so any import of it finds it.
        setattr(fn, ENTRY_SPEC_ATTRIBUTE, EntrySpec(dict(defaults) if defaults is not None else None, check,
                                                    fingerprint))
        return fn

    return mark(function) if function is not None else mark


@dataclasses.dataclass(frozen=True)
class Entry:
    ref: EntryRef
    function: Callable
    spec: EntrySpec

    def settings(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The entry's settings: its defaults with `given` over them, checked and typed against them."""
        defaults = self.spec.defaults
        if defaults is None:
            return as_setting(dict(given), None)
        unknown = sorted(set(given) - set(defaults))
        if unknown:
            raise ConfigError(f"{self.ref} has no setting {unknown[0]!r} (set by --set, --config or a keyword); "
                              f"its settings are "
                              f"{', '.join(sorted(defaults))}")
        out = dict(defaults)
        for key, value in given.items():
            out[key] = _typed_like(defaults[key], value, key)
        return out

    def check(self, settings: dict[str, Any], mesh: dict[str, int]) -> None:
        if self.spec.check is None:
            return
        try:
            self.spec.check(settings, mesh)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{self.ref}: {err}") from None
        except Exception as err:  # noqa: BLE001 - the entry's own check failed: its settings are unusable
            raise ConfigError(f"{self.ref}: its check of the settings raised {type(err).__name__}: {err}") from None

    def fits(self, settings: dict[str, Any], mesh: dict[str, int]) -> bool:
        try:
            self.check(settings, mesh)
        except ConfigError:
            return False
        return True

    def fingerprint(self, settings: dict[str, Any]) -> Any:
        if self.spec.fingerprint is None:
            return None
        try:
            return self.spec.fingerprint(settings)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{self.ref}: cannot read its input: {err}") from None


def _typed_like(default: Any, value: Any, key: str) -> Any:
    """A setting's value typed like its default (`--set name=123` is the text "123" for a text setting);
    a mapping's given keys merged into its default's, each typed like its own default."""
    value = as_setting(value, default)
    if default is None or value is None:
        return value
    if isinstance(default, Mapping) and isinstance(value, Mapping) and default:
        unknown = sorted(set(value) - set(default))
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: setting {key!r} has no key {unknown[0]!r} (set by --set, --config "
                              f"or a keyword); its keys are {', '.join(sorted(map(str, default)))}")
        return {**default, **{k: _typed_like(default[k], v, f"{key}.{k}") for k, v in value.items()}}
    if isinstance(default, str) and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    try:
        return coerce(value, type(default), key)
    except ConfigError:
        raise ConfigError(f"--set {key}={value!r}: expected {type(default).__name__} like its default "
                          f"{default!r}") from None


# ---- finding the function ---------------------------------------------------------------------------

def sent_by_value(text: str) -> str | None:
    """The function's name, if `text` names an entry sent by value ("main (by value, code 3f2a...)")."""
    match = _BY_VALUE_NAME.match(text)
    return match["function"].split(".")[-1] if match else None


def _split(text: str) -> tuple[str, str, pathlib.Path | None]:
    """An entry's text as (target, function, the file's absolute path for a file entry). A path with
    ".." is resolved as the system opens it (through symbolic links), others are kept as written."""
    target, _, function = text.rpartition(":") if ":" in text else (text, ":", DEFAULT_FUNCTION)
    if not (target.endswith(".py") or os.sep in target):
        return target, function or DEFAULT_FUNCTION, None
    path = pathlib.Path(target).expanduser()
    return target, function or DEFAULT_FUNCTION, path.resolve() if ".." in path.parts else path.absolute()


def canonical(text: str) -> str:
    """An entry's text as `str(EntryRef)` names the same entry (an absolute path, the function
    named), without looking for it: a run's entry as an older version recorded it compares equal."""
    text = LEGACY_ENTRIES.get(text, text)
    if sent_by_value(text) is not None:
        return text
    target, function, path = _split(text)
    return f"{path if path is not None else target}:{function}"


def found_here(text: str) -> bool:
    """Whether an entry's canonical text names something this machine may load: a file that exists,
    or a module (found when loaded)."""
    _, _, path = _split(text)
    return path is None or path.is_file()


def parse_entry(text: str) -> EntryRef:
    """"file.py:fn" or "package.module:fn" (":fn" defaults to main) as an EntryRef for this machine."""
    function = sent_by_value(text)
    if function is not None:
        raise ConfigError(f"this run's entry, {text}, was sent from Python (a notebook, a script or stdin); "
                          f"continue it from there: jaxlaunch.launch({function}, resume=True, run_dir=...)")
    target, function, path = _split(text)
    if not target or not function.isidentifier():
        raise ConfigError(f"--entry {text!r}: expected path/to/file.py:function or package.module:function")
    if path is not None:
        if path.suffix != ".py":
            raise ConfigError(f"--entry {text!r}: {path.name} is not a Python file (.py): name the .py file")
        if not path.is_file():
            raise ConfigError(f"--entry {text!r}: no such file {path}")
        return EntryRef(module=path.stem, function=function, path=str(path))
    if not all(part.isidentifier() for part in target.split(".")):
        raise ConfigError(f"--entry {text!r}: expected path/to/file.py:function or package.module:function")
    return EntryRef(module=target, function=function)


_loading: list[EntryRef] = []
"""The entries being imported in this process right now (a `launch` during one is refused)."""


@contextlib.contextmanager
def _importing(ref: EntryRef) -> Iterator[None]:
    _loading.append(ref)
    try:
        yield
    finally:
        _loading.pop()


_VERSION = "__jaxlaunch_file_version__"
"""A file entry's module's attribute: the file's (mtime, size) when it was imported."""
ENTRY_MODULE_PREFIX = "_jaxlaunch_entry_"
"""A file entry's module name starts with this (then its stem and a hash of its path)."""

_host_rank: int | None = None
"""This process's rank when it is a host of a running job (`mark_host_process`)."""


def mark_host_process(rank: int) -> None:
    """A host process says so as it takes its rank: `jaxlaunch.launch` in it is refused from then on."""
    global _host_rank
    _host_rank = rank


def refuse_nested_launch() -> None:
    """For `jaxlaunch.launch`: refuses to run while an entry's file is being imported (a module-level
    call in a file passed to --entry) or inside a host process (the hosts run functions, they do
    not launch jobs)."""
    if _loading:
        where = _loading[-1].path or _loading[-1].module
        raise ConfigError(f"{where} calls jaxlaunch.launch when it is imported (as --entry does): put the call "
                          f"under `if __name__ == \"__main__\":`, or run the file with python instead of --entry")
    rank = _host_rank
    if rank is not None:
        raise LaunchInsideHostError(
            f"jaxlaunch.launch was called inside host {rank} of a running job: the hosts run your function, "
            f"they do not launch jobs; if the call is at the top of a file the hosts import, put it under "
            f"`if __name__ == \"__main__\":`")


def load_entry(ref: EntryRef, code: str | None = None, imports: Mapping[str, str] | None = None) -> Callable:
    """The entry's function, imported (or unpickled) in this process. Raises ConfigError naming what
    went wrong. `code`: the hash of the entry's file when the run was launched (`code_digest`), and
    `imports` those of the project's files it imports (`imports_digest`); a file that hashes otherwise
    now (edited since, and imported again by a restart) raises EntryChangedError before the entry is
    imported, so none of its code runs: the run would go on with other code, silently."""
    where = f"--entry {ref}" if ref.payload is None else str(ref)
    module = function = None
    try:
        with _importing(ref):
            if code is not None or imports:  # a function sent by value: the files it imports by name
                _refuse_edited(ref, code, imports or {}, where)
            if ref.payload is None:
                module = _module(ref)
            else:
                _add_to_path(_folder(ref))
                function = by_value.unpickled(ref.payload)
    except ConfigError:
        raise
    except ModuleNotFoundError as err:
        raise ConfigError(f"{where}: cannot import {err.name!r} ({err}); check the name and that it is "
                          f"installed or in the current directory") from None
    except BaseException as err:  # noqa: BLE001 - a broken module is the user's to fix
        raise ConfigError(f"{where}: importing it raised {type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}") from None
    if module is not None:
        function = getattr(module, ref.function, None)
        if function is None:
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
            raise ConfigError(f"{where}: {module.__name__} has no function {ref.function!r}"
                              + (f"; it has {', '.join(names[:8])}" if names else ""))
    return _checked(function, ref, where)


def edited_imports(ref: EntryRef, imports: Mapping[str, str]) -> list[str]:
    """The files of `imports` (`imports_digest`) that differ now or are gone: the hosts' check, and --resume's."""
    path = _module_file(ref) if ref.payload is None else ref.path
    root = _folder(ref) or (entry_code.import_root(path, ref.module) if path else None)
    return entry_code.edited(root, imports) if root is not None and imports else []


def _refuse_edited(ref: EntryRef, code: str | None, imports: Mapping[str, str], where: str) -> None:
    path = _module_file(ref) if ref.payload is None else None
    changed = entry_code.changed(path, code, edited_imports(ref, imports))
    if changed is not None:
        raise EntryChangedError(f"{where}: {changed} since the run was launched, so the hosts would now run "
                                "other code than the run trained with")


def _folder(ref: EntryRef) -> pathlib.Path | None:
    """The folder of the entry's file (the shipped copy on a cluster), whose siblings it may import."""
    if ref.package is not None:
        return pathlib.Path(importlib.import_module(ref.package).__path__[0])
    return pathlib.Path(ref.path).parent if ref.path is not None else None


def _add_to_path(folder: pathlib.Path | None) -> None:
    if folder is not None and str(folder) not in sys.path:
        sys.path.insert(0, str(folder))


def _module(ref: EntryRef) -> types.ModuleType:
    folder = _folder(ref)
    if folder is not None:
        return _import_file(folder / f"{ref.module}.py", ref.module)
    _cwd_on_path()
    return importlib.import_module(ref.module)


def _cwd_on_path() -> None:
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would


def _module_file(ref: EntryRef) -> str | os.PathLike[str] | None:
    """The file `_module` imports, found without running it (`entry_code.module_origin`)."""
    folder = _folder(ref)
    if folder is not None:
        return folder / f"{ref.module}.py"
    _cwd_on_path()
    found = entry_code.module_origin(ref.module)
    if found is not None:
        return found
    try:
        spec = importlib.util.find_spec(ref.module)
    except (ImportError, ValueError):
        return None  # the import itself then fails as it always did, or finds what it finds
    return spec.origin if spec is not None and spec.has_location else None


def import_for_unpickling(ref: EntryRef, missing: str) -> bool:
    """Makes module `missing` importable, which unpickling a value of the entry's code asks for (a
    pytree class of its state): the entry's folder goes on the path (its sibling modules), and the
    entry file itself is imported under its own name (its top level only: no function of it is
    called). False: the module is none of the entry's."""
    if ref.payload is not None or (ref.path is None and ref.package is None):
        return False
    _add_to_path(_folder(ref))
    if missing.startswith(ENTRY_MODULE_PREFIX):
        with _importing(ref):
            if _module(ref).__name__ != missing:
                return False
    return True


def _checked(function: Any, ref: EntryRef, where: str) -> Callable:
    if not callable(function):
        raise ConfigError(f"{where}: {ref.function} is not a function")
    try:
        inspect.signature(function).bind(object())
    except TypeError:
        raise ConfigError(f"{where}: {ref.function} must take exactly one argument, the host context "
                          f"(def {ref.function}(ctx): ...)") from None
    except ValueError:
        pass  # no signature to inspect (a builtin or C function)
    return function


def _import_file(path: pathlib.Path, name: str) -> types.ModuleType:
    if not path.is_file():
        raise ConfigError(f"--entry: no such file {path}")
    # Like running the file: its folder is importable (sibling modules), and a name of its own keeps
    # two entries called main.py apart.
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    unique = f"{ENTRY_MODULE_PREFIX}{name}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    stat = path.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    loaded = sys.modules.get(unique)
    if loaded is not None and getattr(loaded, _VERSION, None) == version:
        return loaded  # edited since (a notebook's next launch): imported again, as the hosts will
    spec = importlib.util.spec_from_file_location(unique, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--entry: {path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    setattr(module, _VERSION, version)
    sys.modules[unique] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if loaded is not None:
            sys.modules[unique] = loaded
        else:
            del sys.modules[unique]
        raise
    return module


def resolve(text: str) -> Entry:
    ref = parse_entry(text)
    function = load_entry(ref)
    return Entry(ref, function, getattr(function, ENTRY_SPEC_ATTRIBUTE, None) or EntrySpec())


def code_digest(ref: EntryRef) -> str | None:
    """A hash of the entry's own file (the file given, or the module's), compared on --resume so that
    an edited entry does not train on silently; None for a function sent by value (its fingerprint
    is part of its name) or a module without a file. The files it imports: `imports_digest`."""
    if ref.payload is not None:
        return None
    path = _module_file(ref)
    return entry_code.file_digest(path) if path else None


def imports_digest(ref: EntryRef) -> dict[str, str]:
    """The hashes of the project's files the entry imports (`entry_code.local_imports`); for a function
    sent by value, those its script imports (none from a notebook or a session)."""
    start = ref.path if ref.payload is not None else _module_file(ref)
    if start is None or entry_code.installed(start):
        return {}  # an installed package: what it imports is installed too, and not the run's to compare
    root = _folder(ref) or entry_code.import_root(start, ref.module)
    return entry_code.local_imports(start, root, entry_code.search_dirs(root), own=_OWN_PACKAGE)


_OWN_PACKAGE = pathlib.Path(__file__).resolve().parents[1]
"""jaxlaunch's own files, which an entry in a checkout of it imports from under its folder."""


def from_callable(function: Callable) -> Entry:
    """The entry of a function object (for `jaxlaunch.launch(main)`): by reference when the hosts can
    import it by name, by value otherwise (defined in `__main__`, a notebook, an interactive session,
    or nested in another function). Raises ConfigError, before anything starts, for a function that
    uses a value that cannot travel."""
    name: str = getattr(function, "__qualname__", None) or getattr(function, "__name__", None) or repr(function)
    module = inspect.getmodule(function)
    if module is not None and module.__name__.startswith("_jaxlaunch_entry_") and "<" not in name \
            and getattr(module, name, None) is function:
        return resolve(f"{module.__file__}:{name}")  # a file that --entry loaded: the hosts load it too
    if "." not in name and by_value.importable(function):
        return resolve(f"{function.__module__}:{name}")
    payload, fingerprint = by_value.pickled(function)
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None) if getattr(function, "__module__", None) == "__main__" else None
    ref = EntryRef(module=getattr(function, "__module__", None) or "__main__", function=name,
                   path=str(pathlib.Path(script).absolute()) if script else None, payload=payload,
                   fingerprint=fingerprint)
    return Entry(ref, _checked(function, ref, str(ref)), getattr(function, ENTRY_SPEC_ATTRIBUTE, None) or EntrySpec())


def resume_command(ref: EntryRef, run_dir: str) -> str:
    """How to continue a run: from Python for a function sent by value (the command line has no way
    to send it), from the command line otherwise."""
    if ref.payload is not None:
        return f"jaxlaunch.launch({ref.function.split('.')[-1]}, resume=True, run_dir={run_dir!r})"
    return f"jaxlaunch --resume --run-dir {run_dir}"


# ---- shipping to a cluster -------------------------------------------------------------------------

SHIPPED_ENTRY_PACKAGE = "jaxlaunch_entry_shipped"
"""The name a file entry's folder is shipped to a cluster under (`shipped`)."""


def shipped(ref: EntryRef, staging: pathlib.Path) -> tuple[EntryRef, list[str]]:
    """How the hosts of a cluster find the entry: its reference there and the folders to ship (as
    Ray py_modules). A file entry ships its folder (siblings stay importable), under a name of its
    own in `staging` (`SHIPPED_ENTRY_PACKAGE`) so it cannot shadow a package of the same name;
    a module of a local package ships the package; an installed package ships nothing (the nodes must
    have it). A function sent by value from a script ships the script's folder (what it imports from
    there travels by name); from a notebook or stdin, nothing more."""
    if ref.path is not None:
        folder = pathlib.Path(ref.path).parent
        # One name for every shipped folder: Ray keeps a shipped folder under a hash of what is inside
        # it, without its name, and unpacks it under the name it was first shipped with. Any name that
        # differs between folders alike in content (two clones of a project; two entries of one folder,
        # examples/minimal.py and examples/classifier.py) leaves a later launch's hosts unable to import
        # theirs. A job ships one entry folder, and each job's hosts have their own sys.path.
        name = SHIPPED_ENTRY_PACKAGE
        link = staging / name
        if not link.exists():
            link.symlink_to(folder, target_is_directory=True)
        return dataclasses.replace(ref, path=None, package=name), [str(link)]
    if ref.payload is not None:
        return ref, []
    top = ref.module.split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin in (None, "built-in", "frozen"):
        return ref, []
    location = pathlib.Path(spec.submodule_search_locations[0]) if spec.submodule_search_locations \
        else pathlib.Path(spec.origin)
    if entry_code.installed(location):
        return ref, []
    return ref, [str(location)]
