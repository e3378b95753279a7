"""End to end: the real `dvc repro` and `dvc exp run` on a copy of the project in a git repo."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import dvc.api
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from classifier.data.dataset import read_image_set
from classifier.export import model_card
from classifier.model.files import load_model
from classifier.model.tta import has_flip_average
from classifier.serving.pyfunc import probabilities_of
from classifier.tracking import lineage
from tests.helpers import (
    STAGES,
    clone_repo,
    copy_project,
    init_git,
    lock_md5s,
    lock_outputs,
    make_image_folder,
    offline_dom,
    readme_photo_example,
    run_in,
    run_ok,
    set_params,
    stages_run,
    user_env,
    vega_charts,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("pipeline")]

EPOCHS = 2
REPRO_OUTPUT = "repro-output.txt"  # beside the repo fixture: what its `dvc repro` printed
# What TensorFlow, LiteRT and MLflow printed into a run before classifier/quiet.py.
LIBRARY_NOISE = (
    "absl::InitializeLog",
    "I0000",
    "cuInit",
    "retracing",
    "WARNING:tensorflow",
    "XNNPACK",
    "fully_quantize",
    "Downloading artifacts",
    "INFO mlflow",
    "pip version",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh git repository holding the project, after one `dvc repro`.

    Tests only read it; a test that changes the pipeline does so in its own ``clone``.
    """
    repo = tmp_path_factory.mktemp("project")
    copy_project(repo)
    set_params(repo, epochs=EPOCHS)
    # One or two epochs are not the real thing: weak models have many borderline images.
    set_params(repo, "export", accuracy_floor=0.5, int8_max_accuracy_drop=0.05)
    init_git(repo)
    output = run_ok(repo, "dvc", "repro")
    assert stages_run(output) == STAGES
    (repo.parent / REPRO_OUTPUT).write_text(output)
    return repo


@pytest.fixture
def clone(repo: Path, tmp_path: Path) -> Path:
    """This test's own copy of ``repo``: git, DVC cache, outputs and MLflow store."""
    return clone_repo(repo, tmp_path / "project")


# What must come out identical whenever the same code, params and data run again.
REPRODUCED = [
    "metrics/train.json",
    "metrics/evaluate.json",
    "plots/history.csv",
    "plots/evaluate/predictions.csv",
    "plots/evaluate/calibration.csv",
]


def client(repo: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def runs_by_name(repo: Path) -> dict:
    experiment = client(repo).get_experiment_by_name("image-classification")
    return {r.info.run_name: r for r in client(repo).search_runs([experiment.experiment_id])}


def test_repro_writes_every_output_and_metric(repo):
    for path in (
        "data/raw/pool/images.npy",
        "data/prepared/test/images.npy",
        "data/prepared/classes.json",
        "reports/data.md",
        "models/model.keras",
        "plots/history.csv",
        "plots/evaluate/confusion.csv",
        "plots/evaluate/misclassified.png",
    ):
        assert (repo / path).is_file(), path
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert set(evaluation) == {
        "loss",
        "accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        "ece",
        "ece_uncalibrated",
        "temperature",
        "top3_accuracy",
    }
    assert evaluation["accuracy"] > 0.75  # two epochs; ten classes
    data = json.loads((repo / "metrics/data.json").read_text())
    assert data["images"] == {"train": 1257, "val": 270, "test": 270}
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)


def test_repro_prints_no_library_noise_and_export_ends_with_the_summary(repo):
    output = (repo.parent / REPRO_OUTPUT).read_text()
    assert [noise for noise in LIBRARY_NOISE if noise in output] == []
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    accuracy = f"test accuracy {100 * evaluation['accuracy']:.1f} % (95 % CI "
    header = "── digits-cnn version 1: @champion ──"
    assert output.index("Running stage 'export'") < output.index(header) < output.index(accuracy)


def test_the_summary_make_run_ends_with_quotes_the_run_and_says_to_commit_dvc_lock(repo):
    # `make run` is `dvc repro`, then this; dvc.lock is new since the repo's commit.
    block = run_ok(repo, "python", "-m", "tools.summary").strip().splitlines()
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert block[0].startswith("── digits-cnn version 1: @champion ──")
    assert block[1].startswith(f"test accuracy {100 * evaluation['accuracy']:.1f} % (95 % CI ")
    assert "model card    reports/model_card.md" in block
    assert any(line.startswith("commit        git add dvc.lock && git commit") for line in block)
    assert set(block[-1]) == {"─"}


