"""Real conversions of a small trained CNN into every format, and parity on the digits."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from classifier.data.dataset import ImageSet, read_image_set
from classifier.errors import DataError
from classifier.export import formats
from classifier.export.formats import (
    FLOAT_TOLERANCE,
    FORMATS,
    INT8_MAX_ACCURACY_DROP,
    ExportError,
    ParityError,
    assert_parity,
    check_parity,
    export_formats,
    format_sizes,
    load_runner,
)

FLOAT_FORMATS = [fmt for fmt in FORMATS if fmt != "tflite_int8"]


@dataclass(frozen=True)
class Exported:
    """The session's trained model in every format, its runners, and parity on the test split."""

    paths: dict[str, Path]
    runners: dict[str, formats.Runner]
    test: ImageSet
    reference: np.ndarray
    report: dict[str, dict[str, float | bool]]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Exported:
    train = read_image_set(trained.data_dir / "train")
    test = read_image_set(trained.data_dir / "test")
    out_dir = tmp_path_factory.mktemp("formats")
    paths = export_formats(trained.model_path, train.images, out_dir)
    runners = {fmt: load_runner(fmt, path) for fmt, path in paths.items()}
    reference = runners["keras"](test.images)
    report = check_parity(reference, runners, test.images, test.labels)
    return Exported(paths, runners, test, reference, report)


def save_reference_cnn(path: Path, input_shape: tuple[int, int, int], classes: int, seed: int):
    """Save an untrained reference CNN with weights drawn from ``seed``."""
    import keras

    from classifier.model.architectures import reference_cnn

    keras.utils.set_random_seed(seed)
    reference_cnn(input_shape, classes).save(path)
    return path


@pytest.mark.slow
def test_export_writes_every_format_into_out_dir(exported, trained):
    assert tuple(exported.paths) == FORMATS
    assert exported.paths["keras"] == trained.model_path
    for fmt, file_name in formats.FILE_NAMES.items():
        assert exported.paths[fmt].name == file_name
        assert exported.paths[fmt].parent == exported.paths["onnx"].parent
        assert exported.paths[fmt].exists(), fmt
    assert (exported.paths["saved_model"] / "saved_model.pb").is_file()


@pytest.mark.slow
def test_every_format_matches_the_keras_model_on_the_test_split(exported):
    report = exported.report
    # A model that had learnt nothing would make the int8 accuracy bound meaningless.
    assert report["keras"]["accuracy"] > 0.8
    for fmt in FLOAT_FORMATS:
        assert report[fmt]["max_abs_diff"] <= FLOAT_TOLERANCE, fmt
        assert report[fmt]["accuracy_drop"] == 0, fmt
    assert report["tflite_int8"]["accuracy_drop"] <= INT8_MAX_ACCURACY_DROP
    # int8 probabilities are close but not float-close: the runner really runs integers.
    assert FLOAT_TOLERANCE < report["tflite_int8"]["max_abs_diff"] < 0.2
    assert all(figures["passed"] for figures in report.values())
    assert_parity(report)


@pytest.mark.slow
def test_the_float_tflite_file_has_the_bytes_of_keras_own_litert_export(exported, tmp_path):
    """The TFLite files are converted from the SavedModel export has just written, not
    from a second one: Keras's litert export, which writes its own, gives the same file."""
    import tensorflow as tf

    from classifier.model.files import load_model

    model = load_model(str(exported.paths["keras"]))
    path = tmp_path / "model.tflite"
    options = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}  # builtin ops only
    model.export(str(path), format="litert", verbose=False, target_spec=options)
    assert path.read_bytes() == exported.paths["tflite_float32"].read_bytes()


@pytest.mark.slow
def test_int8_model_is_integer_quantised(exported):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(exported.paths["tflite_int8"]))
    tensors = interpreter.get_tensor_details()
    int8_shapes = {tuple(tensor["shape"]) for tensor in tensors if tensor["dtype"] == np.int8}
    # The weights of conv1..conv3 (OHWI) and of both dense layers (out, in).
    assert {(32, 3, 3, 1), (64, 3, 3, 32), (64, 3, 3, 64), (64, 576), (10, 64)} <= int8_shapes
    # Float appears only at the edges: the cast of the uint8 pixels and the dequantised output.
    image_shape = exported.test.image_shape
    for tensor in tensors:
        if tensor["dtype"] == np.float32:
            assert tuple(tensor["shape"][1:]) in (image_shape, (10,)), tensor["name"]
    assert interpreter.get_input_details()[0]["dtype"] == np.uint8
    sizes = format_sizes(exported.paths)
    assert 3 <= sizes["tflite_float32"] / sizes["tflite_int8"] <= 4.5


