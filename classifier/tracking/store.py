"""Where the MLflow store is and which experiment runs go to; MLflow errors as one line.

The store is ``MLFLOW_TRACKING_URI`` when set (a tracking server, say), else a sqlite
database ``mlflow.db`` at the project root (also for ``dvc exp run --temp`` and queued
experiments, which run in a temporary copy), with artifacts beside it in ``mlartifacts/``.
The experiment is ``MLFLOW_EXPERIMENT_NAME`` or ``image-classification``. MLflow is
imported lazily so stages that never track start fast.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from classifier.errors import StageError

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "image-classification"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
# Tracking URIs of a server reached over the network: there epoch metrics are sent
# asynchronously (see runs.log_epoch).
REMOTE_SCHEMES = ("http", "https", "databricks")
# MLflow 3's UI opens an experiment by its kind: model training shows the runs, not traces.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# How long a tracking server may take to answer at all before the pipeline gives up.
REACHABLE_TIMEOUT_S = 10


class TrackingError(StageError):
    """The MLflow store could not be reached or refused a request."""


# `dvc exp run --temp` and queued experiments run in a copy of the repository here.
DVC_TEMP_COPIES = (".dvc", "tmp", "exps")


def project_root() -> Path:
    """The working directory, or the repository that DVC's temporary experiment copy is of.

    The default store must be the project's own: a store inside a temporary copy would
    vanish with it, taking the experiment's run along.
    """
    here = Path.cwd().resolve()
    parts = here.parts
    for start in range(len(parts) - len(DVC_TEMP_COPIES)):
        if parts[start : start + len(DVC_TEMP_COPIES)] == DVC_TEMP_COPIES:
            return Path(*parts[:start])
    return here


def tracking_uri() -> str:
    """The MLflow tracking URI the pipeline logs to."""
    configured = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if configured:
        return configured
    return f"sqlite:///{project_root() / STORE_FILE}"


def experiment_name() -> str:
    """The MLflow experiment every run of the pipeline goes to."""
    return os.environ.get("MLFLOW_EXPERIMENT_NAME", "").strip() or DEFAULT_EXPERIMENT


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local sqlite store live beside it; a server chooses its own."""
    if uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        return (database.parent / ARTIFACTS_DIR).resolve().as_uri()
    return None


@contextmanager
def reporting_errors() -> Iterator[None]:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError) as error:
        # SQLAlchemyError: MLflow lets it out as is where it opens a sqlite store.
        raise TrackingError(f"MLflow store {tracking_uri()}: {describe(error)}") from error


def describe(error: BaseException) -> str:
    """``_root_cause``, but a server's refusal says whose login it was and what to check."""
    from mlflow.exceptions import MlflowException

    status = error.get_http_status_code() if isinstance(error, MlflowException) else None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "").strip()
    if status == 401:
        who = f"user {user!r}" if user else "MLFLOW_TRACKING_USERNAME is not set"
        return (
            f"authentication failed ({who}); check MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD"
        )
    if status == 403:
        return f"permission denied for user {user!r}: {root_cause(error)}"
    return root_cause(error)


def root_cause(error: BaseException) -> str:
    """The first line of the innermost cause: MLflow and SQLAlchemy wrap the telling one."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def connect() -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    # TrackingError says what went wrong in one line; MLflow would add a traceback.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    check_reachable(uri)
    with reporting_errors():
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(
                    name, _artifact_location(uri), tags={TAG_EXPERIMENT_KIND: MODEL_TRAINING}
                )
            except MlflowException:
                # Another run created it between our lookup and create.
                experiment_id = client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
            if TAG_EXPERIMENT_KIND not in experiment.tags:
                _mark_model_training(client, experiment_id)
        mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _mark_model_training(client: Any, experiment_id: str) -> None:
    """Tag an experiment made before the kind was set; a user without the right may not."""
    from mlflow.exceptions import MlflowException

    try:
        client.set_experiment_tag(experiment_id, TAG_EXPERIMENT_KIND, MODEL_TRAINING)
    except MlflowException as error:
        log.info("left experiment %s untagged: %s", experiment_id, root_cause(error))


def check_reachable(uri: str) -> None:
    """Fail in seconds, naming ``uri``, when a tracking server does not answer at all.

    MLflow itself retries a refused connection for minutes (with backoff), which is right
    for a server that blinks mid-run but not for one that is down or mistyped.
    """
    scheme = uri.partition(":")[0].lower()
    if scheme not in ("http", "https"):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=REACHABLE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # it answered: auth and the rest are MLflow's to report
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise TrackingError(
            f"MLflow store {uri}: the tracking server does not answer ({reason}); "
            "is it running, and is MLFLOW_TRACKING_URI right?"
        ) from None


def tracking_server() -> bool:
    """Whether the pipeline logs to a server over the network, not to a local store."""
    return tracking_uri().partition(":")[0].lower() in REMOTE_SCHEMES
