"""The registered MLflow model: images as people have them in, class names out.

It takes either a batch of uint8 pixel arrays, shape (N, height, width, channels) or
(N, height, width) for grayscale, of any size; or a DataFrame (or dict) with an ``image``
column of PNG/JPEG/... file bytes, base64-encoded where they came as text (JSON). Each
image is decoded, converted and resized exactly as preprocessing did
(classifier/data/images.py, with the ``preprocess.resize`` policy the model was trained
with). It returns one row per image: ``class_name``, ``class_index``, ``confidence`` and
``probabilities`` (a list, in the order of the labels file that travels with the model),
the ``temperature`` the probabilities were calibrated with, the image's out-of-distribution
``ood_score`` (classifier/serving/ood.py) and ``abstain_reason``. Where the model abstains,
``class_name`` is null and ``abstain_reason`` says why (``low_confidence`` or
``out_of_distribution``); ``class_index`` and ``confidence`` still give its best guess.

It predicts through the exported file that export chose and shipped with it (LiteRT or
ONNX Runtime, classifier/serving/runtime.py), without TensorFlow; the Keras model is the
fallback, used where that file or its runtime is missing, or when ``CLASSIFIER_RUNTIME=keras``
is set. Versions registered before these existed have no such file and no OOD statistics:
they run on Keras, with a null ``ood_score``, and never abstain.

MLflow builds it from code (classifier/serving/served_model.py), not from a pickle, and
loads the Keras weights with safe mode on.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from classifier.data.images import ResizePolicy, UnreadableImage, decode_image, resize_images
from classifier.serving import ood, runtime

log = logging.getLogger(__name__)

IMAGE_COLUMN = "image"
# What travels with the registered model (artifact keys) and how it is described.
KERAS_ARTIFACT = "keras_model"
LABELS_ARTIFACT = "labels"
PREPROCESSING_ARTIFACT = "preprocessing"
PREPROCESSING_FILE = "preprocessing.json"
RESIZE_KEY = "resize"
# Written by export (classifier/serving/prepare.py): the file to predict with, what serving
# does (serving.json) and the OOD statistics with the monitor's reference (serving.npz).
RUNTIME_ARTIFACT = "runtime_model"
SERVING_ARTIFACT = "serving"
SERVING_FILE = "serving.json"
STATISTICS_ARTIFACT = "serving_statistics"
STATISTICS_FILE = "serving.npz"
RUNTIME_ENV = "CLASSIFIER_RUNTIME"  # "keras": predict with the Keras model, whatever shipped
PREDICT_BATCH_SIZE = 256
PIXEL_RANGE = (0, 255)
# Decoded images larger than this are refused before they are decoded (pixel bombs): a
# 50-megapixel photo passes; PIL's own guard starts at 89 million pixels, and stops at 179.
MAX_IMAGE_PIXELS = 50_000_000
COLUMNS = (
    "class_name",
    "class_index",
    "confidence",
    "probabilities",
    "temperature",
    "ood_score",
    "abstain_reason",
)


class BadImageInput(MlflowException):
    """The request holds something that is not a usable image; the server answers 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class ImageTooLarge(BadImageInput):
    """An image whose decoded size is over the limit; the model's own server answers 413."""


def _image_bytes(value: Any, row: int) -> bytes:
    """The file bytes of one ``image`` cell: bytes as they are, text as base64."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()  # MLflow's scoring server wraps each of ``instances`` in one
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise BadImageInput(f"image {row}: not valid base64") from None
    raise BadImageInput(
        f"image {row}: expected image file bytes or base64 text, got {type(value).__name__}"
    )


def _check_size(data: bytes, row: int, max_pixels: int) -> int:
    """Refuse an image whose header promises more than ``max_pixels``, before decoding it;
    return its pixels (0 where PIL cannot read the header: decoding says what is wrong)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as picture:  # reads the header only
            width, height = picture.size
    except Image.DecompressionBombError:
        width = height = None
    except Exception:
        return 0  # not an image PIL knows: decoding says what is wrong with it
    if width is None or width * height > max_pixels:
        size = "over 179 million" if width is None else f"{width}x{height}"
        raise ImageTooLarge(
            f"image {row}: {size} pixels, more than the {max_pixels:,} this server decodes"
        )
    return width * height


