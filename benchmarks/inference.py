"""Batch inference throughput: every exported format's runner against Keras `model.predict`.

Times images/s of the pipeline's runners (``classifier.export.formats.load_runner`` with
its defaults), Keras called directly, and variants that each change one lever of one
runner through load_runner's keyword arguments (LiteRT threads, XNNPACK and per-call
shape lookup; ONNX Runtime session options), at several batch sizes over the test images
tiled to a few thousand. The baseline is Keras ``model.predict(batch, verbose=0)``; the
target is an exported format at least ``TARGET_RATIO`` times faster at some batch size.
Within a repetition every runner runs once, in an order rotated each repetition, and
each ratio is taken against the baseline of the same repetition; medians over
repetitions are reported, so load that comes and goes moves both sides of a ratio. A
lever's gain is its variant against the runner it varies, timed in the same
repetitions. Every runner's answers are checked against the baseline's first: a fast
runner that gives other answers is no win.

Prints Markdown tables and writes benchmarks/results/inference.json.

    python -m benchmarks.inference            # full run, about a minute and a half
    python -m benchmarks.inference --quick    # a smoke run, under half a minute
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import markdown_table, package_versions, write_results
from classifier.cli import run_stage
from classifier.errors import DataError

log = logging.getLogger("benchmarks.inference")

NAME = "inference"
BASELINE = "keras_predict"
TARGET_RATIO = 4.0
# The formats a deployment would ship; the fastest of them is held to TARGET_RATIO.
EXPORTED = ("saved_model", "tflite_float32", "tflite_int8", "onnx")
AGREEMENT_BATCH_SIZE = 32
# Full and --quick settings; an option given on the command line overrides either.
FULL = {"batch_sizes": "1,32,256,1024", "images": 2048, "repeats": 5, "seconds": 0.2}
QUICK = {"batch_sizes": "1,32,256", "images": 512, "repeats": 3, "seconds": 0.05}
PACKAGES = ("tensorflow", "keras", "ai-edge-litert", "onnxruntime", "numpy")
HOW_TO_FIX = "run `make run` first"

Runner = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Candidate:
    """One way to classify a batch, with the thread settings and the lever it tries."""

    name: str
    predict: Runner
    threads: str
    lever: str
    varies: str = ""  # the runner this one changes one lever of, if any


# ---------------------------------------------------------------------------- inputs


def check_inputs(model_path: Path, formats_dir: Path, data_dir: Path) -> None:
    """Raise :class:`DataError` naming the first pipeline output that is missing."""
    from classifier.data.dataset import IMAGES_FILE
    from classifier.export.formats import FILE_NAMES

    paths = [model_path, data_dir / IMAGES_FILE]
    paths += [formats_dir / FILE_NAMES[fmt] for fmt in EXPORTED]
    for path in paths:
        if not path.exists():
            raise DataError(f"{path}: missing; {HOW_TO_FIX}")


def tiled_images(images: np.ndarray, count: int) -> np.ndarray:
    """``count`` images: ``images`` repeated in order, the last copy cut short."""
    return images[np.arange(count) % len(images)]


# ---------------------------------------------------------------------------- runners


def onnx_options(**options: object) -> object:
    """An ``onnxruntime.SessionOptions`` with ``options`` set; none: ORT's defaults."""
    import onnxruntime

    session_options = onnxruntime.SessionOptions()
    for name, value in options.items():
        setattr(session_options, name, value)
    return session_options


def onnx_threads(session_options: object) -> str:
    """The thread settings of ``session_options``, for the tables."""
    intra = session_options.intra_op_num_threads
    text = f"ORT intra-op {intra or '0 (default: one per physical core)'}"
    return f"{text}, {str(session_options.execution_mode).rsplit('.', 1)[-1]}"


