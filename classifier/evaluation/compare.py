"""Compare two training runs side by side, from what MLflow recorded about them.

One self-contained HTML page (pictures embedded): the params that differ, metric deltas,
per-class deltas, the paired test of the two models on the same test images (McNemar's
exact test, as promotion runs it: classifier/export/promotion.py), the test images one
model gets right and the other wrong, and both runs' training curves (training and
validation loss and accuracy per epoch) overlaid. Runs are read through
classifier.tracking; the curves come from each run's ``history.csv`` artifact (Keras's
column names, mapped from MLflow's by classifier/tracking/names.py).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from classifier.atomic import write_text
from classifier.data.dataset import ImageSet, read_image_set
from classifier.errors import StageError
from classifier.evaluation.plots import image_grid_figure, plt, save
from classifier.export.promotion import CONFIDENCE, Paired, compare_paired
from classifier.serving.pyfunc import probabilities_of
from classifier.tracking import names, registry, runs, store

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
SHOWN_PER_GRID = 18
ALPHA = 1 - CONFIDENCE  # the paired test's level: 5 %, as the interval's 95 %
# The curves: one pane per measure, training dashed and validation solid, a colour per run.
CURVES = {
    "loss": (names.TRAIN_LOSS, names.VAL_LOSS),
    "accuracy": (names.epoch_metric("accuracy"), names.epoch_metric("val_accuracy")),
}
MAX_CANDIDATES_LISTED = 10
PAGE = (
    "<!doctype html><html><head><meta charset='utf-8'><title>Run comparison</title><style>"
    "body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}"
    "table{{border-collapse:collapse}}td,th{{padding:2px 10px;text-align:right}}"
    "img{{max-width:100%}}</style></head><body>{body}</body></html>"
)


@dataclass
class RunView:
    """What the report needs of one run."""

    label: str
    run_id: str
    params: dict[str, str]
    metrics: dict[str, float]
    per_class: pd.DataFrame
    history: pd.DataFrame
    predicted: np.ndarray | None  # on the compared test split; None if no model was registered


def load_run(run_id: str, test: ImageSet | None) -> RunView:
    """Read one run's params, metrics, tables and model, and score it on ``test``."""
    run = runs.get_run(run_id)
    label = run.info.run_name or run_id[:8]
    registered = registry.newest_version_of_run(run_id)
    predicted = None
    if registered is not None:
        label = f"{label} ({registered[0]})"
        if test is not None:
            try:
                predicted = probabilities_of(registered[1].predict(test.images)).argmax(axis=1)
            except Exception as error:  # another kind of data: compared on numbers alone
                log.warning("%s cannot score this test split: %s", label, error)
    return RunView(
        label=label,
        run_id=run_id,
        params=dict(run.data.params),
        metrics=names.section(run.data.metrics, names.TEST),  # old runs' test_* too
        per_class=runs.artifact_table(run_id, "evaluation/per_class.csv"),
        history=runs.artifact_table(run_id, "history.csv"),
        predicted=predicted,
    )


def _named_run(finished: Sequence[Any], reference: str, experiment: str) -> str:
    """The one finished run called ``reference``; an error listing them if there are more."""
    named = [run for run in finished if run.info.run_name == reference]
    if not named:
        raise StageError(f"no finished run named {reference!r} in experiment {experiment}")
    if len(named) > 1:
        listed = ", ".join(
            f"{run.info.run_id} ({_started(run)})" for run in named[:MAX_CANDIDATES_LISTED]
        )
        raise StageError(
            f"{len(named)} finished runs are named {reference!r}; give a run id instead: {listed}"
        )
    return named[0].info.run_id


def _started(run: Any) -> str:
    import datetime

    started = datetime.datetime.fromtimestamp(run.info.start_time / 1000, datetime.UTC)
    return started.strftime("%Y-%m-%d %H:%M:%S UTC")


