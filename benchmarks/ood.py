"""Knowing when it does not know: the OOD scores' AUROC, and abstaining, on digits and MNIST.

For each data set, trains the reference CNN with the pipeline's own stages (download,
preprocess, train) in a temporary folder, prepares serving as export does
(classifier/serving/prepare.py, on the fast runtime) and measures, for both OOD scores
(Mahalanobis and energy), the AUROC at telling the real test digits from images the model
never saw the like of, all made offline:

- ``noise``: uniform random pixels; ``inverted``: the test digits, white on black turned
  black on white; ``letters``: capital letters drawn with PIL's default font;
  ``rotated``: the test digits turned a quarter (near out-of-distribution: a turned 0 or 8
  is still a digit shape);
- ``photos``: the cat and dog photos of ``../shared/data/catsdogs``, cut to a centred
  square, grayscale, 28x28: objects, like Fashion-MNIST's.

It also reports the abstain rate and the accuracy when answering at the exported
threshold (``serve.target_accuracy``), on the test split.

    python -m benchmarks.ood                         # digits, then MNIST (2 epochs)
    python -m benchmarks.ood --sources digits        # digits only
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks import markdown_table, prepare_data, report

SHARED = Path("../shared/data")
PHOTOS = 500
SHIFTS = ("noise", "inverted", "letters", "rotated", "photos")


def photo_images(folder: Path, count: int, shape: tuple[int, int, int]) -> np.ndarray | None:
    """Up to ``count`` photos under ``folder``, as the model takes images (crop policy)."""
    from classifier.data.images import UnreadableImage, load_image

    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = []
    for path in paths[:: max(1, len(paths) // count)][:count]:
        try:
            images.append(load_image(path, *shape, "crop")[0])
        except UnreadableImage:
            continue
    return np.stack(images) if images else None


def measure(source: str, epochs: int, root: Path) -> dict:
    """Train on ``source``, prepare serving, and score every shift."""
    from classifier.config import parse_params
    from classifier.data.dataset import read_image_set
    from classifier.serving import prepare, runtime
    from classifier.serving.prepare import Splits, prepare_serving, shifted_images
    from stages import train

    raw = yaml.safe_load(Path("params.yaml").read_text())
    if source == "mnist":
        raw["data"].update(source="idx_dir", path=str((SHARED / "mnist").resolve()))
        raw["preprocess"].update(val_fraction=0.1)
    raw["train"].update(epochs=epochs)
    params = parse_params(raw, "params.yaml (benchmark overrides)")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    started = time.perf_counter()
    prepare_data(params, root)
    outputs = train.TrainOutputs.under(root / "model")
    train.run(params, data_dir=root / "prepared", outputs=outputs)
    splits = Splits(
        *(read_image_set(root / "prepared" / split) for split in ("train", "val", "test"))
    )
    fmt = "tflite_float32"
    report_stub = {fmt: {"passed": True, "shipped": True}}
    prepared = prepare_serving(
        params.serve, keras_path=outputs.model, splits=splits, report=report_stub,
        out_dir=root / "serving",
    )  # fmt: skip
    loaded = runtime.load(fmt, prepared.artifacts["runtime_model"])
    statistics = prepare.fit_statistics(
        outputs.model,
        splits.train,
        prepare.outputs_of(loaded, splits.train.images)[runtime.FEATURES],
    )
    test_features = prepare.outputs_of(loaded, splits.test.images)[runtime.FEATURES]
    shifted = {kind: shifted_images(splits.test.images, kind) for kind in SHIFTS[:-1]}
    photos = photo_images(SHARED / "catsdogs", PHOTOS, splits.test.images.shape[1:])
    if photos is not None:
        shifted["photos"] = photos
    aurocs = {
        score: {
            kind: prepare.auroc(
                statistics.score(score, test_features),
                statistics.score(score, prepare.outputs_of(loaded, images)[runtime.FEATURES]),
            )
            for kind, images in shifted.items()
        }
        for score in ("mahalanobis", "energy")
    }
    metrics = prepared.metrics
    return {
        "source": source,
        "epochs": epochs,
        "test_images": len(splits.test.images),
        "test_accuracy": metrics["test"]["accuracy"],
        "target_accuracy": metrics["target_accuracy"],
        "confidence_threshold": round(metrics["confidence_threshold"], 4),
        "test_abstain_rate": metrics["test"]["abstain_rate"],
        "test_accuracy_when_answering": metrics["test"]["accuracy_when_answering"],
        "auroc": aurocs,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.ood",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sources", nargs="+", default=["digits", "mnist"])
    parser.add_argument("--epochs", type=int, default=None, help="default: 15 digits, 2 MNIST")
    args = parser.parse_args(argv)
    results = {}
    for source in args.sources:
        epochs = args.epochs or (2 if source == "mnist" else 15)
        with tempfile.TemporaryDirectory(prefix=f"benchmarks-ood-{source}-") as root:
            results[source] = measure(source, epochs, Path(root))
    rows = [
        [
            source,
            score,
            *[f"{result['auroc'][score].get(kind, float('nan')):.3f}" for kind in SHIFTS],
        ]
        for source, result in results.items()
        for score in ("mahalanobis", "energy")
    ]
    print(markdown_table(["data", "score", *SHIFTS], rows))
    report("ood", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
