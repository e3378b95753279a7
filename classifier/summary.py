"""The block a run of the pipeline ends with: what came out, what was registered, where next.

``make run`` prints it after ``dvc repro`` (tools/summary.py), so it is the last thing on
the screen, after DVC's own hints, even when every stage was up to date. ``dvc repro`` and
``dvc exp run`` have no step after their stages, so export prints it as its last lines
there (dvc.yaml declares label_issues before train, so export is the last stage DVC
runs); DVC then adds its own few ("Updating lock file", "Ran experiment(s)"). Everything in it
is quoted from what the stages wrote (evaluate's and preprocess's metrics, export's
decision and registration record), never recomputed from a model.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

from classifier.errors import StageError
from classifier.stats import proportion_interval

# Set by ``make run``, which prints the block itself after dvc repro: export then does not.
AFTER_REPRO_ENV = "CLASSIFIER_SUMMARY_AFTER_REPRO"
UI_HOST = "127.0.0.1"
UI_PORT_ENV = "MLFLOW_PORT"  # the Makefile's knob for `make ui`
DEFAULT_UI_PORT = "5000"
WIDTH = 92
LABEL_WIDTH = 14
LOCK_FILE = "dvc.lock"
COMPARE_HINT = (
    "make compare: reports/compare.html, the champion's run beside the latest other; "
    "make exp: every experiment in one table"
)


@dataclass(frozen=True)
class RunFiles:
    """What the stages wrote that the summary quotes, at dvc.yaml's paths by default."""

    evaluate_metrics: Path = Path("metrics/evaluate.json")
    data_metrics: Path = Path("metrics/data.json")
    decision: Path = Path("metrics/promotion.json")
    registered: Path = Path("lineage/registered_model.json")
    card: Path = Path("reports/model_card.md")


def _read(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run the pipeline first (make run)") from None
    except (OSError, ValueError) as error:
        raise StageError(f"{path}: cannot be read as JSON: {error}") from None


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def _accuracy_line(evaluate: dict, data: dict) -> str:
    accuracy = float(evaluate["accuracy"])
    total = int(data.get("images", {}).get("test", 0))
    if not total:
        return f"{_percent(accuracy)} (test images: unknown, so no interval)"
    low, high = proportion_interval(round(accuracy * total), total)
    line = f"{_percent(accuracy)} (95 % CI {_percent(low)} to {_percent(high)}) on {total} images"
    if "macro_f1" in evaluate:
        line += f"; macro F1 {float(evaluate['macro_f1']):.3f}"
    return line


def ui_url(model_name: str, version: object) -> str:
    """The version's page in the MLflow UI that ``make ui`` serves (its model card is there)."""
    port = os.environ.get(UI_PORT_ENV, "").strip() or DEFAULT_UI_PORT
    return f"http://{UI_HOST}:{port}/#/models/{model_name}/versions/{version}"


def _row(label: str, text: str) -> list[str]:
    """``text`` wrapped beside its label; a path or URL longer than a line stays whole, so
    a person can copy it."""
    return textwrap.wrap(
        text,
        WIDTH,
        initial_indent=f"{label:<{LABEL_WIDTH}}",
        subsequent_indent=" " * LABEL_WIDTH,
        break_on_hyphens=False,
        break_long_words=False,
    )


def uncommitted_lock(root: Path = Path(".")) -> str | None:
    """``"new"`` if git's HEAD has no dvc.lock, ``"changed"`` if it differs from the work
    tree's, else None (also outside a git work tree)."""
    try:
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", LOCK_FILE],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    code = status.stdout[:2]
    if not code.strip():
        return None
    return "new" if code in ("??", "A ") else "changed"


# Long because it is the block, row by row, in the order a person reads it.
def summary_block(files: RunFiles = RunFiles(), *, lock: str | None = None) -> str:
    """The block, from the files the stages wrote; with ``lock`` (what uncommitted_lock
    says), what to commit and why."""
    evaluate = _read(files.evaluate_metrics)
    registered = _read(files.registered)
    decision = _read(files.decision)
    data = _read(files.data_metrics) if Path(files.data_metrics).is_file() else {}
    name, version = registered["name"], registered["version"]
    alias = registered.get("alias")
    title = f"{name} version {version}: " + (f"@{alias}" if alias else "no alias")
    rows = [
        f"── {title} " + "─" * max(3, WIDTH - len(title) - 4),
        *_row("test accuracy", _accuracy_line(evaluate, data)),
        *_row("why", str(decision.get("reason") or registered.get("decision", {}).get("reason"))),
        *_row("model card", str(files.card)),
        *_row("MLflow", f"make ui, then {ui_url(name, version)}"),
        *_row("compare", COMPARE_HINT),
    ]
    if lock == "new":
        rows += _row(
            "commit",
            f"git add {LOCK_FILE} && git commit -m 'Run the pipeline': {LOCK_FILE} records "
            "this run's results; committed, they are the baseline that `dvc exp show` lists "
            "(until then its row is all `!`) and experiments compare with",
        )
    elif lock == "changed":
        rows += _row(
            "commit",
            f"{LOCK_FILE} differs from the last commit: commit it, with the params and code "
            "it ran, to keep this run as the baseline `dvc exp show` compares experiments with",
        )
    rows.append("─" * WIDTH)
    return "\n".join(rows)


def stage_end_block(files: RunFiles) -> str | None:
    """The block export ends with; None under ``make run``, which prints it after dvc repro."""
    if os.environ.get(AFTER_REPRO_ENV):
        return None
    return summary_block(files)
