"""The CNN architectures, pure Keras 3 (no ``tf.*``) so they also run on the JAX backend.

Every model takes raw uint8 pixels, shape (height, width, channels), and scales them
itself, so a served model cannot be fed differently from the one that was trained.
"""

from __future__ import annotations

from collections.abc import Callable

import keras
from keras import layers

from classifier.errors import ParamsError

# Reference CNN: three 3x3 valid convolutions with 2x2 pooling after the first two.
# Its smallest input leaves a 1x1 map after the last convolution: ((s-2)//2-2)//2-2 >= 1.
REFERENCE_MIN_SIZE = 18


def _scaled_input(
    architecture: str, input_shape: tuple[int, int, int], min_size: int
) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """The uint8 image input and its [0, 1] scaling; refuses images below ``min_size``."""
    height, width, _ = input_shape
    if min(height, width) < min_size:
        raise ParamsError(
            f"architecture {architecture} needs images of at least "
            f"{min_size}x{min_size}, got {height}x{width} "
            "(preprocess.image_height / image_width in params.yaml)"
        )
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    return inputs, layers.Rescaling(1 / 255, name="scale")(inputs)


def reference_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The design this project started from: about 93k parameters at 28x28x1, 10 classes."""
    inputs, x = _scaled_input("reference_cnn", input_shape, REFERENCE_MIN_SIZE)
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(x)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv3")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name="dense")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="reference_cnn")


# small_bn_cnn: (filters, convolutions) per block, a 2x2 max pool between blocks.
SMALL_BN_BLOCKS = ((24, 2), (48, 2), (80, 1))
SMALL_BN_MIN_SIZE = 4  # two 2x2 poolings leave at least 1x1 for the global average


def small_bn_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """A small VGG-style CNN with batch norm and global average pooling.

    About 73k parameters at 28x28x1 with 10 classes (fewer than reference_cnn's 93k); the
    count does not grow with the image size. 3x3 'same' convolutions, so any size from
    4x4 up, grayscale or RGB.
    """
    inputs, x = _scaled_input("small_bn_cnn", input_shape, SMALL_BN_MIN_SIZE)
    for block, (filters, convolutions) in enumerate(SMALL_BN_BLOCKS, start=1):
        if block > 1:
            x = layers.MaxPooling2D(2, name=f"pool{block - 1}")(x)
        for conv in range(1, convolutions + 1):
            name = f"block{block}_conv{conv}"
            x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
            x = layers.BatchNormalization(name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.GlobalAveragePooling2D(name="average")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="small_bn_cnn")


ARCHITECTURES: dict[str, Callable[[tuple[int, int, int], int], keras.Model]] = {
    "reference_cnn": reference_cnn,
    "small_bn_cnn": small_bn_cnn,
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
