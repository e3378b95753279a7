"""Outputs that cannot be written: one line, exit 1, the previous output intact, no temporaries.

The tests run as root here, and root ignores file permissions. So a read-only folder is
made to count by dropping the two capabilities that let root ignore them (CAP_DAC_OVERRIDE
and CAP_DAC_READ_SEARCH): for a child process from its bounding set before it starts, or
for this thread only, around an in-process call. A full disk is a file-size limit
(RLIMIT_FSIZE), which root obeys too. A parent that is a regular file fails for anyone.
"""

from __future__ import annotations

import re
import resource
import signal

import mlflow
import pytest

from classifier.config import DataParams
from stages import download
from tests.helpers import (
    TEST_EXPERIMENT,
    drop_root_file_override,
    failed_in_one_line,
    leftovers,
    obeying_file_permissions,
    one_line_error,
    read_only,
    require_read_only,
    run_cli,
    snapshot,
    train_args,
    write_params,
)

DIGITS = DataParams(source="digits", path=None, mirrors=[], layout="auto")
DISK_FREE_BYTES = 50_000  # the digits' images.npy alone is 115 kB


@pytest.fixture
def old_raw(tmp_path):
    """data/raw from an earlier download, plus a note only that one has; and its files."""
    out = tmp_path / "data" / "raw"
    download.run(DIGITS, out_dir=out)
    (out / "NOTE.txt").write_text("written by the earlier download")
    return out, snapshot(out)


def test_download_into_a_read_only_folder_fails_in_one_line_and_keeps_the_old_data(old_raw):
    out, before = old_raw
    with read_only(out.parent):
        require_read_only(out.parent, in_child=True)
        done = run_cli("download", "--out", out, preexec_fn=drop_root_file_override)
    error = failed_in_one_line(done, "download")
    assert error.startswith(f"[Errno 13] Permission denied: '{out.parent}/.raw.tmp-")
    assert snapshot(out) == before
    assert leftovers(out.parent) == []


def _full_disk() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, not kills
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_FREE_BYTES, DISK_FREE_BYTES))


@pytest.fixture(scope="module")
def full_disk(tmp_path_factory):
    """A download that runs out of disk over an earlier one: (out, files before, result)."""
    out = tmp_path_factory.mktemp("full-disk") / "data" / "raw"
    download.run(DIGITS, out_dir=out)
    (out / "NOTE.txt").write_text("written by the earlier download")
    before = snapshot(out)
    return out, before, run_cli("download", "--out", out, preexec_fn=_full_disk)


def test_download_that_fills_the_disk_fails_in_one_line_and_keeps_the_old_data(full_disk):
    out, before, done = full_disk
    failed_in_one_line(done, "download")
    assert snapshot(out) == before
    assert leftovers(out.parent) == []


def test_download_that_fills_the_disk_names_the_output_and_the_cause(full_disk):
    out, _, done = full_disk
    error = failed_in_one_line(done, "download")
    assert re.fullmatch(
        rf"{re.escape(str(out))}: could not be written whole "
        r"\(\d+ requested and \d+ written\); is the disk full\?",
        error,
    ), error


def test_output_below_a_regular_file_fails_in_one_line_naming_it(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where a folder should be")
    done = run_cli("download", "--out", blocker / "raw")
    error = failed_in_one_line(done, "download")
    assert error == f"[Errno 17] File exists: '{blocker}'"
    assert blocker.read_text() == "a file where a folder should be"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_train_into_a_read_only_models_folder_fails_before_training_and_keeps_the_old_model(
    prepared_digits, tmp_path, mlflow_store, capsys
):
    from stages import train

    models = tmp_path / "out" / "models"
    models.mkdir(parents=True)
    (models / "model.keras").write_bytes(b"the model of an earlier run")
    params = write_params(tmp_path / "params.yaml", train={"epochs": 1})
    with read_only(models):
        require_read_only(models, in_child=False)
        with obeying_file_permissions():
            code = train.main(
                train_args(
                    prepared_digits, tmp_path / "out", params, models=tmp_path / "out" / "models"
                )
            )
    assert code == 1
    # MLflow says it is creating the store's tables first: only=False lets that line be.
    error = one_line_error(capsys.readouterr().err, "train", only=False)
    assert "Permission denied" in error and str(models) in error
    assert snapshot(models) == {"model.keras": b"the model of an earlier run"}
    assert not (tmp_path / "out" / "run.json").exists()
    assert leftovers(tmp_path) == []
    # Found before any training: no MLflow run was even opened.
    client = mlflow.MlflowClient(tracking_uri=mlflow_store)
    assert client.get_experiment_by_name(TEST_EXPERIMENT) is None
