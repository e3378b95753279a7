"""The only module that talks to MLflow: where the store is, which experiment, which tags.

The store is ``MLFLOW_TRACKING_URI`` when set (a tracking server, say), else a sqlite
database ``mlflow.db`` at the project root (also for ``dvc exp run --temp`` and queued
experiments, which run in a temporary copy), with artifacts beside it in ``mlartifacts/``.
The experiment is ``MLFLOW_EXPERIMENT_NAME`` or ``image-classification``. MLflow is
imported lazily so stages that never track start fast.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.errors import StageError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "image-classification"
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
MODEL_ARTIFACT = "model"
# Tracking URIs of a server reached over the network: there epoch metrics are sent
# asynchronously (see log_epoch).
REMOTE_SCHEMES = ("http", "https", "databricks")

# Tag names. MLflow's own tag makes the UI link the run to its commit.
TAG_GIT_COMMIT = "mlflow.source.git.commit"
TAG_GIT_DIRTY = "git.dirty"
TAG_DVC_EXP_NAME = "dvc.exp_name"
TAG_DVC_BASELINE = "dvc.exp_baseline_rev"
TAG_HOST = "process.host"
TAG_PID = "process.pid"
TAG_ORPHANED = "process.orphaned"
TAG_RESUMED = "train.resumed"


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
def _reporting_mlflow_errors() -> Iterator[None]:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (MlflowException, SQLAlchemyError) as error:
        # SQLAlchemyError: MLflow lets it out as is where it opens a sqlite store.
        raise TrackingError(f"MLflow store {tracking_uri()}: {_describe(error)}") from error


def _describe(error: BaseException) -> str:
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
        return f"permission denied for user {user!r}: {_root_cause(error)}"
    return _root_cause(error)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause: MLflow and SQLAlchemy wrap the telling one."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


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
    log.warning("could not mark MLflow run %s %s: %s", run_id, status, _root_cause(last_error))


def connect() -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    # TrackingError says what went wrong in one line; MLflow would add a traceback.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    mlflow.set_tracking_uri(uri)
    name = experiment_name()
    with _reporting_mlflow_errors():
        client = mlflow.MlflowClient()
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(name, _artifact_location(uri))
            except MlflowException:
                # Another run created it between our lookup and create.
                experiment_id = client.get_experiment_by_name(name).experiment_id
        else:
            experiment_id = experiment.experiment_id
        mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def lineage_tags() -> dict[str, str]:
    """Tags tying a run to its code (git) and its DVC experiment, where there is one."""
    tags: dict[str, str] = {}
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        status = _git("status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags[TAG_GIT_DIRTY] = str(bool(status)).lower()
    # DVC sets these while running `dvc exp run`.
    for variable, tag in (
        ("DVC_EXP_NAME", TAG_DVC_EXP_NAME),
        ("DVC_EXP_BASELINE_REV", TAG_DVC_BASELINE),
    ):
        if os.environ.get(variable):
            tags[tag] = os.environ[variable]
    return tags


@contextmanager
def _run(**start_args: Any) -> Iterator[str]:
    """Start (or reopen) a run; end it FINISHED, KILLED on interrupt, or FAILED on error."""
    import mlflow

    with _reporting_mlflow_errors():
        run = mlflow.start_run(**start_args)
    try:
        yield run.info.run_id
    except BaseException as error:
        status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
        _end_run(run.info.run_id, status)  # the original error matters more than its failure
        raise
    with _reporting_mlflow_errors():
        mlflow.end_run("FINISHED")


@contextmanager
def training_run(params: Mapping[str, Any], resume_run_id: str | None = None) -> Iterator[str]:
    """Open a new run with ``params`` and lineage tags (or reopen ``resume_run_id``); yield its id.

    The run ends FINISHED when the block succeeds, KILLED when it is interrupted (Ctrl-C,
    SIGTERM) and FAILED when it raises, so a failed stage never leaves a run RUNNING. Runs
    left RUNNING by a process that no longer exists (SIGKILL, power loss) are marked
    KILLED first.
    """
    import mlflow

    experiment_id = connect()
    close_orphaned_runs(experiment_id)
    tags = {**lineage_tags(), **process_tags()}
    if resume_run_id is None:
        start_args: dict[str, Any] = {"run_name": tags.get(TAG_DVC_EXP_NAME), "tags": tags}
    else:
        start_args = {"run_id": resume_run_id}
    with _run(**start_args) as run_id:
        with _reporting_mlflow_errors():
            if resume_run_id is None:
                mlflow.log_params(dict(params))
            else:
                mlflow.set_tags({**tags, TAG_RESUMED: "true"})
        log.info("MLflow run %s in %s", run_id, tracking_uri())
        yield run_id


def dvc_lock_tags(lock_path: Path, stage: str, model_path: Path) -> dict[str, str]:
    """Tags naming the hashes ``dvc.lock`` records for ``stage``'s deps and outs.

    Only when the lock describes the model at ``model_path`` (its md5 matches), which holds
    while ``dvc repro`` or ``dvc exp run`` runs the pipeline: DVC writes each stage's entry
    as soon as the stage ends. A stage run by hand gets none, rather than stale ones.
    """
    import hashlib

    import yaml

    try:
        entry = yaml.safe_load(Path(lock_path).read_text())["stages"][stage]
        files = [("dep", item) for item in entry.get("deps", [])]
        files += [("out", item) for item in entry.get("outs", [])]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    hashes = {
        f"dvc.{stage}.{kind}.{item['path']}": item["md5"]
        for kind, item in files
        if isinstance(item, dict) and "md5" in item
    }
    model_key = f"dvc.{stage}.out.{Path(model_path).as_posix()}"
    try:
        model_md5 = hashlib.md5(Path(model_path).read_bytes()).hexdigest()
    except OSError:
        return {}
    if hashes.get(model_key) != model_md5:
        log.info("%s does not describe %s: no data hashes tagged", lock_path, model_path)
        return {}
    return hashes


def set_tags(tags: Mapping[str, str]) -> None:
    """Set ``tags`` on the active run."""
    import mlflow

    with _reporting_mlflow_errors():
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
    with _reporting_mlflow_errors():
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


@contextmanager
def resumed_run(run_id: str) -> Iterator[str]:
    """Reopen the training run ``run_id`` so a later stage can add to it."""
    import mlflow

    connect()
    with _run(run_id=run_id):
        with _reporting_mlflow_errors():
            mlflow.set_tags(process_tags())  # this process holds it open now
        yield run_id


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
    with _reporting_mlflow_errors():
        return mlflow.log_metrics(values, step=epoch, synchronous=wait or not tracking_server())


def tracking_server() -> bool:
    """Whether the pipeline logs to a server over the network, not to a local store."""
    return tracking_uri().partition(":")[0].lower() in REMOTE_SCHEMES


def finish_logging(operations: Any) -> None:
    """Wait for an asynchronous ``log_epoch`` (not None); its failure is reported like any other.

    Each future's own error is raised, not ``RunOperations.wait``'s summary of them all,
    which would bury the store's message in a list.
    """
    with _reporting_mlflow_errors():
        for future in getattr(operations, "_operation_futures", None) or []:
            future.result()
        operations.wait()  # the public contract, should the futures move


def log_missing_epochs(rows: Sequence[Mapping[str, float]]) -> None:
    """Log the epochs of ``rows`` (each with an ``epoch`` key) that the active run lacks."""
    import mlflow

    run_id = mlflow.active_run().info.run_id
    with _reporting_mlflow_errors():
        logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "loss")}
    for row in rows:
        if int(row["epoch"]) not in logged:
            metrics = {key: value for key, value in row.items() if key != "epoch"}
            log_epoch(metrics, epoch=int(row["epoch"]))


def log_metrics(metrics: Mapping[str, float]) -> None:
    """Log final (step-less) metrics to the active run."""
    log_epoch(metrics, epoch=0)


def log_artifact(path: Path, artifact_dir: str | None = None) -> None:
    """Copy a file into the active run's artifacts."""
    import mlflow

    with _reporting_mlflow_errors():
        mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def log_artifacts(directory: Path, artifact_dir: str) -> None:
    """Copy a folder's contents into the active run's artifacts under ``artifact_dir``."""
    import mlflow

    with _reporting_mlflow_errors():
        mlflow.log_artifacts(str(directory), artifact_path=artifact_dir)


