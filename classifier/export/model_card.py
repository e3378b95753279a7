"""The model card: one Markdown page per registered version, for the people who use it.

It says what the model is, the data it saw, how it was trained, how good it is (with
confidence intervals), which formats ship and how closely they agree, why it was or was
not promoted, where it came from (commit, DVC hashes, MLflow run), and its known limits.
Export writes it as a file, logs it to the training run, and registers the version with
it as its description, so it shows on the MLflow UI's model version page.

Everything in it is quoted from what the pipeline already recorded: the training run's
params, tags, times and dataset digests; preprocess's data metrics; evaluate's test
metrics and per-class table; export's formats report and promotion decision; dvc.lock.
A source that is missing (a stage run by hand, an old run) is said to be missing, never
guessed. Plain Markdown built here rather than a template: most of it is tables, which
pandas writes.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from classifier.stats import proportion_interval
from classifier.tracking import names

CARD_FILE = "model_card.md"
# Model version descriptions are VARCHAR(5000) in MLflow's SQL stores (PostgreSQL enforces
# it): a longer card is cut at a section and points to the whole one, a run artifact.
MAX_DESCRIPTION_CHARS = 5000
WORST_CLASSES = 3
TRAINING_PARAMS = (
    "train.architecture", "train.epochs", "train.batch_size", "train.learning_rate",
    "train.schedule", "train.augment", "train.weight_decay", "train.label_smoothing",
    "train.precision", "train.seed", "train.calibrate", "train.tta", "train.pretrained",
    "train.fine_tune_layers", "train.fine_tune_epochs",
)  # fmt: skip
DATA_PARAMS = (
    "data.source", "data.path", "preprocess.image_height", "preprocess.image_width",
    "preprocess.channels", "preprocess.resize", "preprocess.seed",
    "preprocess.near_duplicate_distance", "preprocess.drop_test_duplicates_from_train",
)  # fmt: skip
NOT_RECORDED = "not recorded"
CODE_PATHS = ("classifier/", "stages/", "tools/")
MODEL_OUT = "models/model.keras"


@dataclass(frozen=True)
class CardSources:
    """Files of earlier stages that the card quotes; a None or missing one is said so."""

    data_metrics: Path | None = None  # metrics/data.json (preprocess)
    evaluate_metrics: Path | None = None  # metrics/evaluate.json (evaluate)
    per_class: Path | None = None  # plots/evaluate/per_class.csv (evaluate)
    lock: Path | None = None  # dvc.lock


@dataclass(frozen=True)
class TrainingRun:
    """What the card needs of the MLflow training run, as plain values."""

    run_id: str
    run_name: str = ""
    experiment_id: str = ""
    start_ms: int | None = None
    end_ms: int | None = None
    params: Mapping[str, str] = field(default_factory=dict)
    tags: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    datasets: tuple[tuple[str, str, str], ...] = ()  # (name, digest, context)

    @classmethod
    def of(cls, run: Any) -> TrainingRun:
        """From an ``mlflow.entities.Run`` (reading its attributes only)."""
        inputs = getattr(run, "inputs", None)
        datasets = []
        for item in getattr(inputs, "dataset_inputs", None) or []:
            context = next((t.value for t in item.tags if t.key == "mlflow.data.context"), "")
            datasets.append((item.dataset.name, item.dataset.digest, context))
        return cls(
            run_id=run.info.run_id,
            run_name=run.info.run_name or "",
            experiment_id=run.info.experiment_id,
            start_ms=run.info.start_time,
            end_ms=run.info.end_time,
            params=dict(run.data.params),
            tags=dict(run.data.tags),
            metrics=dict(run.data.metrics),
            datasets=tuple(datasets),
        )


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, gathered by the export stage."""

    model_name: str
    alias: str | None  # champion, challenger, or None (no alias: see the decision's reason)
    architecture: str
    parameters: int
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    test_labels: np.ndarray
    test_predicted: np.ndarray
    formats: Mapping[str, Mapping[str, Any]]
    decision: Mapping[str, Any]
    run: TrainingRun
    sources: CardSources = CardSources()
    dvc_hashes: Mapping[str, str] = field(default_factory=dict)


