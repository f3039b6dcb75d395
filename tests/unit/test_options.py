"""Flags, config keys and `jaxlaunch.launch` keywords from one declaration per field."""

import dataclasses
import io
import os
import pathlib
import subprocess
import sys
from typing import Literal

import pytest
import rich.console
from jaxlaunch.launcher import cli
from jaxlaunch.launcher.configuration import options
from jaxlaunch.launcher.configuration.job import ROOTS, prepare
from jaxlaunch.launcher.configuration.schema import JobConfig, TrainConfig, from_json, load_file

from jaxlaunch.contract.flags import flag
from jaxlaunch.contract.protocol import ConfigError, Injection

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Every flag of the command line before flags were derived, with a value, and where it lands.
LEGACY_FLAGS = [
    (["--entry", "examples/minimal.py:main"], "entry", None),
    (["--hosts", "2"], "num_hosts", 2),
    (["--steps", "40"], "train.steps", 40),
    (["--schedule-steps", "50"], "train.schedule_steps", 50),
    (["--save-every", "5"], "checkpoint.save_every", 5),
    (["--save-every", "auto"], "checkpoint.save_every", "auto"),
    (["--persist-every", "auto"], "checkpoint.persist_every", "auto"),
    (["--no-memory-tier"], "checkpoint.memory_tier", False),
    (["--memory-tier"], "checkpoint.memory_tier", True),
    (["--seed", "3"], "train.seed", 3),
    (["--mesh", "data=-1"], "mesh", {"data": -1}),
    (["--devices-per-host", "1"], "cluster.devices_per_host", 1),
    (["--address", "auto"], "cluster.address", "auto"),
    (["--placement-timeout", "7"], "cluster.placement_timeout_s", 7.0),
    (["--hang-timeout", "9.5"], "watchdog.hang_timeout_s", 9.5),
    (["--startup-timeout", "11"], "watchdog.startup_timeout_s", 11.0),
    (["--save-timeout", "13"], "watchdog.save_timeout_s", 13.0),
    (["--max-restarts", "0"], "fault.max_restarts", 0),
    (["--max-preemptions", "5"], "fault.max_preemptions", 5),
    (["--min-hosts", "1"], "fault.min_hosts", 1),
    (["--max-hosts", "4"], "fault.max_hosts", 4),
    (["--capacity-timeout", "30"], "fault.capacity_timeout_s", 30.0),
    (["--run-dir", "somewhere"], "run_dir", "somewhere"),
]


def get(job, path):
    for part in path.split("."):
        job = getattr(job, part)
    return job


def parse(argv):
    _, given, rest = cli.parse(argv)
    assert rest == [], rest
    return options.split_by_root(given, ROOTS)


def command_line(roots):
    """A command line of `roots`' options alone: its parse, and its help as text."""
    app = options.quiet_app(default_command=options.command(options.parameters(roots)), help_format="plaintext")
    out = io.StringIO()
    app.help_print([], console=rich.console.Console(file=out, width=200))
    return (lambda argv: options.parse_known(app, argv)[1]), " ".join(out.getvalue().split())


@pytest.mark.parametrize(("argv", "path", "value"), LEGACY_FLAGS)
def test_every_flag_of_before_still_sets_its_field(argv, path, value):
    (by_root, rest) = parse(argv)
    assert rest == {} and by_root[JobConfig] == {path: value if value is not None else argv[1]}


def test_the_launch_s_own_flags_keep_their_names():
    by_root, _ = parse(["--config", "c.yaml", "--name", "exp", "--resume", "--allow-change", "seed",
                        "--allow-change", "seq_len", "--inject", "kill@step=3,host=1", "--inject", "hang@step=5",
                        "--chaos", "30", "--set", "lr=3e-4", "--set", "opt.beta=0.9"])
    launch = by_root[ROOTS[1]]
    assert launch == {"config_file": "c.yaml", "name": "exp", "resume": True, "allow_change": ("seed", "seq_len"),
                      "inject": (Injection("kill", 3, 1), Injection("hang", 5, 0)), "chaos": 30.0}
    assert by_root[JobConfig] == {"config": {"lr": "3e-4", "opt": {"beta": "0.9"}}}, "as written: the entry types it"
    assert parse(["--resume", "auto"])[0][ROOTS[1]] == {"resume": "auto"}
    with pytest.raises(ConfigError, match="Invalid value for --resume: expected bool or 'auto', got 'sometimes'"):
        cli.parse(["--resume", "sometimes"])
    assert parse(["--steps", "5", "--steps", "7", "--memory-tier", "--no-memory-tier"])[0][JobConfig] == {
        "train.steps": 7, "checkpoint.memory_tier": False}, "the last of a repeated flag wins, as in argparse"