def log_dataset(
    images: np.ndarray, labels: np.ndarray, name: str, source: str, context: str
) -> str:
    """Record a dataset as an input of the active run (MLflow computes its digest)."""
    import mlflow
    import mlflow.data
    from mlflow.exceptions import MlflowException

    with _reporting_mlflow_errors(), warnings.catch_warnings():
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

    with _reporting_mlflow_errors():
        mlflow.log_figure(figure, artifact_file)


def alias_run_id(name: str, alias: str) -> str | None:
    """The run that made the version ``alias`` points at; None if there is none."""
    found = aliased_version(name, alias)
    return None if found is None else found.run_id


def aliased_version(name: str, alias: str) -> Any | None:
    """The model version ``name@alias``; None if the model or the alias does not exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        missing_model = error.error_code == "RESOURCE_DOES_NOT_EXIST"
        missing_alias = error.error_code == "INVALID_PARAMETER_VALUE" and "alias" in error.message
        if missing_model or missing_alias:
            return None
        # MLflow's basic auth answers 403, not 404, to a user who is not an admin asking
        # for an alias of a model that does not exist yet; asking for the model says 404.
        if error.error_code == "PERMISSION_DENIED" and not _registered_model_exists(name):
            return None
        raise TrackingError(f"MLflow store {tracking_uri()}: {_describe(error)}") from error


def _registered_model_exists(name: str) -> bool:
    """Whether the registry has a model ``name``; a refusal to say is a TrackingError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with _reporting_mlflow_errors():
        try:
            mlflow.MlflowClient().get_registered_model(name)
        except MlflowException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
    return True


