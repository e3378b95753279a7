import json

import mlflow
import numpy as np
import pytest

from stages import export
from stages.config import ExportParams
from stages.dataset import read_image_set
from stages.model import load_model
from stages.tracking import TrackingError


@pytest.fixture
def model_name(request) -> str:
    """A registered-model name of this test's own, in the session's shared store."""
    return f"test-{request.node.name}".replace("_", "-")[:100]


def test_export_registers_a_version_with_its_alias_and_records_it(
    trained, trained_store, tmp_path, model_name
):
    record_path = tmp_path / "registered_model.json"
    record = export.run(
        ExportParams(model_name=model_name, alias="champion"),
        trained.data_dir,
        trained.model_path,
        trained.run_info_path,
        record_path,
    )
    assert json.loads(record_path.read_text()) == record
    assert record["run_id"] == trained.result.run_id

    client = mlflow.MlflowClient(tracking_uri=trained_store)
    version = client.get_model_version_by_alias(model_name, "champion")
    assert (int(version.version), version.run_id) == (record["version"], trained.result.run_id)

    mlflow.set_tracking_uri(trained_store)
    served = mlflow.pyfunc.load_model(f"models:/{model_name}@champion")
    assert served.metadata.get_input_schema().inputs[0].type == np.dtype("uint8")
    images = read_image_set(trained.data_dir / "test").images[:50]
    np.testing.assert_allclose(
        served.predict(images),
        load_model(str(trained.model_path)).predict(images, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_a_second_export_moves_the_alias_to_the_new_version(
    trained, trained_store, tmp_path, model_name
):
    cfg = ExportParams(model_name=model_name, alias="champion")
    args = (trained.data_dir, trained.model_path, trained.run_info_path)
    first = export.run(cfg, *args, tmp_path / "first.json")
    second = export.run(cfg, *args, tmp_path / "second.json")
    assert (first["version"], second["version"]) == (1, 2)
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    assert int(client.get_model_version_by_alias(model_name, "champion").version) == 2


def test_failed_export_registers_nothing_and_writes_no_record(
    trained, trained_store, tmp_path, model_name
):
    run_info = tmp_path / "train_run.json"
    run_info.write_text(json.dumps({"run_id": "0" * 32}))
    with pytest.raises(TrackingError, match=r"MLflow store sqlite:///.*: Run .* not found"):
        export.run(
            ExportParams(model_name=model_name, alias="champion"),
            trained.data_dir,
            trained.model_path,
            run_info,
            tmp_path / "registered_model.json",
        )
    assert not (tmp_path / "registered_model.json").exists()
    client = mlflow.MlflowClient(tracking_uri=trained_store)
    assert client.search_registered_models(filter_string=f"name = '{model_name}'") == []
