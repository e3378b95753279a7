"""`make serve`'s server (python -m tools.serve) of the exported model, over HTTP on 127.0.0.1."""

from __future__ import annotations

import http.client
import io
import json
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from classifier.data.dataset import read_image_set
from classifier.export.formats import FLOAT_TOLERANCE
from classifier.model.files import load_model
from classifier.processes import running
from classifier.serving.prediction_log import LOG_FILE, digest
from classifier.serving.prepare import shifted_images
from classifier.serving.pyfunc import png_frame
from classifier.tracking import monitoring
from tests.helpers import PROJECT_ROOT, free_port
from tests.serving.conftest import SERVED_MODEL
from tools import monitor

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("model-server")]

STARTUP_SECONDS = 180
MAX_BODY_BYTES = 400_000
MAX_IMAGE_PIXELS = 4_000_000


@dataclass(frozen=True)
class Server:
    base: str
    root: Path  # the folder the server may write in: its log folder is root/log
    params: Path
    store_uri: str

    @property
    def log_dir(self) -> Path:
        return self.root / "log"


@pytest.fixture(scope="module")
def server(served_export, tmp_path_factory):
    """``python -m tools.serve`` of test-served@champion, as `make serve` runs it."""
    root = tmp_path_factory.mktemp("serve")
    raw = yaml.safe_load((PROJECT_ROOT / "params.yaml").read_text())
    raw["serve"].update(max_body_bytes=MAX_BODY_BYTES, max_image_pixels=MAX_IMAGE_PIXELS)
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": served_export.store_uri}
    command = [
        sys.executable, "-m", "tools.serve", "--model-name", SERVED_MODEL, "--port", str(port),
        "--params", str(params), "--log-dir", str(root / "log"),
    ]  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    with running(
        "make serve", command, env=env, log_path=root.parent / f"{root.name}.log",
        health_url=f"{base}/ping", timeout=STARTUP_SECONDS, cwd=PROJECT_ROOT,
    ):  # fmt: skip
        yield Server(base, root, params, served_export.store_uri)


