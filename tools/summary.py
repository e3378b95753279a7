"""The block ``make run`` ends with: test accuracy with its interval, the registered version,
its alias and why, the model card, and where to look next (classifier/summary.py).

    python -m tools.summary            # after dvc repro, from the project root

It quotes what the stages last wrote, so on an up-to-date pipeline it summarises the
current state. Where dvc.lock is not committed it says what to commit and why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from classifier.cli import exit_process, run_stage
from classifier.summary import RunFiles, summary_block, uncommitted_lock


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return argparse.ArgumentParser(
        prog="python -m tools.summary",
        description="Summarise the pipeline's last run: result, registered version, where next.",
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    parse_args(argv)
    block: list[str] = []

    def body() -> None:
        block.append(summary_block(RunFiles(), lock=uncommitted_lock()))

    code = run_stage("summary", body)
    if block:
        print("\n" + block[0])
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    exit_process(main())
