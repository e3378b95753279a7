"""Serving speed: the MLflow model server and every exported format, each against a baseline.

Two measurements, each side by side with its baseline in the same invocation, repetitions
interleaved and medians taken, so a busy machine slows both sides alike:

1. Server latency. Starts the real `mlflow models serve` of the registered champion on a
   free port of 127.0.0.1 and sends single-image requests one after another over one
   keep-alive connection: a base64 PNG (``dataframe_split``) and a raw pixel array
   (``inputs``). The baseline is the same registered pyfunc, ``mlflow.pyfunc.load_model``
   then ``predict`` on the same image, timed around ``predict`` in a Python process of its
   own (see DIRECT_PYFUNC for why not this one), so the ratio is what HTTP, JSON and the
   server add. Every answer is checked against the direct one. The server and that process
   are stopped (each process group) at the end, on errors and on Ctrl-C too.
2. Batch throughput in images/s of the pipeline's runners (``stages.formats.load_runner``),
   Keras called directly, and variants that each change one lever of one runner (threads,
   ONNX Runtime session options, XNNPACK, LiteRT's per-call shape lookup), at several batch
   sizes over the test images tiled to a few thousand. The baseline is Keras
   ``model.predict(batch, verbose=0)``; the target is an exported format at least
   ``TARGET_RATIO`` times faster. A lever's gain is its variant against the runner it
   varies, timed in the same repetitions.

Prints Markdown tables and writes benchmarks/results/serving.json.

    python -m benchmarks.serving            # full run, about 2 minutes
    python -m benchmarks.serving --quick    # a smoke run, under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from benchmarks import write_results
from stages.cli import run_stage
from stages.errors import DataError, StageError

log = logging.getLogger("benchmarks.serving")

NAME = "serving"
BASELINE = "keras_predict"
TARGET_RATIO = 4.0
# The formats a deployment would ship; the fastest of them is held to TARGET_RATIO.
EXPORTED = ("saved_model", "tflite_float32", "tflite_int8", "onnx")
ALIAS = "champion"
STARTUP_SECONDS = 180
STOP_SECONDS = 30
REQUEST_TIMEOUT_SECONDS = 60
AGREEMENT_BATCH_SIZE = 32
# Full and --quick settings; an option given on the command line overrides either.
FULL = {
    "requests": 200,
    "warmup": 20,
    "batch_sizes": "1,32,256,1024",
    "images": 2048,
    "repeats": 5,
    "seconds": 0.2,
}
QUICK = {
    "requests": 30,
    "warmup": 5,
    "batch_sizes": "1,32,256",
    "images": 512,
    "repeats": 3,
    "seconds": 0.05,
}
PACKAGES = ("tensorflow", "keras", "ai-edge-litert", "onnxruntime", "mlflow", "numpy")
HOW_TO_FIX = "run `make run` first"

Runner = Callable[[np.ndarray], np.ndarray]


class ServerError(StageError):
    """The MLflow model server did not start, or did not answer a request."""


@dataclass(frozen=True)
class Candidate:
    """One way to classify a batch, with the thread settings and the lever it tries."""

    name: str
    predict: Runner
    threads: str
    lever: str
    varies: str = ""  # the runner this one changes one lever of, if any


# ---------------------------------------------------------------------------- inputs


def check_inputs(
    model_path: Path, formats_dir: Path, data_dir: Path, store_uri: str | None
) -> None:
    """Raise :class:`DataError` naming the first pipeline output that is missing."""
    from stages.dataset import IMAGES_FILE
    from stages.formats import FILE_NAMES

    paths = [model_path, data_dir / IMAGES_FILE]
    paths += [formats_dir / FILE_NAMES[fmt] for fmt in EXPORTED]
    if store_uri is not None and store_uri.startswith("sqlite:///"):
        paths.append(Path(store_uri.removeprefix("sqlite:///")))
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: missing; {HOW_TO_FIX}")


def tiled_images(images: np.ndarray, count: int) -> np.ndarray:
    """``count`` images: ``images`` repeated in order, the last copy cut short."""
    return images[np.arange(count) % len(images)]


# ---------------------------------------------------------------------------- runners


def _tflite_variant(
    path: Path, num_threads: int, xnnpack: bool = True, remember_shape: bool = False
) -> Runner:
    """A LiteRT runner like ``stages.formats``'s, with its thread count and delegate chosen;
    ``remember_shape`` keeps the batch shape it last sized the input for instead of asking
    the interpreter for it on every call."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from stages import formats

    resolver = (
        {}
        if xnnpack
        else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    )
    interpreter = Interpreter(model_path=str(path), num_threads=num_threads, **resolver)
    (input_detail,) = interpreter.get_input_details()
    (output_detail,) = interpreter.get_output_details()
    scale, zero_point = output_detail["quantization"]
    sized_for = [tuple(input_detail["shape"])]

    def predict(images: np.ndarray) -> np.ndarray:
        # The same per-call steps as the pipeline's runner, so only the lever differs.
        if remember_shape:
            current = sized_for[0]
        else:
            current = tuple(interpreter.get_input_details()[0]["shape"])
        if current != images.shape:
            interpreter.resize_tensor_input(input_detail["index"], images.shape, strict=True)
            interpreter.allocate_tensors()
            sized_for[0] = images.shape
        interpreter.set_tensor(input_detail["index"], images)
        interpreter.invoke()
        values = interpreter.get_tensor(output_detail["index"])
        if values.dtype == np.float32 or scale == 0:
            return values
        return (values.astype(np.float32) - zero_point) * scale

    interpreter.allocate_tensors()
    # The pipeline's input check, so the variant pays for it as the pipeline's runner does.
    return formats._checked(path.name, tuple(input_detail["shape"][1:]), predict)


