"""Transfer learning, offline: pretrained backbone weights, a frozen phase, fine-tuning."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from classifier.config import parse_params
from classifier.data.dataset import CLASSES_FILE, ImageSet, write_image_set
from classifier.errors import ParamsError
from classifier.model.architectures import BACKBONE_LAYER, build_model
from classifier.model.files import load_model
from classifier.training import transfer
from stages import train
from tests.helpers import PROJECT_ROOT, project_params

SHAPE = (32, 32, 3)  # the smallest a MobileNetV3 takes


@pytest.fixture
def photos(tmp_path):
    """Prepared splits of 32x32 RGB images: bright on the left (class 0) or the right."""
    rng = np.random.default_rng(0)
    prepared = tmp_path / "prepared"
    for split, count in (("train", 48), ("val", 12), ("test", 12)):
        labels = np.arange(count) % 2
        images = rng.integers(0, 60, (count, *SHAPE), dtype=np.uint8)
        for index, label in enumerate(labels):
            half = slice(0, 16) if label == 0 else slice(16, 32)
            images[index, :, half] += 180
        write_image_set(prepared / split, ImageSet(images, labels, ("left", "right")))
    (prepared / CLASSES_FILE).write_text('["left", "right"]\n')
    return prepared


def backbone_params(**train_values):
    values = {"architecture": "mobilenet_v3_small", "epochs": 1, "batch_size": 16,
              "precision": "float32", "calibrate": False, **train_values}  # fmt: skip
    return project_params(train=values)


def saved_backbone_weights(path, architecture="mobilenet_v3_small", seed=3):
    """A .weights.h5 of a randomly initialised backbone, as a user would place one."""
    keras.utils.set_random_seed(seed)
    model = build_model(architecture, SHAPE, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.get_layer(BACKBONE_LAYER).save_weights(path)
    return {w.path: w.numpy() for w in model.get_layer(BACKBONE_LAYER).weights}


class BackboneWeights(keras.callbacks.Callback):
    """The backbone's weights at the end of each epoch, by variable path."""

    def __init__(self) -> None:
        super().__init__()
        self.by_epoch: list[dict[str, np.ndarray]] = []

    def on_epoch_end(self, epoch, logs=None) -> None:
        backbone = self.model.get_layer(BACKBONE_LAYER)
        self.by_epoch.append({w.path: w.numpy().copy() for w in backbone.weights})


@pytest.mark.slow
def test_a_backbone_takes_uint8_pixels_grey_or_rgb():
    for shape in (SHAPE, (32, 32, 1)):
        model = build_model("mobilenet_v3_small", shape, 3)
        assert model.inputs[0].dtype == "uint8"
        images = np.full((2, *shape), 200, np.uint8)
        assert model.predict(images, verbose=0).shape == (2, 3)


@pytest.mark.slow
def test_pretrained_weights_load_the_head_trains_frozen_then_the_top_fine_tunes(
    photos, tmp_path, mlflow_store, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    loaded = saved_backbone_weights(tmp_path / "pretrained" / "random.weights.h5")
    seen = BackboneWeights()
    params = backbone_params(
        pretrained="pretrained/random.weights.h5", fine_tune_layers=12, fine_tune_epochs=1,
        fine_tune_learning_rate=0.01,
    )  # fmt: skip
    result = train.run(
        params, data_dir=photos, outputs=train.TrainOutputs.under(tmp_path / "out"),
        callbacks=[seen],
    )  # fmt: skip
    assert list(result.history["epoch"]) == [1, 2]  # one epoch per phase
    after_phase_1, after_phase_2 = seen.by_epoch
    # Phase 1: the backbone is exactly the file's.
    for path, value in loaded.items():
        np.testing.assert_array_equal(after_phase_1[path], value, err_msg=path)
    # Phase 2: the top layers moved; the rest, batch norm included, did not.
    backbone = build_model("mobilenet_v3_small", SHAPE, 2).get_layer(BACKBONE_LAYER)
    top = {layer.name for layer in backbone.layers[-12:]}
    norms = {
        layer.name
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    moved = {path for path in loaded if not np.array_equal(after_phase_2[path], loaded[path])}
    moved_layers = {path.split("/")[0] for path in moved}
    assert moved_layers and moved_layers <= top - norms
    saved = load_model(str(tmp_path / "out" / "model.keras"))
    assert saved.output_shape == (None, 2)


def test_a_file_that_is_not_weights_is_one_line(photos, tmp_path, mlflow_store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "notes.weights.h5").write_text("not weights")
    params = backbone_params(pretrained="pretrained/notes.weights.h5")
    message = r"^train\.pretrained: pretrained/notes\.weights\.h5 does not load into "
    with pytest.raises(ParamsError, match=message + r"mobilenet_v3_small \(32x32x3\): "):
        train.run(params, data_dir=photos, outputs=train.TrainOutputs.under(tmp_path / "out"))


@pytest.mark.slow
def test_weights_of_another_backbone_are_one_line(photos, tmp_path, mlflow_store, monkeypatch):
    monkeypatch.chdir(tmp_path)
    saved_backbone_weights(tmp_path / "pretrained" / "other.weights.h5", "efficientnet_v2_b0")
    params = backbone_params(pretrained="pretrained/other.weights.h5")
    with pytest.raises(ParamsError, match=r"does not load into mobilenet_v3_small"):
        train.run(params, data_dir=photos, outputs=train.TrainOutputs.under(tmp_path / "out"))


def test_imagenet_offline_with_nothing_cached_names_the_file_and_where(
    photos, tmp_path, mlflow_store, monkeypatch
):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    params = backbone_params(pretrained="imagenet")
    expected = (
        tmp_path
        / "keras-home"
        / "models"
        / ("weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5")
    )
    with pytest.raises(ParamsError) as raised:
        train.run(params, data_dir=photos, outputs=train.TrainOutputs.under(tmp_path / "out"))
    assert str(raised.value).startswith(
        f"train.pretrained: imagenet: {expected} is not in Keras's cache"
    )
    assert f"place {expected.name} there" in str(raised.value)


def test_pretrained_weights_on_a_network_that_is_not_a_backbone_are_refused():
    import yaml

    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["train"].update(architecture="reference_cnn", pretrained="imagenet")
    with pytest.raises(ParamsError, match=r"train\.pretrained: imagenet applies to the backbones"):
        parse_params(raw)


def test_only_a_weights_file_under_pretrained_is_taken():
    with pytest.raises(ParamsError, match=r"expected none, imagenet or a pretrained/<name>"):
        backbone_params(pretrained="/tmp/elsewhere.weights.h5")
    assert transfer.total_epochs(backbone_params(fine_tune_layers=3, fine_tune_epochs=2).train) == 3
