"""Losses Keras lacks: sparse cross-entropy with label smoothing.

Keras's ``SparseCategoricalCrossentropy`` takes no ``label_smoothing`` (its one-hot sibling
does). Registered, so a checkpoint that holds it loads in safe mode; the saved model is
never compiled (classifier/training/precision.py), so serving never needs it.
"""

from __future__ import annotations

from typing import Any

import keras


@keras.saving.register_keras_serializable(package="classifier")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of integer labels smoothed towards the uniform distribution.

    The target for label ``k`` of ``C`` classes is ``1 - s + s / C`` at ``k`` and ``s / C``
    elsewhere, as ``CategoricalCrossentropy(label_smoothing=s)`` makes it.
    """

    def __init__(
        self, label_smoothing: float = 0.0, name: str = "smoothed_crossentropy", **kwargs: Any
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        ops = keras.ops
        classes = ops.shape(y_pred)[-1]
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        targets = ops.one_hot(labels, classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            targets, y_pred, label_smoothing=self.label_smoothing
        )

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def training_loss(label_smoothing: float) -> str | keras.losses.Loss:
    """The loss for ``train.label_smoothing``: Keras's own sparse cross-entropy when 0."""
    if label_smoothing == 0:
        return "sparse_categorical_crossentropy"
    return SmoothedSparseCrossentropy(label_smoothing)