def load_candidates(model_path: Path, formats_dir: Path) -> list[Candidate]:
    """The baseline, the pipeline's runner of every format, Keras called directly, and one
    variant per lever; the baseline comes first."""
    import keras
    import onnxruntime
    import tensorflow as tf

    from classifier.export.formats import FILE_NAMES, load_runner
    from classifier.model.files import load_model

    cores = os.cpu_count() or 1
    tf_threads = (
        f"TF intra-op {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}"
    )
    model = load_model(str(model_path))

    def keras_predict(images: np.ndarray) -> np.ndarray:
        return model.predict(images, verbose=0)

    def keras_call(images: np.ndarray) -> np.ndarray:
        return keras.ops.convert_to_numpy(model(images, training=False))

    def runner(fmt: str, **knobs: object) -> Runner:
        path = model_path if fmt == "keras" else formats_dir / FILE_NAMES[fmt]
        return load_runner(fmt, path, **knobs)

    level, mode = onnxruntime.GraphOptimizationLevel, onnxruntime.ExecutionMode
    onnx_default = onnx_options()
    onnx_tuned = onnx_options(
        graph_optimization_level=level.ORT_ENABLE_ALL,
        intra_op_num_threads=cores,
        inter_op_num_threads=1,
        execution_mode=mode.ORT_SEQUENTIAL,
    )
    onnx_one = onnx_options(intra_op_num_threads=1)
    onnx_parallel = onnx_options(
        intra_op_num_threads=cores,
        inter_op_num_threads=cores,
        execution_mode=mode.ORT_PARALLEL,
    )
    shipped = "as load_runner loads it by default"
    return [
        Candidate(BASELINE, keras_predict, tf_threads, "baseline: model.predict(batch, verbose=0)"),
        Candidate(
            "keras", runner("keras"), tf_threads, "model.predict, batch_size 256, " + shipped
        ),
        Candidate(
            "keras_call", keras_call, tf_threads, "model(batch, training=False), no predict loop"
        ),
        Candidate("saved_model", runner("saved_model"), tf_threads, shipped),
        Candidate("tflite_float32", runner("tflite_float32"), f"LiteRT {cores}, XNNPACK", shipped),
        Candidate("tflite_int8", runner("tflite_int8"), f"LiteRT {cores}, XNNPACK", shipped),
        Candidate("onnx", runner("onnx"), onnx_threads(onnx_default), shipped),
        Candidate(
            "onnx_tuned",
            runner("onnx", session_options=onnx_tuned),
            onnx_threads(onnx_tuned),
            f"ORT_ENABLE_ALL, intra-op {cores}, inter-op 1, ORT_SEQUENTIAL set explicitly",
            "onnx",
        ),
        Candidate(
            "onnx_1_thread",
            runner("onnx", session_options=onnx_one),
            onnx_threads(onnx_one),
            "intra-op threads 1",
            "onnx",
        ),
        Candidate(
            "onnx_parallel",
            runner("onnx", session_options=onnx_parallel),
            onnx_threads(onnx_parallel),
            f"ORT_PARALLEL, intra-op and inter-op {cores}",
            "onnx",
        ),
        Candidate(
            "tflite_float32_1_thread",
            runner("tflite_float32", num_threads=1),
            "LiteRT 1, XNNPACK",
            "num_threads 1",
            "tflite_float32",
        ),
        Candidate(
            "tflite_int8_1_thread",
            runner("tflite_int8", num_threads=1),
            "LiteRT 1, XNNPACK",
            "num_threads 1",
            "tflite_int8",
        ),
        Candidate(
            "tflite_int8_no_xnnpack",
            runner("tflite_int8", xnnpack=False),
            f"LiteRT {cores}, no XNNPACK",
            "XNNPACK off (BUILTIN_WITHOUT_DEFAULT_DELEGATES)",
            "tflite_int8",
        ),
        Candidate(
            "tflite_int8_remember_shape",
            runner("tflite_int8", remember_shape=True),
            f"LiteRT {cores}, XNNPACK",
            "no get_input_details() per call: the runner remembers the shape it sized for",
            "tflite_int8",
        ),
    ]


def thread_settings() -> dict[str, int]:
    """The thread counts the pipeline's runners use; 0 means the library's default."""
    import tensorflow as tf

    return {
        "tensorflow_intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
        "tensorflow_inter_op": tf.config.threading.get_inter_op_parallelism_threads(),
        "tflite_num_threads": os.cpu_count() or 1,  # load_runner's default num_threads
        "onnxruntime_intra_op": 0,  # load_runner's default: ORT's own SessionOptions
    }


# ---------------------------------------------------------------------------- measuring


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


def images_per_second(predict: Runner, batches: Iterator[np.ndarray], seconds: float) -> float:
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


