"""The block a run ends with, built from the files the stages write."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from classifier.errors import StageError
from classifier.stats import proportion_interval
from classifier.summary import (
    AFTER_REPRO_ENV,
    RunFiles,
    stage_end_block,
    summary_block,
    uncommitted_lock,
)
from tests.helpers import PROJECT_ROOT

REASON = (
    "beats digits-cnn@champion (version 1), by at least the margin 0.0: +0.0370 (95% CI "
    "0.0120 to 0.0620; 12 images right only by it, 2 only by the champion; McNemar exact p=0.013)"
)


def write_run(folder: Path, *, alias: str | None = "champion") -> RunFiles:
    """What evaluate, preprocess and export write, for a version 3 that 260 of 270 got right."""
    files = RunFiles(
        folder / "evaluate.json",
        folder / "data.json",
        folder / "promotion.json",
        folder / "registered_model.json",
        folder / "model_card.md",
    )
    files.evaluate_metrics.write_text(json.dumps({"accuracy": 260 / 270, "macro_f1": 0.9612}))
    files.data_metrics.write_text(json.dumps({"images": {"train": 1257, "val": 270, "test": 270}}))
    decision = {"promoted": alias == "champion", "reason": REASON, "champion_version": 1}
    files.decision.write_text(json.dumps(decision))
    registered = {"name": "digits-cnn", "version": 3, "alias": alias, "decision": decision}
    files.registered.write_text(json.dumps(registered))
    return files


def test_the_block_gives_accuracy_with_its_interval_the_version_alias_why_and_where_next(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("MLFLOW_PORT", raising=False)
    files = write_run(tmp_path)
    block = summary_block(files)
    low, high = proportion_interval(260, 270)
    assert (round(100 * low, 1), round(100 * high, 1)) == (93.3, 98.2)
    lines = block.splitlines()
    assert lines[0].startswith("── digits-cnn version 3: @champion ──")
    assert lines[1] == (
        "test accuracy 96.3 % (95 % CI 93.3 % to 98.2 %) on 270 images; macro F1 0.961"
    )
    assert " ".join(line[14:] for line in lines if line.startswith(("why", " "))).startswith(REASON)
    assert f"model card    {files.card}" in lines
    assert "MLflow        make ui, then http://127.0.0.1:5000/#/models/digits-cnn/versions/3" in (
        lines
    )
    assert any(
        line.startswith("compare       make compare: reports/compare.html") for line in lines
    )
    assert "commit" not in block and lines[-1] == "─" * len(lines[-1])
    # Every line fits 92 columns but one holding a path too long to break (tmp paths are).
    assert max(len(line) for line in lines if str(files.card) not in line) <= 92


def test_the_block_names_a_version_without_alias_and_the_port_make_ui_was_given(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_PORT", "5055")
    block = summary_block(write_run(tmp_path, alias=None))
    assert block.startswith("── digits-cnn version 3: no alias ──")
    assert "http://127.0.0.1:5055/#/models/digits-cnn/versions/3" in block


def hint(block: str) -> str:
    rows = [line for line in block.splitlines() if "─" not in line]
    start = next(i for i, line in enumerate(rows) if line.startswith("commit "))
    return " ".join(line[14:] for line in rows[start:])


def test_the_commit_hint_says_what_to_commit_and_why(tmp_path):
    files = write_run(tmp_path)
    assert hint(summary_block(files, lock="new")) == (
        "git add dvc.lock && git commit -m 'Run the pipeline': dvc.lock records this run's "
        "results; committed, they are the baseline that `dvc exp show` lists (until then its "
        "row is all `!`) and experiments compare with"
    )
    assert hint(summary_block(files, lock="changed")).startswith(
        "dvc.lock differs from the last commit: commit it, with the params and code it ran"
    )


def test_export_leaves_the_block_to_make_run_when_it_prints_it_after_dvc_repro(
    tmp_path, monkeypatch
):
    files = write_run(tmp_path)
    monkeypatch.delenv(AFTER_REPRO_ENV, raising=False)
    assert stage_end_block(files) == summary_block(files)
    monkeypatch.setenv(AFTER_REPRO_ENV, "1")
    assert stage_end_block(files) is None


def test_a_pipeline_that_has_not_run_is_one_clear_error(tmp_path):
    files = write_run(tmp_path)
    files.decision.unlink()
    with pytest.raises(StageError, match=r"promotion.json: not found; run the pipeline first"):
        summary_block(files)


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_uncommitted_lock_tells_a_new_dvc_lock_from_a_changed_one(tmp_path):
    assert uncommitted_lock(tmp_path) is None  # not a git work tree
    git(tmp_path, "init", "-q")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    assert uncommitted_lock(tmp_path) == "new"
    git(tmp_path, "add", "dvc.lock")
    assert uncommitted_lock(tmp_path) == "new"
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit", "-qm", "lock")
    assert uncommitted_lock(tmp_path) is None
    (tmp_path / "params.yaml").write_text("train: {}\n")
    assert uncommitted_lock(tmp_path) is None
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert uncommitted_lock(tmp_path) == "changed"


def test_make_run_prints_the_summary_after_dvc_repro_and_tells_export_not_to():
    lines = (PROJECT_ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run:"))
    recipe = [line.strip() for line in lines[start + 1 :] if line.startswith("\t")][:2]
    assert recipe == [f"{AFTER_REPRO_ENV}=1 dvc repro", "@python -m tools.summary"]
    assert lines[start + 3] == ""  # nothing after the summary


def test_a_path_longer_than_a_line_stays_whole():
    from classifier import summary

    path = "/tmp/" + "deep/" * 30 + "model_card.md"
    rows = summary._row("model card", path)
    assert rows == [f"{'model card':<{summary.LABEL_WIDTH}}{path}"]
