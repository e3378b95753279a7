"""Stage ``export``: ship the trained model in every format, register it, promote it if better.

The model is written as a TensorFlow SavedModel (what TF Serving loads), TFLite float32,
TFLite int8 (full-integer quantised, calibrated on training images) and ONNX, and each
format must give the Keras model's answers on the test split: probabilities within
1e-5 for the float formats, accuracy within 0.5 points for int8 (stages/formats.py).
Sizes and parity go to a DVC metrics file and the training run; a failing format fails
the stage before anything is registered.

The registered model is an MLflow pyfunc that takes images as people have them
(stages/serving.py), built from code, with the labels file inside.

The new model and the registered model's current ``@champion`` are scored on the same
test split. The new version becomes ``@champion`` only if its accuracy clears
``export.accuracy_floor`` and beats the champion's by at least ``export.promotion_margin``
(the first model to clear the floor becomes champion); otherwise it is registered as
``@challenger`` and the champion stays. The decision, with both scores and the reason,
goes to a DVC metrics file, to tags on the model version and the run, and to the
registration record. Registration is the last step: a failure before it registers
nothing and never moves the champion.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stages import formats, tracking
from stages.atomic import atomic_path, write_json
from stages.cli import MODEL, PREPARED, RUN_INFO, run_stage, stage_parser
from stages.config import ExportParams, load_params
from stages.dataset import CLASSES_FILE, ImageSet, read_image_set
from stages.errors import StageError
from stages.evaluate import score
from stages.images import ResizePolicy
from stages.serving import png_frame, probabilities_of

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
INPUT_EXAMPLE_SIZE = 4
PREDICT_BATCH_SIZE = 256
# Training images that calibrate the int8 model's quantisation ranges.
REPRESENTATIVE_IMAGES = 300
FORMATS_ARTIFACT_DIR = "formats"
FORMAT_METRICS = ("size_bytes", "max_abs_diff", "accuracy", "accuracy_drop")


@dataclass(frozen=True)
class Decision:
    """Whether the new model becomes champion, and why."""

    promoted: bool
    reason: str

    @property
    def alias(self) -> str:
        return CHAMPION if self.promoted else CHALLENGER


def decide(
    candidate: float, champion: float | None, cfg: ExportParams, champion_version: int | None
) -> Decision:
    """The promotion rule: clear the floor, then beat the champion by the margin."""
    if candidate < cfg.accuracy_floor:
        return Decision(
            False, f"test accuracy {candidate:.4f} is below the floor {cfg.accuracy_floor}"
        )
    if champion is None:
        return Decision(True, f"first model to clear the floor {cfg.accuracy_floor}")
    gain = candidate - champion
    versus = f"champion version {champion_version} ({champion:.4f}) by {gain:+.4f}"
    if gain >= cfg.promotion_margin:
        return Decision(True, f"beats {versus}, at least the margin {cfg.promotion_margin}")
    return Decision(False, f"does not beat {versus}; the margin is {cfg.promotion_margin}")


def export_formats(
    model_path: Path,
    data_dir: Path,
    test: ImageSet,
    reference: np.ndarray,
    out_dir: Path,
    int8_max_drop: float = formats.INT8_MAX_ACCURACY_DROP,
) -> dict[str, dict[str, float]]:
    """Write every format into ``out_dir`` and check each on ``test`` against ``reference``.

    ``reference`` is the Keras model's probabilities for the test images. Returns each
    format's size, largest probability difference and accuracy; raises
    :class:`formats.ParityError` if any format gives different answers.
    """
    train = read_image_set(Path(data_dir) / "train")
    representative = train.images[
        np.random.default_rng(0).permutation(len(train.images))[:REPRESENTATIVE_IMAGES]
    ]
    paths = formats.export_formats(model_path, representative, out_dir)
    runners = {name: formats.load_runner(name, path) for name, path in paths.items()}
    report = formats.check_parity(
        reference, runners, test.images, test.labels, int8_max_drop=int8_max_drop
    )
    for name, size in formats.format_sizes(paths).items():
        report[name]["size_bytes"] = size
    formats.assert_parity(report)
    return report


def run(
    cfg: ExportParams,
    resize: ResizePolicy,
    data_dir: Path,
    model_path: Path,
    run_info_path: Path,
    formats_dir: Path,
    formats_path: Path,
    registered_path: Path,
    decision_path: Path,
) -> dict[str, object]:
    """Export and check every format, score, decide, register, and write the records.

    Nothing is registered, and no output written, unless every format passes its parity
    check and registration succeeds.
    """
    from stages.model import load_model

    run_id = tracking.read_run_id(run_info_path)
    test = read_image_set(Path(data_dir) / "test")
    model = load_model(str(model_path))
    reference = model.predict(test.images, PREDICT_BATCH_SIZE, verbose=0)
    candidate = score(reference, test.labels)
    with tracking.resumed_run(run_id), atomic_path(formats_dir, directory=True) as staged:
        report = export_formats(
            model_path, data_dir, test, reference, staged, cfg.int8_max_accuracy_drop
        )
        tracking.log_metrics(
            {
                f"format.{name}.{key}": value
                for name, figures in report.items()
                for key, value in figures.items()
                if key in FORMAT_METRICS
            }
        )
        tracking.log_artifacts(staged, FORMATS_ARTIFACT_DIR)
        champion_version = champion_accuracy = None
        champion = tracking.aliased_model(cfg.model_name, CHAMPION)
        if champion is not None:
            champion_version, champion_model = champion
            try:
                probabilities = probabilities_of(champion_model.predict(test.images))
            except Exception as error:
                raise StageError(
                    f"the champion, {cfg.model_name} version {champion_version}, cannot score "
                    f"this test set ({str(error).splitlines()[0]}); for a different kind of "
                    "data, register under another export.model_name"
                ) from None
            champion_accuracy = score(probabilities, test.labels)["accuracy"]
        decision = decide(candidate["accuracy"], champion_accuracy, cfg, champion_version)
        tags = {
            "promotion.decision": decision.alias,
            "promotion.reason": decision.reason,
            "promotion.candidate_accuracy": f"{candidate['accuracy']:.6f}",
            "promotion.champion_accuracy": ""
            if champion_accuracy is None
            else f"{champion_accuracy:.6f}",
            "promotion.champion_version": "" if champion_version is None else str(champion_version),
        }
        registered = tracking.register_model(
            model_path,
            Path(data_dir) / CLASSES_FILE,
            resize,
            cfg.model_name,
            decision.alias,
            png_frame(test.images[:INPUT_EXAMPLE_SIZE]),
            tags,
        )
    write_json(formats_path, report)
    summary = {
        "promoted": decision.promoted,
        "candidate_accuracy": candidate["accuracy"],
        "champion_accuracy": champion_accuracy,
        "champion_version": champion_version,
    }
    write_json(decision_path, summary)
    record = {**registered, "decision": {**summary, "reason": decision.reason}}
    write_json(registered_path, record)
    log.info(
        "%s version %s is @%s: %s",
        cfg.model_name,
        registered["version"],
        decision.alias,
        decision.reason,
    )
    return record


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_parser(
        "export",
        "Register the trained model; promote it to @champion only if it beats the current one "
        "(params: export.*).",
        data=PREPARED,
        model=MODEL,
        run_info=RUN_INFO,
        formats=("models/formats", "exported formats out (SavedModel, TFLite, ONNX)"),
        format_metrics=("metrics/formats.json", "size and parity of each format (DVC metrics)"),
        out=("lineage/registered_model.json", "registration record out"),
        decision=("metrics/promotion.json", "promotion decision out (DVC metrics)"),
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> None:
        params = load_params(args.params)
        run(
            params.export,
            params.preprocess.resize,
            args.data,
            args.model,
            args.run_info,
            args.formats,
            args.format_metrics,
            args.out,
            args.decision,
        )

    return run_stage("export", body)


if __name__ == "__main__":
    raise SystemExit(main())