def _onnx_variant(path: Path, **options: object) -> tuple[Runner, object]:
    """An ONNX Runtime runner like ``stages.formats``'s with these SessionOptions set."""
    import onnxruntime

    from stages import formats

    session_options = onnxruntime.SessionOptions()
    for name, value in options.items():
        setattr(session_options, name, value)
    session = onnxruntime.InferenceSession(
        str(path), session_options, providers=["CPUExecutionProvider"]
    )
    (model_input,) = session.get_inputs()

    def predict(images: np.ndarray) -> np.ndarray:
        return session.run(None, {model_input.name: images})[0]

    runner = formats._checked("onnx", tuple(model_input.shape[1:]), predict)
    return runner, session.get_session_options()


def _onnx_threads(session_options: object) -> str:
    intra = session_options.intra_op_num_threads
    text = f"ORT intra-op {intra or '0 (default: one per physical core)'}"
    return f"{text}, {str(session_options.execution_mode).rsplit('.', 1)[-1]}"


def load_candidates(model_path: Path, formats_dir: Path) -> list[Candidate]:
    """The baseline, the pipeline's runner of every format, Keras called directly, and one
    variant per lever; the baseline comes first."""
    import keras
    import onnxruntime
    import tensorflow as tf

    from stages import formats
    from stages.model import load_model

    cores = os.cpu_count() or 1
    tf_threads = (
        f"TF intra-op {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}"
    )
    model = load_model(str(model_path))

    def keras_predict(images: np.ndarray) -> np.ndarray:
        return model.predict(images, verbose=0)

    def keras_call(images: np.ndarray) -> np.ndarray:
        return keras.ops.convert_to_numpy(model(images, training=False))

    def pipeline(fmt: str) -> Runner:
        path = model_path if fmt == "keras" else formats_dir / formats.FILE_NAMES[fmt]
        return formats.load_runner(fmt, path)

    onnx_path = formats_dir / formats.FILE_NAMES["onnx"]
    _, onnx_defaults = _onnx_variant(onnx_path)
    level, mode = onnxruntime.GraphOptimizationLevel, onnxruntime.ExecutionMode
    onnx_tuned, tuned_options = _onnx_variant(
        onnx_path,
        graph_optimization_level=level.ORT_ENABLE_ALL,
        intra_op_num_threads=cores,
        inter_op_num_threads=1,
        execution_mode=mode.ORT_SEQUENTIAL,
    )
    onnx_one, one_options = _onnx_variant(onnx_path, intra_op_num_threads=1)
    onnx_parallel, parallel_options = _onnx_variant(
        onnx_path,
        intra_op_num_threads=cores,
        inter_op_num_threads=cores,
        execution_mode=mode.ORT_PARALLEL,
    )
    tflite = {
        fmt: formats_dir / formats.FILE_NAMES[fmt] for fmt in ("tflite_float32", "tflite_int8")
    }
    shipped = "as stages/formats.py loads it"
    return [
        Candidate(BASELINE, keras_predict, tf_threads, "baseline: model.predict(batch, verbose=0)"),
        Candidate(
            "keras", pipeline("keras"), tf_threads, "model.predict, batch_size 256, " + shipped
        ),
        Candidate(
            "keras_call", keras_call, tf_threads, "model(batch, training=False), as the pyfunc"
        ),
        Candidate("saved_model", pipeline("saved_model"), tf_threads, shipped),
        Candidate(
            "tflite_float32", pipeline("tflite_float32"), f"LiteRT {cores}, XNNPACK", shipped
        ),
        Candidate("tflite_int8", pipeline("tflite_int8"), f"LiteRT {cores}, XNNPACK", shipped),
        Candidate("onnx", pipeline("onnx"), _onnx_threads(onnx_defaults), shipped),
        Candidate(
            "onnx_tuned",
            onnx_tuned,
            _onnx_threads(tuned_options),
            f"ORT_ENABLE_ALL, intra-op {cores}, inter-op 1, ORT_SEQUENTIAL set explicitly",
            "onnx",
        ),
        Candidate(
            "onnx_1_thread", onnx_one, _onnx_threads(one_options), "intra-op threads 1", "onnx"
        ),
        Candidate(
            "onnx_parallel",
            onnx_parallel,
            _onnx_threads(parallel_options),
            f"ORT_PARALLEL, intra-op and inter-op {cores}",
            "onnx",
        ),
        Candidate(
            "tflite_float32_1_thread",
            _tflite_variant(tflite["tflite_float32"], 1),
            "LiteRT 1, XNNPACK",
            "num_threads 1",
            "tflite_float32",
        ),
        Candidate(
            "tflite_int8_1_thread",
            _tflite_variant(tflite["tflite_int8"], 1),
            "LiteRT 1, XNNPACK",
            "num_threads 1",
            "tflite_int8",
        ),
        Candidate(
            "tflite_int8_no_xnnpack",
            _tflite_variant(tflite["tflite_int8"], cores, xnnpack=False),
            f"LiteRT {cores}, no XNNPACK",
            "XNNPACK off (BUILTIN_WITHOUT_DEFAULT_DELEGATES)",
            "tflite_int8",
        ),
        Candidate(
            "tflite_int8_remember_shape",
            _tflite_variant(tflite["tflite_int8"], cores, remember_shape=True),
            f"LiteRT {cores}, XNNPACK",
            "no get_input_details() per call: the runner remembers the shape it sized for",
            "tflite_int8",
        ),
    ]


