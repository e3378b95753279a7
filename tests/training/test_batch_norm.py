"""Batch norm's statistics in the saved model are the training images', after any run."""

import keras
import numpy as np
import pytest
from keras import layers

from classifier.data.dataset import read_image_set
from classifier.training import batch_norm
from stages import train
from tests.helpers import project_params


def conv_bn_model(inner: keras.Model | None = None) -> keras.Model:
    """uint8 images -> conv -> BN -> ReLU -> conv -> BN [-> a nested model] -> classes."""
    inputs = keras.Input((8, 8, 1), dtype="uint8")
    x = layers.Rescaling(1 / 255)(inputs)
    x = layers.Conv2D(4, 3, padding="same", name="conv1")(x)
    x = layers.BatchNormalization(name="bn1")(x)
    x = layers.ReLU()(x)
    x = layers.Conv2D(3, 3, padding="same", name="conv2")(x)
    x = layers.BatchNormalization(name="bn2")(x)
    if inner is not None:
        x = inner(x, training=False)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(2, activation="softmax")(x))


def outputs_of(model: keras.Model, tensor, images: np.ndarray) -> np.ndarray:
    """What ``model`` computes at ``tensor`` for ``images``, in inference mode."""
    return keras.ops.convert_to_numpy(keras.Model(model.input, tensor)(images, training=False))


def test_one_batch_gives_each_layer_the_exact_statistics_of_the_inputs_it_sees_when_served(
    monkeypatch,
):
    monkeypatch.setattr(batch_norm, "BATCH_SIZE", 300)
    keras.utils.set_random_seed(0)
    model = conv_bn_model()
    images = np.random.default_rng(0).integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
    assert batch_norm.recompute_statistics(model, images) == 2
    for name in ("bn1", "bn2"):
        layer = model.get_layer(name)
        # What the layer gets from the model with its new statistics, in inference mode.
        seen = outputs_of(model, layer.input, images)
        seen = seen.reshape(-1, seen.shape[-1]).astype(np.float64)
        np.testing.assert_allclose(layer.moving_mean.numpy(), seen.mean(axis=0), rtol=1e-4)
        np.testing.assert_allclose(layer.moving_variance.numpy(), seen.var(axis=0), rtol=1e-4)
    # So each layer's output over the training images is centred and of unit variance.
    out = outputs_of(model, model.get_layer("bn2").output, images)
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-3)
    np.testing.assert_allclose(out.var(axis=(0, 1, 2)), 1, atol=1e-2)


def test_statistics_over_several_batches_are_those_of_all_the_images(monkeypatch):
    keras.utils.set_random_seed(0)
    model = conv_bn_model()
    images = np.random.default_rng(1).integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
    monkeypatch.setattr(batch_norm, "BATCH_SIZE", 64)  # 5 batches of 60
    batch_norm.recompute_statistics(model, images)
    # The first layer's inputs do not depend on any batch norm: exactly all images'.
    first = model.get_layer("bn1")
    seen = outputs_of(model, first.input, images).reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(first.moving_mean.numpy(), seen.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(first.moving_variance.numpy(), seen.var(axis=0), rtol=1e-5)
    # The second's come through the first normalised by each batch, as in training: close
    # to what it sees when served, not equal.
    second = model.get_layer("bn2")
    seen = outputs_of(model, second.input, images).reshape(-1, 3).astype(np.float64)
    np.testing.assert_allclose(second.moving_mean.numpy(), seen.mean(axis=0), rtol=0.05)
    np.testing.assert_allclose(second.moving_variance.numpy(), seen.var(axis=0), rtol=0.1)


def test_a_large_training_set_is_measured_on_a_fixed_sample(monkeypatch):
    monkeypatch.setattr(batch_norm, "MAX_IMAGES", 100)
    images = np.random.default_rng(2).integers(0, 256, (300, 8, 8, 1), dtype=np.uint8)
    sample = batch_norm.measured_images(images)
    assert len(sample) == 100 and len(np.unique(sample.reshape(100, -1), axis=0)) == 100
    np.testing.assert_array_equal(sample, batch_norm.measured_images(images))  # fixed
    keras.utils.set_random_seed(0)
    model = conv_bn_model()
    batch_norm.recompute_statistics(model, images)
    layer = model.get_layer("bn1")
    seen = outputs_of(model, layer.input, sample)
    np.testing.assert_allclose(
        layer.moving_mean.numpy(), seen.reshape(-1, 4).mean(axis=0), rtol=1e-4
    )
    assert len(batch_norm.measured_images(images[:100])) == 100  # all of a small set


def test_a_nested_model_keeps_its_own_statistics_and_a_model_without_batch_norm_is_left_alone():
    inner_input = keras.Input((8, 8, 3))
    inner = keras.Model(
        inner_input, layers.BatchNormalization(name="pretrained_bn")(inner_input), name="inner"
    )
    kept = [weight.numpy().copy() for weight in inner.weights]
    model = conv_bn_model(inner)
    images = np.random.default_rng(1).integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
    assert [layer.name for layer in batch_norm.batch_norm_layers(model)] == ["bn1", "bn2"]
    batch_norm.recompute_statistics(model, images)
    for before, after in zip(kept, inner.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())
    plain = keras.Sequential([keras.Input((8, 8, 1)), layers.Flatten(), layers.Dense(2)])
    weights = [weight.numpy().copy() for weight in plain.weights]
    assert batch_norm.recompute_statistics(plain, images) == 0
    for before, after in zip(weights, plain.weights, strict=True):
        np.testing.assert_array_equal(before, after.numpy())


@pytest.mark.slow
def test_small_bn_cnn_trained_for_three_epochs_on_the_digits_is_over_90_percent_right(
    prepared_digits, tmp_path, mlflow_store
):
    # 120 steps: Keras's own moving averages (momentum 0.99) left it at 14 % on test images
    # while it scored 96 % in training.
    result = train.run(
        project_params(train={"architecture": "small_bn_cnn", "epochs": 3}),
        data_dir=prepared_digits,
        outputs=train.TrainOutputs.under(tmp_path),
    )
    test = read_image_set(prepared_digits / "test")
    predicted = result.model.predict(test.images, verbose=0).argmax(axis=1)
    assert np.mean(predicted == test.labels) >= 0.90
    # The validation curve is scored with the moving averages: they have caught up too.
    assert result.history["val_accuracy"].iloc[-1] >= 0.90
    # The saved statistics are the training images' own: measuring them again moves nothing.
    saved = [layer.moving_mean.numpy() for layer in batch_norm.batch_norm_layers(result.model)]
    batch_norm.recompute_statistics(result.model, read_image_set(prepared_digits / "train").images)
    for before, layer in zip(saved, batch_norm.batch_norm_layers(result.model), strict=True):
        np.testing.assert_allclose(before, layer.moving_mean.numpy(), rtol=1e-5, atol=1e-6)