def test_each_flag_is_declared_once_on_a_field_with_its_help_and_default():
    table = options.table(*ROOTS)
    assert len({o.flag for o in table.values()}) == len(table)
    for option in table.values():
        assert option.help, f"{option.path} has no docstring to be its help"
        assert "default" in option.help or option.default_text() is not None, option.path
    assert table["save_every"].path == "checkpoint.save_every" and table["save_every"].default == "auto"
    assert table["hosts"].path == "num_hosts" and table["hang_timeout"].flag == "--hang-timeout"


def test_a_new_field_is_a_flag_a_keyword_and_a_config_key_with_nothing_else_written():
    @dataclasses.dataclass(frozen=True)
    class Tracking:
        """Where metrics go."""

        tracker: str | None = flag(None)
        """Send metrics to this tracker (default: none)."""
        metrics_port: int = flag(9090)
        """Serve Prometheus metrics on this port."""

    @dataclasses.dataclass(frozen=True)
    class Root:
        """A job."""

        tracking: Tracking = dataclasses.field(default_factory=Tracking)

    parse_root, help_text = command_line([Root])
    assert "--metrics-port N Serve Prometheus metrics on this port. (default: 9090)" in help_text
    by_root, _ = options.split_by_root(parse_root(["--metrics-port", "81", "--tracker", "wandb"]), [Root])
    assert by_root[Root] == {"tracking.metrics_port": 81, "tracking.tracker": "wandb"}
    assert options.split_by_root({"metrics_port": 82}, [Root])[0][Root] == {"tracking.metrics_port": 82}


def test_a_field_of_a_number_or_a_word_takes_either_from_a_flag_or_a_keyword():
    @dataclasses.dataclass(frozen=True)
    class Saving:
        """When to save."""

        every: int | Literal["auto"] = flag(50, name="every_n")
        """Save every this many steps, or "auto": as often as costs 5 % of the step time."""

    @dataclasses.dataclass(frozen=True)
    class Root:
        """A job."""

        saving: Saving = dataclasses.field(default_factory=Saving)

    parse_root, _ = command_line([Root])
    for text, value in [("5", 5), ("auto", "auto")]:
        given = parse_root(["--every-n", text])
        assert options.split_by_root(given, [Root])[0][Root] == {"saving.every": value}
    assert options.split_by_root({"every_n": "auto"}, [Root])[0][Root] == {"saving.every": "auto"}
    with pytest.raises(ConfigError, match="every_n must be int or 'auto', got 'often'"):
        options.split_by_root({"every_n": "often"}, [Root])
    with pytest.raises(ConfigError, match="Invalid value for --every-n: expected int or 'auto', got '2.5'"):
        parse_root(["--every-n", "2.5"])


def test_keywords_are_typed_by_their_fields():
    assert options.split_by_root({"hang_timeout": 5, "mesh": "data=-1", "inject": ["kill@step=2"]}, ROOTS)[0] == {
        JobConfig: {"watchdog.hang_timeout_s": 5.0, "mesh": {"data": -1}},
        ROOTS[1]: {"inject": (Injection("kill", 2, 0),)}}
    for bad, message in [({"hosts": "2"}, "hosts must be int, got '2'"),
                         ({"steps": 2.5}, "steps must be int"),
                         ({"resume": "yes"}, "resume must be bool or 'auto'"),
                         ({"address": 3}, "address must be str")]:
        with pytest.raises(ConfigError, match=message):
            options.split_by_root(bad, ROOTS)


def test_the_built_in_model_s_settings_are_its_entry_s_flags_and_keywords(tmp_path):
    run = {"run_dir": str(tmp_path / "run")}
    by_flag = prepare(run, ["--model", "tiny", "--seq-len=64", "--global-batch-size", "16", "--data",
                            str(ROOT / "README.md")]).job.config
    by_keyword = prepare({**run, "model": "tiny", "seq_len": 64, "global_batch_size": 16,
                          "data": str(ROOT / "README.md")}).job.config
    by_set = prepare({**run, "config": {"model": "tiny", "seq_len": 64, "global_batch_size": 16,
                                        "data": str(ROOT / "README.md")}}).job.config
    assert by_flag == by_keyword == by_set and by_flag["seq_len"] == 64
    assert prepare(run, ["--seq-len", "64"], ).job.config["seq_len"] == 64
    assert prepare({**run, "config": {"seq_len": 32}}, ["--seq-len", "64"]).job.config["seq_len"] == 32, \
        "--set wins over a setting's own flag"
    with pytest.raises(ConfigError, match=r"unknown flag --seq-length \(did you mean --seq-len\?\)"):
        prepare(run, ["--seq-length", "64"])
    with pytest.raises(ConfigError, match="unknown flag --model; .*minimal.py:main declares no settings"):
        prepare({**run, "entry": str(ROOT / "examples" / "minimal.py")}, ["--model", "tiny"])


