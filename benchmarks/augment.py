"""What `train.augment` costs an epoch: augmenting the train split against fitting it.

Prepares a photo folder (default ``../shared/data/catsdogs``) with the pipeline's own
download and preprocess stages at each size, then, epoch by epoch in one process,
augments the train split (``classifier.training.augment.augment_epoch``) and fits the
architecture on the result for one epoch. The figure is the median augmenting time over
the median fitting time: how much slower an epoch is with the augmentation than without.
Both run side by side on the same machine and data, so load from other work cancels.

    python -m benchmarks.augment                       # photo, photo_resnet, 64 and 96
    python -m benchmarks.augment --augment affine --architecture reference_cnn --sizes 28

Writes benchmarks/results/augment.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from benchmarks import markdown_table, report
from benchmarks.photos import RECIPE, SHARED_PHOTOS, params_for


def measure(images, labels, augment: str, architecture: str, epochs: int) -> dict:
    """Median seconds per epoch to augment ``images`` and to fit on them, side by side."""
    import keras

    from classifier.model.architectures import build_model
    from classifier.training.augment import augment_epoch

    model = build_model(architecture, images.shape[1:], int(labels.max()) + 1)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(images[:64], labels[:64], batch_size=32, epochs=1, verbose=0)  # compile
    augmenting, fitting = [], []
    for epoch in range(epochs):
        started = time.perf_counter()
        augmented = augment_epoch(images, augment, seed=42, epoch=epoch)
        augmenting.append(time.perf_counter() - started)
        started = time.perf_counter()
        model.fit(augmented, labels, batch_size=32, epochs=1, verbose=0)
        fitting.append(time.perf_counter() - started)
    augment_seconds, fit_seconds = statistics.median(augmenting), statistics.median(fitting)
    return {
        "images": len(images),
        "augment_seconds": augment_seconds,
        "fit_seconds": fit_seconds,
        "slowdown": augment_seconds / fit_seconds,
    }


def prepared(data: Path, size: int, root: Path):
    """The train split of ``data`` at ``size`` x ``size``, as the pipeline prepares it."""
    from classifier.config import parse_params
    from classifier.data.dataset import read_image_set
    from stages import download, preprocess

    settings = {**RECIPE, "data.source": "folder", "data.path": str(data.resolve()),
                "preprocess.image_height": size, "preprocess.image_width": size}  # fmt: skip
    raw = params_for(yaml.safe_load(Path("params.yaml").read_text()), settings)
    params = parse_params(raw, "params.yaml (benchmark settings)")
    download.run(params.data, out_dir=root / "raw")
    preprocess.run(
        params.preprocess, raw_dir=root / "raw", out_dir=root / "prepared",
        metrics_path=root / "data.json", report_path=root / "data.md",
    )  # fmt: skip
    return read_image_set(root / "prepared" / "train")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.augment",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=SHARED_PHOTOS, help="a photo folder")
    parser.add_argument("--augment", default="photo", help="train.augment to measure")
    parser.add_argument("--architecture", default="photo_resnet")
    parser.add_argument("--sizes", default="64,96", help="square sizes, comma-separated")
    parser.add_argument("--epochs", type=int, default=3, help="epochs measured (median)")
    args = parser.parse_args(argv)
    results = []
    for size in (int(size) for size in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as root:
            train = prepared(args.data, size, Path(root))
            figures = measure(train.images, train.labels, args.augment, args.architecture,
                              args.epochs)  # fmt: skip
        results.append({"size": size, **figures})
        print(f"{size}x{size}: augmenting adds {figures['slowdown']:.1%} to an epoch", flush=True)
    table = markdown_table(
        ["size", "train images", "augment s/epoch", "fit s/epoch", "slowdown"],
        [[f"{r['size']}x{r['size']}", r["images"], f"{r['augment_seconds']:.2f}",
          f"{r['fit_seconds']:.2f}", f"{r['slowdown']:.1%}"] for r in results],
    )  # fmt: skip
    summary = {"data": str(args.data), "augment": args.augment,
               "architecture": args.architecture, "results": results, "table": table}  # fmt: skip
    report("augment", summary)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
