"""The registered model describes itself: what it is, its aliases, how to serve it."""

import mlflow

from classifier.tracking import registry, store

CLASSES = '["0", "1", "2"]'


def register(client, run_id, name, accuracy, architecture, alias=None, reason=""):
    """A version with the tags export gives it (its files do not matter here)."""
    tags = {
        registry.TAG_CLASSES: CLASSES,
        registry.TAG_INPUT: "8x8x1",
        registry.TAG_ARCHITECTURE: architecture,
        registry.TAG_DATA: "digits",
        registry.TAG_ACCURACY: str(accuracy),
        "promotion.reason": reason,
    }
    version = client.create_model_version(name, f"runs:/{run_id}/model", run_id, tags=tags)
    if alias is not None:
        client.set_registered_model_alias(name, alias, version.version)
    registry.describe_registered_model(name, version)
    return client.get_registered_model(name)


def test_the_registered_model_says_what_it_is_which_version_is_champion_and_how_to_serve(
    mlflow_store,
):
    store.connect()  # as export does: MLflow on this test's store, whatever ran before
    client = mlflow.MlflowClient()
    client.create_registered_model("digits-cnn")
    with mlflow.start_run() as run:
        pass
    first = register(client, run.info.run_id, "digits-cnn", 0.93, "reference_cnn", "champion")
    assert "An image classifier of 3 classes ['0', '1', '2'] at 8x8x1" in first.description
    assert "trained on `digits`" in first.description
    assert "- `@champion`: version 1, `reference_cnn`, test accuracy 93.0 %" in (first.description)
    assert "- `@challenger`: none yet" in first.description
    assert "mlflow models serve -m models:/digits-cnn@champion" in first.description
    assert "make serve MODEL_NAME=digits-cnn" in first.description
    assert first.tags["champion.version"] == "1" and first.tags["challenger.version"] == "none"
    assert first.tags[registry.TAG_INPUT] == "8x8x1" and first.tags[registry.TAG_DATA] == "digits"

    second = register(client, run.info.run_id, "digits-cnn", 0.97, "small_bn_cnn", "challenger")
    assert "- `@champion`: version 1, `reference_cnn`" in second.description
    assert "- `@challenger`: version 2, `small_bn_cnn`, test accuracy 97.0 %" in (
        second.description
    )
    assert second.tags["challenger.version"] == "2"

    why = "no alias: significantly worse (alpha 0.05) than champion version 1"
    third = register(client, run.info.run_id, "digits-cnn", 0.14, "small_bn_cnn", reason=why)
    assert f"- newest, with no alias: version 3, `small_bn_cnn`, test accuracy 14.0 % ({why})" in (
        third.description
    )
    assert third.tags["champion.version"] == "1" and third.tags["challenger.version"] == "2"
