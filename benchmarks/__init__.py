"""Benchmarks, run by hand or by `make bench`; every figure is a ratio against a baseline run
side by side in the same invocation, because these machines are shared and noisy.

One module per benchmark, each run as ``python -m benchmarks.<name>`` (``--help`` says what
it measures): ingest, mnist, train, photos, augment, inference, pyfunc, server, server_load,
overhead, insight, label_issues; then summary, which sets the performance targets against their
latest results.
"""

import contextlib
import json
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path

RESULTS_DIR = Path("benchmarks/results")


def write_results(name: str, summary: dict) -> Path:
    """Keep a benchmark's summary as benchmarks/results/<name>.json; return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def prepare_data(params, root: Path) -> Path:
    """Download and preprocess ``params``' data under ``root`` with the stages' own code;
    the prepared folder."""
    from stages import download, preprocess

    download.run(params.data, out_dir=root / "raw")
    preprocess.run(
        params.preprocess,
        raw_dir=root / "raw",
        out_dir=root / "prepared",
        metrics_path=root / "data.json",
        report_path=root / "data.md",
    )
    return root / "prepared"


def report(name: str, summary: dict) -> None:
    """Print a benchmark's summary and keep it as benchmarks/results/<name>.json."""
    print(write_results(name, summary).read_text(), end="")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub Markdown table; columns of figures right-aligned, the others left."""
    cells = [[str(cell) for cell in row] for row in rows]
    figures = [all(row[column][:1].isdigit() for row in cells) for column in range(len(header))]
    rule = "|" + "|".join("---:" if figure else "---" for figure in figures) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def package_versions(packages: Iterable[str]) -> dict[str, str]:
    """The installed version of each of ``packages`` that is installed."""
    found = {}
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found
