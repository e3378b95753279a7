"""Photos from scratch: accuracy, calibration and minutes on a real folder of cats and dogs.

Runs the pipeline's own stages (download, preprocess, train, evaluate; each stage's real
``run``) on ``../shared/data/catsdogs`` (2,000 JPEGs) in a temporary folder with its own
MLflow store, once per architecture and resolution asked for, and reports test accuracy
with its 95 % interval, ECE before and after calibration, the temperature, and the
minutes each took (with accuracy per minute, to choose a resolution). The same params as
`dvc exp run -S ...`; the defaults are the photo recipe of the README.

300 test photos put about 4 points of noise on one run, and one seed's network is not
another's: ``--seeds`` runs each setting once per ``train.seed`` and adds their mean. With
``train.tta: hflip`` (the recipe's), each run also reports the same weights on the photo
alone (the single view) and on how many test photos only one of the two is right: the
flip average's own effect, paired.

    python -m benchmarks.photos                               # the recipe at 64 and 96
    python -m benchmarks.photos --sizes 64 --seeds 42,1,2     # the recipe, three seeds
    python -m benchmarks.photos --sizes 96 --epochs 60
    python -m benchmarks.photos --architectures reference_cnn --sizes 64 -S train.augment=none

Writes benchmarks/results/photos.json and prints a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from benchmarks import markdown_table, report

SHARED_PHOTOS = Path("../shared/data/catsdogs")
# The photo recipe (README): what `dvc exp run -S ...` sets for a folder of photos.
RECIPE = {
    "preprocess.channels": 3,
    "preprocess.resize": "pad",
    "preprocess.max_skipped_fraction": 0.05,
    "preprocess.near_duplicate_distance": 4,
    "train.architecture": "photo_resnet",
    "train.augment": "photo",
    "train.epochs": 60,
    "train.batch_size": 32,
    "train.learning_rate": 0.002,
    "train.schedule": "warmup_cosine",
    "train.warmup_epochs": 2.0,
    "train.weight_decay": 0.05,
    "train.label_smoothing": 0.1,
    "train.tta": "hflip",
}


def params_for(raw: dict, settings: dict[str, object]) -> dict:
    """``raw`` params with ``section.key`` settings applied."""
    for key, value in settings.items():
        section, _, name = key.partition(".")
        raw[section][name] = value
    return raw


def accuracy_interval(correct: int, total: int) -> tuple[float, float]:
    """The exact (Clopper-Pearson) 95 % interval of an accuracy."""
    from scipy.stats import binomtest

    interval = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="exact")
    return float(interval.low), float(interval.high)


def run_one(raw: dict, root: Path) -> dict[str, object]:
    """Download, preprocess, train and evaluate with ``raw`` params in ``root``; the figures."""
    from classifier.config import EvaluateParams, parse_params
    from classifier.data.dataset import read_image_set
    from stages import download, evaluate, preprocess, train

    params = parse_params(raw, "params.yaml (benchmark settings)")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    seconds = {}
    started = time.perf_counter()
    download.run(params.data, out_dir=root / "raw")
    preprocess.run(
        params.preprocess, raw_dir=root / "raw", out_dir=root / "prepared",
        metrics_path=root / "data.json", report_path=root / "data.md",
    )  # fmt: skip
    seconds["data"] = time.perf_counter() - started
    outputs = train.TrainOutputs.under(root / "model")
    started = time.perf_counter()
    result = train.run(params, data_dir=root / "prepared", outputs=outputs)
    seconds["train"] = time.perf_counter() - started
    metrics = evaluate.run(
        EvaluateParams(batch_size=256), data_dir=root / "prepared", model_path=outputs.model,
        run_info_path=outputs.run_info, history_path=outputs.history,
        metrics_path=root / "evaluate.json", plots_dir=root / "plots",
    )  # fmt: skip
    test = read_image_set(root / "prepared" / "test")
    correct = round(metrics["accuracy"] * len(test.labels))
    low, high = accuracy_interval(correct, len(test.labels))
    minutes = seconds["train"] / 60
    augment = augment_seconds(read_image_set(root / "prepared" / "train").images, params.train)
    epoch = seconds["train"] / params.train.epochs
    return {
        "seed": params.train.seed,
        "test_images": len(test.labels),
        "accuracy": metrics["accuracy"],
        "accuracy_ci95": [low, high],
        "ece": metrics["ece"],
        "ece_uncalibrated": metrics["ece_uncalibrated"],
        "temperature": metrics["temperature"],
        "best_val_accuracy": float(result.history["val_accuracy"].max()),
        "train_minutes": minutes,
        "accuracy_per_minute": metrics["accuracy"] / minutes,
        "parameters": result.model.count_params(),
        "seconds": seconds,
        # the epoch's share spent augmenting, as a slowdown over the epoch without it
        "augment_seconds_per_epoch": augment,
        "augment_slowdown": augment / max(epoch - augment, 1e-9),
        **single_view_figures(outputs.model, test),
    }


def single_view_figures(model_path: Path, test) -> dict[str, object]:
    """For a model that averages each photo with its mirror (train.tta: hflip): the same
    weights on the photo alone, and on how many test photos only one of the two is right.
    The same network either way, so this is the flip average's own effect, paired."""
    from classifier.model.files import load_model
    from classifier.model.tta import has_flip_average, single_view

    model = load_model(str(model_path))
    if not has_flip_average(model):
        return {}
    both = model.predict(test.images, verbose=0).argmax(axis=1) == test.labels
    one = single_view(model).predict(test.images, verbose=0).argmax(axis=1) == test.labels
    return {
        "single_view_accuracy": float(one.mean()),
        "only_flip_average_right": int((both & ~one).sum()),
        "only_single_view_right": int((one & ~both).sum()),
    }


