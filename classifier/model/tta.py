"""Test-time flip averaging built into a model: each image is seen as it is and mirrored.

``train.tta: hflip`` saves the network wrapped so that it runs twice, on the image and on
its left-right mirror, and averages the two feature vectors before the last Dense layer.
That layer is linear, so this averages the two views' logits. A cat facing left is as much
a cat facing right: the two views' mistakes differ, and their average makes fewer.

Built-in Keras layers and ``keras.ops`` only, so the saved model loads in safe mode
anywhere, and evaluate, every exported format and the served model all average the same
two views. The wrapped model is::

    pixels -> trunk ----------------.
           -> flip -> trunk (same) --> flip_average -> Dense (the head, same weights)

``single_view`` gives back the network without the mirror, for what looks inside one
view (Grad-CAM, feature maps, filters).
"""

from __future__ import annotations

import keras
from keras import layers

FLIP_AVERAGE_LAYER = "flip_average"
TRUNK_SUFFIX = "_trunk"
WIDTH_AXIS = 2  # (batch, height, width, channels)


def with_flip_average(model: keras.Model) -> keras.Model:
    """``model`` (ending in a Dense layer) averaging its features over the image and its
    left-right mirror. Same weights; the result has the same name, input and output."""
    head = model.layers[-1]
    if not isinstance(head, layers.Dense):
        raise TypeError(f"the model must end in a Dense layer, ends in {type(head).__name__}")
    if has_flip_average(model):
        raise ValueError(f"model {model.name!r} already averages over the flipped image")
    trunk = keras.Model(model.inputs, head.input, name=f"{model.name}{TRUNK_SUFFIX}")
    pixels = keras.Input(model.inputs[0].shape[1:], dtype=model.inputs[0].dtype, name="pixels")
    mirrored = keras.ops.flip(pixels, axis=WIDTH_AXIS)
    features = layers.Average(name=FLIP_AVERAGE_LAYER)([trunk(pixels), trunk(mirrored)])
    new_head = _copy(head)
    outputs = new_head(features)
    new_head.set_weights(head.get_weights())
    return keras.Model(pixels, outputs, name=model.name)


def has_flip_average(model: keras.Model) -> bool:
    return any(layer.name == FLIP_AVERAGE_LAYER for layer in model.layers)


def single_view(model: keras.Model) -> keras.Model:
    """The network ``model`` runs on each view, flat: its trunk, then the layers after the
    average (copies with the same weights). ``model`` itself when it has no flip average."""
    if not has_flip_average(model):
        return model
    trunk = next(layer for layer in model.layers if layer.name.endswith(TRUNK_SUFFIX))
    x = trunk.outputs[0]
    after = model.layers[[layer.name for layer in model.layers].index(FLIP_AVERAGE_LAYER) + 1 :]
    for layer in after:
        copy = _copy(layer)
        x = copy(x)
        copy.set_weights(layer.get_weights())
    return keras.Model(trunk.inputs, x, name=model.name)


def _copy(layer: keras.layers.Layer) -> keras.layers.Layer:
    """A new layer of the same kind and settings, unbuilt (weights set by the caller)."""
    return layer.__class__.from_config(layer.get_config())
