"""The peer side of the side-by-side benchmark: the built-in job (tiny byte-level transformer, global
batch 32 x 128 bytes, AdamW with warm-up + cosine, 2 hosts x 2 CPU devices, data-parallel mesh with
the model's FSDP rules) trained by two other means than jaxlaunch, measured the same way.

- `plain_jax`: the floor. N processes started by hand, joined by `jax.distributed` over gloo; no Ray
  and no fault tolerance; an Orbax CheckpointManager (asynchronous, Orbax's default) if asked.
- `ray_train`: Ray Train v2's `JaxTrainer` on a local Ray that it starts and stops itself, with a
  checkpoint reported every `save_every` steps (Orbax writes it from every worker into a shared
  folder, rank 0 reports that folder: the "only rank 0 uploads" pattern of Ray's checkpoint guide),
  restored with `ray.train.get_checkpoint()`, and optionally a fault sent from this process to
  worker rank 1 (SIGKILL, or SIGSTOP for a hang).

Every worker appends one JSON line per event (start, restored, step, reported) to `<run>/rank<r>.jsonl`
with wall-clock times; the figures are computed from rank 0's records (step end = after the loss is
on the host) and the fault time this process recorded.

    from benchmarks import peers
    peers.plain_jax(pathlib.Path("/tmp/w"), steps=40, save_every=5)
    peers.ray_train(pathlib.Path("/tmp/w"), steps=40, save_every=5, fault="kill", fault_step=10)
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from jaxlaunch.contract.protocol import host_env

ROOT = pathlib.Path(__file__).resolve().parents[1]
SEED = 0
GLOBAL_BATCH = 32
SEQ_LEN = 128
DEVICES_PER_HOST = 2
WARMUP_STEPS_EXCLUDED = 5
"""Steps left out of `steps_per_s` at the start (compilation, first save)."""
FAULTS = (None, "kill", "hang")


# ---- the job, inside one joined JAX process --------------------------------------------------------

def _partition_spec(shape: tuple[int, ...], logical_axes: tuple | None, mesh, rules: dict):
    """Logical axes -> mesh axes through `rules`; an axis that is absent, already used or does not
    divide the dimension leaves it replicated (as jaxlaunch does)."""
    from jax.sharding import PartitionSpec

    if not logical_axes:
        return PartitionSpec()
    spec, used = [], set()
    for dim, name in zip(shape, logical_axes, strict=True):
        target = rules.get(name) if name is not None else None
        if isinstance(target, str) and target in mesh.shape and target not in used and dim % mesh.shape[target] == 0:
            spec.append(target)
            used.add(target)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


class _Job:
    """Model, optimizer, shardings, batches, train step and Orbax save/restore, built after
    `jax.distributed` has joined the processes."""

    def __init__(self, steps: int):
        import jax
        import optax
        from flax import nnx
        from jax.sharding import NamedSharding, PartitionSpec
        from jaxlaunch.models.config import preset
        from jaxlaunch.models.corpus import Corpus
        from jaxlaunch.models.lm import DEFAULTS, SHARDING_RULES
        from jaxlaunch.models.transformer import build

        self.jax, self.nnx = jax, nnx
        cfg = DEFAULTS
        self.mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
        lr, warmup = cfg["learning_rate"], cfg["warmup_steps"]
        # As models/lm.py: decay over the run's steps (at least one past the warm-up).
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay_steps=max(steps, warmup + 1),
                                                      end_value=lr * 0.1)
        model_cfg = preset(cfg["model"])

        def make():
            with nnx.use_eager_sharding(False):
                model = build(model_cfg, SEED)
                tx = optax.chain(optax.clip_by_global_norm(cfg["grad_clip_norm"]),
                                 optax.adamw(schedule, weight_decay=cfg["weight_decay"]))
                return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

        self._make = make
        with nnx.use_eager_sharding(False):
            abstract = nnx.eval_shape(make)
        self.graphdef, abstract_state = nnx.split(abstract)

        def sharding(variable):
            value = variable.get_value()
            spec = _partition_spec(value.shape, variable.get_metadata().get("out_sharding"), self.mesh,
                                   SHARDING_RULES)
            return variable.replace(NamedSharding(self.mesh, spec))

        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        self.shardings = jax.tree.map(sharding, abstract_state, is_leaf=is_var)
        self.targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract_state, self.shardings)
        self.corpus = Corpus.load()
        self.rows_sharding = NamedSharding(self.mesh, PartitionSpec("data", None))

        def loss_fn(model, inputs, targets):
            logits = model(inputs)
            return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

        @nnx.jit(donate_argnums=(0, 1))
        def train_step(model, optimizer, inputs, targets):
            loss, grads = nnx.value_and_grad(loss_fn)(model, inputs, targets)
            optimizer.update(model, grads)
            return loss

        self._train_step = train_step
        self.model = self.optimizer = self._step_fn = None

    # state
    def init(self) -> None:
        state = self.jax.jit(lambda: self.nnx.split(self._make())[1], out_shardings=self.shardings)()
        self._set(state)

    def _set(self, state) -> None:
        self.model, self.optimizer = self.nnx.merge(self.graphdef, state)
        self._step_fn = self.nnx.cached_partial(self._train_step, self.model, self.optimizer)

    def pure_state(self) -> dict:
        return self.nnx.to_pure_dict(self.nnx.state((self.model, self.optimizer)))

    def restore(self, directory: pathlib.Path) -> None:
        import orbax.checkpoint as ocp

        targets = self.nnx.to_pure_dict(self.targets)
        restored = ocp.StandardCheckpointer().restore(directory, targets)
        state = self.jax.tree.map(lambda x: x, self.targets)  # a fresh State to fill in
        self.nnx.replace_by_pure_dict(state, restored)
        self._set(state)

    # steps
    def batch(self, step: int):
        """The global batch of `step` (1-based, as jaxlaunch numbers steps: batch of step - 1); each
        process builds only the rows its devices hold."""
        import numpy as np

        cache: dict[tuple[int, int], tuple] = {}

        def rows(index, which):
            start, stop, _ = index[0].indices(GLOBAL_BATCH)
            if (start, stop) not in cache:
                cache[(start, stop)] = self.corpus.rows(SEED, step - 1, np.arange(start, stop), GLOBAL_BATCH, SEQ_LEN)
            return cache[(start, stop)][which][:, index[1]]

        shape = (GLOBAL_BATCH, SEQ_LEN)
        return tuple(self.jax.make_array_from_callback(shape, self.rows_sharding, lambda i, w=w: rows(i, w))
                     for w in (0, 1))

    def step(self, step: int) -> float:
        return float(self._step_fn(*self.batch(step)))


class _Log:
    """One JSON line per event, flushed at once (the benchmark process reads it while we run)."""

    def __init__(self, path: pathlib.Path):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115

    def __call__(self, event: str, **fields: Any) -> None:
        self.file.write(json.dumps({"event": event, "t": time.time(), "pid": os.getpid(), **fields}) + "\n")
        self.file.flush()


# ---- plain JAX: processes started by hand ------------------------------------------------------------

def _plain_process(spec: dict[str, Any]) -> None:
    """One process of a plain_jax run (`python -m benchmarks.peers '<spec>'`)."""
    import jax

    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log = _Log(pathlib.Path(spec["run"]) / f"rank{spec['rank']}.jsonl")
    log("start")
    jax.distributed.initialize(coordinator_address=spec["coordinator"], num_processes=spec["hosts"],
                               process_id=spec["rank"], initialization_timeout=120, heartbeat_timeout_seconds=10,
                               shutdown_timeout_seconds=10)
    log("joined", devices=jax.device_count(), processes=jax.process_count())
    job = _Job(spec["steps"])
    job.init()
    log("restored", step=0)
    manager = None
    if spec["save_every"]:
        import orbax.checkpoint as ocp

        manager = ocp.CheckpointManager(pathlib.Path(spec["run"]) / "checkpoints",
                                        options=ocp.CheckpointManagerOptions(max_to_keep=2))
    for step in range(1, spec["steps"] + 1):
        loss = job.step(step)
        log("step", step=step, loss=loss)
        if manager is not None and step % spec["save_every"] == 0:
            manager.save(step, args=ocp.args.StandardSave(job.pure_state()))
            log("saved", step=step)
    if manager is not None:
        manager.wait_until_finished()
        manager.close()
    log("done")
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a JAX host process (Ray worker or subprocess), in place before JAX is imported."""
    path = os.environ.get("PYTHONPATH")
    return {"JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
            # jaxlaunch's hosts' XLA options (YNNPACK off): the peers run the same kernels.
            "XLA_FLAGS": host_env("cpu", DEVICES_PER_HOST)["XLA_FLAGS"],
            "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT), "PYTHONUNBUFFERED": "1",
            **(extra or {})}