def augment_seconds(images, cfg) -> float:
    """Median seconds ``train.augment`` takes over the train split, one epoch's worth."""
    from classifier.training.augment import augment_epoch

    times = []
    for epoch in range(3):
        started = time.perf_counter()
        augment_epoch(images, cfg.augment, cfg.seed, epoch)
        times.append(time.perf_counter() - started)
    return sorted(times)[1]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.photos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=SHARED_PHOTOS, help="a photo folder")
    parser.add_argument("--architectures", default="photo_resnet", help="comma-separated")
    parser.add_argument("--sizes", default="64,96", help="square sizes, comma-separated")
    parser.add_argument("--epochs", type=int, help="train.epochs (default: the recipe's)")
    parser.add_argument(
        "--seeds", help="train.seed values, comma-separated: one run each, and their mean"
    )
    parser.add_argument(
        "-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override a param, as dvc exp run -S does (repeatable)",
    )  # fmt: skip
    parser.add_argument("--work-dir", type=Path, help="keep each run's outputs here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        key: yaml.safe_load(value) for key, _, value in (s.partition("=") for s in args.set)
    }
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    seeds = [None] if args.seeds is None else [int(seed) for seed in args.seeds.split(",")]
    sizes = [int(size) for size in args.sizes.split(",")]
    results = []
    for architecture, size, seed in itertools.product(args.architectures.split(","), sizes, seeds):
        settings = {
            **RECIPE,
            "data.source": "folder",
            "data.path": str(args.data.resolve()),
            "preprocess.image_height": size,
            "preprocess.image_width": size,
            "train.architecture": architecture,
            **overrides,
            **({} if seed is None else {"train.seed": seed}),
        }
        raw = params_for(yaml.safe_load(Path("params.yaml").read_text()), settings)
        name = f"{architecture}-{size}" + ("" if seed is None else f"-seed{seed}")
        with contextlib.ExitStack() as stack:
            if args.work_dir is None:
                root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            else:
                root = args.work_dir / name
                root.mkdir(parents=True, exist_ok=True)
            figures = run_one(raw, root)
        results.append({"architecture": architecture, "size": size, "settings": settings,
                        **figures})  # fmt: skip
        print(
            f"{name}: accuracy {figures['accuracy']:.4f}, ECE {figures['ece']:.4f}, "
            f"{figures['train_minutes']:.1f} min",
            flush=True,
        )
    table = results_table(results)
    report("photos", {"data": str(args.data), "results": results, "table": table})
    print(table)
    return 0


def results_table(results: list[dict]) -> str:
    """One row per run; with several seeds of one setting, a last row of their means."""
    rows = [
        [r["architecture"], f"{r['size']}x{r['size']}", r["settings"]["train.epochs"], r["seed"],
         f"{r['accuracy']:.4f} ({r['accuracy_ci95'][0]:.3f}-{r['accuracy_ci95'][1]:.3f})",
         single_view_cell(r), f"{r['ece']:.4f} ({r['ece_uncalibrated']:.4f})",
         f"{r['train_minutes']:.1f}", f"{r['accuracy_per_minute']:.4f}",
         f"{r['augment_slowdown']:.0%}"]
        for r in results
    ]  # fmt: skip
    if len(results) > 1 and len({(r["architecture"], r["size"]) for r in results}) == 1:
        mean = {key: statistics.mean(r[key] for r in results) for key in MEANS}
        single = ""
        if all("single_view_accuracy" in r for r in results):
            single = f"{statistics.mean(r['single_view_accuracy'] for r in results):.4f}"
        rows.append(["mean", "", "", "", f"{mean['accuracy']:.4f}", single,
                     f"{mean['ece']:.4f}", f"{mean['train_minutes']:.1f}", "", ""])  # fmt: skip
    return markdown_table(
        ["architecture", "size", "epochs", "seed", "test accuracy (95% CI)",
         "single view (only flip right / only single right)", "ECE (uncalibrated)",
         "train minutes", "accuracy per minute", "augment slowdown"],
        rows,
    )  # fmt: skip


MEANS = ("accuracy", "ece", "train_minutes")


def single_view_cell(result: dict) -> str:
    if "single_view_accuracy" not in result:
        return "no flip average"
    return (
        f"{result['single_view_accuracy']:.4f} ({result['only_flip_average_right']} / "
        f"{result['only_single_view_right']})"
    )


if __name__ == "__main__":
    raise SystemExit(main())
