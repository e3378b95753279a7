"""Batch-norm statistics measured on the training images once training is over.

In training, a batch-norm layer normalises each batch by that batch's own mean and
variance, and keeps a moving average of them (momentum 0.99 in Keras) to use at
inference. That average forgets its start (mean 0, variance 1) by 1 % a step, and it
mixes statistics of weights that kept changing: after the ~120 steps of three epochs on
the digits, 30 % of it is still the start, and the saved model scored 14 % on test images
while it scored 96 % in training. No momentum fits every run length.

So the float32 model that is saved gets measured statistics instead ("precise BN": Wu
and Johnson, "Rethinking batch in BatchNorm", 2021): one pass over the training images
(unaugmented: what inference sees; a fixed sample of 8,192 of a larger set) in training
mode, in batches of about 256, collects the inputs of every batch-norm layer, and each
layer's moving mean and variance become the mean and variance of its inputs over all the
measured images: a true average, of the final weights only. In that pass the layers
before it normalise by the batch's own statistics, as in training; with 256 images a
batch those are close to the statistics of all the images, and a single pass
costs about one prediction over the images, where measuring each layer in turn in
inference mode cost twelve for photo_resnet. Only the model's own layers are measured: a
keras.applications backbone runs with ``training=False`` throughout, and its pretrained
statistics are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import numpy as np

log = logging.getLogger(__name__)

# Images per batch of the measuring pass: statistics are combined over every image, and
# the layers before each one normalise by the batch's statistics, which at this size are
# close to those of all the images (training's batches are 32 to 128).
BATCH_SIZE = 256
# At most this many training images are measured, a fixed random sample of them beyond
# that: the statistics of 8,192 images (6.4 million values a channel at 28x28) are exact
# to far better than the batch's own noise in training, and full MNIST (54,000 images)
# would take six times as long.
MAX_IMAGES = 8192
SAMPLE_SEED = 0


def batch_norm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """The model's own batch-norm layers, in the order the model runs them.

    Layers inside a nested model (a keras.applications backbone) are not listed.
    """
    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


class _Moments:
    """Per-channel mean and variance, added batch by batch.

    Each batch's mean and variance are taken by Keras and combined in float64 by Chan et
    al.'s pairwise update, which stays exact whatever the number of batches.
    """

    def __init__(self, axis: int) -> None:
        self.axis = axis
        self.count = 0
        self.mean: np.ndarray | None = None
        self.squares: np.ndarray | None = None  # the sum of squared deviations

    def add(self, values: Any) -> None:
        rank = len(values.shape)
        axes = tuple(i for i in range(rank) if i != self.axis % rank)
        count = int(np.prod([values.shape[i] for i in axes]))
        mean = keras.ops.convert_to_numpy(keras.ops.mean(values, axis=axes)).astype(np.float64)
        var = keras.ops.convert_to_numpy(keras.ops.var(values, axis=axes)).astype(np.float64)
        if self.mean is None:
            self.count, self.mean, self.squares = count, mean, var * count
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * count / total
        self.squares = self.squares + var * count + delta**2 * self.count * count / total
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.squares / self.count


def measured_images(images: np.ndarray) -> np.ndarray:
    """``images``, or a fixed random sample of :data:`MAX_IMAGES` of them."""
    if len(images) <= MAX_IMAGES:
        return images
    chosen = np.random.default_rng(SAMPLE_SEED).choice(len(images), MAX_IMAGES, replace=False)
    return images[np.sort(chosen)]


def recompute_statistics(model: keras.Model, images: np.ndarray) -> int:
    """Set every batch-norm layer's moving mean and variance from ``images``; the count.

    ``model`` is float32 (the model that is saved); ``images`` are the unaugmented training
    images, as the model takes them (at most :data:`MAX_IMAGES` of them are measured). A
    model without batch norm is left as it is.
    """
    layers = batch_norm_layers(model)
    if not layers:
        return 0
    images = measured_images(images)
    # Every layer's input at once, in training mode: the layers before it normalise by the
    # batch's own statistics, as in training (and a nested backbone stays in inference).
    features = keras.Model(model.inputs[0], [layer.input for layer in layers])
    moments = [_Moments(layer.axis) for layer in layers]
    for batch in np.array_split(images, max(1, round(len(images) / BATCH_SIZE))):
        for moment, values in zip(moments, features(batch, training=True), strict=True):
            moment.add(values)
    for layer, moment in zip(layers, moments, strict=True):
        layer.moving_mean.assign(moment.mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(moment.variance.astype(layer.moving_variance.dtype))
    log.info(
        "batch norm: moving statistics of %d layers measured on %d training images",
        len(layers),
        len(images),
    )
    return len(layers)
