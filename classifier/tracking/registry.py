"""The model registry: log the served model, register a version, move an alias, look one up.

Registration is two steps on purpose. :func:`log_served_model` stores the model's files
(and can fail: disk, network, a model that cannot be loaded); :func:`register_version`
then only creates the version and moves its alias, so a caller writes every other output
between the two and an export that fails registers nothing. Neither step reopens the
training run: its status stays FINISHED whatever happens here.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
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
# What every version says about the images it takes and the classes it answers with, so
# a challenger can be checked against the champion without loading it.
TAG_CLASSES = "model.classes"
TAG_INPUT = "model.input"
# What each version is and was trained on, for the registered model's description.
TAG_ARCHITECTURE = "model.architecture"
TAG_DATA = "data.source"
TAG_ACCURACY = "promotion.candidate_accuracy"  # the version's test accuracy (export's tag)
# The registered model's own tags: which version each alias points at.
ALIASES = ("champion", "challenger")
# Packages the served model needs, pinned to this environment's versions.
SERVED_REQUIREMENTS = (
    "mlflow", "keras", "tensorflow", "numpy", "pandas", "pillow", "onnxruntime", "ai-edge-litert",
)  # fmt: skip


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


@dataclass(frozen=True)
class ModelInterface:
    """What a model takes and gives: its classes, in output order, and its input images."""

    class_names: tuple[str, ...]
    input_shape: tuple[int, int, int]

    @property
    def input(self) -> str:
        return "x".join(str(size) for size in self.input_shape)

    def tags(self) -> dict[str, str]:
        return {TAG_CLASSES: json.dumps(list(self.class_names)), TAG_INPUT: self.input}

    def describe(self) -> str:
        names = list(self.class_names)
        shown = names if len(names) <= 12 else [*names[:12], "..."]
        return f"{len(names)} classes {shown} at {self.input}"

    def difference(self, other: ModelInterface) -> str | None:
        """Why a model of ``other`` cannot be scored against one of this; None if it can."""
        if self.class_names != other.class_names:
            if sorted(self.class_names) == sorted(other.class_names):
                return "the same classes in another order"
            return "other classes"
        if self.input_shape[2] != other.input_shape[2]:
            return "images of other channels"
        if self.input_shape != other.input_shape:
            return "images of another size"
        return None


def interface_of(version: Any) -> ModelInterface:
    """The interface a registered version records in its tags, else the one its model has."""
    tags = version.tags or {}
    if TAG_CLASSES in tags and TAG_INPUT in tags:
        shape = tuple(int(size) for size in tags[TAG_INPUT].split("x"))
        return ModelInterface(tuple(json.loads(tags[TAG_CLASSES])), shape)  # type: ignore[arg-type]
    # A version registered before the tags: ask the model itself.
    import mlflow

    with reporting_errors():
        model = mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")
    served = model.unwrap_python_model()
    return ModelInterface(tuple(served.class_names), tuple(served.shape))


@dataclass(frozen=True)
class LoggedModel:
    """A served model stored in the tracking server, not yet a version of any name."""

    model_id: str
    model_uri: str
    run_id: str
    interface: ModelInterface


def log_served_model(
    run_id: str,
    model_path: Path,
    labels_path: Path,
    resize: str,
    input_example: pd.DataFrame,
    interface: ModelInterface,
    extra_artifacts: Mapping[str, Path] | None = None,
) -> LoggedModel:
    """Store ``classifier.serving``'s pyfunc for the ``.keras`` file at ``model_path``.

    Built from code (no pickle), with the project modules it imports (:func:`serving_code`),
    the labels file, the ``resize`` policy and ``extra_artifacts`` (artifact key -> file:
    what classifier/serving/prepare.py made). ``input_example`` is a DataFrame of base64
    image files; its predictions make the output schema. The model is linked to the
    training run ``run_id``, which stays as it is.
    """
    import mlflow
    from mlflow.models import ModelSignature, infer_signature

    from classifier.serving import pyfunc as serving

    signature = ModelSignature(inputs=input_schema(), outputs=None)
    with tempfile.TemporaryDirectory() as scratch:
        # The resize policy travels as a file: MLflow would log a model_config as run params.
        preprocessing = Path(scratch) / serving.PREPROCESSING_FILE
        preprocessing.write_text(json.dumps({serving.RESIZE_KEY: resize}) + "\n")
        artifacts = {
            serving.KERAS_ARTIFACT: str(model_path),
            serving.LABELS_ARTIFACT: str(labels_path),
            serving.PREPROCESSING_ARTIFACT: str(preprocessing),
            **{key: str(path) for key, path in (extra_artifacts or {}).items()},
        }
        with reporting_errors(), warnings.catch_warnings():
            # class_index is never missing: MLflow's hint about integer columns does not apply.
            warnings.filterwarnings("ignore", "Hint: Inferred schema contains integer column")
            outputs = infer_signature(None, _predict_example(artifacts, input_example)).outputs
            signature = ModelSignature(inputs=signature.inputs, outputs=outputs)
            experiment_id = mlflow.MlflowClient().get_run(run_id).info.experiment_id
            logged = mlflow.initialize_logged_model(
                name=MODEL_ARTIFACT,
                source_run_id=run_id,
                experiment_id=experiment_id,
                tags=interface.tags(),
            )
            mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT,
                model_id=logged.model_id,
                python_model=module_path(SERVED_MODEL),
                code_paths=[str(serving_code(Path(scratch) / "code"))],
                artifacts=artifacts,
                signature=signature,
                input_example=input_example,
                pip_requirements=served_requirements(),
            )
    return LoggedModel(logged.model_id, f"models:/{logged.model_id}", run_id, interface)


def served_requirements() -> list[str]:
    """What the served model needs, pinned, rather than MLflow re-importing it to guess
    (slow)."""
    return [f"{package}=={importlib.metadata.version(package)}" for package in SERVED_REQUIREMENTS]


def input_schema() -> Any:
    """The model's input, named: ``image``, one value per image, of any type.

    The model takes a column of image files (PNG bytes, or base64 text from JSON) or a batch
    of pixel arrays, and checks what it gets itself (classifier/serving/pyfunc.py). A column
    schema can describe only one of the two, and MLflow would refuse the other before the
    model saw it; a tensor of objects, any shape (MLflow's ragged form), lets both pass,
    a batch of arrays under the name ``image``, and still names the input in the UI.
    """
    import numpy as np
    from mlflow.types.schema import Schema, TensorSpec

    from classifier.serving.pyfunc import IMAGE_COLUMN

    return Schema([TensorSpec(np.dtype(object), (-1,), IMAGE_COLUMN)])


def register_version(
    name: str,
    logged: LoggedModel,
    alias: str | None,
    tags: Mapping[str, str] | None = None,
    description: str | None = None,
) -> dict[str, str | int | None]:
    """Make ``logged`` a new version of ``name`` with ``tags``, and point ``alias`` at it
    (None: no alias moves).

    Returns name, version, alias, run id and model URI.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    with reporting_errors():
        try:
            client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name,
            source=logged.model_uri,
            run_id=logged.run_id,
            tags={**logged.interface.tags(), **(tags or {})},
            description=description,
            model_id=logged.model_id,
        )
        if alias is not None:
            client.set_registered_model_alias(name, alias, version.version)
        describe_registered_model(name, version)
    log.info(
        "registered %s version %s %s",
        name,
        version.version,
        "with no alias" if alias is None else f"as @{alias}",
    )
    return {
        "name": name,
        "version": int(version.version),
        "alias": alias,
        "run_id": logged.run_id,
        "model_uri": f"models:/{name}/{version.version}",
    }


