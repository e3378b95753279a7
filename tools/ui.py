"""The MLflow UI on the project's store, as ``make ui`` runs it.

    python -m tools.ui                 # http://127.0.0.1:5000
    python -m tools.ui --port 5050

It opens the store the pipeline logs to (``MLFLOW_TRACKING_URI``, else ``mlflow.db`` at the
project root) with MLflow's own ``mlflow ui``, and prints the address of the pipeline's runs.
A port that is already taken is one error line and exit code 1: MLflow's own ``mlflow ui``
prints "Address already in use" and exits 0.

Why the UI needs a default: MLflow 3's UI (3.17) decides whether an experiment opens on its
runs or on its GenAI "Overview" of traces by the browser's *workflow type*, not by the
experiment. ``useExperimentKind`` returns the kind that the workflow type implies and
ignores the experiment's ``mlflow.experimentKind`` tag, because the UI's flag
``shouldEnableWorkflowBasedNavigation`` is built in as true; the workflow type is the
address's ``?workflowType=``, else the browser's localStorage ``mlflow.workflowType_v1``,
else ``genai``. Only the sidebar's GenAI / Model training switch writes that key: an
address with ``?workflowType=machine_learning`` does not, so the experiments list, the
breadcrumb and the plain experiment address of a fresh browser open the GenAI overview.
No server setting or variable changes it. So this server adds one script to the UI's page
that sets the defaults in the browser where they are unset (a person's own choice in the
switch, or their own columns, stay theirs): the model training view, and for the
pipeline's experiment the runs table's columns and the chart sections' order.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from classifier.cli import exit_process, run_stage
from classifier.errors import StageError
from classifier.tracking import names, store

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The UI's view of training runs (its other view, the default, is for GenAI traces).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
# MLflow's job runner runs GenAI jobs (LLM judges, prompt optimisation, trace scoring),
# none of which this project has, in 8 more processes: measured idle on 2 cores, they took
# 37 CPU-seconds to start and 11 more each minute. Off unless the environment turns it on
# (tools/team_up.py's server runs without it too).
JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"

# Where MLflow 3.17's UI keeps its choices in the browser (localStorage): the workflow type
# (its useLocalStorage hook stores `<key>_v<version>`, as JSON) and each experiment page's
# view, columns included (LocalStorageUtils' store for "ExperimentPage" and the JSON list of
# the page's experiment ids).
WORKFLOW_TYPE_KEY = "mlflow.workflowType_v1"
MODEL_TRAINING = "machine_learning"
EXPERIMENT_PAGE_KEY = "MLflowLocalStorage-1.1-ExperimentPage-{ids}-ReactComponentState"
# MLflow's assistant (an LLM chat) opens itself on a browser's first visit, over a quarter of
# the page; this says it has, so it stays a button until someone presses it.
ASSISTANT_OPENED_KEY = "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1"
# The runs table's columns: what decides, how it trained, and the registered model. The UI
# names a column `<kind>.`<key>``.
RUN_COLUMNS = (
    ("metrics", names.TEST_ACCURACY),
    ("metrics", names.TEST_MACRO_F1),
    ("metrics", names.VAL_LOSS),
    ("params", "train.architecture"),
    ("params", "train.epochs"),
    ("attributes", "Models"),
)
# The chart view's sections, first: MLflow names a section after a metric's name up to its
# last `/` and sorts the sections by name (format/onnx, serving/..., test, train, val) unless
# the page's state says they were reordered; then the sections of other metrics follow.
CHART_SECTIONS_FIRST = tuple(prefix.rstrip("/") for prefix in (names.TEST, names.TRAIN, names.VAL))
# How the server tells its workers the defaults; MLflow passes the environment on.
DEFAULTS_VARIABLE = "CLASSIFIER_UI_DEFAULTS"
# What MLflow's `mlflow ui` serves, and what this module serves in its place.
MLFLOW_APP = "mlflow.server.fastapi_app:app"
APP_FACTORY = "tools.ui:create_app"


def experiment_url(host: str, port: int, experiment_id: str | None = None) -> str:
    """Where the pipeline's runs are in the UI."""
    experiment_id = experiment_id or store.connect()
    return f"http://{host}:{port}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


def browser_defaults(experiment_id: str) -> dict[str, str]:
    """The localStorage entries that make the UI open ``experiment_id`` on its runs."""
    columns = [f"{kind}.`{key}`" for kind, key in RUN_COLUMNS]
    page = EXPERIMENT_PAGE_KEY.format(ids=json.dumps([experiment_id]))
    return {
        WORKFLOW_TYPE_KEY: json.dumps(MODEL_TRAINING),
        ASSISTANT_OPENED_KEY: json.dumps(True),
        page: json.dumps(
            {
                "selectedColumns": columns,
                "compareRunCharts": [],
                "compareRunSections": [
                    {"uuid": f"section-{name}", "name": name, "display": True, "isReordered": False}
                    for name in CHART_SECTIONS_FIRST
                ],
                "isAccordionReordered": True,
            }
        ),
    }