# ---------------------------------------------------------------------------- throughput


def check_agreement(candidates: Sequence[Candidate], images: np.ndarray) -> dict[str, dict]:
    """Each candidate's answers on ``images`` against the baseline's: a fast runner that
    gives other answers is no win."""
    outputs = {}
    for candidate in candidates:
        outputs[candidate.name] = np.concatenate(
            [
                candidate.predict(images[start : start + AGREEMENT_BATCH_SIZE])
                for start in range(0, len(images), AGREEMENT_BATCH_SIZE)
            ]
        )
    reference = outputs[BASELINE]
    return {
        name: {
            "argmax_agreement": round(float(np.mean(out.argmax(1) == reference.argmax(1))), 4),
            "max_abs_diff": float(np.max(np.abs(out - reference))),
        }
        for name, out in outputs.items()
    }


def _images_per_second(predict: Runner, batches: Iterator[np.ndarray], seconds: float) -> float:
    """Run whole batches until ``seconds`` have passed; images classified per second."""
    count = 0
    start = time.perf_counter()
    while True:
        batch = next(batches)
        predict(batch)
        count += len(batch)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


def measure_throughput(
    candidates: Sequence[Candidate],
    pool: np.ndarray,
    batch_sizes: Sequence[int],
    repeats: int,
    seconds: float,
) -> dict[str, dict[str, dict]]:
    """Images/s of each candidate at each batch size, and its ratio to the baseline.

    Within a repetition every candidate runs once, in an order rotated each repetition;
    its ratio is taken against the baseline of the same repetition, and the median over
    repetitions reported, so load that comes and goes moves both sides of a ratio.
    """
    from tqdm import tqdm

    results: dict[str, dict[str, dict]] = {}
    progress = tqdm(
        total=len(batch_sizes) * repeats * len(candidates),
        desc="throughput",
        unit="timing",
        disable=not sys.stderr.isatty(),
    )
    with progress:
        for batch_size in batch_sizes:
            starts = range(0, len(pool) - batch_size + 1, batch_size)
            batches = {
                c.name: itertools.cycle([pool[s : s + batch_size] for s in starts])
                for c in candidates
            }
            for candidate in candidates:
                for _ in range(2):  # builds graphs, sizes tensors for this batch size
                    candidate.predict(next(batches[candidate.name]))
            rates: dict[str, list[float]] = {c.name: [] for c in candidates}
            for repeat in range(repeats):
                shift = repeat % len(candidates)
                for candidate in [*candidates[shift:], *candidates[:shift]]:
                    rate = _images_per_second(candidate.predict, batches[candidate.name], seconds)
                    rates[candidate.name].append(rate)
                    progress.update()
            results[str(batch_size)] = {
                c.name: _figures(rates[c.name], rates[BASELINE], rates.get(c.varies))
                for c in candidates
            }
    return results


