import json

import mlflow
import numpy as np
import pytest

from classifier.config import ExportParams
from classifier.data.dataset import CLASSES_FILE, ImageSet, read_image_set, write_image_set
from classifier.export import formats, promotion
from classifier.model.architectures import build_model
from classifier.model.files import load_model
from classifier.serving.pyfunc import png_frame, probabilities_of
from classifier.tracking import registry, runs, store
from classifier.tracking.store import TrackingError
from stages import export
from stages.export import ExportOutputs
from tests.helpers import TEST_EXPERIMENT


@pytest.fixture
def model_name(request) -> str:
    """A registered-model name of this test's own, in the session's shared store."""
    return f"test-{request.node.name}".replace("_", "-").replace("[", "-").replace("]", "")[:100]


def params(name: str, floor: float = 0.5, margin: float = 0.0, int8: float = 0.005) -> ExportParams:
    return ExportParams(
        model_name=name, accuracy_floor=floor, promotion_margin=margin, int8_max_accuracy_drop=int8
    )


def run_export(trained, tmp_path, cfg, model_path=None, tag="export", run_info_path=None):
    return export.run(
        cfg,
        resize="stretch",
        data_dir=trained.data_dir,
        model_path=model_path or trained.model_path,
        run_info_path=run_info_path or trained.run_info_path,
        outputs=ExportOutputs(
            formats=tmp_path / f"{tag}-formats",
            format_metrics=tmp_path / f"{tag}-formats.json",
            registered=tmp_path / f"{tag}.json",
            decision=tmp_path / f"{tag}-decision.json",
        ),
    )


@pytest.fixture(scope="module")
def untrained_model_path(tmp_path_factory):
    """The reference CNN with its initial weights: about 10 % accurate on the digits."""
    import keras

    keras.utils.set_random_seed(0)
    path = tmp_path_factory.mktemp("untrained") / "model.keras"
    build_model("reference_cnn", (28, 28, 1), 10).save(path)
    return path


@pytest.mark.parametrize(
    ("candidate", "champion", "promoted", "reason"),
    [
        (0.80, None, False, "test accuracy 0.8000 is below the floor 0.9"),
        (0.95, None, True, "first model to clear the floor 0.9"),
        (
            0.96,
            0.95,
            True,
            "beats champion version 3 (0.9500) by +0.0100, at least the margin 0.01",
        ),
        (0.955, 0.95, False, "does not beat champion version 3 (0.9500) by +0.0050; the margin"),
        (0.85, 0.70, False, "test accuracy 0.8500 is below the floor 0.9"),
    ],
)
def test_decide_needs_the_floor_then_the_margin(candidate, champion, promoted, reason):
    cfg = params("m", floor=0.9, margin=0.01)
    decision = promotion.decide(candidate, champion, cfg, 3 if champion else None)
    assert decision.promoted is promoted
    assert decision.reason.startswith(reason)
    assert decision.alias == ("champion" if promoted else "challenger")


def test_first_model_above_the_floor_becomes_champion_and_serves_like_keras(
    trained, trained_store, tmp_path, model_name
):
    record = run_export(trained, tmp_path, params(model_name))
    assert json.loads((tmp_path / "export.json").read_text()) == record
    assert (record["version"], record["alias"], record["run_id"]) == (
        1,
        "champion",
        trained.result.run_id,
    )
    decision = json.loads((tmp_path / "export-decision.json").read_text())
    assert decision["promoted"] is True and decision["champion_accuracy"] is None

    client = mlflow.MlflowClient(tracking_uri=trained_store)
    version = client.get_model_version_by_alias(model_name, "champion")
    assert (int(version.version), version.run_id) == (1, trained.result.run_id)
    assert version.tags["promotion.decision"] == "champion"
    assert float(version.tags["promotion.candidate_accuracy"]) == pytest.approx(
        decision["candidate_accuracy"]
    )

    mlflow.set_tracking_uri(trained_store)
    served = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    images = read_image_set(trained.data_dir / "test").images[:50]
    np.testing.assert_allclose(
        probabilities_of(served.predict(png_frame(images))),
        load_model(str(trained.model_path)).predict(images, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_every_format_is_written_checked_and_recorded_in_dvc_metrics_and_the_run(
    trained, trained_store, tmp_path, model_name
):
    run_export(trained, tmp_path, params(model_name))
    report = json.loads((tmp_path / "export-formats.json").read_text())
    assert sorted(report) == sorted(formats.FORMATS)
    for name, path in formats.FILE_NAMES.items():
        assert (tmp_path / "export-formats" / path).exists()
        assert report[name]["passed"] is True
        assert report[name]["size_bytes"] > 0
    assert report["onnx"]["max_abs_diff"] <= formats.FLOAT_TOLERANCE
    assert report["tflite_int8"]["size_bytes"] < report["tflite_float32"]["size_bytes"] / 3

    client = mlflow.MlflowClient(tracking_uri=trained_store)
    run = client.get_run(trained.result.run_id)
    assert run.data.metrics["format.tflite_int8.size_bytes"] == report["tflite_int8"]["size_bytes"]
    assert run.data.metrics["format.onnx.max_abs_diff"] == pytest.approx(
        report["onnx"]["max_abs_diff"]
    )
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "formats")}
    assert {"formats/model.onnx", "formats/model_int8.tflite", "formats/saved_model"} <= logged


