"""The MLflow UI on the project's store, as ``make ui`` runs it.

    python -m tools.ui                 # http://127.0.0.1:5000
    python -m tools.ui --port 5050

It opens the store the pipeline logs to (``MLFLOW_TRACKING_URI``, else ``mlflow.db`` at the
project root), and prints the address of the pipeline's experiment in the UI's model
training view: MLflow 3's UI opens on its GenAI view (traces) unless the address asks for
``workflowType=machine_learning`` (it then remembers the choice). A port that is already
taken is one error line and exit code 1: MLflow's own ``mlflow ui`` prints "Address already
in use" and exits 0.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence

from classifier.cli import exit_process, run_stage
from classifier.errors import StageError
from classifier.tracking import store

# The UI's view of training runs (its other view, the default, is for GenAI traces).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
# MLflow's job runner runs GenAI jobs (LLM judges, prompt optimisation, trace scoring),
# none of which this project has, in 8 more processes: measured idle on 2 cores, they took
# 37 CPU-seconds to start and 11 more each minute. Off unless the environment turns it on
# (tools/team_up.py's server runs without it too).
JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"


def experiment_url(host: str, port: int) -> str:
    """Where the pipeline's runs are in the UI."""
    experiment_id = store.connect()
    return f"http://{host}:{port}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


def check_port_free(host: str, port: int) -> None:
    """Raise if something listens on ``host:port`` already."""
    with socket.socket() as probe:
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
        sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store.tracking_uri(),
        "--host", host, "--port", str(port),
    ]  # fmt: skip


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
    url: list[str] = []

    def body() -> None:
        check_port_free(args.host, args.port)
        url.append(experiment_url(args.host, args.port))

    code = run_stage("ui", body)
    if code:
        return code
    print(f"MLflow UI: {url[0]}\n(store: {store.tracking_uri()})")
    sys.stdout.flush()
    os.environ.setdefault(JOB_EXECUTION, "false")
    os.execv(sys.executable, command(args.host, args.port))  # Ctrl-C goes to MLflow itself
    return 0  # not reached: the MLflow UI replaced this process


if __name__ == "__main__":
    exit_process(main())
