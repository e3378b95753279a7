"""What the model server makes of a request body: MLflow's formats, and what it refuses."""

import threading
import time

import numpy as np
import pytest

from classifier.serving.server import ClientError, media_type_of, model_input_of, parse_body


def test_mlflow_request_formats_become_the_model_inputs_mlflow_gives():
    split = {"dataframe_split": {"columns": ["image"], "data": [["aGk="], ["aGk="]]}}
    assert model_input_of(split) == {"image": ["aGk=", "aGk="]}
    records = {"dataframe_records": [{"image": "aGk="}]}
    assert model_input_of(records) == {"image": ["aGk="]}
    pixels = model_input_of({"inputs": [[[1, 2], [3, 4]]]})
    assert np.asarray(pixels).tolist() == [[[1, 2], [3, 4]]]
    named = model_input_of({"inputs": {"image": [[[0, 255]]]}})
    assert named["image"].dtype.kind == "i"
    assert model_input_of({"instances": [{"image": "aGk="}]}) == {"image": ["aGk="]}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ([1, 2], "expected a JSON object"),
        ({"data": []}, "expected exactly one of"),
        ({"inputs": [], "instances": []}, "expected exactly one of"),
        ({"dataframe_split": {"columns": ["image"]}}, "dataframe_split: expected"),
        ({"dataframe_records": "x"}, "dataframe_records: expected a list"),
    ],
)
def test_a_body_in_no_known_format_is_a_400_naming_the_formats(payload, message):
    with pytest.raises(ClientError, match=message) as caught:
        model_input_of(payload)
    assert caught.value.status == 400


def test_json_or_csv_only_and_bad_json_is_a_400():
    assert media_type_of("application/json; charset=utf-8") == "application/json"
    assert media_type_of("text/csv") == "text/csv"
    for content_type in ("text/plain", "", "image/png"):
        with pytest.raises(ClientError, match="is not supported") as caught:
            media_type_of(content_type)
        assert caught.value.status == 415
    with pytest.raises(ClientError, match="not valid JSON") as caught:
        parse_body(b"{nope", "application/json")
    assert caught.value.status == 400
    assert list(parse_body(b"image\naGk=\n", "text/csv")["image"]) == ["aGk="]


def test_json_nested_too_deeply_is_a_400_not_a_recursion_error():
    deep = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ClientError, match="nested too deeply") as caught:
        parse_body(b'{"inputs": ' + deep + b"}", "application/json")
    assert caught.value.status == 400


def test_a_number_where_an_image_belongs_is_named_as_a_number():
    from classifier.serving.pyfunc import BadImageInput, to_batch

    model_input = model_input_of({"dataframe_records": [{"image": 5}]})
    with pytest.raises(BadImageInput, match="holds a number in each row, not an image"):
        to_batch(model_input, (28, 28, 1), "stretch")


def test_more_images_than_a_request_may_hold_is_a_413_before_decoding():
    from classifier.serving.server import check_image_count

    records = {"dataframe_records": [{"image": "aGk="}] * 11}
    with pytest.raises(ClientError, match="holds 11 images, more than the 10") as caught:
        check_image_count(model_input_of(records), 10)
    assert (caught.value.status, caught.value.error_code) == (413, "TOO_MANY_IMAGES")
    check_image_count(model_input_of(records), 11)
    pixels = model_input_of({"inputs": np.zeros((12, 4, 4), np.uint8).tolist()})
    with pytest.raises(ClientError, match="holds 12 images"):
        check_image_count(pixels, 11)


def test_json_of_more_arrays_than_a_request_can_need_is_refused_unparsed():
    from classifier.serving.server import MAX_JSON_CONTAINERS

    nested = b'{"inputs": [' + b"[1]," * MAX_JSON_CONTAINERS + b"[1]]}"
    with pytest.raises(ClientError, match="arrays and objects, more than the 1,000,000") as caught:
        parse_body(nested, "application/json")
    assert caught.value.status == 413


class HeldModel:
    """A served model whose answer waits until the test lets it go: a long request."""

    def __init__(self) -> None:
        self.scoring, self.release = threading.Event(), threading.Event()

    def images(self, model_input):
        return np.zeros((1, 2, 2, 1), np.uint8)

    def classify(self, images):
        self.scoring.set()
        assert self.release.wait(120), "the test never let the request finish"
        return None

    def records(self, answers):
        row = {"class_name": "1", "class_index": 1, "confidence": 0.9, "ood_score": None}
        return [{**row, "abstain_reason": None}]


class HeldPyfunc:
    def __init__(self, model: HeldModel) -> None:
        self.model = model

    def unwrap_python_model(self) -> HeldModel:
        return self.model


def test_health_and_metrics_answer_while_a_request_is_being_scored():
    import json
    import urllib.request

    import uvicorn

    from classifier.serving.server import Limits, Served, create_app
    from tests.helpers import free_port

    model = HeldModel()
    limits = Limits(2**20, 10**6)
    app = create_app(Served(HeldPyfunc(model), limits), {"name": "m"}, limits)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{port}"
    answers = []

    def post() -> None:
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"inputs": {"image": ["aGk="]}}).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answers.append(json.loads(response.read()))

    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server never started"
            time.sleep(0.01)
        client = threading.Thread(target=post)
        client.start()
        assert model.scoring.wait(30), "the request never reached the model"
        # The model is busy with the request: the event loop must still answer.
        for path in ("/ping", "/health", "/metrics"):
            with urllib.request.urlopen(f"{url}{path}", timeout=20) as response:
                assert response.status == 200
        assert not answers  # the request was still being scored all along
        model.release.set()
        client.join(60)
        assert answers == [{"predictions": model.records(None)}]
    finally:
        model.release.set()
        server.should_exit = True
        serving.join(30)