def defaults_script(defaults: dict[str, str]) -> bytes:
    """A script that stores each of ``defaults`` that the browser does not hold yet."""
    entries = json.dumps(defaults).replace("</", "<\\/")
    return (
        "<script>try{var d=" + entries + ";for(var k in d)"
        "if(localStorage.getItem(k)===null)localStorage.setItem(k,d[k])}catch(e){}</script>"
    ).encode()


def with_script(page: bytes, script: bytes) -> bytes:
    """``page`` with ``script`` run first: before the page's own scripts, in its head."""
    head = page.find(b"<head>")
    if head < 0:
        return script + page
    at = head + len(b"<head>")
    return page[:at] + script + page[at:]


Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


class BrowserDefaults:
    """MLflow's ASGI app, whose UI page (``/``) sets ``defaults`` in the browser first."""

    def __init__(self, app: ASGIApp, defaults: dict[str, str]) -> None:
        self.app = app
        self.script = defaults_script(defaults)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != "/":
            await self.app(scope, receive, send)
            return
        start: Message = {}
        body: list[bytes] = []

        async def collect(message: Message) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body"):
                return
            page = b"".join(body)
            headers = list(start.get("headers", []))
            if start.get("status") == 200 and _is_html(headers):
                page = with_script(page, self.script)
                headers = [
                    (name, value)
                    for name, value in headers
                    if name.lower()
                    not in (b"content-length", b"etag", b"last-modified", b"cache-control")
                ]
                headers.append((b"content-length", str(len(page)).encode()))
                headers.append((b"cache-control", b"no-cache"))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": page})

        await self.app(scope, receive, collect)


def _is_html(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        name.lower() == b"content-type" and value.startswith(b"text/html")
        for name, value in headers
    )


def create_app() -> BrowserDefaults:
    """The app each of MLflow's server workers serves: MLflow's, with the browser defaults."""
    from mlflow.server.fastapi_app import app

    return BrowserDefaults(app, json.loads(os.environ.get(DEFAULTS_VARIABLE, "{}")))


def check_port_free(host: str, port: int) -> None:
    """Raise if something listens on ``host:port`` already."""
    with socket.socket() as probe:
        # As the server binds: connections of a server stopped a moment ago (TIME_WAIT) do
        # not hold the port, a listening socket does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise StageError(
                f"port {port} on {host} is in use ({error.strerror}); choose another: "
                f"make ui MLFLOW_PORT={port + 1}"
            ) from None


def command(host: str, port: int) -> list[str]:
    """``mlflow ui`` on the pipeline's store."""
    return [
        "ui", "--backend-store-uri", store.tracking_uri(), "--host", host, "--port", str(port),
    ]  # fmt: skip


def serving_create_app(build: Callable[..., list[str]]) -> Callable[..., list[str]]:
    """MLflow's uvicorn command, serving ``create_app`` in place of MLflow's app."""

    def build_command(*args: Any, **kwargs: Any) -> list[str]:
        argv = build(*args, **kwargs)
        if MLFLOW_APP not in argv:
            raise StageError(f"this MLflow does not serve {MLFLOW_APP}: {' '.join(argv)}")
        at = argv.index(MLFLOW_APP)
        return [*argv[:at], "--app-dir", str(PROJECT_ROOT), "--factory", APP_FACTORY]

    return build_command


def serve(host: str, port: int, experiment_id: str) -> None:
    """Run MLflow's ``mlflow ui``, its workers serving ``create_app``; returns when it ends."""
    import mlflow.server
    from mlflow.cli import cli

    os.environ.setdefault(JOB_EXECUTION, "false")
    os.environ[DEFAULTS_VARIABLE] = json.dumps(browser_defaults(experiment_id))
    # MLflow has no setting for the app it serves short of an installed plugin (`--app-name`
    # names an entry point); its uvicorn command is the one place to name another.
    mlflow.server._build_uvicorn_command = serving_create_app(mlflow.server._build_uvicorn_command)
    cli.main(command(host, port), prog_name="mlflow")  # exits with MLflow's status


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.ui",
        description="Open the MLflow UI on the store the pipeline logs to.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    experiment: list[str] = []

    def body() -> None:
        check_port_free(args.host, args.port)
        experiment.append(store.connect())

    code = run_stage("ui", body)
    if code:
        return code
    url = experiment_url(args.host, args.port, experiment[0])
    print(f"MLflow UI: {url}\n(store: {store.tracking_uri()})")
    sys.stdout.flush()
    serve(args.host, args.port, experiment[0])
    return 0  # not reached: MLflow's command exits


if __name__ == "__main__":
    exit_process(main())
