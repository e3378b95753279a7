import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from classifier.data.dataset import CLASSES_FILE, read_image_set
from classifier.data.images import load_image, resize_images
from classifier.model.files import load_model
from classifier.serving import pyfunc as serving

SHAPE = (28, 28, 1)


def encode(picture: Image.Image, image_format: str = "PNG") -> str:
    buffer = io.BytesIO()
    picture.save(buffer, image_format)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_base64_files_decode_exactly_as_preprocessing_reads_them(tmp_path):
    rng = np.random.default_rng(0)
    pictures = [
        Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(rng.integers(0, 256, (12, 50), dtype=np.uint8), "L").convert("RGBA"),
    ]
    expected = []
    for index, picture in enumerate(pictures):
        path = tmp_path / f"{index}.png"
        picture.save(path)
        expected.append(load_image(path, *SHAPE, "pad")[0])
    frame = pd.DataFrame({"image": [encode(picture) for picture in pictures]})
    np.testing.assert_array_equal(serving.to_batch(frame, SHAPE, "pad"), np.stack(expected))
    raw_bytes = {"image": [base64.b64decode(value) for value in frame["image"]]}
    np.testing.assert_array_equal(serving.to_batch(raw_bytes, SHAPE, "pad"), np.stack(expected))


def test_pixel_arrays_of_any_size_are_resized_like_preprocessing():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        serving.to_batch(rgb, SHAPE, "stretch"), resize_images(rgb, *SHAPE, "stretch")
    )
    right_size = rng.integers(0, 256, (2, *SHAPE), dtype=np.uint8)
    assert serving.to_batch(right_size, SHAPE, "stretch") is right_size
    # JSON numbers arrive as int64, and grayscale batches may lack the channel axis.
    as_json = right_size[..., 0].astype(np.int64)
    np.testing.assert_array_equal(serving.to_batch(as_json, SHAPE, "stretch"), right_size)


@pytest.mark.parametrize(
    ("model_input", "message"),
    [
        (np.zeros((2, 28, 28, 1), np.float32), "expected uint8 pixels 0-255, got float32"),
        (np.full((1, 28, 28, 1), 256), "expected pixels 0-255, got values from 256 to 256"),
        (np.zeros((28, 28)), r"got shape \(28, 28\)"),
        (np.zeros((1, 28, 28, 4), np.uint8), "with 1 or 3 channels"),
        (pd.DataFrame({"pixels": ["x"]}), r"expected a column 'image' .* got columns \['pixels'\]"),
        (pd.DataFrame({"image": ["not base64!"]}), "image 0: not valid base64"),
        (
            pd.DataFrame({"image": [encode(Image.new("L", (8, 8))), "aGVsbG8="]}),
            "image 1: not an image",
        ),
        (pd.DataFrame({"image": [3.5]}), "image 0: expected image file bytes or base64 text"),
        ({"image": [b""]}, "image 0: empty file"),
        # {"dataframe_records": [{"image": 5}]} as the server hands it to the model
        ({"image": np.array([5])}, "column 'image' holds a number in each row, not an image"),
        ({"image": np.array([[1, 2]])}, "'image' holds a list of numbers in each row"),
    ],
)
def test_unusable_input_is_refused_with_a_message_naming_it(model_input, message):
    with pytest.raises(serving.BadImageInput, match=message) as caught:
        serving.to_batch(model_input, SHAPE, "stretch")
    assert caught.value.get_http_status_code() == 400


def test_prediction_frame_names_the_most_likely_class():
    probabilities = np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]], dtype=np.float32)
    frame = serving.prediction_frame(probabilities, ["cat", "dog", "owl"])
    assert frame["class_name"].tolist() == ["dog", "cat"]
    assert frame["class_index"].tolist() == [1, 0]
    assert frame["confidence"].tolist() == pytest.approx([0.7, 0.5])
    np.testing.assert_allclose(serving.probabilities_of(frame), probabilities)
    np.testing.assert_array_equal(serving.probabilities_of(probabilities), probabilities)


