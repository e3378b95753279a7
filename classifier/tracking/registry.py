"""The model registry: register a version with its alias, find what an alias points at."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from classifier.codebase import PROJECT_ROOT, module_path, project_files
from classifier.tracking.store import TrackingError, describe, reporting_errors, tracking_uri

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
# The file MLflow runs to build the registered model; it and what it imports are shipped.
SERVED_MODEL = "classifier.serving.served_model"


def serving_code(scratch: Path) -> Path:
    """A copy of the ``classifier`` package holding only what the served model imports.

    MLflow puts it on ``sys.path`` when it loads the model, so the model imports the code it
    was registered with, and nothing of training or tracking travels with it.
    """
    for relative in sorted(project_files([SERVED_MODEL])):
        target = scratch / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PROJECT_ROOT / relative, target)
    return scratch / "classifier"


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
        raise TrackingError(f"MLflow store {tracking_uri()}: {describe(error)}") from error


def _registered_model_exists(name: str) -> bool:
    """Whether the registry has a model ``name``; a refusal to say is a TrackingError."""
    import mlflow
    from mlflow.exceptions import MlflowException

    with reporting_errors():
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
    with reporting_errors():
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

    The logged model is ``classifier.serving``'s pyfunc, built from code (no pickle), with
    the project modules it imports (:func:`serving_code`), the ``.keras`` file at
    ``model_path``, the labels file and the ``resize`` policy. ``input_example`` is a
    DataFrame of base64 image files; its predictions make the output schema. ``tags`` go
    on the new version and on the run. Returns name, version, alias, run id and model URI.
    """
    import mlflow
    from mlflow.models import ModelSignature, infer_signature

    from classifier.serving import pyfunc as serving

    run = mlflow.active_run()
    if run is None:
        raise TrackingError("register_model needs an active run (use resumed_run)")
    # Pin what the model needs instead of letting MLflow re-import it to guess (slow).
    requirements = [
        f"{package}=={importlib.metadata.version(package)}"
        for package in ("mlflow", "keras", "tensorflow", "numpy", "pandas", "pillow")
    ]
    with tempfile.TemporaryDirectory() as scratch:
        # The resize policy travels as a file: MLflow would log a model_config as run params.
        preprocessing = Path(scratch) / serving.PREPROCESSING_FILE
        preprocessing.write_text(json.dumps({serving.RESIZE_KEY: resize}) + "\n")
        artifacts = {
            serving.KERAS_ARTIFACT: str(model_path),
            serving.LABELS_ARTIFACT: str(labels_path),
            serving.PREPROCESSING_ARTIFACT: str(preprocessing),
        }
        with reporting_errors(), warnings.catch_warnings():
            # class_index is never missing: MLflow's hint about integer columns does not apply.
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column")
            # No input schema: the model takes pixel arrays or a column of image files, and
            # checks what it gets itself (an input schema can describe only one of the two).
            outputs = infer_signature(None, _predict_example(artifacts, input_example)).outputs
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                python_model=module_path(SERVED_MODEL),
                code_paths=[str(serving_code(Path(scratch) / "code"))],
                artifacts=artifacts,
                signature=ModelSignature(inputs=None, outputs=outputs),
                input_example=input_example,
                pip_requirements=requirements,
                registered_model_name=name,
            )
    with reporting_errors():
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

    from classifier.serving import pyfunc

    model = pyfunc.ImageClassifier()
    model.load_context(PythonModelContext(artifacts=dict(artifacts), model_config=None))
    return model.predict(None, input_example)


def newest_version_of_run(run_id: str) -> tuple[str, Any] | None:
    """The newest version registered from ``run_id``: ("name vN @aliases", its pyfunc)."""
    import mlflow

    with reporting_errors():
        versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
        if not versions:
            return None
        newest = max(versions, key=lambda v: int(v.version))
        model = mlflow.pyfunc.load_model(f"models:/{newest.name}/{newest.version}")
    aliases = "".join(f" @{alias}" for alias in newest.aliases)
    return f"{newest.name} v{newest.version}{aliases}", model
