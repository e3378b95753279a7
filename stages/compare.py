"""Compare two training runs side by side, from what MLflow recorded about them.

    python -m stages.compare                   # the champion against the latest other run
    python -m stages.compare two-epochs 5f3e…  # any two runs: DVC experiment names or run ids

Writes one self-contained HTML page (pictures embedded): the params that differ, metric
deltas, per-class deltas, the test images one model gets right and the other wrong, and
both training curves overlaid. Run it from the project root, after ``dvc repro``.
"""

from __future__ import annotations

import argparse
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

from stages import tracking
from stages.cli import PREPARED, run_stage
from stages.config import load_params
from stages.dataset import ImageSet, read_image_set
from stages.errors import StageError
from stages.serving import probabilities_of

log = logging.getLogger(__name__)

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
SHOWN_PER_GRID = 18
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


def _artifact_csv(client: Any, run_id: str, path: str) -> pd.DataFrame:
    import mlflow

    try:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path)
    except Exception:
        return pd.DataFrame()
    return pd.read_csv(local, dtype={"class": str}) if Path(local).is_file() else pd.DataFrame()


def _registered_model(client: Any, run_id: str) -> tuple[str, Any] | None:
    """The newest registered version made from ``run_id``, as (description, pyfunc)."""
    import mlflow

    versions = client.search_model_versions(f"run_id = '{run_id}'")
    if not versions:
        return None
    newest = max(versions, key=lambda v: int(v.version))
    aliases = "".join(f" @{alias}" for alias in newest.aliases)
    model = mlflow.pyfunc.load_model(f"models:/{newest.name}/{newest.version}")
    return f"{newest.name} v{newest.version}{aliases}", model


def load_run(client: Any, run_id: str, test: ImageSet | None) -> RunView:
    """Read one run's params, metrics, tables and model, and score it on ``test``."""
    run = client.get_run(run_id)
    label = run.info.run_name or run_id[:8]
    registered = _registered_model(client, run_id)
    predicted = None
    if registered is not None:
        label = f"{label} ({registered[0]})"
        if test is not None:
            try:
                predicted = probabilities_of(registered[1].predict(test.images)).argmax(axis=1)
            except Exception as error:
                log.warning("%s cannot score this test split: %s", label, error)
    return RunView(
        label=label,
        run_id=run_id,
        params=dict(run.data.params),
        metrics={k: v for k, v in run.data.metrics.items() if k.startswith("test_")},
        per_class=_artifact_csv(client, run_id, "evaluation/per_class.csv"),
        history=_artifact_csv(client, run_id, "history.csv"),
        predicted=predicted,
    )


def resolve_run_ids(
    client: Any, experiment_id: str, references: Sequence[str], model_name: str
) -> list[str]:
    """Two run ids: as named (run id or run name), else the champion's and the latest other."""
    runs = client.search_runs(
        [experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    if references:
        chosen = []
        for reference in references:
            if RUN_ID.match(reference):
                chosen.append(reference)
                continue
            named = [r.info.run_id for r in runs if r.info.run_name == reference]
            if not named:
                raise StageError(
                    f"no finished run named {reference!r} in experiment {experiment_id}"
                )
            chosen.append(named[0])
        return chosen
    champion = tracking.alias_run_id(model_name, "champion")
    others = [r.info.run_id for r in runs if r.info.run_id != champion]
    chosen = [champion, *others[:1]] if champion else others[:2]
    if len(chosen) < 2:
        raise StageError("need two finished runs to compare; run `dvc exp run` once more")
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
    from stages.plots import save

    buffer = io.BytesIO()
    save(figure, buffer)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _curves(a: RunView, b: RunView) -> Any:
    from stages.plots import plt

    figure, panes = plt.subplots(1, 2, figsize=(10, 4))
    for pane, metric in zip(panes, ("val_accuracy", "val_loss"), strict=True):
        for view, name in ((a, "A"), (b, "B")):
            if metric in view.history:
                pane.plot(
                    view.history["epoch"],
                    view.history[metric],
                    marker="o",
                    label=f"{name}: {view.label}",
                )
        pane.set(xlabel="epoch", title=metric.replace("_", " "))
        pane.grid(alpha=0.3)
        pane.legend(fontsize=7)
    figure.tight_layout()
    return figure


def build_report(a: RunView, b: RunView, test: ImageSet | None) -> tuple[str, dict[str, Any]]:
    """The HTML page and the numbers in it."""
    from stages.plots import image_grid_figure

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
    }
    if test is not None and a.predicted is not None and b.predicted is not None:
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
    parts += ["<h2>Training curves</h2>", _png(_curves(a, b))]
    page = PAGE.format(body="".join(parts))
    return page, numbers


def run(
    references: Sequence[str], model_name: str, data_dir: Path, out_path: Path
) -> dict[str, Any]:
    """Compare two runs of the current experiment and write the HTML report to ``out_path``."""
    import mlflow

    from stages.atomic import write_text

    experiment_id = tracking.connect()
    client = mlflow.MlflowClient()
    run_a, run_b = resolve_run_ids(client, experiment_id, references, model_name)
    test_dir = Path(data_dir) / "test"
    test = read_image_set(test_dir) if test_dir.is_dir() else None
    a, b = load_run(client, run_a, test), load_run(client, run_b, test)
    page, numbers = build_report(a, b, test)
    write_text(out_path, page)
    log.info("compared %s with %s: %s", a.label, b.label, out_path)
    return numbers


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m stages.compare",
        description="Compare two MLflow runs: params, metrics, per class, disagreements, curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "runs",
        nargs="*",
        help="two MLflow run ids or DVC experiment names "
        "(default: the champion's run and the latest other)",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (for export.model_name)",
    )
    parser.add_argument("--data", type=Path, default=Path(PREPARED[0]), help=PREPARED[1])
    parser.add_argument(
        "--out", type=Path, default=Path("reports/compare.html"), help="HTML report out"
    )
    args = parser.parse_args(argv)
    if len(args.runs) not in (0, 2):
        parser.error("give two runs, or none")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_stage(
        "compare",
        lambda: run(args.runs, load_params(args.params).export.model_name, args.data, args.out),
    )


if __name__ == "__main__":
    raise SystemExit(main())
