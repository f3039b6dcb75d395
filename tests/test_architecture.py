"""The layering the code promises: the driver (`jaxlaunch.launcher`) and the host processes
(`jaxlaunch.workers`) meet only in the contract (`jaxlaunch.contract`), which needs neither Ray nor
JAX; the built-in model is a client of the public API alone; decisions and the state machine need
no Ray; no two modules import each other, directly or around a loop; a class or module name means
one thing in the package; and no module grows into two."""

import ast
import collections
import pathlib
import subprocess
import sys

from jaxlaunch.contract import protocol

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 500
FOLDERS = {"jaxlaunch.contract": ROOT / "jaxlaunch" / "contract", "jaxlaunch.launcher": ROOT / "launcher",
           "jaxlaunch.workers": ROOT / "workers", "jaxlaunch.models": ROOT / "models"}
MAY_IMPORT = {
    "jaxlaunch.contract": {"jaxlaunch.contract"},
    "jaxlaunch.launcher": {"jaxlaunch.contract", "jaxlaunch.launcher"},
    "jaxlaunch.workers": {"jaxlaunch.contract", "jaxlaunch.workers"},
    "jaxlaunch.models": {"jaxlaunch", "jaxlaunch.models"},  # `jaxlaunch` itself: the public names only
}


def modules() -> dict[str, pathlib.Path]:
    """Every module of the installed package, by its dotted name."""
    found = {f"jaxlaunch.{p.stem}": p for p in (ROOT / "jaxlaunch").glob("*.py")}
    for layer, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((layer, *parts[:-1])) if parts[-1] == "__init__" else ".".join((layer, *parts))
            found[name] = path
    return found


def imports(path: pathlib.Path) -> set[str]:
    """Every module a file imports, at its top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def owner(module: str) -> str | None:
    """The layer a module of ours belongs to (`jaxlaunch` alone for the public package's top)."""
    if module == "jaxlaunch" or module in ("jaxlaunch.entrypoint", "jaxlaunch.launch", "jaxlaunch.HostContext"):
        return "jaxlaunch"
    return next((layer for layer in FOLDERS if module == layer or module.startswith(layer + ".")), None)


def test_the_driver_and_the_hosts_meet_only_in_the_contract():
    broken = []
    for layer, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            for module in imports(path):
                top = module.split(".")[0]
                if top in ("launcher", "workers", "models"):
                    broken.append(f"{path.relative_to(ROOT)} imports {module}: import it as jaxlaunch.{module}")
                elif top == "jaxlaunch" and owner(module) not in MAY_IMPORT[layer] and owner(module) is not None:
                    broken.append(f"{path.relative_to(ROOT)} ({layer}) imports {module}")
                elif top == "jaxlaunch" and owner(module) is None and layer != "jaxlaunch.models":
                    broken.append(f"{path.relative_to(ROOT)} ({layer}) imports the public {module}")
    assert broken == []


def test_the_contract_needs_neither_ray_nor_jax():
    heavy = {"ray", "jax", "flax", "orbax", "numpy"}
    found = {f"{p.name}: {m}" for p in FOLDERS["jaxlaunch.contract"].rglob("*.py") for m in imports(p)
             if m.split(".")[0] in heavy}
    assert found == set()


def test_importing_the_public_package_loads_neither_side():
    code = ("import sys, jaxlaunch\n"
            "loaded = sorted(m for m in sys.modules if m.startswith(('jaxlaunch.launcher', 'jaxlaunch.workers',"
            " 'ray', 'jax.')) or m == 'jax')\n"
            "print(loaded)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_driver_and_a_keeper_load_no_jax():
    """The driver names the hosts' and the keepers' classes (their modules are imported to make the
    actors) and a keeper maps part files: none of these imports JAX, which costs a cold launch about
    1.2 s on this machine before the hosts are given their `run` call (when the entry's module does
    not import it at its top), and every keeper process as much before it answers."""
    programs = [program.partition(":")[0] for program in (protocol.HOST_PROGRAM, protocol.KEEPER_PROGRAM)]
    code = ("import sys\n"
            f"import jaxlaunch.launcher.cli, jaxlaunch.launcher.runner, {', '.join(programs)}\n"
            "print(sorted(m for m in ('jax', 'flax', 'optax', 'orbax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


def test_the_driver_s_decisions_need_no_ray():
    """With `ray` unimportable: every unit test module imports (so every module they use does), and
    the driver's state machine, its policies, records and views run their tests. The rest of the unit
    tests run once, in the suite itself."""
    code = ("import sys; sys.modules['ray'] = None\n"  # `import ray` now raises ImportError
            "import pytest\n"
            "sys.exit(pytest.main(['tests/unit', '-q', '-x', '-p', 'no:cacheprovider', '-k',"
            " 'driver or policy or history or display or recorder or live_metrics']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " error" not in result.stdout


def test_no_module_of_the_launcher_is_over_500_lines():
    folders = [*FOLDERS.values(), ROOT / "jaxlaunch"]
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
             for folder in folders for p in folder.rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > MAX_MODULE_LINES} == {}


def test_no_import_loops():
    """A module never imports, at its top, under TYPE_CHECKING or inside a function, one that leads
    back to it: each loop found is listed as the modules around it."""
    mods = modules()
    graph = {name: {m for m in (imports(path) | {m.rsplit(".", 1)[0] for m in imports(path)})
                    if m in mods and m != name} for name, path in mods.items()}
    for name in graph:  # a package's __init__ is not an edge: importing a.b.c is importing a.b.c
        graph[name] = {m for m in graph[name] if mods[m].name != "__init__.py" or m == "jaxlaunch"}
    graph.pop("jaxlaunch", None)  # the public face re-exports lazily and is imported by no module of ours
    loops: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                loops.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert loops == []


def test_a_name_means_one_thing():
    """No two classes of the package share a name, and no two modules share a file name (a
    package's `__init__`, `__main__` and the public face aside)."""
    classes: dict[str, list[str]] = collections.defaultdict(list)
    files: dict[str, list[str]] = collections.defaultdict(list)
    for name, path in modules().items():
        if path.name not in ("__init__.py", "__main__.py"):
            files[path.name].append(name)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                classes[node.name].append(name)
    assert {k: v for k, v in classes.items() if len(v) > 1} == {}
    assert {k: v for k, v in files.items() if len(v) > 1} == {}


def test_no_public_name_is_defined_in_two_modules():
    """A class or function at a module's top, public, has one meaning in the package: two modules that
    each define a `load` (or a `Failure`) are listed. The built-in models are the users' side (their
    entry's `main` and `check` are names the contract asks for), so they are not counted."""
    where: dict[str, set[str]] = {}
    for name, path in modules().items():
        if name.startswith("jaxlaunch.models"):
            continue
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef | ast.FunctionDef) and not node.name.startswith("_"):
                where.setdefault(node.name, set()).add(name)
    assert {n: sorted(m) for n, m in where.items() if len(m) > 1} == {}
