"""Model server latency: `mlflow models serve` over HTTP on 127.0.0.1, against the pyfunc itself.

Starts the real `mlflow models serve` of the registered champion (``models:/NAME@champion``,
as `make serve` does) on a free port of 127.0.0.1 and sends single-image requests one
after another over one keep-alive connection: a base64 PNG (``dataframe_split``) and a raw
pixel array (``inputs``). The baseline is the same registered pyfunc,
``mlflow.pyfunc.load_model`` then ``predict`` on the same image, timed around ``predict``
in a Python process of its own (benchmarks/pyfunc.py's worker), so each ratio is what
HTTP, JSON and the server add. The four ways take turns on the same image, in an order
rotated every round, so load that comes and goes slows them alike; request bodies are
built before the clock starts. Every answer must name the class the direct PNG call
names. The server and the worker are started and stopped, each with its whole process
group, by classifier.processes: at the end, on errors and on Ctrl-C too.

Prints a Markdown table and writes benchmarks/results/server.json.

    python -m benchmarks.server            # 200 rounds after 20 warm-up ones
    python -m benchmarks.server --quick    # 30 rounds after 5: a smoke run
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

log = logging.getLogger("benchmarks.server")

NAME = "server"
REQUEST_TIMEOUT_SECONDS = 60
MODES = ("http_png", "direct_png", "http_array", "direct_array")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_command(model_uri: str, port: int) -> list[str]:
    """`make serve`'s command for ``model_uri`` on ``port`` of 127.0.0.1."""
    return [
        str(Path(sys.executable).parent / "mlflow"),
        "models",
        "serve",
        "--model-uri",
        model_uri,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@dataclass(frozen=True)
class ModelServer:
    """A started `mlflow models serve`: its process group and port."""

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
def model_server(model_uri: str, store_uri: str, log_path: Path) -> Iterator[ModelServer]:
    """Start `mlflow models serve` of ``model_uri`` on a free port, as `make serve` does
    (call ``wait_ready`` before use); stop its whole process group on the way out."""
    port = free_port()
    started = time.monotonic()
    group = ProcessGroup.start(
        "the model server",
        server_command(model_uri, port),
        env=serving_env(store_uri),
        log_path=log_path,
    )
    try:
        yield ModelServer(group, port, started)
    finally:
        group.stop()


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


def request_bodies(images: np.ndarray, pngs: Sequence[str]) -> dict[str, list[bytes]]:
    """Each image as the JSON body of each HTTP mode, built before any clock starts."""
    return {
        "http_png": [
            # What png_frame(image).to_dict(orient="split") gives, built once for every image.
            json.dumps(
                {"dataframe_split": {"index": [0], "columns": ["image"], "data": [[png]]}}
            ).encode()
            for png in pngs
        ],
        "http_array": [
            json.dumps({"inputs": image[np.newaxis].tolist()}).encode() for image in images
        ],
    }


def measure_latency(
    client: Client,
    direct: DirectPyfunc,
    images: np.ndarray,
    pngs: Sequence[str],
    requests: int,
    warmup: int,
) -> dict[str, dict]:
    """Single-image latency of the server (PNG and array) and of the pyfunc called directly.

    The four ways take turns, each on the same image in a round, so the server and its
    baseline see the same load. Every answer must name the class the direct PNG call names.
    """
    from tqdm import tqdm

    bodies = request_bodies(images, pngs)

    def call(mode: str, index: int) -> tuple[float, int]:
        transport, kind = mode.split("_")
        if transport == "direct":
            return direct.predict(kind, index)
        start = time.perf_counter()
        answer = client.post(bodies[mode][index])
        seconds = time.perf_counter() - start
        return seconds, int(answer["predictions"][0]["class_index"])

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
        summary[f"overhead_{kind}"] = overhead(summary[f"http_{kind}"], summary[f"direct_{kind}"])
    return summary


def latency_table(latency: dict[str, dict]) -> str:
    rows = []
    for mode in MODES:
        figures = latency[mode]
        kind = mode.rsplit("_", 1)[1]
        versus = (
            f"{latency[f'overhead_{kind}']['p50_ratio']:.2f}x"
            if mode.startswith("http")
            else "1.00x (baseline)"
        )
        rows.append(
            [
                mode,
                f"{figures['p50_ms']:.1f}",
                f"{figures['p90_ms']:.1f}",
                f"{figures['p99_ms']:.1f}",
                f"{figures['requests_per_second']:.0f}",
                versus,
                figures["wrong"],
            ]
        )
    header = ["single image", "p50 ms", "p90 ms", "p99 ms", "req/s", "p50 vs direct", "wrong"]
    return markdown_table(header, rows)


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
        log.info("starting `mlflow models serve` of %s (version %s)", model_uri, version)
        direct = stack.enter_context(direct_pyfunc(model_uri, store_uri, images, pngs, Path(work)))
        server = stack.enter_context(model_server(model_uri, store_uri, Path(work) / "server.log"))
        startup = server.wait_ready()
        direct.wait_ready()
        client = Client(server.port)
        stack.callback(client.close)
        log.info("server up after %.1fs; %s requests each way", startup, args.requests)
        latency = measure_latency(client, direct, images, pngs, args.requests, args.warmup)
    summary = {
        "quick": args.quick,
        "machine": machine(load_before),
        "versions": package_versions(PACKAGES),
        "model_uri": model_uri,
        "version": version,
        "startup_seconds": round(startup, 1),
        "requests": args.requests,
        "warmup": args.warmup,
        "client": "sequential, one keep-alive HTTP/1.1 connection, one image a request",
        "baseline": "direct_*: the same registered pyfunc, mlflow.pyfunc.load_model(...)"
        ".predict(...) in a Python process of its own, timed around predict",
        **latency,
    }
    path = write_results(NAME, summary)
    print(
        "Server latency, one image a request (baseline: the same pyfunc called directly)"
        "\n\n" + latency_table(latency)
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
    args = parser.parse_args(argv)
    settle_options(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage("benchmarks.server", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