def _check_request_pixels(pixels: int, max_request_pixels: int | None) -> None:
    if max_request_pixels is not None and pixels > max_request_pixels:
        raise ImageTooLarge(
            f"the request's images hold {pixels:,} pixels, more than the "
            f"{max_request_pixels:,} this server decodes per request; send fewer or smaller "
            "images per request"
        )


def _decode_column(
    values: Sequence[Any],
    shape: tuple[int, int, int],
    resize: ResizePolicy,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_request_pixels: int | None = None,
) -> np.ndarray:
    height, width, channels = shape
    files = [_image_bytes(value, row) for row, value in enumerate(values)]
    # Every header first: a request over its budget is refused before any image is decoded.
    promised = sum(_check_size(data, row, max_pixels) for row, data in enumerate(files))
    _check_request_pixels(promised, max_request_pixels)
    images = np.empty((len(values), *shape), dtype=np.uint8)
    for row, data in enumerate(files):
        try:
            images[row] = decode_image(data, height, width, channels, resize)
        except UnreadableImage as error:
            raise BadImageInput(f"image {row}: {error}") from None
    return images


def _convert_pixels(
    pixels: np.ndarray, shape: tuple[int, int, int], resize: ResizePolicy
) -> np.ndarray:
    if pixels.ndim == 3:
        pixels = pixels[..., np.newaxis]
    if pixels.ndim != 4 or pixels.shape[-1] not in (1, 3) or 0 in pixels.shape:
        raise BadImageInput(
            "expected a batch of images shaped (N, height, width, channels) with 1 or 3 "
            f"channels, or (N, height, width); got shape {pixels.shape}"
        )
    if pixels.dtype != np.uint8:
        if not np.issubdtype(pixels.dtype, np.integer):
            raise BadImageInput(f"expected uint8 pixels 0-255, got {pixels.dtype}")
        low, high = int(pixels.min()), int(pixels.max())
        if low < PIXEL_RANGE[0] or high > PIXEL_RANGE[1]:
            raise BadImageInput(f"expected pixels 0-255, got values from {low} to {high}")
        pixels = pixels.astype(np.uint8)
    return resize_images(pixels, *shape, resize)


def _pixel_array(values: np.ndarray) -> np.ndarray:
    """Pixels as numbers: MLflow's signature hands JSON's nested lists over as objects."""
    if values.dtype != object:
        return values
    try:
        return np.array(values.tolist())
    except ValueError:
        raise BadImageInput("images in a batch must all have the same shape") from None


def to_batch(
    model_input: Any,
    shape: tuple[int, int, int],
    resize: ResizePolicy,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_request_pixels: int | None = None,
) -> np.ndarray:
    """The uint8 batch of ``shape`` images the model takes, from what a client sent; at most
    ``max_pixels`` in one image and ``max_request_pixels`` in all, refused before decoding."""
    if isinstance(model_input, pd.DataFrame | dict):
        if IMAGE_COLUMN not in model_input:
            columns = list(model_input.keys()) if isinstance(model_input, dict) else None
            columns = list(model_input.columns) if columns is None else columns
            raise BadImageInput(
                f"expected a column {IMAGE_COLUMN!r} of image files (base64 text or bytes), "
                f"got columns {columns}"
            )
        values = model_input[IMAGE_COLUMN]
        if isinstance(values, np.ndarray) and values.dtype.kind in "iuf" and values.ndim < 3:
            held = "a number" if values.ndim == 1 else "a list of numbers"
            raise BadImageInput(
                f"column {IMAGE_COLUMN!r} holds {held} in each row, not an image: send each "
                "image as a file (base64 text or bytes) or as a height x width (x channels) "
                "array of pixels 0-255"
            )
        if isinstance(values, np.ndarray) and (values.dtype.kind in "iu" or values.ndim > 1):
            pixels = _pixel_array(values)  # {"image": pixel arrays}
            _check_request_pixels(_array_pixels(pixels), max_request_pixels)
            return _convert_pixels(pixels, shape, resize)
        files = list(np.ravel(np.asarray(values, dtype=object)))
        return _decode_column(files, shape, resize, max_pixels, max_request_pixels)
    try:
        pixels = np.asarray(model_input)
    except ValueError:
        raise BadImageInput("images in a batch must all have the same shape") from None
    _check_request_pixels(_array_pixels(pixels), max_request_pixels)
    return _convert_pixels(pixels, shape, resize)


