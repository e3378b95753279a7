"""A temperature built into a model: ``logits -> Rescaling(1 / T) -> softmax``.

Built-in Keras layers only, so the saved model loads in safe mode anywhere, and every
exported format and the served model divide the logits by the same ``T``. Fitting ``T``
is training's job (classifier/training/calibration.py).
"""

from __future__ import annotations

import keras
import numpy as np
from keras import layers

from classifier.model.predict import predict

TEMPERATURE_LAYER = "temperature"
LOGITS_LAYER = "logits"
PROBABILITIES_LAYER = "probabilities"
PREDICT_BATCH_SIZE = 256


def with_temperature(model: keras.Model, temperature: float) -> keras.Model:
    """``model`` (ending in a softmax Dense layer) with its logits divided by ``temperature``.

    The last Dense layer is split into its linear part and the softmax, with the same
    weights; the temperature goes between them.
    """
    head = model.layers[-1]
    if not isinstance(head, layers.Dense):
        raise TypeError(f"the model must end in a Dense layer, ends in {type(head).__name__}")
    logits_layer = layers.Dense(head.units, name=LOGITS_LAYER)
    logits = logits_layer(head.input)
    logits_layer.set_weights(head.get_weights())
    scaled = layers.Rescaling(1.0 / temperature, name=TEMPERATURE_LAYER)(logits)
    probabilities = layers.Activation("softmax", name=PROBABILITIES_LAYER)(scaled)
    return keras.Model(model.inputs, probabilities, name=model.name)


def temperature_of(model: keras.Model) -> float:
    """The temperature built into ``model``; 1.0 if it has none."""
    try:
        return 1.0 / float(model.get_layer(TEMPERATURE_LAYER).scale)
    except ValueError:
        return 1.0


def logits_of(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The model's logits (before temperature and softmax) for ``images``."""
    if TEMPERATURE_LAYER not in {layer.name for layer in model.layers}:
        model = with_temperature(model, 1.0)
    logits_model = keras.Model(model.inputs, model.get_layer(LOGITS_LAYER).output)
    return predict(logits_model, images, PREDICT_BATCH_SIZE)
