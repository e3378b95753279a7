"""benchmarks.label_issues still runs and reports what it found, on a short run."""

import json

import pytest

import benchmarks
from benchmarks import label_issues as benchmark
from tests.helpers import PROJECT_ROOT

pytestmark = pytest.mark.slow


def test_label_issues_benchmark_plants_two_percent_and_reports_how_many_it_found(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(benchmarks, "RESULTS_DIR", tmp_path / "results")
    monkeypatch.chdir(PROJECT_ROOT)
    code = benchmark.main(["--folds", "2", "--epochs", "1", "--seed", "0"])
    reported = json.loads((tmp_path / "results" / "label_issues.json").read_text())
    assert (reported["training_images"], reported["flipped"], reported["top_checked"]) == (
        1257,
        26,
        26,
    )
    assert reported["recall_in_top"] == pytest.approx(reported["found_in_top"] / 26, abs=1e-4)
    assert code == (0 if reported["recall_in_top"] >= benchmark.TARGET_RECALL else 1)
    # Even one epoch on two folds (half the labels right out of fold) finds the planted
    # errors far beyond chance: 20 of the 26 among its 393 flagged here, where flagging 393
    # images at random would catch 8 (hypergeometric p = 2e-6; 17 would still pass).
    from scipy.stats import hypergeom

    found = round(reported["recall_among_flagged"] * 26)
    chance = hypergeom.sf(found - 1, 1257, 26, reported["flagged"])
    assert chance < 1e-3, reported
    assert reported["folds"] == 2 and reported["epochs"] == 1
