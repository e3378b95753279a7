"""The MLflow store misbehaving: unreachable, locked, read-only, or shared by two runs.

The train stage must end with one line naming the store, write no model, and leave no run
RUNNING. MLflow waits 20 s on a locked sqlite file and retries opening a store 10 times;
``short_store_patience`` cuts both, so a lock "longer than the patience" takes a second.
"""

from __future__ import annotations

import contextlib
import io
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from classifier.tracking import runs
from tests.helpers import (
    PROJECT_ROOT,
    TEST_EXPERIMENT,
    failed_in_one_line,
    leftovers,
    obeying_file_permissions,
    one_line_error,
    read_only,
    require_read_only,
    run_cli,
    snapshot,
    sqlite_uri,
    stage_env,
    train_args,
    write_params,
)

# Its module fixtures are built once: every test here runs on one xdist worker.
pytestmark = pytest.mark.xdist_group("store-faults")

PATIENCE_MS = 300
HISTORY_KEYS = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")


@contextlib.contextmanager
def short_store_patience(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """MLflow gives up on a locked sqlite store after PATIENCE_MS, and opens it only once."""
    import mlflow.store.db.utils
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def on_connect(dbapi_connection, record) -> None:
        dbapi_connection.execute(f"PRAGMA busy_timeout = {PATIENCE_MS}")

    def on_execute(conn, cursor, statement, parameters, context, executemany):
        # MLflow sets 20 s at the start of every session.
        if statement.lstrip().upper().startswith("PRAGMA BUSY_TIMEOUT"):
            statement = f"PRAGMA busy_timeout = {PATIENCE_MS};"
        return statement, parameters

    monkeypatch.setattr(mlflow.store.db.utils, "MAX_RETRY_COUNT", 1)
    event.listen(Engine, "connect", on_connect)
    event.listen(Engine, "before_cursor_execute", on_execute, retval=True)
    try:
        yield
    finally:
        event.remove(Engine, "before_cursor_execute", on_execute)
        event.remove(Engine, "connect", on_connect)


class StoreLock:
    """Another connection holding an exclusive lock on the store's sqlite file."""

    def __init__(self, database: Path) -> None:
        self.connection = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
        self.held = False

    def acquire(self) -> None:
        self.connection.execute("BEGIN EXCLUSIVE")
        self.held = True

    def release(self) -> None:
        if self.held:
            self.connection.execute("ROLLBACK")
            self.held = False

    def close(self) -> None:
        self.release()
        self.connection.close()


def existing_store(root: Path) -> tuple[str, Path]:
    """A store with the tests' experiment in it, as earlier runs leave it; (URI, sqlite file).

    Created through another spelling of its path, so MLflow's cache of open stores does not
    hold it: the stage opens it afresh, as its own process would.
    """
    database = root / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{root}/./mlflow.db").create_experiment(
        TEST_EXPERIMENT, (root / "mlartifacts").as_uri()
    )
    return sqlite_uri(root), database


def statuses(store: str) -> list[str]:
    client = mlflow.MlflowClient(tracking_uri=store)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return sorted(r.info.status for r in client.search_runs(experiments)) if experiments else []


@dataclass(frozen=True)
class Outcome:
    """What an in-process ``train.main`` did: exit code, stderr, and what was left."""

    code: int | None
    stderr: str
    error: BaseException | None
    statuses: list[str]
    outputs: dict[str, bytes]


def train_in_process(prepared: Path, root: Path, store: str, epochs: int = 1) -> Outcome:
    """Run ``train.main`` in this process on the digits, outputs under ``root/out``."""
    from stages import train

    params = write_params(root / "params.yaml", train={"epochs": epochs})
    stderr = io.StringIO()
    code = error = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        try:
            with contextlib.redirect_stderr(stderr):
                code = train.main(
                    train_args(prepared, root / "out", params, models=root / "out" / "models")
                )
        except Exception as escaped:  # what a user would see as a traceback
            error = escaped
    return Outcome(code, stderr.getvalue(), error, [], snapshot(root / "out"))


def with_statuses(outcome: Outcome, store: str) -> Outcome:
    return Outcome(outcome.code, outcome.stderr, outcome.error, statuses(store), outcome.outputs)


