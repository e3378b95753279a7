"""Compare two training runs side by side, from what MLflow recorded about them.

    python -m tools.compare                   # the champion against the latest other run
    python -m tools.compare two-epochs 5f3e…  # any two runs: DVC experiment names or run ids

Writes one self-contained HTML page (classifier/evaluation/compare.py). Run it from the
project root, after ``dvc repro``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from classifier.cli import PREPARED, exit_process, run_stage
from classifier.config import load_params
from classifier.evaluation.compare import compare_runs


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.compare",
        description="Compare two MLflow runs: params, metrics, per class, disagreements, curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="*",
        help="two MLflow run ids or DVC experiment names "
        "(default: the champion's run and the latest other)",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (for export.model_name)",
    )
    parser.add_argument("--data", type=Path, default=Path(PREPARED[0]), help=PREPARED[1])
    parser.add_argument(
        "--out", type=Path, default=Path("reports/compare.html"), help="HTML report out"
    )
    args = parser.parse_args(argv)
    if len(args.runs) not in (0, 2):
        parser.error("give two runs, or none")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "compare",
        lambda: compare_runs(
            args.runs, load_params(args.params).export.model_name, args.data, args.out
        ),
    )


if __name__ == "__main__":
    exit_process(main())
