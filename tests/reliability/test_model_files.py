"""Hostile or broken model files at models/model.keras: refused in one line, never run.

Each payload, were it loaded, would touch a marker file; the tests check that it is
refused with ModelFileError and that the marker never appears.
"""

from __future__ import annotations

import json
import pickle
import shutil
import zipfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest

from classifier.model.files import ModelFileError, load_model
from stages import evaluate, export
from tests.helpers import PROJECT_ROOT, one_line_error, write_params
from tools import predict

SHAPE, CLASSES = (28, 28, 1), 10  # the session's trained digits model


def lambda_model(marker: Path) -> keras.Model:
    """A digits-shaped model with a Lambda layer whose code touches ``marker`` when run."""
    touch = eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).touch(), x)[1]")
    inputs = keras.Input(shape=SHAPE, dtype="uint8", name="image")
    x = keras.layers.Lambda(touch, name="payload")(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(CLASSES, activation="softmax")(x))


class Hostile:
    """Model files built once for the module, and the marker their payloads would touch."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = root / "PAYLOAD_RAN"
        model = lambda_model(self.marker)
        self.marker.unlink(missing_ok=True)  # building the model ran the lambda once
        self.lambda_keras = root / "lambda" / "model.keras"
        self.lambda_keras.parent.mkdir()
        model.save(self.lambda_keras)
        self.lambda_h5 = root / "lambda.h5"
        model.save(self.lambda_h5)
        self.marker.unlink(missing_ok=True)
        inputs = keras.Input(SHAPE, name="image")
        plain = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Flatten()(inputs)))
        self.plain = root / "plain.keras"
        plain.save(self.plain)

    def copy_as_model(self, source: Path, folder: Path) -> Path:
        """``source`` put where the pipeline keeps its model: ``folder/models/model.keras``."""
        target = folder / "models" / "model.keras"
        target.parent.mkdir(parents=True)
        shutil.copyfile(source, target)
        return target

    def edited(self, folder: Path, edit) -> Path:
        """The plain model with its config.json passed through ``edit``."""
        with zipfile.ZipFile(self.plain) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        config = json.loads(members["config.json"])
        edit(config)
        members["config.json"] = json.dumps(config).encode()
        target = folder / "models" / "model.keras"
        target.parent.mkdir(parents=True)
        with zipfile.ZipFile(target, "w") as archive:
            for name, content in members.items():
                archive.writestr(name, content)
        return target


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Hostile:
    return Hostile(tmp_path_factory.mktemp("hostile"))


def refused(path: Path, hostile: Hostile, reason: str) -> str:
    """load_model refuses ``path`` naming it and ``reason``; the payload did not run."""
    with pytest.raises(ModelFileError) as failure:
        load_model(str(path))
    message = str(failure.value)
    assert message.startswith(f"{path}: "), message
    assert reason in message, message
    assert "\n" not in message
    assert not hostile.marker.exists(), "the payload ran"
    return message


def test_load_model_refuses_a_lambda_layer_and_never_runs_it(hostile, tmp_path):
    model_path = hostile.copy_as_model(hostile.lambda_keras, tmp_path)
    refused(model_path, hostile, "cannot load this model safely: Requested the deserialization")
    # Safe mode off would have built the model, running the payload: the check is real.
    keras.saving.load_model(model_path, safe_mode=False)
    assert hostile.marker.exists()
    hostile.marker.unlink()


def test_load_model_still_loads_an_honest_model(hostile):
    model = load_model(str(hostile.plain))
    assert model.predict(np.zeros((1, *SHAPE), np.float32), verbose=0).shape == (1, 2)


def _layer(config: dict, index: int, replacement: dict) -> None:
    layers = config["config"]["layers"]
    layers[index] = {**replacement, "name": layers[index]["name"]} | {
        "inbound_nodes": layers[index].get("inbound_nodes", [])
    }


def os_system_as_a_layer(marker):
    """CVE-2025-1550: config.json names a class from an arbitrary module."""
    return lambda config: _layer(
        config,
        2,
        {"module": "os", "class_name": "system", "config": {"command": f"touch {marker}"}},
    )


def os_system_as_a_lambda_function(marker):
    """CVE-2025-1550: a Lambda layer whose function is a reference to os.system."""
    function = {"module": "os", "class_name": "function", "config": "system"}
    layer = {
        "module": "keras.layers",
        "class_name": "Lambda",
        "config": {"function": function, "arguments": {"command": f"touch {marker}"}},
    }
    return lambda config: _layer(config, 2, layer)


def unsafe_deserialization_switch(marker):
    """CVE-2025-9906: config.json calls keras.config.enable_unsafe_deserialization()."""
    switch = {"module": "keras.config", "class_name": "enable_unsafe_deserialization"}
    return lambda config: _layer(config, 1, {**switch, "config": {}})


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (os_system_as_a_layer, "Could not locate class 'system'"),
        (os_system_as_a_lambda_function, "Could not locate function 'system'"),
        (
            unsafe_deserialization_switch,
            "Cannot deserialize `keras.config.enable_unsafe_deserialization` because it is not",
        ),
    ],
    ids=["os.system layer", "os.system lambda function", "enable_unsafe_deserialization"],
)
def test_load_model_refuses_a_config_json_that_names_arbitrary_code(
    hostile, tmp_path, payload, reason
):
    model_path = hostile.edited(tmp_path, payload(hostile.marker))
    refused(model_path, hostile, f"cannot load this model safely: {reason}")
    # Safe mode is still on: the Lambda model is refused as before.
    refused(hostile.lambda_keras, hostile, "Requested the deserialization")


class _TouchOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_load_model_refuses_a_pickle_named_model_keras(hostile, tmp_path):
    model_path = tmp_path / "models" / "model.keras"
    model_path.parent.mkdir()
    model_path.write_bytes(pickle.dumps(_TouchOnUnpickle(hostile.marker)))
    refused(model_path, hostile, "a Python pickle, not a .keras archive")


@pytest.mark.parametrize("name", ["model.keras", "model.h5"])
def test_load_model_refuses_an_hdf5_file_with_a_lambda_layer(hostile, tmp_path, name):
    """CVE-2025-9905: the legacy HDF5 loader ignored safe mode; no HDF5 file is loaded."""
    model_path = tmp_path / name
    shutil.copyfile(hostile.lambda_h5, model_path)
    refused(model_path, hostile, "an HDF5 (.h5) file, not a .keras archive")


@pytest.mark.parametrize("kept", [0.5, 0.0], ids=["half", "empty"])
def test_load_model_refuses_a_truncated_keras_file(hostile, tmp_path, kept):
    whole = hostile.plain.read_bytes()
    model_path = tmp_path / "model.keras"
    model_path.write_bytes(whole[: int(len(whole) * kept)])
    refused(model_path, hostile, "not a .keras archive (not a zip file")


def test_load_model_names_a_missing_model_file(hostile, tmp_path):
    refused(tmp_path / "models" / "model.keras", hostile, "no such file")


def test_evaluate_refuses_a_lambda_model_in_one_line_and_writes_nothing(
    hostile, trained, trained_store, tmp_path, capsys
):
    model_path = hostile.copy_as_model(hostile.lambda_keras, tmp_path)
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    before = client.get_run(trained.result.run_id).data.metrics
    code = evaluate.main(
        [
            "--params",
            str(PROJECT_ROOT / "params.yaml"),
            "--data",
            str(trained.data_dir),
            "--model",
            str(model_path),
            "--run-info",
            str(trained.run_info_path),
            "--history",
            str(trained.history_path),
            "--metrics",
            str(tmp_path / "evaluate.json"),
            "--plots",
            str(tmp_path / "plots"),
        ]
    )
    assert code == 1
    error = one_line_error(capsys.readouterr().err, "evaluate")
    assert error.startswith(f"{model_path}: cannot load this model safely: Requested the")
    assert not hostile.marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]
    run = client.get_run(trained.result.run_id)
    assert (run.info.status, run.data.metrics) == ("FINISHED", before)


def test_predict_refuses_a_truncated_model_in_one_line(hostile, trained, tmp_path, capsys):
    model_path = tmp_path / "model.keras"
    model_path.write_bytes(trained.model_path.read_bytes()[:5000])
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    labels = trained.data_dir / "classes.json"
    assert predict.main([str(image), "--model", str(model_path), "--labels", str(labels)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    error = one_line_error(captured.err, "predict")
    assert error == (
        f"{model_path}: not a .keras archive (not a zip file: empty, truncated or another format)"
    )


def test_export_refuses_a_lambda_model_registers_nothing_and_keeps_the_champion(
    hostile, trained, registered, trained_store, tmp_path, capsys
):
    name = registered["name"]
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    versions = sorted(v.version for v in client.search_model_versions(f"name = '{name}'"))
    champion = client.get_model_version_by_alias(name, "champion").version
    model_path = hostile.copy_as_model(hostile.lambda_keras, tmp_path)
    params = write_params(tmp_path / "params.yaml", export={"model_name": name})
    outputs = {
        "--formats": tmp_path / "formats",
        "--format-metrics": tmp_path / "formats.json",
        "--out": tmp_path / "registered.json",
        "--decision": tmp_path / "promotion.json",
        "--serving": tmp_path / "serving",
        "--serving-metrics": tmp_path / "serving.json",
        "--serving-plots": tmp_path / "serving-plots",
        "--card": tmp_path / "model_card.md",
    }
    code = export.main(
        [
            "--params",
            str(params),
            "--data",
            str(trained.data_dir),
            "--model",
            str(model_path),
            "--run-info",
            str(trained.run_info_path),
            *(str(part) for option, path in outputs.items() for part in (option, path)),
        ]
    )
    assert code == 1
    error = one_line_error(capsys.readouterr().err, "export")
    assert error.startswith(f"{model_path}: cannot load this model safely: Requested the")
    assert not hostile.marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "params.yaml"]
    assert sorted(v.version for v in client.search_model_versions(f"name = '{name}'")) == versions
    assert client.get_model_version_by_alias(name, "champion").version == champion
