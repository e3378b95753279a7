"""The sweep report: one self-contained HTML page, and the same figures on the parent run.

Every trial's params, metric and state, each linked to its MLflow run by name; the best
trial; a parallel-coordinates view; the metric against each param; and, once three
trials have a result, each param's importance (Optuna's fANOVA evaluator: the share of
the metric's variance a random forest puts on the param). Figures are matplotlib images
embedded in the page, so it opens anywhere without a server or a network. Beside it,
``trials.csv`` holds the table for ``dvc plots show`` (docs/sweeps.md).
"""

from __future__ import annotations

import base64
import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from classifier.atomic import write_text
from classifier.sweeps.spec import SweepSpec
from classifier.sweeps.study import ATTR_ERROR, ATTR_INTERRUPTED, ATTR_RUN, ATTR_STATE
from classifier.tracking import names, runs

REPORT_FILE = "report.html"
TRIALS_FILE = "trials.csv"
FIGURES_DIR = "figures"
PARENT_ARTIFACTS = "sweep"
# Positive values spanning this factor or more are drawn on a log scale.
LOG_SPAN = 10


@dataclass(frozen=True)
class TrialRow:
    """One trial as the report shows it."""

    number: int
    name: str
    state: str  # COMPLETE, FAILED, KILLED
    params: dict[str, Any]
    value: float | None
    run_id: str | None
    error: str = ""
    interrupted: bool = False


def trial_rows(spec: SweepSpec, study: Any, children: dict[str, Any]) -> list[TrialRow]:
    """Every finished trial of ``study``, in order, with its MLflow run."""
    from optuna.trial import TrialState

    rows = []
    for trial in study.trials:
        if trial.state not in (TrialState.COMPLETE, TrialState.FAIL):
            continue
        name = trial.user_attrs.get("name") or f"{spec.name}-{trial.number + 1}"
        child = children.get(name)
        run_id = trial.user_attrs.get(ATTR_RUN) or (child.info.run_id if child else None)
        state = trial.user_attrs.get(ATTR_STATE) or (
            "COMPLETE" if trial.state == TrialState.COMPLETE else "FAILED"
        )
        rows.append(
            TrialRow(
                number=trial.number,
                name=name,
                state=state,
                params=dict(trial.params),
                value=trial.value if trial.state == TrialState.COMPLETE else None,
                run_id=run_id or None,
                error=trial.user_attrs.get(ATTR_ERROR, ""),
                interrupted=bool(trial.user_attrs.get(ATTR_INTERRUPTED)),
            )
        )
    return rows


def best_row(spec: SweepSpec, rows: list[TrialRow]) -> TrialRow | None:
    """The complete trial with the best metric (the first of equals)."""
    scored = [row for row in rows if row.value is not None]
    if not scored:
        return None
    sign = 1 if spec.direction == "minimize" else -1
    return min(scored, key=lambda row: (sign * row.value, row.number))


def _ordered(spec: SweepSpec, rows: list[TrialRow]) -> list[TrialRow]:
    """Best first; trials without a result last, in order."""
    sign = 1 if spec.direction == "minimize" else -1
    return sorted(rows, key=lambda r: (r.value is None, sign * (r.value or 0.0), r.number))


# --- figures --------------------------------------------------------------------------------


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _log_scale(spec: SweepSpec, key: str, values: list[Any]) -> bool:
    param = next((p for p in spec.params if p.key == key), None)
    if param is not None and param.log:
        return True
    positive = [v for v in values if _numeric([v]) and v > 0]
    return len(positive) == len(values) > 1 and max(positive) / min(positive) >= LOG_SPAN


def _axis(spec: SweepSpec, key: str, values: list[Any]) -> tuple[list[float], list[str], list]:
    """Positions in [0, 1] for ``values``, with tick labels and tick positions."""
    if not _numeric(values):
        levels = sorted({str(v) for v in values})
        span = max(len(levels) - 1, 1)
        positions = [levels.index(str(v)) / span for v in values]
        return positions, levels, [i / span for i in range(len(levels))]
    numbers = [math.log10(v) if _log_scale(spec, key, values) else float(v) for v in values]
    low, high = min(numbers), max(numbers)
    span = (high - low) or 1.0
    shown = sorted(set(values))
    ticks = [((math.log10(v) if _log_scale(spec, key, values) else v) - low) / span for v in shown]
    return [(n - low) / span for n in numbers], [f"{v:g}" for v in shown], ticks