def plain_jax(work: pathlib.Path, *, steps: int, save_every: int | None, hosts: int = 2,
              timeout_s: float = 300.0) -> dict[str, Any]:
    """`hosts` JAX processes started with subprocess on this machine; no Ray, no fault tolerance.
    `save_every` None: no checkpoints (the plain loop)."""
    run = pathlib.Path(work) / f"plain-{uuid.uuid4().hex[:8]}"
    run.mkdir(parents=True)
    port = _free_port()
    env = {**os.environ, **_worker_env()}
    t0 = time.time()
    procs = []
    try:
        for rank in range(hosts):
            spec = {"rank": rank, "hosts": hosts, "coordinator": f"127.0.0.1:{port}", "run": str(run),
                    "steps": steps, "save_every": save_every}
            out = open(run / f"rank{rank}.out", "w")  # noqa: SIM115
            procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.peers", json.dumps(spec)], cwd=ROOT,
                                          env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
            out.close()
        deadline = t0 + timeout_s
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        tail = (run / f"rank{failed[0]}.out").read_text()[-3000:]
        raise RuntimeError(f"plain_jax process {failed[0]} exited with {procs[failed[0]].returncode}:\n{tail}")
    records = _read(run / "rank0.jsonl")
    steps_done = [r for r in records if r["event"] == "step"]
    return _result(
        cold_start_s=steps_done[0]["t"] - t0, cold_start_with_ray_s=None, recovery_s=None, recovered=None,
        steps_recomputed=None, last_reported_checkpoint_survived=None,
        steps_per_s=_steps_per_s(steps_done), final_step=steps_done[-1]["step"],
        losses={r["step"]: r["loss"] for r in steps_done},
        notes="" if not save_every else "Orbax CheckpointManager, asynchronous saves (its default)",
        run_dir=str(run))