# --- unreachable --------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:  # bound, never listening: connections are refused
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_train_refuses_unreachable_store_with_one_line(prepared_digits, tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    env = stage_env(uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="3")
    params = write_params(tmp_path / "params.yaml", train={"epochs": 1})
    done = run_cli(
        "train",
        *train_args(prepared_digits, tmp_path / "out", params, models=tmp_path / "out" / "models"),
        env=env,
    )
    error = failed_in_one_line(done, "train", only=False)
    assert error.startswith(f"MLflow store {uri}: ")
    assert "Connection refused" in error
    assert snapshot(tmp_path / "out") == {}
    assert leftovers(tmp_path) == []


# --- locked -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked_before_start(prepared_digits, tmp_path_factory) -> Outcome:
    """train.main on a store that another connection holds locked the whole time."""
    root = tmp_path_factory.mktemp("locked-before-start")
    store, database = existing_store(root)
    lock = StoreLock(database)
    with pytest.MonkeyPatch.context() as patch, short_store_patience(patch):
        lock.acquire()
        try:
            outcome = train_in_process(prepared_digits, root, store)
        finally:
            lock.close()
    return with_statuses(outcome, store)


def test_train_refuses_a_store_locked_before_it_starts_with_one_line(locked_before_start):
    outcome = locked_before_start
    assert outcome.error is None, repr(outcome.error)
    assert outcome.code == 1
    message = one_line_error(outcome.stderr, "train", only=False)
    assert message.startswith("MLflow store sqlite:///") and "database is locked" in message


def test_store_locked_before_train_starts_leaves_no_run_and_no_model(locked_before_start):
    assert locked_before_start.statuses == []
    assert locked_before_start.outputs == {}


@pytest.fixture(scope="module")
def locked_mid_run(prepared_digits, tmp_path_factory) -> Outcome:
    """train.main whose store is locked at the first epoch's metrics for a second."""
    root = tmp_path_factory.mktemp("locked-mid-run")
    store, database = existing_store(root)
    lock = StoreLock(database)
    release = threading.Timer(1.0, lock.release)
    real_log_epoch = runs.log_epoch

    def log_epoch_under_lock(metrics, epoch, **kwargs):
        if not lock.held and not release.is_alive():
            lock.acquire()
            release.start()
        return real_log_epoch(metrics, epoch, **kwargs)

    with pytest.MonkeyPatch.context() as patch, short_store_patience(patch):
        patch.setattr(runs, "log_epoch", log_epoch_under_lock)
        try:
            outcome = train_in_process(prepared_digits, root, store, epochs=2)
        finally:
            release.join()
            lock.close()
    return with_statuses(outcome, store)


@pytest.mark.slow
def test_store_locked_mid_run_fails_train_with_one_line_naming_it(locked_mid_run):
    outcome = locked_mid_run
    assert (outcome.error, outcome.code) == (None, 1)
    last = outcome.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: MLflow store sqlite:///")
    assert "/mlflow.db: " in last and last.endswith("database is locked")
    assert "models/model.keras" not in outcome.outputs
    assert "run.json" not in outcome.outputs


@pytest.mark.slow
def test_store_locked_mid_run_leaves_no_run_running_once_released(locked_mid_run):
    assert locked_mid_run.statuses == ["FAILED"]


@pytest.mark.slow
def test_store_locked_mid_run_prints_no_traceback(locked_mid_run):
    # The helper catches what escapes train.main: an escaped error is the traceback a user
    # would see, even if it never reached stderr here.
    assert locked_mid_run.error is None, repr(locked_mid_run.error)
    assert locked_mid_run.code == 1
    assert "Traceback" not in locked_mid_run.stderr


@pytest.mark.slow
def test_store_locked_shorter_than_the_patience_delays_train_but_loses_nothing(
    prepared_digits, tmp_path
):
    store, database = existing_store(tmp_path)
    lock = StoreLock(database)
    release = threading.Timer(1.0, lock.release)
    real_log_epoch = runs.log_epoch

    def log_epoch_under_lock(metrics, epoch, **kwargs):
        if epoch == 1 and not lock.held and not release.is_alive():
            lock.acquire()
            release.start()
        return real_log_epoch(metrics, epoch, **kwargs)

    # MLflow's own patience (20 s) outlasts the 1 s lock.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(runs, "log_epoch", log_epoch_under_lock)
        try:
            outcome = train_in_process(prepared_digits, tmp_path, store, epochs=2)
        finally:
            release.join()
            lock.close()
    assert (outcome.error, outcome.code) == (None, 0), outcome.stderr
    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name(TEST_EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED"
    for key in HISTORY_KEYS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2]
    assert "models/model.keras" in outcome.outputs


# --- read-only ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def read_only_store(prepared_digits, tmp_path_factory) -> Outcome:
    """train.main on an existing store whose folder is read-only (sqlite needs a journal)."""
    root = tmp_path_factory.mktemp("read-only-store")
    store_dir = root / "store"
    store_dir.mkdir()
    store, _ = existing_store(store_dir)
    with read_only(store_dir):
        require_read_only(store_dir, in_child=False)
        with obeying_file_permissions():
            outcome = train_in_process(prepared_digits, root, store)
    return with_statuses(outcome, store)


def test_train_refuses_a_read_only_store_with_one_line_and_no_model(read_only_store):
    outcome = read_only_store
    assert (outcome.error, outcome.code) == (None, 1)
    last = outcome.stderr.strip().splitlines()[-1]
    assert last.startswith("train: error: MLflow store sqlite:///")
    assert "/store/mlflow.db: " in last
    assert outcome.statuses == []
    assert outcome.outputs == {}


def test_read_only_store_error_says_the_store_is_read_only(read_only_store):
    last = read_only_store.stderr.strip().splitlines()[-1]
    assert "attempt to write a readonly database" in last


def test_train_refuses_a_new_store_in_a_read_only_folder_with_one_line(prepared_digits, tmp_path):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    store = sqlite_uri(store_dir)
    with (
        pytest.MonkeyPatch.context() as patch,
        short_store_patience(patch),
        read_only(store_dir),
    ):
        require_read_only(store_dir, in_child=False)
        with obeying_file_permissions():
            outcome = train_in_process(prepared_digits, tmp_path, store)
    assert outcome.error is None, repr(outcome.error)
    assert outcome.code == 1
    message = one_line_error(outcome.stderr, "train", only=False)
    assert message.startswith(f"MLflow store {store}: ")
    assert outcome.outputs == {}


# --- shared -------------------------------------------------------------------------------


def test_two_runs_logging_the_same_dataset_at_once_both_record_it(tmp_path, monkeypatch):
    import numpy as np
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    monkeypatch.setenv("MLFLOW_TRACKING_URI", existing_store(tmp_path)[0])
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
    both_checked = threading.Barrier(2, timeout=10)
    gated = []

    def insert_together(conn, cursor, statement, parameters, context, executemany):
        # Hold each run's dataset insert until both have looked for the dataset.
        if statement.lstrip().startswith("INSERT INTO datasets") and len(gated) < 2:
            gated.append(statement)
            both_checked.wait()

    images, labels = np.zeros((4, 8, 8, 1), np.uint8), np.arange(4)
    errors: dict[str, str] = {}

    def train_run(name: str) -> None:
        try:
            with runs.training_run({"run": name}):
                runs.log_dataset(images, labels, "digits-train", "/data/train", "training")
        except Exception as error:
            errors[name] = str(error)

    event.listen(Engine, "before_cursor_execute", insert_together)
    try:
        threads = [threading.Thread(target=train_run, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        event.remove(Engine, "before_cursor_execute", insert_together)
    assert len(gated) == 2, "the two inserts did not meet: the test did not race them"
    assert errors == {}
    client = mlflow.MlflowClient()
    found = client.search_runs([client.get_experiment_by_name(TEST_EXPERIMENT).experiment_id])
    digests = [[d.dataset.digest for d in run.inputs.dataset_inputs] for run in found]
    assert len(digests) == 2 and digests[0] == digests[1] != []


@pytest.mark.slow
def test_two_trainings_at_once_on_one_sqlite_store_both_record_every_epoch(
    prepared_digits, tmp_path
):
    epochs = 2
    store, _ = existing_store(tmp_path)
    env = stage_env(store)
    params = write_params(tmp_path / "params.yaml", train={"epochs": epochs})
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "stages.train",
                *train_args(prepared_digits, out, params, models=out / "models"),
            ],
            cwd=PROJECT_ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in (tmp_path / "a", tmp_path / "b")
    ]
    stderrs = [process.communicate(timeout=300)[1] for process in processes]
    said = [[line for line in stderr.splitlines() if "rror" in line] for stderr in stderrs]
    assert [process.returncode for process in processes] == [0, 0], said
    client = mlflow.MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name(TEST_EXPERIMENT).experiment_id
    runs = client.search_runs([experiment])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    for run in runs:
        for key in HISTORY_KEYS:
            history = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (run, key)
    for out in (tmp_path / "a", tmp_path / "b"):
        assert (out / "models" / "model.keras").is_file()
        assert (out / "run.json").is_file()
