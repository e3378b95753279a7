"""The benchmarks run by hand still run: each on tiny data, one epoch."""

import argparse
import json

import benchmarks
from benchmarks import mnist, summary
from benchmarks import train as train_benchmark
from tests.helpers import write_idx_files


def test_mnist_benchmark_runs_the_stages_on_idx_files_and_reports(tmp_path, monkeypatch, capsys):
    write_idx_files(tmp_path / "idx", train=200, test=20)
    monkeypatch.setattr(benchmarks, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset by the benchmark, restored by the test")
    arguments = ["--data", str(tmp_path / "idx"), "--epochs", "1", "--batch-size", "16"]
    overrides = ["-S", "train.schedule=warmup_cosine", "-S", "train.learning_rate=0.002"]

    assert mnist.main(arguments + overrides) == 0

    summary = json.loads((tmp_path / "results" / "mnist-reference_cnn.json").read_text())
    assert summary["images"] == {"train": 180, "val": 20, "test": 20}
    assert summary["overrides"] == {"train.schedule": "warmup_cosine", "train.learning_rate": 0.002}
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert len(summary["val_accuracy_by_epoch"]) == 1
    assert set(summary["seconds"]) == {"download", "preprocess", "train", "evaluate"}
    assert capsys.readouterr().out.endswith(json.dumps(summary, indent=2) + "\n")


def test_train_benchmark_ratio_pairs_each_round_so_drift_between_rounds_cancels():
    def result(seconds: float) -> dict:
        epochs = [{"epoch": 1, "seconds": seconds, "test_accuracy": 0.9}]
        return {"seconds": seconds, "epochs": epochs, "train_images": 1000}

    # The machine slowed down for round 2's stage and round 3's plain run; in every round
    # but the second the stage took half the plain script's time.
    runs = {
        "plain": [result(10), result(11), result(40)],
        "stage_float32": [result(5), result(30), result(20)],
    }
    args = argparse.Namespace(data="idx", epochs=1, batch_size=64, rounds=3)

    stage = train_benchmark.summarise(runs, args)["variants"]["stage_float32"]

    assert stage["throughput_vs_plain_by_round"] == [2.0, 0.37, 2.0]
    assert stage["throughput_vs_plain"] == 2.0  # the ratio of the medians would say 0.55


def test_summary_sets_each_target_against_the_latest_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmarks, "RESULTS_DIR", tmp_path)

    def write(name: str, result: dict) -> None:
        (tmp_path / f"{name}.json").write_text(json.dumps(result))

    plain = {"training_seconds": 46.2, "epochs": 3, "seconds_to_99": None, "test_accuracy": 0.98}
    stage = {
        "throughput_vs_plain": 1.25,
        "throughput_vs_plain_by_round": [1.1, 1.25, 1.6],
        "seconds_to_99": 19.5,
        "test_accuracy": 0.99,
    }
    write(
        "train",
        {
            "variants": {"plain": plain, "stage": stage},
            "tracking_share_percent": 0.8,
            "tracking_seconds": 0.26,
        },
    )
    write("overhead", {"no_op_dvc_repro_s": 0.8, "repeats": 5})
    small = {"architecture": "small_bn_cnn", "epochs": 20, "test_accuracy": 0.9961}
    write("mnist-small_bn_cnn", {**small, "parameters": 72_770})
    # More accurate, but over the parameter budget: not the small model's result.
    write(
        "mnist-wide", {**small, "architecture": "wide", "parameters": 200_000, "test_accuracy": 1}
    )
    write(
        "mnist-reference_cnn",
        {"architecture": "reference_cnn", "epochs": 10, "test_accuracy": 0.99},
    )

    assert summary.main([]) == 0

    table = (tmp_path / "summary.md").read_text()
    assert capsys.readouterr().out == table
    met = {row.split(" | ")[0].lstrip("| "): row.split(" | ")[-1] for row in table.splitlines()[2:]}
    assert list(met.values()) == ["**no** |", "yes |", "yes |", "yes |", "not run |", "yes |"]
    assert "1.25x (rounds 1.1x to 1.6x)" in table
    assert "stage 19.5 s; plain not there after 46.2 s (3 epochs): < 0.42x" in table
    assert "`benchmarks/results/serving.json` missing" in table
    assert "small_bn_cnn (72,770 parameters): 99.61% after 20 epochs" in table