# ---- Ray Train ------------------------------------------------------------------------------------

def _ray_worker(config: dict[str, Any]) -> None:
    """train_loop_per_worker: restore from ray.train.get_checkpoint() or initialise, then train,
    saving with Orbax from every worker and reporting the folder from rank 0 every `save_every`."""
    import jax

    # Ray's JaxBackend has called jax.distributed.initialize (with JAX's default timeouts) but no
    # backend exists yet, so the collectives choice still applies; gloo is also JAX's default.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import orbax.checkpoint as ocp
    import ray.train

    run = pathlib.Path(config["run"])
    rank = ray.train.get_context().get_world_rank()
    log = _Log(run / f"rank{rank}.jsonl")
    log("start", devices=jax.device_count(), processes=jax.process_count())
    job = _Job(config["steps"])
    checkpoint = ray.train.get_checkpoint()
    start = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            start = json.loads((pathlib.Path(directory) / "meta.json").read_text())["step"]
            job.restore(pathlib.Path(directory) / "state")
        log("restored", step=start, checkpoint=checkpoint.path)
    else:
        job.init()
        log("restored", step=0)
    checkpointer = ocp.StandardCheckpointer()
    save_every = config["save_every"]
    for step in range(start + 1, config["steps"] + 1):
        loss = job.step(step)
        log("step", step=step, loss=loss)
        if save_every and step % save_every == 0:
            # Every process writes its shards into the same folder (Orbax's multi-host layout);
            # the folder is named after the restored step too, so a retry never collides.
            folder = run / "orbax" / f"from{start}-step{step}"
            checkpointer.save(folder / "state", job.pure_state(), force=True)
            checkpointer.wait_until_finished()
            if rank == 0:
                (folder / "meta.json").write_text(json.dumps({"step": step}))
            ray.train.report({"step": step, "loss": loss},
                             checkpoint=ray.train.Checkpoint.from_directory(str(folder)) if rank == 0 else None)
            if config.get("commit_reports"):
                # Blocks until the controller has registered the report: only then is it the
                # checkpoint a restart restores (see ray_train's commit_reports).
                ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            log("reported", step=step)
    checkpointer.close()
    log("done")