@pytest.mark.slow
def test_check_parity_flags_formats_that_give_other_answers(exported, tmp_path):
    other_path = save_reference_cnn(tmp_path / "other.keras", (28, 28, 1), 10, seed=7)
    other = load_runner("keras", other_path)

    def shifted_classes(images: np.ndarray) -> np.ndarray:
        return np.roll(exported.runners["tflite_int8"](images), 1, axis=1)

    runners = {
        "saved_model": exported.runners["saved_model"],
        "onnx": other,
        "tflite_int8": shifted_classes,
    }
    test = exported.test
    report = check_parity(exported.reference, runners, test.images, test.labels, batch_size=64)
    assert report["saved_model"]["passed"]
    assert not report["onnx"]["passed"]
    assert report["onnx"]["max_abs_diff"] > 0.01
    assert not report["tflite_int8"]["passed"]
    assert report["tflite_int8"]["accuracy_drop"] > 0.5
    with pytest.raises(ParityError, match=r"onnx max_abs_diff .* > 1e-05") as error:
        assert_parity(report)
    assert "tflite_int8 accuracy_drop" in str(error.value)
    assert "> 0.005" in str(error.value)
    assert "saved_model" not in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize("batch_size", [1, 37])
def test_runners_accept_any_batch_size(exported, batch_size):
    images = exported.test.images[:batch_size]
    for fmt, runner in exported.runners.items():
        probabilities = runner(images)
        assert probabilities.shape == (batch_size, 10), fmt
        assert probabilities.dtype == np.float32, fmt
        # Same rows as in the full-batch run that check_parity made.
        full_batch = runner(exported.test.images)[:batch_size]
        np.testing.assert_allclose(probabilities, full_batch, atol=FLOAT_TOLERANCE, err_msg=fmt)


@pytest.mark.slow
def test_runners_reject_images_the_model_does_not_take(exported):
    images = exported.test.images[:2]
    for fmt, runner in exported.runners.items():
        with pytest.raises(
            DataError, match=rf"{fmt}: expected uint8 images of shape \(N, 28, 28, 1\)"
        ):
            runner(images.astype(np.float32))
        with pytest.raises(DataError, match=fmt):
            runner(images[:, :20])


@pytest.mark.slow
def test_rgb_non_square_model_exports_with_float_parity(tmp_path):
    model_path = save_reference_cnn(tmp_path / "rgb.keras", (32, 40, 3), 2, seed=0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 32, 40, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, 40)
    paths = export_formats(model_path, images[:30], tmp_path / "formats")
    runners = {fmt: load_runner(fmt, path) for fmt, path in paths.items()}
    reference = runners["keras"](images)
    report = check_parity(reference, runners, images, labels, batch_size=16)
    for fmt in FLOAT_FORMATS:
        assert report[fmt]["passed"], (fmt, report[fmt])
        assert report[fmt]["max_abs_diff"] <= FLOAT_TOLERANCE
    assert runners["tflite_int8"](images[:3]).shape == (3, 2)


@pytest.mark.slow
def test_export_rejects_calibration_images_of_another_shape(exported, tmp_path):
    wrong = np.zeros((4, 28, 28, 3), dtype=np.uint8)
    with pytest.raises(
        DataError, match=r"tflite_int8: .*\(N, 28, 28, 1\), got uint8 \(4, 28, 28, 3\)"
    ):
        export_formats(exported.paths["keras"], wrong, tmp_path / "formats")


def test_load_runner_names_unknown_formats_and_missing_files(tmp_path):
    with pytest.raises(ExportError, match=r"unknown format 'coreml', expected one of"):
        load_runner("coreml", tmp_path)
    with pytest.raises(ExportError, match=r"onnx: .*model\.onnx does not exist"):
        load_runner("onnx", tmp_path / "model.onnx")