def resolve_run_ids(references: Sequence[str], model_name: str) -> list[str]:
    """Two run ids: as named (run id or run name), else the champion's and the latest other.

    A run id must exist; a name must be the name of exactly one finished run.
    """
    experiment_id = store.connect()
    finished = runs.finished_runs(experiment_id)
    experiment = store.experiment_name()
    if references:
        chosen = [
            runs.get_run(ref).info.run_id
            if RUN_ID.match(ref)
            else _named_run(finished, ref, experiment)
            for ref in references
        ]
        if chosen[0] == chosen[1]:
            raise StageError(
                f"{references[0]} and {references[1]} are the same run ({chosen[0]}); "
                "name two different runs"
            )
        return chosen
    champion = registry.alias_run_id(model_name, "champion")
    others = [r.info.run_id for r in finished if r.info.run_id != champion]
    chosen = [champion, *others[:1]] if champion else others[:2]
    if len(chosen) < 2:
        raise StageError("need two finished runs to compare; run `dvc exp run` once more")
    if not champion:
        log.warning(
            "%s has no @champion: comparing the two latest finished runs, %s and %s",
            model_name,
            *chosen,
        )
    return chosen


def param_differences(a: RunView, b: RunView) -> pd.DataFrame:
    keys = sorted(set(a.params) | set(b.params))
    rows = [
        (k, a.params.get(k, "-"), b.params.get(k, "-"))
        for k in keys
        if a.params.get(k) != b.params.get(k)
    ]
    return pd.DataFrame(rows, columns=["param", "A", "B"])


def metric_deltas(a: RunView, b: RunView) -> pd.DataFrame:
    keys = sorted(set(a.metrics) & set(b.metrics))
    frame = pd.DataFrame(
        {"metric": keys, "A": [a.metrics[k] for k in keys], "B": [b.metrics[k] for k in keys]}
    )
    frame["B - A"] = frame["B"] - frame["A"]
    return frame


def per_class_deltas(a: RunView, b: RunView) -> pd.DataFrame:
    if a.per_class.empty or b.per_class.empty:
        return pd.DataFrame()
    merged = a.per_class.merge(b.per_class, on="class", suffixes=(" A", " B"))
    for metric in ("precision", "recall", "f1"):
        merged[f"{metric} B - A"] = merged[f"{metric} B"] - merged[f"{metric} A"]
    return merged[["class", "f1 A", "f1 B", "f1 B - A", "precision B - A", "recall B - A"]]


def disagreements(a: RunView, b: RunView, test: ImageSet) -> dict[str, np.ndarray]:
    """Test images that exactly one of the two models classifies correctly."""
    right_a, right_b = a.predicted == test.labels, b.predicted == test.labels
    return {
        "A right, B wrong": np.flatnonzero(right_a & ~right_b),
        "B right, A wrong": np.flatnonzero(right_b & ~right_a),
    }


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    save(figure, buffer)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def paired_test(a: RunView, b: RunView, test: ImageSet) -> Paired:
    """McNemar's exact test of B against A on the same test images, and the 95 % interval
    of B's accuracy minus A's (promotion's, with B as the challenger)."""
    return compare_paired(b.predicted == test.labels, a.predicted == test.labels)


def describe_paired(paired: Paired) -> str:
    """The paired test in words, as HTML."""
    if paired.challenger_only + paired.champion_only == 0:
        return (
            f"<p>Both models get the same {paired.images} test images right: "
            "no difference to test.</p>"
        )
    verdict = (
        f"the difference is <b>significant</b> at the {ALPHA:.0%} level: "
        f"<b>{'B' if paired.difference > 0 else 'A'}</b> is the better model on this test set"
        if paired.p_two_sided < ALPHA
        else f"the difference is <b>not significant</b> at the {ALPHA:.0%} level: "
        "it could be chance"
    )
    return (
        f"<p>On the same {paired.images} test images, B gets <b>{paired.challenger_only}</b> "
        f"right that A gets wrong, and A gets <b>{paired.champion_only}</b> right that B gets "
        "wrong; on the others they agree.</p>"
        f"<p>B's accuracy minus A's: <b>{100 * paired.difference:+.1f} points</b> "
        f"({CONFIDENCE:.0%} interval {100 * paired.ci_low:+.1f} to "
        f"{100 * paired.ci_high:+.1f}).</p>"
        "<p>McNemar's exact test: were the two models equally good, each of those "
        f"{paired.challenger_only + paired.champion_only} images would be as likely to go "
        "either way, and a split at least this uneven would happen with probability "
        f"p = {paired.p_two_sided:.3g} (two-sided). So {verdict}.</p>"
    )


