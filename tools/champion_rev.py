"""Print the git revision that holds the champion's results, for DVC's diff commands.

    dvc plots diff $(python -m tools.champion_rev)     # or: make plots-diff
    dvc metrics diff $(python -m tools.champion_rev)

Prints a DVC experiment name or a commit (classifier/tracking/revision.py says how it is
found). Run it from the project root.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from classifier.cli import exit_process, run_stage
from classifier.config import load_params
from classifier.tracking.revision import champion_rev


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.champion_rev",
        description="Print the DVC experiment or commit that holds the champion's results.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (for export.model_name)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "champion_rev",
        lambda: print(champion_rev(load_params(args.params).export.model_name)),
    )


if __name__ == "__main__":
    exit_process(main())
