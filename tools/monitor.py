"""Compare the newest predictions of the served model with its training data: drift or not.

    python -m tools.monitor                      # the last serve.monitor_window predictions
    python -m tools.monitor --window 200 --since 2026-12-01T09:00

Reads the prediction log that ``make serve`` writes (``serve.log_dir``), keeps the newest
predictions of one model version (by default the version of the newest line), and
compares their class mix, confidences and OOD scores with the training data the version
was registered with (classifier/serving/monitor.py). Writes an HTML report
(``reports/monitor.html``), logs it to MLflow as a monitoring run linked to the version
(classifier/tracking/monitoring.py), and prints one line: drift or not, and why. Exit code
0 either way (3 with ``--fail-on-drift`` when there is drift), 1 on errors.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from classifier.atomic import write_text
from classifier.cli import exit_process, run_stage
from classifier.config import load_params
from classifier.errors import DataError
from classifier.serving import monitor, ood
from classifier.serving.prediction_log import LogFolderError, read_window
from classifier.serving.pyfunc import LABELS_ARTIFACT, SERVING_ARTIFACT, STATISTICS_ARTIFACT

log = logging.getLogger("tools.monitor")

DRIFT_EXIT_CODE = 3


def reference_of(name: str, version: int) -> monitor.Reference:
    """The training data's figures that registered version ``version`` of ``name`` carries."""
    from classifier.tracking import monitoring

    with tempfile.TemporaryDirectory() as scratch:
        artifacts = monitoring.served_artifacts(name, version, Path(scratch))
        if STATISTICS_ARTIFACT not in artifacts:
            raise DataError(
                f"{name} version {version} was registered without serving statistics (before "
                "the monitor existed); export a new version to monitor it"
            )
        class_names = json.loads(artifacts[LABELS_ARTIFACT].read_text())
        settings = json.loads(artifacts[SERVING_ARTIFACT].read_text())
        _, arrays = ood.load(artifacts[STATISTICS_ARTIFACT])
    return monitor.Reference(
        class_names,
        np.asarray(arrays["train_class_counts"]),
        np.asarray(arrays["reference_confidence"]),
        np.asarray(arrays["reference_ood_score"]) if settings.get("ood_score") else None,
        settings,
    )


def window_of(args: argparse.Namespace, log_dir: Path, size: int) -> list[dict]:
    """The newest ``size`` predictions of the version asked for (else of the newest line's)."""
    try:
        newest = read_window(log_dir, 1, model=args.model_name, version=args.version)
        if not newest:
            raise DataError(f"{log_dir}: no predictions of the model asked for in the log")
        name, version = newest[-1]["model"], int(newest[-1]["version"])
        window = read_window(log_dir, size, since=args.since, model=name, version=version)
    except LogFolderError as error:
        raise DataError(str(error)) from None
    if not window:
        raise DataError(
            f"{log_dir}: no predictions of {name} version {version} since "
            f"{args.since.isoformat()}; the newest is from {newest[-1]['time']}"
        )
    return window


def run(args: argparse.Namespace) -> monitor.Comparison:
    from classifier.tracking import monitoring

    params = load_params(args.params).serve
    log_dir = args.log_dir or Path(params.log_dir)
    records = window_of(args, log_dir, args.window or params.monitor_window)
    name, version = records[-1]["model"], int(records[-1]["version"])
    registered = monitoring.model_version(name, version)
    reference = reference_of(name, version)
    try:
        comparison = monitor.compare(records, reference, args.alpha or params.drift_alpha)
    except monitor.MonitorError as error:
        raise DataError(f"{log_dir}: {error}") from None
    write_text(args.out, monitor.render_html(comparison, reference, records))
    run_id = monitoring.log_monitoring_run(
        registered, comparison.metrics(), comparison.summary(), args.out, comparison.drift
    )
    flagged = [signal.name for signal in comparison.signals if signal.drift]
    print(
        f"{name} version {version}, {len(records)} predictions: "
        + (f"DRIFT in {', '.join(flagged)}" if flagged else "no drift")
        + f"; report {args.out}; MLflow run {run_id}"
    )
    return comparison


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.monitor",
        description="Compare the newest predictions in the prediction log with the training "
        "data of the model version that made them; report drift.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file")
    parser.add_argument("--log-dir", type=Path, help="prediction log (default: serve.log_dir)")
    parser.add_argument("--window", type=int, help="predictions (default: serve.monitor_window)")
    parser.add_argument("--alpha", type=float, help="test level (default: serve.drift_alpha)")
    parser.add_argument(
        "--since", type=datetime.datetime.fromisoformat, help="only predictions since (ISO time)"
    )
    parser.add_argument("--model-name", help="only this model's predictions")
    parser.add_argument("--version", type=int, help="only this version's predictions")
    parser.add_argument(
        "--out", type=Path, default=Path("reports/monitor.html"), help="HTML report out"
    )
    parser.add_argument(
        "--fail-on-drift", action="store_true", help=f"exit {DRIFT_EXIT_CODE} on drift"
    )
    args = parser.parse_args(argv)
    if args.since is not None and args.since.tzinfo is None:
        args.since = args.since.replace(tzinfo=datetime.UTC)  # the log's times are UTC
    if args.alpha is not None and not 0 < args.alpha < 1:
        parser.error(
            f"--alpha must be between 0 and 1 (a test level such as 0.01), got {args.alpha}"
        )
    if args.window is not None and args.window < monitor.MIN_WINDOW:
        parser.error(f"--window must be at least {monitor.MIN_WINDOW}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    outcome: list[monitor.Comparison] = []
    code = run_stage("monitor", lambda: outcome.append(run(args)))
    if code == 0 and args.fail_on_drift and outcome[0].drift:
        return DRIFT_EXIT_CODE
    return code


if __name__ == "__main__":
    exit_process(main())
