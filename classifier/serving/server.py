"""The model server ``make serve`` runs: MLflow's ``/invocations``, plus ``/metrics`` and a
prediction log.

    python -m classifier.serving.server --model-uri models:/digits-cnn/3 --port 5001

(``python -m tools.serve`` resolves ``name@alias`` and the params, then runs this.)

A thin Starlette app on uvicorn around the registered pyfunc, because MLflow's own scoring
server can host neither a Prometheus endpoint nor a per-request record:

- ``POST /invocations`` takes MLflow's request formats (``dataframe_split``,
  ``dataframe_records``, ``instances``, ``inputs`` in JSON; or CSV) and answers as MLflow's
  server does, ``{"predictions": [...]}``, one row per image (classifier/serving/pyfunc.py).
  Errors are ``{"error_code": ..., "message": ...}``: 400 for what is not an image or not
  JSON, 413 for a body over ``--max-body-bytes`` or an image that decodes to more than
  ``--max-image-pixels`` (a pixel bomb, refused from its header before decoding), 415 for
  another content type, 500 for anything else. None of them stops the server.
- ``GET /metrics``: Prometheus text (prometheus-client): requests by status, a latency
  histogram, images, abstentions by reason, errors by kind, and the model served.
- ``GET /ping`` and ``/health``: 200 once the model is loaded; ``/version``: which model.
- Every prediction is appended to the prediction log (classifier/serving/prediction_log.py).

The model predicts in the event loop itself, one request at a time: under a millisecond
for one image on LiteRT, where a hop to a thread pool would cost about a tenth of that.

The process loads the model with ``mlflow.pyfunc.load_model`` after forgetting the
working tree's ``classifier`` package (which ``python -m`` imported to start this module),
so the model runs the code it was registered with, as in ``mlflow models serve``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from classifier.serving.prediction_log import PredictionLog

log = logging.getLogger("classifier.serving.server")

INPUT_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")
IMAGE_COLUMN = "image"
JSON_TYPE = "application/json"
CSV_TYPE = "text/csv"
# Latency buckets (seconds) around the 3 ms single-image target, up to a batch of photos.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
ABSTAIN_REASONS = ("low_confidence", "out_of_distribution")
ERROR_KINDS = ("bad_input", "too_large", "unsupported_media_type", "internal")


class ClientError(Exception):
    """A request the server refuses: its status, MLflow-style error code and message."""

    def __init__(self, status: int, error_code: str, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.error_code, self.message, self.kind = status, error_code, message, kind


def bad_request(message: str) -> ClientError:
    return ClientError(400, "BAD_REQUEST", message, "bad_input")


@dataclass(frozen=True)
class Limits:
    """What one request may hold."""

    max_body_bytes: int
    max_image_pixels: int
    max_request_images: int = 1000
    max_request_pixels: int = 100_000_000


# Parsing JSON makes an object of every array and object in it, and a body of nested
# one-pixel lists is mostly that: 16 MB of ``[1],`` would be 4 million lists, 800 MB. A
# million is 1,000 images of 28x28x1 as nested lists (785,000 arrays); no more are parsed.
MAX_JSON_CONTAINERS = 1_000_000


# ---------------------------------------------------------------------------- requests


def _column(values: Any) -> Any:
    """A JSON column as the model takes it: numbers as an array, files as a list."""
    if isinstance(values, list):
        array = np.asarray(values) if values and not isinstance(values[0], str) else None
        if array is not None and array.dtype.kind in "iuf":
            return array
    return values


def _rows_to_columns(rows: list[Any]) -> Any:
    """Records (``[{"image": ...}, ...]``) as columns; anything else as it came."""
    if rows and all(isinstance(row, dict) for row in rows):
        columns = {key for row in rows for key in row}
        return {key: _column([row.get(key) for row in rows]) for key in sorted(columns)}
    return rows


def model_input_of(payload: Any) -> Any:
    """What MLflow's server would give the model for a parsed JSON ``payload``."""
    if not isinstance(payload, dict):
        raise bad_request(f"expected a JSON object with one of {list(INPUT_KEYS)}")
    given = [key for key in INPUT_KEYS if key in payload]
    if len(given) != 1:
        raise bad_request(
            f"expected exactly one of {list(INPUT_KEYS)} in the request, got {sorted(payload)}"
        )
    key, value = given[0], payload[given[0]]
    if key == "dataframe_split":
        if not isinstance(value, dict) or not isinstance(value.get("data"), list):
            raise bad_request('dataframe_split: expected {"columns": [...], "data": [[...]]}')
        columns = value.get("columns") or [str(i) for i in range(len(value["data"][:1][0]))]
        return _rows_to_columns([dict(zip(columns, row, strict=False)) for row in value["data"]])
    if key == "dataframe_records":
        if not isinstance(value, list):
            raise bad_request("dataframe_records: expected a list of records")
        return _rows_to_columns(value)
    if isinstance(value, dict):  # {"inputs": {"image": [...]}}
        return {name: _column(column) for name, column in value.items()}
    if isinstance(value, list):
        return _rows_to_columns(value)
    raise bad_request(f"{key}: expected a list or an object, got {type(value).__name__}")