def aliased_model(name: str, alias: str) -> tuple[int, Any] | None:
    """The version of ``name`` that ``alias`` points at, loaded as pyfunc; None if none does."""
    import mlflow

    version = aliased_version(name, alias)
    if version is None:
        return None
    with _reporting_mlflow_errors():
        return int(version.version), mlflow.pyfunc.load_model(f"models:/{name}@{alias}")


def register_model(
    model_path: Path,
    labels_path: Path,
    resize: str,
    name: str,
    alias: str,
    input_example: pd.DataFrame,
    tags: Mapping[str, str] | None = None,
) -> dict[str, str | int]:
    """Log the image model to the active run, register a version of ``name``, alias it.

    The logged model is stages/serving.py's pyfunc, built from code (no pickle) with the
    ``stages`` package beside it, the ``.keras`` file at ``model_path``, the labels file and
    the ``resize`` policy. ``input_example`` is a DataFrame of base64 image files; its
    predictions make the output schema. ``tags`` go on the new version and on the run.
    Returns name, version, alias, run id and model URI.
    """
    import importlib.metadata

    import mlflow
    from mlflow.models import ModelSignature, infer_signature

    from stages import serving

    run = mlflow.active_run()
    if run is None:
        raise TrackingError("register_model needs an active run (use resumed_run)")
    # Pin what the model needs instead of letting MLflow re-import it to guess (slow).
    requirements = [
        f"{package}=={importlib.metadata.version(package)}"
        for package in ("mlflow", "keras", "tensorflow", "numpy", "pandas", "pillow")
    ]
    stages_dir = Path(serving.__file__).parent
    with tempfile.TemporaryDirectory() as scratch:
        # The resize policy travels as a file: MLflow would log a model_config as run params.
        preprocessing = Path(scratch) / serving.PREPROCESSING_FILE
        preprocessing.write_text(json.dumps({serving.RESIZE_KEY: resize}) + "\n")
        artifacts = {
            serving.KERAS_ARTIFACT: str(model_path),
            serving.LABELS_ARTIFACT: str(labels_path),
            serving.PREPROCESSING_ARTIFACT: str(preprocessing),
        }
        with _reporting_mlflow_errors(), warnings.catch_warnings():
            # class_index is never missing: MLflow's hint about integer columns does not apply.
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column")
            # No input schema: the model takes pixel arrays or a column of image files, and
            # checks what it gets itself (an input schema can describe only one of the two).
            outputs = infer_signature(None, _predict_example(artifacts, input_example)).outputs
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=stages_dir / "served_model.py",
                code_paths=[str(stages_dir)],
                artifacts=artifacts,
                signature=ModelSignature(inputs=None, outputs=outputs),
                input_example=input_example,
                pip_requirements=requirements,
                registered_model_name=name,
            )
    with _reporting_mlflow_errors():
        version = int(info.registered_model_version)
        client = mlflow.MlflowClient()
        for key, value in (tags or {}).items():
            client.set_model_version_tag(name, str(version), key, value)
        mlflow.set_tags(dict(tags or {}))
        client.set_registered_model_alias(name, alias, str(version))
    log.info("registered %s version %s as @%s", name, version, alias)
    return {
        "name": name,
        "version": version,
        "alias": alias,
        "run_id": run.info.run_id,
        "model_uri": f"models:/{name}/{version}",
    }


def _predict_example(artifacts: Mapping[str, str], input_example: pd.DataFrame) -> pd.DataFrame:
    """What the model to be logged returns for ``input_example``, to infer its output schema."""
    from mlflow.pyfunc import PythonModelContext

    from stages import serving

    classifier = serving.ImageClassifier()
    classifier.load_context(PythonModelContext(artifacts=dict(artifacts), model_config=None))
    return classifier.predict(None, input_example)


def read_run_id(run_info_path: Path) -> str:
    """The MLflow run id that the train stage recorded in ``run_info_path``."""
    import json

    try:
        run_id = json.loads(Path(run_info_path).read_text())["run_id"]
    except FileNotFoundError:
        raise StageError(f"{run_info_path}: missing; run the train stage first") from None
    except (ValueError, KeyError, TypeError):
        raise StageError(f"{run_info_path}: expected JSON with a run_id") from None
    if not isinstance(run_id, str) or not run_id:
        raise StageError(f"{run_info_path}: run_id must be a non-empty string")
    return run_id
