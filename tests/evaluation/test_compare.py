from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from classifier.config import EvaluateParams
from classifier.data.dataset import ImageSet, read_image_set
from classifier.evaluation import compare
from classifier.model.files import load_model
from classifier.serving.pyfunc import png_frame
from classifier.tracking import registry
from stages import evaluate, train
from tests.helpers import TEST_EXPERIMENT, project_params

pytestmark = pytest.mark.xdist_group("compare")
slow = pytest.mark.slow  # subprocess pipelines, or minutes of training

MODEL_NAME = "compare-test-cnn"
ALIASES = {"long": "champion", "short": "challenger"}


@dataclass(frozen=True)
class Compared:
    """A run: its id, model file, evaluation metrics and per-class table."""

    run_id: str
    model_path: Path
    metrics: dict
    per_class: pd.DataFrame


@pytest.fixture(scope="module")
def two_runs(trained, tmp_path_factory) -> dict[str, Compared]:
    """The session's 3-epoch run and a new 1-epoch run, both evaluated and registered."""
    root = tmp_path_factory.mktemp("one-epoch")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", trained.store_uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        patch.setenv("DVC_EXP_NAME", "one-epoch")
        short = train.run(
            project_params(train={"epochs": 1}),
            data_dir=trained.data_dir,
            outputs=train.TrainOutputs.under(root),
        )
        runs = {
            "long": (
                trained.result.run_id,
                trained.model_path,
                trained.run_info_path,
                trained.history_path,
            ),
            "short": (
                short.run_id,
                root / "model.keras",
                root / "train_run.json",
                root / "history.csv",
            ),
        }
        test = read_image_set(trained.data_dir / "test")
        compared = {}
        for name, (run_id, model, run_info, history) in runs.items():
            out = tmp_path_factory.mktemp(name)
            metrics = evaluate.run(
                EvaluateParams(batch_size=256),
                data_dir=trained.data_dir,
                model_path=model,
                run_info_path=run_info,
                history_path=history,
                metrics_path=out / "evaluate.json",
                plots_dir=out / "plots",
            )
            per_class = pd.read_csv(out / "plots" / "per_class.csv", dtype={"class": str})
            # Registered as export would (champion: the longer run), without its formats.
            interface = registry.ModelInterface(test.class_names, test.image_shape)
            logged = registry.log_served_model(
                run_id, model, trained.data_dir / "classes.json", "stretch",
                png_frame(test.images[:2]), interface,
            )  # fmt: skip
            registry.register_version(MODEL_NAME, logged, ALIASES[name])
            compared[name] = Compared(run_id, model, metrics, per_class.set_index("class"))
    return compared


