"""The command line (`python launch.py`, `jaxlaunch`): flags from the config's own fields, one launch, exit codes.

Exit codes: 0 finished; 1 the job failed (budget spent, deterministic failure, no capacity, storage,
no readable checkpoint); 2 bad input (one line naming the fix; nothing written or deleted); 130/143
stopped by SIGINT/SIGTERM after every host saved the same step."""

from __future__ import annotations

import argparse
import logging
import sys

from jaxlaunch.launcher.configuration import options as options_lib
from jaxlaunch.launcher.configuration.job import ROOTS
from jaxlaunch.launcher.exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE
from jaxlaunch.launcher.views.display import error

from jaxlaunch.contract.entry import BUILTIN_ENTRY
from jaxlaunch.contract.protocol import ConfigError
from jaxlaunch.contract.storage import RunStorageError

EPILOG = """After a run: `jaxlaunch report RUN_DIR` prints its attempts and goodput and writes RUN_DIR/report.png.

Every flag is also a key of the --config file (by its section: --save-every is checkpoint.save_every) and a
keyword of jaxlaunch.launch() (save_every=). Flags not given keep the config file's value, and on --resume the
run's saved one."""


def parser(entry_text: str | None = None, add_help: bool = True) -> argparse.ArgumentParser:
    """The launcher's flags; with `entry_text`, also that entry's declared settings (for --help)."""
    p = argparse.ArgumentParser(
        prog="jaxlaunch", allow_abbrev=False, add_help=add_help, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="jaxlaunch [FLAGS]     (or: jaxlaunch report RUN_DIR)",
        description="Launch a fault-tolerant multi-host JAX training job on Ray (an embedded local Ray by default).",
    )
    options_lib.add_arguments(p, ROOTS)
    p.add_argument("-v", "--verbose", action="store_true", help="driver debug logging")
    if entry_text is not None:
        from jaxlaunch.launcher.configuration.job import settings_parser

        from jaxlaunch.contract import entry as entry_lib

        try:
            settings_parser(entry_lib.resolve(entry_text), p)
        except ConfigError as err:
            p.epilog = f"{EPILOG}\n\n(the entry's settings are not listed: {err})"
    return p


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxlaunch report", description="Print a run's report and write report.png.")
    p.add_argument("run_dir", help="the run directory")
    args = p.parse_args(argv)
    from jaxlaunch.launcher.records import report
    from jaxlaunch.launcher.records.runs import RunDir

    try:
        run = RunDir(args.run_dir)
        run.store.check()
    except ConfigError as err:
        error(str(err))
        return EXIT_USAGE
    if not run.has_records():
        error(f"{args.run_dir} is not a run directory (no events.jsonl); pass the --run-dir of a launch")
        return EXIT_USAGE
    path = report.write(args.run_dir)
    print(f"wrote {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    if "-h" in argv or "--help" in argv:
        parser(vars(parser(add_help=False).parse_known_args(argv)[0]).get("entry", BUILTIN_ENTRY)).parse_args(argv)
    args, entry_args = parser().parse_known_args(argv)
    given = vars(args)
    logging.basicConfig(level=logging.DEBUG if given.pop("verbose") else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from jaxlaunch.launcher import runner
        from jaxlaunch.launcher.configuration import job

        prepared = job.prepare(given, entry_args)
        return runner.run_job(prepared).exit_code
    except ConfigError as err:
        error(str(err))
        return EXIT_USAGE
    except RunStorageError as err:
        error(str(err))
        return EXIT_FAILED
    except KeyboardInterrupt:
        error("interrupted; every host process was stopped")
        return EXIT_INTERRUPTED