def test_repro_tracks_a_finished_run_with_params_epochs_and_commit(repo):
    run_id = json.loads((repo / "lineage/train_run.json").read_text())["run_id"]
    tracked = client(repo).get_run(run_id)
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["train.epochs"] == str(EPOCHS)
    head = run_ok(repo, "git", "rev-parse", "HEAD").strip()
    assert tracked.data.tags["mlflow.source.git.commit"] == head
    assert len(client(repo).get_metric_history(run_id, "val/accuracy")) == EPOCHS
    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert tracked.data.metrics["test/accuracy"] == pytest.approx(evaluation["accuracy"])
    # Artifacts land beside the store, not in the working directory's default place.
    assert tracked.info.artifact_uri.startswith((repo / "mlartifacts").resolve().as_uri())
    history = Path(mlflow.artifacts.download_artifacts(f"{tracked.info.artifact_uri}/history.csv"))
    assert history.read_bytes() == (repo / "plots/history.csv").read_bytes()
    assert not (repo / "mlruns").exists()


def test_repro_registers_the_model_under_its_alias_predicting_like_the_saved_one(repo):
    record = json.loads((repo / "lineage/registered_model.json").read_text())
    run_id = json.loads((repo / "lineage/train_run.json").read_text())["run_id"]
    assert {k: record[k] for k in ("name", "version", "alias", "run_id", "model_uri")} == {
        "name": "digits-cnn",
        "version": 1,
        "alias": "champion",
        "run_id": run_id,
        "model_uri": "models:/digits-cnn/1",
    }
    assert record["decision"]["reason"].startswith("first model to clear the floor")
    assert json.loads((repo / "metrics/promotion.json").read_text())["promoted"] is True
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    served = mlflow.pyfunc.load_model("models:/digits-cnn@champion")
    images = read_image_set(repo / "data/prepared/test").images
    np.testing.assert_allclose(
        probabilities_of(served.predict(images)),
        load_model(str(repo / "models/model.keras")).predict(images, verbose=0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_lineage_walks_from_the_champion_to_its_run_commit_data_hashes_and_params(repo, tmp_path):
    registry = client(repo)
    version = registry.get_model_version_by_alias("digits-cnn", "champion")
    tracked = registry.get_run(version.run_id)
    tags = tracked.data.tags
    head = run_ok(repo, "git", "rev-parse", "HEAD").strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["git.dirty"] == "false"
    stages = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    lock = stages["train"]
    # A few tags to search by (code.<stage>, data); every file's md5 in an artifact.
    assert not [key for key in tags if key.startswith("dvc.train.")]
    data_md5 = next(d["md5"] for d in lock["deps"] if d["path"] == "data/prepared")
    assert tags["data"] == data_md5
    train_code = lineage.LockEntry("train", lock_md5s(lock["deps"]), {}).code_version()
    assert tags["code.train"] == train_code
    assert version.tags["code.train"] == train_code and version.tags["data"] == data_md5
    assert version.tags["code.evaluate"] == tags["code.evaluate"]
    artifact = registry.download_artifacts(tracked.info.run_id, "lineage/dvc_lock.json", tmp_path)
    recorded = json.loads(Path(artifact).read_text())
    assert recorded["stages"]["train"]["deps"] == lock_md5s(lock["deps"])
    assert recorded["stages"]["evaluate"]["deps"] == lock_md5s(stages["evaluate"]["deps"])
    model_md5 = recorded["stages"]["train"]["outs"]["models/model.keras"]
    # The registered model holds exactly the file DVC tracks.
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/digits-cnn/{version.version}"))
    registered_keras = next(local.glob("artifacts/*.keras"))
    assert hashlib.md5(registered_keras.read_bytes()).hexdigest() == model_md5
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert tracked.data.params["train.epochs"] == str(params["train"]["epochs"])
    assert tracked.data.params["preprocess.seed"] == str(params["preprocess"]["seed"])
    inputs = {d.dataset.name for d in tracked.inputs.dataset_inputs}
    assert inputs == {"digits-train", "digits-val", "digits-test"}


def test_a_second_repro_runs_nothing(repo):
    output = run_ok(repo, "dvc", "repro")
    assert stages_run(output) == []
    assert "Data and pipelines are up to date" in output


def test_changing_epochs_reruns_train_evaluate_export_and_recovers_from_a_sigkill(clone):
    set_params(clone, epochs=1)
    kill_during(clone, "train: MLflow run")  # SIGKILL dvc and train mid-run
    killed = runs_with_status(clone, "RUNNING")
    assert len(killed) == 1  # the run the kill left open
    output = run_ok(clone, "dvc", "repro")
    assert stages_run(output) == ["train", "evaluate", "export"]
    assert "Data and pipelines are up to date" in run_ok(clone, "dvc", "status")
    # The next training run found the dead one and closed it KILLED, saying why.
    assert runs_with_status(clone, "RUNNING") == []
    closed = client(clone).get_run(killed[0])
    assert closed.info.status == "KILLED"
    assert closed.data.tags["process.orphaned"].endswith("ended, run open")
    assert [r.info.run_id for r in all_runs(clone) if r.info.status == "KILLED"] == killed
    # One epoch is significantly worse than two (84 % against 92 % on the digits): it is
    # registered with no alias at all, and the champion stays where it was.
    record = json.loads((clone / "lineage/registered_model.json").read_text())
    assert (record["version"], record["alias"]) == (2, None)
    assert record["decision"]["reason"].startswith("no alias: significantly worse")
    champion = client(clone).get_model_version_by_alias("digits-cnn", "champion")
    assert int(champion.version) == 1


def test_exp_run_shows_in_exp_show_names_its_run_and_reproduces_the_first_bit_for_bit(repo, clone):
    run_ok(clone, "git", "add", "-A")
    run_ok(clone, "git", "commit", "-qm", "the first run")
    # Same code, params and data as the first `dvc repro`: forced to run again. --temp runs
    # it in a copy under .dvc/tmp/exps, and its MLflow run must not vanish with the copy.
    output = run_ok(clone, "dvc", "exp", "run", "--temp", "--force", "-n", "again")
    assert stages_run(output) == STAGES
    assert "Ran experiment(s): again" in output
    # Export's last words: the summary, the run's own, without a commit hint (DVC commits).
    assert "── digits-cnn version 2: " in output and "test accuracy" in output
    assert "git add dvc.lock && git commit" not in output
    assert not list((clone / ".dvc" / "tmp").rglob("mlflow.db"))

    shown = json.loads(run_ok(clone, "dvc", "exp", "show", "--json"))
    revisions = {
        rev["name"]: rev
        for baseline in shown
        for group in baseline.get("experiments") or []
        for rev in group["revs"]
    }
    data = revisions["again"]["data"]
    assert data["params"]["params.yaml"]["data"]["train"]["epochs"] == EPOCHS
    accuracy = data["metrics"]["metrics/evaluate.json"]["data"]["accuracy"]

    tracked = runs_by_name(clone)["again"]
    assert tracked.data.tags["dvc.exp_name"] == "again"
    assert tracked.info.status == "FINISHED"
    assert tracked.data.metrics["test/accuracy"] == pytest.approx(accuracy)

    # The same bits as the first run, read from the experiment's commit.
    rev = revisions["again"]["rev"]
    for name in REPRODUCED:
        assert dvc.api.read(name, repo=str(clone), rev=rev) == (repo / name).read_text(), name
    model_file = clone.parent / "again.keras"
    model_file.write_bytes(dvc.api.read("models/model.keras", repo=str(clone), rev=rev, mode="rb"))
    first_weights = load_model(str(repo / "models/model.keras")).get_weights()
    again = load_model(str(model_file)).get_weights()
    for a, b in zip(first_weights, again, strict=True):
        np.testing.assert_array_equal(a, b)

    # From the experiment's commit to its run and registered version.
    train_run = json.loads(dvc.api.read("lineage/train_run.json", repo=str(clone), rev=rev))
    assert train_run["run_id"] == tracked.info.run_id
    registered = json.loads(dvc.api.read("lineage/registered_model.json", repo=str(clone), rev=rev))
    version = client(clone).get_model_version("digits-cnn", str(registered["version"]))
    assert version.run_id == tracked.info.run_id


def test_the_readmes_photo_example_runs_as_written_to_a_registered_model(tmp_path_factory):
    """README.md's photo example, on a small folder of RGB photos of all kinds (and a few
    broken files), with the epochs cut short: the recipe runs to a registered model."""
    repo = tmp_path_factory.mktemp("photos-project")
    photos = tmp_path_factory.mktemp("photos")
    make_image_folder(photos, per_class=40, broken=True, bright="top-bottom")
    copy_project(repo)
    init_git(repo)
    command = readme_photo_example()
    assert command[:3] == ["dvc", "exp", "run"] and "export.model_name=pets-cnn" in command
    command = [
        f"data.path={photos}" if arg.startswith("data.path=") else
        "train.epochs=1" if arg.startswith("train.epochs=") else arg
        for arg in command
    ]  # fmt: skip
    assert stages_run(run_ok(repo, *command)) == STAGES
    test = read_image_set(repo / "data/prepared/test")
    assert test.image_shape == (64, 64, 3)
    assert test.class_names == ("cats", "dogs")
    assert json.loads((repo / "metrics/data.json").read_text())["skipped_files"] == 3
    model = load_model(str(repo / "models/model.keras"))
    assert model.name == "photo_resnet" and model.output_shape == (None, 2)
    assert has_flip_average(model)  # the recipe's train.tta=hflip
    record = json.loads((repo / "lineage/registered_model.json").read_text())
    assert (record["name"], record["version"]) == ("pets-cnn", 1)
    version = client(repo).get_model_version("pets-cnn", "1")
    assert json.loads(version.tags["model.classes"]) == ["cats", "dogs"]


def kill_during(repo: Path, marker: str, sig: int = signal.SIGKILL) -> str:
    """Start `dvc repro`; send ``sig`` to it and its stage as soon as it prints ``marker``.

    The markers are printed with work still to do (an epoch to train, formats to convert),
    so the signal always lands mid-stage, however fast the machine. SIGINT is Ctrl-C in the
    terminal. Returns what `dvc repro` printed.
    """
    process = subprocess.Popen(
        ["dvc", "repro"],
        cwd=repo,
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if marker in line:
            break
    else:
        pytest.fail(f"no line with {marker!r}:\n{''.join(seen)[-3000:]}")
    assert process.poll() is None, f"dvc repro ended before the kill:\n{''.join(seen)}"
    os.killpg(process.pid, sig)
    rest, _ = process.communicate(timeout=120)
    return "".join(seen) + rest


def all_runs(repo: Path) -> list:
    experiment = client(repo).get_experiment_by_name("image-classification")
    return client(repo).search_runs([experiment.experiment_id])


def runs_with_status(repo: Path, status: str) -> list[str]:
    return [r.info.run_id for r in all_runs(repo) if r.info.status == status]


def test_sigkill_during_export_then_repro_recovers_and_keeps_the_champion(clone):
    champion = client(clone).get_model_version_by_alias("digits-cnn", "champion").version
    set_params(clone, "export", promotion_margin=0.5)  # only export reruns; never promotes
    kill_during(clone, "export: exporting saved_model")
    output = run_ok(clone, "dvc", "repro")
    assert stages_run(output) == ["export"]
    assert "Data and pipelines are up to date" in run_ok(clone, "dvc", "status")
    assert runs_with_status(clone, "RUNNING") == []
    record = json.loads((clone / "lineage/registered_model.json").read_text())
    assert record["alias"] == "challenger"
    assert client(clone).get_model_version_by_alias("digits-cnn", "champion").version == champion


def assert_checkout_restores(repo: Path, before: dict[str, bytes]) -> None:
    """`dvc checkout` puts every output back as it was before the failed stage."""
    run_ok(repo, "dvc", "checkout")
    assert lock_outputs(repo) == before


def test_a_bad_param_fails_train_and_dvc_checkout_restores_every_output(clone):
    before = lock_outputs(clone)
    set_params(clone, epochs=0)
    done = run_in(clone, "dvc", "repro")
    assert done.returncode != 0
    assert (
        "train: error: params.yaml: train.epochs: input should be greater than or equal to 1"
        in (done.stdout + done.stderr)
    )
    assert not (clone / "models/model.keras").exists()  # DVC removed it before train ran
    assert_checkout_restores(clone, before)


def test_ctrl_c_in_train_then_dvc_checkout_restores_every_output(clone):
    before = lock_outputs(clone)
    set_params(clone, epochs=1)
    output = kill_during(clone, "train: MLflow run", signal.SIGINT)
    assert "train: interrupted" in output
    assert runs_with_status(clone, "RUNNING") == []
    killed = runs_with_status(clone, "KILLED")  # ended by train itself, not found orphaned
    assert len(killed) == 1
    assert "process.orphaned" not in client(clone).get_run(killed[0]).data.tags
    assert_checkout_restores(clone, before)


def test_a_failed_download_then_dvc_checkout_restores_every_output(clone, tmp_path):
    before = lock_outputs(clone)
    set_params(clone, "data", source="folder", path=str(tmp_path / "no-such-folder"))
    done = run_in(clone, "dvc", "repro")
    assert done.returncode != 0
    missing = tmp_path / "no-such-folder"
    assert f"download: error: data.path: {missing} is not a folder" in done.stderr
    assert not (clone / "data/raw").exists()
    assert_checkout_restores(clone, before)


def test_repro_shows_what_the_model_looks_at_and_registers_its_model_card(repo):
    pictures = {"gradcam_mistakes.png", "gradcam_correct.png", "filters.png"}
    shown = json.loads(run_ok(repo, "dvc", "plots", "show", "--json"))["data"]
    assert {f"plots/evaluate/insight/{name}" for name in pictures} <= set(shown)
    assert any(name.startswith("plots/evaluate/insight/feature_maps_1_") for name in shown)
    assert "plots/label_issues/suspects.png" in shown
    run_id = json.loads((repo / "lineage/train_run.json").read_text())["run_id"]
    logged = {item.path for item in client(repo).list_artifacts(run_id, "evaluation/insight")}
    assert {f"evaluation/insight/{name}" for name in pictures} <= logged
    # The version's description is its model card, as export wrote it, its tables as lists
    # (MLflow's UI draws tables without borders).
    record = json.loads((repo / "lineage/registered_model.json").read_text())
    version = client(repo).get_model_version(record["name"], str(record["version"]))
    card = (repo / "reports/model_card.md").read_text()
    assert version.description == model_card.tables_as_lists(card)
    # label_issues is off by default: it ran, and checked nothing.
    assert json.loads((repo / "metrics/label_issues.json").read_text())["checked_images"] == 0


def test_an_entry_in_exclude_yaml_makes_preprocess_and_what_follows_rerun(clone):
    (clone / "exclude.yaml").write_text(
        'images:\n  - {hash: "' + "0" * 24 + '", action: drop, note: a smudge}\n'
    )
    status = run_ok(clone, "dvc", "status")
    assert re.search(r"preprocess:\s+changed deps:\s+modified:\s+exclude\.yaml", status)


def vega_specs(page: Path) -> dict[str, dict]:
    """The Vega-Lite specs DVC wrote into ``page``, by chart title."""
    html, decoder, specs = page.read_text(encoding="utf-8"), json.JSONDecoder(), {}
    for start in re.finditer(r"var spec = ", html):
        spec, _ = decoder.raw_decode(html, start.end())
        specs[spec["title"]["text"]] = spec
    return specs


def test_dvc_plots_show_draws_every_chart_offline_with_labelled_axes(clone):
    run_ok(clone, "dvc", "plots", "show")

    page = clone / "dvc_plots" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc=", html)  # Vega is inline: nothing to fetch
    dom = offline_dom(page.as_uri())
    charts = vega_charts(dom)
    assert set(charts) == set(re.findall(r"vegaEmbed\('#([^']+)'", html))
    assert len(charts) == 5
    for name, chart in charts.items():
        assert chart.drawn, name
        assert len(chart.axis_titles) == 2 and "y" not in chart.axis_titles, name
    assert '<p class="plot-failed"' not in dom
    confusion = charts["Confusion_matrix__test_"]
    assert confusion.axis_labels == [[str(digit) for digit in range(10)]] * 2
    # Each picture once: the curves are the Vega charts, not curves.png as well.
    assert "curves.png" not in html


def test_plots_diff_against_the_champion_holds_both_revisions(clone):
    run_ok(clone, "git", "add", "dvc.lock")
    run_ok(clone, "git", "commit", "-qm", "the champion's results")
    commit = run_ok(clone, "git", "rev-parse", "--short", "HEAD").strip()
    champion_history = pd.read_csv(clone / "plots/history.csv")
    # One epoch is worse than two: the champion stays the committed run.
    run_ok(clone, "dvc", "exp", "run", "-n", "one-epoch", "-S", "train.epochs=1")

    done = run_in(clone, "python", "-m", "tools.champion_rev")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{commit}\n"
    run_ok(clone, "dvc", "plots", "diff", commit)

    loss = vega_specs(clone / "dvc_plots" / "index.html")["Loss by epoch"]["data"]["values"]
    shown = {
        rev: [float(row["loss"]) for row in loss if row["rev"] == rev and row["field"] == "loss"]
        for rev in (commit, "workspace")
    }
    assert shown == {
        commit: champion_history["loss"].tolist(),
        "workspace": pd.read_csv(clone / "plots/history.csv")["loss"].tolist(),
    }
    assert len(shown[commit]) == EPOCHS and len(shown["workspace"]) == 1
