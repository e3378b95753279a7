"""End to end: real sweeps on DVC's real queue workers, in a copy of the project in a git repo.

One repository for the module (a one-epoch baseline), one grid of four trials on two
workers with a failing one among them, and one search of four trials stopped by Ctrl-C
and resumed. Every result is checked in `dvc exp show`, in MLflow and in the report.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from classifier.sweeps.resources import cpu_count
from tests.helpers import copy_project, init_git, run_in, run_ok, set_params, user_env

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sweeps")]

EXPERIMENT = "image-classification"
DEADLINE_S = 600

# reference_cnn needs 18x18 images: one bad combination among four. reference_cnn at 28
# is the baseline itself, which DVC does not run again.
GRID = {
    "metric": "metrics/evaluate.json:accuracy",
    "direction": "maximize",
    "workers": 2,
    "grid": {
        "train.architecture": ["reference_cnn", "small_bn_cnn"],
        "preprocess.image_height": [16, 28],
    },
}
# A metric of train: trials stop there, so this one also checks that no trial ran evaluate.
SEARCH = {
    "metric": "metrics/train.json:val_accuracy",
    "direction": "maximize",
    "workers": 2,
    "set": {"train.epochs": 6},  # time to interrupt a trial that has just begun to train
    "search": {
        "trials": 4,
        "seed": 3,
        "params": {
            "train.learning_rate": {"low": 1.0e-3, "high": 1.0e-2, "log": True},
            "train.batch_size": [64, 128],
        },
    },
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project in a git repository, after a one-epoch `dvc repro` up to evaluate."""
    repo = tmp_path_factory.mktemp("sweep-project")
    copy_project(repo)
    set_params(repo, epochs=1)
    (repo / "sweeps").mkdir()
    (repo / "sweeps" / "grid.yaml").write_text(yaml.safe_dump(GRID, sort_keys=False))
    (repo / "sweeps" / "search.yaml").write_text(yaml.safe_dump(SEARCH, sort_keys=False))
    init_git(repo)
    run_ok(repo, "dvc", "repro", "evaluate")
    run_ok(repo, "git", "add", "-A")
    run_ok(repo, "git", "commit", "-qm", "baseline")
    return repo


def sweep(repo: Path, spec: str) -> subprocess.CompletedProcess[str]:
    return run_in(repo, sys.executable, "-m", "tools.sweep", f"sweeps/{spec}.yaml")


