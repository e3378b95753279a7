from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from classifier.config import EvaluateParams
from classifier.data.dataset import read_image_set
from classifier.evaluation import compare
from classifier.model.files import load_model
from classifier.serving.pyfunc import png_frame
from classifier.tracking import registry
from stages import evaluate, train
from tests.helpers import TEST_EXPERIMENT, project_params

pytestmark = [
    pytest.mark.slow,
    pytest.mark.xdist_group("compare"),
]  # subprocess pipelines, or minutes of training

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
    page = out.read_text()
    assert page.count('<img src="data:image/png;base64,') == 3
    for heading in ("Params that differ", "Test metrics", "Per class", "Where they disagree"):
        assert heading in page


def test_default_compares_the_champion_with_the_latest_other_run(trained, two_runs, store):
    short, long = two_runs["short"], two_runs["long"]
    client = mlflow.MlflowClient(tracking_uri=store)
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").run_id == long.run_id
    assert compare.resolve_run_ids([], MODEL_NAME) == [
        long.run_id,
        short.run_id,
    ]
