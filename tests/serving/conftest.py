"""The serving tests' fixture: the session's model exported and registered by the real stage.

Its serving tests share it (``pytestmark = pytest.mark.xdist_group("model-server")``), so
one xdist worker exports it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from tests.helpers import TEST_EXPERIMENT, project_params

SERVED_MODEL = "test-served"


@dataclass(frozen=True)
class ServedExport:
    """What the export stage wrote and registered for the session's trained model."""

    record: dict[str, Any]
    outputs: Any  # stages.export.ExportOutputs
    serve: Any  # classifier.config.ServeParams
    store_uri: str


@pytest.fixture(scope="session")
def served_export(trained, tmp_path_factory: pytest.TempPathFactory) -> ServedExport:
    """``stages.export.run`` with the project's serve params, as ``test-served@champion``."""
    from stages import export

    params = project_params(export={"model_name": SERVED_MODEL})
    outputs = export.ExportOutputs.under(tmp_path_factory.mktemp("served-export"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", trained.store_uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        record = export.run(
            params.export,
            resize="stretch",
            data_dir=trained.data_dir,
            model_path=trained.model_path,
            run_info_path=trained.run_info_path,
            outputs=outputs,
            serve=params.serve,
        )
    return ServedExport(record, outputs, params.serve, trained.store_uri)