def parallel_coordinates(spec: SweepSpec, rows: list[TrialRow]) -> Any:
    """One line per complete trial across every param's axis and the metric's, by colour."""
    from classifier.evaluation.plots import plt

    scored = [row for row in rows if row.value is not None]
    axes_keys = [*spec.keys, spec.metric_key]
    figure, axis = plt.subplots(figsize=(2.2 * len(axes_keys) + 1, 4.2))
    if not scored:
        axis.text(0.5, 0.5, "no complete trials yet", ha="center")
        return figure
    columns = [[row.params.get(key) for row in scored] for key in spec.keys]
    columns.append([row.value for row in scored])
    placed = [_axis(spec, key, column) for key, column in zip(axes_keys, columns, strict=True)]
    values = [row.value for row in scored]
    low, high = min(values), max(values)
    colours = plt.get_cmap("viridis_r" if spec.direction == "minimize" else "viridis")
    for index, row in enumerate(scored):
        shade = 0.5 if high == low else (row.value - low) / (high - low)
        ys = [positions[index] for positions, _, _ in placed]
        axis.plot(range(len(axes_keys)), ys, color=colours(shade), alpha=0.85, linewidth=1.6)
    for position, (_, labels, ticks) in enumerate(placed):
        axis.axvline(position, color="#999", linewidth=0.8)
        step = max(1, len(labels) // 8)
        for label, tick in list(zip(labels, ticks, strict=True))[::step]:
            axis.text(position + 0.03, tick, label, fontsize=7, va="center")
    axis.set_xticks(range(len(axes_keys)), axes_keys, fontsize=8)
    axis.set_yticks([])
    axis.set_xlim(-0.2, len(axes_keys) - 0.6)
    axis.set_title(f"{len(scored)} complete trials; colour: {spec.metric_key}", fontsize=9)
    figure.tight_layout()
    return figure


def metric_by_param(spec: SweepSpec, rows: list[TrialRow]) -> Any:
    """The metric against each param, one panel per param; the best trial circled."""
    from classifier.evaluation.plots import plt

    scored = [row for row in rows if row.value is not None]
    best = best_row(spec, rows)
    figure, axes = plt.subplots(
        1, len(spec.keys), figsize=(3.6 * len(spec.keys), 3.2), squeeze=False
    )
    for axis, key in zip(axes[0], spec.keys, strict=True):
        values = [row.params.get(key) for row in scored]
        if _numeric(values):
            xs = values
            if values and _log_scale(spec, key, values):
                axis.set_xscale("log")
        else:
            levels = sorted({str(v) for v in values})
            xs = [levels.index(str(v)) for v in values]
            axis.set_xticks(range(len(levels)), levels)
        axis.scatter(xs, [row.value for row in scored], color="tab:blue", zorder=2)
        if best is not None:
            x = best.params.get(key) if _numeric(values) else xs[scored.index(best)]
            axis.scatter([x], [best.value], s=160, facecolors="none", edgecolors="tab:red")
        axis.set_xlabel(key, fontsize=8)
        axis.set_ylabel(spec.metric_key, fontsize=8)
        axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def importance_figure(importances: dict[str, float]) -> Any:
    from classifier.evaluation.plots import plt

    keys = list(importances)[::-1]
    figure, axis = plt.subplots(figsize=(5, 0.5 * len(keys) + 1))
    axis.barh(keys, [importances[key] for key in keys], color="tab:green")
    axis.set_xlim(0, 1)
    axis.set_xlabel("share of the metric's variance (fANOVA)", fontsize=8)
    figure.tight_layout()
    return figure


def _png(figure: Any, path: Path) -> str:
    """Save ``figure`` to ``path``; return it as base64 for the page."""
    from classifier.evaluation.plots import plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --- the page -------------------------------------------------------------------------------

TEMPLATE = Path(__file__).with_name("report.html.jinja")


def _page() -> jinja2.Template:
    environment = jinja2.Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True)
    return environment.from_string(TEMPLATE.read_text(encoding="utf-8"))


def run_url(ui_url: str, experiment_id: str, run_id: str | None) -> str | None:
    if not run_id:
        return None
    return f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def write_trials_csv(spec: SweepSpec, rows: list[TrialRow], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["trial", "experiment", "state", *spec.keys, spec.metric_key, "run_id"])
    for row in rows:
        values = [row.params.get(key) for key in spec.keys]
        value = "" if row.value is None else repr(row.value)
        writer.writerow([row.number + 1, row.name, row.state, *values, value, row.run_id or ""])
    write_text(path, buffer.getvalue())


def write_report(
    spec: SweepSpec,
    folder: Path,
    rows: list[TrialRow],
    importances: dict[str, float] | None,
    experiment_id: str,
    parent_id: str,
    ui_url: str,
) -> Path:
    """Write ``report.html``, ``trials.csv`` and the figures into ``folder``; the page's path."""
    figures_dir = folder / FIGURES_DIR
    figures = {
        "parallel": _png(parallel_coordinates(spec, rows), figures_dir / "parallel.png"),
        "by_param": _png(metric_by_param(spec, rows), figures_dir / "metric_by_param.png"),
    }
    if importances:
        figures["importances"] = _png(
            importance_figure(importances), figures_dir / "importances.png"
        )
    best = best_row(spec, rows)
    trials = [
        {
            "row": row,
            "url": run_url(ui_url, experiment_id, row.run_id),
            "value": "" if row.value is None else f"{row.value:.6g}",
            "raw": "" if row.value is None else repr(row.value),
            "best": row is best,
        }
        for row in _ordered(spec, rows)
    ]
    page = _page().render(
        spec=spec,
        spec_path=spec.path.as_posix(),
        trials=trials,
        complete=sum(row.state == "COMPLETE" for row in rows),
        failed=sum(row.state == "FAILED" for row in rows),
        killed=sum(row.state == "KILLED" for row in rows),
        best=None
        if best is None
        else {
            "row": best,
            "value": f"{best.value:.6g}",
            "url": run_url(ui_url, experiment_id, best.run_id),
        },
        importances=importances,
        figures=figures,
        parent_url=f"{ui_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{parent_id}",
    )
    write_trials_csv(spec, rows, folder / TRIALS_FILE)
    path = folder / REPORT_FILE
    write_text(path, page)
    return path


def log_to_parent(spec: SweepSpec, folder: Path, report: Path, best: TrialRow | None) -> None:
    """The report, table and figures on the (active) parent run; the best trial as tags."""
    runs.log_artifact(report, PARENT_ARTIFACTS)
    runs.log_artifact(folder / TRIALS_FILE, PARENT_ARTIFACTS)
    runs.log_artifacts(folder / FIGURES_DIR, f"{PARENT_ARTIFACTS}/{FIGURES_DIR}")
    if best is None:
        return
    tags = {"sweep.best.trial": best.name, "sweep.best.run_id": best.run_id or ""}
    tags.update({f"sweep.best.{key}": str(value) for key, value in best.params.items()})
    runs.set_tags(tags)
    runs.log_metrics({names.sweep_metric(spec.metric_file, spec.metric_key): best.value})
