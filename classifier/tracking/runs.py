"""MLflow runs: open one for training, reopen it for later stages, log to it, close it.

A run always ends FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED; a run left RUNNING by a
process that died (SIGKILL) is marked KILLED by the next training run on the same host.
"""

from __future__ import annotations

import datetime
import logging
import os
import secrets
import socket
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classifier.tracking import description, names
from classifier.tracking.lineage import (
    LOCK_ARTIFACT,
    LOCK_ARTIFACT_DIR,
    TAG_DVC_EXP_NAME,
    lineage_tags,
    lock_entries,
    lock_record,
    lock_tags,
)
from classifier.tracking.store import (
    TrackingError,
    connect,
    describe,
    experiment_name,
    reporting_errors,
    root_cause,
    tracking_server,
    tracking_uri,
)

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

TAG_HOST = "process.host"
TAG_PID = "process.pid"
TAG_ORPHANED = "process.orphaned"
TAG_RESUMED = "train.resumed"
# MLflow's own tag: the UI shows the run under its parent (a sweep's trials).
TAG_PARENT_RUN = "mlflow.parentRunId"


# A store locked for a moment must not leave a failed run RUNNING: retry marking it.
END_RUN_RETRY_DELAYS_S = (1, 2, 4, 8)


def _end_run(run_id: str, status: str) -> None:
    """Mark the active run ``status``, retrying a store that refuses; warn if it never takes."""
    import time

    import mlflow

    try:
        mlflow.end_run(status)
        return
    except Exception as error:
        last_error = error
    # mlflow.end_run forgets the run before writing, so a retry must name it.
    for delay in END_RUN_RETRY_DELAYS_S:
        time.sleep(delay)
        try:
            mlflow.MlflowClient().set_terminated(run_id, status)
            return
        except Exception as error:
            last_error = error
    log.warning("could not mark MLflow run %s %s: %s", run_id, status, root_cause(last_error))


@contextmanager
def _run(**start_args: Any) -> Iterator[str]:
    """Start (or reopen) a run; end it FINISHED, KILLED on interrupt, or FAILED on error."""
    import mlflow

    with reporting_errors():
        run = mlflow.start_run(**start_args)
    try:
        yield run.info.run_id
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        _end_run(run.info.run_id, status)  # the original error matters more than its failure
        raise
    with reporting_errors():
        mlflow.end_run("FINISHED")


@contextmanager
def training_run(
    params: Mapping[str, Any], resume_run_id: str | None = None, parent_run_id: str | None = None
) -> Iterator[str]:
    """Open a new run with ``params`` and lineage tags (or reopen ``resume_run_id``); yield its id.

    With ``parent_run_id`` (a sweep's trial) the new run is that run's child in MLflow.

    The run ends FINISHED when the block succeeds, KILLED when it is interrupted (Ctrl-C,
    SIGTERM) and FAILED when it raises, so a failed stage never leaves a run RUNNING. Runs
    left RUNNING by a process that no longer exists (SIGKILL, power loss) are marked
    KILLED first.
    """
    import mlflow

    experiment_id = connect()
    close_orphaned_runs(experiment_id)
    tags = {**lineage_tags(), **process_tags()}
    if parent_run_id is not None:
        tags[TAG_PARENT_RUN] = parent_run_id
    if resume_run_id is None:
        name = tags.get(TAG_DVC_EXP_NAME) or run_name(str(params.get("data.source", "run")))
        what = description.what(params, experiment_name(), tags.get(TAG_DVC_EXP_NAME))
        tags[description.TAG_NOTE] = description.note(what, description.TRAINING)
        start_args: dict[str, Any] = {"run_name": name, "tags": tags}
    else:
        start_args = {"run_id": resume_run_id}
    with _run(**start_args) as run_id:
        with reporting_errors():
            if resume_run_id is None:
                mlflow.log_params(dict(params))
            else:
                mlflow.set_tags({**tags, TAG_RESUMED: "true"})
                FinishedRun(run_id).describe(description.TRAINING)
        log.info("MLflow run %s in %s", run_id, tracking_uri())
        try:
            yield run_id
        except BaseException as error:
            with suppress(Exception):  # the error matters more than its description
                FinishedRun(run_id).describe(description.failed("train", error))
            raise


def run_name(source: str, now: datetime.datetime | None = None) -> str:
    """A name that says what the run is and is not shared: ``digits-20261201-093012-4f2a``.

    The DVC experiment's name wins where there is one. MLflow's own random names repeat
    here: training seeds Python's random generator before MLflow draws one.
    """
    now = now or datetime.datetime.now()
    return f"{source}-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def set_tags(tags: Mapping[str, str]) -> None:
    """Set ``tags`` on the active run."""
    import mlflow

    with reporting_errors():
        mlflow.set_tags(dict(tags))