def _version_line(version: Any, label: str) -> str:
    tags = version.tags or {}
    accuracy = tags.get(TAG_ACCURACY)
    shown = "" if accuracy is None else f", test accuracy {100 * float(accuracy):.1f} %"
    return (
        f"- {label}: version {version.version}, "
        f"`{tags.get(TAG_ARCHITECTURE, 'architecture not recorded')}`{shown}"
    )


def registered_model_description(name: str, newest: Any, aliased: Mapping[str, Any]) -> str:
    """The registered model's description: what it is, its aliases, how to serve it.

    ``newest`` is the version just registered; ``aliased`` maps each alias to its version.
    """
    interface = ModelInterface(
        tuple(json.loads(newest.tags[TAG_CLASSES])),
        tuple(int(size) for size in newest.tags[TAG_INPUT].split("x")),  # type: ignore[arg-type]
    )
    data = newest.tags.get(TAG_DATA, "data not recorded")
    lines = [
        f"An image classifier of {interface.describe()} (uint8 pixels, or image files), "
        f"trained on `{data}` by this project's DVC pipeline; its export stage registers "
        "every version and moves an alias only on evidence (docs/serving.md, "
        '"Promoting a model").',
        "",
    ]
    for alias in ALIASES:
        version = aliased.get(alias)
        lines.append(
            f"- `@{alias}`: none yet" if version is None else _version_line(version, f"`@{alias}`")
        )
    if not any(int(v.version) == int(newest.version) for v in aliased.values()):
        reason = (newest.tags or {}).get("promotion.reason", "")
        lines.append(_version_line(newest, "newest, with no alias") + f" ({reason})")
    lines += [
        "",
        "Serve the champion (each version's own page has its model card):",
        "",
        "```",
        f"make serve MODEL_NAME={name}",
        f"mlflow models serve -m models:/{name}@champion \\",
        "  --env-manager local",
        "```",
        "",
    ]
    return "\n".join(lines)


