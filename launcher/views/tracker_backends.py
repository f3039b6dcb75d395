"""The experiment trackers themselves (MLflow, Weights & Biases) behind one small interface, which
`jaxlaunch.launcher.views.trackers` feeds: open a run (a new one or a run to continue), log its params, its
metric records and its tags and notes, finish it."""

from __future__ import annotations

import getpass
import os
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from jaxlaunch.launcher.records.runs import RunDir

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from wandb.sdk.wandb_run import Run as WandbRun

_SKIP = ("step", "time")


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a metric record, under the names TensorBoard shows them ("train/loss")."""
    return {f"train/{k}": float(v) for k, v in record.items()
            if k not in _SKIP and isinstance(v, int | float) and not isinstance(v, bool)}


class Backend(Protocol):
    name: str

    def new_id(self) -> str | None:
        """The id for a new run, if the client chooses it (None: the tracker's server does)."""

    def start(self, run_id: str | None, name: str) -> str:
        """Opens the run `run_id` (None: a new one); returns its id."""

    def log_params(self, params: dict[str, str]) -> None: ...
    def log(self, records: list[dict[str, Any]]) -> None: ...
    def annotate(self, tags: dict[str, str], notes: str) -> None: ...
    def finish(self, status: str) -> None: ...


class Mlflow:
    """An MLflow run through `MlflowClient` (MLFLOW_TRACKING_URI; the experiment from
    MLFLOW_EXPERIMENT_ID or MLFLOW_EXPERIMENT_NAME, else the default one)."""

    name = "mlflow"
    MAX_METRICS_PER_BATCH = 1000
    MAX_ITEMS_PER_BATCH = 100
    _FINAL = {"finished": "FINISHED", "failed": "FAILED"}

    def __init__(self) -> None:
        self.started: tuple[MlflowClient, str] | None = None
        """The client and the run's id, once `start` opened the run."""

    def _run(self) -> tuple[MlflowClient, str]:
        assert self.started is not None, "the Sender starts a tracker's run before it logs to it"
        return self.started

    def new_id(self) -> str | None:
        return None

    def start(self, run_id: str | None, name: str) -> str:
        from mlflow import MlflowClient

        client = MlflowClient()
        if run_id is not None:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
        else:
            run_id = client.create_run(self._experiment_id(client), run_name=name, tags={
                "mlflow.user": getpass.getuser(), "mlflow.source.type": "JOB"}).info.run_id
        self.started = (client, run_id)
        return run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        client, run_id = self._run()
        items = [Param(k[:250], v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), self.MAX_ITEMS_PER_BATCH):
            client.log_batch(run_id, params=items[i:i + self.MAX_ITEMS_PER_BATCH])

    @staticmethod
    def _experiment_id(client: MlflowClient) -> str:
        if os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
        if not name:
            return "0"
        found = client.get_experiment_by_name(name)
        return found.experiment_id if found is not None else client.create_experiment(name)

    def log(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        client, run_id = self._run()
        points = [Metric(key, value, int(r.get("time", time.time()) * 1000), r["step"])
                  for r in records for key, value in scalars(r).items()]
        for i in range(0, len(points), self.MAX_METRICS_PER_BATCH):
            client.log_batch(run_id, metrics=points[i:i + self.MAX_METRICS_PER_BATCH])

    def annotate(self, tags: dict[str, str], notes: str) -> None:
        from mlflow.entities import RunTag

        client, run_id = self._run()
        items = [RunTag(k, v) for k, v in tags.items()] + [RunTag("mlflow.note.content", notes)]
        for i in range(0, len(items), self.MAX_ITEMS_PER_BATCH):
            client.log_batch(run_id, tags=items[i:i + self.MAX_ITEMS_PER_BATCH])

    def finish(self, status: str) -> None:
        client, run_id = self._run()
        client.set_terminated(run_id, self._FINAL.get(status, "KILLED"))


class Wandb:
    """A W&B run (WANDB_PROJECT, default "jaxlaunch"; WANDB_MODE, WANDB_ENTITY, WANDB_API_KEY; its
    local files in the run directory's wandb/ unless WANDB_DIR says otherwise). The driver's console
    and machine are not the training's: W&B captures neither."""

    name = "wandb"

    def __init__(self, directory: str):
        self.directory = directory
        self.started: WandbRun | None = None

    def _run(self) -> WandbRun:
        assert self.started is not None, "the Sender starts a tracker's run before it logs to it"
        return self.started

    def new_id(self) -> str | None:
        return uuid.uuid4().hex[:16]

    def start(self, run_id: str | None, name: str) -> str:
        import wandb

        os.makedirs(self.directory, exist_ok=True)
        self.started = wandb.init(
            id=run_id, resume="allow", name=name, project=None if os.environ.get("WANDB_PROJECT") else "jaxlaunch",
            dir=None if os.environ.get("WANDB_DIR") else self.directory, reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True))
        return self.started.id

    def log_params(self, params: dict[str, str]) -> None:
        self._run().config.update(_nested(params), allow_val_change=True)

    def log(self, records: list[dict[str, Any]]) -> None:
        run = self._run()
        for record in records:
            run.log(scalars(record), step=record["step"])

    def annotate(self, tags: dict[str, str], notes: str) -> None:
        run = self._run()
        run.notes = notes
        run.summary.update({k.replace(".", "/"): v for k, v in tags.items()})

    def finish(self, status: str) -> None:
        run = self._run()
        if status == "stopped":
            run.mark_preempting()  # a stopped run continues with --resume
        run.finish(exit_code=0 if status == "finished" else 1)


def _nested(params: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return out


def new_backend(name: str, run: RunDir) -> Backend:
    return Mlflow() if name == "mlflow" else Wandb(str(run.local_dir))
