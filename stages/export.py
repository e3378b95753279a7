"""Stage ``export``: ship the trained model in every format, register it, promote it if better.

The model is written as a TensorFlow SavedModel, TFLite float32, TFLite int8 and ONNX,
and each format must give the Keras model's answers on the test split
(classifier/export/formats.py). The registered model is an MLflow pyfunc that takes images
as people have them (classifier/serving/). Whether it becomes ``@champion`` or
``@challenger`` is decided by classifier/export/promotion.py, against the current champion
on the same test images; a champion of other classes or other images is never compared.

Order matters: every check and every output that can fail comes first; registering the
version and moving its alias come last, so a failed export registers nothing and never
moves the champion. The training run stays FINISHED whatever happens: export only adds
to it (``export.outcome`` says how export ended).

Every version carries its model card (classifier/export/model_card.py): written as a file
and logged to the training run before registering, and registered as the version's
description, so the MLflow UI shows it on the version's page.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from classifier.atomic import atomic_path, check_writable, write_json, write_text
from classifier.cli import MODEL, PREPARED, RUN_INFO, exit_process, run_stage, stage_parser
from classifier.config import ExportParams, ServeParams, load_params
from classifier.data.dataset import CLASSES_FILE, ImageSet, read_image_set
from classifier.data.images import ResizePolicy
from classifier.export import formats, model_card
from classifier.export.incumbents import (
    best_earlier_version,
    comparable_champion,
    score_challenger,
    score_champion,
)
from classifier.export.promotion import decide
from classifier.model.files import load_model
from classifier.model.predict import predict
from classifier.serving import prepare
from classifier.serving.pyfunc import png_frame
from classifier.summary import RunFiles, stage_end_block
from classifier.tracking import description, lineage, names, registry, runs

log = logging.getLogger(__name__)

INPUT_EXAMPLE_SIZE = 4
PREDICT_BATCH_SIZE = 256
FORMATS_ARTIFACT_DIR = "formats"
FORMAT_METRICS = ("size_bytes", "max_abs_diff", "accuracy", "accuracy_drop")
TAG_SHIPPED = "formats.shipped"
LINEAGE_STAGES = ("train", "evaluate")  # their dvc.lock entries exist while export runs


@dataclass(frozen=True)
class ExportOutputs:
    """Where the stage writes: the formats, their parity, the registration, the decision."""

    formats: Path
    format_metrics: Path
    registered: Path
    decision: Path
    # What the served model ships with (fast file, OOD statistics, thresholds), its figures
    # and abstain curves; None for a caller that registers the Keras model alone.
    serving: Path | None = None
    serving_metrics: Path | None = None
    serving_plots: Path | None = None
    card: Path | None = None  # the model card (Markdown): classifier/export/model_card.py

    @classmethod
    def under(cls, folder: Path) -> ExportOutputs:
        """Every output in ``folder`` (for tests and tools)."""
        folder = Path(folder)
        return cls(
            formats=folder / "formats",
            format_metrics=folder / "formats.json",
            registered=folder / "registered_model.json",
            decision=folder / "promotion.json",
            serving=folder / "serving",
            serving_metrics=folder / "serving.json",
            serving_plots=folder / "serving-plots",
            card=folder / model_card.CARD_FILE,
        )


def export_formats(
    cfg: ExportParams, model_path: Path, data_dir: Path, test: ImageSet, reference, out_dir: Path
) -> dict[str, dict[str, float | bool]]:
    """Write and check every format into ``out_dir`` (atomically); return their report."""
    train = read_image_set(Path(data_dir) / "train")
    with atomic_path(out_dir, directory=True) as staged:
        return formats.export_and_check(
            model_path,
            formats.representative_images(train.images),
            test.images,
            test.labels,
            reference,
            staged,
            int8_max_drop=cfg.int8_max_accuracy_drop,
            int8_alpha=cfg.int8_alpha,
            require_int8=cfg.require_int8,
        )


def format_tags(report: dict) -> dict[str, str]:
    """Which formats ship (one tag), and why one does not, for the model version and the run."""
    shipped = [name for name, figures in report.items() if figures["shipped"]]
    tags = {TAG_SHIPPED: ", ".join(shipped)}
    tags.update(
        {
            f"format.{name}.reason": figures["reason"]
            for name, figures in report.items()
            if "reason" in figures
        }
    )
    return tags


def log_formats(training: runs.FinishedRun, report: dict, formats_dir: Path) -> None:
    """Each format's size and parity as run metrics, and the files as run artifacts."""
    training.log_metrics(
        {
            names.format_metric(name, key): value
            for name, figures in report.items()
            for key, value in figures.items()
            if key in FORMAT_METRICS
        }
    )
    training.log_artifacts(formats_dir, FORMATS_ARTIFACT_DIR)


