"""The project's files an entry imports are part of the code a run trains with: found in the source,
hashed at the launch, checked by every host before it imports the entry, and compared on --resume."""

import dataclasses
import pathlib
import sys

import pytest
from jaxlaunch.launcher.configuration.job import prepare

from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract import entry_code, events
from jaxlaunch.contract.protocol import ConfigError
from tests.unit.test_job import launched, options


def project(root: pathlib.Path, tag: str) -> pathlib.Path:
    """A project whose entry imports a sibling module, a package's modules (one only inside its
    function, one through the sibling), an installed library and the standard library; `tag` keeps
    its module names apart from other tests' in this process."""
    files = {
        "train.py": (f"import json\nimport numpy as np\nimport model_{tag}\nfrom lib_{tag} import data\n\n\n"
                     f"def main(ctx):\n    from lib_{tag}.extra import thing\n    return thing\n"),
        f"model_{tag}.py": f"from lib_{tag} import layers\n",
        f"lib_{tag}/__init__.py": "",
        f"lib_{tag}/data.py": "from . import helpers\n",
        f"lib_{tag}/helpers.py": "",
        f"lib_{tag}/layers.py": "",
        f"lib_{tag}/extra.py": "thing = 'launched'\n",
        f"lib_{tag}/unused.py": "",
        "notes.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "train.py"


def test_the_files_an_entry_imports_are_found_in_its_source_and_only_those(tmp_path):
    path = project(tmp_path / "p", "a")
    found = entry_lib.imports_digest(entry_lib.parse_entry(str(path)))
    assert sorted(found) == ["lib_a/__init__.py", "lib_a/data.py", "lib_a/extra.py", "lib_a/helpers.py",
                             "lib_a/layers.py", "model_a.py"]
    assert found["model_a.py"] == entry_code.file_digest(tmp_path / "p" / "model_a.py")


def test_a_module_entry_of_a_package_finds_its_relative_imports_from_the_package_s_folder(tmp_path, monkeypatch):
    package = tmp_path / "src" / "proj_b"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text("from . import model\nfrom .sub.deep import net\n\n\ndef main(ctx):\n    pass\n")
    (package / "model.py").write_text("from .. import proj_b\n")
    (package / "sub").mkdir()
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "deep.py").write_text("")
    monkeypatch.chdir(tmp_path / "src")
    found = entry_lib.imports_digest(entry_lib.parse_entry("proj_b.train:main"))
    assert sorted(found) == ["proj_b/__init__.py", "proj_b/model.py", "proj_b/sub/__init__.py", "proj_b/sub/deep.py"]


def test_a_host_refuses_an_entry_whose_imported_file_was_edited_before_any_of_it_runs(tmp_path):
    path = project(tmp_path / "p", "c")
    ref = entry_lib.parse_entry(str(path))
    code, imports = entry_lib.code_digest(ref), entry_lib.imports_digest(ref)
    assert entry_lib.load_entry(ref, code, imports)(None) == "launched"
    (tmp_path / "p" / "notes.py").write_text("# not imported: no change of the run\n")
    (tmp_path / "p" / "lib_c" / "unused.py").write_text("# nor this\n")
    assert entry_lib.load_entry(ref, code, imports)(None) == "launched"
    marker = tmp_path / "ran"
    path.write_text(f"open({str(marker)!r}, 'w').close()\n" + path.read_text())
    code = entry_lib.code_digest(ref)  # the entry's own file as launched; the file it imports edited below
    (tmp_path / "p" / "lib_c" / "layers.py").write_text("width = 2\n")
    with pytest.raises(entry_lib.EntryChangedError,
                       match=r"the file it imports .*lib_c/layers.py changed since the run was launched"):
        entry_lib.load_entry(ref, code, imports)
    assert not marker.exists(), "refused before any of the entry ran"
    (tmp_path / "p" / "lib_c" / "helpers.py").unlink()
    with pytest.raises(entry_lib.EntryChangedError, match=r"the files it imports .*helpers.py, .*layers.py changed"):
        entry_lib.load_entry(ref, code, imports)


