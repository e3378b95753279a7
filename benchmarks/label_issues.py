"""Does label_issues find planted label errors? Flip some training labels, then look.

On the default digits (preprocessed with the project's params into a temporary folder),
``--flip`` of the training labels are changed to another class at random; the stage's
library then trains ``--folds`` models for ``--epochs`` epochs each and ranks the labels
with confident learning. The figure is recall: the share of the flipped labels among the
first ``--flip`` x N images it ranks (N training images), against the target of 80 %.

    python -m benchmarks.label_issues                         # 5 folds, 10 epochs
    python -m benchmarks.label_issues --folds 3 --epochs 4    # quicker
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import package_versions, prepare_data, report
from classifier.config import load_params
from classifier.data.dataset import ImageSet, read_image_set
from classifier.data.duplicates import image_hashes
from classifier.evaluation import label_issues

NAME = "label_issues"
TARGET_RECALL = 0.8
PACKAGES = ("cleanlab", "keras", "tensorflow")


def prepared_digits(root: Path, params_path: Path) -> Path:
    """The project's default data, downloaded and preprocessed under ``root``."""
    return prepare_data(load_params(params_path), root)


def measure(
    params_path: Path, flip: float, folds: int, epochs: int, seed: int
) -> dict[str, object]:
    """Plant ``flip`` label errors in the digits' training split; how many are found."""
    params = load_params(params_path)
    cfg = params.label_issues.model_copy(update={"folds": folds, "epochs": epochs})
    with tempfile.TemporaryDirectory() as scratch:
        train = read_image_set(prepared_digits(Path(scratch), params_path) / "train")
    noisy_labels, flipped = label_issues.flip_labels(
        train.labels, flip, len(train.class_names), seed
    )
    noisy = ImageSet(train.images, noisy_labels, train.class_names)
    start = time.perf_counter()
    probabilities, _ = label_issues.out_of_fold_probabilities(noisy, params.train, cfg)
    issues = label_issues.rank_label_issues(
        noisy_labels, probabilities, train.class_names, image_hashes(train.images)
    )
    seconds = time.perf_counter() - start
    top = math.ceil(flip * len(noisy_labels))
    ranked = issues.table["index"].to_numpy()
    return {
        "training_images": len(noisy_labels),
        "flipped": len(flipped),
        "top_checked": top,
        "found_in_top": round(label_issues.recall_in_top(ranked, flipped, top) * len(flipped)),
        "recall_in_top": round(label_issues.recall_in_top(ranked, flipped, top), 4),
        "target_recall": TARGET_RECALL,
        "flagged": len(ranked),
        "recall_among_flagged": round(label_issues.recall_in_top(ranked, flipped, len(ranked)), 4),
        "out_of_fold_accuracy": round(issues.out_of_fold_accuracy, 4),
        "folds": folds,
        "epochs": epochs,
        "architecture": params.train.architecture,
        "seconds": round(seconds, 1),
        "versions": package_versions(PACKAGES),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.label_issues",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--flip", type=float, default=0.02, help="share of labels flipped")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="which labels are flipped")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = measure(args.params, args.flip, args.folds, args.epochs, args.seed)
    report(NAME, summary)
    return 0 if summary["recall_in_top"] >= TARGET_RECALL else 1


if __name__ == "__main__":
    raise SystemExit(main())