def test_a_typed_job_config_counts_as_given_and_keywords_override_it(tmp_path):
    typed = JobConfig(num_hosts=2, train=TrainConfig(steps=12, seed=4), config={"seq_len": 64})
    job = prepare({"run_dir": str(tmp_path / "run"), "seed": 5}, typed=typed).job
    assert (job.num_hosts, job.train.steps, job.train.seed, job.config["seq_len"]) == (2, 12, 5, 64)


def test_a_run_saved_by_the_version_with_checkpoint_save_timeout_still_loads():
    saved = dataclasses.asdict(load_file(ROOT / "cluster_configs" / "local.yaml"))
    saved["run_dir"] = "runs/default"
    saved["checkpoint"]["save_timeout_s"] = 600.0
    assert from_json(saved).checkpoint == JobConfig().checkpoint


def test_help_shows_every_default_the_entry_s_settings_and_the_report_command():
    env = {**os.environ, "COLUMNS": "80"}
    text = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--help"], capture_output=True, text=True,
                          env=env, timeout=60, check=True).stdout
    blocks: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("│ --"):  # a flag's first line in its group's box; wrapped lines are indented
            name = line.split()[1]  # a bool flag: "--memory-tier --no-memory-tier"
            blocks[name] = line.strip("│ ")
        elif blocks and line.startswith("│  "):
            blocks[name] += " " + line.strip("│ ")
    for option in options.table(*ROOTS).values():
        assert "default" in blocks[option.flag], f"{option.flag} shows no default: {blocks[option.flag]}"
    flat = " ".join(text.split())
    save_every = flat[flat.index("--save-every"):]
    assert "(default: auto)" in save_every[:save_every.index(" --", 3)]
    assert "--no-memory-tier" in blocks["--memory-tier"]
    assert "--model STR (default: tiny)" in flat and "--seq-len INT (default: 128)" in flat
    assert "jaxlaunch report RUN_DIR" in flat


def test_every_flag_is_a_typed_keyword_of_launch():
    """`LaunchKeywords` (what a type checker knows of `jaxlaunch.launch`) names every flag but --entry, nothing
    else, and takes each field's default and a flag's text where the field parses text."""
    import typing

    from jaxlaunch.launcher.configuration.keywords import LaunchKeywords
    from pydantic import TypeAdapter, ValidationError

    table = options.table(*ROOTS)
    hints = typing.get_type_hints(LaunchKeywords)
    assert set(hints) == set(table) - {"entry"}, (set(table) - set(hints), set(hints) - set(table))
    for keyword, option in table.items():
        if keyword == "entry":
            continue  # launch's first parameter, typed there
        adapter = TypeAdapter(hints[keyword])
        try:
            adapter.validate_python(option.default, strict=True)
        except ValidationError as err:
            raise AssertionError(f"{keyword}: {hints[keyword]} does not take the default {option.default!r}") from err
        if option.spec.parse is not None:
            adapter.validate_python("text", strict=True)


def test_an_entry_s_setting_given_twice_takes_the_last_and_one_named_like_a_launcher_flag_is_set_by_set(tmp_path):
    run = {"run_dir": str(tmp_path / "run")}
    assert prepare(run, ["--seq-len", "64", "--seq-len", "32"]).job.config["seq_len"] == 32
    entry = tmp_path / "entry.py"
    entry.write_text("import jaxlaunch\n\n\n@jaxlaunch.entrypoint(defaults={'verbose': False, 'tracker': 'x', "
                     "'set': 1, 'help': 'h', 'no_memory_tier': 0, 'lambda': 0.1, 'width': 3})\n"
                     "def main(ctx):\n    pass\n")
    env = {**os.environ, "COLUMNS": "200"}
    shown = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--entry", f"{entry}:main", "--help"],
                           capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    box = shown[shown.index("settings of"):].splitlines()
    settings = [line.split()[1:3] for line in box if line.startswith("│ --")]
    assert settings == [["--lambda", "FLOAT"], ["--width", "INT"]], \
        "verbose, tracker, set, help and no_memory_tier are the launcher's flags: those settings are left to --set"
    given = prepare({**run, "entry": f"{entry}:main", "config": {"verbose": True}},
                    ["--width", "5", "--lambda", "0.5"]).job.config
    assert (given["verbose"], given["width"], given["lambda"]) == (True, 5, 0.5)


def test_report_takes_one_run_directory_and_nothing_after_the_flags_is_taken(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "events.jsonl").write_text("")
    for argv in (["report", str(run), "stray"], ["report"], ["report", "--steps", "5"], ["--steps", "5", "--", "x"]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not (run / "report.png").exists()
    assert parse(["--resume"])[0][ROOTS[1]] == {"resume": True} and parse(["-v", "--verbose"])[1] == {"verbose": True}
