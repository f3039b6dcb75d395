"""The code a run trains with, hashed: the entry's own file, and the files of the user's project that it
imports (`local_imports`), so that an edit to any of them between two attempts of a run, or before a
--resume, is refused or recorded instead of trained on silently.

The project's files are found in the source, not in what a process happened to import: every `import`
and `from ... import` of the entry's file (at its top or inside a function), resolved against the folder
the entry is imported from (`root`: the file's folder, or the top of its package), and so on through
each file found there. An import that resolves outside `root` (an installed library, the standard
library, jaxlaunch itself) is not the project's; a module the code imports by a computed name
(`importlib.import_module(name)`) is not seen."""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.machinery
import logging
import os
import pathlib
import site
import sys
import sysconfig
from collections.abc import Iterator, Mapping, Sequence

log = logging.getLogger(__name__)

CODE_DIGEST_CHARS = 12
MAX_FILES = 2000
"""At most this many of the project's files are hashed (a project folder that holds a whole library);
the limit reached is a warning. A count, not a time: the files recorded are the same at every launch."""


def file_digest(path: str | os.PathLike[str]) -> str | None:
    try:
        return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()[:CODE_DIGEST_CHARS]
    except OSError:
        return None


def import_root(module_file: str | os.PathLike[str], module: str) -> pathlib.Path:
    """The folder a module named `module` (dotted) in `module_file` is imported from: the file's own
    folder for a top-level module (a file entry), the folder above its top package otherwise."""
    path = _absolute(module_file)
    parts = module.split(".")
    package = path.name == "__init__.py"
    depth = len(parts) - (0 if package else 1)
    root = path.parents[depth] if depth < len(path.parents) else path.parent
    expected = root.joinpath(*parts, "__init__.py") if package else root.joinpath(*parts[:-1], f"{parts[-1]}.py")
    # A package whose folders are not named as its modules (an editable install's mapping): its own folder.
    return root if _absolute(expected) == path else path.parent


def local_imports(entry_file: str | os.PathLike[str], root: pathlib.Path, also: Sequence[pathlib.Path] = (),
                  own: pathlib.Path | None = None) -> dict[str, str]:
    """Path relative to `root` (absolute for a file found from a folder of `also`) -> `file_digest` of
    every file of the project that the entry's file imports, directly or through such a file (the
    entry's file itself left out). An absolute import is looked for under `root`, then under each
    folder of `also` (`search_dirs`), first found first, as Python does along its path; a file that
    is installed (`installed`) or jaxlaunch's own (`own`) is not the project's."""
    root, start = _absolute(root), _absolute(entry_file)  # the folders as the hosts' path names them
    roots = [_absolute(folder) for folder in also]
    roots = roots if root in roots else [root, *roots]
    found: dict[pathlib.Path, str] = {}
    todo = [start]
    while todo:
        path = todo.pop()
        for target in _imported_files(path, roots):
            if target == start or target in found or installed(target) or (
                    own is not None and target.resolve().is_relative_to(own)):
                continue
            if len(found) >= MAX_FILES:
                log.warning("the entry's imports: only the first %d files of the project were hashed; an edit to "
                            "the others goes unseen by --resume and the restarts", MAX_FILES)
                todo = []
                break
            digest = file_digest(target)
            if digest is not None:
                found[target] = digest
                todo.append(target)
    return {str(path.relative_to(root)) if path.is_relative_to(root) else str(path): digest
            for path, digest in sorted(found.items())}


def search_dirs(entry_folder: pathlib.Path) -> list[pathlib.Path]:
    """Where the hosts on this machine import the project's modules from, in their order: the working
    directory, the entry's folder (first on this process's path once it imported the entry), the other
    folders on its path, then PYTHONPATH's, as `ray_cluster.runtime_env` hands them over; none that is
    installed."""
    pythonpath = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    folders = [pathlib.Path.cwd(), entry_folder, *(pathlib.Path(p) for p in [*sys.path, *pythonpath] if p)]
    unique = dict.fromkeys(_absolute(folder) for folder in folders)
    return [folder for folder in unique if folder.is_dir() and not installed(folder)]


@functools.cache
def _installed_roots() -> tuple[pathlib.Path, ...]:
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib")}
    roots |= {*getattr(site, "getsitepackages", list)(), site.getusersitepackages()}
    return tuple(pathlib.Path(root).resolve() for root in roots)


