import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest

from classifier.config import ExportParams
from classifier.data.dataset import CLASSES_FILE, ImageSet, read_image_set, write_image_set
from classifier.export import formats, incumbents, model_card, promotion
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


def params(
    name: str, floor: float | str = 0.5, margin: float = 0.0, int8: float = 0.005, **more
) -> ExportParams:
    values = {
        "model_name": name,
        "accuracy_floor": floor,
        "promotion_margin": margin,
        "promotion_alpha": 0.05,
        "int8_max_accuracy_drop": int8,
        "int8_alpha": 0.05,
        "require_int8": False,
    }
    return ExportParams(**{**values, **more})


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


def answers(right: int, of: int, seed: int = 0) -> np.ndarray:
    """Right-or-wrong answers to ``of`` test images, ``right`` of them right, in some order."""
    correct = np.zeros(of, bool)
    correct[np.random.default_rng(seed).permutation(of)[:right]] = True
    return correct


LABELS = np.arange(270) % 10  # 270 test images, 10 balanced classes: chance is 0.1


def test_a_challenger_better_by_one_image_is_not_promoted():
    champion = answers(250, 270)
    challenger = champion.copy()
    challenger[np.flatnonzero(~champion)[0]] = True  # one image more, nothing else changed
    decision = promotion.decide(challenger, champion, LABELS, params("m", floor="auto"), 3)
    assert not decision.promoted and decision.alias == "challenger"
    paired = decision.paired
    assert (paired.challenger_only, paired.champion_only) == (1, 0)
    assert paired.difference == pytest.approx(1 / 270)
    assert paired.p_value == pytest.approx(0.5)  # one image of one changed: a coin toss
    assert paired.ci_low < 0 < paired.difference <= paired.ci_high
    assert decision.reason.startswith("is not significantly better (alpha 0.05) than champion")


def test_a_clearly_better_challenger_is_promoted_with_its_interval_and_p_value():
    from scipy.stats import binomtest

    champion = answers(200, 270)
    challenger = champion.copy()
    challenger[np.flatnonzero(~champion)[:30]] = True  # 30 images fixed...
    challenger[np.flatnonzero(champion)[:2]] = False  # ...2 broken
    decision = promotion.decide(challenger, champion, LABELS, params("m", floor="auto"), 3)
    assert decision.promoted and decision.alias == "champion"
    paired = decision.paired
    assert (paired.challenger_only, paired.champion_only) == (30, 2)
    assert paired.difference == pytest.approx(28 / 270)
    assert paired.p_value == pytest.approx(binomtest(30, 32, 0.5, "greater").pvalue)
    assert paired.p_value < 1e-6
    assert 0 < paired.ci_low < paired.difference < paired.ci_high
    assert decision.reason.startswith("beats champion version 3: +0.1037 (95% CI")
    tags = decision.tags()
    assert float(tags["promotion.p_value"]) == pytest.approx(paired.p_value, rel=1e-5)
    assert float(tags["promotion.ci_low"]) == pytest.approx(paired.ci_low, abs=1e-6)


def test_a_significant_gain_below_the_margin_is_not_promoted():
    champion = answers(200, 270)
    challenger = champion.copy()
    challenger[np.flatnonzero(~champion)[:20]] = True
    decision = promotion.decide(challenger, champion, LABELS, params("m", margin=0.1), 3)
    assert not decision.promoted
    assert decision.reason.startswith("gains less than the margin 0.1 over champion version 3")


def test_a_model_significantly_worse_than_the_champion_gets_no_alias_and_says_why():
    champion = answers(250, 270)
    candidate = champion.copy()
    candidate[np.flatnonzero(champion)[:8]] = False  # 8 images lost, none gained: p = 0.004
    decision = promotion.decide(candidate, champion, LABELS, params("m", floor="auto"), 3)
    assert decision.floor.cleared  # 242 of 270 is far above chance: the floor is not enough
    assert not decision.promoted and decision.alias is None
    assert decision.paired.p_worse == pytest.approx(0.5**8)
    assert decision.reason.startswith(
        "no alias: significantly worse (alpha 0.05) than champion version 3: -0.0296"
    )
    assert "McNemar exact p=0.00391 that it is worse" in decision.reason
    assert decision.tags()["promotion.decision"] == "none"
    assert decision.summary()["alias"] is None
    # Four images lost is not evidence (p = 0.0625): it may still take @challenger.
    lost_four = champion.copy()
    lost_four[np.flatnonzero(champion)[:4]] = False
    near = promotion.decide(lost_four, champion, LABELS, params("m", floor="auto"), 3)
    assert near.alias == "challenger"


