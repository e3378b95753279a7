import keras
import numpy as np
import pytest

from classifier.errors import ParamsError
from classifier.model.architectures import build_model


def test_reference_cnn_is_the_original_design():
    model = build_model("reference_cnn", (28, 28, 1), 10)
    layers = [
        (type(layer).__name__, getattr(layer, "filters", None) or getattr(layer, "units", None))
        for layer in model.layers
    ]
    assert layers == [
        ("InputLayer", None),
        ("Rescaling", None),
        ("Conv2D", 32),
        ("MaxPooling2D", None),
        ("Conv2D", 64),
        ("MaxPooling2D", None),
        ("Conv2D", 64),
        ("Flatten", None),
        ("Dense", 64),
        ("Dense", 10),
    ]
    assert all(
        layer.kernel_size == (3, 3) for layer in model.layers if hasattr(layer, "kernel_size")
    )
    assert model.count_params() == 93_322
    assert model.layers[-1].activation is keras.activations.softmax


def test_reference_cnn_takes_raw_uint8_pixels_and_scales_them_itself():
    model = build_model("reference_cnn", (28, 28, 1), 10)
    assert model.inputs[0].dtype == "uint8"
    scale = model.get_layer("scale")
    assert scale.scale == pytest.approx(1 / 255)
    probabilities = model.predict(np.full((2, 28, 28, 1), 255, np.uint8), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_reference_cnn_builds_for_rgb_images_of_other_sizes():
    model = build_model("reference_cnn", (64, 64, 3), 2)
    assert model.output_shape == (None, 2)
    assert model.predict(np.zeros((1, 64, 64, 3), np.uint8), verbose=0).shape == (1, 2)


def test_too_small_images_are_a_clear_error():
    with pytest.raises(ParamsError, match=r"at least 18x18, got 16x28"):
        build_model("reference_cnn", (16, 28, 1), 10)


def test_unknown_architecture_is_named():
    with pytest.raises(ParamsError, match=r"unknown architecture 'resnet9000'"):
        build_model("resnet9000", (28, 28, 1), 10)


def test_small_bn_cnn_has_under_100k_parameters_and_scales_itself():
    model = build_model("small_bn_cnn", (28, 28, 1), 10)
    assert model.count_params() == 72_770
    assert model.inputs[0].dtype == "uint8"
    assert model.get_layer("scale").scale == pytest.approx(1 / 255)
    assert any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    assert isinstance(model.get_layer("average"), keras.layers.GlobalAveragePooling2D)


def test_small_bn_cnn_builds_for_rgb_images_of_other_sizes():
    model = build_model("small_bn_cnn", (48, 64, 3), 2)
    assert model.count_params() < 100_000
    assert model.predict(np.zeros((1, 48, 64, 3), np.uint8), verbose=0).shape == (1, 2)


def test_small_bn_cnn_refuses_images_too_small_to_pool_twice():
    with pytest.raises(ParamsError, match=r"small_bn_cnn needs images of at least 4x4, got 3x8"):
        build_model("small_bn_cnn", (3, 8, 1), 10)