def parse_body(body: bytes, media_type: str) -> Any:
    """The model input in a request body of ``media_type`` (JSON or CSV)."""
    if media_type == CSV_TYPE:
        import pandas as pd

        try:
            return pd.read_csv(io.BytesIO(body))
        except Exception as error:
            raise bad_request(f"the body is not valid CSV: {error}") from None
    containers = body.count(b"[") + body.count(b"{")
    if containers > MAX_JSON_CONTAINERS:
        raise ClientError(
            413,
            "REQUEST_TOO_LARGE",
            f"the JSON body holds {containers:,} arrays and objects, more than the "
            f"{MAX_JSON_CONTAINERS:,} this server parses; send images as files (base64 PNG) "
            "or fewer images per request",
            "too_large",
        )
    try:
        payload = json.loads(body)
    except ValueError as error:
        raise bad_request(f"the body is not valid JSON: {error}") from None
    except RecursionError:  # Python's parser recurses once per level of nesting
        raise bad_request("the body's JSON is nested too deeply to be images") from None
    return model_input_of(payload)


def image_count(model_input: Any) -> int:
    """How many images a parsed request holds (rows of its image column, or of its array)."""
    if isinstance(model_input, dict):
        column = model_input.get("image")
        return 0 if column is None else len(column) if hasattr(column, "__len__") else 1
    return len(model_input) if hasattr(model_input, "__len__") else 1


def check_image_count(model_input: Any, limit: int) -> None:
    """A 413 for a request of more than ``limit`` images, before any is decoded."""
    count = image_count(model_input)
    if count > limit:
        raise ClientError(
            413,
            "TOO_MANY_IMAGES",
            f"the request holds {count:,} images, more than the {limit:,} this server takes "
            "per request; split it into smaller requests",
            "too_large",
        )


def media_type_of(content_type: str) -> str:
    """JSON or CSV from a Content-Type header; a 415 ClientError for anything else."""
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in (JSON_TYPE, CSV_TYPE):
        shown = repr(content_type[:100]) if content_type else "none"
        raise ClientError(
            415,
            "UNSUPPORTED_MEDIA_TYPE",
            f"Content-Type {shown} is not supported: send {JSON_TYPE} (MLflow's request "
            f"formats) or {CSV_TYPE}",
            "unsupported_media_type",
        )
    return media_type


def too_large(limit: int) -> ClientError:
    return ClientError(
        413,
        "REQUEST_TOO_LARGE",
        f"the request body is over the limit of {limit:,} bytes; send fewer or smaller images",
        "too_large",
    )