def installed(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is in an installed location (site-packages, the user's site, the standard
    library), also through a link to one."""
    resolved = pathlib.Path(path).resolve()
    return any(resolved.is_relative_to(root) for root in _installed_roots())


def _absolute(path: str | os.PathLike[str]) -> pathlib.Path:
    """`path` made absolute and normal, its links kept: jaxlaunch imports a file entry given as a link
    with the link's folder on the path (`entry._import_file`)."""
    return pathlib.Path(os.path.abspath(path))


def module_origin(module: str) -> str | None:
    """The file of module `module` (dotted), found on `sys.path` without importing its packages (whose
    `__init__` would run before an edit of them could be refused); None where the path does not hold
    it (an import hook's module, as an editable install's: `importlib.util.find_spec` then finds it)."""
    locations = None
    spec = None
    parts = module.split(".")
    for i in range(len(parts)):
        name = ".".join(parts[:i + 1])
        imported = getattr(sys.modules.get(name), "__path__", None)
        if i < len(parts) - 1 and imported is not None:
            locations = list(imported)  # imported already: its children are found where it says
            continue
        try:
            spec = importlib.machinery.PathFinder.find_spec(name, locations)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        locations = list(spec.submodule_search_locations or [])
        if i < len(parts) - 1 and not locations:
            return None
    return spec.origin if spec is not None and spec.has_location else None


def edited(root: pathlib.Path, recorded: Mapping[str, str]) -> list[str]:
    """The files of `recorded` (relative to `root`, or absolute, with their digests) whose content
    differs now, or that are gone, by their full path."""
    return [str(root / name) for name, digest in recorded.items() if file_digest(root / name) != digest]


def changed(entry_file: str | os.PathLike[str] | None, code: str | None, imported: Sequence[str]) -> str | None:
    """What of the code launched differs now ("its file F changed", "the files it imports F, G
    changed"), given the entry's file and its hash `code`, and the files it imports that changed
    (`edited`); None: nothing."""
    files = [str(entry_file)] if entry_file is not None and code is not None and \
        file_digest(entry_file) not in (None, code) else []
    own = len(files)
    files += list(imported)
    if not files:
        return None
    return f"{'its' if own else 'the'} file{'s' * (len(files) > 1)} {'' if own else 'it imports '}" \
           f"{', '.join(files)} changed"


def _imported_files(path: pathlib.Path, roots: list[pathlib.Path]) -> Iterator[pathlib.Path]:
    """The files under `roots` that importing the statements of `path` runs: each package's
    `__init__.py` on the way, then the module (or the names of a `from` import that are modules)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return  # its own import fails on the hosts, as it would anywhere
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _first_found(roots, alias.name.split("."), ())
        elif isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            names = tuple(alias.name for alias in node.names if alias.name != "*")
            if node.level == 0:
                yield from _first_found(roots, parts, names)
            elif node.level - 2 < len(path.parent.parents):  # relative to the package of `path`
                base = path.parent.parents[node.level - 2] if node.level > 1 else path.parent
                top = next((root for root in roots if base.is_relative_to(root)), None)
                if top is not None:
                    yield from _module_files(base, parts, names, packages_from=top)


def _first_found(roots: list[pathlib.Path], parts: list[str], names: tuple[str, ...]) -> list[pathlib.Path]:
    """The files of an absolute import from the first of `roots` that holds it."""
    for root in roots:
        files = list(_module_files(root, parts, names))
        if files:
            return files
    return []


def _module_files(base: pathlib.Path, parts: list[str], names: tuple[str, ...],
                  packages_from: pathlib.Path | None = None) -> Iterator[pathlib.Path]:
    """The files of module `parts` found from `base`, and of each of `names` that is a submodule of it.
    `packages_from`: for a relative import, where the `__init__.py` files of `base`'s packages start."""
    if packages_from is not None:
        folder = base
        while folder != packages_from and folder.is_relative_to(packages_from):
            if (folder / "__init__.py").is_file():
                yield folder / "__init__.py"
            folder = folder.parent
    folder = base
    for i, part in enumerate(parts):
        package = folder / part
        if (package / "__init__.py").is_file():
            yield package / "__init__.py"
        elif i == len(parts) - 1 and (folder / f"{part}.py").is_file():
            yield folder / f"{part}.py"
            return  # a module: its `from` names are its attributes
        elif not package.is_dir():
            return  # not under this folder: installed, or the standard library
        folder = package
    for name in names:
        if (folder / name / "__init__.py").is_file():
            yield folder / name / "__init__.py"
        elif (folder / f"{name}.py").is_file():
            yield folder / f"{name}.py"