def prepare_serving(
    cfg: ServeParams | None,
    model_path: Path,
    data_dir: Path,
    test: ImageSet,
    report: dict,
    outputs: ExportOutputs,
    training: runs.FinishedRun,
) -> prepare.PreparedServing | None:
    """Write what the served model ships with, its figures (also to the run) and abstain
    curves, each atomically; None without serve params (the Keras model alone)."""
    if cfg is None:
        return None
    check_writable(outputs.serving_metrics)
    splits = prepare.Splits(
        read_image_set(Path(data_dir) / "train"), read_image_set(Path(data_dir) / "val"), test
    )
    with atomic_path(outputs.serving, directory=True) as staged:
        prepared = prepare.prepare_serving(
            cfg, keras_path=model_path, splits=splits, report=report, out_dir=staged
        )
    with atomic_path(outputs.serving_plots, directory=True) as staged:
        for split, rows in prepared.curves.items():
            pd.DataFrame(rows).to_csv(staged / f"abstain_{split}.csv", index=False)
    write_json(outputs.serving_metrics, prepared.metrics)
    training.log_metrics(prepared.run_metrics())
    return prepared.moved_to(outputs.serving)


def card_facts(
    cfg: ExportParams, decision, keras_model, test: ImageSet, reference, report, run_id: str
) -> model_card.CardFacts:
    """What the model card says of this model, its run, formats and promotion."""
    return model_card.CardFacts(
        model_name=cfg.model_name,
        alias=decision.alias,
        architecture=keras_model.name,
        parameters=keras_model.count_params(),
        input_shape=tuple(keras_model.input_shape[1:]),
        class_names=test.class_names,
        test_labels=test.labels,
        test_predicted=reference.argmax(axis=1),
        formats=report,
        decision=decision.summary(),
        run=model_card.TrainingRun.of(runs.get_run(run_id)),
    )


def write_card(
    facts: model_card.CardFacts,
    sources: model_card.CardSources | None,
    training: runs.FinishedRun,
    card_path: Path | None,
    model_path: Path,
) -> str:
    """The model card: written to ``card_path`` (if given) and logged to the run; returns it
    as the model version's description (cut to fit, if it must be).

    The DVC hashes are dvc.lock's for the train stage, when it describes this model.
    """
    sources = sources or model_card.CardSources()
    entry = None if sources.lock is None else lineage.lock_entry(sources.lock, "train", model_path)
    hashes = {} if entry is None else entry.hashes()
    facts = replace(facts, sources=sources, dvc_hashes=hashes)
    card = model_card.build_card(facts)
    with tempfile.TemporaryDirectory() as scratch:
        path = card_path or Path(scratch) / model_card.CARD_FILE
        write_text(path, card)
        training.log_artifact(path)
    return model_card.description_of(card, training.run_id)


