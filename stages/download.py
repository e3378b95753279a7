"""Stage ``download``: bring the raw images named by ``data.source`` into ``data/raw``.

What each source is and the folder layouts it writes: classifier/data/sources.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from classifier.cli import exit_process, run_stage, stage_parser
from classifier.config import DataParams, load_params
from classifier.data.sources import fetch_source


def run(cfg: DataParams, *, out_dir: Path) -> dict[str, object]:
    """Fetch the configured source into ``out_dir`` atomically; return its description."""
    return fetch_source(cfg, out_dir)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_parser(
        "download",
        "Fetch the raw images chosen by data.* in params.yaml into one folder.",
        out=("data/raw", "output folder"),
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "download", lambda: run(load_params(args.params).data, out_dir=args.out), params=args.params
    )


if __name__ == "__main__":
    exit_process(main())
