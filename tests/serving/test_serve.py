"""The registered model behind MLflow's own model server, called over HTTP on 127.0.0.1."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from classifier.data.dataset import read_image_set
from classifier.model.files import load_model
from classifier.processes import running
from classifier.serving.pyfunc import png_frame
from tests.helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("model-server")]

STARTUP_SECONDS = 180


def post(url: str, payload: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def server(trained, registered, tmp_path_factory):
    """`mlflow models serve` of the champion in the project's environment, as `make serve`."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    # MLflow starts uvicorn from PATH: the project's environment must come first, as in make.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": trained.store_uri}
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "--model-uri",
        f"models:/{registered['name']}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    base = f"http://127.0.0.1:{port}"
    with running(
        "mlflow models serve", command, env=env, log_path=log_path, health_url=f"{base}/ping",
        timeout=STARTUP_SECONDS,
    ):  # fmt: skip
        yield f"{base}/invocations"


@pytest.fixture(scope="module")
def expected(trained):
    """The first test images and the Keras model's probabilities for them."""
    images = read_image_set(trained.data_dir / "test").images[:16]
    return images, load_model(str(trained.model_path)).predict(images, verbose=0)


def check_predictions(predictions: list[dict], probabilities: np.ndarray) -> None:
    assert [row["class_index"] for row in predictions] == probabilities.argmax(1).tolist()
    assert [row["class_name"] for row in predictions] == [str(i) for i in probabilities.argmax(1)]
    served = np.array([row["probabilities"] for row in predictions])
    np.testing.assert_allclose(served, probabilities, atol=1e-5)
    np.testing.assert_allclose([row["confidence"] for row in predictions], served.max(1))


def test_server_classifies_base64_png_files_like_the_keras_model(server, expected):
    images, probabilities = expected
    frame = png_frame(images)
    status, body = post(server, {"dataframe_split": frame.to_dict(orient="split")})
    assert status == 200, body
    check_predictions(body["predictions"], probabilities)


def test_server_classifies_raw_pixel_arrays_like_the_keras_model(server, expected):
    images, probabilities = expected
    status, body = post(server, {"inputs": images.tolist()})
    assert status == 200, body
    check_predictions(body["predictions"], probabilities)


def test_a_non_image_gets_a_400_naming_it_and_the_server_keeps_serving(server, expected):
    not_an_image = "VGhpcyBpcyBub3QgYSBwaWN0dXJlLg=="  # "This is not a picture."
    status, body = post(server, {"dataframe_records": [{"image": not_an_image}]})
    assert status == 400
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "image 0: not an image" in body["message"]

    status, body = post(server, {"inputs": [[[1.5]]]})
    assert status == 400 and "expected uint8 pixels 0-255" in body["message"]

    images, probabilities = expected
    status, body = post(server, {"inputs": images[:2].tolist()})
    assert status == 200
    check_predictions(body["predictions"], probabilities[:2])