def post(
    server: Server, body: bytes | object, content_type: str = "application/json"
) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"{server.base}/invocations", data, {"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def metrics(server: Server) -> dict[str, float]:
    """Every sample of /metrics: ``name{label=value,...}`` -> value."""
    with urllib.request.urlopen(f"{server.base}/metrics", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


@pytest.fixture(scope="module")
def expected(trained):
    """The first test images and the Keras model's probabilities for them."""
    test = read_image_set(trained.data_dir / "test")
    images = test.images[:16]
    return images, load_model(str(trained.model_path)).predict(images, verbose=0), test


def check_predictions(predictions: list[dict], probabilities: np.ndarray) -> None:
    assert [row["class_index"] for row in predictions] == probabilities.argmax(1).tolist()
    for row, index in zip(predictions, probabilities.argmax(1), strict=True):
        # The model abstains (class_name null, with the reason) or names the class.
        assert row["class_name"] == (None if row["abstain_reason"] else str(index))
        assert row["abstain_reason"] in (None, "low_confidence", "out_of_distribution")
        assert row["ood_score"] > 0 and row["temperature"] > 0
    served = np.array([row["probabilities"] for row in predictions])
    np.testing.assert_allclose(served, probabilities, atol=FLOAT_TOLERANCE)
    np.testing.assert_allclose([row["confidence"] for row in predictions], served.max(1))


def test_server_classifies_base64_png_files_like_the_keras_model(server, expected):
    images, probabilities, _ = expected
    frame = png_frame(images)
    status, body = post(server, {"dataframe_split": frame.to_dict(orient="split")})
    assert status == 200, body
    check_predictions(body["predictions"], probabilities)
    status, body = post(server, {"dataframe_records": frame.to_dict(orient="records")})
    assert status == 200, body
    check_predictions(body["predictions"], probabilities)
    with urllib.request.urlopen(f"{server.base}/version", timeout=30) as response:
        assert json.loads(response.read())["runtime"] == "tflite_float32"


def test_server_classifies_raw_pixel_arrays_like_the_keras_model(server, expected):
    images, probabilities, _ = expected
    status, body = post(server, {"inputs": images.tolist()})
    assert status == 200, body
    check_predictions(body["predictions"], probabilities)


def test_a_non_image_gets_a_400_naming_it_and_the_server_keeps_serving(server, expected):
    not_an_image = "VGhpcyBpcyBub3QgYSBwaWN0dXJlLg=="  # "This is not a picture."
    status, body = post(server, {"dataframe_records": [{"image": not_an_image}]})
    assert status == 400
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"] == "image 0: not an image"

    status, body = post(server, {"inputs": [[[1.5]]]})
    assert status == 400 and "expected uint8 pixels 0-255" in body["message"]

    images, probabilities, _ = expected
    status, body = post(server, {"inputs": images[:2].tolist()})
    assert status == 200
    check_predictions(body["predictions"], probabilities[:2])


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header says ``width`` x ``height``: what a pixel bomb looks like
    before it is decoded."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR's width and height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # and its checksum
    return bytes(data)


def post_chunked(server: Server, size: int) -> tuple[int, dict]:
    """POST ``size`` bytes with no Content-Length (chunked), as a streaming client does."""
    connection = http.client.HTTPConnection(server.base.removeprefix("http://"), timeout=60)
    chunks = (b" " * 65536 for _ in range(-(-size // 65536)))
    try:
        connection.request(
            "POST", "/invocations", chunks, {"Content-Type": "application/json"},
            encode_chunked=True,
        )  # fmt: skip
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_oversized_bodies_pixel_bombs_and_wrong_types_are_refused_and_the_server_lives(
    server, expected
):
    import base64

    before = metrics(server)
    status, body = post(server, b" " * (MAX_BODY_BYTES + 1))
    assert (status, body["error_code"]) == (413, "REQUEST_TOO_LARGE")
    assert f"{MAX_BODY_BYTES:,} bytes" in body["message"]
    status, body = post_chunked(server, MAX_BODY_BYTES * 2)
    assert (status, body["error_code"]) == (413, "REQUEST_TOO_LARGE")

    for width, height in ((2001, 2000), (100_000, 100_000)):  # ours, then over PIL's own limit
        bomb = base64.b64encode(png_claiming(width, height)).decode()
        status, body = post(server, {"dataframe_records": [{"image": bomb}]})
        assert (status, body["error_code"]) == (413, "IMAGE_TOO_LARGE"), body
        assert body["message"].startswith("image 0: ")
        assert f"more than the {MAX_IMAGE_PIXELS:,}" in body["message"]

    status, body = post(server, b'{"inputs": []}', content_type="text/plain")
    assert (status, body["error_code"]) == (415, "UNSUPPORTED_MEDIA_TYPE")
    assert "application/json" in body["message"]
    status, body = post(server, b'{"inputs": [', content_type="application/json")
    assert status == 400 and "not valid JSON" in body["message"]

    images, probabilities, _ = expected
    status, body = post(server, {"inputs": images[:3].tolist()})
    assert status == 200
    check_predictions(body["predictions"], probabilities[:3])
    after = metrics(server)
    for key, added in {
        "classifier_errors_total{kind=too_large}": 4,
        "classifier_errors_total{kind=unsupported_media_type}": 1,
        "classifier_errors_total{kind=bad_input}": 1,
        "classifier_requests_total{status=413}": 4,
    }.items():
        assert after[key] - before.get(key, 0) == added, key


def test_metrics_count_requests_latency_images_and_abstentions(server, expected):
    _, _, test = expected
    before = metrics(server)
    answers = []
    for start in range(0, 60, 20):
        status, body = post(server, {"inputs": test.images[start : start + 20].tolist()})
        assert status == 200
        answers += body["predictions"]
    shifted = np.concatenate(
        [shifted_images(test.images[:10], kind) for kind in ("inverted", "noise", "letters")]
    )
    status, body = post(server, {"inputs": shifted.tolist()})
    assert status == 200
    answers += body["predictions"]
    after = metrics(server)

    def added(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert added("classifier_requests_total{status=200}") == 4
    assert added("classifier_request_duration_seconds_count{}") == 4
    assert added("classifier_images_total{}") == 90
    for reason in ("low_confidence", "out_of_distribution"):
        count = sum(row["abstain_reason"] == reason for row in answers)
        assert added(f"classifier_abstentions_total{{reason={reason}}}") == count
    # The model abstains on many of the images unlike digits.
    assert sum(row["abstain_reason"] is not None for row in body["predictions"]) >= 10
    assert (
        after[f"classifier_model_info{{name={SERVED_MODEL},runtime=tflite_float32,version=1}}"] == 1
    )


def files_under(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def test_predictions_are_logged_by_digest_and_nothing_is_written_outside_the_log(server, expected):
    images, _, _ = expected
    # Requests that try to name files: none of it is ever used as a path.
    hostile = [
        {"dataframe_split": {"columns": ["../../escape.jsonl"], "data": [["x"]]}},
        {"dataframe_records": [{"image": "../../../etc/passwd"}]},
        {"inputs": {"../log": [[[0]]]}},
    ]
    for payload in hostile:
        status, _ = post(server, payload)
        assert status == 400
    status, body = post(server, {"inputs": images[:5].tolist()})
    assert status == 200

    assert files_under(server.root) == {"log", f"log/{LOG_FILE}", "params.yaml"}
    assert not [name for name in files_under(server.root.parent) if "escape" in name]
    lines = (server.log_dir / LOG_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines[-5:]]
    assert [r["digest"] for r in records] == [digest(image) for image in images[:5]]
    assert [r["class_index"] for r in records] == [p["class_index"] for p in body["predictions"]]
    assert all(r["model"] == SERVED_MODEL and r["version"] == 1 for r in records)
    assert all("image" not in r and r["latency_ms"] > 0 for r in records)


def test_the_monitor_flags_shifted_images_and_not_in_distribution_ones(
    server, expected, tmp_path, monkeypatch, capsys
):
    _, _, test = expected
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.store_uri)
    window = 90
    argv = [
        "--params", str(server.params), "--log-dir", str(server.log_dir),
        "--window", str(window), "--alpha", "0.001",
    ]  # fmt: skip

    for start in range(0, window, 30):
        assert post(server, {"inputs": test.images[start : start + 30].tolist()})[0] == 200
    assert monitor.main([*argv, "--out", str(tmp_path / "in.html"), "--fail-on-drift"]) == 0
    assert "no drift" in capsys.readouterr().out

    for kind in ("inverted", "noise", "letters"):
        assert post(server, {"inputs": shifted_images(test.images[:30], kind).tolist()})[0] == 200
    code = monitor.main([*argv, "--out", str(tmp_path / "shifted.html"), "--fail-on-drift"])
    assert code == monitor.DRIFT_EXIT_CODE
    assert "DRIFT in" in capsys.readouterr().out
    assert 'class="drift">drift</span>' in (tmp_path / "shifted.html").read_text()

    import mlflow

    client = mlflow.MlflowClient(server.store_uri)
    version = client.get_model_version(SERVED_MODEL, "1")
    assert version.tags[monitoring.TAG_DRIFT] == "true"
    run = client.get_run(version.tags[monitoring.TAG_LAST_RUN])
    assert run.info.status == "FINISHED"
    assert run.data.tags[monitoring.TAG_MODEL_NAME] == SERVED_MODEL
    assert run.data.tags[monitoring.TAG_MODEL_VERSION] == "1"
    assert run.data.tags[monitoring.TAG_MODEL_ID] == version.source.removeprefix("models:/")
    assert run.data.metrics["monitor/drift"] == 1.0
    assert run.data.metrics["monitor/window_size"] == window
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"shifted.html", "monitor.json"}
