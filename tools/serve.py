"""Serve a registered model over HTTP, as ``make serve`` runs it.

    python -m tools.serve                              # export.model_name@champion on :5001
    python -m tools.serve --model-name pets-cnn --alias challenger --port 5002

It resolves ``name@alias`` in the pipeline's store first, so a model that was never
registered, or an alias nobody set, is one error line and exit code 1; then it runs
MLflow's model server (``mlflow models serve``) on it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from classifier.cli import run_stage
from classifier.config import load_params
from classifier.errors import StageError
from classifier.tracking import registry, store


def resolve(model_name: str, alias: str) -> str:
    """The URI of ``model_name@alias``; a StageError saying what to do if there is none."""
    store.connect()
    version = registry.aliased_version(model_name, alias)
    if version is None:
        raise StageError(
            f"no version of {model_name} is @{alias} in {store.tracking_uri()}; "
            "run the pipeline (make run) first, or name another model with --model-name"
        )
    return f"models:/{model_name}@{alias}"


def command(model_uri: str, host: str, port: int) -> list[str]:
    """``mlflow models serve`` of ``model_uri`` in this environment."""
    return [
        sys.executable, "-m", "mlflow", "models", "serve", "--model-uri", model_uri,
        "--env-manager", "local", "--host", host, "--port", str(port),
    ]  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.serve",
        description="Serve a registered model (name@alias) over HTTP on /invocations.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model-name", help="registered model (default: export.model_name in params.yaml)"
    )
    parser.add_argument("--alias", default="champion", help="which version: its alias")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=5001, help="port to listen on")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    resolved: list[str] = []

    def body() -> None:
        name = args.model_name or load_params(args.params).export.model_name
        resolved.append(resolve(name, args.alias))

    code = run_stage("serve", body)
    if code:
        return code
    sys.stdout.flush()
    os.execv(sys.executable, command(resolved[0], args.host, args.port))
    return 0  # not reached: MLflow's server replaced this process


if __name__ == "__main__":
    raise SystemExit(main())