def test_a_resume_after_an_imported_file_was_edited_is_refused_unless_allowed_and_names_the_file(tmp_path):
    path = project(tmp_path / "p", "d")
    run = launched(tmp_path / "run", prepare(options(tmp_path, entry=str(path))))
    assert not prepare(options(tmp_path, resume=True)).changes, "unchanged: nothing to record"
    (tmp_path / "p" / "lib_d" / "layers.py").write_text("width = 2\n")
    with pytest.raises(ConfigError, match=r"would change the run: entry '.*train.py:main' -> '.*train.py:main \(the "
                                          r"file it imports .*/lib_d/layers.py changed\)'; pass --allow-change entry"):
        prepare(options(tmp_path, resume=True))
    accepted = prepare(options(tmp_path, resume=True, allow_change=["entry"]))
    assert list(accepted.changes) == ["entry"] and accepted.entry_imports["lib_d/layers.py"] == \
        entry_code.file_digest(tmp_path / "p" / "lib_d" / "layers.py")
    # A run launched before the imports were kept: its launch recorded none, so none is a change.
    run.event(events.Launch(entry=str(accepted.entry.ref), entry_code=accepted.entry_code))
    (tmp_path / "p" / "lib_d" / "layers.py").write_text("width = 3\n")
    assert not prepare(options(tmp_path, resume=True)).changes


def test_an_installed_module_or_one_of_a_mapped_package_looks_no_further_than_its_own_folder(tmp_path):
    """An installed module (its imports are installed too: not walked, whatever their number), and the
    built-in model, whose package maps `jaxlaunch.models` onto a folder of another name in a checkout."""
    installed = entry_lib.parse_entry("optax.contrib._sam:sam")
    assert entry_lib.imports_digest(installed) == {}
    builtin = entry_lib.parse_entry(entry_lib.BUILTIN_ENTRY)
    origin = pathlib.Path(entry_lib._module_file(builtin)).resolve()
    named_as_modules = origin.parts[-3:] == ("jaxlaunch", "models", "lm.py")  # installed: site-packages above
    assert entry_code.import_root(origin, builtin.module) == (origin.parents[2] if named_as_modules else origin.parent)


def test_a_linked_entry_file_is_checked_with_the_siblings_it_is_imported_with(tmp_path):
    """jaxlaunch imports a file entry given as a link with the link's folder on the path (where
    plain `python link/train.py` would take its target's: noted, not changed): the files hashed and
    checked are the ones the hosts import."""
    real = project(tmp_path / "real", "e")
    (tmp_path / "link").mkdir()
    (tmp_path / "link" / "train.py").symlink_to(real)
    (tmp_path / "link" / "model_e.py").write_text("# beside the link: what jaxlaunch imports\n")
    ref = entry_lib.parse_entry(str(tmp_path / "link" / "train.py"))
    code, imports = entry_lib.code_digest(ref), entry_lib.imports_digest(ref)
    assert imports == {"model_e.py": entry_code.file_digest(tmp_path / "link" / "model_e.py")}
    (tmp_path / "link" / "model_e.py").write_text("# edited\n")
    with pytest.raises(entry_lib.EntryChangedError, match=r"the file it imports .*link/model_e.py changed"):
        entry_lib.load_entry(ref, code, imports)


def test_a_relative_import_above_the_filesystem_s_top_or_a_broken_file_is_no_crash(tmp_path):
    path = tmp_path / "train.py"
    path.write_text("def main(ctx):\n    from " + "." * 40 + " import x\n")
    (tmp_path / "broken.py").write_text("def (\n")
    (tmp_path / "other.py").write_text("import broken\n")
    path.write_text(path.read_text() + "import other\n")
    assert sorted(entry_lib.imports_digest(entry_lib.parse_entry(str(path)))) == ["broken.py", "other.py"]


