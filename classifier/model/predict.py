"""Keras's ``predict`` in batches of one shape, so that it traces its predict step once.

Keras compiles ``predict`` into a ``tf.function`` per model, traced for the batch shape it
first sees; a last batch smaller than the others is a new shape and a second trace (about
half a second each). Evaluate and export each predict with three models (the model, its
logits or its features, the reloaded file), so the six traces made TensorFlow warn of
"excessive retracing", twice per warning. Padding the last batch with blank images to the
full batch size keeps one trace per model; the padding's outputs are dropped. One image's
outputs do not depend on the others in its batch (inference mode: no batch statistics).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def padded(images: np.ndarray, batch_size: int) -> tuple[np.ndarray, int]:
    """``images`` with blank images appended up to a whole number of batches of
    ``batch_size`` (no padding when they fit in one batch), and the batch size to use."""
    count = len(images)
    if count <= batch_size:
        return images, max(1, count)
    missing = -count % batch_size
    if missing:
        blank = np.zeros((missing, *images.shape[1:]), dtype=images.dtype)
        images = np.concatenate([images, blank])
    return images, batch_size


def _first(outputs: Any, count: int) -> Any:
    if isinstance(outputs, dict):
        return {name: np.asarray(value)[:count] for name, value in outputs.items()}
    if isinstance(outputs, list | tuple):
        return [np.asarray(value)[:count] for value in outputs]
    return np.asarray(outputs)[:count]


def predict(model: Any, images: np.ndarray, batch_size: int) -> Any:
    """``model.predict(images)`` (an array, or a dict or list of them) with one trace."""
    batches, size = padded(np.asarray(images), batch_size)
    return _first(model.predict(batches, batch_size=size, verbose=0), len(images))