def training_curves(a: RunView, b: RunView) -> Any:
    """Training (dashed) and validation (solid) loss and accuracy per epoch, both runs."""
    figure, panes = plt.subplots(1, 2, figsize=(11, 4.2))
    for pane, (measure, metrics) in zip(panes, CURVES.items(), strict=True):
        for (view, name), colour in zip(((a, "A"), (b, "B")), ("C0", "C1"), strict=True):
            for metric, style in zip(metrics, ("--", "-"), strict=True):
                column = names.keras_name(metric)
                if column in view.history:
                    pane.plot(
                        view.history["epoch"],
                        view.history[column],
                        style,
                        color=colour,
                        marker="o",
                        markersize=3,
                        label=f"{name} {metric.split('/')[0]}: {view.label}",
                    )
        pane.set(xlabel="epoch", ylabel=measure, title=f"{measure.capitalize()} per epoch")
        pane.grid(alpha=0.3)
        pane.legend(fontsize=7)
    figure.tight_layout()
    return figure


def build_report(a: RunView, b: RunView, test: ImageSet | None) -> tuple[str, dict[str, Any]]:
    """The HTML page and the numbers in it."""
    table = lambda frame: frame.to_html(index=False, float_format=lambda v: f"{v:.4f}", border=0)  # noqa: E731
    parts = [
        "<h1>Comparing two runs</h1>",
        f"<p><b>A</b>: {html.escape(a.label)} <code>{a.run_id}</code><br>"
        f"<b>B</b>: {html.escape(b.label)} <code>{b.run_id}</code></p>",
    ]
    params, metrics, classes = param_differences(a, b), metric_deltas(a, b), per_class_deltas(a, b)
    parts += ["<h2>Params that differ</h2>", table(params) if len(params) else "<p>None.</p>"]
    parts += ["<h2>Test metrics</h2>", table(metrics)]
    if len(classes):
        parts += ["<h2>Per class</h2>", table(classes)]
    numbers: dict[str, Any] = {
        "params": params,
        "metrics": metrics,
        "per_class": classes,
        "disagreements": {},
        "paired": None,
    }
    if test is not None and a.predicted is not None and b.predicted is not None:
        paired = numbers["paired"] = paired_test(a, b, test)
        parts += ["<h2>Is B better than A? The paired test</h2>", describe_paired(paired)]
        parts.append("<h2>Where they disagree (test split)</h2>")
        for title, indices in disagreements(a, b, test).items():
            numbers["disagreements"][title] = indices
            shown = indices[:SHOWN_PER_GRID]
            names = test.class_names
            captions = [
                f"#{i} {names[truth]}: A {names[by_a]}, B {names[by_b]}"
                for i, truth, by_a, by_b in zip(
                    shown, test.labels[shown], a.predicted[shown], b.predicted[shown], strict=True
                )
            ]
            figure = image_grid_figure(
                test.images[shown], captions, f"{title}: {len(indices)} images"
            )
            parts += [f"<h3>{title}: {len(indices)}</h3>", _png(figure)]
    parts += [
        "<h2>Training curves</h2>",
        "<p>Dashed: training; solid: validation. Blue: A; orange: B.</p>",
        _png(training_curves(a, b)),
    ]
    page = PAGE.format(body="".join(parts))
    return page, numbers


def compare_runs(
    references: Sequence[str], model_name: str, data_dir: Path, out_path: Path
) -> dict[str, Any]:
    """Compare two runs of the current experiment and write the HTML report to ``out_path``."""
    run_a, run_b = resolve_run_ids(references, model_name)
    test_dir = Path(data_dir) / "test"
    test = read_image_set(test_dir) if test_dir.is_dir() else None
    a, b = load_run(run_a, test), load_run(run_b, test)
    page, numbers = build_report(a, b, test)
    write_text(out_path, page)
    log.info("compared %s with %s: %s", a.label, b.label, out_path)
    return numbers
