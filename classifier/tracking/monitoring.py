"""Monitoring runs: what the served model's prediction log looked like, linked to its version.

Each ``python -m tools.monitor`` makes one FINISHED run in the experiment
``<experiment>-monitoring`` (beside the training runs, not among them) with the
comparison's figures and the HTML report. It is linked to the model version three ways:
tags on the run name the model, version and logged-model id; its metrics are logged
against that logged model (MLflow 3 shows them on the model's page); and the version gets
the tags ``monitor.last_run_id`` and ``monitor.drift``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from classifier.tracking.store import (
    MODEL_TRAINING,
    TAG_EXPERIMENT_KIND,
    _artifact_location,
    connect,
    experiment_name,
    reporting_errors,
    tracking_uri,
)

MONITORING_SUFFIX = "-monitoring"
TAG_KIND = "run.kind"
TAG_MODEL_NAME = "monitor.model_name"
TAG_MODEL_VERSION = "monitor.model_version"
TAG_MODEL_ID = "monitor.model_id"
TAG_LAST_RUN = "monitor.last_run_id"
TAG_DRIFT = "monitor.drift"
PYFUNC = "python_function"


def model_version(name: str, version: int) -> Any:
    """The registered version ``name`` ``version``; a TrackingError if there is none."""
    import mlflow

    connect()
    with reporting_errors():
        return mlflow.MlflowClient().get_model_version(name, str(version))


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a progress bar per download; a monitor in cron wants one line."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def served_artifacts(name: str, version: int, scratch: Path) -> dict[str, Path]:
    """The registered version's pyfunc artifacts (labels, serving statistics...), downloaded
    into ``scratch``: artifact key -> local file."""
    import mlflow
    from mlflow.models import Model

    connect()
    with reporting_errors(), _no_progress_bar():
        local = Path(
            mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(scratch))
        )
    artifacts = Model.load(str(local)).flavors.get(PYFUNC, {}).get("artifacts", {})
    return {key: local / entry["path"] for key, entry in artifacts.items()}


def logged_model_id(version: Any) -> str | None:
    """The MLflow 3 logged model a version was made from: its ``model_id``, or the id its
    source URI (``models:/m-...``) names."""
    found = getattr(version, "model_id", None)
    source = str(getattr(version, "source", "") or "")
    if not found and source.startswith("models:/m-"):
        found = source.removeprefix("models:/").split("/")[0]
    return found or None


def _experiment_id() -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    name = experiment_name() + MONITORING_SUFFIX
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, _artifact_location(tracking_uri()), tags={TAG_EXPERIMENT_KIND: MODEL_TRAINING}
        )
    except MlflowException:  # another monitor created it meanwhile
        return client.get_experiment_by_name(name).experiment_id


def log_monitoring_run(
    version: Any,
    metrics: Mapping[str, float],
    summary: Mapping[str, Any],
    report_path: Path,
    drift: bool,
) -> str:
    """One FINISHED monitoring run of ``version`` (a registered model version); its id."""
    import mlflow

    connect()
    tags = {
        TAG_KIND: "monitoring",
        TAG_MODEL_NAME: version.name,
        TAG_MODEL_VERSION: str(version.version),
        TAG_MODEL_ID: logged_model_id(version) or "",
        TAG_DRIFT: str(drift).lower(),
    }
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    with reporting_errors():
        experiment_id = _experiment_id()
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"monitor-{version.name}-v{version.version}-{stamp}",
            tags=tags,
        ) as run:
            mlflow.log_metrics(dict(metrics), model_id=logged_model_id(version))
            mlflow.log_artifact(str(report_path))
            with tempfile.TemporaryDirectory() as scratch:
                path = Path(scratch) / "monitor.json"
                path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
                mlflow.log_artifact(str(path))
        client = mlflow.MlflowClient()
        client.set_model_version_tag(version.name, version.version, TAG_LAST_RUN, run.info.run_id)
        client.set_model_version_tag(version.name, version.version, TAG_DRIFT, str(drift).lower())
    return run.info.run_id
