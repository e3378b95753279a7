"""Test-time flip averaging (train.tta: hflip): the model built in, and what looks inside it."""

import keras
import numpy as np
import pytest

from classifier.evaluation import insight
from classifier.model.architectures import build_model
from classifier.model.files import load_model
from classifier.model.temperature import logits_of, temperature_of, with_temperature
from classifier.model.tta import has_flip_average, single_view, with_flip_average
from classifier.serving import runtime


@pytest.fixture(scope="module")
def network() -> keras.Model:
    keras.utils.set_random_seed(3)
    return build_model("small_bn_cnn", (20, 24, 3), 3)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (8, 20, 24, 3), dtype=np.uint8)


def mirrored(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, :, ::-1, :])


def test_the_logits_are_the_mean_of_the_image_and_its_mirror(network, images):
    averaged = with_flip_average(network)
    expected = (logits_of(network, images) + logits_of(network, mirrored(images))) / 2
    np.testing.assert_allclose(logits_of(averaged, images), expected, atol=1e-5)
    # So a mirrored image gets the same answer, where the plain network's differs.
    assert np.abs(logits_of(network, images) - logits_of(network, mirrored(images))).max() > 1e-3
    np.testing.assert_allclose(
        averaged.predict(images, verbose=0),
        averaged.predict(mirrored(images), verbose=0),
        atol=1e-6,
    )
    assert (averaged.name, averaged.input_shape, averaged.output_shape) == (
        network.name,
        network.input_shape,
        network.output_shape,
    )
    assert averaged.count_params() == network.count_params()


def test_a_calibrated_flip_average_saves_and_loads_in_safe_mode(network, images, tmp_path):
    calibrated = with_temperature(with_flip_average(network), 2.5)
    calibrated.save(tmp_path / "model.keras")
    reloaded = load_model(str(tmp_path / "model.keras"))  # safe mode: built-in layers only
    assert has_flip_average(reloaded) and temperature_of(reloaded) == pytest.approx(2.5)
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0), calibrated.predict(images, verbose=0), atol=1e-6
    )
    # The served model's OOD features are the two views' averaged features.
    features = runtime.with_features(reloaded).predict(images, verbose=0)[runtime.FEATURES]
    trunk = keras.Model(network.inputs, network.layers[-1].input)
    expected = (trunk.predict(images, verbose=0) + trunk.predict(mirrored(images), verbose=0)) / 2
    np.testing.assert_allclose(features, expected, atol=1e-5)


def test_what_looks_inside_sees_the_network_on_the_image_as_it_is(network, images):
    averaged = with_temperature(with_flip_average(network), 2.0)
    single = single_view(averaged)
    assert not has_flip_average(single) and single_view(network) is network
    np.testing.assert_allclose(logits_of(single, images), logits_of(network, images), atol=1e-5)
    classes = np.arange(len(images)) % 3
    np.testing.assert_allclose(
        insight.grad_cam(averaged, images, classes),
        insight.grad_cam(network, images, classes),
        atol=1e-5,
    )
    maps, expected = insight.feature_maps(averaged, images), insight.feature_maps(network, images)
    assert list(maps) == list(expected)
    for name in expected:
        np.testing.assert_allclose(maps[name], expected[name], atol=1e-5)
    name, kernel = insight.first_filters(averaged)
    assert name == insight.first_filters(network)[0]
    np.testing.assert_array_equal(kernel, insight.first_filters(network)[1])


def test_only_a_dense_head_is_averaged_and_only_once(network):
    inputs = keras.Input((8, 8, 1), dtype="uint8")
    pooled = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    with pytest.raises(TypeError, match="must end in a Dense layer, ends in GlobalAveragePool"):
        with_flip_average(pooled)
    with pytest.raises(ValueError, match="already averages over the flipped image"):
        with_flip_average(with_flip_average(network))
