"""The performance targets against the latest results in ``benchmarks/results/``.

Reads the JSON that the other benchmarks wrote (``make bench`` runs them all, then this)
and writes ``benchmarks/results/summary.md``: one row per target with the measured
figure and whether it is met. A benchmark that has not been run shows as "not run".

    python -m benchmarks.summary
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import benchmarks

THROUGHPUT_TARGET = 1.3  # train stage against the plain Keras script, images/s
TIME_TO_99_TARGET = 0.5  # time to 99.0 % test accuracy, against the plain script
TRACKING_TARGET_PERCENT = 2.0
NO_OP_REPRO_TARGET_S = 1.0
INFERENCE_TARGET = 4.0  # fastest exported format against Keras predict, same batch
SMALL_MODEL_PARAMETERS = 100_000
SMALL_MODEL_ACCURACY = 0.996
PHOTO_ACCURACY = 0.85  # test accuracy on ../shared/data/catsdogs, from scratch
PHOTO_ECE = 0.05
AUGMENT_SLOWDOWN = 0.20  # train.augment: photo against an epoch without it

Row = tuple[str, str, bool | None]  # target, measured, met (None: the figure shows neither)


def _load(name: str) -> dict | None:
    path = benchmarks.RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _throughput(train: dict) -> Row:
    target = f"training throughput >= {THROUGHPUT_TARGET}x the plain Keras script"
    stage = train["variants"].get("stage", {})
    ratio = stage.get("throughput_vs_plain")
    if ratio is None:
        return target, "no stage and plain runs", None
    rounds = stage.get("throughput_vs_plain_by_round", [])
    spread = f" (rounds {min(rounds)}x to {max(rounds)}x)" if len(rounds) > 1 else ""
    accuracy = (
        f"; test accuracy {stage['test_accuracy']} against "
        f"{train['variants']['plain']['test_accuracy']}"
    )
    return target, f"{ratio}x{spread}{accuracy}", ratio >= THROUGHPUT_TARGET


def _time_to_99(train: dict) -> Row:
    target = f"time to 99.0 % test accuracy <= {TIME_TO_99_TARGET}x the plain script's"
    variants = train["variants"]
    plain = variants.get("plain")
    reached = {
        name: row["seconds_to_99"]
        for name, row in variants.items()
        if name != "plain" and row.get("seconds_to_99") is not None
    }
    if plain is None or not reached:
        return target, "no run reached 99.0 %", None if plain is None else False
    best = min(reached, key=reached.get)
    if plain["seconds_to_99"] is None:  # plain never got there: its whole run is a bound
        ratio = reached[best] / plain["training_seconds"]
        measured = (
            f"{best} {reached[best]} s; plain not there after {plain['training_seconds']} s "
            f"({plain['epochs']} epochs): < {ratio:.2f}x"
        )
        # A bound above the target shows nothing either way.
        return target, measured, True if ratio <= TIME_TO_99_TARGET else None
    ratio = reached[best] / plain["seconds_to_99"]
    measured = f"{best} {reached[best]} s against plain {plain['seconds_to_99']} s: {ratio:.2f}x"
    return target, measured, ratio <= TIME_TO_99_TARGET


def _tracking(train: dict) -> Row:
    target = f"MLflow tracking <= {TRACKING_TARGET_PERCENT} % of training time"
    share = train.get("tracking_share_percent")
    if share is None:
        return target, "no tracked stage run", None
    measured = f"{train['tracking_seconds']} s per run, {share} % of the stage's training time"
    return target, measured, share <= TRACKING_TARGET_PERCENT


def _no_op_repro(overhead: dict) -> Row:
    seconds = overhead["no_op_dvc_repro_s"]
    target = f"no-op `dvc repro` <= {NO_OP_REPRO_TARGET_S} s"
    return target, f"{seconds} s (median of {overhead['repeats']})", seconds <= NO_OP_REPRO_TARGET_S


def _inference(inference: dict) -> Row:
    target = f"batch inference >= {INFERENCE_TARGET}x Keras `predict`, fastest exported format"
    fastest = inference["fastest_exported_format"]
    measured = ", ".join(
        f"batch {batch}: {best['runner']} {best['ratio']}x" for batch, best in fastest.items()
    )
    return target, measured, any(best["ratio"] >= INFERENCE_TARGET for best in fastest.values())


def _parameters(run: dict) -> int:
    """The model's parameter count: recorded by benchmarks.mnist, else built to count."""
    if "parameters" not in run:
        from classifier.model.architectures import build_model

        run["parameters"] = build_model(run["architecture"], (28, 28, 1), 10).count_params()
    return run["parameters"]


