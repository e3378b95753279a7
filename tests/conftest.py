"""Shared fixtures: real data from scikit-learn, real TensorFlow, real MLflow on sqlite.

The helpers these use, and that tests import, are in tests/helpers.py.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    DVC_EXPERIMENT,
    PROJECT_ROOT,
    TEST_EXPERIMENT,
    TRAIN_EPOCHS,
    TrainedRun,
    fresh_store,
    project_params,
    share_the_cores,
)


@pytest.fixture(scope="session", autouse=True)
def project_root_untouched() -> Iterator[None]:
    """Fail the session when a test wrote into the project's own folder (a stage run with
    its default output paths, say): tests write under their temporary folders only."""
    before = {path.name for path in PROJECT_ROOT.iterdir()}
    yield
    added = {path.name for path in PROJECT_ROOT.iterdir()} - before - {".pytest_cache"}
    assert not added, f"a test wrote into {PROJECT_ROOT}: {sorted(added)}"


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow sqlite store that the stages log to; returns its URI."""
    uri = fresh_store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
    return uri


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits, downloaded and preprocessed with the project's params."""
    from stages import download, preprocess

    root = tmp_path_factory.mktemp("digits")
    params = project_params()
    download.run(params.data, out_dir=root / "raw")
    preprocess.run(
        params.preprocess,
        raw_dir=root / "raw",
        out_dir=root / "prepared",
        metrics_path=root / "data.json",
        report_path=root / "data.md",
    )
    return root / "prepared"


@pytest.fixture(scope="session")
def trained(prepared_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """The reference CNN trained for a few epochs by the real train stage, once a session."""
    from stages import train

    root = tmp_path_factory.mktemp("trained")
    store = fresh_store(root)
    params = project_params(train={"epochs": TRAIN_EPOCHS})
    outputs = train.TrainOutputs(
        model=root / "models" / "model.keras",
        history=root / "plots" / "history.csv",
        metrics=root / "metrics" / "train.json",
        run_info=root / "lineage" / "train_run.json",
        checkpoint=root / "models" / "checkpoint",
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", store)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        patch.setenv("DVC_EXP_NAME", DVC_EXPERIMENT)
        report = prepared_digits.parent / "data.md"
        result = train.run(params, data_dir=prepared_digits, outputs=outputs, data_report=report)
    return TrainedRun(
        params,
        store,
        prepared_digits,
        model_path=outputs.model,
        history_path=outputs.history,
        metrics_path=outputs.metrics,
        run_info_path=outputs.run_info,
        result=result,
    )


@pytest.fixture
def trained_store(trained: TrainedRun, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the stages at the store holding the session's trained run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.store_uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
    return trained.store_uri


@pytest.fixture(scope="session")
def registered(trained: TrainedRun) -> dict[str, Any]:
    """The session's trained model registered as ``test-serving@champion`` in its store.

    Registered directly, without the export stage's format checks, for the serving tests.
    """
    from classifier.data.dataset import CLASSES_FILE, read_image_set
    from classifier.serving.pyfunc import png_frame
    from classifier.tracking import registry, store

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
            png_frame(test.images[:3]),
            registry.ModelInterface(test.class_names, test.image_shape),
        )
        return registry.register_version(
            "test-serving", logged, "champion", {"promotion.decision": "champion"}
        )


@pytest.fixture
def http_server(tmp_path_factory: pytest.TempPathFactory):
    """A real HTTP server on 127.0.0.1 serving the folder it yields with its base URL."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    root = tmp_path_factory.mktemp("served")
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


# The tests with the costliest fixtures go first, so that xdist's workers each start on one
# (make test runs `--dist loadgroup --no-loadscope-reorder`: groups go out in this order).
# Found last, they would run after everything else, one worker idle.
RUN_FIRST = ("tests/team/test_remote.py", "tests/team/test_tracking_server.py")
RUN_SECOND = ("tests/pipeline/test_pipeline.py",)
RUN_THIRD = ("tests/sweeps/test_sweeps_end_to_end.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        for number, paths in enumerate((RUN_FIRST, RUN_SECOND, RUN_THIRD)):
            if path in paths:
                return number
        return 3

    items.sort(key=rank)  # stable: otherwise the collection's order
    # A module's tests run on one xdist worker unless they name a group that spans modules:
    # then its module-scoped fixtures (a model exported to every format, a download that
    # fills a disk) are built once, not once on each worker that gets one of its tests.
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__.removeprefix("tests.")))


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker, and every stage it starts, gets its share of the cores."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers is not None:  # else one process has the machine
        from classifier.sweeps.resources import cpu_count

        share_the_cores(os.environ, int(workers), cpu_count())


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session) -> Iterator[None]:
    """Collecting imports TensorFlow, Keras and MLflow: millions of objects that live as long
    as the process. The collector would walk them again and again while they load, and at
    every full collection after: paused while they load, then frozen out of its walks (the
    stages do the same, see classifier/cli.py)."""
    gc.disable()
    try:
        return (yield)
    finally:
        gc.freeze()
        gc.enable()


def pytest_unconfigure(config: pytest.Config) -> None:
    """The test process exits next: spare it the collector's last walk over the objects
    of TensorFlow, Keras and MLflow, seconds at the end of every run (see
    classifier.cli.exit_process, which the stages' processes end with)."""
    gc.freeze()
