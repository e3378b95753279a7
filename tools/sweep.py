"""Sweep: many runs of the pipeline with different params, in parallel, compared.

    python -m tools.sweep sweeps/example.yaml             # run (or resume) the sweep
    python -m tools.sweep sweeps/example.yaml --promote   # its best trial through export

The spec (a small YAML file; docs/sweeps.md) names the params to vary, as a grid or an
Optuna search with a budget, the metric to optimise and the number of parallel workers.
Each trial is a DVC experiment ``<name>-<k>`` queued with ``dvc exp run --queue`` and run
by DVC's queue workers up to the stage that writes the metric (train or evaluate), and an
MLflow run under the sweep's parent run.
The report is written to ``sweeps/<name>/report.html`` and logged to the parent run.
Ctrl-C stops the sweep's trials; the same command resumes it without repeating a
finished trial. Run it from the project root.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from classifier.cli import exit_process, run_stage
from classifier.sweeps.runner import DEFAULT_UI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.sweep",
        description=(
            "Run a sweep: every trial a queued DVC experiment (up to the metric's stage) run by "
            "`dvc queue start -j WORKERS`, and an MLflow child run of the sweep's parent "
            "run; then an HTML report in sweeps/<name>/. Running it again resumes it. "
            "With --promote, apply the best trial (dvc exp apply) and run export, whose "
            "gate decides @champion or @challenger. See docs/sweeps.md."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("spec", type=Path, help="sweep spec, e.g. sweeps/example.yaml")
    parser.add_argument(
        "--promote",
        action="store_true",
        help="apply the finished sweep's best trial and run export (no new trials)",
    )
    parser.add_argument(
        "--ui-url",
        default=DEFAULT_UI,
        help="MLflow UI address the report links each trial's run to (make ui serves it)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lines: list[str] = []

    def sweep() -> None:
        from classifier.sweeps.runner import run_sweep

        result = run_sweep(args.spec, Path("."), args.ui_url)
        if result.best is not None:
            shown = " ".join(f"{k}={v}" for k, v in result.best.params.items())
            lines.append(
                f"best: {result.best.name} {result.spec.metric}={result.best.value:.6g} ({shown})"
            )
        lines.append(f"report: {result.report}")
        lines.append(f"promote it: python -m tools.sweep {args.spec} --promote")

    def promote() -> None:
        from classifier.sweeps.promote import promote_best

        done = promote_best(args.spec, Path("."))
        registered = done.registered
        alias = registered.get("alias")
        lines.append(
            f"{done.trial} ({done.metric}={done.value:.6g}): registered "
            f"{registered.get('name')} version {registered.get('version')} "
            f"{'with no alias' if alias is None else f'as @{alias}'}: "
            f"{done.decision.get('reason')}"
        )
        lines.append("commit it: git add params.yaml dvc.lock && git commit")

    code = run_stage("sweep", promote if args.promote else sweep)
    if code == 0:
        print("\n".join(lines))
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    exit_process(main())
