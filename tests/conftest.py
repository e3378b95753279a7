"""Shared fixtures: real data from scikit-learn, real TensorFlow, real MLflow on sqlite."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from stages.config import Params, parse_params

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TEST_EXPERIMENT = "tests"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_args(data: Path, out: Path, params: Path, models: Path | None = None) -> list[str]:
    """The train stage's arguments: every output under ``out``, the model in ``models``."""
    models = out if models is None else models
    return [
        "--params",
        str(params),
        "--data",
        str(data),
        "--model",
        str(models / "model.keras"),
        "--history",
        str(out / "history.csv"),
        "--metrics",
        str(out / "train.json"),
        "--run-info",
        str(out / "run.json"),
        "--data-report",
        str(out / "none.md"),
        "--checkpoint",
        str(models / "checkpoint"),
    ]


def train_command(data: Path, out: Path, params: Path) -> list[str]:
    """``python -m stages.train`` on ``data``, with every output under ``out``."""
    return [sys.executable, "-m", "stages.train", *train_args(data, out, params)]


def project_params(**overrides: dict[str, Any]) -> Params:
    """The project's params.yaml with some keys of some sections replaced, validated."""
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    for section, values in overrides.items():
        raw[section].update(values)
    return parse_params(raw, "params.yaml (test overrides)")


def write_raw_pool(raw_dir: Path, image_set) -> None:
    """Write ``image_set`` as the download stage's pool layout (what digits produce)."""
    from stages.atomic import write_json
    from stages.dataset import write_image_set
    from stages.download import SOURCE_FILE

    write_image_set(raw_dir / "pool", image_set)
    write_json(raw_dir / SOURCE_FILE, {"source": "test", "layout": "pool"})


def sqlite_uri(directory: Path) -> str:
    return f"sqlite:///{directory / 'mlflow.db'}"


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh MLflow sqlite store that the stages log to; returns its URI."""
    uri = sqlite_uri(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
    return uri


@pytest.fixture(scope="session")
def prepared_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits, downloaded and preprocessed with the project's params."""
    from stages import download, preprocess

    root = tmp_path_factory.mktemp("digits")
    params = project_params()
    download.run(params.data, root / "raw")
    preprocess.run(
        params.preprocess, root / "raw", root / "prepared", root / "data.json", root / "data.md"
    )
    return root / "prepared"


@dataclass(frozen=True)
class TrainedRun:
    """A model trained once per session by the real train stage, and where it wrote."""

    params: Params
    store_uri: str
    data_dir: Path
    model_path: Path
    history_path: Path
    metrics_path: Path
    run_info_path: Path
    result: Any


TRAIN_EPOCHS = 3
DVC_EXPERIMENT = "test-exp-name"


@pytest.fixture(scope="session")
def trained(prepared_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    from stages import train

    root = tmp_path_factory.mktemp("trained")
    params = project_params(train={"epochs": TRAIN_EPOCHS})
    outputs = {
        "model_path": root / "models" / "model.keras",
        "history_path": root / "plots" / "history.csv",
        "metrics_path": root / "metrics" / "train.json",
        "run_info_path": root / "lineage" / "train_run.json",
    }
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", sqlite_uri(root))
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        patch.setenv("DVC_EXP_NAME", DVC_EXPERIMENT)
        report = prepared_digits.parent / "data.md"
        result = train.run(params, prepared_digits, *outputs.values(), data_report=report)
    return TrainedRun(params, sqlite_uri(root), prepared_digits, result=result, **outputs)


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
    from stages import tracking
    from stages.dataset import CLASSES_FILE, read_image_set
    from stages.serving import png_frame

    test = read_image_set(trained.data_dir / "test")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", trained.store_uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        with tracking.resumed_run(trained.result.run_id):
            return tracking.register_model(
                trained.model_path,
                trained.data_dir / CLASSES_FILE,
                "stretch",
                "test-serving",
                "champion",
                png_frame(test.images[:3]),
                {"promotion.decision": "champion"},
            )


def make_image_folder(
    root: Path, per_class: int = 6, broken: bool = True, seed: int = 0
) -> dict[str, list[str]]:
    """Two classes of images as people have them: mixed formats, modes and sizes.

    Cats are bright on the left, dogs bright on the right, so a CNN can learn them. With
    ``broken``, add a truncated JPEG, an empty file and a text file. Returns file names
    per class folder.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    kinds = [
        ("jpg", "RGB", {"quality": 90}),
        ("png", "L", {}),
        ("png", "RGBA", {}),
        ("gif", "P", {}),
        ("bmp", "RGB", {}),
        ("webp", "RGB", {}),
        ("png", "I;16", {}),
    ]
    written: dict[str, list[str]] = {}
    for label, name in enumerate(("cats", "dogs")):
        folder = root / name
        folder.mkdir(parents=True)
        written[name] = []
        for index in range(per_class):
            extension, mode, options = kinds[index % len(kinds)]
            width, height = (int(v) for v in rng.integers(24, 160, size=2))
            pixels = rng.integers(0, 60, (height, width, 3)).astype(np.uint8)
            half = slice(0, width // 2) if label == 0 else slice(width // 2, width)
            pixels[:, half] += 180
            picture = Image.fromarray(pixels, "RGB")
            if mode == "I;16":
                gray = np.asarray(picture.convert("L")).astype(np.uint16)
                picture = Image.fromarray(gray * 257)
            elif mode != "RGB":
                picture = picture.convert(mode)
            file_name = f"{name}_{index:03d}.{extension}"
            picture.save(folder / file_name, **options)
            written[name].append(file_name)
    if broken:
        good = root / "cats" / written["cats"][0]
        (root / "cats" / "truncated.jpg").write_bytes(good.read_bytes()[:300])
        (root / "dogs" / "empty.png").write_bytes(b"")
        (root / "dogs" / "notes.txt").write_text("not a picture")
        written["cats"].append("truncated.jpg")
        written["dogs"] += ["empty.png", "notes.txt"]
    (root / ".DS_Store").write_bytes(b"\0\0junk")
    (root / "cats" / ".hidden.jpg").write_bytes(b"junk")
    return written


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
