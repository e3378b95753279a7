import json
import os
import signal
import sys
import weakref

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from classifier.data.dataset import read_image_set
from classifier.errors import TrainingDiverged
from classifier.model.files import load_model
from classifier.model.temperature import logits_of
from classifier.model.tta import has_flip_average
from classifier.tracking import names
from classifier.training import augment, callbacks, loop, precision
from classifier.training.calibration import fit_temperature
from stages import train
from tests.helpers import DVC_EXPERIMENT, PROJECT_ROOT, TRAIN_EPOCHS, project_params


def test_train_writes_model_history_metrics_and_run_id(trained):
    history = pd.read_csv(trained.history_path)
    assert list(history.columns) == loop.HISTORY_COLUMNS
    assert list(history["epoch"]) == list(range(1, TRAIN_EPOCHS + 1))
    metrics = json.loads(trained.metrics_path.read_text())
    temperature = metrics.pop("temperature")
    assert metrics == pytest.approx(history.iloc[-1].drop("epoch").to_dict())
    assert temperature == trained.result.temperature != 1.0  # calibrated by default
    assert json.loads(trained.run_info_path.read_text())["run_id"] == trained.result.run_id
    # Three epochs on the digits already beat chance (10 %) by far.
    assert metrics["val_accuracy"] > 0.8


def test_saved_model_reloads_and_predicts_like_the_trained_one(trained):
    images = read_image_set(trained.data_dir / "test").images[:32]
    reloaded = load_model(str(trained.model_path))
    np.testing.assert_allclose(
        reloaded.predict(images, verbose=0),
        trained.result.model.predict(images, verbose=0),
        rtol=1e-6,
        atol=1e-6,
    )


def test_training_run_is_finished_with_params_epoch_metrics_and_tags(trained):
    client = mlflow.MlflowClient(tracking_uri=trained.store_uri)
    run = client.get_run(trained.result.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == DVC_EXPERIMENT
    assert run.data.params == {key: str(value) for key, value in trained.params.flat().items()}
    assert run.data.tags["dvc.exp_name"] == DVC_EXPERIMENT
    assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    what = run.data.tags["mlflow.note.content"].split("\n\n")[0]
    architecture = trained.params.train.architecture
    assert what.startswith(f"**{architecture}** on `{trained.params.data.source}` images")
    history = pd.read_csv(trained.history_path)
    for metric in ("train/loss", "train/accuracy", "val/loss", "val/accuracy"):
        logged = client.get_metric_history(run.info.run_id, metric)
        assert [m.step for m in logged] == list(range(1, TRAIN_EPOCHS + 1))
        assert [m.value for m in logged] == pytest.approx(list(history[names.keras_name(metric)]))
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "history.csv" in artifacts
    data_artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert data_artifacts == {"data/classes.json", "data/data.md"}


def test_training_run_records_each_split_as_a_dataset_input(trained):
    run = mlflow.MlflowClient(tracking_uri=trained.store_uri).get_run(trained.result.run_id)
    inputs = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert set(inputs) == {"training", "validation", "testing"}
    assert inputs["training"].name == "digits-train"
    assert len({dataset.digest for dataset in inputs.values()}) == 3  # three different splits
    assert json.loads(inputs["testing"].profile)["features_shape"] == [270, 28, 28, 1]


def run_statuses(store_uri: str) -> list[str]:
    """The status of every run in the test experiment of ``store_uri``."""
    client = mlflow.MlflowClient(tracking_uri=store_uri)
    experiment = client.get_experiment_by_name("tests")
    if experiment is None:  # nothing ever connected to the store
        return []
    return [run.info.status for run in client.search_runs([experiment.experiment_id])]


def train_two_epochs(data_dir, out_dir):
    """The train stage's run() with two epochs, writing into ``out_dir``."""
    return train.run(
        project_params(train={"epochs": 2}),
        data_dir=data_dir,
        outputs=train.TrainOutputs.under(out_dir),
    )


@pytest.mark.slow
def test_tta_hflip_saves_a_model_that_averages_each_image_with_its_mirror(
    prepared_digits, tmp_path, mlflow_store
):
    params = project_params(train={"epochs": 1, "tta": "hflip"})
    result = train.run(params, data_dir=prepared_digits, outputs=train.TrainOutputs.under(tmp_path))
    model = load_model(str(tmp_path / "model.keras"))
    assert has_flip_average(model)
    test = read_image_set(prepared_digits / "test").images
    mirrored = np.ascontiguousarray(test[:, :, ::-1])
    np.testing.assert_allclose(
        model.predict(test, verbose=0), model.predict(mirrored, verbose=0), atol=1e-6
    )
    # The temperature is fitted to the two views' averaged logits, the ones it divides.
    val = read_image_set(prepared_digits / "val")
    fitted = fit_temperature(logits_of(model, val.images), val.labels)
    assert result.temperature == pytest.approx(fitted, rel=1e-3)
    logged = mlflow.MlflowClient(tracking_uri=mlflow_store).get_run(result.run_id)
    assert logged.data.params["train.tta"] == "hflip"


def nan_model(input_shape, num_classes):
    """A model whose outputs, and so whose loss, are NaN from the first batch."""
    inputs = keras.Input(shape=input_shape, dtype="uint8")
    x = keras.layers.Rescaling(float("nan"))(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))


