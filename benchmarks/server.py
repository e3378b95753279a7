"""Model server latency and throughput: `make serve`'s server against what it replaced.

Starts three servers on free ports of 127.0.0.1, each in a process group of its own:

- ``serve``: the project's server (classifier/serving/server.py, what `make serve` runs) of
  the registered champion, predicting on the fast runtime export shipped with it (LiteRT
  or ONNX Runtime), with the prediction log and the metrics on;
- ``mlflow``: `mlflow models serve` of the same registered pyfunc, made to predict with
  Keras (``CLASSIFIER_RUNTIME=keras``): `make serve` as it was before (today's path);
- ``keras``: `mlflow models serve` of the Keras model alone, saved with MLflow's keras
  flavour (``mlflow.keras.save_model``): what a plain MLflow set-up serves. It takes pixel
  arrays only.

and, as before, the same registered pyfunc called in a process of its own (``direct_*``,
benchmarks/pyfunc.py's worker), so that each server's ratio to it is what HTTP, JSON and
the server add. Single-image requests go one after another over one keep-alive connection
per server: a base64 PNG (``dataframe_split``) and a raw pixel array (``inputs``). Every
way takes its turn on the same image in a round, in an order rotated every round, so load
that comes and goes slows them alike; request bodies are built before the clock starts.
Then batches of 256 images (PNG where the server takes them), the servers taking turns
again, for throughput. Every answer must name the class the direct PNG call names (the
plain Keras server's too). At the end, on errors and on Ctrl-C, every process group is
stopped.

Prints Markdown tables (with the ratios of ``serve`` to ``mlflow`` and to ``keras``) and
writes benchmarks/results/server.json.

    python -m benchmarks.server            # 200 rounds after 20 warm-up ones; 20 batch rounds
    python -m benchmarks.server --quick    # 30 rounds after 5; 3 batch rounds: a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import markdown_table, package_versions, write_results
from benchmarks.pyfunc import (
    PACKAGES,
    STARTUP_SECONDS,
    DirectPyfunc,
    ServerError,
    add_model_options,
    champion,
    check_inputs,
    direct_pyfunc,
    latency_summary,
    machine,
    overhead,
    sample_images,
    serving_env,
    settle_options,
    store_of,
)
from classifier.cli import run_stage
from classifier.processes import ProcessError, ProcessGroup
from classifier.serving.pyfunc import RUNTIME_ENV

log = logging.getLogger("benchmarks.server")

NAME = "server"
REQUEST_TIMEOUT_SECONDS = 120
SERVERS = ("serve", "mlflow", "keras")
# Single-image ways, server_kind; the plain Keras model takes pixel arrays only.
MODES = (
    "serve_png", "serve_array", "mlflow_png", "mlflow_array", "keras_array",
    "direct_png", "direct_array",
)  # fmt: skip
BATCH_MODES = ("serve_png", "mlflow_png", "keras_array")
BATCH_SIZE = 256
BATCH_ROUNDS = {"full": 20, "quick": 3}
BATCH_WARMUP = 2
# The targets for `make serve`, one image a request, on 2 cores.
TARGET_P50_MS = 3.0
TARGET_P99_MS = 6.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def mlflow_command(model_uri: str, port: int) -> list[str]:
    """`mlflow models serve` of ``model_uri`` on ``port`` of 127.0.0.1, in this environment."""
    return [
        str(Path(sys.executable).parent / "mlflow"), "models", "serve", "--model-uri", model_uri,
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


def serve_command(model_uri: str, version: int, port: int, log_dir: Path) -> list[str]:
    """`make serve`'s server of ``model_uri``, its prediction log in ``log_dir``."""
    return [
        sys.executable, "-m", "classifier.serving.server", "--model-uri", model_uri,
        "--model-version", str(version), "--host", "127.0.0.1", "--port", str(port),
        "--log-dir", str(log_dir),
    ]  # fmt: skip


@dataclass(frozen=True)
class ModelServer:
    """A started server: its process group and port."""

    group: ProcessGroup
    port: int
    started: float

    def wait_ready(self, timeout: float = STARTUP_SECONDS) -> float:
        """Block until it answers /ping; the seconds since it was started, or ServerError."""
        try:
            self.group.wait_for_http(f"http://127.0.0.1:{self.port}/ping", timeout)
        except ProcessError as error:
            raise ServerError(str(error)) from None
        return time.monotonic() - self.started


