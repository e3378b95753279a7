"""The CNN architectures, pure Keras 3 (no ``tf.*``) so they also run on the JAX backend.

Every model takes raw uint8 pixels, shape (height, width, channels), and scales them
itself, so a served model cannot be fed differently from the one that was trained.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from stages.errors import ParamsError

# Reference CNN: three 3x3 valid convolutions with 2x2 pooling after the first two.
# Its smallest input leaves a 1x1 map after the last convolution: ((s-2)//2-2)//2-2 >= 1.
REFERENCE_MIN_SIZE = 18


def reference_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The design this project started from: about 93k parameters at 28x28x1, 10 classes."""
    height, width, _ = input_shape
    if min(height, width) < REFERENCE_MIN_SIZE:
        raise ParamsError(
            f"architecture reference_cnn needs images of at least "
            f"{REFERENCE_MIN_SIZE}x{REFERENCE_MIN_SIZE}, got {height}x{width} "
            "(preprocess.image_height / image_width in params.yaml)"
        )
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = layers.Rescaling(1 / 255, name="scale")(inputs)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="dense")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="reference_cnn")


ARCHITECTURES: dict[str, Callable[[tuple[int, int, int], int], keras.Model]] = {
    "reference_cnn": reference_cnn,
}


def build_model(
    architecture: str, input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    """Build the named architecture for images of ``input_shape`` and ``num_classes``."""
    if architecture not in ARCHITECTURES:
        raise ParamsError(
            f"train.architecture: unknown architecture {architecture!r}, "
            f"expected one of {sorted(ARCHITECTURES)}"
        )
    if num_classes < 2:
        raise ParamsError(f"need at least 2 classes to classify, got {num_classes}")
    return ARCHITECTURES[architecture](tuple(input_shape), num_classes)


def load_model(path: str) -> keras.Model:
    """Load a ``.keras`` model with safe mode on: no pickled or Lambda code is run."""
    return keras.saving.load_model(path, safe_mode=True)