# Long because it is export's order in one place: checks and outputs, then registering.
def run(
    cfg: ExportParams,
    *,
    resize: ResizePolicy,
    data_dir: Path,
    model_path: Path,
    run_info_path: Path,
    outputs: ExportOutputs,
    serve: ServeParams | None = None,
    card_sources: model_card.CardSources | None = None,
) -> dict[str, object]:
    """Check, export every format, decide, write the records, then register and alias."""
    for path in (outputs.format_metrics, outputs.decision, outputs.registered):
        check_writable(path)
    if outputs.card is not None:
        check_writable(outputs.card)
    training = runs.finished_run(lineage.read_run_id(run_info_path))
    test = read_image_set(Path(data_dir) / "test")
    keras_model = load_model(str(model_path))
    interface = registry.ModelInterface(test.class_names, tuple(keras_model.input_shape[1:]))
    with training.stage("export"):
        comparable_champion(cfg.model_name, interface)
        reference = predict(keras_model, test.images, PREDICT_BATCH_SIZE)
        candidate = reference.argmax(axis=1) == test.labels
        report = export_formats(cfg, model_path, data_dir, test, reference, outputs.formats)
        served = prepare_serving(serve, model_path, data_dir, test, report, outputs, training)
        champion = score_champion(cfg.model_name, test)
        if champion.version is None:
            champion = best_earlier_version(cfg.model_name, test, interface)
        challenger = score_challenger(cfg.model_name, test, interface, champion)
        decision = decide(
            candidate,
            champion.correct,
            test.labels,
            cfg,
            champion.version,
            challenger,
            champion.name,
        )
        # Train's and evaluate's code versions and the data's, as dvc.lock records them.
        versions = (
            {}
            if card_sources is None or card_sources.lock is None
            else training.record_lineage(card_sources.lock, LINEAGE_STAGES, model_path)
        )
        tags = {
            **decision.tags(),
            **versions,
            **format_tags(report),
            "promotion.candidate_accuracy": f"{candidate.mean():.6f}",
            registry.TAG_ARCHITECTURE: keras_model.name,
            **(served.tags() if served else {}),
        }
        log_formats(training, report, outputs.formats)
        logged = registry.log_served_model(
            training.run_id,
            model_path,
            Path(data_dir) / CLASSES_FILE,
            resize,
            png_frame(test.images[:INPUT_EXAMPLE_SIZE]),
            interface,
            extra_artifacts=served.artifacts if served else None,
        )
        summary = {
            **decision.summary(),
            "candidate_accuracy": float(candidate.mean()),
            "champion_accuracy": champion.accuracy,
        }
        write_json(outputs.format_metrics, report)
        write_json(outputs.decision, summary)
        # Last: the new version and its alias; then the record of it.
        facts = card_facts(cfg, decision, keras_model, test, reference, report, training.run_id)
        if "data.source" in facts.run.params:
            tags[registry.TAG_DATA] = facts.run.params["data.source"]
        card = write_card(facts, card_sources, training, outputs.card, model_path)
        registered = registry.register_version(cfg.model_name, logged, decision.alias, tags, card)
        record = {**registered, "decision": summary}
        write_json(outputs.registered, record)
        training.set_tags({**tags, "export.version": str(registered["version"])})
        training.describe(
            description.registered(
                int(candidate.sum()),
                len(candidate),
                cfg.model_name,
                int(registered["version"]),
                decision.alias,
            )
        )
    version = f"{cfg.model_name} version {registered['version']}"
    if decision.alias is None:
        why = decision.reason.removeprefix("no alias: ")
        log.warning("%s has no alias: it is %s (see its model card)", version, why)
    else:
        log.info("%s is @%s: %s", version, decision.alias, decision.reason)
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
        serving=("models/serving", "what the served model ships with: fast file, OOD statistics"),
        serving_metrics=("metrics/serving.json", "abstention and OOD figures (DVC metrics)"),
        serving_plots=("plots/serving", "abstain rate against accuracy when answering (DVC plots)"),
        card=("reports/model_card.md", "the model card out (also the version's description)"),
        data_metrics=("metrics/data.json", "preprocess's data metrics, for the card"),
        evaluate_metrics=("metrics/evaluate.json", "evaluate's test metrics, for the card"),
        per_class=("plots/evaluate/per_class.csv", "evaluate's per-class table, for the card"),
        lock=("dvc.lock", "DVC's lock file, for the card's hashes (read only)"),
    ).parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    outputs = ExportOutputs(
        formats=args.formats,
        format_metrics=args.format_metrics,
        registered=args.out,
        decision=args.decision,
        serving=args.serving,
        serving_metrics=args.serving_metrics,
        serving_plots=args.serving_plots,
        card=args.card,
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
            serve=params.serve,
            card_sources=model_card.CardSources(
                args.data_metrics, args.evaluate_metrics, args.per_class, args.lock
            ),
        )

    code = run_stage("export", body, params=args.params)
    if code == 0:  # the run's last words (classifier/summary.py)
        block = stage_end_block(
            RunFiles(args.evaluate_metrics, args.data_metrics, args.decision, args.out, args.card)
        )
        if block:
            print("\n" + block, flush=True)
    return code


if __name__ == "__main__":
    exit_process(main())
