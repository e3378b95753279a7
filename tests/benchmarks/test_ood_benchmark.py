"""benchmarks.ood still runs, on the digits for one epoch, and reports what it measured."""

import json

import pytest

import benchmarks
from benchmarks import ood as benchmark
from tests.helpers import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_ood_benchmark_scores_every_shift_with_both_scores_and_reports_abstaining(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(benchmarks, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.setattr(benchmark, "SHARED", tmp_path / "no-shared-data")  # no photos here
    monkeypatch.chdir(PROJECT_ROOT)
    assert benchmark.main(["--sources", "digits", "--epochs", "1"]) == 0
    reported = json.loads((tmp_path / "results" / "ood.json").read_text())["digits"]
    assert (reported["test_images"], reported["epochs"]) == (270, 1)
    made_offline = {"noise", "inverted", "letters", "rotated"}
    for score in ("mahalanobis", "energy"):
        assert set(reported["auroc"][score]) == made_offline
        assert all(0.0 <= value <= 1.0 for value in reported["auroc"][score].values())
    # Uniform noise is far from every digit's features, even after one epoch (0.996 here).
    assert reported["auroc"]["mahalanobis"]["noise"] > 0.8
    assert 0.0 <= reported["test_abstain_rate"] <= 1.0
    assert 0.0 < reported["confidence_threshold"] <= 1.0
    table = capsys.readouterr().out
    noise = reported["auroc"]["mahalanobis"]["noise"]
    assert f"| digits | mahalanobis | {noise:.3f} |" in table