def test_diverging_training_fails_the_run_and_saves_no_model(
    prepared_digits, tmp_path, mlflow_store, monkeypatch
):
    monkeypatch.setattr(
        loop, "build_model", lambda _name, shape, classes: nan_model(shape, classes)
    )
    model_path = tmp_path / "model.keras"
    with pytest.raises(
        TrainingDiverged, match=r"training loss became nan at epoch 1, by batch \d+;"
    ):
        train_two_epochs(prepared_digits, tmp_path)
    assert not model_path.exists()
    assert not (tmp_path / "train_run.json").exists()
    assert run_statuses(mlflow_store) == ["FAILED"]


def test_train_main_exits_nonzero_on_missing_data_and_opens_no_run(
    tmp_path, mlflow_store, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the outputs' default paths: never the project's own
    params = str(PROJECT_ROOT / "params.yaml")
    code = train.main(["--params", params, "--data", str(tmp_path / "nothing")])
    assert code == 1
    assert capsys.readouterr().err.strip() == (
        f"train: error: {tmp_path / 'nothing' / 'train' / 'images.npy'}: missing; "
        "run the stage that writes it first"
    )
    assert (
        mlflow.MlflowClient(tracking_uri=mlflow_store).search_experiments(
            filter_string="name = 'tests'"
        )
        == []
    )


@pytest.mark.slow
def test_interrupted_training_ends_the_run_killed_and_saves_no_model(
    prepared_digits, tmp_path, mlflow_store, monkeypatch
):
    def interrupt(self, epoch, logs=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(callbacks.MlflowEpochLogger, "on_epoch_end", interrupt)
    model_path = tmp_path / "model.keras"
    with pytest.raises(KeyboardInterrupt):
        train_two_epochs(prepared_digits, tmp_path)
    assert not model_path.exists()
    assert run_statuses(mlflow_store) == ["KILLED"]


@pytest.mark.slow
def test_sigterm_lost_in_a_garbage_collector_callback_still_stops_training(
    prepared_digits, tmp_path, mlflow_store, monkeypatch, capsys
):
    """Python runs a signal handler between any two bytecodes; if that is inside a weakref
    callback its exception is printed and dropped. Training must stop all the same."""
    lost, dropped = [], []
    monkeypatch.setattr(sys, "unraisablehook", dropped.append)

    def lose_a_sigterm(self, batch, logs=None):
        if not lost:
            doomed = keras.layers.Layer()
            ref = weakref.ref(doomed, lambda _: os.kill(os.getpid(), signal.SIGTERM))
            del doomed
            lost.append(ref)

    monkeypatch.setattr(callbacks.StopOnNonFiniteLoss, "on_train_batch_end", lose_a_sigterm)
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["train"]["epochs"] = 2
    params.write_text(yaml.safe_dump(raw))
    model_path = tmp_path / "model.keras"
    outputs = {"run-info": "run.json", "history": "h.csv", "metrics": "m.json", "checkpoint": "c"}
    code = train.main(
        ["--params", str(params), "--data", str(prepared_digits), "--model", str(model_path)]
        + [arg for name, path in outputs.items() for arg in (f"--{name}", str(tmp_path / path))]
    )

    err = capsys.readouterr().err
    assert [type(u.exc_value).__name__ for u in dropped] == ["Terminated"]  # indeed lost
    assert code == 143
    assert err.strip().splitlines()[-1] == "train: terminated"
    assert not model_path.exists()
    assert run_statuses(mlflow_store) == ["KILLED"]


CPUINFO_AMX = "processor\t: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n\n"
CPUINFO_AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n"
CPUINFO_PLAIN = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\nbugs\t\t: amx_bf16\n"


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (CPUINFO_AMX, "mixed_bfloat16"),
        (CPUINFO_AVX512_BF16, "mixed_bfloat16"),
        (CPUINFO_PLAIN, "float32"),  # a flag name outside the flags line does not count
        ("", "float32"),  # no /proc/cpuinfo: macOS, Windows
    ],
)
def test_precision_auto_picks_bfloat16_only_on_cpus_with_bf16_flags(cpuinfo, expected):
    assert precision.resolve_precision("auto", cpuinfo) == expected