def test_registered_model_loads_from_any_directory_and_classifies_files_and_arrays(
    trained, registered, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(trained.store_uri)
    served = mlflow.pyfunc.load_model(f"models:/{registered['name']}@champion")
    test = read_image_set(trained.data_dir / "test")
    images = test.images[:40]
    expected = load_model(str(trained.model_path)).predict(images, verbose=0)

    from_arrays = served.predict(images)
    from_files = served.predict(serving.png_frame(images))
    for predictions in (from_arrays, from_files):
        np.testing.assert_allclose(serving.probabilities_of(predictions), expected, atol=1e-6)
        assert predictions["class_index"].tolist() == expected.argmax(axis=1).tolist()
        assert predictions["class_name"].tolist() == [
            test.class_names[i] for i in expected.argmax(axis=1)
        ]


def test_the_named_input_takes_every_form_the_model_takes(trained, registered):
    """The signature names the input ``image`` and MLflow's check of it lets each form
    through: arrays, files, and what MLflow's scoring server makes of each JSON format."""
    from mlflow.pyfunc.scoring_server import _parse_json_data  # what its /invocations does

    mlflow.set_tracking_uri(trained.store_uri)
    served = mlflow.pyfunc.load_model(registered["model_uri"])
    schema = served.metadata.get_input_schema()
    images = read_image_set(trained.data_dir / "test").images[:6]
    files = serving.png_frame(images)
    forms = {
        "arrays": images,
        "grayscale arrays": images[..., 0],
        "files": files,
        "files and another column": files.assign(note="x"),
        "dict of arrays": {serving.IMAGE_COLUMN: images},
        **{
            f"JSON {key}": _parse_json_data(json.dumps(body), served.metadata, schema).data
            for key, body in {
                "inputs": {"inputs": images.tolist()},
                "named inputs": {"inputs": {serving.IMAGE_COLUMN: images.tolist()}},
                "dataframe_split": {"dataframe_split": files.to_dict(orient="split")},
                "instances": {"instances": files.to_dict(orient="records")},
            }.items()
        },
    }
    answers = {name: served.predict(form)["class_index"].tolist() for name, form in forms.items()}
    assert answers == {name: answers["arrays"] for name in forms}
    with pytest.raises(serving.BadImageInput, match="expected uint8 pixels 0-255, got float64"):
        served.predict(images.astype(float))


SHIPPED_CODE_ONLY = """
import sys
import mlflow
import numpy as np
try:
    import classifier
except ImportError:
    pass
else:
    sys.exit("the project is importable here: " + classifier.__file__)
model = mlflow.pyfunc.load_model(sys.argv[1])
import classifier
print(classifier.__file__)
print(model.predict(np.load(sys.argv[2]))["class_index"].tolist())
"""


@pytest.mark.slow
def test_registered_model_runs_on_the_code_it_ships_alone(trained, registered, tmp_path):
    """In a fresh process that cannot import the project, the model imports its own copy."""
    test = read_image_set(trained.data_dir / "test")
    np.save(tmp_path / "images.npy", test.images[:8])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MLFLOW_TRACKING_URI"] = trained.store_uri
    model_uri = f"models:/{registered['name']}@champion"
    command = [sys.executable, "-I", "-B", "-c", SHIPPED_CODE_ONLY, model_uri]
    done = subprocess.run(
        [*command, str(tmp_path / "images.npy")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    module_file, predicted = done.stdout.strip().splitlines()[-2:]
    assert "/code/classifier/__init__.py" in module_file
    expected = load_model(str(trained.model_path)).predict(test.images[:8], verbose=0)
    assert predicted == str(expected.argmax(axis=1).tolist())


def test_registered_model_is_code_and_weights_with_labels_signature_and_example(
    trained, registered
):
    mlflow.set_tracking_uri(trained.store_uri)
    local = Path(mlflow.artifacts.download_artifacts(registered["model_uri"]))
    files = {path.relative_to(local).as_posix() for path in local.rglob("*") if path.is_file()}
    assert not [name for name in files if name.endswith((".pkl", ".pickle", ".cloudpickle"))]
    # The serving code and what it imports, nothing of training, tracking or the stages.
    shipped = {  # a process that loaded the model from a local store may have left caches
        name.removeprefix("code/")
        for name in files
        if name.startswith("code/") and "__pycache__" not in name
    }
    assert shipped == {
        "classifier/__init__.py",
        "classifier/errors.py",
        "classifier/data/__init__.py",
        "classifier/data/images.py",
        "classifier/model/__init__.py",
        "classifier/model/files.py",
        "classifier/quiet.py",
        "classifier/serving/__init__.py",
        "classifier/serving/ood.py",
        "classifier/serving/pyfunc.py",
        "classifier/serving/runtime.py",
        "classifier/serving/served_model.py",
    }
    labels = json.loads(next(local.glob("artifacts/classes.json")).read_text())
    assert labels == json.loads((trained.data_dir / CLASSES_FILE).read_text())
    preprocessing = json.loads(next(local.glob("artifacts/preprocessing.json")).read_text())
    assert preprocessing == {"resize": "stretch"}
    # The training run's params stay those of params.yaml: nothing the model logs adds any.
    run = mlflow.MlflowClient().get_run(registered["run_id"])
    assert set(run.data.params) == set(trained.params.flat())
    info = mlflow.models.get_model_info(registered["model_uri"])
    assert info.signature.inputs.input_names() == [serving.IMAGE_COLUMN]  # the UI names it
    assert info.signature.outputs.input_names() == list(serving.COLUMNS)
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == ["image"]
    assert len(example["dataframe_split"]["data"]) == 3
    requirements = (local / "requirements.txt").read_text()
    assert "keras==" in requirements and "pillow==" in requirements


def test_a_requests_pixel_budget_is_checked_on_every_header_before_decoding():
    files = [encode(Image.new("L", (100, 100))) for _ in range(3)]  # and "hello", no image:
    with pytest.raises(serving.ImageTooLarge, match=r"hold 30,000 pixels, more than the 25,000"):
        serving.to_batch({"image": [*files, "aGVsbG8="]}, SHAPE, "stretch", 10**6, 25_000)
    assert serving.to_batch({"image": files}, SHAPE, "stretch", 10**6, 30_000).shape[0] == 3
    with pytest.raises(serving.ImageTooLarge, match=r"hold 2,352 pixels, more than the 2,000"):
        serving.to_batch(np.zeros((3, 28, 28, 1), np.uint8), SHAPE, "stretch", 10**6, 2000)