@pytest.fixture
def store(trained, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.store_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
    return trained.store_uri


@slow
def test_report_shows_param_metric_and_per_class_deltas(trained, two_runs, store, tmp_path):
    short, long = two_runs["short"], two_runs["long"]
    numbers = compare.compare_runs(
        ["one-epoch", long.run_id], MODEL_NAME, trained.data_dir, tmp_path / "c.html"
    )
    assert numbers["params"].set_index("param").loc["train.epochs"].tolist() == ["1", "3"]
    metrics = numbers["metrics"].set_index("metric")
    gain = long.metrics["accuracy"] - short.metrics["accuracy"]
    assert metrics.loc["test/accuracy", "B - A"] == pytest.approx(gain)
    assert metrics.loc["test/macro_f1", "A"] == pytest.approx(short.metrics["macro_f1"])
    per_class = numbers["per_class"].set_index("class")
    f1_gain = (long.per_class["f1"] - short.per_class["f1"]).loc[per_class.index]
    np.testing.assert_allclose(per_class["f1 B - A"], f1_gain, atol=1e-6)


@slow
def test_report_finds_the_images_only_one_model_gets_right(trained, two_runs, store, tmp_path):
    short, long = two_runs["short"], two_runs["long"]
    out = tmp_path / "compare.html"
    numbers = compare.compare_runs([short.run_id, long.run_id], MODEL_NAME, trained.data_dir, out)
    test = read_image_set(trained.data_dir / "test")
    right = {
        name: load_model(str(run.model_path)).predict(test.images, verbose=0).argmax(1)
        == test.labels
        for name, run in two_runs.items()
    }
    found = numbers["disagreements"]
    np.testing.assert_array_equal(
        found["A right, B wrong"], np.flatnonzero(right["short"] & ~right["long"])
    )
    np.testing.assert_array_equal(
        found["B right, A wrong"], np.flatnonzero(right["long"] & ~right["short"])
    )
    assert len(found["B right, A wrong"]) > 0  # three epochs fix what one gets wrong
    # The paired test counts the same images.
    paired = numbers["paired"]
    assert paired.challenger_only == len(found["B right, A wrong"])
    assert paired.champion_only == len(found["A right, B wrong"])
    assert paired.images == len(test.labels)
    page = out.read_text()
    assert page.count('<img src="data:image/png;base64,') == 3
    for heading in (
        "Params that differ",
        "Test metrics",
        "Per class",
        "The paired test",
        "Where they disagree",
        "Training curves",
    ):
        assert heading in page


@slow
def test_default_compares_the_champion_with_the_latest_other_run(trained, two_runs, store):
    short, long = two_runs["short"], two_runs["long"]
    client = mlflow.MlflowClient(tracking_uri=store)
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").run_id == long.run_id
    assert compare.resolve_run_ids([], MODEL_NAME) == [
        long.run_id,
        short.run_id,
    ]


def made_up_run(label: str, right: np.ndarray, labels: np.ndarray, seed: int) -> compare.RunView:
    """A run as the report reads it, with answers right where ``right`` says and a
    three-epoch history of made-up numbers."""
    rng = np.random.default_rng(seed)
    history = pd.DataFrame(
        rng.uniform(0, 1, (3, 4)), columns=["loss", "accuracy", "val_loss", "val_accuracy"]
    )
    history.insert(0, "epoch", [1, 2, 3])
    predicted = np.where(right, labels, 1 - labels)
    return compare.RunView(label, label * 32, {}, {}, pd.DataFrame(), history, predicted)


def test_report_says_whether_b_is_better_by_mcnemars_exact_test():
    from scipy.stats import binomtest

    labels = np.arange(30) % 2
    test = ImageSet(np.zeros((30, 8, 8, 1), np.uint8), labels, ("0", "1"))
    right_a = np.arange(30) < 20  # A: the first 20 right
    right_b = (np.arange(30) < 18) | (np.arange(30) >= 20)  # B: 2 of those wrong, 10 more right
    a, b = made_up_run("a", right_a, labels, 0), made_up_run("b", right_b, labels, 1)
    page, numbers = compare.build_report(a, b, test)
    paired = numbers["paired"]
    assert (paired.challenger_only, paired.champion_only) == (10, 2)
    assert paired.difference == pytest.approx(8 / 30)
    assert paired.p_two_sided == pytest.approx(binomtest(10, 12, 0.5).pvalue)  # 0.0386
    for words in ("B gets <b>10</b> right that A gets wrong", "A gets <b>2</b> right",
                  "<b>+26.7 points</b>", "p = 0.0386", "<b>significant</b> at the 5% level",
                  "<b>B</b> is the better model"):  # fmt: skip
        assert words in page
    # 3 against 1: could be chance.
    right_b = right_a.copy()
    right_b[[18, 19]] = False
    right_b[[20, 21, 22]] = True
    paired = compare.paired_test(a, made_up_run("b", right_b, labels, 1), test)
    assert (paired.challenger_only, paired.champion_only) == (3, 2)
    words = compare.describe_paired(paired)
    assert "<b>not significant</b>" in words and "is the better model" not in words


def test_training_curves_overlay_both_runs_training_and_validation():
    labels = np.zeros(4, np.int64)
    a = made_up_run("a", np.ones(4, bool), labels, 2)
    b = made_up_run("b", np.ones(4, bool), labels, 3)
    figure = compare.training_curves(a, b)
    loss, accuracy = figure.axes
    for pane, measure in ((loss, "loss"), (accuracy, "accuracy")):
        drawn = {line.get_label(): line.get_ydata() for line in pane.get_lines()}
        assert len(drawn) == 4
        for view, name in ((a, "A"), (b, "B")):
            np.testing.assert_allclose(drawn[f"{name} train: {view.label}"], view.history[measure])
            np.testing.assert_allclose(
                drawn[f"{name} val: {view.label}"], view.history[f"val_{measure}"]
            )
