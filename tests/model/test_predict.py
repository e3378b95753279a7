"""Keras's predict in batches of one shape: the same answers, one trace per model."""

import keras
import numpy as np
import pytest

from classifier.model.predict import padded, predict


def small_model() -> keras.Model:
    keras.utils.set_random_seed(5)
    pixels = keras.Input((8, 8, 1))
    features = keras.layers.Dense(4, name="features")(keras.layers.Flatten()(pixels / 255.0))
    return keras.Model(pixels, keras.layers.Dense(3, activation="softmax")(features))


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, (21, 8, 8, 1), dtype=np.uint8)


def test_padding_fills_the_last_batch_with_blank_images_and_leaves_one_batch_alone(images):
    batches, size = padded(images, 8)
    assert (batches.shape, size) == ((24, 8, 8, 1), 8)
    np.testing.assert_array_equal(batches[:21], images)
    assert not batches[21:].any() and batches.dtype == np.uint8
    # Fewer images than a batch: one batch of them, no padding.
    assert padded(images, 32) == (images, 21)


def test_predict_traces_once_and_answers_as_keras_does(images):
    model = small_model()
    ours = predict(model, images, 8)
    # A last batch of 5 would have traced Keras's predict step a second time.
    assert model.predict_function.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(ours, model.predict(images, batch_size=8, verbose=0), atol=1e-6)
    assert ours.shape == (21, 3)


def test_predict_cuts_every_output_of_a_model_with_several(images):
    model = small_model()
    both = keras.Model(
        model.inputs, {"p": model.outputs[0], "f": model.get_layer("features").output}
    )
    outputs = predict(both, images, 8)
    assert {name: value.shape[0] for name, value in outputs.items()} == {"p": 21, "f": 21}
