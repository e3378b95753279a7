"""The CNN architectures, pure Keras 3 (no ``tf.*``) so they also run on the JAX backend.

Every model takes raw uint8 pixels, shape (height, width, channels), and scales them
itself, so a served model cannot be fed differently from the one that was trained.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


# Batch norm's moving statistics are what the validation curves are scored with during
# training: 0.9 forgets the initial ones within a few dozen steps where Keras's 0.99 takes
# hundreds (3 epochs on the digits are 120). It does not change the training itself, and
# the saved model gets exact statistics anyway (classifier/training/batch_norm.py).
BN_MOMENTUM = 0.9

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
            x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
    x = layers.GlobalAveragePooling2D(name="average")(x)
    x = layers.Dropout(0.2, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="small_bn_cnn")


# photo_resnet: a stride-2 stem, then residual stages of (filters) with a 2x2 max pool
# between them; each stage is two 3x3 convolutions with batch norm and a shortcut.
PHOTO_STEM_FILTERS = 32
PHOTO_STAGES = (32, 64, 128, 256)
PHOTO_DROPOUT = 0.3
PHOTO_MIN_SIZE = 16  # a stride-2 stem and three poolings leave at least 1x1


def _residual_stage(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    """Two 3x3 conv-BN layers with a shortcut (a 1x1 projection when the width changes)."""
    shortcut = x
    if x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(x)
        shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_project_bn")(
            shortcut
        )
    for index in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{index}")(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_conv{index}_bn")(x)
        if index == 1:
            x = layers.ReLU(name=f"{name}_conv{index}_relu")(x)
    x = layers.Add(name=f"{name}_add")([x, shortcut])
    return layers.ReLU(name=f"{name}_relu")(x)


def photo_resnet(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """A small residual network for photos: about 1.2M parameters, any size from 16x16 up.

    Batch norm, a shortcut around every pair of convolutions, global average pooling and
    dropout: what lets a network learn photos (texture, pose, background) from a couple of
    thousand images without memorising them, with augment: photo. The stride-2 stem keeps
    a 96x96 photo cheap enough for a CPU.
    """
    inputs, x = _scaled_input("photo_resnet", input_shape, PHOTO_MIN_SIZE)
    x = layers.Conv2D(PHOTO_STEM_FILTERS, 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(x)  # fmt: skip
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate(PHOTO_STAGES, start=1):
        if stage > 1:
            x = layers.MaxPooling2D(2, name=f"pool{stage - 1}")(x)
        x = _residual_stage(x, filters, f"stage{stage}")
    x = layers.GlobalAveragePooling2D(name="average")(x)
    x = layers.Dropout(PHOTO_DROPOUT, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="photo_resnet")


ARCHITECTURES: dict[str, Callable[[tuple[int, int, int], int], keras.Model]] = {
    "reference_cnn": reference_cnn,
    "small_bn_cnn": small_bn_cnn,
    "photo_resnet": photo_resnet,
}


def build_model(
    architecture: str, input_shape: tuple[int, int, int], num_classes: int
) -> keras.Model:
    """Build the named architecture for images of ``input_shape`` and ``num_classes``."""
    if architecture not in ARCHITECTURES and architecture not in BACKBONES:
        raise ParamsError(
            f"train.architecture: unknown architecture {architecture!r}, "
            f"expected one of {sorted([*ARCHITECTURES, *BACKBONES])}"
        )
    if num_classes < 2:
        raise ParamsError(f"need at least 2 classes to classify, got {num_classes}")
    if architecture in BACKBONES:
        return backbone_model(architecture, tuple(input_shape), num_classes)
    return ARCHITECTURES[architecture](tuple(input_shape), num_classes)


@dataclass(frozen=True)
class Backbone:
    """A keras.applications network used without its classifier, and its ImageNet file."""

    constructor: Callable[..., keras.Model]
    options: dict
    imagenet_file: str  # what Keras's cache holds for include_top=False
    imagenet_url: str


KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"
BACKBONES = {
    "mobilenet_v3_small": Backbone(
        keras.applications.MobileNetV3Small,
        {"include_preprocessing": True},
        "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
        KERAS_APPLICATIONS + "mobilenet_v3/",
    ),
    "efficientnet_v2_b0": Backbone(
        keras.applications.EfficientNetV2B0,
        {"include_preprocessing": True},
        "efficientnetv2-b0_notop.h5",
        KERAS_APPLICATIONS + "efficientnet_v2/",
    ),
}
BACKBONE_LAYER = "backbone"
BACKBONE_MIN_SIZE = 32
BACKBONE_DROPOUT = 0.2


def backbone_model(
    architecture: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    weights: str | None = None,
) -> keras.Model:
    """A keras.applications backbone with a new classifier head, taking uint8 pixels.

    The backbone scales pixels itself (``include_preprocessing``); grayscale images are
    repeated into three channels. It always runs with batch norm in inference mode
    (``training=False``), as fine-tuning a pretrained network wants. ``weights`` is
    None (random), ``imagenet`` (Keras's cache) or a ``.weights.h5`` file of the backbone.
    """
    height, width, channels = input_shape
    if min(height, width) < BACKBONE_MIN_SIZE:
        raise ParamsError(
            f"architecture {architecture} needs images of at least {BACKBONE_MIN_SIZE}x"
            f"{BACKBONE_MIN_SIZE}, got {height}x{width} (preprocess.image_height / image_width)"
        )
    spec = BACKBONES[architecture]
    inputs = keras.Input(shape=input_shape, dtype="uint8", name="image")
    x = layers.Rescaling(1.0, name="to_float")(inputs)  # 0..255, as the backbone expects
    if channels == 1:
        x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
    backbone = spec.constructor(
        input_shape=(height, width, 3),
        include_top=False,
        weights="imagenet" if weights == "imagenet" else None,
        **spec.options,
    )
    backbone.name = BACKBONE_LAYER
    x = backbone(x, training=False)
    x = layers.GlobalAveragePooling2D(name="average")(x)
    x = layers.Dropout(BACKBONE_DROPOUT, name="dropout")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=architecture)
