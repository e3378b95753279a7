"""The model card says what the pipeline recorded, with its intervals, and fits MLflow."""

from __future__ import annotations

import json
import re

import mlflow
import numpy as np
import pandas as pd
from scipy.stats import binomtest

from classifier.data.dataset import read_image_set
from classifier.export import model_card
from classifier.tracking import runs, store

CLASSES = tuple("0123456789")


def interval_text(right: int, total: int) -> str:
    ci = binomtest(right, total).proportion_ci(0.95, method="exact")
    return f"{100 * right / total:.1f} % (95 % CI {100 * ci.low:.1f} % to {100 * ci.high:.1f} %)"


def facts(tmp_path, **changes) -> model_card.CardFacts:
    """A card's facts as export gathers them, with the earlier stages' files in tmp_path."""
    labels = np.arange(270) % 10
    predicted = labels.copy()
    predicted[[3, 13, 23, 33, 5, 15, 7]] = 9  # 7 wrong: 263 of 270 right; class 3 worst
    (tmp_path / "data.json").write_text(
        json.dumps(
            {
                "images": {"train": 1257, "val": 270, "test": 270},
                "classes": 10,
                "skipped_files": 2,
                "duplicate_groups": 4,
                "duplicates_across_splits": 0,
                "train_dropped_duplicating_test": 1,
                "excluded": {"dropped": 3, "relabelled": 2, "unmatched_entries": 0},
            }
        )
    )
    (tmp_path / "evaluate.json").write_text(
        json.dumps(
            {"macro_f1": 0.9741, "ece": 0.0123, "ece_uncalibrated": 0.0456, "temperature": 1.5}
        )
    )
    recall = [1.0] * 10
    recall[3], recall[5], recall[7] = 23 / 27, 25 / 27, 26 / 27
    f1 = [1.0] * 10
    f1[3], f1[5], f1[7], f1[9] = 0.92, 0.96, 0.98, 0.885  # 9: seven images wrongly called 9
    pd.DataFrame(
        {"class": CLASSES, "precision": 1.0, "recall": recall, "f1": f1, "support": 27}
    ).to_csv(tmp_path / "per_class.csv", index=False)
    values = dict(
        model_name="digits-cnn",
        alias="challenger",
        architecture="reference_cnn",
        parameters=93_322,
        input_shape=(28, 28, 1),
        class_names=CLASSES,
        test_labels=labels,
        test_predicted=predicted,
        formats={
            "keras": {
                "shipped": True,
                "max_abs_diff": 0.0,
                "accuracy": 263 / 270,
                "size_bytes": 400_000,
            },
            "tflite_int8": {
                "shipped": False,
                "reason": "loses 2.2 points",
                "max_abs_diff": 0.03,
                "accuracy": 0.952,
                "size_bytes": 100_000,
            },
        },
        decision={"promoted": False, "reason": "is not significantly better than champion 1"},
        run=model_card.TrainingRun(
            run_id="abc123",
            run_name="digits-2026",
            experiment_id="7",
            start_ms=0,
            end_ms=83_000,
            params={
                "train.architecture": "reference_cnn",
                "train.epochs": "15",
                "train.fine_tune_epochs": "0",
                "data.source": "digits",
            },
            tags={"mlflow.source.git.commit": "0123abcd", "dvc.exp_name": "lean-cove"},
            metrics={"val_accuracy": 0.95},
            datasets=(("digits-train", "d1g35t", "training"),),
        ),
        sources=model_card.CardSources(
            tmp_path / "data.json", tmp_path / "evaluate.json", tmp_path / "per_class.csv"
        ),
        dvc_hashes={
            "dvc.train.dep.data/prepared": "feedbeef.dir",
            "dvc.train.dep.classifier/model": "c0de.dir",  # code: the commit pins it
            "dvc.train.out.models/model.keras": "0ddba11",
            "dvc.train.out.plots/history.csv": "5ca1ab1e",
        },
    )
    values.update(changes)
    return model_card.CardFacts(**values)


