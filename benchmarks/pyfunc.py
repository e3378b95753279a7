"""In-process latency of the registered pyfunc, one image a call, against the runtime in it.

Loads the registered champion (``models:/NAME@champion``) with ``mlflow.pyfunc.load_model``
in a Python process of its own (see WORKER for why not this one) and times, around the
call only, ``predict`` on one image sent two ways: a base64 PNG in an ``image`` column
(``png``) and a raw uint8 pixel array (``array``). The baseline is the runtime inside
that pyfunc (LiteRT or ONNX Runtime, as export shipped it; Keras for older versions)
called as the pyfunc calls it, on the same image already decoded (``runtime``): each ratio
is what decoding, the OOD score, input checks and the result DataFrame add. ``keras`` is
the Keras model's ``predict_on_batch`` on the same image, what the pyfunc ran before the
fast path. The four take turns on the same image, in an order rotated every round, so load
that comes and goes slows them alike; the figures are of the rounds after the warm-up
ones. Every answer must name the class the baseline names (``wrong`` counts those that
do not). The worker process is stopped, with its process group, at the end, on errors
and on Ctrl-C too.

benchmarks/server.py runs the same worker as the baseline of the model server.

Prints a Markdown table and writes benchmarks/results/pyfunc.json.

    python -m benchmarks.pyfunc            # 200 rounds after 20 warm-up ones
    python -m benchmarks.pyfunc --quick    # 30 rounds after 5: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from benchmarks import markdown_table, package_versions, write_results
from classifier.cli import run_stage
from classifier.errors import DataError, StageError
from classifier.processes import ProcessError, ProcessGroup

log = logging.getLogger("benchmarks.pyfunc")

NAME = "pyfunc"
ALIAS = "champion"
BASELINE = "runtime"
KINDS = ("png", "array", BASELINE, "keras")
STARTUP_SECONDS = 180
REQUEST_TIMEOUT_SECONDS = 60
# Full and --quick settings; an option given on the command line overrides either.
FULL = {"requests": 200, "warmup": 20}
QUICK = {"requests": 30, "warmup": 5}
PACKAGES = ("tensorflow", "keras", "mlflow", "numpy", "pandas", "pillow")
HOW_TO_FIX = "run `make run` first"


class ServerError(StageError):
    """A process the benchmark started did not load the model, or stopped answering."""


# The worker is a Python of its own, started in a scratch folder: in this process the
# working tree's `classifier` is imported already, and MLflow would then run that code
# instead of the copy logged with the registered model, which the model server runs. It
# connects back to the port it is given once the model is loaded, names itself with the
# token, then answers "KIND INDEX" lines with "SECONDS CLASS_INDEX" lines.
WORKER = """
import json, socket, sys, time
import numpy as np, pandas as pd
import mlflow.pyfunc
model_uri, images_file, pngs_file, port, token = sys.argv[1:6]
model = mlflow.pyfunc.load_model(model_uri)
python_model = model.unwrap_python_model()
if hasattr(python_model, "keras_runtime"):
    engines = {"runtime": python_model.runtime.run, "keras": python_model.keras_runtime().run}
else:  # a version from before the fast path: Keras is its runtime
    keras_run = lambda batch: {"probabilities": python_model.model.predict_on_batch(batch)}
    engines = {"runtime": keras_run, "keras": keras_run}
images = np.load(images_file)
pngs = json.loads(open(pngs_file).read())
connection = socket.create_connection(("127.0.0.1", int(port)))
stream = connection.makefile("rw", encoding="ascii", newline="\\n")
stream.write(token + "\\n")
stream.flush()
for line in stream:
    kind, index = line.split()
    index = int(index)
    if kind in engines:
        batch = images[index : index + 1]
        start = time.perf_counter()
        probabilities = engines[kind](batch)["probabilities"]
        seconds = time.perf_counter() - start
        class_index = int(np.argmax(probabilities[0]))
    else:
        if kind == "png":
            model_input = pd.DataFrame({"image": [pngs[index]]})
        else:
            model_input = images[index : index + 1]
        start = time.perf_counter()
        predictions = model.predict(model_input)
        seconds = time.perf_counter() - start
        class_index = int(predictions["class_index"].iloc[0])
    stream.write(f"{seconds} {class_index}\\n")
    stream.flush()