def test_challenger_moves_only_to_a_model_not_significantly_worse_than_the_current_one():
    champion = answers(200, 270)
    current = champion.copy()
    current[np.flatnonzero(~champion)[:10]] = True  # 10 better than the champion
    incumbent = promotion.Incumbent(version=4, correct=current)
    cfg = params("m", floor="auto", margin=0.1)  # a margin nothing here clears
    # As good as the champion, but 10 images behind the current challenger: p = 0.001.
    worse = promotion.decide(champion.copy(), champion, LABELS, cfg, 3, incumbent)
    assert not worse.paired.p_worse < 0.05  # not worse than the champion...
    assert worse.alias is None  # ...but worse than the challenger, which stays
    assert worse.challenger_version == 4
    assert worse.versus_challenger.champion_only == 10
    assert worse.reason.startswith(
        "no alias: significantly worse (alpha 0.05) than the current challenger version 4, "
        "which stays: -0.0370"
    )
    assert worse.reason.endswith("not promoted: gains less than the margin 0.1 over champion "
                                 f"version 3: {worse.paired.describe()}")  # fmt: skip
    # One image behind it is no evidence: the alias moves to the new model.
    close = current.copy()
    close[np.flatnonzero(current)[0]] = False
    moved = promotion.decide(close, champion, LABELS, cfg, 3, incumbent)
    assert moved.alias == "challenger" and moved.versus_challenger.champion_only == 1
    # Without a champion (nothing cleared the floor) the challenger rule still holds.
    labels = np.zeros(270, int)  # one class: nothing is significantly above guessing it
    floor_only = promotion.decide(champion.copy(), None, labels, cfg, None, incumbent)
    assert not floor_only.floor.cleared and floor_only.alias is None


def test_the_auto_floor_is_beating_the_largest_class_significantly():
    labels = np.array([0] * 180 + [1] * 90)  # always guessing class 0 scores 2/3
    cfg = params("m", floor="auto")
    near_chance = promotion.decide(answers(185, 270), None, labels, cfg)
    assert not near_chance.promoted
    assert near_chance.floor.value == pytest.approx(2 / 3) and near_chance.floor.p_value > 0.05
    assert "is not significantly above always guessing the largest class (0.6667)" in (
        near_chance.reason
    )
    good = promotion.decide(answers(230, 270), None, labels, cfg)
    assert good.promoted and good.reason.startswith("first model to clear the floor")
    # A number in params.yaml still wins.
    assert not promotion.decide(answers(230, 270), None, labels, params("m", floor=0.9)).promoted


@pytest.mark.slow
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
    # Its model card is the version's description and an artifact of the training run
    # (what the card says: tests/export/test_model_card.py).
    assert version.description.startswith(f"# Model card: {model_name} (reference_cnn)")
    logged = mlflow.artifacts.download_artifacts(
        run_id=trained.result.run_id, artifact_path="model_card.md", tracking_uri=trained_store
    )
    # The same card, its tables given as lists (MLflow's UI draws tables without borders).
    assert model_card.tables_as_lists(Path(logged).read_text()) == version.description
    # The run's description ends with what became of it.
    outcome = client.get_run(trained.result.run_id).data.tags["mlflow.note.content"]
    assert re.search(
        r"\n\nTest accuracy [0-9.]+ % \(95 % CI [0-9.]+ % to [0-9.]+ %\) on \d+ test images; "
        rf"registered as `{model_name}` version 1, @champion\.$",
        outcome,
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


@pytest.mark.slow
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
    assert run.data.metrics["format/tflite_int8/size_bytes"] == report["tflite_int8"]["size_bytes"]
    assert run.data.metrics["format/onnx/max_abs_diff"] == pytest.approx(
        report["onnx"]["max_abs_diff"]
    )
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "formats")}
    assert {"formats/model.onnx", "formats/model_int8.tflite", "formats/saved_model"} <= logged