def _figures(
    rates: list[float], baseline: list[float], varied: list[float] | None
) -> dict[str, object]:
    """Median images/s; median, min and max of the per-repetition ratios to the baseline,
    and (for a lever) the median ratio to the runner it varies: its gain."""
    ratios = np.array(rates) / np.array(baseline)
    figures: dict[str, object] = {
        "images_per_second": round(float(np.median(rates)), 1),
        "ratio": round(float(np.median(ratios)), 2),
        "ratio_range": [round(float(ratios.min()), 2), round(float(ratios.max()), 2)],
    }
    if varied is not None:
        figures["gain"] = round(float(np.median(np.array(rates) / np.array(varied))), 2)
    return figures


def fastest(results: dict[str, dict[str, dict]], names: Sequence[str]) -> dict[str, dict]:
    """Per batch size, the candidate among ``names`` with the highest ratio, and that ratio."""
    best = {}
    for batch_size, by_name in results.items():
        name = max(names, key=lambda n: by_name[n]["ratio"])
        best[batch_size] = {"runner": name, "ratio": by_name[name]["ratio"]}
    return best


# ---------------------------------------------------------------------------- server


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_tail(log_path: Path) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group ``process`` leads, wait, then SIGKILL whatever is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("%s ignored SIGTERM for %ss; killing it", process.args[0], STOP_SECONDS)
    # uvicorn workers may outlive the `mlflow` process that started them.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def serving_env(store_uri: str) -> dict[str, str]:
    """The environment `make serve` gives MLflow: the project's bin first on PATH (MLflow
    starts uvicorn from PATH) and the store to resolve ``models:/`` URIs in."""
    bin_dir = Path(sys.executable).parent
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": store_uri}


@dataclass(frozen=True)
class ModelServer:
    """A started `mlflow models serve`: its process, port and log."""

    process: subprocess.Popen
    port: int
    log_path: Path
    started: float

    def wait_ready(self) -> float:
        """Block until it answers /ping; the seconds since it was started, or ServerError."""
        deadline = self.started + STARTUP_SECONDS
        ping_url = f"http://127.0.0.1:{self.port}/ping"
        while True:
            if self.process.poll() is not None:
                raise ServerError(
                    f"the model server exited with code {self.process.returncode}: "
                    f"{_log_tail(self.log_path)}"
                )
            with contextlib.suppress(OSError), urllib.request.urlopen(ping_url, timeout=5) as ping:
                if ping.status == 200:
                    return time.monotonic() - self.started
            if time.monotonic() > deadline:
                raise ServerError(
                    f"the model server did not answer /ping within {STARTUP_SECONDS}s: "
                    f"{_log_tail(self.log_path)}"
                )
            time.sleep(0.25)


