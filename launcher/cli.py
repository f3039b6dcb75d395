"""The command line (`python launch.py`, `jaxlaunch`): flags to LaunchOptions, one launch, exit codes.

Exit codes: 0 finished; 1 the job failed (budget spent, deterministic failure, no capacity, storage,
no readable checkpoint); 2 bad input (one line naming the fix; nothing written or deleted); 130/143
stopped by SIGINT/SIGTERM after every host saved the same step."""

from __future__ import annotations

import argparse
import logging
import sys

from jaxlaunch.launcher.display import error
from jaxlaunch.launcher.job import LaunchOptions

from jaxlaunch.contract.protocol import ConfigError
from jaxlaunch.contract.storage import RunStorageError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxlaunch",
        description="Launch a fault-tolerant multi-host JAX training job on Ray (an embedded local Ray by default).",
    )
    # Every default is None: only flags the user gave override the config file (or, with --resume,
    # the run's saved config).
    p.add_argument("--entry", help="your function: path/to/file.py:main or package.module:main "
                                    "(default: the built-in language model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings",
                   help="a setting of the entry (ctx.config), repeatable")
    p.add_argument("--config", help="cluster config YAML (default: the embedded local Ray)")
    p.add_argument("--address", help="existing Ray cluster to run on ('auto' or HOST:PORT)")
    p.add_argument("--hosts", type=int, help="JAX processes, one per host")
    p.add_argument("--steps", type=int, help="total training steps (ctx.steps)")
    p.add_argument("--schedule-steps", type=int, help="length of the learning-rate schedule (default: the first "
                                                      "launch's --steps, kept on --resume)")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--run-dir", help="run directory (default runs/<name>)")
    p.add_argument("--name", default="default", help="run name, used for the default run directory")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="auto",
                   help="continue the run in --run-dir; '--resume auto' also starts it when the directory is empty")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="on --resume, accept a change to what the run computes (a setting, seed, schedule_steps, "
                        "fingerprint)")
    p.add_argument("--model", help="built-in model: tiny, small or base")
    p.add_argument("--data", help="built-in model: text file or folder to train on (default: Python's sources)")
    p.add_argument("--global-batch-size", type=int, help="built-in model: sequences per step over all hosts")
    p.add_argument("--seq-len", type=int, help="built-in model: bytes per sequence")
    p.add_argument("--seed", type=int, help="seed of parameters and data order (ctx.seed)")
    p.add_argument("--mesh", help="mesh axes, e.g. data=-1,model=2")
    p.add_argument("--devices-per-host", type=int, help="devices per host process")
    p.add_argument("--placement-timeout", type=float, help="seconds one placement may take before trying fewer hosts")
    p.add_argument("--hang-timeout", type=float, help="seconds without a reported step before a host counts as hung")
    p.add_argument("--startup-timeout", type=float, help="seconds a host may take to start, restore and compile")
    p.add_argument("--save-timeout", type=float, help="seconds a blocking checkpoint save may take")
    p.add_argument("--max-restarts", type=int, help="restarts allowed after crashes, hangs and exceptions")
    p.add_argument("--max-preemptions", type=int, help="restarts allowed after preemptions and lost nodes")
    p.add_argument("--min-hosts", type=int, help="fewest hosts to continue on after a failure (default --hosts)")
    p.add_argument("--max-hosts", type=int, help="most hosts to grow to when capacity returns (default --hosts)")
    p.add_argument("--capacity-timeout", type=float, help="seconds a restart waits for room for --min-hosts")
    p.add_argument("--inject", action="append", default=[], metavar="KIND@step=N,host=I",
                   help="inject a failure at a reported step: crash, kill, hang, exception or preempt "
                        "(repeatable; ,times=K)")
    p.add_argument("--chaos", type=float, metavar="MEAN_SECONDS",
                   help="kill a random host at random times, MEAN_SECONDS apart on average")
    p.add_argument("-v", "--verbose", action="store_true", help="driver debug logging")
    return p


def options(args: argparse.Namespace) -> LaunchOptions:
    from jaxlaunch.launcher.config import parse_settings

    return LaunchOptions(
        entry=args.entry, settings=parse_settings(args.settings),
        model_settings={"model": args.model, "data": args.data, "global_batch_size": args.global_batch_size,
                        "seq_len": args.seq_len},
        config_file=args.config, run_dir=args.run_dir, name=args.name,
        resume="auto" if args.resume == "auto" else args.resume, allow_change=args.allow_change,
        hosts=args.hosts, steps=args.steps, schedule_steps=args.schedule_steps, save_every=args.save_every,
        seed=args.seed, mesh=args.mesh, address=args.address, devices_per_host=args.devices_per_host,
        placement_timeout=args.placement_timeout, hang_timeout=args.hang_timeout,
        startup_timeout=args.startup_timeout, save_timeout=args.save_timeout, max_restarts=args.max_restarts,
        max_preemptions=args.max_preemptions, min_hosts=args.min_hosts, max_hosts=args.max_hosts,
        capacity_timeout=args.capacity_timeout, inject=args.inject, chaos=args.chaos,
    )


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="jaxlaunch report", description="Print a run's report and write report.png.")
    p.add_argument("run_dir", help="the run directory")
    args = p.parse_args(argv)
    from jaxlaunch.launcher import report
    from jaxlaunch.launcher.runs import RunDir

    run = RunDir(args.run_dir)
    if not run.events_path.exists():
        error(f"{args.run_dir} is not a run directory (no events.jsonl); pass the --run-dir of a launch")
        return EXIT_USAGE
    path = report.write(run.path)
    print(f"wrote {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.resume not in (True, False, "auto"):
            raise ConfigError(f"--resume takes no value or 'auto', got {args.resume!r}")
        from jaxlaunch.launcher import job, runner

        prepared = job.prepare(options(args))
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