async def read_body(request: Any, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it passes ``limit`` bytes: a declared
    length over it is refused before reading a byte."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------- the model


class Served:
    """The registered pyfunc as the server uses it: images in, JSON-ready rows out."""

    def __init__(self, pyfunc: Any, limits: Limits) -> None:
        self.pyfunc = pyfunc
        self.model = pyfunc.unwrap_python_model()
        # The model's own error classes, from the code it shipped with.
        module = sys.modules[type(self.model).__module__]
        self.bad_input = getattr(module, "BadImageInput", ValueError)
        self.image_too_large = getattr(module, "ImageTooLarge", None)
        self.answers_rows = hasattr(self.model, "classify")  # else a version from before
        if self.answers_rows:
            self.model.max_image_pixels = limits.max_image_pixels
            self.model.max_request_pixels = limits.max_request_pixels

    @property
    def runtime(self) -> str:
        found = getattr(self.model, "runtime", None)
        return getattr(found, "fmt", "keras")

    def answer(self, model_input: Any) -> tuple[np.ndarray | None, list[dict[str, Any]]]:
        """The images the model saw (None for older versions) and its rows for them."""
        try:
            if not self.answers_rows:
                frame = self.pyfunc.predict(model_input)
                rows = frame.to_dict(orient="records")
                return None, [
                    {k: None if _missing(v) else v for k, v in row.items()} for row in rows
                ]
            images = self.model.images(model_input)
            return images, self.model.records(self.model.classify(images))
        except Exception as error:
            if self.image_too_large is not None and isinstance(error, self.image_too_large):
                raise ClientError(413, "IMAGE_TOO_LARGE", _message(error), "too_large") from None
            if isinstance(error, self.bad_input):
                raise ClientError(
                    400, "INVALID_PARAMETER_VALUE", _message(error), "bad_input"
                ) from None
            raise


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _message(error: BaseException) -> str:
    return getattr(error, "message", None) or str(error)


# ---------------------------------------------------------------------------- metrics


class Metrics:
    """The Prometheus metrics of one server, in a registry of their own."""

    def __init__(self, model: dict[str, Any]) -> None:
        import prometheus_client
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # Counters' *_created timestamps say nothing here and double the text.
        prometheus_client.disable_created_metrics()
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "classifier_requests", "Requests to /invocations, by HTTP status.", ["status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "classifier_request_duration_seconds",
            "Time from a request's arrival to its answer, /invocations only.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.images = Counter("classifier_images", "Images classified.", registry=self.registry)
        self.abstentions = Counter(
            "classifier_abstentions", "Images the model abstained on, by reason.", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        self.errors = Counter(
            "classifier_errors", "Requests refused or failed, by kind.", ["kind"],
            registry=self.registry,
        )  # fmt: skip
        info = Gauge(
            "classifier_model_info", "The model served (always 1).",
            ["name", "version", "runtime"], registry=self.registry,
        )  # fmt: skip
        info.labels(**{key: str(model.get(key)) for key in ("name", "version", "runtime")}).set(1)
        for reason in ABSTAIN_REASONS:  # every series from the start, at 0
            self.abstentions.labels(reason)
        for kind in ERROR_KINDS:
            self.errors.labels(kind)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# ---------------------------------------------------------------------------- the app


def _error(error: ClientError) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(
        {"error_code": error.error_code, "message": error.message}, status_code=error.status
    )


# Long because its five routes are small closures over one set of metrics and one log.
def create_app(
    served: Served,
    model: dict[str, Any],
    limits: Limits,
    prediction_log: PredictionLog | None = None,
) -> Any:
    """The Starlette app serving ``served`` (``model``: name, version, runtime)."""
    import anyio
    import anyio.to_thread
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    metrics = Metrics(model)
    logged_model = {"model": model.get("name"), "version": model.get("version")}

    def score(body: bytes, media_type: str, started: float) -> tuple[Any, list[dict]]:
        """Parse, check, predict, answer and log one request: on a worker thread."""
        model_input = parse_body(body, media_type)
        check_image_count(model_input, limits.max_request_images)
        images, rows = served.answer(model_input)
        response = Response(json.dumps({"predictions": rows}), media_type=JSON_TYPE)
        if rows and prediction_log is not None and images is not None:
            prediction_log.append(logged_model, images, rows, time.perf_counter() - started)
        return response, rows

    # One request is scored at a time, off the event loop: the model already uses every
    # core, and /ping, /health and /metrics answer while it works. Others wait their turn.
    scoring = anyio.CapacityLimiter(1)

    async def invocations(request: Any) -> Any:
        started = time.perf_counter()
        try:
            media_type = media_type_of(request.headers.get("content-type", ""))
            body = await read_body(request, limits.max_body_bytes)
            response, rows = await anyio.to_thread.run_sync(
                score, body, media_type, started, limiter=scoring
            )
        except ClientError as error:
            response, rows = _error(error), []
            metrics.errors.labels(error.kind).inc()
        except Exception:
            log.exception("a request failed")
            error = ClientError(500, "INTERNAL_ERROR", "the model failed; see the server log", "")
            response, rows = _error(error), []
            metrics.errors.labels("internal").inc()
        seconds = time.perf_counter() - started
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.latency.observe(seconds)
        if rows:
            metrics.images.inc(len(rows))
            for row in rows:
                if row.get("abstain_reason") in ABSTAIN_REASONS:
                    metrics.abstentions.labels(row["abstain_reason"]).inc()
        return response

    async def ping(request: Any) -> Any:
        return Response("\n", media_type="text/plain")

    async def version(request: Any) -> Any:
        return JSONResponse(model)

    async def metrics_text(request: Any) -> Any:
        content, content_type = metrics.text()
        return Response(content, headers={"Content-Type": content_type})

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        if prediction_log is not None:
            prediction_log.close()

    app = Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
            Route("/health", ping, methods=["GET"]),
            Route("/version", version, methods=["GET"]),
            Route("/metrics", metrics_text, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    return app


# ---------------------------------------------------------------------------- main


def _forget_project_code() -> None:
    """Forget the working tree's ``classifier`` package, so that loading the model imports
    the copy it was registered with (MLflow puts that first on ``sys.path``)."""
    for name in [name for name in sys.modules if name.split(".")[0] == "classifier"]:
        del sys.modules[name]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m classifier.serving.server",
        description="Serve a registered model on /invocations, with /metrics and a "
        "prediction log (python -m tools.serve runs this with params.yaml's serve.*).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-uri", required=True, help="models:/NAME/VERSION or a path")
    parser.add_argument("--model-name", help="the name to log and report")
    parser.add_argument("--model-version", type=int, help="the version to log and report")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--max-body-bytes", type=int, default=16 * 2**20)
    parser.add_argument("--max-image-pixels", type=int, default=50_000_000)
    parser.add_argument("--max-request-images", type=int, default=1000)
    parser.add_argument("--max-request-pixels", type=int, default=100_000_000)
    parser.add_argument("--log-dir", type=Path, help="the prediction log's folder; none: no log")
    parser.add_argument("--log-max-bytes", type=int, default=10 * 2**20)
    parser.add_argument("--log-backups", type=int, default=5)
    parser.add_argument("--log-images", action="store_true", help="log the pixels too")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    import mlflow.pyfunc
    import uvicorn

    _forget_project_code()
    limits = Limits(
        args.max_body_bytes,
        args.max_image_pixels,
        args.max_request_images,
        args.max_request_pixels,
    )
    served = Served(mlflow.pyfunc.load_model(args.model_uri), limits)
    model = {
        "name": args.model_name or args.model_uri,
        "version": args.model_version,
        "runtime": served.runtime,
        "uri": args.model_uri,
    }
    prediction_log = None
    if args.log_dir is not None:
        prediction_log = PredictionLog(
            args.log_dir,
            max_bytes=args.log_max_bytes,
            backups=args.log_backups,
            keep_images=args.log_images,
        )
    log.info(
        "serving %s version %s on %s at http://%s:%s/invocations; prediction log: %s",
        model["name"],
        model["version"],
        model["runtime"],
        args.host,
        args.port,
        prediction_log.path if prediction_log else "off",
    )
    app = create_app(served, model, limits, prediction_log)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
