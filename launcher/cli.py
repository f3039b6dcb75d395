"""The command line (`python launch.py`, `jaxlaunch`): flags from the config's own fields, one launch, exit codes.

Exit codes: 0 finished; 1 the job failed (budget spent, deterministic failure, no capacity, storage,
no readable checkpoint); 2 bad input (one line naming the fix; nothing written or deleted); 130/143
stopped by SIGINT/SIGTERM after every host saved the same step."""

from __future__ import annotations

import inspect
import logging
import sys
from typing import Annotated, Any

import cyclopts
from jaxlaunch.launcher.configuration import options as options_lib
from jaxlaunch.launcher.configuration.job import ROOTS
from jaxlaunch.launcher.exit_codes import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    Terminated,
)
from jaxlaunch.launcher.views.display import error

from jaxlaunch.contract import events, layout
from jaxlaunch.contract.entry import BUILTIN_ENTRY
from jaxlaunch.contract.protocol import ConfigError
from jaxlaunch.contract.storage import RunStorageError

DESCRIPTION = "Launch a fault-tolerant multi-host JAX training job on Ray (an embedded local Ray by default)."
EPILOG = ("After a run: `jaxlaunch report RUN_DIR` prints its attempts and goodput and writes RUN_DIR/report.png."
          "\n\nEvery setting's flag is also a key of the --config file (by its section: --save-every is"
          " checkpoint.save_every) and a keyword of jaxlaunch.launch() (save_every=); the launch's own flags"
          " (--config, --name, --resume, --allow-change, --inject, --chaos) are keywords only (config_file=, name=,"
          " ...), not keys. Flags not given keep the config file's value, and on"
          " --resume the run's saved one.")
HELP_FLAGS = options_lib.HELP_FLAGS
USAGE = "Usage: jaxlaunch [FLAGS]     (or: jaxlaunch report RUN_DIR)"
VERBOSE = inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
    bool | None, cyclopts.Parameter(name=list(options_lib.VERBOSE_FLAGS), negative=(), allow_repeating=True,
                                    show_default=False, help="Driver debug logging (default: off).",
                                    group=cyclopts.Group("output", sort_key=-1))])


def report(run_dir: Annotated[str, cyclopts.Parameter(help="the run directory")], /) -> int:
    """Print a run's report and write report.png."""
    from jaxlaunch.launcher.records import report as report_lib
    from jaxlaunch.launcher.records.runs import RunDir

    run = RunDir(run_dir)
    run.store.check()
    if not run.has_records():
        raise ConfigError(f"{run_dir} is not a run directory (no events.jsonl); pass the --run-dir of a launch")
    quiet = logging.getLogger(layout.__name__)  # a file of noise is one line, not a warning per torn line
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        launched = any(isinstance(e, events.Launch) for e in run.events())
    finally:
        quiet.setLevel(level)
    if not launched:
        raise ConfigError(f"{run_dir} is not a run directory (its events.jsonl records no launch); pass the --run-dir "
                          f"of a launch")
    try:
        print(f"wrote {report_lib.write(run_dir)}")
    except IsADirectoryError as err:  # a folder where the report or a record should be: a run made by hand
        raise ConfigError(f"{run_dir}: {err.filename} is a folder, not a run's file; remove or rename it") from None
    return EXIT_OK


def app(entry_text: str | None = None) -> cyclopts.App:
    """The command line: a launch (the default command) with the launcher's flags, with `entry_text`
    that entry's declared settings too (for --help), and `report RUN_DIR`."""
    params = [*options_lib.parameters(ROOTS), VERBOSE]
    epilog = EPILOG
    if entry_text is not None:
        from jaxlaunch.launcher.configuration.job import settings_parameters

        from jaxlaunch.contract import entry as entry_lib

        try:
            params += settings_parameters(entry_lib.resolve(entry_text)).values()
        except ConfigError as err:
            epilog = f"{EPILOG}\n\n(the entry's settings are not listed: {err})"
    cli = options_lib.quiet_app(name="jaxlaunch", help=DESCRIPTION, help_epilogue=epilog, help_flags=HELP_FLAGS,
                                help_format="plaintext", usage=USAGE, default_command=options_lib.command(params))
    cli.command(report, help_epilogue="")
    return cli


def parse(argv: list[str]) -> tuple[Any, dict[str, Any], list[str]]:
    """The command, the flags given (by keyword) and the arguments left to the entry's settings."""
    return options_lib.parse_known(app(), argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if "--" in argv:
            raise ConfigError("jaxlaunch takes nothing after --: give the entry's settings as flags (--seq-len 64) "
                              "or as --set KEY=VALUE")
        wants_help = any(word in HELP_FLAGS for word in argv)
        if argv[:1] == ["report"] and not wants_help:
            if len(argv) != 2 or argv[1].startswith("-"):
                raise ConfigError("jaxlaunch report takes one argument, a run directory (the --run-dir of a launch)")
            return report(argv[1])
        if wants_help:
            words = [word for word in argv if word not in HELP_FLAGS]
            if words[:1] == ["report"]:
                app().help_print(["report"])
            else:
                app(parse(words)[1].get("entry", BUILTIN_ENTRY)).help_print([])
            return EXIT_OK
        _, given, entry_args = parse(argv)
        logging.basicConfig(level=logging.DEBUG if given.pop("verbose", False) else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        from jaxlaunch.launcher import runner
        from jaxlaunch.launcher.configuration import job
        from jaxlaunch.launcher.control import signals

        prepared = job.prepare(given, entry_args)
        with signals.sigterm_unwinds():
            return runner.run_job(prepared).exit_code
    except ConfigError as err:
        error(str(err))
        return EXIT_USAGE
    except RunStorageError as err:
        error(str(err))
        return EXIT_FAILED
    except KeyboardInterrupt as err:
        error("interrupted; every host process was stopped")
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