"""


def serving_env(store_uri: str) -> dict[str, str]:
    """The environment `make serve` gives MLflow: the project's bin first on PATH (MLflow
    starts uvicorn from PATH) and the store to resolve ``models:/`` URIs in."""
    bin_dir = Path(sys.executable).parent
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": store_uri}


class DirectPyfunc:
    """The worker's process group and, once it has loaded the model, its connection."""

    def __init__(self, group: ProcessGroup, listener: socket.socket, token: str) -> None:
        self.group = group
        self.listener = listener
        self.token = token
        self.started = time.monotonic()
        self.connection: socket.socket | None = None
        self.stream = None

    def _connected(self) -> bool:
        """Whether the worker has connected and named itself: the model is loaded."""
        try:
            connection, _ = self.listener.accept()
        except BlockingIOError:
            return False
        connection.settimeout(REQUEST_TIMEOUT_SECONDS)
        stream = connection.makefile("rw", encoding="ascii", newline="\n")
        try:
            named = stream.readline().strip() == self.token
        except OSError:
            named = False
        if not named:  # not our worker
            stream.close()
            connection.close()
            return False
        self.connection, self.stream = connection, stream
        return True

    def wait_ready(self, timeout: float = STARTUP_SECONDS) -> float:
        """Block until the model is loaded; the seconds since the start, or ServerError."""
        try:
            self.group.wait_until(self._connected, timeout)
        except ProcessError as error:
            raise ServerError(str(error)) from None
        return time.monotonic() - self.started

    def predict(self, kind: str, index: int) -> tuple[float, int]:
        """Seconds the worker's call took on image ``index`` sent as ``kind`` (one of KINDS),
        and the class it gave."""
        if self.stream is None:
            raise ServerError("the direct pyfunc is not ready: call wait_ready first")
        try:
            self.stream.write(f"{kind} {index}\n")
            self.stream.flush()
            line = self.stream.readline()
        except OSError:
            line = ""
        if not line:
            raise ServerError(
                f"the direct pyfunc stopped answering; {self.group.log_path} ends:\n"
                f"{self.group.log_tail()}"
            )
        seconds, class_index = line.split()
        return float(seconds), int(class_index)

    def close(self) -> None:
        """Hang up: the worker's loop ends."""
        for part in (self.stream, self.connection):
            if part is not None:
                with contextlib.suppress(OSError):
                    part.close()


@contextlib.contextmanager
def direct_pyfunc(
    model_uri: str, store_uri: str, images: np.ndarray, pngs: Sequence[str], work: Path
) -> Iterator[DirectPyfunc]:
    """Start loading the registered pyfunc in a worker process (call ``wait_ready`` before
    use); stop its whole process group on the way out."""
    np.save(work / "images.npy", images, allow_pickle=False)
    (work / "pngs.json").write_text(json.dumps(list(pngs)))
    token = secrets.token_hex(8)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        command = [sys.executable, "-c", WORKER, model_uri, "images.npy", "pngs.json"]
        group = ProcessGroup.start(
            "the direct pyfunc",
            [*command, str(port), token],
            cwd=work,  # so that it cannot import the working tree's `classifier` either
            env=serving_env(store_uri),
            log_path=work / "direct.log",
        )
        direct = DirectPyfunc(group, listener, token)
        try:
            yield direct
        finally:
            direct.close()
            group.stop()


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 and mean in ms, and calls/s of a caller that waits for each answer."""
    milliseconds = np.array(seconds) * 1000
    p50, p90, p99 = np.percentile(milliseconds, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
        "mean_ms": round(float(milliseconds.mean()), 2),
        "requests_per_second": round(len(seconds) / float(np.sum(seconds)), 1),
    }


def overhead(measured: dict[str, float], baseline: dict[str, float]) -> dict[str, float]:
    """``measured`` against ``baseline``: p50 and p99 ratios, and the p50 milliseconds added."""
    return {
        "p50_ratio": round(measured["p50_ms"] / baseline["p50_ms"], 2),
        "p99_ratio": round(measured["p99_ms"] / baseline["p99_ms"], 2),
        "p50_added_ms": round(measured["p50_ms"] - baseline["p50_ms"], 2),
    }


def measure_latency(
    direct: DirectPyfunc, images: int, requests: int, warmup: int
) -> dict[str, dict]:
    """Single-image latency of the pyfunc (PNG and array), of the runtime in it and of Keras.

    The four take turns on the same image, in an order rotated every round.
    """
    from tqdm import tqdm

    seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    wrong = dict.fromkeys(KINDS, 0)
    for step in tqdm(
        range(warmup + requests), desc="calls", unit="round", disable=not sys.stderr.isatty()
    ):
        index = step % images
        shift = step % len(KINDS)
        answers = {kind: direct.predict(kind, index) for kind in [*KINDS[shift:], *KINDS[:shift]]}
        if step >= warmup:
            for kind, (elapsed, class_index) in answers.items():
                seconds[kind].append(elapsed)
                wrong[kind] += class_index != answers[BASELINE][1]
    summary = {kind: {**latency_summary(seconds[kind]), "wrong": wrong[kind]} for kind in KINDS}
    for kind in KINDS:
        if kind != BASELINE:
            summary[f"overhead_{kind}"] = overhead(summary[kind], summary[BASELINE])
    return summary


def latency_table(latency: dict[str, dict]) -> str:
    rows = []
    for kind in KINDS:
        figures = latency[kind]
        versus = (
            "1.00x (baseline)"
            if kind == BASELINE
            else f"{latency[f'overhead_{kind}']['p50_ratio']:.2f}x"
        )
        rows.append(
            [
                kind,
                f"{figures['p50_ms']:.2f}",
                f"{figures['p90_ms']:.2f}",
                f"{figures['p99_ms']:.2f}",
                f"{figures['requests_per_second']:.0f}",
                versus,
                figures["wrong"],
            ]
        )
    header = [
        "single image",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "calls/s",
        f"p50 vs {BASELINE}",
        "wrong",
    ]
    return markdown_table(header, rows)


# ---------------------------------------------------------------------------- inputs


def store_of(args: argparse.Namespace) -> str:
    """The MLflow store the registered model is in."""
    from classifier.tracking import store

    return args.tracking_uri or store.tracking_uri()


def check_inputs(data_dir: Path, store_uri: str) -> None:
    """Raise :class:`DataError` naming the first pipeline output that is missing."""
    from classifier.data.dataset import IMAGES_FILE

    paths = [data_dir / IMAGES_FILE]
    if store_uri.startswith("sqlite:///"):
        paths.append(Path(store_uri.removeprefix("sqlite:///")))
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: missing; {HOW_TO_FIX}")


def champion(args: argparse.Namespace, store_uri: str) -> tuple[str, int]:
    """The registered champion's ``models:/`` URI and version number in ``store_uri``."""
    import mlflow

    from classifier.config import load_params
    from classifier.tracking import registry

    model_name = args.model_name or load_params(args.params).export.model_name
    model_uri = f"models:/{model_name}@{ALIAS}"
    mlflow.set_tracking_uri(store_uri)  # the registry's client; MLFLOW_TRACKING_URI too
    version = registry.aliased_version(model_name, ALIAS)
    if version is None:
        raise DataError(f"{store_uri}: no model version {model_uri}; {HOW_TO_FIX}")
    return model_uri, int(version.version)