@pytest.mark.slow
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
    outcome = run.data.tags["mlflow.note.content"].split("\n\n")[1]
    assert re.fullmatch(r"FAILED in export: .*onnx max_abs_diff [0-9.]+ > 1e-05", outcome)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_first_model_below_the_floor_is_only_a_challenger(
    trained, trained_store, tmp_path, model_name
):
    record = run_export(trained, tmp_path, params(model_name, floor=0.9999))
    assert record["alias"] == "challenger"
    assert "below the floor" in record["decision"]["reason"]
    assert registry.aliased_model(model_name, "champion") is None


@pytest.mark.slow
def test_the_better_model_is_promoted_and_a_worse_one_never_moves_the_champion(
    trained, trained_store, tmp_path, model_name, untrained_model_path, caplog
):
    # An untrained model's int8 copy may differ a lot: only promotion is tested here.
    cfg = params(model_name, floor=0.01, margin=0.02, int8=1.0)
    weak = run_export(trained, tmp_path, cfg, untrained_model_path, tag="weak")
    strong = run_export(trained, tmp_path, cfg, tag="strong")
    weak_again = run_export(trained, tmp_path, cfg, untrained_model_path, tag="weak-again")

    # The weak model again is significantly worse than the champion: no alias at all.
    assert [r["alias"] for r in (weak, strong, weak_again)] == ["champion", "champion", None]
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    assert int(client.get_model_version_by_alias(model_name, "champion").version) == 2
    assert registry.aliased_version(model_name, "challenger") is None

    decision = json.loads((tmp_path / "weak-again-decision.json").read_text())
    assert decision["promoted"] is False and decision["alias"] is None
    assert decision["champion_version"] == 2
    assert decision["champion_accuracy"] > 0.8 > decision["candidate_accuracy"]
    assert weak_again["decision"]["reason"].startswith(
        "no alias: significantly worse (alpha 0.05) than champion version 2"
    )
    said = [r for r in caplog.records if "version 3 has no alias" in r.getMessage()]
    assert [r.levelname for r in said] == ["WARNING"]
    assert "has no alias: it is significantly worse (alpha 0.05) than champion version 2" in (
        said[0].getMessage()
    )
    # The strong model's promotion was decided on evidence, recorded with it.
    strong_decision = json.loads((tmp_path / "strong-decision.json").read_text())
    assert strong_decision["paired"]["p_value"] < 0.05
    assert strong_decision["paired"]["ci_low"] > 0
    version_3 = client.get_model_version(model_name, "3")
    assert version_3.tags["promotion.decision"] == "none"
    assert version_3.tags["model.architecture"] == "reference_cnn"
    assert not version_3.aliases
    # The card says why, loudly, at its top.
    card = version_3.description.split("\n## ")[0]
    assert "> ⚠️ **WARNING: No alias, so nothing serves this version by one: it is " \
        "significantly worse (alpha 0.05) than champion version 2" in card  # fmt: skip
    # The registered model says what it is, which version is champion, how to serve it.
    registered = client.get_registered_model(model_name)
    assert "10 classes ['0', '1'" in registered.description
    assert "- `@champion`: version 2, `reference_cnn`, test accuracy" in registered.description
    assert "- `@challenger`: none yet" in registered.description
    assert "- newest, with no alias: version 3" in registered.description
    assert f"mlflow models serve -m models:/{model_name}@champion" in registered.description
    assert registered.tags["champion.version"] == "2"
    assert registered.tags["challenger.version"] == "none"
    assert registered.tags["model.input"] == "28x28x1"

    # The strong model again, under a margin nothing clears: @challenger (there was none).
    cfg = params(model_name, floor=0.01, margin=0.5, int8=1.0)
    again = run_export(trained, tmp_path, cfg, tag="strong-again")
    assert again["alias"] == "challenger" and again["decision"]["challenger_version"] is None
    # Once more: now scored against that challenger too, on the same images; a tie moves it.
    third = run_export(trained, tmp_path, cfg, tag="strong-third")
    assert (third["version"], third["alias"]) == (5, "challenger")
    assert third["decision"]["challenger_version"] == 4
    versus = third["decision"]["versus_challenger"]
    assert (versus["images"], versus["challenger_only"], versus["champion_only"]) == (270, 0, 0)
    registered = client.get_registered_model(model_name)
    assert registered.tags["challenger.version"] == "5"
    assert "- `@challenger`: version 5, `reference_cnn`" in registered.description


