"""Temperature scaling: fitted on the validation split, built into the saved model."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from classifier.data.dataset import read_image_set
from classifier.model.architectures import build_model
from classifier.model.files import load_model
from classifier.model.temperature import logits_of, temperature_of, with_temperature
from classifier.training.calibration import cross_entropy, fit_temperature


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (20_000, 5))
    true_temperature = 2.5
    labels = np.array([rng.choice(5, p=row) for row in softmax(logits / true_temperature)])
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    assert cross_entropy(logits, labels, fitted) < cross_entropy(logits, labels, 1.0)


def test_a_model_with_a_temperature_divides_its_logits_and_keeps_every_prediction(tmp_path):
    keras.utils.set_random_seed(1)
    model = build_model("reference_cnn", (28, 28, 1), 10)
    images = np.random.default_rng(1).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
    calibrated = with_temperature(model, 3.0)
    logits = logits_of(model, images)
    expected = softmax(logits / 3.0)
    np.testing.assert_allclose(calibrated.predict(images, verbose=0), expected, atol=1e-5)
    np.testing.assert_allclose(model.predict(images, verbose=0), softmax(logits), atol=1e-5)
    # Saved and loaded safely, with built-in layers only; the temperature travels with it.
    calibrated.save(tmp_path / "model.keras")
    reloaded = load_model(str(tmp_path / "model.keras"))
    assert temperature_of(reloaded) == pytest.approx(3.0)
    assert temperature_of(model) == 1.0
    np.testing.assert_allclose(reloaded.predict(images, verbose=0), expected, atol=1e-5)


def test_training_builds_in_the_temperature_that_fits_the_validation_split_best(trained):
    model = load_model(str(trained.model_path))
    temperature = temperature_of(model)
    assert temperature == pytest.approx(trained.result.temperature)
    val = read_image_set(trained.data_dir / "val")
    logits = logits_of(model, val.images)
    best = cross_entropy(logits, val.labels, temperature)
    for other in (temperature * 0.8, temperature * 1.25, 1.0):
        assert best <= cross_entropy(logits, val.labels, other) + 1e-9