def _photos(photos: dict) -> Row:
    target = f"from scratch on photos: >= {PHOTO_ACCURACY:.0%} test accuracy, ECE <= {PHOTO_ECE}"
    best = max(photos["results"], key=lambda run: run["accuracy"])
    low, high = best["accuracy_ci95"]
    measured = (
        f"{best['architecture']} at {best['size']}x{best['size']}: {best['accuracy']:.1%} "
        f"(95 % CI {low:.1%} to {high:.1%}), ECE {best['ece']:.3f}, "
        f"{best['train_minutes']:.1f} min"
    )
    return target, measured, best["accuracy"] >= PHOTO_ACCURACY and best["ece"] <= PHOTO_ECE


def _augment(augment: dict) -> Row:
    target = f"`train.augment: {augment['augment']}` slows an epoch by <= {AUGMENT_SLOWDOWN:.0%}"
    slowdowns = {run["size"]: run["slowdown"] for run in augment["results"]}
    measured = ", ".join(f"{size}x{size}: {value:.1%}" for size, value in slowdowns.items())
    return target, measured, max(slowdowns.values()) <= AUGMENT_SLOWDOWN


SMALL_MODEL_TARGET = (
    f"a model of <= {SMALL_MODEL_PARAMETERS:,} parameters at >= "
    f"{SMALL_MODEL_ACCURACY:.1%} MNIST test accuracy"
)


def _small_model() -> Row | None:
    """The most accurate benchmarks.mnist run within the parameter budget; None if none."""
    runs = [
        run
        for path in sorted(benchmarks.RESULTS_DIR.glob("mnist-*.json"))
        if _parameters(run := json.loads(path.read_text())) <= SMALL_MODEL_PARAMETERS
    ]
    if not runs:
        return None
    best = max(runs, key=lambda run: run["test_accuracy"])
    measured = (
        f"{best['architecture']} ({best['parameters']:,} parameters): "
        f"{best['test_accuracy']:.2%} after {best['epochs']} epochs"
    )
    return SMALL_MODEL_TARGET, measured, best["test_accuracy"] >= SMALL_MODEL_ACCURACY


CHECKS: tuple[tuple[str, Callable[[dict], Row]], ...] = (
    ("train", _throughput),
    ("train", _time_to_99),
    ("train", _tracking),
    ("overhead", _no_op_repro),
    ("inference", _inference),
    ("photos", _photos),
    ("augment", _augment),
)


VERDICTS = {True: "yes", False: "**no**", None: "not shown"}


def rows() -> list[tuple[str, str, str]]:
    """Every target with its latest measurement and verdict."""
    found = []
    for name, check in CHECKS:
        result = _load(name)
        if result is None:
            target = check.__name__.strip("_").replace("_", " ")
            found.append((target, f"`benchmarks/results/{name}.json` missing", "not run"))
        else:
            target, measured, met = check(result)
            found.append((target, measured, VERDICTS[met]))
    small = _small_model()
    if small is None:
        found.append((SMALL_MODEL_TARGET, "no small `mnist-*.json` result", "not run"))
    else:
        found.append((*small[:2], VERDICTS[small[2]]))
    return found


def markdown(found: list[tuple[str, str, str]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {target} | {measured} | {verdict} |" for target, measured, verdict in found]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m benchmarks.summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)
    table = markdown(rows())
    benchmarks.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (benchmarks.RESULTS_DIR / "summary.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