def test_the_card_quotes_accuracy_with_its_exact_interval_and_the_weakest_classes(tmp_path):
    card = model_card.build_card(facts(tmp_path))
    assert card.startswith("# Model card: digits-cnn (reference_cnn)")
    assert "93,322 parameters" in card and "28x28 grey images" in card
    assert f"Test accuracy: {interval_text(263, 270)} on 270 test images" in card
    # Weakest by F1: 9, 3, 5, each recall with its own exact interval over 27 images.
    weakest = card.split("weakest classes (by F1):")[1].split("\n## ")[0]
    rows = [line for line in weakest.splitlines() if line.startswith("| ") and "F1" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["9", "3", "5"]
    assert interval_text(23, 27) in rows[1]
    assert "expected calibration error 0.0123 with the built-in temperature 1.500" in card
    assert "(without it: 0.0456)" in card


def test_the_card_covers_data_training_formats_promotion_lineage_and_limits(tmp_path):
    card = model_card.build_card(facts(tmp_path))
    for section in ("What it is", "How good it is", "The data it saw", "How it was trained",
                    "Exported formats", "Promotion", "Lineage", "Known limits"):  # fmt: skip
        assert f"\n## {section}\n" in card
    assert "1257 train, 270 validation, 270 test" in card
    assert "4 groups of copies" in card and "1 training images dropped" in card
    assert "3 images dropped, 2 relabelled" in card
    assert "`d1g35t`" in card  # the dataset digest MLflow recorded
    assert "15 epochs in 0:01:23" in card
    assert "| tflite_int8 | no: loses 2.2 points" in card
    assert "`digits-cnn@challenger`: is not significantly better than champion 1" in card
    assert "`0123abcd`" in card and "lean-cove" in card
    assert re.search(r"\| DVC md5 of data/prepared \| `feedbeef.dir`", card)
    assert re.search(r"\| DVC md5 of models/model.keras \| `0ddba11`", card)
    assert "c0de" not in card and "5ca1ab1e" not in card
    assert "Not shipped: tflite_int8" in card
    width = binomtest(263, 270).proportion_ci(0.95, method="exact")
    assert f"interval is {100 * (width.high - width.low):.1f} percentage points wide" in card


def test_a_missing_source_is_said_to_be_missing_not_guessed(tmp_path):
    card = model_card.build_card(facts(tmp_path, sources=model_card.CardSources(), dvc_hashes={}))
    assert "Data metrics (metrics/data.json): not available." in card
    assert "Test metrics (metrics/evaluate.json): not available." in card
    assert "Per-class table (plots/evaluate/per_class.csv): not available." in card
    assert re.search(r"\| DVC hashes \| not recorded", card)
    assert f"Test accuracy: {interval_text(263, 270)}" in card  # from export's own answers


def test_a_card_too_long_for_a_version_description_is_cut_at_a_section(tmp_path):
    card = model_card.build_card(facts(tmp_path))
    listed = model_card.tables_as_lists(card)
    assert model_card.description_of(card, "abc123") == listed  # a digits card fits
    long = card + "\n## Appendix\n\n" + "x" * model_card.MAX_DESCRIPTION_CHARS
    cut = model_card.description_of(long, "abc123")
    assert len(cut) <= model_card.MAX_DESCRIPTION_CHARS
    assert cut.startswith(listed.rstrip()) and "## Appendix" not in cut
    assert "the whole card is `model_card.md` in MLflow run `abc123`" in cut


def test_the_training_run_gives_the_card_its_params_and_the_data_digests(trained, trained_store):
    store.connect()  # as export does: an earlier test may have pointed MLflow elsewhere
    run = model_card.TrainingRun.of(runs.get_run(trained.result.run_id))
    assert run.params["train.epochs"] == str(trained.params.train.epochs)
    assert run.end_ms > run.start_ms
    train = read_image_set(trained.data_dir / "train")
    digest = mlflow.data.from_numpy(train.images, targets=train.labels).digest
    assert (f"{trained.params.data.source}-train", digest, "training") in run.datasets


def warnings_in(card: str) -> list[str]:
    return [line for line in card.splitlines() if line.startswith("> ⚠️ **WARNING:")]


def test_a_sound_model_has_no_warning(tmp_path):
    floor = {"value": 0.1, "kind": "auto"}  # 263 of 270 right: far above
    decision = {"promoted": True, "reason": "beats champion version 1", "floor": floor}
    card = model_card.build_card(facts(tmp_path, alias="champion", decision=decision))
    assert warnings_in(card) == []


def test_an_interval_reaching_down_to_the_floor_is_a_loud_warning_at_the_top(tmp_path):
    # 263 of 270 right: the 95 % interval is 94.7 % to 99.0 %.
    low = binomtest(263, 270).proportion_ci(0.95, method="exact").low
    decision = {"reason": "r", "floor": {"value": round(low, 4) + 0.001, "kind": "fixed"}}
    card = model_card.build_card(facts(tmp_path, decision=decision))
    [warning] = warnings_in(card)
    assert card.index(warning) < card.index("## What it is")
    assert "interval (94.7 % to 99.0 %) reaches down to the accuracy floor, 94.8 % (fixed)" in (
        warning
    )
    decision["floor"]["value"] = round(low, 4) - 0.001  # just below the interval: no warning
    assert warnings_in(model_card.build_card(facts(tmp_path, decision=decision))) == []


def test_half_the_classes_with_f1_zero_is_a_loud_warning(tmp_path):
    labels = np.arange(270) % 10
    predicted = np.where(labels < 5, labels, 0)  # classes 5-9 never predicted: F1 = 0
    card = model_card.build_card(facts(tmp_path, test_predicted=predicted))
    [warning] = warnings_in(card)
    assert "5 of 10 classes have F1 = 0 (no test image of them is recognised): 5, 6, 7, 8, 9" in (
        warning
    )
    four = np.where(labels < 6, labels, 0)  # 4 of 10: under half, no warning
    assert warnings_in(model_card.build_card(facts(tmp_path, test_predicted=four))) == []


def test_a_version_with_no_alias_says_why_at_the_top_and_in_promotion(tmp_path):
    reason = "no alias: significantly worse (alpha 0.05) than champion version 2: -0.8593"
    card = model_card.build_card(facts(tmp_path, alias=None, decision={"reason": reason}))
    [warning] = warnings_in(card)
    assert warning == (
        "> ⚠️ **WARNING: No alias, so nothing serves this version by one: it is significantly "
        "worse (alpha 0.05) than champion version 2: -0.8593.**"
    )
    assert f"Registered under `digits-cnn` with **no alias**: {reason}." in card
    assert "@None" not in card


def test_the_description_lists_each_table_row_as_mlflow_draws_tables_without_borders(tmp_path):
    card = model_card.build_card(facts(tmp_path))
    description = model_card.description_of(card, "abc123")
    assert "|" not in description  # MLflow's UI ran the cells together: 0.885100.0 %...
    lines = description.splitlines()
    assert "- train.epochs: 15" in lines  # a two-column table: name, then value
    assert f"- **class 9**: F1 0.885; recall {interval_text(27, 27)}; test images 27" in lines
    assert "- **format tflite_int8**: shipped no: loses 2.2 points; max probability diff vs " \
        "Keras 0.03; test accuracy 95.2 %; size 0.10 MB" in lines  # fmt: skip
    assert "- DVC md5 of data/prepared: `feedbeef.dir`" in lines
    # Everything else is the card's own text, in the card's order.
    prose = [line for line in card.splitlines() if not line.startswith("|")]
    assert [line for line in lines if line in set(prose)] == prose