def test_explicit_precision_is_taken_as_it_is():
    assert precision.resolve_precision("float32", CPUINFO_AMX) == "float32"
    assert precision.resolve_precision("mixed_bfloat16", CPUINFO_PLAIN) == "mixed_bfloat16"


def train_one_epoch(data_dir, out_dir, callbacks=(), **overrides):
    """The train stage's run() for one epoch with ``overrides`` of train.*."""
    return train.run(
        project_params(train={"epochs": 1, **overrides}),
        data_dir=data_dir,
        outputs=train.TrainOutputs.under(out_dir),
        callbacks=callbacks,
    )


class StepsPerExecution(keras.callbacks.Callback):
    """Notes the steps per execution the model being fitted was compiled with."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[int] = set()

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.seen.add(self.model.steps_per_execution)


class ComputeDtype(keras.callbacks.Callback):
    """Notes the dtype the model being fitted computes in."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def on_train_batch_end(self, batch, logs=None) -> None:
        self.seen.add(self.model.compute_dtype)


@pytest.mark.slow
def test_steps_per_execution_changes_the_speed_not_the_result(
    prepared_digits, tmp_path, mlflow_store
):
    compiled = {steps: StepsPerExecution() for steps in (1, 7)}
    results = {
        steps: train_one_epoch(
            prepared_digits,
            tmp_path / str(steps),
            callbacks=[compiled[steps]],
            steps_per_execution=steps,
            precision="float32",
        )
        for steps in (1, 7)  # 7 does not divide the epoch's batches: a short last call
    }
    assert [compiled[steps].seen for steps in (1, 7)] == [{1}, {7}]
    pd.testing.assert_frame_equal(results[1].history, results[7].history)
    for one, seven in zip(results[1].model.weights, results[7].model.weights, strict=True):
        np.testing.assert_array_equal(one.numpy(), seven.numpy())


@pytest.mark.slow
def test_model_trained_in_bfloat16_is_saved_as_a_float32_model(
    prepared_digits, tmp_path, mlflow_store
):
    during = ComputeDtype()
    result = train_one_epoch(
        prepared_digits, tmp_path, callbacks=[during], precision="mixed_bfloat16"
    )
    assert during.seen == {"bfloat16"}  # it trained in bfloat16...
    assert keras.config.dtype_policy().name == "float32"  # the global policy is restored
    saved = load_model(str(tmp_path / "model.keras"))
    for model in (saved, result.model):
        assert model.compute_dtype == "float32"
        assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
        assert {weight.dtype for weight in model.weights} == {"float32"}
    images = read_image_set(prepared_digits / "test").images[:32]
    np.testing.assert_array_equal(
        saved.predict(images, verbose=0), result.model.predict(images, verbose=0)
    )
    assert result.history["val_accuracy"].iloc[-1] > 0.5


@pytest.mark.slow
def test_warmup_cosine_schedule_changes_the_logged_learning_rate(
    prepared_digits, tmp_path, mlflow_store
):
    def logged_rates(out_dir, **overrides):
        result = train.run(
            project_params(train={"epochs": 2, **overrides}),
            data_dir=prepared_digits,
            outputs=train.TrainOutputs.under(out_dir),
        )
        client = mlflow.MlflowClient(tracking_uri=mlflow_store)
        return [m.value for m in client.get_metric_history(result.run_id, "train/learning_rate")]

    assert logged_rates(tmp_path / "constant") == pytest.approx([0.001, 0.001])
    cosine = logged_rates(tmp_path / "cosine", schedule="warmup_cosine", warmup_epochs=1.0)
    # End of epoch 1: warmup done, at the peak; end of epoch 2: decayed to zero.
    assert cosine == pytest.approx([0.001, 0.0], abs=1e-6)


