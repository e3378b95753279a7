"""Stage ``label_issues`` (optional): the training labels that are probably wrong.

Off by default (``label_issues.enabled: false``): the stage is in the pipeline so that
``dvc exp run -S label_issues.enabled=true`` is an ordinary experiment, but while it is off
it trains nothing and writes an empty table and a picture saying so, in seconds.
On, it trains ``label_issues.folds`` models of ``train.architecture`` on the folds of the
training split, ranks likely label errors from their out-of-fold probabilities with
confident learning (classifier/evaluation/label_issues.py), and writes the ranked table
(with each image's content hash, what ``exclude.yaml`` takes), the probabilities and a
grid of the top suspects: image, given label, suggested label, score.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from classifier.atomic import atomic_path, write_json
from classifier.cli import PREPARED, exit_process, run_stage, stage_parser
from classifier.config import Params, load_params
from classifier.data.dataset import read_image_set
from classifier.data.duplicates import image_hashes
from classifier.evaluation import label_issues, plots

log = logging.getLogger(__name__)

TABLE_FILE = "suspects.csv"
PICTURE_FILE = "suspects.png"
PROBABILITIES_FILE = "out_of_fold.npy"


def suspects_figure(issues: label_issues.LabelIssues, images: np.ndarray, shown: int):
    """The top ``shown`` suspects: image, given and suggested label, score, hash."""
    top = issues.table.head(shown)
    captions = [
        f"#{row.rank} given {row.given} -> {row.suggested}\np(given) {row.score:.2g} {row.hash[:8]}"
        for row in top.itertuples()
    ]
    title = (
        f"Likely label errors: {len(issues.table)} of {issues.checked} training images flagged"
        if issues.checked
        else "label_issues is off (dvc exp run -S label_issues.enabled=true)"
    )
    return plots.image_grid_figure(images[top["index"].to_numpy(dtype=np.int64)], captions, title)


def run(params: Params, *, data_dir: Path, out_dir: Path, metrics_path: Path) -> dict[str, float]:
    """Rank the training split's likely label errors into ``out_dir`` (or, off, say so)."""
    cfg = params.label_issues
    if not cfg.enabled:
        issues, images, probabilities = label_issues.empty_issues(), np.zeros((0, 1, 1, 1)), None
        log.info("label_issues.enabled is false: nothing checked")
    else:
        train = read_image_set(Path(data_dir) / "train")
        probabilities, _ = label_issues.out_of_fold_probabilities(train, params.train, cfg)
        issues = label_issues.rank_label_issues(
            train.labels, probabilities, train.class_names, image_hashes(train.images)
        )
        images = train.images
    figure = suspects_figure(issues, images, label_issues.SHOWN)
    with atomic_path(out_dir, directory=True) as staged:
        issues.table.to_csv(staged / TABLE_FILE, index=False, float_format="%.6g")
        plots.save(figure, staged / PICTURE_FILE)
        if probabilities is not None:
            np.save(staged / PROBABILITIES_FILE, probabilities, allow_pickle=False)
    summary = {"enabled": cfg.enabled, **issues.summary()}
    write_json(metrics_path, summary)
    if cfg.enabled:
        log.info(
            "%d of %d training labels flagged (out-of-fold accuracy %.4f); table in %s",
            summary["flagged"],
            summary["checked_images"],
            summary["out_of_fold_accuracy"],
            out_dir / TABLE_FILE,
        )
    return summary


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_parser(
        "label_issues",
        "Rank the training labels that are probably wrong (params: label_issues.*, train.*).",
        data=PREPARED,
        out=("plots/label_issues", "folder of the ranked table and the suspects' picture out"),
        metrics=("metrics/label_issues.json", "how many were checked and flagged (DVC metrics)"),
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "label_issues",
        lambda: run(
            load_params(args.params),
            data_dir=args.data,
            out_dir=args.out,
            metrics_path=args.metrics,
        ),
        params=args.params,
    )


if __name__ == "__main__":
    exit_process(main())