def ray_train(work: pathlib.Path, *, steps: int, save_every: int, hosts: int = 2, fault: str | None = None,
              fault_step: int | None = None, recover_timeout_s: float = 120.0,
              max_failures: int = 3, commit_reports: bool = False) -> dict[str, Any]:
    """Ray Train v2's JaxTrainer on a local Ray started here (and shut down here), `hosts` workers of
    one CPU each. `fault` "kill" sends SIGKILL, "hang" SIGSTOP, to worker rank 1's process from this
    process once that worker has finished step `fault_step` (on a checkpoint step, once report() has
    returned on every rank). `max_failures` goes to FailureConfig. `commit_reports`: after each
    report, every worker waits for the controller to register it
    (get_all_reported_checkpoints(COMMITTED)); without it a checkpoint whose report() has returned is
    still lost if a worker dies before the controller's next poll (every 2 s) collects the report
    from every rank, since the report waits in the worker's in-memory result queue until then."""
    if fault not in FAULTS:
        raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
    if fault is not None and (fault_step is None or not 1 <= fault_step < steps):
        raise ValueError(f"fault {fault!r} needs a fault_step in 1..{steps - 1}, got {fault_step!r}")
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.v2.jax import JaxConfig, JaxTrainer

    run = pathlib.Path(work).resolve() / f"ray-{uuid.uuid4().hex[:8]}"
    run.mkdir(parents=True)
    injector = _Injector(run, fault, fault_step, save_every, hosts) if fault else None
    outcome: dict[str, Any] = {}
    session_dir = None
    t_init = time.time()
    ray.init(address="local", num_cpus=hosts, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        session_dir = ray._private.worker._global_node.get_session_dir_path()
        t_ready = time.time()
        trainer = JaxTrainer(
            _ray_worker,
            train_loop_config={"run": str(run), "steps": steps, "save_every": save_every,
                               "commit_reports": commit_reports},
            # use_gpu=True is what makes the backend call jax.distributed.initialize at all; with
            # JAX_PLATFORMS=cpu in the workers' environment it initialises the CPU platform.
            jax_config=JaxConfig(use_gpu=True),
            scaling_config=ScalingConfig(num_workers=hosts, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(
                name="peer", storage_path=str(run / "storage"),
                failure_config=FailureConfig(max_failures=max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                worker_runtime_env={"env_vars": _worker_env()},
            ),
        )

        def fit():
            try:
                outcome["result"] = trainer.fit()
            except BaseException as err:  # noqa: BLE001 - reported in the result
                outcome["error"] = err
            outcome["t_end"] = time.time()

        t_fit = time.time()
        thread = threading.Thread(target=fit, daemon=True, name="ray-train-fit")
        thread.start()
        if injector:
            injector.start()
        # A run that has not made a step within recover_timeout_s of the fault is abandoned (Ray is
        # shut down under it); so is any run past a generous overall bound.
        deadline = t_fit + 120.0 + 3.0 * steps + (recover_timeout_s if fault else 0.0)
        while thread.is_alive() and time.time() < deadline:
            thread.join(timeout=0.5)
            if injector and injector.t_fault and time.time() > injector.t_fault + recover_timeout_s:
                if not _stepped_since(run, injector.t_fault):
                    break
        abandoned = thread.is_alive()
    finally:
        if injector:
            injector.stop()
            injector.release()
        controller_log = _controller_events(session_dir)
        ray.shutdown()
        _kill_left_over(run)
    return {**_ray_result(run, t_init=t_init, t_ready=t_ready, t_fit=t_fit, outcome=outcome, abandoned=abandoned,
                          injector=injector, fault=fault, recover_timeout_s=recover_timeout_s,
                          controller_log=controller_log), "t_init": t_init}


class _Injector(threading.Thread):
    """Signals worker rank 1's process and notes the time, once rank 1 has finished step
    `fault_step`; on a checkpoint step, once report() has returned on every rank (the checkpoint has
    been passed to ray.train.report everywhere), so the fault tests whether a reported checkpoint
    survives."""

    def __init__(self, run: pathlib.Path, fault: str, fault_step: int, save_every: int | None, hosts: int):
        super().__init__(daemon=True, name="fault-injector")
        self.run_dir = run
        self.fault, self.fault_step = fault, fault_step
        reported = bool(save_every) and fault_step % save_every == 0
        self.wait_for = ("reported", tuple(range(hosts))) if reported else ("step", (1,))
        self.t_fault: float | None = None
        self.pid: int | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        event, ranks = self.wait_for
        pids: dict[int, int] = {}
        while not self._halt.wait(0.005):
            for rank in ranks:
                for r in _read(self.run_dir / f"rank{rank}.jsonl") if rank not in pids else []:
                    if r["event"] == event and r["step"] == self.fault_step:
                        pids[rank] = r["pid"]
            if len(pids) == len(ranks):
                self.pid = pids[1]
                os.kill(self.pid, signal.SIGKILL if self.fault == "kill" else signal.SIGSTOP)
                self.t_fault = time.time()
                return

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()

    def release(self) -> None:
        """A stopped process is let go (SIGCONT then SIGKILL) so that nothing stays behind, if it is
        still the same process (pids are reused)."""
        if self.fault == "hang" and self.pid is not None and self.t_fault is not None:
            _signal_if_same(self.pid, self.t_fault, signal.SIGCONT, signal.SIGKILL)


def _signal_if_same(pid: int, seen_at: float, *signals: int) -> None:
    """Sends `signals` to `pid` only if that process existed at time `seen_at` (not a later process
    that was given the same pid) and is not a zombie."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.create_time() > seen_at or proc.status() == psutil.STATUS_ZOMBIE:
            return
        for sig in signals:
            proc.send_signal(sig)
    except psutil.Error:
        pass


def _stepped_since(run: pathlib.Path, t: float) -> bool:
    """Whether rank 0 has finished a step in a worker started after time `t`."""
    records = _read(run / "rank0.jsonl")
    starts = [r["t"] for r in records if r["event"] == "start" and r["t"] > t]
    return bool(starts) and any(r["event"] == "step" and r["t"] > starts[0] for r in records)


def _kill_left_over(run: pathlib.Path) -> None:
    """Every worker process this run recorded is gone after ray.shutdown(); SIGKILL any that is not."""
    for path in run.glob("rank*.jsonl"):
        seen: dict[int, float] = {}
        for r in _read(path):
            seen[r["pid"]] = min(seen.get(r["pid"], r["t"]), r["t"])
        for pid, t in seen.items():
            _signal_if_same(pid, t, signal.SIGKILL)


def _controller_events(session_dir: str | None) -> list[tuple[float, str, str]]:
    """(time, source, message) of Ray Train's own structured logs (controller and workers), sorted."""
    if not session_dir:
        return []
    found = []
    for path in pathlib.Path(session_dir, "logs", "train").glob("ray-train-sys-*.log"):
        source = "controller" if "controller" in path.name else "ray-worker"
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                found.append((rec["timestamp_ns"] / 1e9, source, " ".join(str(rec["message"]).split())[:160]))
            except (ValueError, KeyError, TypeError):
                continue
    return sorted(found)


def _timeline(events: list[tuple[float, str, str]], records: list[dict[str, Any]], t0: float,
              t1: float) -> list[str]:
    """Ray Train's log lines and our workers' events (not steps) between t0 and t1, as
    "+seconds source: what"."""
    merged = [e for e in events if t0 <= e[0] <= t1]
    merged += [(r["t"], f"rank{r['rank']}", f"{r['event']} step={r.get('step')} pid={r['pid']}") for r in records
               if t0 <= r["t"] <= t1 and r["event"] != "step"]
    return [f"+{t - t0:6.2f} {src}: {msg}" for t, src, msg in sorted(merged)]


def _ray_result(run: pathlib.Path, *, t_init: float, t_ready: float, t_fit: float, outcome: dict[str, Any],
                abandoned: bool, injector: _Injector | None, fault: str | None, recover_timeout_s: float,
                controller_log: list[tuple[float, str, str]]) -> dict[str, Any]:
    ranks = [[{**r, "rank": rank} for r in _read(path)]
             for rank, path in enumerate(sorted(run.glob("rank*.jsonl"), key=lambda p: int(p.stem[4:])))]
    rank0 = ranks[0]
    notes = []
    steps_done = [r for r in rank0 if r["event"] == "step"]
    if not steps_done:
        raise RuntimeError(f"Ray Train run made no step: {outcome.get('error')!r}")
    first_start = next(r for r in rank0 if r["event"] == "start")
    first_init = next(r for r in rank0 if r["event"] == "restored")
    cold = {"ray_init_s": t_ready - t_init, "fit_to_train_fn_s": first_start["t"] - t_fit,
            "train_fn_to_state_ready_s": first_init["t"] - first_start["t"],
            "state_ready_to_first_step_s": steps_done[0]["t"] - first_init["t"]}
    t_fault = injector.t_fault if injector else None
    recovery_s = recovered = recomputed = survived = restored_from = last_reported = None
    timeline: list[str] = []
    if fault and t_fault is None:
        notes.append(f"the fault was never sent (rank 1 did not reach step {injector.fault_step})")
    elif fault:
        before = [r for r in steps_done if r["t"] <= t_fault]
        after_starts = [r for r in rank0 if r["event"] == "start" and r["t"] > t_fault]
        after_steps = [r for r in steps_done if after_starts and r["t"] > after_starts[0]["t"]]
        # A checkpoint counts as reported once report() has returned on every rank.
        returned = [{r["step"] for r in records if r["event"] == "reported" and r["t"] <= t_fault}
                    for records in ranks]
        last_reported = max(set.intersection(*returned), default=0)
        recovered = bool(after_steps) and after_steps[0]["t"] - t_fault <= recover_timeout_s
        t_end = after_steps[0]["t"] if after_steps else t_fault + recover_timeout_s
        timeline = _timeline(controller_log, [r for records in ranks for r in records], t_fault, t_end)
        if recovered:
            recovery_s = after_steps[0]["t"] - t_fault
            restored = [r for r in rank0 if r["event"] == "restored" and r["t"] > t_fault]
            restored_from = restored[0]["step"]
            recomputed = max(r["step"] for r in before) - restored_from
            survived = restored_from == last_reported
            if not survived:
                notes.append(f"the checkpoint of step {last_reported} was reported (report() returned on every "
                             f"rank) before the {fault}, but the restart restored step {restored_from}")
        else:
            notes.append(f"no step completed within {recover_timeout_s:.0f} s of the {fault}"
                         + ("; fit() abandoned and Ray shut down" if abandoned else ""))
    if fault and t_fault is not None and not timeline:
        notes.append(f"Ray Train logged nothing in the {recover_timeout_s:.0f} s after the {fault}")
    if "error" in outcome and not abandoned:
        notes.append(f"fit() raised {type(outcome['error']).__name__}: {' '.join(str(outcome['error']).split())[:300]}")
    final: dict[int, float] = {}
    for r in steps_done:  # a recomputed step keeps its last value
        final[r["step"]] = r["loss"]
    attempt0 = [r for r in steps_done if t_fault is None or r["t"] <= t_fault]
    return _result(
        cold_start_s=steps_done[0]["t"] - t_fit, cold_start_with_ray_s=steps_done[0]["t"] - t_init,
        recovery_s=recovery_s, recovered=recovered, steps_recomputed=recomputed,
        last_reported_checkpoint_survived=survived,
        # With a fault: the first attempt's steady state, up to the fault.
        steps_per_s=_steps_per_s(attempt0), final_step=max(final), losses=dict(sorted(final.items())),
        notes="; ".join(notes), run_dir=str(run), cold_start_breakdown=cold, last_reported_step=last_reported,
        restored_from=restored_from, recovery_timeline=timeline or None)

# ---- shared ---------------------------------------------------------------------------------------

def _read(path: pathlib.Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            continue
    return out


def _steps_per_s(steps_done: list[dict[str, Any]]) -> float | None:
    """Steady state: from the end of step 5 to the end of the last step (the final save comes after)."""
    later = [r for r in steps_done if r["step"] >= WARMUP_STEPS_EXCLUDED]
    if len(later) < 2 or later[-1]["t"] <= later[0]["t"]:
        return None
    return (later[-1]["step"] - later[0]["step"]) / (later[-1]["t"] - later[0]["t"])


RESULT_KEYS = ("cold_start_s", "cold_start_with_ray_s", "recovery_s", "recovered", "steps_recomputed",
               "last_reported_checkpoint_survived", "steps_per_s", "final_step", "losses", "notes")
"""Every result has these keys (None where they do not apply), then details: run_dir,
cold_start_breakdown, last_reported_step, restored_from, recovery_timeline."""


def _result(**fields: Any) -> dict[str, Any]:
    out = {key: fields.pop(key, None) for key in RESULT_KEYS}
    details = ("run_dir", "cold_start_breakdown", "last_reported_step", "restored_from", "recovery_timeline")
    return {**out, **{key: fields.pop(key, None) for key in details}, **fields}


def ray_train_fresh(work: pathlib.Path, **kwargs: Any) -> dict[str, Any]:
    """`ray_train` in a fresh Python process, timed from before that process starts, as jaxlaunch's
    launches and plain JAX's processes are: `cold_start_from_process_s` includes the interpreter's
    start and the imports of Ray, Ray Train and JAX (the in-process `cold_start_with_ray_s` starts
    after them)."""
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peers", "--ray-train",
                           json.dumps({"work": str(work), **kwargs})],
                          cwd=ROOT, capture_output=True, text=True, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"Ray Train's process exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    result = json.loads(lines[-1][len(_RESULT_MARK):])
    result["cold_start_from_process_s"] = result["t_init"] + result["cold_start_with_ray_s"] - started
    return result


_RESULT_MARK = "RAY_TRAIN_RESULT "


if __name__ == "__main__":
    if sys.argv[1] == "--ray-train":
        given = json.loads(sys.argv[2])
        print(_RESULT_MARK + json.dumps(ray_train(pathlib.Path(given.pop("work")), **given)), flush=True)
    else:
        _plain_process(json.loads(sys.argv[1]))
