"""Benchmarks, run by hand or by `make bench`; every figure is a ratio against a baseline run
side by side in the same invocation, because these machines are shared and noisy."""

import json
from pathlib import Path

RESULTS_DIR = Path("benchmarks/results")


def report(name: str, summary: dict) -> None:
    """Print a benchmark's summary and keep it as benchmarks/results/<name>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2) + "\n"
    (RESULTS_DIR / f"{name}.json").write_text(text)
    print(text, end="")