@pytest.mark.slow
def test_with_the_champion_alias_removed_a_worse_model_is_held_to_the_best_earlier_one(
    trained, trained_store, tmp_path, model_name, untrained_model_path, caplog
):
    cfg = params(model_name, floor=0.01, int8=1.0)
    strong = run_export(trained, tmp_path, cfg, tag="strong")
    assert strong["alias"] == "champion"
    mlflow.MlflowClient(tracking_uri=trained_store).delete_registered_model_alias(
        model_name, "champion"
    )  # by hand, in the UI, say
    weak = run_export(trained, tmp_path, cfg, untrained_model_path, tag="weak")
    # Not "the first model to clear the floor": the strong version 1 stands in for the
    # champion, and the weak one is significantly worse than it.
    assert weak["alias"] is None
    assert weak["decision"]["champion_version"] == 1
    assert weak["decision"]["reason"].startswith(
        "no alias: significantly worse (alpha 0.05) than version 1, the most accurate of the "
        "1 newest earlier versions (none is @champion)"
    )
    assert f"{model_name} has no @champion: comparing with version 1" in caplog.text


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
    with pytest.raises(incumbents.IncomparableChampion) as raised:
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


def rolled_int8(monkeypatch):
    """Make the int8 model answer another class for every image: a real, large drop."""
    real_runner = formats.load_runner

    def runner(fmt, path, **knobs):
        loaded = real_runner(fmt, path, **knobs)
        if fmt != "tflite_int8":
            return loaded
        return lambda images: np.roll(loaded(images), 1, axis=1)

    monkeypatch.setattr(formats, "load_runner", runner)


def test_the_formats_that_ship_are_one_tag_and_each_left_out_says_why():
    report = {
        "keras": {"shipped": True},
        "tflite_int8": {"shipped": False, "reason": "left out: accuracy_drop 0.02"},
        "onnx": {"shipped": True},
    }
    assert export.format_tags(report) == {
        "formats.shipped": "keras, onnx",
        "format.tflite_int8.reason": "left out: accuracy_drop 0.02",
    }


@pytest.mark.slow
def test_an_int8_model_that_really_loses_accuracy_is_left_out_and_the_float_one_ships(
    trained, trained_store, tmp_path, model_name, monkeypatch
):
    rolled_int8(monkeypatch)
    record = run_export(trained, tmp_path, params(model_name))
    report = json.loads((tmp_path / "export-formats.json").read_text())
    int8 = report["tflite_int8"]
    assert (int8["passed"], int8["shipped"]) == (False, False)
    assert int8["p_value"] < 0.05 and int8["accuracy_drop"] > 0.005
    assert int8["reason"].startswith("left out: tflite_int8 accuracy_drop")
    assert not (tmp_path / "export-formats" / formats.FILE_NAMES["tflite_int8"]).exists()
    assert (tmp_path / "export-formats" / formats.FILE_NAMES["onnx"]).exists()
    assert all(report[name]["shipped"] for name in formats.FORMATS if name != "tflite_int8")
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    version = client.get_model_version(model_name, str(record["version"]))
    shipped = [name for name in formats.FORMATS if name != "tflite_int8"]
    assert version.tags["formats.shipped"].split(", ") == shipped
    assert version.tags["format.tflite_int8.reason"] == int8["reason"]
    run = client.get_run(trained.result.run_id)
    assert run.data.tags["format.tflite_int8.reason"] == int8["reason"]


@pytest.mark.slow
def test_require_int8_turns_a_real_int8_loss_into_a_failed_export(
    trained, trained_store, tmp_path, model_name, monkeypatch
):
    rolled_int8(monkeypatch)
    with pytest.raises(formats.ParityError, match=r"tflite_int8 accuracy_drop .* and real"):
        run_export(trained, tmp_path, params(model_name, require_int8=True))
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    assert client.search_registered_models(filter_string=f"name = '{model_name}'") == []
