"""What the model server makes of a request body: MLflow's formats, and what it refuses."""

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
