"""What a newcomer sees of the pipeline's runs in the MLflow UI, read in a real browser.

`python -m tools.ui` (as `make ui` runs it) serves a store with three runs logged under the
project's names; headless Chromium, each test with a fresh profile, opens the UI the ways a
person does and reads the page the app rendered.
"""

import re
import sys
from collections.abc import Iterator

import mlflow
import pytest

from classifier.processes import running
from classifier.tracking import names, store
from tests.helpers import (
    PROJECT_ROOT,
    TEST_EXPERIMENT,
    browser,
    free_port,
    fresh_store,
    stage_env,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mlflow-ui")]
STARTUP_SECONDS = 120
RUNS = {"reference-3ep": ("cnn", 3, 0.93), "bn-3ep": ("small_bn_cnn", 3, 0.91)}
# The runs table's headers that show the results (RUN_COLUMNS of tools/ui.py).
RESULT_COLUMNS = (
    names.TEST_ACCURACY,
    names.TEST_MACRO_F1,
    names.VAL_LOSS,
    "train.architecture",
    "train.epochs",
)
# Words only MLflow's GenAI overview shows.
GENAI_OVERVIEW = ("Token Usage", "Tokens per Trace")
SHOWS_THE_RUNS = " && ".join(f"document.body.innerText.includes({n!r})" for n in RUNS)


@pytest.fixture(scope="module")
def ui(tmp_path_factory) -> Iterator[tuple[str, str]]:
    """The UI's address and the experiment's id, on a store made as the pipeline makes it."""
    out = tmp_path_factory.mktemp("ui-browser")
    uri = fresh_store(out)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_EXPERIMENT_NAME", TEST_EXPERIMENT)
        experiment_id = store.connect()
        for name, (architecture, epochs, accuracy) in RUNS.items():
            with mlflow.start_run(run_name=name):
                mlflow.log_params({"train.architecture": architecture, "train.epochs": epochs})
                for epoch in range(1, epochs + 1):
                    mlflow.log_metrics(
                        {names.TRAIN_LOSS: 1 / epoch, names.VAL_LOSS: 1.1 / epoch}, step=epoch
                    )
                mlflow.log_metrics(
                    {
                        names.TEST_ACCURACY: accuracy,
                        names.TEST_MACRO_F1: accuracy - 0.01,
                        names.format_metric("onnx", "max_abs_diff"): 1e-6,
                    }
                )
    port = free_port()
    command = [sys.executable, "-m", "tools.ui", "--host", "127.0.0.1", "--port", str(port)]
    env = stage_env(uri, PYTHONPATH=str(PROJECT_ROOT))
    base = f"http://127.0.0.1:{port}"
    with running(
        "make ui", command, cwd=out, env=env, log_path=out / "ui.log",
        health_url=f"{base}/health", timeout=STARTUP_SECONDS,
    ):  # fmt: skip
        yield base, experiment_id


def assert_on_the_runs_with_results(page) -> None:
    assert page.wait_for(SHOWS_THE_RUNS), f"no runs table; the page shows:\n{page.text()[:800]}"
    assert page.wait_for(f"document.body.innerText.includes({RESULT_COLUMNS[-1]!r})", 30)
    shown = page.text()
    assert "/runs" in page.evaluate("location.hash")
    assert [column for column in RESULT_COLUMNS if column not in shown] == []
    assert [word for word in GENAI_OVERVIEW if word in shown] == []


def test_the_experiment_address_opens_on_the_runs_and_their_results(ui, tmp_path):
    base, experiment_id = ui
    with browser(tmp_path) as page:
        page.open(f"{base}/#/experiments/{experiment_id}")
        assert_on_the_runs_with_results(page)


def click_until(page, link: str, arrived: str) -> bool:
    """Click ``link`` until ``arrived`` holds: the app may render a link before its router
    takes clicks, as a person who clicks too early and clicks again would find."""
    return bool(page.wait_for(f"({arrived}) || (({link}) && ({link}).click(), false)"))


def link_named(text: str) -> str:
    return f"[...document.querySelectorAll('a')].find(a => a.textContent.trim() === {text!r})"


def test_the_experiments_list_and_the_breadcrumb_open_the_runs(ui, tmp_path):
    base, experiment_id = ui
    experiment = link_named(TEST_EXPERIMENT)
    in_the_experiment = f"location.hash.startsWith('#/experiments/{experiment_id}/')"
    with browser(tmp_path) as page:
        page.open(f"{base}/#/experiments")
        assert click_until(page, experiment, in_the_experiment), page.text()[:800]
        assert_on_the_runs_with_results(page)
        # From one of its runs, the breadcrumb's link back to the experiment.
        assert click_until(page, link_named("bn-3ep"), "location.hash.includes('/runs/')")
        breadcrumb = f"document.querySelector('a[href=\"#/experiments/{experiment_id}\"]')"
        assert page.wait_for(f"Boolean({breadcrumb})"), page.text()[:800]
        page.evaluate(f"{breadcrumb}.click()")
        assert_on_the_runs_with_results(page)


def test_a_person_who_chose_the_genai_view_keeps_it(ui, tmp_path):
    """The defaults fill in what the browser lacks and never undo a choice."""
    base, experiment_id = ui
    with browser(tmp_path) as page:
        page.open(f"{base}/#/experiments/{experiment_id}")
        assert page.wait_for(SHOWS_THE_RUNS)
        page.evaluate(
            "[...document.querySelectorAll('[role=button]')]"
            ".find(e => e.textContent.trim() === 'GenAI').click()"
        )  # the sidebar's switch
        assert page.wait_for("location.hash.includes('workflowType=genai')")
        page.open(f"{base}/#/experiments/{experiment_id}")
        assert page.wait_for("location.hash.includes('/overview')"), page.text()[:800]


def test_the_chart_view_opens_on_the_test_metrics_and_the_learning_curves(ui, tmp_path):
    """MLflow would sort the sections by name: `format/onnx` first."""
    base, experiment_id = ui
    with browser(tmp_path) as page:
        page.open(f"{base}/#/experiments/{experiment_id}/runs?compareRunsMode=CHART")
        assert page.wait_for("document.body.innerText.includes('format/onnx')"), page.text()[:800]
        sections = re.findall(r"^(\S+)\n\(\d+\)$", page.text(), re.MULTILINE)
        assert sections == ["test", "train", "val", "format/onnx"]
