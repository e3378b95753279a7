"""Stage ``preprocess``: decode, resize and split the raw images; report on the data.

Splits are stratified by class and a pure function of ``preprocess.seed``, with each group
of duplicates in one split; what the prepared folder holds: classifier/data/prepare.py.
Beside it, the data report as DVC metrics and Markdown (classifier/data/report.py).
The images a person decided about in ``exclude.yaml`` are dropped or relabelled after the
split, so no other image changes split (classifier/data/exclude.py).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

from classifier.atomic import write_json, write_text
from classifier.cli import PREPARED, exit_process, run_stage, stage_parser
from classifier.config import PreprocessParams, load_params
from classifier.data.dataset import SPLITS, ImageSet
from classifier.data.exclude import EXCLUDE_FILE, apply_exclusions, read_exclusions
from classifier.data.prepare import ingest, make_splits, read_source, write_prepared
from classifier.data.report import build_report

log = logging.getLogger(__name__)


def run(
    cfg: PreprocessParams,
    *,
    raw_dir: Path,
    out_dir: Path,
    metrics_path: Path,
    report_path: Path,
    exclude_path: Path | None = None,
) -> dict[str, ImageSet]:
    """Decode, resize and split ``raw_dir`` into ``out_dir``; write the data report.

    ``exclude_path`` (exclude.yaml) lists images to drop or relabel, by content hash.
    """
    exclusions = read_exclusions(exclude_path) if exclude_path is not None else []
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.work-") as work:
        data = ingest(Path(raw_dir), cfg, Path(work))
        splits, duplicates = make_splits(data, cfg)
        splits, excluded = apply_exclusions(splits, exclusions)
        source = read_source(raw_dir)
        # Rows of a csv source's labels file that name no usable file are skipped files too.
        skipped = [*source.get("skipped_rows", []), *data.skipped]
        metrics, report = build_report(source, splits, duplicates, skipped, data.source_images)
        metrics["excluded"] = excluded
        report += (
            f"\n## Excluded by {EXCLUDE_FILE}\n\n{excluded['dropped']} images dropped, "
            f"{excluded['relabelled']} relabelled; {excluded['unmatched_entries']} entries "
            "matched no image.\n"
        )
        write_prepared(out_dir, splits)
    write_json(metrics_path, metrics)
    write_text(report_path, report)
    log.info(
        "wrote %s images of %dx%dx%d to %s (%d files skipped, %d duplicate groups, "
        "%d across splits)",
        " / ".join(f"{len(splits[s].labels)} {s}" for s in SPLITS),
        cfg.image_height,
        cfg.image_width,
        cfg.channels,
        out_dir,
        metrics["skipped_files"],
        metrics["duplicate_groups"],
        metrics["duplicates_across_splits"],
    )
    return splits


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_parser(
        "preprocess",
        "Decode, resize and split raw images (params: preprocess.*); report on them.",
        raw=("data/raw", "raw images (download's output)"),
        out=(PREPARED[0], "output folder"),
        metrics=("metrics/data.json", "data metrics out"),
        report=("reports/data.md", "Markdown data report out"),
        exclude=(EXCLUDE_FILE, "images to drop or relabel, by content hash (read only)"),
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "preprocess",
        lambda: run(
            load_params(args.params).preprocess,
            raw_dir=args.raw,
            out_dir=args.out,
            metrics_path=args.metrics,
            report_path=args.report,
            exclude_path=args.exclude,
        ),
        params=args.params,
    )


if __name__ == "__main__":
    exit_process(main())
