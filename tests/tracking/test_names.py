"""Metric names grouped by prefix for MLflow's UI, and runs logged under the old ones."""

import pytest

from classifier.tracking import names, runs

OLD_RUN = {
    "loss": 0.31,
    "accuracy": 0.97,
    "val_loss": 0.42,
    "val_accuracy": 0.93,
    "learning_rate": 0.001,
    "temperature": 1.4,
    "test_accuracy": 0.92,
    "test_macro_f1": 0.91,
    "format.onnx.max_abs_diff": 1e-6,
    "serving.test.abstain_rate": 0.05,
}


def test_keras_epoch_logs_go_under_train_and_val_and_map_back():
    logged = {key: names.epoch_metric(key) for key in ("loss", "val_accuracy", "learning_rate")}
    assert logged == {
        "loss": "train/loss",
        "val_accuracy": "val/accuracy",
        "learning_rate": "train/learning_rate",
    }
    assert {names.keras_name(name): key for key, name in logged.items()} == {
        key: key for key in logged
    }


def test_a_run_logged_before_the_rename_reads_under_todays_names():
    assert names.current(OLD_RUN) == {
        "train/loss": 0.31,
        "train/accuracy": 0.97,
        "val/loss": 0.42,
        "val/accuracy": 0.93,
        "train/learning_rate": 0.001,
        "val/temperature": 1.4,
        "test/accuracy": 0.92,
        "test/macro_f1": 0.91,
        "format/onnx/max_abs_diff": 1e-6,
        "serving/test/abstain_rate": 0.05,
    }


def test_where_a_run_has_both_names_the_new_one_wins():
    # A run trained before the rename and resumed after it logs its epochs again, anew.
    assert names.current({"val_accuracy": 0.5, "val/accuracy": 0.9}) == {"val/accuracy": 0.9}


def test_an_old_run_and_a_new_one_have_the_same_test_section():
    new_run = {"test/accuracy": 0.95, "test/macro_f1": 0.94, "val/loss": 0.2}
    old = names.section(OLD_RUN, names.TEST)
    assert old == {"test/accuracy": 0.92, "test/macro_f1": 0.91}
    assert old.keys() == names.section(new_run, names.TEST).keys()


def test_a_sweeps_best_metric_names_the_metrics_file_it_came_from():
    # accuracy in metrics/train.json is training accuracy; in evaluate.json, test accuracy.
    assert names.sweep_metric("metrics/evaluate.json", "accuracy") == (
        "sweep/best/evaluate/accuracy"
    )
    assert names.sweep_metric("metrics/train.json", "accuracy") == "sweep/best/train/accuracy"


@pytest.mark.parametrize("logged_before", [OLD_RUN, {}])
def test_resuming_logs_the_checkpointed_epochs_the_run_lacks_under_the_new_names(
    mlflow_store, logged_before
):
    import mlflow

    rows = [{"epoch": epoch, "loss": 1.0 / epoch, "val_accuracy": 0.5} for epoch in (1, 2, 3)]
    with runs.training_run({"train.epochs": 3}) as run_id:
        # Before the rename: epochs 1 and 2 under Keras's names (or nothing logged yet).
        for epoch in (1, 2):
            runs.log_epoch(
                {k: v for k, v in logged_before.items() if k in ("loss", "val_accuracy")}, epoch
            )
        runs.log_missing_epochs(rows)
        runs.log_missing_epochs(rows)  # a second resume finds every epoch there
        client = mlflow.MlflowClient()
        loss = client.get_metric_history(run_id, "train/loss")
        val = client.get_metric_history(run_id, "val/accuracy")
    assert [(m.step, m.value) for m in loss] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [m.step for m in val] == [1, 2, 3]