def test_a_format_that_fails_parity_fails_export_before_anything_is_registered(
    trained, trained_store, tmp_path, model_name, monkeypatch
):
    real_runner = formats.load_runner

    def drifting_runner(fmt, path):
        runner = real_runner(fmt, path)
        if fmt != "onnx":
            return runner
        return lambda images: np.roll(runner(images), 1, axis=1)

    monkeypatch.setattr(formats, "load_runner", drifting_runner)
    with pytest.raises(formats.ParityError, match=r"onnx max_abs_diff [0-9.]+ > 1e-05"):
        run_export(trained, tmp_path, params(model_name))
    assert not list(tmp_path.iterdir())
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    assert client.search_registered_models(filter_string=f"name = '{model_name}'") == []
    # The training run finished; export says how it ended without changing that.
    run = client.get_run(trained.result.run_id)
    assert (run.info.status, run.data.tags["export.outcome"]) == ("FINISHED", "FAILED")


def test_ctrl_c_during_export_registers_nothing_and_leaves_the_training_run_finished(
    trained, trained_store, tmp_path, model_name, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(formats, "export_and_check", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_export(trained, tmp_path, params(model_name))
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    assert client.search_registered_models(filter_string=f"name = '{model_name}'") == []
    run = client.get_run(trained.result.run_id)
    assert (run.info.status, run.data.tags["export.outcome"]) == ("FINISHED", "KILLED")


def test_an_output_that_cannot_be_written_stops_export_before_anything_is_registered(
    trained, trained_store, tmp_path, model_name, monkeypatch
):
    (tmp_path / "export.json").mkdir()  # where the registration record goes
    called = []
    monkeypatch.setattr(formats, "export_and_check", lambda *a, **k: called.append(a))
    with pytest.raises(OSError, match=r"export\.json: is a folder, where the output file goes"):
        run_export(trained, tmp_path, params(model_name))
    assert called == []  # refused before any work
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    assert client.search_registered_models(filter_string=f"name = '{model_name}'") == []


def test_a_registry_that_fails_at_the_last_step_leaves_no_version_and_no_record(
    trained, trained_store, tmp_path, model_name, monkeypatch
):
    run_export(trained, tmp_path, params(model_name), tag="first")  # version 1, @champion

    def refused(*args, **kwargs):
        raise TrackingError("MLflow store: permission denied")

    monkeypatch.setattr(registry, "register_version", refused)
    with pytest.raises(TrackingError, match="permission denied"):
        run_export(trained, tmp_path, params(model_name), tag="second")
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert [int(v.version) for v in versions] == [1]
    assert int(client.get_model_version_by_alias(model_name, "champion").version) == 1
    assert not (tmp_path / "second.json").exists()


def test_first_model_below_the_floor_is_only_a_challenger(
    trained, trained_store, tmp_path, model_name
):
    record = run_export(trained, tmp_path, params(model_name, floor=0.9999))
    assert record["alias"] == "challenger"
    assert "below the floor" in record["decision"]["reason"]
    assert registry.aliased_model(model_name, "champion") is None


@pytest.mark.slow
def test_the_better_model_is_promoted_and_a_worse_one_never_moves_the_champion(
    trained, trained_store, tmp_path, model_name, untrained_model_path
):
    # An untrained model's int8 copy may differ a lot: only promotion is tested here.
    cfg = params(model_name, floor=0.01, margin=0.02, int8=1.0)
    weak = run_export(trained, tmp_path, cfg, untrained_model_path, tag="weak")
    strong = run_export(trained, tmp_path, cfg, tag="strong")
    weak_again = run_export(trained, tmp_path, cfg, untrained_model_path, tag="weak-again")

    assert [r["alias"] for r in (weak, strong, weak_again)] == [
        "champion",
        "champion",
        "challenger",
    ]
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    assert int(client.get_model_version_by_alias(model_name, "champion").version) == 2
    assert int(client.get_model_version_by_alias(model_name, "challenger").version) == 3

    decision = json.loads((tmp_path / "weak-again-decision.json").read_text())
    assert decision["promoted"] is False
    assert decision["champion_version"] == 2
    assert decision["champion_accuracy"] > 0.8 > decision["candidate_accuracy"]
    assert weak_again["decision"]["reason"].startswith("does not beat champion version 2")
    assert client.get_model_version(model_name, "3").tags["promotion.decision"] == "challenger"


def test_failed_export_registers_nothing_and_writes_no_record(
    trained, trained_store, tmp_path, model_name
):
    run_info = tmp_path / "run" / "train_run.json"
    run_info.parent.mkdir()
    run_info.write_text(json.dumps({"run_id": "0" * 32}))
    with pytest.raises(TrackingError, match=r"MLflow store sqlite:///.*: no run 0{32}$"):
        run_export(trained, tmp_path, params(model_name), run_info_path=run_info)
    assert [path.name for path in tmp_path.iterdir()] == ["run"]
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    assert client.search_registered_models(filter_string=f"name = '{model_name}'") == []


FOREIGN_CHAMPION = "foreign-champion-test"


@pytest.fixture(scope="module")
def digits_champion(trained):
    """The session's digits model registered as FOREIGN_CHAMPION@champion (28x28x1, 0-9)."""
    test = read_image_set(trained.data_dir / "test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", trained.store_uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        store.connect()
        logged = registry.log_served_model(
            trained.result.run_id,
            trained.model_path,
            trained.data_dir / CLASSES_FILE,
            "stretch",
            png_frame(test.images[:2]),
            registry.ModelInterface(test.class_names, test.image_shape),
        )
        return registry.register_version(FOREIGN_CHAMPION, logged, "champion")


def candidate_of(root, class_names, shape):
    """Prepared splits, an untrained model and a finished training run for images of
    ``shape`` in ``class_names``: what export gets after training on other data."""
    rng = np.random.default_rng(0)
    prepared = root / "prepared"
    for split, count in (("train", 12), ("test", 6)):
        images = rng.integers(0, 256, (count, *shape), dtype=np.uint8)
        labels = np.arange(count) % len(class_names)
        write_image_set(prepared / split, ImageSet(images, labels, tuple(class_names)))
    (prepared / CLASSES_FILE).write_text(json.dumps(list(class_names)))
    model_path = root / "model.keras"
    build_model("reference_cnn", shape, len(class_names)).save(model_path)
    with runs.training_run({"data.source": "other"}) as run_id:
        pass
    run_info = root / "train_run.json"
    run_info.write_text(json.dumps({"run_id": run_id}))
    return prepared, model_path, run_info


DIGITS = tuple("0123456789")


@pytest.mark.parametrize(
    ("class_names", "shape", "difference"),
    [
        (("cat", "dog"), (28, 28, 1), "other classes"),
        (DIGITS[::-1], (28, 28, 1), "the same classes in another order"),
        (DIGITS, (32, 32, 1), "images of another size"),
        (DIGITS, (28, 28, 3), "images of other channels"),
    ],
    ids=["classes", "order", "size", "channels"],
)
def test_a_champion_of_other_classes_or_images_is_never_compared_and_nothing_moves(
    digits_champion, trained_store, tmp_path, class_names, shape, difference
):
    prepared, model_path, run_info = candidate_of(tmp_path, class_names, shape)
    outputs = ExportOutputs.under(tmp_path / "out")
    with pytest.raises(export.IncomparableChampion) as raised:
        export.run(
            params(FOREIGN_CHAMPION, floor=0.0),
            resize="stretch",
            data_dir=prepared,
            model_path=model_path,
            run_info_path=run_info,
            outputs=outputs,
        )
    message = str(raised.value)
    assert f"{FOREIGN_CHAMPION}@champion (version {digits_champion['version']}) answers" in message
    assert f": {difference}, so the two cannot be compared" in message
    assert "dvc exp run -S export.model_name=" in message
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    versions = client.search_model_versions(f"name = '{FOREIGN_CHAMPION}'")
    assert [int(v.version) for v in versions] == [digits_champion["version"]]
    champion = client.get_model_version_by_alias(FOREIGN_CHAMPION, "champion")
    assert int(champion.version) == digits_champion["version"]
    assert not [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    run = client.get_run(json.loads(run_info.read_text())["run_id"])
    assert (run.info.status, run.data.tags["export.outcome"]) == ("FINISHED", "FAILED")
