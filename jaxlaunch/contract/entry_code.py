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
import hashlib
import importlib.machinery
import os
import pathlib
from collections.abc import Iterator, Mapping

CODE_DIGEST_CHARS = 12
MAX_FILES = 2000
"""At most this many of the project's files are hashed (a folder that holds a whole library)."""


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


def local_imports(entry_file: str | os.PathLike[str], root: pathlib.Path,
                  exclude: tuple[pathlib.Path, ...] = ()) -> dict[str, str]:
    """Path relative to `root` -> `file_digest` of every file under `root` that the entry's file
    imports, directly or through such a file (the entry's file itself left out). `exclude`: folders
    under `root` that are not the project's (jaxlaunch's own package in a checkout of it)."""
    root, start = _absolute(root), _absolute(entry_file)
    found: dict[pathlib.Path, str] = {}
    todo = [start]
    while todo and len(found) < MAX_FILES:
        path = todo.pop()
        for target in _imported_files(path, root):
            if target == start or target in found or any(target.resolve().is_relative_to(x) for x in exclude):
                continue
            digest = file_digest(target)
            if digest is not None:
                found[target] = digest
                todo.append(target)
    return {str(path.relative_to(root)): digest for path, digest in sorted(found.items())}


def _absolute(path: str | os.PathLike[str]) -> pathlib.Path:
    """`path` made absolute and normal, its links kept: Python imports a linked entry's siblings from
    the link's folder, not its target's."""
    return pathlib.Path(os.path.abspath(path))


def module_origin(module: str) -> str | None:
    """The file of module `module` (dotted), found on `sys.path` without importing its packages (whose
    `__init__` would run before an edit of them could be refused); None where the path does not hold
    it (an import hook's module, as an editable install's: `importlib.util.find_spec` then finds it)."""
    locations = None
    spec = None
    parts = module.split(".")
    for i in range(len(parts)):
        try:
            spec = importlib.machinery.PathFinder.find_spec(".".join(parts[:i + 1]), locations)
        except (ImportError, ValueError):
            return None
        if spec is None:
            return None
        locations = list(spec.submodule_search_locations or [])
        if i < len(parts) - 1 and not locations:
            return None
    return spec.origin if spec is not None and spec.has_location else None


def edited(root: pathlib.Path, recorded: Mapping[str, str]) -> list[str]:
    """The files of `recorded` (relative to `root`, with their digests) whose content differs now, or
    that are gone."""
    return [name for name, digest in recorded.items() if file_digest(root / name) != digest]


def changed(entry_file: str | os.PathLike[str], module: str, code: str | None,
            imports: Mapping[str, str]) -> str | None:
    """What of the code launched differs now ("its file F changed", "the files it imports F, G
    changed"), given the entry's file and module name, its file's hash `code` and the hashes of the
    files it imports; None: nothing."""
    files = [str(entry_file)] if code is not None and file_digest(entry_file) not in (None, code) else []
    own = len(files)
    if imports:
        root = import_root(entry_file, module)
        files += [str(root / name) for name in edited(root, imports)]
    if not files:
        return None
    return f"{'its' if own else 'the'} file{'s' * (len(files) > 1)} {'' if own else 'it imports '}" \
           f"{', '.join(files)} changed"


def _imported_files(path: pathlib.Path, root: pathlib.Path) -> Iterator[pathlib.Path]:
    """The files under `root` that importing the statements of `path` runs: each package's
    `__init__.py` on the way, then the module (or the names of a `from` import that are modules)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return  # its own import fails on the hosts, as it would anywhere
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield from _module_files(root, alias.name.split("."), ())
        elif isinstance(node, ast.ImportFrom):
            parts = node.module.split(".") if node.module else []
            names = tuple(alias.name for alias in node.names if alias.name != "*")
            if node.level == 0:
                yield from _module_files(root, parts, names)
            elif node.level - 2 < len(path.parent.parents):  # relative to the package of `path`
                base = path.parent.parents[node.level - 2] if node.level > 1 else path.parent
                if base.is_relative_to(root):
                    yield from _module_files(base, parts, names, packages_from=root)


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