def sample_images(args: argparse.Namespace) -> tuple[np.ndarray, list[str]]:
    """The first ``args.requests`` test images, and each as a base64 PNG."""
    from classifier.data.dataset import read_image_set
    from classifier.serving.pyfunc import png_frame

    images = read_image_set(args.data).images[: args.requests]
    return images, png_frame(images)["image"].tolist()


def machine(load_before: tuple[float, float, float]) -> dict[str, object]:
    return {
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    """Measure what the module's docstring says; return the summary written to JSON."""
    store_uri = store_of(args)
    check_inputs(args.data, store_uri)
    model_uri, version = champion(args, store_uri)
    images, pngs = sample_images(args)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="benchmarks-pyfunc-") as work:
        log.info("loading %s (version %s) in a worker process", model_uri, version)
        with direct_pyfunc(model_uri, store_uri, images, pngs, Path(work)) as direct:
            startup = direct.wait_ready()
            log.info("loaded after %.1fs; %s calls each way", startup, args.requests)
            latency = measure_latency(direct, len(images), args.requests, args.warmup)
    summary = {
        "quick": args.quick,
        "machine": machine(load_before),
        "versions": package_versions(PACKAGES),
        "model_uri": model_uri,
        "version": version,
        "load_seconds": round(startup, 1),
        "requests": args.requests,
        "warmup": args.warmup,
        "baseline": f"{BASELINE}: the runtime inside the pyfunc on the image already decoded, "
        "in the same process; keras: the Keras model's predict_on_batch (before the fast path)",
        **latency,
    }
    path = write_results(NAME, summary)
    print(
        "Registered pyfunc, one image a call, timed around the call in a process of its own "
        f"(baseline: {BASELINE})\n\n" + latency_table(latency)
    )
    print(f"\nwritten to {path}")
    return summary


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options of the benchmarks that load the registered model (this one and server)."""
    parser.add_argument(
        "--data",
        type=Path,
        default=Path("data/prepared/test"),
        help="test image set (default: data/prepared/test)",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="for export.model_name (default: params.yaml)",
    )
    parser.add_argument(
        "--model-name", help="registered model (default: export.model_name in params.yaml)"
    )
    parser.add_argument(
        "--tracking-uri", help="MLflow store (default: MLFLOW_TRACKING_URI, else ./mlflow.db)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer rounds: a smoke run (see below)"
    )
    parser.add_argument(
        "--requests",
        type=int,
        help=f"timed rounds, each way once (full: {FULL['requests']}, quick: {QUICK['requests']})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help=f"untimed rounds first (full: {FULL['warmup']}, quick: {QUICK['warmup']})",
    )


def settle_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the options not given from FULL or QUICK; reject impossible values."""
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be >= 1 and --warmup >= 0")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pyfunc",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Inputs are what `make run` leaves (the test split and the registered "
        "champion); without them, run `make run` first. Writes benchmarks/results/pyfunc.json.",
    )
    add_model_options(parser)
    args = parser.parse_args(argv)
    settle_options(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage("benchmarks.pyfunc", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
