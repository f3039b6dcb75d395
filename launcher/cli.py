"""Command line: parse, build and validate the JobConfig, run the driver, map errors to exit codes.

Exit codes: 0 finished, 1 the job failed (restart budget spent), 2 bad input (nothing written or
deleted), 130 interrupted."""

from __future__ import annotations

import argparse
import logging
import sys

from launcher.config import (
    DEFAULT_CLUSTER_CONFIG,
    ConfigError,
    Injection,
    JobConfig,
    load_file,
    override,
    parse_mesh,
    validate,
)
from launcher.display import error

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Launch a multi-host JAX training job on Ray (an embedded local Ray by default).",
    )
    # Every default is None: only flags the user gave override the config file (or, with
    # --resume, the run's saved config).
    p.add_argument("--config", help=f"cluster config YAML (default {DEFAULT_CLUSTER_CONFIG.name})")
    p.add_argument("--address", help="existing Ray cluster to run on ('auto' or HOST:PORT)")
    p.add_argument("--hosts", type=int, help="JAX processes, one per host")
    p.add_argument("--steps", type=int, help="total training steps")
    p.add_argument("--save-every", type=int, help="checkpoint every N steps")
    p.add_argument("--run-dir", help="run directory (default runs/<name>)")
    p.add_argument("--name", default="default", help="run name, used for the default run directory")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its latest checkpoint")
    p.add_argument("--model", help="model preset: tiny, small, base")
    p.add_argument("--data", help="text file or folder to train on (default: the Python stdlib sources)")
    p.add_argument("--seed", type=int, help="seed of parameters and data order")
    p.add_argument("--global-batch-size", type=int, help="sequences per step over all hosts")
    p.add_argument("--seq-len", type=int, help="bytes per sequence")
    p.add_argument("--mesh", help="mesh axes, e.g. data=-1,model=2")
    p.add_argument("--devices-per-host", type=int, help="devices per host process")
    p.add_argument("--placement-timeout", type=float, help="seconds to wait for the cluster to place the hosts")
    p.add_argument("--hang-timeout", type=float, help="seconds without a completed step before a host counts as hung")
    p.add_argument("--startup-timeout", type=float, help="seconds a host may take to start, restore and compile")
    p.add_argument("--max-restarts", type=int, help="restarts allowed after crashes, hangs and exceptions")
    p.add_argument("--max-preemptions", type=int, help="restarts allowed after preemptions and lost nodes")
    p.add_argument("--min-hosts", type=int, help="fewest hosts to continue on after a failure (default --hosts)")
    p.add_argument("--max-hosts", type=int, help="most hosts to grow to when capacity returns (default --hosts)")
    p.add_argument("--capacity-timeout", type=float, help="seconds a restart waits for room for --min-hosts")
    p.add_argument("--inject", action="append", default=[], metavar="KIND@step=N,host=I",
                   help="inject a failure: crash, kill, hang, exception or preempt (repeatable; ,times=K)")
    p.add_argument("--chaos", type=float, metavar="MEAN_SECONDS",
                   help="kill a random host at random times, MEAN_SECONDS apart on average")
    p.add_argument("-v", "--verbose", action="store_true", help="driver debug logging")
    return p


def build_job(args: argparse.Namespace) -> JobConfig:
    from launcher.runs import RunDir

    run_dir = args.run_dir or f"runs/{args.name}"
    base = load_file(args.config or DEFAULT_CLUSTER_CONFIG)
    if args.resume and args.config is None:
        saved = RunDir(run_dir).load_config()
        base = saved if saved is not None else base
    job = override(
        base,
        num_hosts=args.hosts,
        run_dir=run_dir,
        resume=args.resume,
        mesh=parse_mesh(args.mesh) if args.mesh else None,
        **{
            "cluster.address": args.address,
            "cluster.devices_per_host": args.devices_per_host,
            "cluster.placement_timeout_s": args.placement_timeout,
            "train.steps": args.steps,
            "train.model": args.model,
            "train.data": args.data,
            "train.seed": args.seed,
            "train.global_batch_size": args.global_batch_size,
            "train.seq_len": args.seq_len,
            "checkpoint.save_every": args.save_every,
            "distributed.hang_timeout_s": args.hang_timeout,
            "distributed.startup_timeout_s": args.startup_timeout,
            "fault.max_restarts": args.max_restarts,
            "fault.max_preemptions": args.max_preemptions,
            "fault.min_hosts": args.min_hosts,
            "fault.max_hosts": args.max_hosts,
            "fault.capacity_timeout_s": args.capacity_timeout,
        },
    )
    validate(job)
    return job


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="launch.py report", description="Print a run's report and write report.png.")
    p.add_argument("run_dir", help="the run directory")
    args = p.parse_args(argv)
    from launcher import report
    from launcher.runs import RunDir

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
        job = build_job(args)
        injections = tuple(Injection.parse(text) for text in args.inject)
        if args.chaos is not None and args.chaos <= 0:
            raise ConfigError(f"--chaos must be a positive number of seconds, got {args.chaos}")
        from launcher import runner

        return runner.run_job(job, injections=injections, chaos_mean_s=args.chaos)
    except ConfigError as err:
        error(str(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        error("interrupted; every host process was stopped")
        return EXIT_INTERRUPTED