def describe_registered_model(name: str, newest: Any) -> None:
    """Write the registered model's description and tags after ``newest`` was registered."""
    import mlflow

    client = mlflow.MlflowClient()
    newest = client.get_model_version(name, newest.version)  # with the alias just set
    aliased = {alias: aliased_version(name, alias) for alias in ALIASES}
    aliased = {alias: version for alias, version in aliased.items() if version is not None}
    client.update_registered_model(name, registered_model_description(name, newest, aliased))
    tags = {
        TAG_CLASSES: newest.tags[TAG_CLASSES],
        TAG_INPUT: newest.tags[TAG_INPUT],
        **({TAG_DATA: newest.tags[TAG_DATA]} if TAG_DATA in newest.tags else {}),
        **{f"{alias}.version": str(version.version) for alias, version in aliased.items()},
    }
    for alias in ALIASES:
        if alias not in aliased:
            tags[f"{alias}.version"] = "none"
    for key, value in tags.items():
        client.set_registered_model_tag(name, key, value)


def _predict_example(artifacts: Mapping[str, str], input_example: pd.DataFrame) -> pd.DataFrame:
    """What the model to be logged returns for ``input_example``, to infer its output schema."""
    from mlflow.pyfunc import PythonModelContext

    from classifier.serving import pyfunc

    model = pyfunc.ImageClassifier()
    model.load_context(PythonModelContext(artifacts=dict(artifacts), model_config=None))
    return model.predict(None, input_example)


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


def versions_of(name: str) -> list[Any]:
    """Every version of the registered model ``name``, newest first; none if it does not exist."""
    import mlflow

    with reporting_errors():
        found = mlflow.MlflowClient().search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda version: int(version.version), reverse=True)


def version_model(name: str, version: int) -> Any:
    """Version ``version`` of ``name``, loaded as pyfunc."""
    import mlflow

    with reporting_errors():
        return mlflow.pyfunc.load_model(f"models:/{name}/{version}")


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
