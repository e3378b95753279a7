"""The registered MLflow model: images as people have them in, class names out.

It takes either a batch of uint8 pixel arrays, shape (N, height, width, channels) or
(N, height, width) for grayscale, of any size; or a DataFrame (or dict) with an ``image``
column of PNG/JPEG/... file bytes, base64-encoded where they came as text (JSON). Each
image is decoded, converted and resized exactly as preprocessing did
(classifier/data/images.py, with the ``preprocess.resize`` policy the model was trained
with). It returns one row per image: ``class_name``, ``class_index``, ``confidence`` and
``probabilities`` (a list, in the order of the labels file that travels with the model).

MLflow builds it from code (classifier/serving/served_model.py), not from a pickle, and
loads the Keras weights with safe mode on.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from classifier.data.images import ResizePolicy, UnreadableImage, decode_image, resize_images

if TYPE_CHECKING:
    import keras

IMAGE_COLUMN = "image"
# What travels with the registered model (artifact keys) and how it is described.
KERAS_ARTIFACT = "keras_model"
LABELS_ARTIFACT = "labels"
PREPROCESSING_ARTIFACT = "preprocessing"
PREPROCESSING_FILE = "preprocessing.json"
RESIZE_KEY = "resize"
PREDICT_BATCH_SIZE = 256
PIXEL_RANGE = (0, 255)


class BadImageInput(MlflowException):
    """The request holds something that is not a usable image; the server answers 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def _image_bytes(value: Any, row: int) -> bytes:
    """The file bytes of one ``image`` cell: bytes as they are, text as base64."""
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


def _decode_column(
    values: Sequence[Any], shape: tuple[int, int, int], resize: ResizePolicy
) -> np.ndarray:
    height, width, channels = shape
    images = np.empty((len(values), *shape), dtype=np.uint8)
    for row, value in enumerate(values):
        try:
            images[row] = decode_image(_image_bytes(value, row), height, width, channels, resize)
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


def to_batch(model_input: Any, shape: tuple[int, int, int], resize: ResizePolicy) -> np.ndarray:
    """The uint8 batch of ``shape`` images the Keras model takes, from what a client sent."""
    if isinstance(model_input, pd.DataFrame | dict):
        if IMAGE_COLUMN not in model_input:
            columns = list(model_input.keys()) if isinstance(model_input, dict) else None
            columns = list(model_input.columns) if columns is None else columns
            raise BadImageInput(
                f"expected a column {IMAGE_COLUMN!r} of image files (base64 text or bytes), "
                f"got columns {columns}"
            )
        values = model_input[IMAGE_COLUMN]
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
            return _convert_pixels(values, shape, resize)  # {"image": pixel arrays}
        return _decode_column(list(np.ravel(np.asarray(values, dtype=object))), shape, resize)
    try:
        pixels = np.asarray(model_input)
    except ValueError:
        raise BadImageInput("images in a batch must all have the same shape") from None
    return _convert_pixels(pixels, shape, resize)


def prediction_frame(probabilities: np.ndarray, class_names: Sequence[str]) -> pd.DataFrame:
    """One row per image: class name and index, its probability, and every class's."""
    indices = probabilities.argmax(axis=1)
    return pd.DataFrame(
        {
            "class_name": [class_names[index] for index in indices],
            "class_index": indices.astype(np.int64),
            "confidence": probabilities.max(axis=1).astype(np.float64),
            "probabilities": [row.astype(np.float64).tolist() for row in probabilities],
        }
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


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc that MLflow serves: decode, resize, classify, name the classes."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        from classifier.model.files import load_model

        self.model: keras.Model = load_model(context.artifacts[KERAS_ARTIFACT])
        self.class_names = json.loads(Path(context.artifacts[LABELS_ARTIFACT]).read_text())
        preprocessing = json.loads(Path(context.artifacts[PREPROCESSING_ARTIFACT]).read_text())
        self.resize: ResizePolicy = preprocessing[RESIZE_KEY]
        self.shape = tuple(self.model.input_shape[1:])

    # MLflow reads this hint: a DataFrame hint leaves checking the input to the model, which
    # also takes arrays and dicts (one hint cannot say "pixels or files").
    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Classify each image of ``model_input``; see the module's docstring for the forms."""
        images = to_batch(model_input, self.shape, self.resize)
        # predict_on_batch runs a compiled function: several times faster than a direct
        # call for one image, without model.predict's per-call set-up.
        probabilities = np.concatenate(
            [
                np.asarray(self.model.predict_on_batch(images[start : start + PREDICT_BATCH_SIZE]))
                for start in range(0, len(images), PREDICT_BATCH_SIZE)
            ]
            or [np.empty((0, len(self.class_names)), dtype=np.float32)]
        )
        return prediction_frame(probabilities, self.class_names)