def process_tags() -> dict[str, str]:
    """Which process holds the run open, so a later one can tell if it died."""
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def close_orphaned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone; return their ids."""
    import mlflow

    client = mlflow.MlflowClient()
    host = socket.gethostname()
    closed = []
    with reporting_errors():
        running = client.search_runs(
            [experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000
        )
        for run in running:
            pid = run.data.tags.get(TAG_PID, "")
            if run.data.tags.get(TAG_HOST) != host or not pid.isdigit():
                continue
            if int(pid) != os.getpid() and not _process_alive(int(pid)):
                client.set_tag(run.info.run_id, TAG_ORPHANED, f"process {pid} ended, run open")
                client.set_terminated(run.info.run_id, "KILLED")
                closed.append(run.info.run_id)
                log.warning("run %s: its process %s is gone; marked KILLED", run.info.run_id, pid)
    return closed


def log_epoch(metrics: Mapping[str, float], epoch: int, wait: bool = True) -> Any:
    """Log one epoch's metrics in a single batched call (step = epoch number).

    With ``wait=False`` and a tracking server, the call returns at once and MLflow sends
    the metrics from its background thread; pass what it returns to ``finish_logging`` to
    wait and see errors. A local store (sqlite, files) is written at once, because that
    takes a few milliseconds while MLflow's background queue adds up to a second to
    ending the run; then this returns None.
    """
    import mlflow

    values = {key: float(value) for key, value in metrics.items()}
    with reporting_errors():
        return mlflow.log_metrics(values, step=epoch, synchronous=wait or not tracking_server())


def finish_logging(operations: Any) -> None:
    """Wait for an asynchronous ``log_epoch`` (not None); its failure is reported like any other.

    Each future's own error is raised, not ``RunOperations.wait``'s summary of them all,
    which would bury the store's message in a list.
    """
    with reporting_errors():
        for future in getattr(operations, "_operation_futures", None) or []:
            future.result()
        operations.wait()  # the public contract, should the futures move


def log_missing_epochs(rows: Sequence[Mapping[str, float]]) -> None:
    """Log the epochs of ``rows`` (Keras's logs, each with an ``epoch`` key) that the active
    run lacks, under MLflow's names (``val/loss``).

    A run logged before those names (its history under ``loss``) lacks them all: every
    checkpointed epoch is logged again under the new names, so its curves are whole.
    """
    import mlflow

    run_id = mlflow.active_run().info.run_id
    with reporting_errors():
        history = mlflow.MlflowClient().get_metric_history(run_id, names.TRAIN_LOSS)
    logged = {m.step for m in history}
    for row in rows:
        if int(row["epoch"]) not in logged:
            metrics = {
                names.epoch_metric(key): value for key, value in row.items() if key != "epoch"
            }
            log_epoch(metrics, epoch=int(row["epoch"]))


def describe_run(run_id: str, outcome: str) -> None:
    """Make ``outcome`` the second line of run ``run_id``'s description (how it ended)."""
    FinishedRun(run_id).describe(outcome)


def log_metrics(metrics: Mapping[str, float]) -> None:
    """Log final (step-less) metrics to the active run."""
    log_epoch(metrics, epoch=0)


def log_artifact(path: Path, artifact_dir: str | None = None) -> None:
    """Copy a file into the active run's artifacts."""
    import mlflow

    with reporting_errors():
        mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def log_artifacts(directory: Path, artifact_dir: str) -> None:
    """Copy a folder's contents into the active run's artifacts under ``artifact_dir``."""
    import mlflow

    with reporting_errors():
        mlflow.log_artifacts(str(directory), artifact_path=artifact_dir)


def log_dataset(
    images: np.ndarray, labels: np.ndarray, name: str, source: str, context: str
) -> str:
    """Record a dataset as an input of the active run (MLflow computes its digest)."""
    import mlflow
    import mlflow.data
    from mlflow.exceptions import MlflowException

    with reporting_errors(), warnings.catch_warnings():
        # A local path matches two registered source types that mean the same thing.
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        dataset = mlflow.data.from_numpy(images, targets=labels, name=name, source=source)
        try:
            mlflow.log_input(dataset, context=context)
        except MlflowException:
            # Another run logged the same dataset between MLflow's check and its insert;
            # now the check finds it, and this run is linked to it.
            mlflow.log_input(dataset, context=context)
    return dataset.digest


def log_figure(figure: Any, artifact_file: str) -> None:
    """Save a matplotlib figure as an image artifact of the active run."""
    import mlflow

    with reporting_errors():
        mlflow.log_figure(figure, artifact_file)


def finished_runs(experiment_id: str) -> list[Any]:
    """The FINISHED runs of ``experiment_id``, newest first."""
    import mlflow

    with reporting_errors():
        return mlflow.MlflowClient().search_runs(
            [experiment_id],
            filter_string="attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=10_000,
        )


def get_run(run_id: str) -> Any:
    """The run ``run_id``; a TrackingError naming it if the store has no such run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"MLflow store {tracking_uri()}: no run {run_id}") from None
        raise TrackingError(f"MLflow store {tracking_uri()}: {describe(error)}") from error


def artifact_table(run_id: str, path: str) -> pd.DataFrame:
    """The CSV artifact ``path`` of run ``run_id``; an empty table if the run has none."""
    import mlflow
    import pandas as pd

    folder = path.rpartition("/")[0] or None
    with reporting_errors():
        listed = {item.path for item in mlflow.MlflowClient().list_artifacts(run_id, folder)}
        if path not in listed:
            return pd.DataFrame()
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    return pd.read_csv(local, dtype={"class": str})


# The tag each later stage (evaluate, export) leaves on the training run: how it ended.
TAG_OUTCOME = "{stage}.outcome"
OUTCOME_FINISHED, OUTCOME_FAILED, OUTCOME_KILLED = "FINISHED", "FAILED", "KILLED"


@dataclass(frozen=True)
class FinishedRun:
    """A training run that a later stage adds to without reopening it.

    MLflow's fluent API would mark the run RUNNING again, then KILLED or FAILED when the
    later stage is interrupted or fails: a training run that finished must stay FINISHED.
    Every call here names the run instead, through the client.
    """

    run_id: str

    def _client(self) -> Any:
        import mlflow

        return mlflow.MlflowClient()

    def describe(self, outcome: str) -> None:
        """Make ``outcome`` the second line of the run's description; the first stays."""
        tags = get_run(self.run_id).data.tags
        first_line = description.first_line(tags.get(description.TAG_NOTE))
        self.set_tags({description.TAG_NOTE: description.note(first_line, outcome)})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            with reporting_errors():
                batch = [RunTag(key, str(value)) for key, value in tags.items()]
                self._client().log_batch(self.run_id, tags=batch)

    def log_metrics(self, metrics: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, 0) for key, value in metrics.items()]
        if batch:
            with reporting_errors():
                self._client().log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: Path, artifact_dir: str | None = None) -> None:
        with reporting_errors():
            self._client().log_artifact(self.run_id, str(path), artifact_dir)

    def log_artifacts(self, directory: Path, artifact_dir: str) -> None:
        with reporting_errors():
            self._client().log_artifacts(self.run_id, str(directory), artifact_dir)

    def record_lineage(
        self, lock_path: Path, stages: Sequence[str], model_path: Path
    ) -> dict[str, str]:
        """Tag the run with ``code.<stage>`` and ``data`` from ``lock_path`` (dvc.lock), and log
        the per-file md5s behind them as ``lineage/dvc_lock.json``; return the tags.

        Nothing when the lock does not describe the model at ``model_path`` (a stage run by
        hand): no tags rather than stale ones.
        """
        import json
        import tempfile

        entries = lock_entries(lock_path, stages, model_path)
        if not entries:
            return {}
        tags = lock_tags(entries)
        self.set_tags(tags)
        with tempfile.TemporaryDirectory() as scratch:
            path = Path(scratch) / LOCK_ARTIFACT
            path.write_text(json.dumps(lock_record(lock_path, entries), indent=2) + "\n")
            self.log_artifact(path, LOCK_ARTIFACT_DIR)
        return tags

    @contextmanager
    def stage(self, name: str) -> Iterator[FinishedRun]:
        """Record how stage ``name`` ended as a tag on the run, and leave its status alone."""
        tag = TAG_OUTCOME.format(stage=name)
        try:
            yield self
        except BaseException as error:
            outcome = OUTCOME_KILLED if isinstance(error, KeyboardInterrupt) else OUTCOME_FAILED
            with suppress(Exception):  # the stage's own error matters more than this one
                self.set_tags({tag: outcome})
            with suppress(Exception):
                self.describe(description.failed(name, error))
            raise
        self.set_tags({tag: OUTCOME_FINISHED})


def finished_run(run_id: str) -> FinishedRun:
    """The training run ``run_id`` of the pipeline's store, for a later stage to add to."""
    connect()
    get_run(run_id)  # a TrackingError naming it if the store has no such run
    return FinishedRun(run_id)