@pytest.fixture(scope="module")
def grid(repo: Path) -> str:
    """The grid sweep, run once; what it printed."""
    done = sweep(repo, "grid")
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def client(repo: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")


def experiment_runs(repo: Path) -> list:
    experiment = client(repo).get_experiment_by_name(EXPERIMENT)
    return client(repo).search_runs([experiment.experiment_id], max_results=1000)


def family(repo: Path, sweep_name: str) -> tuple:
    """The sweep's parent run and its children by name."""
    found = experiment_runs(repo)
    parent = next(r for r in found if r.info.run_name == sweep_name)
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return parent, children


def exp_show(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json`: each experiment's executor state, params and metrics, by name."""
    rows = json.loads(run_ok(repo, "dvc", "exp", "show", "--json"))
    found = {}
    for baseline in rows:
        for experiment in baseline.get("experiments") or []:
            rev = experiment["revs"][0]
            found[experiment["name"]] = {
                "state": (experiment.get("executor") or {}).get("state"),
                "params": rev["data"]["params"]["params.yaml"]["data"],
                "metrics": rev["data"]["metrics"],
            }
    return found


def test_a_grid_runs_each_point_as_a_dvc_experiment_on_two_queue_workers(repo, grid):
    shown = exp_show(repo)
    trials = {name: shown[name] for name in shown if name.startswith("grid-")}
    assert set(trials) == {"grid-1", "grid-2", "grid-3", "grid-4"}
    expected = [("reference_cnn", 16), ("reference_cnn", 28), ("small_bn_cnn", 16)]
    expected.append(("small_bn_cnn", 28))
    for number, (architecture, height) in enumerate(expected, start=1):
        params = trials[f"grid-{number}"]["params"]
        assert params["train"]["architecture"] == architecture
        assert params["preprocess"]["image_height"] == height
    assert trials["grid-1"]["state"] == "failed"
    assert {trials[f"grid-{k}"]["state"] for k in (2, 3, 4)} == {"success"}
    status = run_ok(repo, "dvc", "queue", "status")
    assert re.search(r"grid-1\s+.*Failed", status), status
    # DVC started two workers, and each trial's TensorFlow got its share of the cores.
    assert (repo / ".dvc/tmp/exps/celery/dvc-exp-worker-2.out").is_file()
    log = run_ok(repo, "dvc", "queue", "logs", "grid-3")
    assert f"trial of sweep grid: {max(1, cpu_count() // 2)} threads" in log
    # A trial applies like any experiment; then the workspace goes back to the baseline.
    best = re.search(r"best: (grid-\d)", grid).group(1)
    # (The baseline never ran export: DVC says its outputs are missing, applying the rest.)
    applied = run_in(repo, "dvc", "exp", "apply", best)
    assert (
        applied.returncode == 0
        or "lineage/registered_model.json" in applied.stdout + applied.stderr
    )
    assert (
        yaml.safe_load((repo / "params.yaml").read_text())["train"]
        == trials[best]["params"]["train"]
    )
    run_ok(repo, "git", "checkout", "--", ".")
    run_ok(repo, "dvc", "checkout", "--with-deps", "evaluate")


def test_a_grid_is_one_parent_run_with_a_child_named_after_each_experiment(repo, grid):
    parent, children = family(repo, "grid")
    assert parent.info.status == "FINISHED"
    by_name = {run.info.run_name: run for run in children}
    assert sorted(by_name) == ["grid-1", "grid-2", "grid-3", "grid-4"]
    assert len(children) == 4  # no duplicate
    assert {name: run.data.tags["dvc.exp_name"] for name, run in by_name.items()} == {
        name: name for name in by_name
    }
    # Queued trials run in copies under .dvc/tmp/exps, yet log to the project's own store.
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))
    assert by_name["grid-1"].info.status == "FAILED"
    assert "needs images of at least 18x18" in by_name["grid-1"].data.tags["sweep.error"]
    assert {by_name[f"grid-{k}"].info.status for k in (2, 3, 4)} == {"FINISHED"}
    # grid-2 is the baseline's params: DVC reused the baseline's run, and says so.
    assert "sweep.reused_run" in by_name["grid-2"].data.tags
    shown = exp_show(repo)
    for name in ("grid-2", "grid-3", "grid-4"):
        accuracy = shown[name]["metrics"]["metrics/evaluate.json"]["data"]["accuracy"]
        assert by_name[name].data.metrics["test/accuracy"] == pytest.approx(accuracy)
    assert not [run.info.run_name for run in experiment_runs(repo) if run.info.status == "RUNNING"]
    best = max(
        ("grid-2", "grid-3", "grid-4"), key=lambda n: by_name[n].data.metrics["test/accuracy"]
    )
    assert parent.data.tags["sweep.best.trial"] == best
    assert parent.data.metrics["sweep/best/evaluate/accuracy"] == pytest.approx(
        by_name[best].data.metrics["test/accuracy"]
    )
    artifacts = {a.path for a in client(repo).list_artifacts(parent.info.run_id, "sweep")}
    assert {
        "sweep/report.html",
        "sweep/trials.csv",
        "sweep/figures",
        "sweep/grid.yaml",
    } <= artifacts


def test_the_report_shows_every_trial_with_the_numbers_of_its_run(repo, grid):
    page = (repo / "sweeps/grid/report.html").read_text()
    parent, children = family(repo, "grid")
    rows = dict(re.findall(r'data-name="([^"]+)" data-value="([^"]*)"', page))
    assert set(rows) == {run.info.run_name for run in children}
    for run in children:
        value = rows[run.info.run_name]
        if run.info.status == "FINISHED":
            assert float(value) == pytest.approx(run.data.metrics["test/accuracy"])
        else:
            assert value == ""
        assert f"/runs/{run.info.run_id}" in page  # linked by name
    best = parent.data.tags["sweep.best.trial"]
    assert re.search(rf'<tr class="best" data-name="{best}"', page)
    assert page.count("data:image/png;base64,") >= 3  # self-contained figures
    assert '<table id="importances">' in page


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)


def started_after_one_finished(repo: Path, sweep_name: str) -> bool:
    """A child run is RUNNING that started after another one had FINISHED."""
    if not children_states(repo, sweep_name):
        return False
    children = family(repo, sweep_name)[1]
    ended = [r.info.end_time for r in children if r.info.status == "FINISHED"]
    return bool(ended) and any(
        r.info.status == "RUNNING" and r.info.start_time > min(ended) for r in children
    )


def children_states(repo: Path, sweep_name: str) -> dict[str, str]:
    if not (repo / "mlflow.db").exists():
        return {}
    found = experiment_runs(repo)
    parent = next((r for r in found if r.info.run_name == sweep_name), None)
    if parent is None:
        return {}
    return {
        r.info.run_name: r.info.status
        for r in found
        if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }


def test_a_search_stopped_by_ctrl_c_resumes_without_repeating_a_finished_trial(repo):
    process = subprocess.Popen(
        [sys.executable, "-m", "tools.sweep", "sweeps/search.yaml"],
        cwd=repo,
        env=user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Ctrl-C once a trial has finished and another has begun to train since: one that
        # ran beside the finished one may be about to end (it must be training when the
        # sweep's `dvc queue kill` reaches it).
        wait_for(lambda: started_after_one_finished(repo, "search"), "a trial begun later")
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=DEADLINE_S)
    finally:
        process.kill()
    assert process.returncode == 130, output
    before = children_states(repo, "search")
    assert "KILLED" in before.values(), before  # the trial Ctrl-C stopped
    assert family(repo, "search")[0].info.status == "KILLED"  # and the sweep's parent run
    assert "RUNNING" not in before.values()
    finished_before = {name for name, state in before.items() if state == "FINISHED"}
    runs_before = {r.info.run_name: r.info.run_id for r in family(repo, "search")[1]}

    done = sweep(repo, "search")
    assert done.returncode == 0, done.stdout + done.stderr

    parent, children = family(repo, "search")
    assert parent.info.status == "FINISHED"
    names = [run.info.run_name for run in children]
    assert len(names) == len(set(names))  # no duplicate run
    assert not [run for run in children if "evaluate.outcome" in run.data.tags]  # train only
    for name in finished_before:  # finished trials were not run again
        assert runs_before[name] in {run.info.run_id for run in children}
    rows = list(csv_rows(repo / "sweeps/search/trials.csv"))
    complete = [row for row in rows if row["state"] == "COMPLETE"]
    assert len([row for row in rows if row["state"] != "KILLED"]) == 4  # the budget
    points = [(row["train.learning_rate"], row["train.batch_size"]) for row in complete]
    assert len(points) == len(set(points))
    killed = [row for row in rows if row["state"] == "KILLED"]
    for row in killed:  # run again under a new name
        again = [
            r
            for r in rows
            if r is not row and r["train.learning_rate"] == row["train.learning_rate"]
        ]
        assert again and again[0]["experiment"] != row["experiment"]
    queued = re.findall(r"\s(search-\d+)\s", run_ok(repo, "dvc", "queue", "status"))
    assert len(queued) == len(set(queued))  # DVC never ran a trial twice
    assert not [run.info.run_name for run in experiment_runs(repo) if run.info.status == "RUNNING"]
    page = (repo / "sweeps/search/report.html").read_text()
    assert '<table id="importances">' in page


def csv_rows(path: Path):
    import csv

    with path.open() as handle:
        yield from csv.DictReader(handle)


def test_promote_sends_the_best_trial_through_export_which_sets_the_alias(repo, grid):
    # Last in the module: it leaves the winner applied in the workspace, as a user would.
    best = re.search(r"best: (grid-\d)", grid).group(1)
    done = run_in(repo, sys.executable, "-m", "tools.sweep", "sweeps/grid.yaml", "--promote")
    assert done.returncode == 0, done.stdout + done.stderr
    registered = json.loads((repo / "lineage/registered_model.json").read_text())
    decision = json.loads((repo / "metrics/promotion.json").read_text())
    assert f"{best} (metrics/evaluate.json:accuracy=" in done.stdout  # after dvc repro's log
    assert f"registered {registered['name']} version {registered['version']} as " in done.stdout
    # Export decided, on the evidence: the first model clears the floor and is champion.
    assert registered["alias"] == ("champion" if decision["promoted"] else "challenger")
    assert decision["reason"] in done.stdout
    # The version is the winner's model: its params are the ones the best trial ran with.
    trial_params = exp_show(repo)[best]["params"]
    assert yaml.safe_load((repo / "params.yaml").read_text()) == trial_params
    version = client(repo).get_model_version(registered["name"], str(registered["version"]))
    assert (
        client(repo).get_run(version.run_id).data.params["train.architecture"]
        == (trial_params["train"]["architecture"])
    )
