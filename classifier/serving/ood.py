"""How unlike the training images an image is, and when the served model abstains.

Two out-of-distribution (OOD) scores of the penultimate features, higher meaning further
from the training data:

- ``mahalanobis`` (Lee et al., 2018): the distance from the features to the nearest class
  mean of the training images, under their shared covariance (Ledoit-Wolf shrinkage, so
  units that never fire do not make it singular);
- ``energy`` (Liu et al., 2020): ``-T * logsumexp(logits / T)`` of the logits the features
  give through the model's last layer.

Both are a few matrix products on one image's features, done with ``np.einsum``, not
BLAS: BLAS's worker threads keep spinning after such a small product and took the cores
LiteRT then needed (a batch of 256 ran 3x slower). Export fits the statistics on the
training split and stores them with the registered model (:func:`save`); the served model
loads them (:func:`load`). ``benchmarks/ood.py`` measures which tells unfamiliar images
from test digits better (``serve.ood_score`` picks the served one).

The model abstains (``class_name`` null) on an image whose confidence is under the
threshold export chose on the validation split (``low_confidence``), or whose OOD score is
over the one it chose there (``out_of_distribution``, which wins when both hold).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SCORES = ("mahalanobis", "energy")
LOW_CONFIDENCE = "low_confidence"
OUT_OF_DISTRIBUTION = "out_of_distribution"
REASONS = (LOW_CONFIDENCE, OUT_OF_DISTRIBUTION)
# Arrays of the statistics file, beside the reference samples the monitor reads.
STATISTICS_KEYS = ("class_means", "whitening", "weights", "bias", "temperature")


def _product(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left @ right`` on this thread (see the module docstring for why not BLAS)."""
    return np.einsum("nd,de->ne", left, right)


@dataclass(frozen=True)
class Statistics:
    """What the scores need of the training data and of the model's last layer."""

    class_means: np.ndarray  # (classes, features): each class's mean training features
    whitening: np.ndarray  # (features, features): the shared precision is whitening @ whitening.T
    weights: np.ndarray  # (features, classes): the logits layer
    bias: np.ndarray  # (classes,)
    temperature: float
    whitened_means: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "whitened_means", self.class_means @ self.whitening)

    def mahalanobis(self, features: np.ndarray) -> np.ndarray:
        """Distance of each row of ``features`` to the nearest class mean, whitened."""
        whitened = _product(np.asarray(features, dtype=np.float64), self.whitening)
        squared = (
            np.sum(whitened**2, axis=1, keepdims=True)
            - 2 * _product(whitened, self.whitened_means.T)
            + np.sum(self.whitened_means**2, axis=1)
        )
        return np.sqrt(np.maximum(squared.min(axis=1), 0.0))

    def energy(self, features: np.ndarray) -> np.ndarray:
        """``-T * logsumexp(logits / T)``: low for images like the training ones."""
        logits = _product(np.asarray(features, dtype=np.float64), self.weights) + self.bias
        scaled = logits / self.temperature
        top = scaled.max(axis=1)
        return -self.temperature * (top + np.log(np.exp(scaled - top[:, None]).sum(axis=1)))

    def score(self, kind: str, features: np.ndarray) -> np.ndarray:
        """The ``kind`` score (one of SCORES) of each row of ``features``."""
        if kind == "mahalanobis":
            return self.mahalanobis(features)
        if kind == "energy":
            return self.energy(features)
        raise ValueError(f"unknown OOD score {kind!r}, expected one of {list(SCORES)}")


def fit(
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    weights: np.ndarray,
    bias: np.ndarray,
    temperature: float,
) -> Statistics:
    """Class means and the shared, shrunk covariance of the training ``features``."""
    from sklearn.covariance import LedoitWolf

    features = np.asarray(features, dtype=np.float64)
    means = np.stack(
        [
            features[labels == label].mean(axis=0)
            if np.any(labels == label)
            else features.mean(axis=0)
            for label in range(num_classes)
        ]
    )
    centred = features - means[labels]
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(centred).covariance_)
    # Symmetrise before the Cholesky factor: inv leaves rounding asymmetry.
    whitening = np.linalg.cholesky((precision + precision.T) / 2)
    return Statistics(
        means,
        whitening,
        np.asarray(weights, dtype=np.float64),
        np.asarray(bias, dtype=np.float64),
        float(temperature),
    )


def save(path: Path, statistics: Statistics, **reference: np.ndarray) -> None:
    """Write the statistics, and the ``reference`` arrays the monitor compares with, to
    ``path`` (an ``.npz`` of plain arrays: loading it runs no code)."""
    arrays = {key: np.asarray(getattr(statistics, key)) for key in STATISTICS_KEYS}
    np.savez(path, **arrays, **reference)


def load(path: Path) -> tuple[Statistics, dict[str, np.ndarray]]:
    """The statistics in ``path``, and its other (reference) arrays by name."""
    with np.load(path, allow_pickle=False) as stored:
        arrays = {key: stored[key] for key in stored.files}
    statistics = Statistics(
        *(arrays.pop(key) for key in STATISTICS_KEYS[:-1]), float(arrays.pop("temperature"))
    )
    return statistics, arrays


@dataclass(frozen=True)
class AbstainRule:
    """Answer only at or above ``confidence_threshold``, and at or under ``ood_threshold``."""

    confidence_threshold: float
    ood_threshold: float | None = None

    def reasons(
        self, confidence: np.ndarray, ood_scores: np.ndarray | None
    ) -> Sequence[str | None]:
        """Why the model abstains on each image (one of REASONS), None where it answers."""
        out = (
            np.zeros(len(confidence), dtype=bool)
            if ood_scores is None or self.ood_threshold is None
            else ood_scores > self.ood_threshold
        )
        low = confidence < self.confidence_threshold
        return [
            OUT_OF_DISTRIBUTION if far else LOW_CONFIDENCE if unsure else None
            for far, unsure in zip(out.tolist(), low.tolist(), strict=True)
        ]