def figures(
    rates: list[float], baseline: list[float], varied: list[float] | None
) -> dict[str, object]:
    """Median images/s; median, min and max of the per-repetition ratios to the baseline,
    and (for a lever) the median ratio to the runner it varies: its gain."""
    ratios = np.array(rates) / np.array(baseline)
    found: dict[str, object] = {
        "images_per_second": round(float(np.median(rates)), 1),
        "ratio": round(float(np.median(ratios)), 2),
        "ratio_range": [round(float(ratios.min()), 2), round(float(ratios.max()), 2)],
    }
    if varied is not None:
        found["gain"] = round(float(np.median(np.array(rates) / np.array(varied))), 2)
    return found


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
                    rate = images_per_second(candidate.predict, batches[candidate.name], seconds)
                    rates[candidate.name].append(rate)
                    progress.update()
            results[str(batch_size)] = {
                c.name: figures(rates[c.name], rates[BASELINE], rates.get(c.varies))
                for c in candidates
            }
    return results


def fastest(results: dict[str, dict[str, dict]], names: Sequence[str]) -> dict[str, dict]:
    """Per batch size, the candidate among ``names`` with the highest ratio, and that ratio."""
    best = {}
    for batch_size, by_name in results.items():
        name = max(names, key=lambda n: by_name[n]["ratio"])
        best[batch_size] = {"runner": name, "ratio": by_name[name]["ratio"]}
    return best


# ---------------------------------------------------------------------------- report


def throughput_table(throughput: dict, candidates: Sequence[Candidate], agreement: dict) -> str:
    batch_sizes = list(throughput)
    rows = []
    for candidate in candidates:
        cells = []
        for batch_size in batch_sizes:
            found = throughput[batch_size][candidate.name]
            cells.append(f"{found['images_per_second']:,.0f} ({found['ratio']:.2f}x)")
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


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    """Measure what the module's docstring says; return the summary written to JSON."""
    from classifier.data.dataset import read_image_set

    formats_dir = args.formats_dir or args.model_dir / "formats"
    model_path = args.model_dir / "model.keras"
    check_inputs(model_path, formats_dir, args.data)
    images = read_image_set(args.data).images
    load_before = os.getloadavg()
    log.info("loading every runner")
    candidates = load_candidates(model_path, formats_dir)
    agreement = check_agreement(candidates, images)
    pool = tiled_images(images, max(args.images, 2 * max(args.batch_sizes)))
    log.info("timing %s runners on %s images", len(candidates), len(pool))
    throughput = measure_throughput(candidates, pool, args.batch_sizes, args.repeats, args.seconds)
    fastest_format = fastest(throughput, EXPORTED)
    summary = {
        "quick": args.quick,
        "machine": {
            "cpu_count": os.cpu_count(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "threads": thread_settings(),
        },
        "versions": package_versions(PACKAGES),
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
    best = ", ".join(
        f"batch {size}: {b['runner']} {b['ratio']:.2f}x" for size, b in fastest_format.items()
    )
    tables = [
        f"Batch throughput, median of {args.repeats} interleaved repetitions "
        f"(ratio: x {BASELINE} at the same batch size)\n\n"
        + throughput_table(throughput, candidates, agreement),
        "Levers: each variant against the runner it varies, same repetitions (gain > 1: faster)"
        "\n\n" + lever_table(throughput, candidates),
        f"Fastest exported format (target {TARGET_RATIO:g}x): {best}",
    ]
    path = write_results(NAME, summary)
    print("\n\n".join(tables))
    print(f"\nwritten to {path}")
    return summary


def positive_ints(text: str) -> list[int]:
    """``1,32,256`` as [1, 32, 256]; anything else is an argparse error."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,32,256, got {text!r}")
    return values


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.inference",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Inputs are what `make run` leaves (the model, its exported formats and the "
        "test split); without them, run `make run` first. "
        "Writes benchmarks/results/inference.json.",
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
        "--quick", action="store_true", help="fewer repetitions and batch sizes: a smoke run"
    )
    for option, kind, text in (
        ("--batch-sizes", positive_ints, "comma-separated batch sizes"),
        ("--images", int, "test images tiled to this many"),
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
            setattr(args, name, positive_ints(default) if name == "batch_sizes" else default)
    for name in ("images", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.seconds <= 0:
        parser.error("--seconds must be > 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage("benchmarks.inference", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
