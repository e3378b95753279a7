"""The model server under load: does it stay responsive, and does it lose a request?

Starts `make serve`'s server (classifier/serving/server.py) of the registered champion on a
free port of 127.0.0.1, in a process group of its own, and times ``/ping`` twice, side by
side on the same server: first idle (the baseline), then while ``--clients`` threads each
send ``--rounds`` requests of ``--images`` large PNG photos (``--size`` pixels square, what
a phone sends), so that the server is always decoding and scoring. ``/ping`` answers on the
event loop while requests are scored on a worker thread, so its latency under load should
stay near the idle one; before that change, one such request kept ``/ping`` waiting for
seconds. Every request must come back 200 with one prediction per image: none lost.

Prints a Markdown table and writes benchmarks/results/server_load.json.

    python -m benchmarks.server_load            # 4 clients x 5 requests of 20 photos of 1500 px
    python -m benchmarks.server_load --quick    # 2 clients x 2 requests of 4 photos: a smoke run
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks import markdown_table, write_results
from benchmarks.pyfunc import champion, check_inputs, serving_env, store_of
from benchmarks.server import free_port, model_server, serve_command
from classifier.cli import run_stage
from classifier.errors import StageError

log = logging.getLogger("benchmarks.server_load")

NAME = "server_load"
FULL = {"clients": 4, "rounds": 5, "images": 20, "size": 1500, "pings": 200}
QUICK = {"clients": 2, "rounds": 2, "images": 4, "size": 600, "pings": 20}
PING_INTERVAL = 0.02  # seconds between pings: a health checker, eager


def photo_png(size: int, seed: int) -> str:
    """A ``size`` x ``size`` RGB PNG of smooth gradients (small to send, as many pixels to
    decode as a photo), base64; ``seed`` shifts the colours so no two are the same."""
    import base64

    from PIL import Image

    ramp = np.linspace(0, 255, size)
    across, down = np.meshgrid(ramp, ramp)
    pixels = np.stack([across, down, (across + down + 17 * seed) % 256], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def ping_latencies(port: int, count: int, stop: threading.Event | None = None) -> list[float]:
    """Milliseconds of ``count`` sequential /ping requests; fewer once ``stop`` is set, but
    at least one."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    latencies = []
    try:
        while len(latencies) < count and not (latencies and stop is not None and stop.is_set()):
            started = time.perf_counter()
            connection.request("GET", "/ping")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise StageError(f"/ping answered {response.status}")
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(PING_INTERVAL)
    finally:
        connection.close()
    return latencies


def client(port: int, body: bytes, rounds: int, images: int, outcomes: list[str]) -> None:
    """Send ``rounds`` requests of ``body``; record each outcome: ok, or what went wrong."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        for _ in range(rounds):
            try:
                connection.request(
                    "POST", "/invocations", body, {"Content-Type": "application/json"}
                )
                response = connection.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException) as error:
                outcomes.append(f"lost: {error}")
                connection.close()
                continue
            predictions = json.loads(answer).get("predictions", []) if answer else []
            ok = response.status == 200 and len(predictions) == images
            outcomes.append("ok" if ok else f"{response.status}: {answer[:200]!r}")
    finally:
        connection.close()


def summarise(latencies: Sequence[float]) -> dict[str, float]:
    values = np.asarray(latencies)
    return {
        "pings": len(values),
        "p50_ms": round(float(np.percentile(values, 50)), 2),
        "p99_ms": round(float(np.percentile(values, 99)), 2),
        "max_ms": round(float(values.max()), 2),
    }


def run(args: argparse.Namespace) -> dict:
    """Measure what the module's docstring says; return the summary written to JSON."""
    store_uri = store_of(args)
    check_inputs(args.data, store_uri)
    model_uri, version = champion(args, store_uri)
    pngs = [photo_png(args.size, seed) for seed in range(args.images)]
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[p] for p in pngs]}})
    with tempfile.TemporaryDirectory(prefix="benchmarks-server-load-") as work:
        port = free_port()
        command = serve_command(model_uri, version, port, Path(work) / "log")
        with model_server(
            "the serve server", command, port, serving_env(store_uri), Path(work) / "serve.log"
        ) as server:
            log.info("server up after %.1fs", server.wait_ready())
            idle = ping_latencies(port, args.pings)
            outcomes: list[str] = []
            clients = [
                threading.Thread(
                    target=client, args=(port, body.encode(), args.rounds, args.images, outcomes)
                )
                for _ in range(args.clients)
            ]
            started = time.perf_counter()
            for thread in clients:
                thread.start()
            stop = threading.Event()
            loaded: list[float] = []
            pinger = threading.Thread(
                target=lambda: loaded.extend(ping_latencies(port, 10**9, stop))
            )
            pinger.start()
            for thread in clients:
                thread.join()
            seconds = time.perf_counter() - started
            stop.set()
            pinger.join()
    figures = {"idle": summarise(idle), "under load": summarise(loaded)}
    lost = [outcome for outcome in outcomes if outcome != "ok"]
    summary = {
        "quick": args.quick,
        "model_uri": model_uri,
        "version": version,
        "load": {
            "clients": args.clients,
            "requests": args.clients * args.rounds,
            "images_per_request": args.images,
            "image_pixels": args.size * args.size,
            "request_bytes": len(body),
            "seconds": round(seconds, 1),
        },
        "ping": figures,
        "p99_ratio_load_over_idle": round(
            figures["under load"]["p99_ms"] / figures["idle"]["p99_ms"], 2
        ),
        "requests_ok": len(outcomes) - len(lost),
        "requests_not_ok": lost,
    }
    path = write_results(NAME, summary)
    rows = [[name, *values.values()] for name, values in figures.items()]
    print(markdown_table(["/ping", "pings", "p50 ms", "p99 ms", "max ms"], rows))
    print(
        f"\n{summary['requests_ok']} of {len(outcomes)} requests answered in full "
        f"({args.clients} clients x {args.rounds} requests of {args.images} photos of "
        f"{args.size}x{args.size}, {seconds:.1f} s); p99 under load / idle: "
        f"{summary['p99_ratio_load_over_idle']}"
    )
    print(f"\nwritten to {path}")
    if lost:
        raise StageError(f"{len(lost)} requests were not answered in full: {lost[:3]}")
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from benchmarks.pyfunc import add_model_options

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.server_load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Inputs are what `make run` leaves (the registered champion).",
    )
    add_model_options(parser)
    for name in ("clients", "rounds", "images", "size", "pings"):
        parser.add_argument(
            f"--{name}", type=int, help=f"(full: {FULL[name]}, quick: {QUICK[name]})"
        )
    args = parser.parse_args(argv)
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage("benchmarks.server_load", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
