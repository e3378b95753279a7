"""Benchmarks, run by hand or by `make bench`; every figure is a ratio against a baseline run
side by side in the same invocation, because these machines are shared and noisy."""

import json
from pathlib import Path

RESULTS_DIR = Path("benchmarks/results")


def write_results(name: str, summary: dict) -> Path:
    """Keep a benchmark's summary as benchmarks/results/<name>.json; return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def report(name: str, summary: dict) -> None:
    """Print a benchmark's summary and keep it as benchmarks/results/<name>.json."""
    print(write_results(name, summary).read_text(), end="")
