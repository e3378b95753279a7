"""What the insight pictures (Grad-CAM, feature maps, filters) cost the evaluate stage.

Run in a project whose pipeline has run (after `make run`). Each round, in fresh
processes: the evaluate stage as DVC runs it (``python -m stages.evaluate``, outputs in a
scratch folder; it adds to the training run, as a rerun of evaluate would), timed whole;
and the insight pictures alone, computed and saved as the stage does, in a process that
has loaded the model and predicted the test split first, so that their first-call
tracing counts. The target: under 10 % of the stage's time. Medians of ``--repeats``.

    python -m benchmarks.insight
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks import package_versions, report
from classifier.config import load_params

NAME = "insight"
TARGET_SHARE = 0.10


def insight_seconds(model_path: Path, data_dir: Path, batch_size: int) -> float:
    """Seconds to compute and save every insight picture for the test split."""
    from classifier.data.dataset import read_image_set
    from classifier.evaluation import insight, plots
    from classifier.model.files import load_model

    test = read_image_set(data_dir / "test")
    model = load_model(str(model_path))
    probabilities = model.predict(test.images, batch_size=batch_size, verbose=0)
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        for name, figure in insight.insight_figures(model, test, probabilities).items():
            (Path(scratch) / name).parent.mkdir(parents=True, exist_ok=True)
            plots.save(figure, Path(scratch) / name)
        return time.perf_counter() - start


def evaluate_seconds(project: Path, scratch: Path) -> float:
    """Wall seconds of ``python -m stages.evaluate`` on the project, outputs in ``scratch``."""
    command = [
        sys.executable, "-m", "stages.evaluate", "--params", "params.yaml",
        "--metrics", str(scratch / "evaluate.json"), "--plots", str(scratch / "plots"),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, cwd=project, check=True, capture_output=True)
    return time.perf_counter() - start


def pictures_seconds(project: Path) -> float:
    """:func:`insight_seconds` in a fresh process."""
    command = [sys.executable, "-m", "benchmarks.insight", "--project", str(project), "--alone"]
    done = subprocess.run(command, cwd=project, check=True, capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.insight",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--project", type=Path, default=Path.cwd(), help="a project after make run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--alone", action="store_true", help="print insight_seconds only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    project = args.project.resolve()
    batch_size = load_params(project / "params.yaml").evaluate.batch_size
    if args.alone:
        print(
            insight_seconds(project / "models/model.keras", project / "data/prepared", batch_size)
        )
        return 0
    whole, pictures = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):
            whole.append(evaluate_seconds(project, Path(scratch)))
            pictures.append(pictures_seconds(project))
    share = statistics.median(pictures) / statistics.median(whole)
    summary = {
        "evaluate_stage_s": round(statistics.median(whole), 3),
        "insight_s": round(statistics.median(pictures), 3),
        "insight_share": round(share, 4),
        "target_share": TARGET_SHARE,
        "versions": package_versions(("keras", "tensorflow", "matplotlib")),
    }
    report(NAME, summary)
    return 0 if share < TARGET_SHARE else 1


if __name__ == "__main__":
    raise SystemExit(main())