def _read_json(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _read_csv(path: Path | None) -> pd.DataFrame | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        return pd.read_csv(path, dtype={"class": str})
    except (OSError, ValueError):
        return None


def _percent(value: float) -> str:
    return f"{100 * value:.1f} %"


def _interval(successes: int, trials: int) -> str:
    low, high = proportion_interval(successes, trials)
    return f"{_percent(successes / max(1, trials))} (95 % CI {_percent(low)} to {_percent(high)})"


def _table(rows: list[tuple], header: tuple[str, ...]) -> list[str]:
    """A Markdown table without padding (the description's 5,000 characters are few)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return [*lines, ""]


def _model_section(facts: CardFacts) -> list[str]:
    names = list(facts.class_names)
    shown = ", ".join(names if len(names) <= 20 else [*names[:20], "..."])
    height, width, channels = facts.input_shape
    kind = "grey" if channels == 1 else "RGB"
    return [
        "## What it is",
        "",
        f"`{facts.architecture}`, a Keras 3 image classifier of {facts.parameters:,} parameters. "
        f"It takes {height}x{width} {kind} images as uint8 pixels (0-255; it scales them "
        f"itself) and answers one of {len(names)} classes: {shown}.",
        "",
    ]


def _data_section(facts: CardFacts) -> list[str]:
    params, data = facts.run.params, _read_json(facts.sources.data_metrics)
    rows = [(key, params.get(key, NOT_RECORDED)) for key in DATA_PARAMS if key in params]
    lines = ["## The data it saw", "", *_table(rows, ("param", "value"))]
    if data is None:
        lines += ["Data metrics (metrics/data.json): not available.", ""]
    else:
        images, excluded = data.get("images", {}), data.get("excluded") or {}
        lines += [
            f"- Images: {images.get('train', '?')} train, {images.get('val', '?')} validation, "
            f"{images.get('test', '?')} test, in {data.get('classes', '?')} classes; "
            f"{data.get('skipped_files', 0)} source files skipped as unreadable.",
            f"- Duplicates: {data.get('duplicate_groups', 0)} groups of copies, each kept in one "
            f"split ({data.get('duplicates_across_splits', 0)} across splits); "
            f"{data.get('train_dropped_duplicating_test', 0)} training images dropped for "
            "duplicating a test image.",
            f"- exclude.yaml: {excluded.get('dropped', 0)} images dropped, "
            f"{excluded.get('relabelled', 0)} relabelled by a person.",
            "",
        ]
    if facts.run.datasets:
        digests = [(name, f"`{digest}`", context) for name, digest, context in facts.run.datasets]
        lines += _table(digests, ("dataset", "digest (MLflow)", "used for"))
    return lines


def _duration(run: TrainingRun) -> str:
    if run.start_ms is None or run.end_ms is None:
        return NOT_RECORDED
    return str(datetime.timedelta(seconds=round((run.end_ms - run.start_ms) / 1000)))


def _training_section(facts: CardFacts) -> list[str]:
    params, run = facts.run.params, facts.run
    rows = [(key, params[key]) for key in TRAINING_PARAMS if key in params]
    epochs = int(params.get("train.epochs", 0) or 0) + int(
        params.get("train.fine_tune_epochs", 0) or 0
    )
    val = names.current(run.metrics).get(names.VAL_ACCURACY)
    return [
        "## How it was trained",
        "",
        f"{epochs} epochs in {_duration(run)} (the MLflow run's wall time); last validation "
        f"accuracy {'?' if val is None else _percent(val)}.",
        "",
        *_table(rows, ("param", "value")),
    ]


def _worst_classes(per_class: pd.DataFrame | None) -> list[str]:
    if per_class is None or per_class.empty:
        return ["Per-class table (plots/evaluate/per_class.csv): not available.", ""]
    worst = per_class.sort_values(["f1", "class"]).head(WORST_CLASSES)
    rows = []
    for row in worst.to_dict("records"):
        support = int(row["support"])
        right = round(row["recall"] * support)
        rows.append((row["class"], f"{row['f1']:.3f}", _interval(right, support), str(support)))
    header = ("class", "F1", "recall", "test images")
    return [f"The {len(rows)} weakest classes (by F1):", "", *_table(rows, header)]


def _quality_section(facts: CardFacts) -> list[str]:
    labels, predicted = facts.test_labels, facts.test_predicted
    right, total = int((labels == predicted).sum()), len(labels)
    lines = [
        "## How good it is",
        "",
        f"Test accuracy: {_interval(right, total)} on {total} test images it never trained on.",
        "",
    ]
    scores = _read_json(facts.sources.evaluate_metrics)
    if scores is None:
        lines += ["Test metrics (metrics/evaluate.json): not available.", ""]
    else:
        keys = ("macro_f1", "macro_precision", "macro_recall", "top3_accuracy", "loss")
        rows = [(key, f"{scores[key]:.4f}") for key in keys if key in scores]
        lines += _table(rows, ("test metric", "value"))
        if "ece" in scores:
            lines += [
                f"Calibration: expected calibration error {scores['ece']:.4f} with the built-in "
                f"temperature {scores.get('temperature', 1.0):.3f} (without it: "
                f"{scores.get('ece_uncalibrated', float('nan')):.4f}).",
                "",
            ]
    lines += _worst_classes(_read_csv(facts.sources.per_class))
    return lines


def _formats_section(facts: CardFacts) -> list[str]:
    rows = []
    for name, figures in facts.formats.items():
        shipped = "yes" if figures.get("shipped") else f"no: {figures.get('reason', '')}"
        rows.append(
            (
                name,
                shipped,
                f"{figures.get('max_abs_diff', float('nan')):.2g}",
                _percent(figures.get("accuracy", float("nan"))),
                f"{figures.get('size_bytes', 0) / 1e6:.2f} MB",
            )
        )
    header = ("format", "shipped", "max probability diff vs Keras", "test accuracy", "size")
    return ["## Exported formats", "", *_table(rows, header)]


def _decision_section(facts: CardFacts) -> list[str]:
    reason = facts.decision.get("reason", "")
    if facts.alias is None:
        said = f"Registered under `{facts.model_name}` with **no alias**: {reason}."
    else:
        said = f"Registered as `{facts.model_name}@{facts.alias}`: {reason}."
    return ["## Promotion", "", said, ""]


def zero_f1_classes(facts: CardFacts) -> list[str]:
    """The classes the model never gets right on the test images (F1 = 0), in class order.

    A class with no test image is not counted: its F1 is undefined, not 0.
    """
    labels, predicted = np.asarray(facts.test_labels), np.asarray(facts.test_predicted)
    return [
        name
        for index, name in enumerate(facts.class_names)
        if np.any(labels == index) and not np.any((labels == index) & (predicted == index))
    ]


def warnings_of(facts: CardFacts) -> list[str]:
    """What a person must see before trusting the model, each as one sentence."""
    warnings = []
    if facts.alias is None:
        reason = str(facts.decision.get("reason", "")).removeprefix("no alias: ")
        warnings.append(f"No alias, so nothing serves this version by one: it is {reason}.")
    floor = facts.decision.get("floor") or {}
    if "value" in floor:
        right, total = (
            int((facts.test_labels == facts.test_predicted).sum()),
            len(facts.test_labels),
        )
        low, high = proportion_interval(right, total)
        if low <= floor["value"]:
            what = "always guessing the largest class" if floor.get("kind") == "auto" else "fixed"
            warnings.append(
                f"The test accuracy's 95 % interval ({_percent(low)} to {_percent(high)}) "
                f"reaches down to the accuracy floor, {_percent(floor['value'])} ({what}): "
                "this model may be no better than the floor."
            )
    zero = zero_f1_classes(facts)
    if zero and 2 * len(zero) >= len(facts.class_names):
        shown = ", ".join(zero if len(zero) <= 20 else [*zero[:20], "..."])
        warnings.append(
            f"{len(zero)} of {len(facts.class_names)} classes have F1 = 0 (no test image of "
            f"them is recognised): {shown}. The model is broken for most of what it answers."
        )
    return warnings


def _warnings_section(facts: CardFacts) -> list[str]:
    """The warnings, loud, at the top of the card; nothing when there is none."""
    return [line for warning in warnings_of(facts) for line in (f"> ⚠️ **WARNING: {warning}**", "")]


def _is_data_or_model(key: str) -> bool:
    """A train-stage hash of data or of the model (the code is pinned by the commit)."""
    path = key.removeprefix("dvc.train.").partition(".")[2]
    if path.startswith(CODE_PATHS) or path == "classifier":
        return False
    return key.startswith("dvc.train.dep.") or path == MODEL_OUT


def _lineage_section(facts: CardFacts) -> list[str]:
    run = facts.run
    commit = run.tags.get("mlflow.source.git.commit", NOT_RECORDED)
    rows = [
        ("MLflow run", f"`{run.run_id}` ({run.run_name}, experiment {run.experiment_id})"),
        ("git commit", f"`{commit}`"),
    ]
    if "dvc.exp_name" in run.tags:
        rows.append(("DVC experiment", run.tags["dvc.exp_name"]))
    hashes = facts.dvc_hashes or {k: v for k, v in run.tags.items() if k.startswith("dvc.train.")}
    hashes = {key: value for key, value in hashes.items() if _is_data_or_model(key)}
    rows += [
        (f"DVC md5 of {key.removeprefix('dvc.train.').partition('.')[2]}", f"`{value}`")
        for key, value in sorted(hashes.items())
    ]
    if not hashes:
        rows.append(("DVC hashes", "not recorded (a stage run outside dvc repro)"))
    return ["## Lineage", "", *_table(rows, ("what", "which"))]


def _limits_section(facts: CardFacts) -> list[str]:
    params = facts.run.params
    height, width, channels = facts.input_shape
    total = len(facts.test_labels)
    right = int((facts.test_labels == facts.test_predicted).sum())
    low, high = proportion_interval(right, total)
    limits = [
        f"It knows only these {len(facts.class_names)} classes and answers one of them for any "
        "image, including images of none of them.",
        f"It was trained and tested on `{params.get('data.source', NOT_RECORDED)}` images at "
        f"{height}x{width}x{channels}; other kinds of images (other sources, cameras, "
        "backgrounds) are untested, and its accuracy there is unknown.",
        f"The test set has {total} images: the accuracy's 95 % interval is "
        f"{100 * (high - low):.1f} percentage points wide.",
    ]
    unshipped = [name for name, figures in facts.formats.items() if not figures.get("shipped")]
    if unshipped:
        limits.append(f"Not shipped: {', '.join(unshipped)} (see Exported formats).")
    return ["## Known limits", "", *(f"- {limit}" for limit in limits), ""]


def build_card(facts: CardFacts) -> str:
    """The model card of ``facts`` as Markdown."""
    sections = [
        [f"# Model card: {facts.model_name} ({facts.architecture})", ""],
        _warnings_section(facts),
        _model_section(facts),
        _quality_section(facts),
        _data_section(facts),
        _training_section(facts),
        _formats_section(facts),
        _decision_section(facts),
        _lineage_section(facts),
        _limits_section(facts),
    ]
    return "\n".join(line for section in sections for line in section).rstrip() + "\n"


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().removeprefix("|").removesuffix("|").split(" | ")]


def tables_as_lists(markdown: str) -> str:
    """``markdown`` with each table (as :func:`_table` writes them) turned into a list.

    MLflow's UI renders a version's description with no table styles at all: no borders,
    no padding, so cells run together (``0.90692.3 % (95 % CI ...)26``). A list item a
    row reads the same anywhere: ``- train.epochs: 15`` for a two-column table, ``- **class
    9**: F1 0.885; recall 100.0 % (...); test images 27`` for a wider one.
    """
    lines, out, index = markdown.splitlines(), [], 0
    while index < len(lines):
        line = lines[index]
        is_table = (
            line.startswith("| ")
            and index + 1 < len(lines)
            and re.fullmatch(r"\|(---\|)+", lines[index + 1]) is not None
        )
        if not is_table:
            out.append(line)
            index += 1
            continue
        header = _cells(line)
        index += 2
        while index < len(lines) and lines[index].startswith("| "):
            row = _cells(lines[index])
            if len(header) == 2:
                out.append(f"- {row[0]}: {row[1]}")
            else:
                rest = "; ".join(
                    f"{name} {cell}" for name, cell in zip(header[1:], row[1:], strict=False)
                )
                out.append(f"- **{header[0]} {row[0]}**: {rest}")
            index += 1
    return "\n".join(out) + ("\n" if markdown.endswith("\n") else "")


def description_of(card: str, run_id: str) -> str:
    """The card as a model version description, its tables as lists (MLflow's UI draws
    tables without borders or padding): whole if it fits, else cut at a section."""
    card = tables_as_lists(card)
    if len(card) <= MAX_DESCRIPTION_CHARS:
        return card
    note = f"\n\n(Cut to fit; the whole card is `{CARD_FILE}` in MLflow run `{run_id}`.)\n"
    room = MAX_DESCRIPTION_CHARS - len(note)
    cut = card.rfind("\n## ", 0, room)
    return card[: cut if cut > 0 else room].rstrip() + note
