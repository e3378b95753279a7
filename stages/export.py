"""Stage ``export``: ship the trained model in every format, register it, promote it if better.

The model is written as a TensorFlow SavedModel, TFLite float32, TFLite int8 and ONNX,
and each format must give the Keras model's answers on the test split
(classifier/export/formats.py). Sizes and parity go to a DVC metrics file and the
training run; a failing format fails the stage before anything is registered.

The registered model is an MLflow pyfunc that takes images as people have them
(classifier/serving/), built from code, with the labels file inside. Whether it becomes
``@champion`` or ``@challenger`` is decided by classifier/export/promotion.py; the
decision, with both scores and the reason, goes to a DVC metrics file, to tags on the
model version and the run, and to the registration record. Registration is the last
step: a failure before it registers nothing and never moves the champion.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from classifier.atomic import atomic_path, write_json
from classifier.cli import MODEL, PREPARED, RUN_INFO, run_stage, stage_parser
from classifier.config import ExportParams, load_params
from classifier.data.dataset import CLASSES_FILE, ImageSet, read_image_set
from classifier.data.images import ResizePolicy
from classifier.errors import StageError
from classifier.evaluation.metrics import score
from classifier.export import formats
from classifier.export.promotion import decide
from classifier.model.files import load_model
from classifier.serving.pyfunc import png_frame, probabilities_of
from classifier.tracking import lineage, registry, runs

log = logging.getLogger(__name__)

INPUT_EXAMPLE_SIZE = 4
PREDICT_BATCH_SIZE = 256
FORMATS_ARTIFACT_DIR = "formats"
FORMAT_METRICS = ("size_bytes", "max_abs_diff", "accuracy", "accuracy_drop")


@dataclass(frozen=True)
class ExportOutputs:
    """Where the stage writes: the formats, their parity, the registration, the decision."""

    formats: Path
    format_metrics: Path
    registered: Path
    decision: Path

    @classmethod
    def under(cls, folder: Path) -> ExportOutputs:
        """Every output in ``folder`` (for tests and tools)."""
        folder = Path(folder)
        return cls(
            formats=folder / "formats",
            format_metrics=folder / "formats.json",
            registered=folder / "registered_model.json",
            decision=folder / "promotion.json",
        )


def champion_accuracy(model_name: str, test: ImageSet) -> tuple[int | None, float | None]:
    """The current champion's version and its accuracy on ``test``; (None, None) if none."""
    champion = registry.aliased_model(model_name, "champion")
    if champion is None:
        return None, None
    version, model = champion
    try:
        probabilities = probabilities_of(model.predict(test.images))
    except Exception as error:
        raise StageError(
            f"the champion, {model_name} version {version}, cannot score this test set "
            f"({str(error).splitlines()[0]}); for a different kind of data, register under "
            "another export.model_name"
        ) from None
    return version, score(probabilities, test.labels)["accuracy"]


def run(
    cfg: ExportParams,
    *,
    resize: ResizePolicy,
    data_dir: Path,
    model_path: Path,
    run_info_path: Path,
    outputs: ExportOutputs,
) -> dict[str, object]:
    """Export and check every format, score, decide, register, and write the records.

    Nothing is registered, and no output written, unless every format passes its parity
    check and registration succeeds.
    """
    run_id = lineage.read_run_id(run_info_path)
    test = read_image_set(Path(data_dir) / "test")
    reference = load_model(str(model_path)).predict(test.images, PREDICT_BATCH_SIZE, verbose=0)
    candidate = score(reference, test.labels)["accuracy"]
    representative = formats.representative_images(read_image_set(Path(data_dir) / "train").images)
    with runs.resumed_run(run_id), atomic_path(outputs.formats, directory=True) as staged:
        report = formats.export_and_check(
            model_path,
            representative,
            test.images,
            test.labels,
            reference,
            staged,
            cfg.int8_max_accuracy_drop,
        )
        runs.log_metrics(
            {
                f"format.{name}.{key}": value
                for name, figures in report.items()
                for key, value in figures.items()
                if key in FORMAT_METRICS
            }
        )
        runs.log_artifacts(staged, FORMATS_ARTIFACT_DIR)
        champion_version, champion_score = champion_accuracy(cfg.model_name, test)
        decision = decide(candidate, champion_score, cfg, champion_version)
        tags = {
            "promotion.decision": decision.alias,
            "promotion.reason": decision.reason,
            "promotion.candidate_accuracy": f"{candidate:.6f}",
            "promotion.champion_accuracy": ""
            if champion_score is None
            else f"{champion_score:.6f}",
            "promotion.champion_version": "" if champion_version is None else str(champion_version),
        }
        registered = registry.register_model(
            model_path,
            Path(data_dir) / CLASSES_FILE,
            resize,
            cfg.model_name,
            decision.alias,
            png_frame(test.images[:INPUT_EXAMPLE_SIZE]),
            tags,
        )
    write_json(outputs.format_metrics, report)
    summary = {
        "promoted": decision.promoted,
        "candidate_accuracy": candidate,
        "champion_accuracy": champion_score,
        "champion_version": champion_version,
    }
    write_json(outputs.decision, summary)
    record = {**registered, "decision": {**summary, "reason": decision.reason}}
    write_json(outputs.registered, record)
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
    outputs = ExportOutputs(
        formats=args.formats,
        format_metrics=args.format_metrics,
        registered=args.out,
        decision=args.decision,
    )

    def body() -> None:
        params = load_params(args.params)
        run(
            params.export,
            resize=params.preprocess.resize,
            data_dir=args.data,
            model_path=args.model,
            run_info_path=args.run_info,
            outputs=outputs,
        )

    return run_stage("export", body)


if __name__ == "__main__":
    raise SystemExit(main())
