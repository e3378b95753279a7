"""Training speed: the train stage against a plain Keras script of the reference CNN.

On the full MNIST (``../shared/data/mnist``: 54,000 training, 6,000 validation and
10,000 test digits), runs each variant in its own process, so each gets a fresh
TensorFlow, interleaved round by round:

- ``plain``: the reference CNN as a plain Keras script: float input scaled by 1/255,
  Adam 1e-3, sparse cross-entropy, ``model.fit(shuffle=True, validation_data=...)``;
- ``stage``: ``stages.train.run`` with the project's params (same epochs and batch),
  tracked to an MLflow sqlite store in a temporary folder;
- ``stage_untracked``: the same with every ``classifier.tracking.runs`` call the stage makes
  replaced by a no-op;
- ``stage_float32``: ``stage`` with ``train.precision: float32`` (the pipeline's own cost,
  without the bfloat16 speedup);
- ``stage_one_step``: ``stage`` with ``train.steps_per_execution: 1`` (without the
  multi-step speedup);
- ``recipe``: ``stage`` with the faster recipe (``--recipe-*``), for time to 99 % accuracy.

Training seconds exclude process start and reading the IDX files, and the test-set
evaluation after each epoch (which gives time to 99.0 % test accuracy); they include
everything the stage does around ``fit`` (MLflow, checkpoints, saving). MLflow is imported
and the sqlite store created before the clock starts: once per process and once per
project, not per training run.

    python -m benchmarks.train --epochs 8 --batch-size 64
    python -m benchmarks.train --quick        # 6,000 images, 2 epochs: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np

from benchmarks import report

SHARED_MNIST = Path("../shared/data/mnist")
VARIANTS = ("plain", "stage", "stage_untracked", "stage_float32", "stage_one_step", "recipe")
# The stage with one of its speedups turned off.
STAGE_WITHOUT = {
    "stage_float32": {"precision": "float32"},
    "stage_one_step": {"steps_per_execution": 1},
}
TARGET_ACCURACY = 0.99
VAL_IMAGES = 6_000  # the last training images, as in benchmarks.mnist (val_fraction 0.1)
PREDICT_BATCH = 1_000
RESULT_PREFIX = "RESULT "
TRACKING_CALLS = (
    "log_epoch",
    "finish_logging",
    "log_missing_epochs",
    "log_artifact",
    "log_dataset",
    "set_tags",
    "describe_run",
)


def load_mnist(folder: Path, subset: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST as uint8 (N, 28, 28, 1) images and int64 labels: train, val and test."""
    from classifier.data.idx import read_idx

    def pair(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")[..., None]
        labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
        return images, labels

    images, labels = pair("train")
    test = pair("t10k")
    if subset:
        images, labels = images[: subset + VAL_IMAGES // 10], labels[: subset + VAL_IMAGES // 10]
        return {
            "train": (images[:subset], labels[:subset]),
            "val": (images[subset:], labels[subset:]),
            "test": test,
        }
    return {
        "train": (images[:-VAL_IMAGES], labels[:-VAL_IMAGES]),
        "val": (images[-VAL_IMAGES:], labels[-VAL_IMAGES:]),
        "test": test,
    }


def epoch_clock(test: tuple[np.ndarray, np.ndarray], scale: float | None):
    """A Keras callback that stamps each epoch's end and scores the test set off the clock."""
    import keras

    class EpochClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.started = time.perf_counter()
            self.off_clock = 0.0
            self.epochs: list[dict[str, float]] = []

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            stamp = time.perf_counter()
            images = test[0] if scale is None else test[0].astype("float32") * scale
            probabilities = self.model.predict(images, batch_size=PREDICT_BATCH, verbose=0)
            accuracy = float(np.mean(np.argmax(probabilities, axis=1) == test[1]))
            self.epochs.append(
                {
                    "epoch": epoch + 1,
                    "seconds": stamp - self.started - self.off_clock,
                    "test_accuracy": accuracy,
                }
            )
            self.off_clock += time.perf_counter() - stamp

        def training_seconds(self) -> float:
            return time.perf_counter() - self.started - self.off_clock

    return EpochClock()


def plain_keras(data: dict, epochs: int, batch_size: int, seed: int) -> dict:
    """The reference CNN as a plain Keras script would train it."""
    import keras
    from keras import layers

    train_images = data["train"][0].astype("float32") / 255
    val_images = data["val"][0].astype("float32") / 255
    clock = epoch_clock(data["test"], 1 / 255)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input(shape=(28, 28, 1)),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, activation="relu"),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(
        train_images,
        data["train"][1],
        batch_size=batch_size,
        epochs=epochs,
        shuffle=True,
        validation_data=(val_images, data["val"][1]),
        callbacks=[clock],
        verbose=0,
    )
    return {"seconds": clock.training_seconds(), "epochs": clock.epochs}


def pipeline_stage(data: dict, variant: str, train_overrides: dict, work: Path) -> dict:
    """``stages.train.run`` on the data written as prepared splits in ``work``."""
    import yaml

    from classifier.atomic import write_json
    from classifier.config import parse_params
    from classifier.data.dataset import CLASSES_FILE, ImageSet, write_image_set
    from classifier.tracking import runs, store
    from classifier.training.precision import resolve_precision
    from stages import train

    classes = tuple(str(digit) for digit in range(10))
    prepared = work / "prepared"
    for split, (images, labels) in data.items():
        write_image_set(prepared / split, ImageSet(images, labels, classes))
    write_json(prepared / CLASSES_FILE, list(classes))
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["data"].update(source="idx_dir", path=str(SHARED_MNIST))
    raw["train"].update(train_overrides, architecture="reference_cnn", resume=False)
    params = parse_params(raw, "params.yaml (benchmark overrides)")

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "benchmark"
    spent = {"seconds": 0.0}
    if variant == "stage_untracked":
        replacements = untracked_calls()
    else:
        store.connect()  # creates the store: once per project, not per run
        replacements = timed_tracking_calls(spent)

    clock = epoch_clock(data["test"], None)
    with patched(runs, replacements):
        train.run(
            params,
            data_dir=prepared,
            outputs=train.TrainOutputs.under(work / "model"),
            callbacks=[clock],
        )
    seconds = clock.training_seconds()
    return {
        "seconds": seconds,
        "tracking_seconds": spent.pop("seconds"),
        "tracking_seconds_by_call": {name: round(value, 3) for name, value in spent.items()},
        "epochs": clock.epochs,
        "precision": resolve_precision(params.train.precision),
        "steps_per_execution": params.train.steps_per_execution,
    }


@contextmanager
def patched(module: ModuleType, replacements: dict[str, object]) -> Iterator[None]:
    """Replace attributes of ``module`` for the block, then put the originals back."""
    originals = {name: getattr(module, name) for name in replacements}
    for name, value in replacements.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in originals.items():
            setattr(module, name, value)


def timed_tracking_calls(spent: dict[str, float]) -> dict[str, object]:
    """Stand-ins for the ``classifier.tracking.runs`` functions the train stage calls that
    add the time the training thread spends in each to ``spent``.

    A direct measure of tracking overhead, unlike the difference between two runs of
    20 seconds or more on a shared machine. Opening and closing the run count too.
    """
    from classifier.tracking import runs

    def add(name: str, seconds: float) -> None:
        spent["seconds"] += seconds
        spent[name] = spent.get(name, 0.0) + seconds

    def timed(name, call):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                add(name, time.perf_counter() - started)

        return wrapper

    replacements: dict[str, object] = {
        name: timed(name, getattr(runs, name)) for name in TRACKING_CALLS
    }
    opened = runs.training_run

    @contextmanager
    def timed_run(*args: object, **kwargs: object) -> Iterator[str]:
        started = time.perf_counter()
        with opened(*args, **kwargs) as run_id:
            add("open_run", time.perf_counter() - started)
            try:
                yield run_id
            finally:
                started = time.perf_counter()
        add("close_run", time.perf_counter() - started)

    replacements["training_run"] = timed_run
    return replacements


def untracked_calls() -> dict[str, object]:
    """Stand-ins for every ``classifier.tracking.runs`` function the train stage calls that
    do nothing: no MLflow run at all."""

    def nothing(*args: object, **kwargs: object) -> None:
        return None

    @contextmanager
    def untracked_run(*args: object, **kwargs: object) -> Iterator[str]:
        yield "untracked"

    return {**dict.fromkeys(TRACKING_CALLS, nothing), "training_run": untracked_run}


def worker(args: argparse.Namespace) -> int:
    """Run one variant in this process and print its result as one JSON line."""
    import logging

    logging.disable(logging.INFO)
    if args.worker != "plain":
        import mlflow  # noqa: F401 - imported off the clock, as at process start

    data = load_mnist(args.data, args.subset)
    stage_overrides = {"epochs": args.epochs, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as work:
        if args.worker == "plain":
            result = plain_keras(data, args.epochs, args.batch_size, args.seed)
        elif args.worker == "recipe":
            overrides = {
                "epochs": args.recipe_epochs,
                "batch_size": args.recipe_batch_size,
                "learning_rate": args.recipe_learning_rate,
                "schedule": "warmup_cosine",
                "warmup_epochs": args.recipe_warmup_epochs,
                "augment": "none",
                "precision": "auto",
            }
            result = {**pipeline_stage(data, "recipe", overrides, Path(work)), "recipe": overrides}
        elif args.worker in STAGE_WITHOUT:
            overrides = {**stage_overrides, **STAGE_WITHOUT[args.worker]}
            result = pipeline_stage(data, args.worker, overrides, Path(work))
        else:
            result = pipeline_stage(data, args.worker, stage_overrides, Path(work))
    result["train_images"] = len(data["train"][1])
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """One variant in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.train", "--worker", variant]
    for option in (
        "data",
        "epochs",
        "batch_size",
        "subset",
        "seed",
        "recipe_epochs",
        "recipe_batch_size",
        "recipe_learning_rate",
        "recipe_warmup_epochs",
    ):
        value = getattr(args, option)
        if value is not None:
            command += [f"--{option.replace('_', '-')}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"benchmark variant {variant} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_PREFIX))


def time_to_target(epochs: list[dict]) -> float | None:
    """Training seconds until the first epoch whose test accuracy reaches the target."""
    return next((e["seconds"] for e in epochs if e["test_accuracy"] >= TARGET_ACCURACY), None)


def images_per_second(result: dict) -> float:
    """Training images per second of one variant's run."""
    return result["train_images"] * len(result["epochs"]) / result["seconds"]


def summarise(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    """Medians over rounds; each variant's throughput as the median of its per-round
    ratios against the plain script's run of the same round."""
    summary: dict = {
        "data": str(args.data),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "variants": {},
    }
    medians = {}
    for variant, results in runs.items():
        seconds = statistics.median(r["seconds"] for r in results)
        epochs = len(results[0]["epochs"])
        throughput = results[0]["train_images"] * epochs / seconds
        reached = [time_to_target(r["epochs"]) for r in results]
        medians[variant] = {"seconds": seconds, "images_per_second": throughput}
        summary["variants"][variant] = {
            "training_seconds": round(seconds, 1),
            "epochs": epochs,
            "images_per_second": round(throughput),
            "test_accuracy": round(
                statistics.median(r["epochs"][-1]["test_accuracy"] for r in results), 4
            ),
            "test_accuracy_by_epoch": [round(e["test_accuracy"], 4) for e in results[0]["epochs"]],
            "seconds_to_99": None if None in reached else round(statistics.median(reached), 1),
            **{
                k: v
                for k, v in results[0].items()
                if k in ("precision", "steps_per_execution", "recipe")
            },
        }
    plain = medians.get("plain")
    for variant in medians:
        row = summary["variants"][variant]
        if plain is not None:
            # Each round's ratio pairs two runs a minute apart, so the machine's drift over
            # the invocation cancels; their median is the figure, their range its spread.
            by_round = [
                images_per_second(run) / images_per_second(plain_run)
                for plain_run, run in zip(runs["plain"], runs[variant], strict=True)
            ]
            row["throughput_vs_plain"] = round(statistics.median(by_round), 2)
            row["throughput_vs_plain_by_round"] = [round(ratio, 2) for ratio in by_round]
            if row["seconds_to_99"] is not None and summary["variants"]["plain"]["seconds_to_99"]:
                row["time_to_99_vs_plain"] = round(
                    row["seconds_to_99"] / summary["variants"]["plain"]["seconds_to_99"], 2
                )
    if "stage" in runs:
        shares = [r["tracking_seconds"] / r["seconds"] for r in runs["stage"]]
        summary["tracking_share_percent"] = round(100 * statistics.median(shares), 2)
        summary["tracking_seconds"] = round(
            statistics.median(r["tracking_seconds"] for r in runs["stage"]), 2
        )
        summary["tracking_seconds_by_call"] = runs["stage"][0]["tracking_seconds_by_call"]
    if "stage" in medians and "stage_untracked" in medians:
        untracked = medians["stage_untracked"]["seconds"]
        summary["tracking_overhead_percent"] = round(
            100 * (medians["stage"]["seconds"] - untracked) / untracked, 1
        )
    return summary


def _ratio_with_range(row: dict) -> str:
    """The median per-round throughput ratio, with the rounds' range when there are several."""
    by_round = row.get("throughput_vs_plain_by_round", [])
    if len(by_round) < 2 or min(by_round) == max(by_round):
        return str(row.get("throughput_vs_plain", ""))
    return f"{row['throughput_vs_plain']} ({min(by_round)}-{max(by_round)})"


def markdown(summary: dict) -> str:
    """The summary as a Markdown table."""
    lines = [
        "| variant | precision | epochs | batch | train s | images/s | vs plain | test acc "
        "| s to 99.0 % | vs plain |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, row in summary["variants"].items():
        batch_size = row.get("recipe", {}).get("batch_size", summary["batch_size"])
        lines.append(
            f"| {variant} | {row.get('precision', 'float32')} | {row['epochs']} "
            f"| {batch_size} | {row['training_seconds']} "
            f"| {row['images_per_second']} | {_ratio_with_range(row)} "
            f"| {row['test_accuracy']} | {row['seconds_to_99'] or 'not reached'} "
            f"| {row.get('time_to_99_vs_plain', '')} |"
        )
    if "tracking_share_percent" in summary:
        lines.append(
            f"\nTime in MLflow tracking calls: {summary['tracking_seconds']} s, "
            f"{summary['tracking_share_percent']} % of the stage's training time"
        )
    if "tracking_overhead_percent" in summary:
        lines.append(
            f"Tracked against untracked stage: {summary['tracking_overhead_percent']} % slower"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=SHARED_MNIST, help="folder of IDX files")
    parser.add_argument("--epochs", type=int, default=8, help="epochs of plain and stage")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--subset", type=int, help="train on the first N images only")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (medians)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated")
    parser.add_argument("--quick", action="store_true", help="6,000 images, 2 epochs")
    parser.add_argument("--recipe-epochs", type=int, default=3)
    parser.add_argument("--recipe-batch-size", type=int, default=128)
    parser.add_argument("--recipe-learning-rate", type=float, default=0.002)
    parser.add_argument("--recipe-warmup-epochs", type=float, default=0.3)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.subset, args.epochs, args.recipe_epochs = args.subset or 6_000, 2, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    variants = [v for v in args.variants.split(",") if v]
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    for round_number in range(args.rounds):
        for variant in variants:
            print(f"round {round_number + 1}/{args.rounds}: {variant}", file=sys.stderr, flush=True)
            runs[variant].append(run_variant(variant, args))
    summary = summarise(runs, args)
    report("train", summary)
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
