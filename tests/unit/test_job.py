"""From what the user asks for to a validated job: the entry found and checked, its settings typed,
a resume refused when it would change the run; all before anything is written."""

import json
import os
import pathlib

import pytest
from jaxlaunch.launcher.configuration.job import prepare
from jaxlaunch.launcher.configuration.schema import JobConfig
from jaxlaunch.launcher.records.runs import RunDir

from jaxlaunch.contract import entry as entry_lib
from jaxlaunch.contract import events
from jaxlaunch.contract.layout import CHECKPOINT_COMMIT_MARKER
from jaxlaunch.contract.protocol import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def options(tmp_path, **kw):
    return {"run_dir": str(tmp_path / "run"), **kw}


def test_the_built_in_model_is_the_default_entry_with_its_settings_filled_in(tmp_path):
    job = prepare(options(tmp_path, hosts=2)).job
    assert job.entry == "jaxlaunch.models.lm:main" and job.config["model"] == "tiny" and job.config["seq_len"] == 128
    assert job.train.schedule_steps == job.train.steps, "the schedule's length is fixed at the first launch"
    assert not (tmp_path / "run").exists(), "nothing is written"


@pytest.mark.parametrize(("changes", "message"), [
    (dict(model="huge"), "unknown model preset 'huge': choose one of tiny, small, base"),
    (dict(global_batch_size=30), "not divisible by the data-parallel size 4"),
    (dict(seq_len=999), "exceeds model tiny's max_seq_len 128"),
    (dict(data="/nonexistent"), "no such file or folder"),
    (dict(config={"learnig_rate": 0.1}), "has no setting 'learnig_rate' (set by --set, --config or a keyword); "
     "its settings are"),
    (dict(config={"seq_len": "long"}), "expected int like its default 128"),
    (dict(config={"learning_rate": float("nan")}), "learning_rate must be a finite number"),
    (dict(chaos=float("nan")), "--chaos must be a finite number"),
    (dict(inject=["kill@step=3,host=9"]), "host 9 does not exist"),
    (dict(inject=["kill_in_handoff@step=3,host=0"], memory_tier=False),
     "a hand-off exists only with the memory tier; drop --no-memory-tier"),
    (dict(inject=["kill_in_handoff@step=3,host=0"]), "may make no memory save; give --save-every a number"),
    (dict(inject=["kill_in_handoff@step=3,host=0"], memory_tier=True, save_every=2),
     "step 3 makes no memory save; use a multiple of --save-every (2)"),
    (dict(entry="examples/minimal.py:main", model="small"), "unknown option 'model'; "),
    (dict(placement_timeout=1e308), "cluster.placement_timeout_s must be at most 1,000,000,000 seconds"),
    (dict(steps=10, inject=["kill@step=11,host=0"]), "step 11 is after the run's last step (--steps 10)"),
    (dict(mesh="data=2,data=8"), "--mesh 'data=2,data=8' names an axis twice"),
    (dict(name="x", run_dir="/tmp/x"), "--name and --run-dir both name the run's folder: pass one of them"),
    (dict(allow_change=["seed"]), "--allow-change accepts a change on --resume, and this launch starts a run"),
    (dict(memory_tier=True, save_every=10, persist_every=5), "must be a multiple of --save-every 10 .*: "
     "pass --persist-every 10$"),
    (dict(config_file=""), "--config is empty: name a YAML file"),
    (dict(seed=2**63), "train.seed must be at most 9,223,372,036,854,775,807, got 9,223,372,036,854,775,808"),
    (dict(inject=["slow@step=3,host=0,factor=nan"]), "factor=F (a finite number above 1) goes with slow"),
    (dict(inject=["slow@step=3,host=0,factor=inf"]), "factor=F (a finite number above 1) goes with slow"),
])
def test_bad_settings_are_refused_with_the_fix(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(options(tmp_path, **changes))


def test_a_user_entry_without_declared_settings_takes_any(tmp_path):
    job = prepare(options(tmp_path, entry=str(ROOT / "examples" / "minimal.py"), config={"anything": 3})).job
    assert job.config == {"anything": 3}
    assert job.entry == f"{ROOT / 'examples' / 'minimal.py'}:main", "saved resolved: the same file from any folder"


def test_entries_that_cannot_run_are_refused_before_anything_starts(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def main(ctx):\n    return (\n")
    two_args = tmp_path / "two.py"
    two_args.write_text("def main(ctx, other):\n    pass\n")
    raises = tmp_path / "raises.py"
    raises.write_text("import does_not_exist_anywhere\n")
    cases = [
        ("nowhere/missing.py:main", "no such file"),
        (f"{broken}:main", "importing it raised SyntaxError"),
        (f"{two_args}:main", "must take exactly one argument, the host context"),
        (f"{two_args}:train", "has no function 'train'; it has main"),
        (f"{raises}:main", "cannot import 'does_not_exist_anywhere'"),
        ("no_such_package.module:main", "cannot import 'no_such_package'"),
        ("jaxlaunch.models.lm:not_there", "has no function 'not_there'"),
        ("bad entry!", "expected path/to/file.py:function"),
    ]
    for text, message in cases:
        with pytest.raises(ConfigError, match=message):
            prepare(options(tmp_path, entry=text))


def test_a_function_object_of_an_importable_module_travels_by_name():
    from examples import minimal

    entry = entry_lib.from_callable(minimal.main)
    assert str(entry.ref) == "examples.minimal:main" and entry.ref.payload is None


def test_a_file_entry_ships_its_folder_under_a_name_of_its_own(tmp_path):
    ref = entry_lib.parse_entry(str(ROOT / "examples" / "minimal.py"))
    shipped_ref, folders = entry_lib.shipped(ref, tmp_path)
    assert shipped_ref.package.startswith("jaxlaunch_entry_") and shipped_ref.function == "main"
    assert pathlib.Path(folders[0]).resolve() == ROOT / "examples"
    assert entry_lib.shipped(entry_lib.parse_entry("json:dumps"), tmp_path) == (entry_lib.parse_entry("json:dumps"), [])


def test_folders_alike_in_content_ship_under_one_name(tmp_path):
    """Ray keeps a shipped folder under a hash of its contents, not of its name, unpacked under the
    name it was first shipped with: two clones of one project, and two entries of one folder
    (examples/minimal.py, examples/classifier.py), are one package on a cluster. Every launch must name
    it alike, or a later one's hosts cannot import their entry (found by running the suite's launches
    on one shared Ray instance)."""
    staged = []
    for clone, entry in (("clone-a", "train.py"), ("clone-b", "train.py"), ("clone-b", "evaluate.py")):
        (tmp_path / clone).mkdir(exist_ok=True)
        for name in ("train.py", "evaluate.py"):
            (tmp_path / clone / name).write_text(f"def main(ctx):\n    return {name!r}\n")
        staging = tmp_path / f"staging-{clone}-{entry}"
        staging.mkdir()
        ref, [folder] = entry_lib.shipped(entry_lib.parse_entry(f"{tmp_path / clone / entry}:main"), staging)
        staged.append((ref.package, pathlib.Path(folder).name))
    assert len(set(staged)) == 1, staged


# ---- resume ----------------------------------------------------------------------------------------

def fake_run(path: pathlib.Path, job: JobConfig, fingerprint="abc") -> RunDir:
    run = RunDir(path)
    run.create()
    run.save_config(job.to_dict())
    run.event(events.Launch(fingerprint=fingerprint))
    return run


def started(tmp_path, **kw) -> JobConfig:
    return prepare(options(tmp_path, **kw)).job


def test_resume_auto_starts_an_empty_directory_and_continues_a_run(tmp_path):
    assert prepare(options(tmp_path, resume="auto")).job.resume is False
    job = started(tmp_path)
    fake_run(tmp_path / "run", job, prepare(options(tmp_path)).fingerprint)
    assert prepare(options(tmp_path, resume="auto")).job.resume is True
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds files but no run"):
        prepare(dict(run_dir=str(tmp_path / "other"), resume="auto"))


def test_resume_keeps_the_schedule_and_refuses_silent_changes(tmp_path):
    job = started(tmp_path, steps=20)
    fake_run(tmp_path / "run", job, prepare(options(tmp_path)).fingerprint)
    longer = prepare(options(tmp_path, resume=True, steps=30)).job
    assert (longer.train.steps, longer.train.schedule_steps) == (30, 20), "more steps, same schedule"
    with pytest.raises(ConfigError, match=r"would change the run: seq_len 128 -> 64; pass --allow-change seq_len"):
        prepare(options(tmp_path, resume=True, seq_len=64))
    assert prepare(options(tmp_path, resume=True, seq_len=64,
                           allow_change=["seq_len"])).job.config["seq_len"] == 64
    with pytest.raises(ConfigError, match="global_batch_size 32 -> 16"):
        prepare(options(tmp_path, resume=True, global_batch_size=16))
    with pytest.raises(ConfigError, match="seed 0 -> 5"):
        prepare(options(tmp_path, resume=True, seed=5))
    with pytest.raises(ConfigError, match="schedule_steps 20 -> 50"):
        prepare(options(tmp_path, resume=True, schedule_steps=50))


def test_a_resume_keeps_the_kernels_the_run_began_with(tmp_path):
    """XLA's YNNPACK fusions change a loss's last bits: a run saved before `cluster.ynnpack` existed
    ran with them and resumes with them; switching them on a resume is refused, as any change to
    what the run computes."""
    job = started(tmp_path)
    assert job.cluster.ynnpack is False
    older = job.to_dict()
    del older["cluster"]["ynnpack"]
    run = fake_run(tmp_path / "run", job, prepare(options(tmp_path)).fingerprint)
    run.save_config(older)
    assert prepare(options(tmp_path, resume=True)).job.cluster.ynnpack is True
    run.save_config(job.to_dict())
    assert prepare(options(tmp_path, resume=True)).job.cluster.ynnpack is False
    config = tmp_path / "on.yaml"
    config.write_text(json.dumps({"cluster": {"ynnpack": True}}))
    with pytest.raises(ConfigError, match=r"would change the run: cluster.ynnpack False -> True; "
                                          r"pass --allow-change cluster.ynnpack"):
        prepare(options(tmp_path, resume=True, config_file=str(config)))
    assert prepare(options(tmp_path, resume=True, config_file=str(config),
                           allow_change=["cluster.ynnpack"])).job.cluster.ynnpack is True


def test_resume_on_other_data_is_refused(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("some text to learn from " * 50)
    job = started(tmp_path, data=str(data))
    fake_run(tmp_path / "run", job, prepare(options(tmp_path, data=str(data))).fingerprint)
    prepare(options(tmp_path, resume=True))
    data.write_text("other text entirely " * 50)
    with pytest.raises(ConfigError, match="the entry's input changed; pass --allow-change fingerprint"):
        prepare(options(tmp_path, resume=True))
    assert prepare(options(tmp_path, resume=True, allow_change=["fingerprint"])).job.resume


def test_a_config_file_on_resume_keeps_the_run_s_saved_settings(tmp_path):
    job = started(tmp_path, save_every=7)
    job = JobConfig(**{**job.__dict__, "checkpoint": type(job.checkpoint)(save_every=7, max_to_keep=9)})
    fake_run(tmp_path / "run", job, prepare(options(tmp_path)).fingerprint)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("cluster: {placement_timeout_s: 5}\n")
    resumed = prepare(options(tmp_path, resume=True, config_file=str(cluster))).job
    assert (resumed.checkpoint.max_to_keep, resumed.checkpoint.save_every) == (9, 7)
    assert resumed.cluster.placement_timeout_s == 5


def test_directories_that_cannot_hold_a_run(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        prepare(dict(run_dir=str(afile)))
    with pytest.raises(ConfigError, match="does not exist"):
        prepare(dict(run_dir=str(tmp_path / "missing"), resume=True))
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "x").write_text("x")
    with pytest.raises(ConfigError, match="holds no run"):
        prepare(dict(run_dir=str(tmp_path / "notarun"), resume=True))
    with pytest.raises(ConfigError, match="is not empty: pass --resume"):
        prepare(dict(run_dir=str(tmp_path / "notarun")))
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError, match="is a symbolic link to nothing"):
        prepare(dict(run_dir=str(tmp_path / "dangling")))
    (tmp_path / "dangling").unlink()
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="is not writable"):
            prepare(dict(run_dir=str(locked / "run")))
    assert json.loads(json.dumps(sorted(p.name for p in tmp_path.iterdir()))) == ["file", "notarun"] + (
        ["locked"] if os.geteuid() != 0 else [])


# ---- where a run goes without --run-dir --------------------------------------------------------------

def test_a_launch_without_a_run_dir_gets_one_of_its_own_named_by_entry_and_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("time.strftime", lambda fmt: "20261129-181500")
    first = prepare({})
    assert (first.job.run_dir, first.announce) == ("runs/lm-20261129-181500", "run directory: runs/lm-20261129-181500")
    fake_run(tmp_path / first.job.run_dir, first.job)
    assert prepare({}).job.run_dir == "runs/lm-20261129-181500-2", "two launches in one second"
    minimal = prepare({"entry": f"{ROOT / 'examples' / 'minimal.py'}:main"}).job.run_dir
    assert minimal == "runs/minimal-20261129-181500"
    assert prepare({"name": "exp1"}).job.run_dir == "runs/exp1"


def test_resume_without_a_run_dir_continues_the_newest_run_of_the_entry(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = started(tmp_path, steps=20)
    fingerprint = prepare(options(tmp_path)).fingerprint
    for name in ("lm-20261128-090000", "lm-20261129-100000", "minimal-20261129-110000"):
        fake_run(tmp_path / "runs" / name, job, fingerprint)
    (tmp_path / "runs" / "lm-20261129-120000").mkdir()  # not a run (no config.json)
    resumed = prepare({"resume": True, "steps": 30})
    assert resumed.job.run_dir == "runs/lm-20261129-100000" and resumed.job.resume
    assert resumed.announce == "resuming runs/lm-20261129-100000 (the newest of 2 runs of lm; --run-dir to choose)"
    with pytest.raises(ConfigError, match=r"--resume: no run of classifier under runs/ \(runs there: "
                                          r"lm-20261128-090000, lm-20261129-100000, lm-20261129-120000, "
                                          r"minimal-20261129-110000\); pass the --run-dir of the run"):
        prepare({"resume": True, "entry": f"{ROOT / 'examples' / 'classifier.py'}:main"})
    assert prepare({"resume": "auto", "entry": f"{ROOT / 'examples' / 'classifier.py'}:main"}).job.resume is False


def test_a_nested_setting_given_in_part_keeps_its_other_keys_and_each_key_is_checked(tmp_path):
    entry = tmp_path / "nested.py"
    entry.write_text("import jaxlaunch\n\n"
                     "@jaxlaunch.entrypoint(defaults={'opt': {'lr': 0.1, 'beta': 0.9}, 'name': 'a'})\n"
                     "def main(ctx):\n    pass\n")
    given = options(tmp_path, entry=f"{entry}:main")
    settings = prepare({**given, "config": {"opt": {"lr": 0.5}}}).job.config
    assert settings == {"opt": {"lr": 0.5, "beta": 0.9}, "name": "a"}
    with pytest.raises(ConfigError, match="opt.nosuch: setting 'opt' has no key 'nosuch' .*; its keys are beta, lr"):
        prepare({**given, "config": {"opt": {"nosuch": 1}}})
    with pytest.raises(ConfigError, match="--set opt.lr='abc': expected float like its default 0.1"):
        prepare({**given, "config": {"opt": {"lr": "abc"}}})


def test_an_entry_whose_check_raises_anything_is_refused_in_one_line(tmp_path):
    entry = tmp_path / "checks.py"
    entry.write_text("import jaxlaunch\n\n"
                     "@jaxlaunch.entrypoint(defaults={'n': 0}, check=lambda settings, mesh: 1 / settings['n'])\n"
                     "def main(ctx):\n    pass\n")
    with pytest.raises(ConfigError, match="its check of the settings raised ZeroDivisionError: division by zero"):
        prepare(options(tmp_path, entry=f"{entry}:main"))
    (tmp_path / "other.txt").write_text("def main(ctx):\n    pass\n")
    with pytest.raises(ConfigError, match=r"other.txt is not a Python file \(.py\): name the .py file"):
        prepare(options(tmp_path, entry=f"{tmp_path / 'other.txt'}:main"))


@pytest.mark.parametrize(("content", "message"), [
    (b"launcher: 5\n", "launcher: must be a mapping of settings, got 5"),
    (b"launcher:\n", "launcher: must be a mapping of settings, got None"),
    (b"steps: \xff\xfe\n", "not a text file (not UTF-8)"),
    (b"resume: true\n", "resume is not a setting of a file; pass --resume"),
    (b"run_dir: 5\n", "run_dir must be a path, got 5"),
    (b"distributed: {heartbeat_timeout_s: 99999999999999999999}\n",
     "distributed.heartbeat_timeout_s must be at most 1,000,000,000 seconds (31 years), "
     "got 99,999,999,999,999,999,999"),
    (b"steps: 100\nsave_every: 5\nsteps: 10\n", "not valid YAML (the key 'steps' is given twice (line 3): keep one)"),
    (b"config:\n  lr: 0.1\n  lr: 0.5\n", "not valid YAML (the key 'lr' is given twice (line 3): keep one)"),
])
def test_a_config_file_that_cannot_be_read_as_settings_is_refused_in_one_line(tmp_path, content, message):
    config = tmp_path / "job.yaml"
    config.write_bytes(content)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        prepare(options(tmp_path, config_file=str(config)))
    assert not (tmp_path / "run").exists()


def test_a_config_file_s_run_dir_is_the_run_s_unless_a_flag_names_another(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text(f"run_dir: {tmp_path / 'from-file'}\n")
    assert prepare({"config_file": str(config)}).job.run_dir == str(tmp_path / "from-file")
    assert prepare(options(tmp_path, config_file=str(config))).job.run_dir == str(tmp_path / "run")
    with pytest.raises(ConfigError, match="over 16 MiB, not a settings file"):
        prepare(options(tmp_path, config_file="/dev/zero"))


def test_a_resume_of_a_run_whose_config_is_not_a_file_of_settings_is_refused_in_one_line(tmp_path):
    run = tmp_path / "run"
    (run / "config.json").mkdir(parents=True)
    with pytest.raises(ConfigError, match="config.json is a folder; restore it from a backup"):
        prepare(options(tmp_path, resume=True))
    (run / "config.json").rmdir()
    (run / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="config.json holds list, not a run's settings; restore it from a backup"):
        prepare(options(tmp_path, resume=True))
    assert sorted(p.name for p in run.iterdir()) == ["config.json"], "nothing written"


@pytest.mark.parametrize(("given", "message"), [
    (dict(run_dir=""), "--run-dir is empty: name a folder for the run"),
    (dict(name=""), "--name '': a run's name is one folder under runs/"),
    (dict(name="../../escape"), "--name '../../escape': a run's name is one folder under runs/"),
    (dict(name=".."), "--name '..': a run's name is one folder under runs/"),
])
def test_a_run_name_or_folder_that_names_no_folder_of_its_own_is_refused(tmp_path, monkeypatch, given, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        prepare(given)
    assert list(tmp_path.iterdir()) == []


def entry_changed_after_a_run(tmp_path, monkeypatch, before, after) -> str:
    """A run of an entry declaring `before`, whose file now declares `after`: its --entry text."""
    import sys

    entry = tmp_path / "train.py"
    entry.write_text(f"import jaxlaunch\n\n@jaxlaunch.entrypoint(defaults={before!r})\ndef main(ctx):\n    pass\n")
    first = prepare(options(tmp_path, entry=f"{entry}:main"))
    fake_run(tmp_path / "run", first.job, first.fingerprint)
    entry.write_text(f"import jaxlaunch\n\n@jaxlaunch.entrypoint(defaults={after!r})\ndef main(ctx):\n    pass\n")
    for name in [n for n in sys.modules if n.startswith("_jaxlaunch_entry_train_")]:
        monkeypatch.delitem(sys.modules, name)  # the entry's file as a new process imports it
    return f"{entry}:main"


def test_a_resume_after_the_entry_dropped_a_setting_names_it_and_goes_on_once_allowed(tmp_path, monkeypatch):
    entry = entry_changed_after_a_run(tmp_path, monkeypatch, {"lr": 0.1, "old": 5}, {"lr": 0.1})
    with pytest.raises(ConfigError, match="--resume would change the run: old 5 -> None; pass --allow-change old"):
        prepare(options(tmp_path, entry=entry, resume=True))
    resumed = prepare(options(tmp_path, entry=entry, resume=True, allow_change=["old"]))
    assert resumed.job.config == {"lr": 0.1}
    typo = tmp_path / "typo.yaml"
    typo.write_text("config: {lrr: 0.2}\n")
    with pytest.raises(ConfigError, match="has no setting 'lrr'"):
        prepare(options(tmp_path, entry=entry, resume=True, allow_change=["old"], config_file=str(typo)))


def test_a_resume_after_the_entry_dropped_a_nested_key_names_it_too(tmp_path, monkeypatch):
    entry = entry_changed_after_a_run(tmp_path, monkeypatch, {"opt": {"lr": 0.1, "beta": 0.9}}, {"opt": {"lr": 0.1}})
    with pytest.raises(ConfigError, match="would change the run: opt.beta 0.9 -> None; pass --allow-change opt.beta"):
        prepare(options(tmp_path, entry=entry, resume=True))
    resumed = prepare(options(tmp_path, entry=entry, resume=True, allow_change=["opt.beta"]))
    assert resumed.job.config == {"opt": {"lr": 0.1}}


def test_a_file_entry_edited_between_two_launches_in_one_process_is_imported_again(tmp_path):
    """A notebook launches train.py, then the user adds a setting to it and launches again: the
    driver kept the first import (its declared settings and check) while the hosts
    imported the new file, and `b` was refused as no setting of the entry."""
    entry = tmp_path / "train.py"
    source = "import jaxlaunch\n\n\n@jaxlaunch.entrypoint(defaults={DEFAULTS})\ndef main(ctx):\n    pass\n"
    entry.write_text(source.replace("DEFAULTS", "'a': 1"))
    first = prepare({"entry": f"{entry}:main", "run_dir": str(tmp_path / "run1")})
    assert first.job.config == {"a": 1}
    entry.write_text(source.replace("DEFAULTS", "'a': 1, 'b': 2"))
    os.utime(entry, ns=(entry.stat().st_atime_ns, entry.stat().st_mtime_ns + 1_000_000))  # a later edit
    second = prepare({"entry": f"{entry}:main", "run_dir": str(tmp_path / "run2"), "config": {"b": 3}})
    assert second.job.config == {"a": 1, "b": 3}


def launched(path: pathlib.Path, prepared) -> RunDir:
    """A run directory as a launch of `prepared` leaves it (`runner`: config.json and the launch event)."""
    run = RunDir(path)
    run.create()
    run.save_config(prepared.job.to_dict())
    run.event(events.Launch(entry=str(prepared.entry.ref), entry_code=prepared.entry_code,
                            entry_imports=dict(prepared.entry_imports), fingerprint=prepared.fingerprint))
    return run


def entry_file(folder: pathlib.Path, body: str = "    return None\n") -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.py"
    path.write_text(f"def main(ctx):\n{body}")
    return path


def test_a_resume_from_another_folder_runs_the_file_the_run_started_with(tmp_path, monkeypatch):
    first = entry_file(tmp_path / "project")
    entry_file(tmp_path / "elsewhere", "    raise SystemExit('the wrong file')\n")
    monkeypatch.chdir(tmp_path / "project")
    run = launched(tmp_path / "run", prepare(options(tmp_path, entry="train.py")))
    # A run written before entries were saved resolved kept the text as given, relative.
    run.save_config({**run.load_config(), "entry": "train.py"})
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert prepare(options(tmp_path, resume=True)).job.entry == f"{first}:main"
    for same in (str(first), f"{first}:main", "../project/train.py:main"):
        assert prepare(options(tmp_path, resume=True, entry=same)).job.entry == f"{first}:main", same
    with pytest.raises(ConfigError, match=r"would change the run: entry '.*project/train.py:main' -> "
                                          r"'.*elsewhere/train.py:main'; pass --allow-change entry"):
        prepare(options(tmp_path, resume=True, entry="train.py"))


def test_an_edited_entry_file_is_refused_on_resume_and_an_accepted_edit_is_returned_to_be_recorded(tmp_path):
    path = entry_file(tmp_path / "project")
    launched(tmp_path / "run", prepare(options(tmp_path, entry=str(path))))
    assert not prepare(options(tmp_path, resume=True)).changes, "unchanged: nothing to record"
    path.write_text("def main(ctx):\n    return 1  # edited\n")
    with pytest.raises(ConfigError, match=r"would change the run: entry '.*train.py:main \(file [0-9a-f]{12}\)' "
                                          r"-> '.*train.py:main \(file [0-9a-f]{12}, edited\)'; pass "
                                          r"--allow-change entry"):
        prepare(options(tmp_path, resume=True))
    accepted = prepare(options(tmp_path, resume=True, allow_change=["entry"]))
    assert list(accepted.changes) == ["entry"] and accepted.changes["entry"][1].endswith(", edited)")


def test_a_host_refuses_an_entry_file_edited_since_the_launch_and_the_driver_names_the_fix(tmp_path):
    """A restart's hosts import the entry file again: one edited since the launch (its hash is not the
    launch's) is refused before any of its code runs, and the driver's line names the two ways on."""
    from jaxlaunch.launcher.control import policy

    from jaxlaunch.contract.event_base import FailureKind

    path = entry_file(tmp_path / "project", "    return 'launched'\n")
    ref = entry_lib.parse_entry(str(path))
    launched_code = entry_lib.code_digest(ref)
    assert entry_lib.load_entry(ref, launched_code)(None) == "launched"
    path.write_text("def main(ctx):\n    return 'edited'\n")
    with pytest.raises(entry_lib.EntryChangedError, match=rf"{path} changed since the run was launched"):
        entry_lib.load_entry(ref, launched_code)
    marker = tmp_path / "ran"
    path.write_text(f"open({str(marker)!r}, 'w').close()\ndef main(ctx):\n    return 'edited'\n")
    with pytest.raises(entry_lib.EntryChangedError):
        entry_lib.load_entry(ref, launched_code)
    assert not marker.exists(), "refused before any of the edited file ran"
    path.write_text("def main(ctx):\n    return (\n")  # saved half-edited: refused as edited, not as broken
    with pytest.raises(entry_lib.EntryChangedError):
        entry_lib.load_entry(ref, launched_code)
    failure = policy.Diagnosis(FailureKind.EXCEPTION, 0, "EntryChangedError: the file changed")
    assert "--resume --allow-change entry" in policy.likely_fix(failure)


def test_a_change_accepted_on_resume_is_returned_to_be_recorded_before_and_after(tmp_path):
    launched(tmp_path / "run", prepare(options(tmp_path, seed=0)))
    accepted = prepare(options(tmp_path, resume=True, seed=1, allow_change=["seed"]))
    assert dict(accepted.changes) == {"seed": (0, 1)}
    back = events.parse_event(json.loads(json.dumps(events.Launch(changes={"seed": [0, 1]}).to_dict())))
    assert back.changes == {"seed": [0, 1]}, "the launch event carries it"


def test_a_resume_to_fewer_steps_than_the_run_committed_is_refused_and_rewrites_nothing(tmp_path):
    run = launched(tmp_path / "run", prepare(options(tmp_path, steps=100)))
    step = tmp_path / "run" / "checkpoints" / "60"
    step.mkdir(parents=True)
    (step / CHECKPOINT_COMMIT_MARKER).write_text("{}")
    before = run.config_path.read_bytes()
    with pytest.raises(ConfigError, match=r"^--resume --steps 30: the run has already committed step 60; pass "
                                          r"--steps 60 or more, or leave --steps out$"):
        prepare(options(tmp_path, resume=True, steps=30))
    assert run.config_path.read_bytes() == before
    assert prepare(options(tmp_path, resume=True, steps=60)).job.train.steps == 60


def test_entries_as_older_versions_recorded_them_resume_unchanged(tmp_path):
    """The built-in model's old name, a path with "..", and a checkout moved elsewhere (the file the
    run recorded is gone, the same file is here): none of them is a change of the entry."""
    builtin = prepare({"run_dir": str(tmp_path / "builtin" / "run")})
    old_builtin = launched(tmp_path / "builtin" / "run", builtin)
    old_builtin.save_config({**old_builtin.load_config(), "entry": "models.lm:main"})
    old_builtin.event(events.Launch(entry="models.lm:main", fingerprint=builtin.fingerprint))
    assert prepare({"run_dir": str(tmp_path / "builtin" / "run"), "resume": True}).job.entry == entry_lib.BUILTIN_ENTRY

    path = entry_file(tmp_path / "project")
    run = launched(tmp_path / "run", prepare(options(tmp_path, entry=str(path))))
    run.event(events.Launch(entry=f"{tmp_path}/elsewhere/../project/train.py:main",
                            entry_code=entry_lib.code_digest(entry_lib.parse_entry(str(path)))))
    assert not prepare(options(tmp_path, resume=True)).changes

    run.event(events.Launch(entry=f"{tmp_path}/gone/train.py:main",
                            entry_code=entry_lib.code_digest(entry_lib.parse_entry(str(path)))))
    moved = prepare(options(tmp_path, resume=True, entry=str(path)))
    assert moved.job.entry == f"{path}:main" and not moved.changes, "the same file in its new place"


def test_a_plain_resume_of_a_run_whose_saved_length_is_behind_its_checkpoints_goes_on(tmp_path):
    """A run an older version let shrink its --steps below its committed step: a --resume that gives
    no --steps is not refused for what the user did not ask."""
    run = launched(tmp_path / "run", prepare(options(tmp_path, steps=30)))
    step = tmp_path / "run" / "checkpoints" / "60"
    step.mkdir(parents=True)
    (step / CHECKPOINT_COMMIT_MARKER).write_text("{}")
    assert prepare(options(tmp_path, resume=True)).job.train.steps == 30
    assert run.committed_steps() == [60]


def test_a_run_recorded_on_another_machine_before_entries_were_hashed_resumes_with_its_saved_text(tmp_path,
                                                                                                   monkeypatch):
    """tests/fixtures/run_v0_kill's case: the launch event names a path of the machine that wrote it,
    and config.json the entry as typed, relative: found here, it is the run's entry."""
    path = entry_file(tmp_path / "project")
    monkeypatch.chdir(tmp_path / "project")
    run = launched(tmp_path / "run", prepare(options(tmp_path, entry="train.py")))
    run.save_config({**run.load_config(), "entry": "train.py:main"})
    run.event(events.Launch(entry="/work/another-machine/train.py:main"))
    resumed = prepare(options(tmp_path, resume=True))
    assert resumed.job.entry == f"{path}:main" and not resumed.changes