def test_learning_rate_schedule_warms_up_from_a_tenth_then_decays():
    cfg = project_params(
        train={"epochs": 4, "schedule": "warmup_cosine", "warmup_epochs": 1.0}
    ).train
    schedule = loop.learning_rate(cfg, steps_per_epoch=10)
    rates = [float(keras.ops.convert_to_numpy(schedule(step))) for step in (0, 10, 25, 40)]
    assert rates == pytest.approx([0.0001, 0.001, 0.0005, 0.0], abs=1e-7)


def test_shift_moves_each_image_by_up_to_two_pixels_the_same_for_the_same_seed():
    images = np.zeros((200, 28, 28, 1), np.uint8)
    images[:, 13, 13] = 255
    shifted = augment.shift_images(images, np.random.default_rng(0))
    positions = np.argwhere(shifted[..., 0] == 255)
    assert len(positions) == 200  # a dot two pixels from the centre stays in frame
    offsets = positions[:, 1:] - 13
    assert np.abs(offsets).max() == 2
    assert len({tuple(o) for o in offsets}) == 25  # all 5 x 5 shifts occur
    again = augment.shift_images(images, np.random.default_rng(0))
    np.testing.assert_array_equal(shifted, again)


def test_warp_rotates_clockwise_shifts_and_scales_about_the_centre():
    grid = np.arange(7 * 7 * 3, dtype=np.uint8).reshape(1, 7, 7, 3)
    no_shift = np.zeros((1, 2))

    def warp(degrees, scale, shift=no_shift):
        return augment.warp_images(grid, np.array([degrees]), np.array([scale]), shift)[0]

    np.testing.assert_array_equal(warp(0, 1), grid[0])
    np.testing.assert_array_equal(warp(90, 1), np.rot90(grid[0], k=-1))  # every channel
    moved = warp(0, 1, np.array([[1, -2]]))  # one row down, two columns left
    np.testing.assert_array_equal(moved[1:, :-2], grid[0, :-1, 2:])
    assert not moved[0].any() and not moved[:, -2:].any()  # the border is black
    dot = np.zeros((1, 9, 9, 1), np.uint8)
    dot[0, 4, 6] = 200  # two pixels right of the centre
    doubled = augment.warp_images(dot, np.array([0.0]), np.array([2.0]), no_shift)[0, ..., 0]
    assert doubled[4, 8] == 200 and doubled[4, 7] == 100  # 2 -> 4 pixels, bilinear between


def test_affine_augmentation_moves_each_image_within_bounds_the_same_for_the_same_seed():
    images = np.zeros((300, 28, 28, 1), np.uint8)
    images[:, 12:16, 12:16] = 255  # a square on the centre, which rotation and scale keep
    augmented = augment.affine_images(images, np.random.default_rng(0))
    weights = augmented[..., 0].astype(float)
    rows, cols = np.mgrid[:28, :28]
    centroids = np.stack(
        [(weights * axis).sum((1, 2)) / weights.sum((1, 2)) for axis in (rows, cols)], axis=1
    )
    offsets = centroids - 13.5
    assert np.abs(offsets).max() <= 2.05  # shifts of up to 2 pixels
    assert np.abs(offsets).max() > 1.5 and len(np.unique(augmented, axis=0)) == 300
    sizes = (augmented > 127).sum((1, 2, 3))
    assert sizes.min() < 16 < sizes.max()  # scaled down and up from 4 x 4
    again = augment.affine_images(images, np.random.default_rng(0))
    np.testing.assert_array_equal(augmented, again)


def test_photo_augmentation_flips_half_zooms_in_and_repeats_the_edges_never_black():
    images = np.full((400, 64, 64, 3), 60, np.uint8)
    images[:, :, :32, 0] = 250  # the left half red: a flip moves it right
    images[:, 24:40, 24:40, 1] = 250  # a green 16 x 16 square on the centre
    augmented = augment.augment_epoch(images, "photo", seed=7, epoch=3)
    assert augmented.shape == images.shape and augmented.dtype == np.uint8
    red = augmented[..., 0].astype(float)
    flipped = red[:, :, 32:].mean((1, 2)) > red[:, :, :32].mean((1, 2))
    assert 0.4 < flipped.mean() < 0.6
    # The crop only zooms in (60 to 100 % of the area): the square grows, up to 1/0.6.
    square = (augmented[..., 1] > augmented[..., 2] + 60).sum((1, 2))
    assert square.min() >= 0.8 * 256 and square.max() > 1.4 * 256
    # Rotations and crops sample past the edges: those repeat, no black corners.
    assert augmented.max(axis=-1).min() > 30
    np.testing.assert_array_equal(augmented, augment.augment_epoch(images, "photo", 7, 3))
    assert not np.array_equal(augmented, augment.augment_epoch(images, "photo", 7, 4))