def test_a_module_entry_s_edited_package_is_refused_before_its_init_runs(tmp_path, monkeypatch):
    package = tmp_path / "proj_f"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text("def main(ctx):\n    return 'launched'\n")
    monkeypatch.chdir(tmp_path)
    ref = entry_lib.parse_entry("proj_f.train:main")
    code, imports = entry_lib.code_digest(ref), entry_lib.imports_digest(ref)
    sys.modules.pop("proj_f", None)  # a restart's host is a fresh process
    marker = tmp_path / "ran"
    (package / "train.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef main(ctx):\n    return 'edited'\n")
    (package / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    with pytest.raises(entry_lib.EntryChangedError, match=r"its file .*proj_f/train.py changed"):
        entry_lib.load_entry(ref, code, imports)
    assert not marker.exists(), "neither the package's __init__ nor the module ran"


def test_an_installed_path_is_told_through_a_link_to_it(tmp_path):
    import sysconfig

    link = tmp_path / "venv-link"
    link.symlink_to(sysconfig.get_paths()["purelib"], target_is_directory=True)
    assert entry_code.installed(link / "optax" / "__init__.py")
    assert not entry_code.installed(tmp_path / "train.py")


def test_a_function_sent_by_value_from_a_script_is_checked_against_the_files_the_script_imports(tmp_path):
    """`jaxlaunch.launch(main)` from a script: `main` travels pickled, and what it imports by name
    (`model_g`, the package) is imported on the hosts from the script's folder."""
    script = project(tmp_path / "p", "g")
    ref = dataclasses.replace(entry_lib.from_callable(lambda ctx: "launched").ref, path=str(script))
    imports = entry_lib.imports_digest(ref)
    assert "model_g.py" in imports and "lib_g/layers.py" in imports
    assert entry_lib.load_entry(ref, None, imports)(None) == "launched"
    (tmp_path / "p" / "model_g.py").write_text("SCALE = 2.0\n")
    with pytest.raises(entry_lib.EntryChangedError, match=r"the file it imports .*p/model_g.py changed"):
        entry_lib.load_entry(ref, None, imports)
    notebook = entry_lib.from_callable(lambda ctx: "launched").ref
    assert notebook.path is None and entry_lib.imports_digest(notebook) == {}


def test_a_package_the_hosts_import_through_pythonpath_is_the_project_s_too(tmp_path, monkeypatch):
    """scripts/train.py beside the project's own package, importable through PYTHONPATH (as the hosts
    inherit it): the package's files are recorded by their full path; a link to an installed library
    in the project is not walked."""
    import sysconfig

    (tmp_path / "scripts").mkdir()
    entry = tmp_path / "scripts" / "train.py"
    entry.write_text("import mypkg_h.model\nimport vendored_h\n\n\ndef main(ctx):\n    pass\n")
    (tmp_path / "mypkg_h").mkdir()
    (tmp_path / "mypkg_h" / "__init__.py").write_text("")
    (tmp_path / "mypkg_h" / "model.py").write_text("")
    (tmp_path / "vendored_h").symlink_to(pathlib.Path(sysconfig.get_paths()["purelib"]) / "optax")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    ref = entry_lib.parse_entry(str(entry))
    imports = entry_lib.imports_digest(ref)
    assert sorted(imports) == [str(tmp_path / "mypkg_h" / "__init__.py"), str(tmp_path / "mypkg_h" / "model.py")]
    (tmp_path / "mypkg_h" / "model.py").write_text("# edited\n")
    with pytest.raises(entry_lib.EntryChangedError, match=r"mypkg_h/model.py changed"):
        entry_lib.load_entry(ref, entry_lib.code_digest(ref), imports)


def test_a_project_past_the_limits_is_hashed_in_part_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(entry_code, "MAX_FILES", 3)
    path = project(tmp_path / "p", "i")
    assert len(entry_lib.imports_digest(entry_lib.parse_entry(str(path)))) == 3
    assert "only the first 3 files of the project were hashed" in caplog.text


def test_files_are_looked_for_in_the_hosts_order_and_an_imported_package_where_it_was_imported_from(
        tmp_path, monkeypatch):
    """The hosts on this machine have the working directory first on their path (`runtime_env`), then
    the entry's folder: a `model_j.py` in both is the working directory's. A package already imported
    has its modules found under its own folder, whatever the path says now."""
    entry = project(tmp_path / "p", "j")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "model_j.py").write_text("")
    monkeypatch.chdir(tmp_path / "cwd")
    imports = entry_lib.imports_digest(entry_lib.parse_entry(str(entry)))
    assert str(tmp_path / "cwd" / "model_j.py") in imports and "model_j.py" not in imports

    for where in ("a", "b"):
        (tmp_path / where / "pkg_k").mkdir(parents=True)
        (tmp_path / where / "pkg_k" / "__init__.py").write_text("")
        (tmp_path / where / "pkg_k" / "m.py").write_text(f"# {where}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "a"))
    import pkg_k  # noqa: F401
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    assert entry_code.module_origin("pkg_k.m") == str(tmp_path / "a" / "pkg_k" / "m.py")
    monkeypatch.delitem(sys.modules, "pkg_k")


def test_a_resume_compares_the_files_recorded_then_not_the_files_found_now(tmp_path):
    """A file the rules find now but did not then (another version's rules, a new PYTHONPATH) is no
    edit; a file recorded then that is gone is one."""
    path = project(tmp_path / "p", "l")
    prepared = prepare(options(tmp_path, entry=str(path)))
    run = launched(tmp_path / "run", prepared)
    fewer = {k: v for k, v in prepared.entry_imports.items() if k != "lib_l/helpers.py"}
    run.event(events.Launch(entry=str(prepared.entry.ref), entry_code=prepared.entry_code, entry_imports=fewer))
    assert not prepare(options(tmp_path, resume=True)).changes
    (tmp_path / "p" / "lib_l" / "extra.py").unlink()
    with pytest.raises(ConfigError, match=r"lib_l/extra.py changed"):
        prepare(options(tmp_path, resume=True))