def _array_pixels(pixels: np.ndarray) -> int:
    """Pixels of a batch of arrays, (N, height, width) or (N, height, width, channels)."""
    return int(np.prod(pixels.shape[:3])) if pixels.ndim >= 3 else pixels.size


def prediction_frame(
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    temperature: float | None = None,
    ood_scores: np.ndarray | None = None,
    reasons: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """One row per image: class name and index, its probability, and every class's; the
    temperature, the OOD score and why it abstains (class name None), where known."""
    count = len(probabilities)
    indices = probabilities.argmax(axis=1)
    reasons = [None] * count if reasons is None else list(reasons)
    return pd.DataFrame(
        {
            "class_name": [
                None if reason else class_names[index]
                for index, reason in zip(indices, reasons, strict=True)
            ],
            "class_index": indices.astype(np.int64),
            "confidence": probabilities.max(axis=1).astype(np.float64),
            "probabilities": [row.astype(np.float64).tolist() for row in probabilities],
            "temperature": np.full(count, np.nan if temperature is None else temperature),
            "ood_score": (
                np.full(count, np.nan) if ood_scores is None else ood_scores.astype(np.float64)
            ),
            "abstain_reason": reasons,
        },
        columns=list(COLUMNS),
    )


def png_frame(images: np.ndarray) -> pd.DataFrame:
    """Images as a client sends them: PNG files, base64-encoded, in an ``image`` column."""
    from PIL import Image

    encoded = []
    for pixels in images:
        buffer = io.BytesIO()
        Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return pd.DataFrame({IMAGE_COLUMN: encoded})


def probabilities_of(predictions: Any) -> np.ndarray:
    """Class probabilities, (N, classes), from a registered model's predictions.

    Versions registered before this model existed returned the bare array; they still load.
    """
    if isinstance(predictions, pd.DataFrame) and "probabilities" in predictions:
        return np.array(predictions["probabilities"].tolist(), dtype=np.float32)
    return np.asarray(predictions, dtype=np.float32)


@dataclass(frozen=True)
class Answers:
    """The model's answers for a batch: probabilities, OOD scores and abstentions."""

    probabilities: np.ndarray  # (N, classes)
    ood_scores: np.ndarray | None  # (N,), None without OOD statistics
    reasons: Sequence[str | None]  # why it abstains on each image; None where it answers

    def __len__(self) -> int:
        return len(self.probabilities)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc that MLflow serves: decode, resize, classify, name the classes."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        artifacts = context.artifacts
        self.class_names = json.loads(Path(artifacts[LABELS_ARTIFACT]).read_text())
        preprocessing = json.loads(Path(artifacts[PREPROCESSING_ARTIFACT]).read_text())
        self.resize: ResizePolicy = preprocessing[RESIZE_KEY]
        self.keras_path = Path(artifacts[KERAS_ARTIFACT])
        self.settings: dict[str, Any] = {}
        if SERVING_ARTIFACT in artifacts:
            self.settings = json.loads(Path(artifacts[SERVING_ARTIFACT]).read_text())
        self.statistics: ood.Statistics | None = None
        self.reference: dict[str, np.ndarray] = {}
        if STATISTICS_ARTIFACT in artifacts:
            self.statistics, self.reference = ood.load(Path(artifacts[STATISTICS_ARTIFACT]))
        self.runtime = self._runtime(artifacts.get(RUNTIME_ARTIFACT))
        self.shape = self.runtime.input_shape
        self.temperature: float | None = self.settings.get("temperature", self.runtime.temperature)
        self.ood_kind: str | None = self.settings.get("ood_score")
        self.rule = (
            ood.AbstainRule(self.settings["confidence_threshold"], self.settings["ood_threshold"])
            if "confidence_threshold" in self.settings
            else None
        )
        self.max_image_pixels = MAX_IMAGE_PIXELS
        self.max_request_pixels: int | None = None  # the server sets its own

    def _runtime(self, runtime_path: str | None) -> runtime.Runtime:
        """The shipped fast file on its runtime; else, or if it cannot load, Keras."""
        fmt = self.settings.get("runtime", runtime.KERAS)
        forced = os.environ.get(RUNTIME_ENV, "").strip().lower() == runtime.KERAS
        if fmt != runtime.KERAS and runtime_path is not None and not forced:
            try:
                return runtime.load(fmt, Path(runtime_path))
            except Exception as error:  # any failure of a runtime: Keras still answers
                log.warning("cannot run %s (%s); predicting with Keras instead", fmt, error)
        return self.keras_runtime()

    def keras_runtime(self) -> runtime.Runtime:
        """The Keras model with its features, loaded on first use (the fallback, and the
        benchmarks' reference)."""
        loaded = getattr(self, "_keras", None)
        if loaded is None:
            loaded = self._keras = runtime.keras_model(self.keras_path)
        return loaded

    def images(self, model_input: Any) -> np.ndarray:
        """The uint8 batch this model takes, from any of the forms the module docstring lists."""
        return to_batch(
            model_input,
            self.shape,
            self.resize,
            self.max_image_pixels,
            getattr(self, "max_request_pixels", None),
        )

    def classify(self, images: np.ndarray) -> Answers:
        """Probabilities, OOD scores and abstentions for a uint8 batch of the model's shape."""
        outputs = [
            self.runtime.run(images[start : start + PREDICT_BATCH_SIZE])
            for start in range(0, len(images), PREDICT_BATCH_SIZE)
        ]
        if not outputs:
            empty = np.empty((0, len(self.class_names)), dtype=np.float32)
            return Answers(empty, None, [])
        probabilities = np.concatenate([batch[runtime.PROBABILITIES] for batch in outputs])
        ood_scores = None
        if self.statistics is not None and self.runtime.has_features and self.ood_kind:
            features = np.concatenate([batch[runtime.FEATURES] for batch in outputs])
            ood_scores = self.statistics.score(self.ood_kind, features)
        reasons = (
            [None] * len(probabilities)
            if self.rule is None
            else self.rule.reasons(probabilities.max(axis=1), ood_scores)
        )
        return Answers(probabilities, ood_scores, reasons)

    def records(self, answers: Answers) -> list[dict[str, Any]]:
        """The answers as JSON-ready rows, the columns of :func:`prediction_frame`."""
        rows = []
        for row, probabilities in enumerate(answers.probabilities):
            index = int(probabilities.argmax())
            reason = answers.reasons[row]
            rows.append(
                {
                    "class_name": None if reason else self.class_names[index],
                    "class_index": index,
                    "confidence": float(probabilities[index]),
                    "probabilities": probabilities.astype(np.float64).tolist(),
                    "temperature": self.temperature,
                    "ood_score": (
                        None if answers.ood_scores is None else float(answers.ood_scores[row])
                    ),
                    "abstain_reason": reason,
                }
            )
        return rows

    # MLflow reads this hint: a DataFrame hint leaves checking the input to the model, which
    # also takes arrays and dicts (one hint cannot say "pixels or files").
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Classify each image of ``model_input``; see the module's docstring for the forms."""
        answers = self.classify(self.images(model_input))
        return prediction_frame(
            answers.probabilities,
            self.class_names,
            temperature=self.temperature,
            ood_scores=answers.ood_scores,
            reasons=answers.reasons,
        )
