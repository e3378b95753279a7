"""Serve a registered model over HTTP, as ``make serve`` runs it.

    python -m tools.serve                              # export.model_name@champion on :5001
    python -m tools.serve --model-name pets-cnn --alias challenger --port 5002

It resolves ``name@alias`` in the pipeline's store first, so a model that was never
registered, or an alias nobody set, is one error line and exit code 1; then it replaces
itself with the project's model server (classifier/serving/server.py) on that version,
with the limits and the prediction log of ``serve.*`` in params.yaml: MLflow's request
format on ``/invocations``, plus ``/metrics`` and the log. The version is pinned when the
server starts, so the log names the version that answered even if the alias moves.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from classifier.cli import exit_process, run_stage
from classifier.config import ServeParams, load_params
from classifier.errors import StageError
from classifier.tracking import registry, store


def resolve(model_name: str, alias: str) -> int:
    """The version ``model_name@alias`` points at; a StageError saying what to do if none."""
    store.connect()
    version = registry.aliased_version(model_name, alias)
    if version is None:
        raise StageError(
            f"no version of {model_name} is @{alias} in {store.tracking_uri()}; "
            "run the pipeline (make run) first, or name another model with --model-name"
        )
    return int(version.version)


def command(
    model_name: str, version: int, host: str, port: int, cfg: ServeParams, log_dir: Path
) -> list[str]:
    """The model server's command line for ``model_name`` version ``version``."""
    return [
        sys.executable, "-m", "classifier.serving.server",
        "--model-uri", f"models:/{model_name}/{version}",
        "--model-name", model_name, "--model-version", str(version),
        "--host", host, "--port", str(port),
        "--max-body-bytes", str(cfg.max_body_bytes),
        "--max-image-pixels", str(cfg.max_image_pixels),
        "--max-request-images", str(cfg.max_request_images),
        "--max-request-pixels", str(cfg.max_request_pixels),
        "--log-dir", str(log_dir), "--log-max-bytes", str(cfg.log_max_bytes),
        "--log-backups", str(cfg.log_backups),
        *(["--log-images"] if cfg.log_images else []),
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
    parser.add_argument(
        "--log-dir", type=Path, help="prediction log folder (default: serve.log_dir in params.yaml)"
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    resolved: list[list[str]] = []

    def body() -> None:
        params = load_params(args.params)
        name = args.model_name or params.export.model_name
        version = resolve(name, args.alias)
        log_dir = args.log_dir or Path(params.serve.log_dir)
        resolved.append(command(name, version, args.host, args.port, params.serve, log_dir))

    code = run_stage("serve", body)
    if code:
        return code
    sys.stdout.flush()
    # The server resolves models:/ URIs in the same store.
    os.environ["MLFLOW_TRACKING_URI"] = store.tracking_uri()
    os.execv(sys.executable, resolved[0])
    return 0  # not reached: the model server replaced this process


if __name__ == "__main__":
    exit_process(main())