@contextlib.contextmanager
def model_server(
    name: str, command: Sequence[str], port: int, env: dict[str, str], log_path: Path
) -> Iterator[ModelServer]:
    """Start ``command`` (a server on ``port``; call ``wait_ready`` before use); stop its whole
    process group on the way out."""
    started = time.monotonic()
    group = ProcessGroup.start(name, command, env=env, log_path=log_path, cwd=Path.cwd())
    try:
        yield ModelServer(group, port, started)
    finally:
        group.stop()


def save_plain_keras(model_uri: str, store_uri: str, work: Path) -> Path:
    """The Keras model inside the registered pyfunc, saved with MLflow's keras flavour."""
    import mlflow
    import mlflow.keras

    from classifier.model.files import load_model

    mlflow.set_tracking_uri(store_uri)
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(work / "registered")))
    (keras_file,) = local.glob("artifacts/*.keras")
    path = work / "plain-keras"
    mlflow.keras.save_model(load_model(str(keras_file)), str(path), pip_requirements=["keras"])
    return path


class Client:
    """A sequential client on one keep-alive connection, as a real client library keeps."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connection = http.client.HTTPConnection(
            "127.0.0.1", port, timeout=REQUEST_TIMEOUT_SECONDS
        )

    def post(self, body: bytes) -> dict:
        """POST a JSON body to /invocations; the parsed answer, or ServerError."""
        headers = {"Content-Type": "application/json"}
        for attempt in (1, 2):
            try:
                self.connection.request("POST", "/invocations", body, headers)
                response = self.connection.getresponse()
                payload = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                # The server closed an idle keep-alive connection; open a new one once.
                self.connection.close()
                if attempt == 2:
                    raise
        if response.status != 200:
            raise ServerError(f"POST /invocations answered {response.status}: {payload[:300]!r}")
        return json.loads(payload)

    def close(self) -> None:
        self.connection.close()


def classes_of(answer: dict) -> list[int]:
    """The class each image got: the pyfunc's class_index, or the argmax of bare probabilities."""
    rows = answer["predictions"]
    if rows and isinstance(rows[0], dict):
        return [int(row["class_index"]) for row in rows]
    return [int(np.argmax(row)) for row in rows]


def png_body(pngs: Sequence[str]) -> bytes:
    # What png_frame(images).to_dict(orient="split") gives, built once.
    return json.dumps(
        {"dataframe_split": {"index": list(range(len(pngs))), "columns": ["image"],
                             "data": [[png] for png in pngs]}}
    ).encode()  # fmt: skip


def array_body(images: np.ndarray) -> bytes:
    return json.dumps({"inputs": images.tolist()}).encode()


def request_bodies(images: np.ndarray, pngs: Sequence[str]) -> dict[str, list[bytes]]:
    """Each image as the JSON body of each kind, built before any clock starts."""
    return {
        "png": [png_body([png]) for png in pngs],
        "array": [array_body(image[np.newaxis]) for image in images],
    }


def measure_latency(
    clients: dict[str, Client],
    direct: DirectPyfunc,
    images: np.ndarray,
    pngs: Sequence[str],
    requests: int,
    warmup: int,
) -> dict[str, dict]:
    """Single-image latency of each server (PNG and array) and of the pyfunc called directly.

    Every way takes its turn on the same image in a round. Every answer must name the
    class the direct PNG call names.
    """
    from tqdm import tqdm

    bodies = request_bodies(images, pngs)

    def call(mode: str, index: int) -> tuple[float, int]:
        server, kind = mode.split("_")
        if server == "direct":
            return direct.predict(kind, index)
        start = time.perf_counter()
        answer = clients[server].post(bodies[kind][index])
        seconds = time.perf_counter() - start
        return seconds, classes_of(answer)[0]

    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    wrong = dict.fromkeys(MODES, 0)
    for step in tqdm(
        range(warmup + requests), desc="requests", unit="round", disable=not sys.stderr.isatty()
    ):
        index = step % len(images)
        shift = step % len(MODES)
        answers = {mode: call(mode, index) for mode in [*MODES[shift:], *MODES[:shift]]}
        if step >= warmup:
            for mode, (elapsed, class_index) in answers.items():
                seconds[mode].append(elapsed)
                wrong[mode] += class_index != answers["direct_png"][1]
    summary = {mode: {**latency_summary(seconds[mode]), "wrong": wrong[mode]} for mode in MODES}
    for kind in ("png", "array"):
        summary[f"overhead_{kind}"] = overhead(summary[f"serve_{kind}"], summary[f"direct_{kind}"])
    return summary


