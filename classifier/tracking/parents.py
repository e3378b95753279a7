"""Parent runs: one MLflow run that groups others, here a sweep and its trials.

The parent stays open (RUNNING) in the sweep's process while its trials run elsewhere;
each trial's training run names it in MLflow's own ``mlflow.parentRunId`` tag (see
``runs.training_run``), so the UI shows the sweep as one run with its trials under it.
A trial that failed before its training run opened (a bad combination of params, a
failed preprocess) gets a FAILED child here, so no trial is missing from MLflow.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from classifier.tracking import runs
from classifier.tracking.lineage import TAG_DVC_EXP_NAME, lineage_tags
from classifier.tracking.store import connect, reporting_errors

TAG_SWEEP = "sweep.name"
TAG_ROLE = "sweep.role"
TAG_TRIAL = "sweep.trial"
TAG_STATE = "sweep.state"
TAG_ERROR = "sweep.error"
TAG_REUSED = "sweep.reused_run"
# MLflow keeps a tag value to 5000 characters; an error line is far shorter.
MAX_TAG = 4000


@contextmanager
def parent_run(
    name: str, params: Mapping[str, Any], run_id: str | None = None
) -> Iterator[tuple[str, str]]:
    """Open the sweep's parent run (or reopen ``run_id``, resuming); yield (run id, experiment id).

    It ends FINISHED, KILLED on Ctrl-C or FAILED on an error, like a training run. It
    carries this process's host and pid, so if the sweep dies the next training run marks
    it KILLED, and resuming the sweep opens it again.
    """
    import mlflow

    experiment_id = connect()
    tags = {TAG_SWEEP: name, TAG_ROLE: "parent", **lineage_tags(), **runs.process_tags()}
    tags.pop(TAG_DVC_EXP_NAME, None)
    start_args: dict[str, Any] = (
        {"run_name": name, "tags": tags} if run_id is None else {"run_id": run_id}
    )
    with runs._run(**start_args) as opened:
        with reporting_errors():
            if run_id is None:
                mlflow.log_params(dict(params))
            else:
                mlflow.set_tags(tags)
        yield opened, experiment_id


def children(experiment_id: str, parent_id: str) -> dict[str, Any]:
    """The parent's child runs by name (the newest run of each name)."""
    import mlflow

    with reporting_errors():
        found = mlflow.MlflowClient().search_runs(
            [experiment_id],
            filter_string=f"tags.`{runs.TAG_PARENT_RUN}` = '{parent_id}'",
            order_by=["attributes.start_time ASC"],
            max_results=10_000,
        )
    return {run.info.run_name: run for run in found}


def failed_child(
    experiment_id: str, parent_id: str, name: str, params: Mapping[str, Any], error: str
) -> str:
    """Record trial ``name``, which failed before it opened a run, as a FAILED child."""
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    tags = {
        runs.TAG_PARENT_RUN: parent_id,
        TAG_DVC_EXP_NAME: name,
        TAG_STATE: "FAILED",
        TAG_ERROR: error[:MAX_TAG],
    }
    with reporting_errors():
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        batch = [Param(key, str(value)) for key, value in params.items()]
        client.log_batch(run.info.run_id, params=batch)
        client.set_terminated(run.info.run_id, "FAILED", end_time=int(time.time() * 1000))
    return run.info.run_id


def reused_child(experiment_id: str, parent_id: str, name: str, source_run_id: str) -> str:
    """Record trial ``name``, whose result DVC reused from run ``source_run_id`` (nothing it
    depends on changed, so nothing ran), as a FINISHED child with that run's params and
    final metrics, pointing to it."""
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient()
    source = runs.get_run(source_run_id)
    tags = {
        runs.TAG_PARENT_RUN: parent_id,
        TAG_DVC_EXP_NAME: name,
        TAG_REUSED: source_run_id,
        "mlflow.note.content": f"DVC reused the result of run {source_run_id}: nothing changed",
    }
    now = int(time.time() * 1000)
    with reporting_errors():
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        client.log_batch(
            run.info.run_id,
            params=[Param(key, value) for key, value in source.data.params.items()],
            metrics=[Metric(key, value, now, 0) for key, value in source.data.metrics.items()],
        )
        client.set_terminated(run.info.run_id, "FINISHED", end_time=now)
    return run.info.run_id


def tag_run(run_id: str, tags: Mapping[str, str]) -> None:
    """Add ``tags`` to another run (a trial's), leaving its status alone."""
    runs.FinishedRun(run_id).set_tags({key: str(value)[:MAX_TAG] for key, value in tags.items()})


def end_trial_run(run_id: str, status: str) -> None:
    """Mark a trial's run ``status`` (FAILED or KILLED) when the trial failed after its
    training finished (in evaluate, say): in a sweep the run stands for the whole trial."""
    import mlflow

    with reporting_errors():
        mlflow.MlflowClient().set_terminated(run_id, status)


def close_dead_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs left RUNNING by trials whose process is gone."""
    return runs.close_orphaned_runs(experiment_id)


def status(run_id: str) -> str:
    """A run's status now: RUNNING, FINISHED, FAILED or KILLED."""
    return runs.get_run(run_id).info.status