def test_photo_augmentation_jitters_brightness_within_a_fifth_and_keeps_grey_grey():
    grey = np.full((300, 32, 32, 1), 128, np.uint8)
    values = augment.augment_epoch(grey, "photo", seed=0, epoch=0)
    means = values.reshape(300, -1).mean(1)
    assert (values == values[:, :1, :1]).all()  # a flat image stays flat
    assert means.min() >= 128 * 0.8 - 1 and means.max() <= 128 * 1.2 + 1
    assert means.max() - means.min() > 40  # brightness does vary


def test_jitter_colours_scales_brightness_contrast_and_saturation():
    rng = np.random.default_rng(0)
    images = rng.integers(40, 200, (3, 8, 8, 3)).astype(np.uint8)
    ones = np.ones(3, np.float32)
    same = augment.jitter_colours(images, ones, ones, ones)
    np.testing.assert_array_equal(same, images)
    half = augment.jitter_colours(images, ones / 2, ones, ones)
    assert np.abs(half.astype(int) - np.rint(images / 2)).max() <= 1
    flat = augment.jitter_colours(images, ones, ones * 0, ones)
    assert np.ptp(flat, axis=(1, 2)).max() <= 1  # no contrast: every pixel the mean grey
    grey = augment.jitter_colours(images, ones, ones, ones * 0)
    assert np.ptp(grey.astype(int), axis=-1).max() <= 1  # no saturation: R = G = B
    brighter = augment.jitter_colours(images, ones * 3, ones, ones)
    assert brighter.max() == 255  # clipped, not wrapped


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["shift", "affine"])
def test_augmentation_trains_and_leaves_the_saved_model_without_it(
    augment, prepared_digits, tmp_path, mlflow_store, monkeypatch
):
    fitted = []
    real_fit = keras.Model.fit

    def recording_fit(model, images, *args, **kwargs):
        fitted.append(np.array(images))
        return real_fit(model, images, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    result = train_one_epoch(prepared_digits, tmp_path, augment=augment, precision="float32")
    # What fit got is the epoch's shuffle of the training images, changed by the augmentation.
    train_images = read_image_set(prepared_digits / "train").images
    seed = project_params().train.seed
    shuffled = train_images[loop.epoch_order(seed, 0, len(train_images))]
    (images,) = fitted
    assert images.shape == shuffled.shape
    changed = np.mean(np.any(images != shuffled, axis=(1, 2, 3)))
    assert changed > 0.5, f"only {changed:.0%} of the images were augmented"
    layer_types = {
        type(layer).__name__ for layer in load_model(str(tmp_path / "model.keras")).layers
    }
    assert not any(name.startswith("Random") for name in layer_types)
    assert result.history["val_accuracy"].iloc[-1] > 0.3


def test_an_output_that_cannot_be_written_stops_train_before_any_epoch(
    prepared_digits, tmp_path, mlflow_store
):
    outputs = train.TrainOutputs.under(tmp_path)
    outputs.model.mkdir()  # a folder where the model file goes
    with pytest.raises(OSError, match=r"model\.keras: is a folder, where the output file goes"):
        train.run(project_params(), data_dir=prepared_digits, outputs=outputs)
    assert run_statuses(mlflow_store) == []  # no run opened: nothing was trained
    assert not outputs.checkpoint.exists()


@pytest.mark.slow
def test_the_progress_line_counts_epochs_out_of_the_runs_total(
    prepared_digits, tmp_path, mlflow_store, capsys
):
    train.run(
        project_params(train={"epochs": 2}),
        data_dir=prepared_digits,
        outputs=train.TrainOutputs.under(tmp_path),
    )
    printed = capsys.readouterr().out
    # One fit call per epoch (each on its own shuffle): Keras alone would print nothing for
    # the first (a fit of one epoch) and "Epoch 2/2" for the second.
    counted = [line.split()[1] for line in printed.splitlines() if line.startswith("Epoch ")]
    assert counted == ["1/2", "2/2"]