def measure_batches(
    clients: dict[str, Client], images: np.ndarray, pngs: Sequence[str], rounds: int
) -> dict[str, dict]:
    """Images/s of each server on batches of BATCH_SIZE images, taking turns each round."""
    reps = -(-BATCH_SIZE // len(images))
    batch = np.concatenate([images] * reps)[:BATCH_SIZE]
    batch_pngs = (list(pngs) * reps)[:BATCH_SIZE]
    bodies = {"png": png_body(batch_pngs), "array": array_body(batch)}
    seconds: dict[str, list[float]] = {mode: [] for mode in BATCH_MODES}
    answers: dict[str, list[int]] = {}
    for step in range(BATCH_WARMUP + rounds):
        shift = step % len(BATCH_MODES)
        for mode in [*BATCH_MODES[shift:], *BATCH_MODES[:shift]]:
            server, kind = mode.split("_")
            start = time.perf_counter()
            answer = clients[server].post(bodies[kind])
            elapsed = time.perf_counter() - start
            answers[mode] = classes_of(answer)
            if step >= BATCH_WARMUP:
                seconds[mode].append(elapsed)
    reference = answers["serve_png"]
    return {
        mode: {
            "images_per_second": round(BATCH_SIZE / float(np.median(seconds[mode])), 1),
            "median_seconds": round(float(np.median(seconds[mode])), 4),
            "disagreements": sum(a != b for a, b in zip(answers[mode], reference, strict=True)),
        }
        for mode in BATCH_MODES
    }


def ratios(latency: dict[str, dict], batches: dict[str, dict]) -> dict[str, float]:
    """`make serve` against today's path and the plain Keras server, as ratios."""
    figures = {
        "p50_serve_png_over_mlflow_png": latency["serve_png"]["p50_ms"]
        / latency["mlflow_png"]["p50_ms"],
        "p50_serve_array_over_mlflow_array": latency["serve_array"]["p50_ms"]
        / latency["mlflow_array"]["p50_ms"],
        "p50_serve_array_over_keras_array": latency["serve_array"]["p50_ms"]
        / latency["keras_array"]["p50_ms"],
        "p99_serve_png_over_mlflow_png": latency["serve_png"]["p99_ms"]
        / latency["mlflow_png"]["p99_ms"],
        "batch_serve_png_over_mlflow_png": batches["serve_png"]["images_per_second"]
        / batches["mlflow_png"]["images_per_second"],
        "batch_serve_png_over_keras_array": batches["serve_png"]["images_per_second"]
        / batches["keras_array"]["images_per_second"],
    }
    return {key: round(value, 3) for key, value in figures.items()}


def targets(latency: dict[str, dict], ratio: dict[str, float]) -> dict[str, bool]:
    return {
        f"single PNG p50 <= {TARGET_P50_MS} ms": latency["serve_png"]["p50_ms"] <= TARGET_P50_MS,
        f"single PNG p99 <= {TARGET_P99_MS} ms": latency["serve_png"]["p99_ms"] <= TARGET_P99_MS,
        "batch-256 throughput >= today's": ratio["batch_serve_png_over_mlflow_png"] >= 1.0,
    }


def latency_table(latency: dict[str, dict]) -> str:
    rows = []
    for mode in MODES:
        figures = latency[mode]
        server, kind = mode.split("_")
        versus = (
            f"{figures['p50_ms'] / latency[f'serve_{kind}']['p50_ms']:.2f}x"
            if server != "serve"
            else "1.00x"
        )
        rows.append(
            [
                mode,
                f"{figures['p50_ms']:.2f}",
                f"{figures['p90_ms']:.2f}",
                f"{figures['p99_ms']:.2f}",
                f"{figures['requests_per_second']:.0f}",
                versus,
                figures["wrong"],
            ]
        )
    header = ["single image", "p50 ms", "p90 ms", "p99 ms", "req/s", "p50 / serve's", "wrong"]
    return markdown_table(header, rows)


def batch_table(batches: dict[str, dict]) -> str:
    base = batches["serve_png"]["images_per_second"]
    rows = [
        [
            mode,
            f"{figures['images_per_second']:.0f}",
            f"{figures['median_seconds'] * 1000:.0f}",
            f"{base / figures['images_per_second']:.2f}x",
            figures["disagreements"],
        ]
        for mode, figures in batches.items()
    ]
    header = [f"batch of {BATCH_SIZE}", "images/s", "median ms", "serve is", "disagreements"]
    return markdown_table(header, rows)


def start_servers(
    stack: contextlib.ExitStack, model_uri: str, version: int, store_uri: str, work: Path
) -> dict[str, ModelServer]:
    """The three servers, started together and waited for."""
    plain = save_plain_keras(model_uri, store_uri, work)
    env = serving_env(store_uri)
    ports = {name: free_port() for name in SERVERS}
    commands = {
        "serve": (serve_command(model_uri, version, ports["serve"], work / "log"), env),
        "mlflow": (
            mlflow_command(model_uri, ports["mlflow"]),
            {**env, RUNTIME_ENV: "keras"},
        ),
        "keras": (mlflow_command(str(plain), ports["keras"]), env),
    }
    servers = {
        name: stack.enter_context(
            model_server(
                f"the {name} server", command, ports[name], server_env, work / f"{name}.log"
            )
        )
        for name, (command, server_env) in commands.items()
    }
    for name, server in servers.items():
        log.info("%s server up after %.1fs", name, server.wait_ready())
    return servers


def run(args: argparse.Namespace) -> dict:
    """Measure what the module's docstring says; return the summary written to JSON."""
    store_uri = store_of(args)
    check_inputs(args.data, store_uri)
    model_uri, version = champion(args, store_uri)
    images, pngs = sample_images(args)
    load_before = os.getloadavg()
    with (
        tempfile.TemporaryDirectory(prefix="benchmarks-server-") as work,
        contextlib.ExitStack() as stack,
    ):
        log.info("starting the servers of %s (version %s)", model_uri, version)
        direct = stack.enter_context(direct_pyfunc(model_uri, store_uri, images, pngs, Path(work)))
        servers = start_servers(stack, model_uri, version, store_uri, Path(work))
        startup = {name: round(time.monotonic() - s.started, 1) for name, s in servers.items()}
        direct.wait_ready()
        clients = {name: Client(server.port) for name, server in servers.items()}
        for client in clients.values():
            stack.callback(client.close)
        log.info("%s requests each way, then %s batch rounds", args.requests, args.batch_rounds)
        latency = measure_latency(clients, direct, images, pngs, args.requests, args.warmup)
        batches = measure_batches(clients, images, pngs, args.batch_rounds)
    ratio = ratios(latency, batches)
    summary = {
        "quick": args.quick,
        "machine": machine(load_before),
        "versions": package_versions(PACKAGES),
        "model_uri": model_uri,
        "version": version,
        "startup_seconds": startup,
        "requests": args.requests,
        "warmup": args.warmup,
        "batch_rounds": args.batch_rounds,
        "client": "sequential, one keep-alive HTTP/1.1 connection per server",
        "servers": {
            "serve": "python -m classifier.serving.server (make serve), fast runtime, log on",
            "mlflow": "mlflow models serve of the same pyfunc on Keras (make serve before)",
            "keras": "mlflow models serve of the Keras model alone (mlflow.keras flavour)",
        },
        "baseline": "direct_*: the same registered pyfunc, mlflow.pyfunc.load_model(...)"
        ".predict(...) in a Python process of its own, timed around predict",
        **latency,
        "batch": batches,
        "ratios": ratio,
        "targets": targets(latency, ratio),
    }
    path = write_results(NAME, summary)
    print("Model servers, one image a request\n\n" + latency_table(latency))
    print(f"\nBatches of {BATCH_SIZE} images\n\n" + batch_table(batches))
    print("\n" + "\n".join(f"{key}: {value}" for key, value in ratio.items()))
    print(
        "\n"
        + "\n".join(
            f"{key}: {'met' if met else 'MISSED'}" for key, met in summary["targets"].items()
        )
    )
    print(f"\nwritten to {path}")
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Inputs are what `make run` leaves (the test split and the registered "
        "champion); without them, run `make run` first. Writes benchmarks/results/server.json.",
    )
    add_model_options(parser)
    parser.add_argument(
        "--batch-rounds",
        type=int,
        help=f"timed batch rounds (full: {BATCH_ROUNDS['full']}, quick: {BATCH_ROUNDS['quick']})",
    )
    args = parser.parse_args(argv)
    settle_options(parser, args)
    if args.batch_rounds is None:
        args.batch_rounds = BATCH_ROUNDS["quick" if args.quick else "full"]
    if args.batch_rounds < 1:
        parser.error("--batch-rounds must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage("benchmarks.server", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
