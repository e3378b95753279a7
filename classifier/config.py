"""Typed, validated params.yaml: every stage reads its numbers from here, loaded once.

An unknown, missing, mistyped or out-of-range key stops the stage with one line that
names the file and the dotted key, e.g. ``params.yaml: train.epochs: must be >= 1, got 0``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from classifier.errors import ParamsError

DEFAULT_PARAMS_PATH = Path("params.yaml")


class _Section(BaseModel):
    # strict: YAML already gives types, so "10" for an int or true for a number is a typo.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


SOURCES_WITH_PATH = ("idx_dir", "folder", "archive", "csv")
PRETRAINED_CHOICES = ("none", "imagenet")
BACKBONE_ARCHITECTURES = ("mobilenet_v3_small", "efficientnet_v2_b0")
PRETRAINED_DIR = "pretrained/"
MIRROR_SCHEMES = ("https://", "http://", "file://")


class DataParams(_Section):
    """Where the raw images come from (stage ``download``)."""

    source: Literal["digits", "mnist", "fashion_mnist", "idx_dir", "folder", "archive", "csv"]
    path: str | None
    mirrors: list[str]
    # folder, archive: auto reads train/ and test/ (and val/) top folders as the source's own
    # splits and any other top folders as classes; classes or splits forces one reading.
    layout: Literal["auto", "classes", "splits"]

    @model_validator(mode="after")
    def _path_matches_source(self) -> DataParams:
        if self.source in SOURCES_WITH_PATH and not self.path:
            raise ValueError(f"data.path: required when data.source is {self.source}")
        for mirror in self.mirrors:
            if not mirror.startswith(MIRROR_SCHEMES):
                raise ValueError(
                    f"data.mirrors: {mirror!r} must start with one of {', '.join(MIRROR_SCHEMES)}"
                )
        return self


class PreprocessParams(_Section):
    """Image geometry and the train / validation / test split (stage ``preprocess``)."""

    image_height: int = Field(ge=8, le=1024)
    image_width: int = Field(ge=8, le=1024)
    channels: Literal[1, 3]
    resize: Literal["stretch", "pad", "crop"]
    max_skipped_fraction: float = Field(ge=0, le=1)
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    seed: int = Field(ge=0)
    # Images whose perceptual hashes differ in at most this many of 64 bits are near-
    # duplicates (a resized or re-encoded copy) and land in one split, like exact copies.
    near_duplicate_distance: int = Field(ge=0, le=32)
    # Sources with their own test set (IDX): drop training images that duplicate a test image.
    drop_test_duplicates_from_train: bool


class TrainParams(_Section):
    """The network and how it is fitted (stage ``train``)."""

    architecture: Literal[
        "reference_cnn", "small_bn_cnn", "photo_resnet", "mobilenet_v3_small", "efficientnet_v2_b0"
    ]
    epochs: int = Field(ge=1, le=10_000)
    batch_size: int = Field(ge=1, le=65_536)
    learning_rate: float = Field(gt=0, le=10)
    # constant: learning_rate throughout; warmup_cosine: linear warmup from a tenth of it
    # to learning_rate over warmup_epochs, then cosine decay to zero at the last epoch.
    schedule: Literal["constant", "warmup_cosine"]
    warmup_epochs: float = Field(ge=0, le=10_000)
    augment: Literal["none", "shift", "affine", "photo"]
    # Batches per compiled call (Keras's steps_per_execution): speed only, same weights.
    steps_per_execution: int = Field(ge=1, le=100_000)
    # auto: mixed_bfloat16 where the CPU has bf16 instructions (AMX or AVX512_BF16).
    precision: Literal["auto", "float32", "mixed_bfloat16"]
    seed: int = Field(ge=0)
    resume: bool
    # AdamW's decoupled weight decay (0: plain Adam) and the labels' smoothing (0: none).
    weight_decay: float = Field(ge=0, le=1)
    label_smoothing: float = Field(ge=0, lt=1)
    # Fit a temperature on the validation split after training and build it into the model.
    calibrate: bool
    # hflip: the saved model averages each image with its left-right mirror (photos only).
    tta: Literal["none", "hflip"]
    # Backbones (mobilenet_v3_small, efficientnet_v2_b0): none (random weights), imagenet
    # (Keras's cache), or a .weights.h5 file under pretrained/ (a DVC dependency of train).
    pretrained: str = Field(min_length=1)
    # After the head alone, the top fine_tune_layers of the backbone train for
    # fine_tune_epochs more at fine_tune_learning_rate (0 layers or 0 epochs: no second phase).
    fine_tune_layers: int = Field(ge=0, le=10_000)
    fine_tune_epochs: int = Field(ge=0, le=10_000)
    fine_tune_learning_rate: float = Field(gt=0, le=10)

    @model_validator(mode="after")
    def _pretrained_is_known(self) -> TrainParams:
        if self.pretrained != "none" and self.architecture not in BACKBONE_ARCHITECTURES:
            raise ValueError(
                f"train.pretrained: {self.pretrained} applies to the backbones "
                f"({', '.join(BACKBONE_ARCHITECTURES)}), not to {self.architecture}; "
                "set it to none"
            )
        if self.pretrained in PRETRAINED_CHOICES:
            return self
        if not (
            self.pretrained.startswith(PRETRAINED_DIR) and self.pretrained.endswith(".weights.h5")
        ):
            raise ValueError(
                f"train.pretrained: expected none, imagenet or a {PRETRAINED_DIR}<name>.weights.h5 "
                f"file (the folder train depends on), got {self.pretrained!r}"
            )
        return self


class EvaluateParams(_Section):
    """How the test set is scored (stage ``evaluate``)."""

    batch_size: int = Field(ge=1, le=65_536)


class ExportParams(_Section):
    """What the model is registered as, and when it becomes @champion (stage ``export``)."""

    model_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][\w.\-]*$")
    # auto: the candidate must beat always guessing the test set's largest class,
    # significantly (an exact binomial test at promotion_alpha); or a fixed accuracy.
    accuracy_floor: Literal["auto"] | float = Field(union_mode="left_to_right")
    promotion_margin: float = Field(ge=0, le=1)
    # A challenger replaces the champion only if McNemar's exact test on the test images
    # they disagree on says it is better at this level.
    promotion_alpha: float = Field(gt=0, lt=1)
    int8_max_accuracy_drop: float = Field(ge=0, le=1)
    # The int8 model is left out when its drop exceeds the bound and McNemar's exact test
    # says the drop is real at this level; with require_int8 that fails the export instead.
    int8_alpha: float = Field(gt=0, lt=1)
    require_int8: bool

    @model_validator(mode="after")
    def _floor_in_range(self) -> ExportParams:
        floor = self.accuracy_floor
        if floor != "auto" and not 0 <= floor <= 1:
            raise ValueError(f"export.accuracy_floor: expected auto or 0..1, got {floor!r}")
        return self


class LabelIssuesParams(_Section):
    """Which training labels are probably wrong (stage ``label_issues``, off by default).

    ``folds`` models of ``train.architecture``, each trained ``epochs`` epochs on the other
    folds, give every training image out-of-fold probabilities for confident learning.
    """

    enabled: bool
    folds: int = Field(ge=2, le=50)
    epochs: int = Field(ge=1, le=10_000)


class ServeParams(_Section):
    """What the served model does (chosen by export, stored with it) and how the server
    (``python -m tools.serve``) and the monitor (``python -m tools.monitor``) run."""

    # auto: the fastest float format that passed parity (LiteRT, then ONNX Runtime), else Keras
    runtime: Literal["auto", "tflite_float32", "onnx", "keras"]
    ood_score: Literal["mahalanobis", "energy"]
    # The confidence threshold is the lowest at which the validation images answered are
    # this accurate; the OOD threshold this quantile of their OOD scores (null: none).
    target_accuracy: float = Field(gt=0, le=1)
    ood_quantile: float | None = Field(gt=0.5, le=1)
    max_body_bytes: int = Field(ge=1024, le=2**31)
    max_image_pixels: int = Field(ge=64, le=178_956_970)  # PIL refuses more anyway
    max_request_images: int = Field(ge=1, le=1_000_000)
    max_request_pixels: int = Field(ge=64, le=2**40)
    log_dir: str = Field(min_length=1)
    log_max_bytes: int = Field(ge=1024, le=2**40)
    log_backups: int = Field(ge=1, le=1000)
    log_images: bool
    monitor_window: int = Field(ge=10, le=10_000_000)
    drift_alpha: float = Field(gt=0, lt=1)


class Params(_Section):
    """All of params.yaml."""

    data: DataParams
    preprocess: PreprocessParams
    train: TrainParams
    evaluate: EvaluateParams
    export: ExportParams
    serve: ServeParams
    label_issues: LabelIssuesParams

    @model_validator(mode="after")
    def _split_leaves_training_data(self) -> Params:
        held_out = self.preprocess.val_fraction + self.preprocess.test_fraction
        if held_out >= 0.9:
            raise ValueError(
                "preprocess.val_fraction + preprocess.test_fraction must be < 0.9, "
                f"got {held_out:g}"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """Every param as ``section.key`` -> value, the form MLflow and DVC show."""
        return {
            f"{section}.{key}": value
            for section, values in self.model_dump().items()
            for key, value in values.items()
        }


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "missing":
        return f"{key}: missing key"
    message = error["msg"]
    if kind == "value_error":
        # Cross-field checks carry their own full message and no useful location.
        return message.removeprefix("Value error, ")
    return f"{key}: {message[0].lower()}{message[1:]}, got {error['input']!r}"


def parse_params(raw: Any, source: str = str(DEFAULT_PARAMS_PATH)) -> Params:
    """Validate an already-parsed params mapping; ``source`` names it in errors."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(_describe(e) for e in error.errors())
        raise ParamsError(f"{source}: {problems}") from None


class _DuplicateKey(yaml.YAMLError):
    """A mapping gives the same key twice."""


class _ParamsLoader(yaml.SafeLoader):
    """YAML as people write params: ``1e-3`` is a number, and a key given twice is an error.

    PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``) and ``1e-3`` is a string;
    DVC reads params.yaml as YAML 1.2, where both are numbers. A repeated key would silently
    win over the first.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(
                    f"line {key_node.start_mark.line + 1}: key {key!r} is given twice "
                    f"(first on line {seen[key].line + 1}); keep one"
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats, exponents without a dot included (1e-3, 2E5).
_ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file people edit: UTF-8, YAML 1.2 numbers, no repeated keys."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except UnicodeDecodeError as error:
        raise ParamsError(
            f"{path}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
            f"{error.start}); save it as UTF-8"
        ) from None
    try:
        return yaml.load(text, Loader=_ParamsLoader)  # a SafeLoader: builds plain data only
    except _DuplicateKey as error:
        raise ParamsError(f"{path}: {error}") from None
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None


def load_params(path: Path = DEFAULT_PARAMS_PATH) -> Params:
    """Read and validate params.yaml."""
    return parse_params(read_yaml(path), str(path))