def test_format_sizes_sums_the_files_of_a_directory(tmp_path):
    nested = tmp_path / "saved_model" / "variables"
    nested.mkdir(parents=True)
    (tmp_path / "saved_model" / "saved_model.pb").write_bytes(b"abc")
    (nested / "variables.data").write_bytes(b"12345")
    (tmp_path / "model.onnx").write_bytes(b"x" * 10)
    sizes = format_sizes({"saved_model": tmp_path / "saved_model", "onnx": tmp_path / "model.onnx"})
    assert sizes == {"saved_model": 8, "onnx": 10}
    with pytest.raises(ExportError, match=r"tflite_int8: .* does not exist"):
        format_sizes({"tflite_int8": tmp_path / "missing.tflite"})


@pytest.mark.parametrize(
    ("wrong", "passed", "p_value"),
    [
        (1, True, 0.5),  # a drop of exactly the bound passes
        (2, True, 0.25),  # over the bound, but two images out of two changed is no evidence
        (10, False, 0.5**10),  # over the bound, and real
    ],
)
def test_int8_fails_only_when_its_drop_exceeds_the_bound_and_is_real(wrong, passed, p_value):
    # 200 images, so one more mistake is a drop of exactly INT8_MAX_ACCURACY_DROP.
    labels = np.arange(200) % 10
    reference = np.eye(10, dtype=np.float32)[labels]
    int8 = reference.copy()
    int8[:wrong] = np.roll(int8[:wrong], 1, axis=1)
    images = np.arange(200, dtype=np.uint8).reshape(200, 1, 1, 1)

    def int8_runner(batch: np.ndarray) -> np.ndarray:
        return int8[batch[:, 0, 0, 0]]

    report = check_parity(reference, {"tflite_int8": int8_runner}, images, labels, batch_size=64)
    figures = report["tflite_int8"]
    assert figures["accuracy_drop"] == wrong / 200
    assert (figures["lost_images"], figures["gained_images"]) == (wrong, 0)
    assert figures["p_value"] == pytest.approx(p_value)
    assert figures["passed"] is passed


@pytest.mark.slow
def test_a_flip_averaging_model_exports_with_float_parity(tmp_path):
    """train.tta: hflip: the network runs twice (the image and its mirror) inside one model;
    every float format averages the same two views, so gives the same answers."""
    import keras

    from classifier.model.architectures import build_model
    from classifier.model.temperature import with_temperature
    from classifier.model.tta import with_flip_average

    keras.utils.set_random_seed(0)
    model = with_temperature(with_flip_average(build_model("photo_resnet", (32, 32, 3), 2)), 1.3)
    model_path = tmp_path / "flip.keras"
    model.save(model_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    paths = export_formats(model_path, images[:16], tmp_path / "formats")
    runners = {fmt: load_runner(fmt, path) for fmt, path in paths.items()}
    report = check_parity(runners["keras"](images), runners, images, rng.integers(0, 2, 24), 8)
    for fmt in FLOAT_FORMATS:
        assert report[fmt]["max_abs_diff"] <= FLOAT_TOLERANCE, (fmt, report[fmt])
        mirrored = np.ascontiguousarray(images[:, :, ::-1])
        np.testing.assert_allclose(runners[fmt](mirrored), runners[fmt](images), atol=1e-5)


@pytest.mark.slow
def test_a_backbone_with_a_temperature_exports_with_float_parity(tmp_path):
    """A transfer-learning model (a nested keras.applications network, its own
    preprocessing inside) and a calibrated head: every float format gives its answers."""
    import keras

    from classifier.model.architectures import build_model
    from classifier.model.temperature import with_temperature

    keras.utils.set_random_seed(0)
    model = with_temperature(build_model("mobilenet_v3_small", (32, 32, 3), 3), 1.7)
    model_path = tmp_path / "backbone.keras"
    model.save(model_path)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 24)
    paths = export_formats(model_path, images[:16], tmp_path / "formats")
    runners = {fmt: load_runner(fmt, path) for fmt, path in paths.items()}
    reference = runners["keras"](images)
    report = check_parity(reference, runners, images, labels, batch_size=8)
    for fmt in FLOAT_FORMATS:
        assert report[fmt]["max_abs_diff"] <= FLOAT_TOLERANCE, (fmt, report[fmt])
