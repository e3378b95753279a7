"""How a later stage ended, on the training run it adds to: the run itself stays FINISHED."""

import mlflow
import pytest

from classifier.tracking import runs


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(None, "FINISHED"), (ValueError("broken"), "FAILED"), (KeyboardInterrupt(), "KILLED")],
)
def test_a_later_stage_leaves_its_outcome_and_the_run_stays_finished(mlflow_store, error, outcome):
    with runs.training_run({"data.source": "test"}) as run_id:
        pass
    training = runs.finished_run(run_id)
    if error is None:
        with training.stage("evaluate"):
            pass
    else:
        with pytest.raises(type(error)), training.stage("evaluate"):
            raise error
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["evaluate.outcome"] == outcome
    assert "export.outcome" not in run.data.tags