@contextlib.contextmanager
def model_server(model_uri: str, store_uri: str, log_path: Path) -> Iterator[ModelServer]:
    """Start `mlflow models serve` of ``model_uri`` on a free port, as `make serve` does
    (call ``wait_ready`` before use); stop it on the way out."""
    port = free_port()
    command = [
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
    started = time.monotonic()
    with log_path.open("wb") as server_log:
        # Its own session: Ctrl-C reaches only us, and we stop the whole group below.
        process = subprocess.Popen(
            command,
            env=serving_env(store_uri),
            stdout=server_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield ModelServer(process, port, log_path, started)
    finally:
        _stop(process)


# The baseline runs in a Python of its own, started like the server (not in this process):
# here `stages` is already imported from the working tree, and MLflow would then run that
# code instead of the copy logged with the registered model, which the server runs.
DIRECT_PYFUNC = """
import json, os, sys, time
import numpy as np, pandas as pd
replies = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # whatever else is printed goes to the log
import mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
images = np.load(sys.argv[2])
pngs = json.loads(open(sys.argv[3]).read())
replies.write("ready\\n")
for line in sys.stdin:
    kind, index = line.split()
    index = int(index)
    if kind == "png":
        model_input = pd.DataFrame({"image": [pngs[index]]})
    else:
        model_input = images[index : index + 1]
    start = time.perf_counter()
    predictions = model.predict(model_input)
    seconds = time.perf_counter() - start
    replies.write(f"{seconds} {int(predictions['class_index'].iloc[0])}\\n")
"""


class DirectPyfunc:
    """The registered pyfunc loaded with ``mlflow.pyfunc.load_model`` in a Python process
    of its own, timing ``predict`` on one image as this process asks."""

    def __init__(self, process: subprocess.Popen, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def wait_ready(self, timeout: float = STARTUP_SECONDS) -> None:
        """Block until the model is loaded, or raise ServerError."""
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        line = self.process.stdout.readline() if ready else ""
        if line.strip() != "ready":
            raise ServerError(f"the direct pyfunc did not load: {_log_tail(self.log_path)}")

    def predict(self, kind: str, index: int) -> tuple[float, int]:
        """Seconds ``predict`` took on image ``index`` sent as ``kind`` (png or array),
        and the class it gave."""
        self.process.stdin.write(f"{kind} {index}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise ServerError(f"the direct pyfunc exited: {_log_tail(self.log_path)}")
        seconds, class_index = line.split()
        return float(seconds), int(class_index)


@contextlib.contextmanager
def direct_pyfunc(
    model_uri: str, store_uri: str, images: np.ndarray, pngs: list[str], work: Path
) -> Iterator[DirectPyfunc]:
    """Start loading the pyfunc in its own process (call ``wait_ready`` before use); stop it
    on the way out."""
    np.save(work / "images.npy", images, allow_pickle=False)
    (work / "pngs.json").write_text(json.dumps(pngs))
    log_path = work / "direct.log"
    command = [sys.executable, "-c", DIRECT_PYFUNC, model_uri, "images.npy", "pngs.json"]
    with log_path.open("wb") as direct_log:
        # cwd ``work``, so that it cannot import the working tree's `stages` either.
        process = subprocess.Popen(
            command,
            cwd=work,
            env=serving_env(store_uri),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=direct_log,
            text=True,
            start_new_session=True,
        )
    try:
        yield DirectPyfunc(process, log_path)
    finally:
        with contextlib.suppress(OSError):  # it may have died already
            process.stdin.close()
        _stop(process)


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


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99 and mean in ms, and requests/s of a client that waits for each answer."""
    milliseconds = np.array(seconds) * 1000
    p50, p90, p99 = np.percentile(milliseconds, [50, 90, 99])
    return {
        "p50_ms": round(float(p50), 2),
        "p90_ms": round(float(p90), 2),
        "p99_ms": round(float(p99), 2),
        "mean_ms": round(float(milliseconds.mean()), 2),
        "requests_per_second": round(len(seconds) / float(np.sum(seconds)), 1),
    }


MODES = ("http_png", "direct_png", "http_array", "direct_array")


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
    baseline see the same load. Request bodies are built before the clock starts: the
    figures are the server's and the model's, not the client's. Every answer must name the
    class the direct PNG call names.
    """
    from tqdm import tqdm

    bodies = {
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
        server, local = summary[f"http_{kind}"], summary[f"direct_{kind}"]
        summary[f"overhead_{kind}"] = {
            "p50_ratio": round(server["p50_ms"] / local["p50_ms"], 2),
            "p99_ratio": round(server["p99_ms"] / local["p99_ms"], 2),
            "p50_added_ms": round(server["p50_ms"] - local["p50_ms"], 2),
        }
    return summary


def serve_and_measure(
    args: argparse.Namespace,
    store_uri: str,
    images: np.ndarray,
    while_starting: Callable[[], object] = lambda: None,
) -> dict:
    """Start the server and the direct pyfunc side by side, measure both, stop both.

    ``while_starting`` runs while they load the model (a busy half-minute), before any
    clock starts.
    """
    from stages import tracking
    from stages.config import load_params
    from stages.serving import png_frame

    model_name = args.model_name or load_params(args.params).export.model_name
    model_uri = f"models:/{model_name}@{ALIAS}"
    os.environ["MLFLOW_TRACKING_URI"] = store_uri
    version = tracking.aliased_version(model_name, ALIAS)
    if version is None:
        raise DataError(f"{store_uri}: no model version {model_uri}; {HOW_TO_FIX}")
    images = images[: min(len(images), args.requests)]
    pngs = png_frame(images)["image"].tolist()
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        log.info("starting `mlflow models serve` of %s (version %s)", model_uri, version.version)
        direct = stack.enter_context(direct_pyfunc(model_uri, store_uri, images, pngs, Path(work)))
        server = stack.enter_context(model_server(model_uri, store_uri, Path(work) / "log"))
        while_starting()
        startup = server.wait_ready()
        direct.wait_ready()
        client = Client(server.port)
        stack.callback(client.close)
        log.info("server up after %.1fs; %s requests each way", startup, args.requests)
        latency = measure_latency(client, direct, images, pngs, args.requests, args.warmup)
    return {
        "model_uri": model_uri,
        "version": int(version.version),
        "startup_seconds": round(startup, 1),
        "requests": args.requests,
        "warmup": args.warmup,
        "client": "sequential, one keep-alive HTTP/1.1 connection, one image a request",
        "baseline": "direct_*: the same registered pyfunc, mlflow.pyfunc.load_model(...)"
        ".predict(...) in a Python process of its own, timed around predict",
        **latency,
    }


# ---------------------------------------------------------------------------- report


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; columns of figures right-aligned, the others left."""
    cells = [[str(cell) for cell in row] for row in rows]
    figures = [all(row[column][:1].isdigit() for row in cells) for column in range(len(header))]
    rule = "|" + "|".join("---:" if figure else "---" for figure in figures) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


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


def throughput_table(throughput: dict, candidates: Sequence[Candidate], agreement: dict) -> str:
    batch_sizes = list(throughput)
    rows = []
    for candidate in candidates:
        cells = []
        for batch_size in batch_sizes:
            figures = throughput[batch_size][candidate.name]
            cells.append(f"{figures['images_per_second']:,.0f} ({figures['ratio']:.2f}x)")
        rows.append(
            [
                candidate.name,
                *cells,
                f"{agreement[candidate.name]['argmax_agreement']:.3f}",
                candidate.threads,
                candidate.lever,
            ]
        )
    header = [
        "runner",
        *[f"batch {size}: img/s (x {BASELINE})" for size in batch_sizes],
        "agrees",
        "threads",
        "what it is / the lever",
    ]
    return markdown_table(header, rows)


def thread_settings() -> dict[str, int]:
    """The thread counts the pipeline's runners use; 0 means the library's default."""
    import tensorflow as tf

    return {
        "tensorflow_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "tensorflow_inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        "tflite_num_threads": os.cpu_count() or 1,  # what stages/formats.py passes
        "onnxruntime_intra_op": 0,  # stages/formats.py leaves SessionOptions at defaults
    }


def lever_table(throughput: dict, candidates: Sequence[Candidate]) -> str:
    batch_sizes = list(throughput)
    rows = [
        [
            c.name,
            c.varies,
            *[f"{throughput[size][c.name]['gain']:.2f}x" for size in batch_sizes],
            c.lever,
        ]
        for c in candidates
        if c.varies
    ]
    header = ["variant", "varies", *[f"gain, batch {size}" for size in batch_sizes], "lever"]
    return markdown_table(header, rows)


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    """Measure what the module's docstring says; return the summary written to JSON."""
    from stages import tracking
    from stages.dataset import read_image_set

    formats_dir = args.formats_dir or args.model_dir / "formats"
    model_path = args.model_dir / "model.keras"
    store_uri = None if args.no_server else (args.tracking_uri or tracking.tracking_uri())
    check_inputs(model_path, formats_dir, args.data, store_uri)
    images = read_image_set(args.data).images
    load_before = os.getloadavg()
    summary: dict = {
        "quick": args.quick,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
        },
        "versions": versions(),
    }
    tables = []

    candidates: list[Candidate] = []

    def load_runners() -> None:
        log.info("loading every runner")
        candidates.extend(load_candidates(model_path, formats_dir))

    if args.no_server:
        load_runners()
    else:
        latency = serve_and_measure(args, store_uri, images, while_starting=load_runners)
        summary["server"] = latency
        tables.append(
            "Server latency, one image a request (baseline: the same pyfunc called directly)"
            "\n\n" + latency_table(latency)
        )

    summary["machine"]["threads"] = thread_settings()
    agreement = check_agreement(candidates, images)
    pool = tiled_images(images, max(args.images, 2 * max(args.batch_sizes)))
    log.info("timing %s runners on %s images", len(candidates), len(pool))
    throughput = measure_throughput(candidates, pool, args.batch_sizes, args.repeats, args.seconds)
    fastest_format = fastest(throughput, EXPORTED)
    summary["throughput"] = {
        "baseline": f"{BASELINE}: model.predict(batch, verbose=0)",
        "images": len(pool),
        "repeats": args.repeats,
        "seconds_per_timing": args.seconds,
        "target_ratio": TARGET_RATIO,
        "fastest_exported_format": fastest_format,
        "target_met": {
            size: best["ratio"] >= TARGET_RATIO for size, best in fastest_format.items()
        },
        "fastest_of_all": fastest(throughput, [c.name for c in candidates if c.name != BASELINE]),
        "runners": {
            c.name: {
                "threads": c.threads,
                "lever": c.lever,
                "varies": c.varies,
                **agreement[c.name],
            }
            for c in candidates
        },
        "batch_sizes": throughput,
    }
    summary["machine"]["load_average_after"] = os.getloadavg()
    tables.append(
        f"Batch throughput, median of {args.repeats} interleaved repetitions "
        f"(ratio: x {BASELINE} at the same batch size)\n\n"
        + throughput_table(throughput, candidates, agreement)
    )
    tables.append(
        "Levers: each variant against the runner it varies, same repetitions (gain > 1: faster)"
        "\n\n" + lever_table(throughput, candidates)
    )
    best = ", ".join(
        f"batch {size}: {b['runner']} {b['ratio']:.2f}x" for size, b in fastest_format.items()
    )
    tables.append(f"Fastest exported format (target {TARGET_RATIO:g}x): {best}")

    path = write_results(NAME, summary)
    print("\n\n".join(tables))
    print(f"\nwritten to {path}")
    return summary


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,32,256, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__.split("\n\n")[0],
        epilog="Inputs are what `make run` leaves; without them, run `make run` first.",
    )
    parser.add_argument(
        "--model-dir", type=Path, default=Path("models"), help="holds model.keras (default: models)"
    )
    parser.add_argument(
        "--formats-dir", type=Path, help="exported formats (default: MODEL_DIR/formats)"
    )
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
        "--quick",
        action="store_true",
        help="fewer requests, repetitions and batch sizes: a smoke run",
    )
    parser.add_argument("--no-server", action="store_true", help="skip the server latency part")
    for option, kind, text in (
        ("--requests", int, "timed requests for each way of calling the model"),
        ("--warmup", int, "untimed requests first"),
        ("--batch-sizes", _positive_ints, "comma-separated batch sizes"),
        ("--images", int, "test images tiled to this many for throughput"),
        ("--repeats", int, "interleaved repetitions; medians reported"),
        ("--seconds", float, "length of one timing of one runner"),
    ):
        name = option.removeprefix("--").replace("-", "_")
        parser.add_argument(
            option, type=kind, help=f"{text} (full: {FULL[name]}, quick: {QUICK[name]})"
        )
    args = parser.parse_args(argv)
    for name, default in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, _positive_ints(default) if name == "batch_sizes" else default)
    for name in ("requests", "images", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.seconds <= 0:
        parser.error("--warmup must be >= 0 and --seconds > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage("benchmarks.serving", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
