"""Temperature scaling: calibrated probabilities, built into the model that is saved.

A network trained to low loss is overconfident: its top probability says 0.99 where it is
right 80 % of the time. Dividing its logits by one number, the temperature ``T`` fitted on
the validation split (the ``T`` with the lowest cross-entropy there), fixes most of that
without changing any prediction (Guo et al., "On Calibration of Modern Neural Networks",
2017). The saved model ends ``logits -> Rescaling(1 / T) -> softmax``
(classifier/model/temperature.py), so evaluate, every exported format and the served
model all give the calibrated probabilities.
"""

from __future__ import annotations

import keras
import numpy as np

from classifier.data.dataset import ImageSet
from classifier.model.temperature import logits_of, with_temperature

# log(T) is searched in this range: T from 0.05 to 20.
LOG_T_BOUNDS = (-3.0, 3.0)


def cross_entropy(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    scaled = logits.astype(np.float64) / temperature
    scaled -= scaled.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(scaled).sum(axis=1))
    return float(np.mean(log_sum - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature with the lowest cross-entropy on (``logits``, ``labels``)."""
    from scipy.optimize import minimize_scalar

    found = minimize_scalar(
        lambda log_t: cross_entropy(logits, labels, float(np.exp(log_t))),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(found.x))


def calibrate(model: keras.Model, val: ImageSet) -> tuple[keras.Model, float]:
    """``model`` with the temperature fitted on ``val`` built in, and that temperature."""
    temperature = fit_temperature(logits_of(model, val.images), val.labels)
    return with_temperature(model, temperature), temperature
