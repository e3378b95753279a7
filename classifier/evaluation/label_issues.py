"""Training labels that are probably wrong: out-of-fold probabilities and confident learning.

Every training image gets probabilities from a model that never saw it: the training split
is cut into K folds (stratified by label, exact copies in one fold, so no image is scored
by a model that trained on its copy) and K models of ``train.architecture`` each train on
the other folds. cleanlab's confident learning (``cleanlab.filter.find_label_issues``)
then flags the images whose given label disagrees with those probabilities beyond what
each class's own confidence threshold explains, ranked by self-confidence: the
probability the out-of-fold model gives the given label, lowest first.

cleanlab does the ranking; only the K-fold loop is here, because it trains the project's
own models with the project's training loop.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from classifier.config import LabelIssuesParams, TrainParams
from classifier.data.dataset import ImageSet
from classifier.data.duplicates import image_hashes
from classifier.errors import ParamsError

log = logging.getLogger(__name__)

SHOWN = 24  # suspects in the picture
RANK_BY = "self_confidence"
TABLE_COLUMNS = ["rank", "index", "hash", "given", "suggested", "score", "suggested_probability"]


def check_folds(labels: np.ndarray, class_names: Sequence[str], folds: int) -> None:
    """Refuse ``folds`` when a class has fewer training images: some fold model would never
    see it, and cleanlab cannot score a class no model learned."""
    counts = np.bincount(labels, minlength=len(class_names))
    small = [(class_names[label], int(n)) for label, n in enumerate(counts) if n < folds]
    if not small:
        return
    fewest = min(count for _, count in small)
    named = ", ".join(f"{name!r} has {count}" for name, count in small)
    fix = (
        f"set label_issues.folds to {fewest} or fewer"
        if fewest >= 2
        else "add training images to it (at least 2 per class)"
    )
    raise ParamsError(
        f"label_issues.folds={folds} needs at least {folds} training images in every class: "
        f"{named}; {fix}"
    )


def fold_of_each_image(labels: np.ndarray, hashes: list[str], folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each image: stratified by label, exact copies together."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    fold_of = np.empty(len(labels), np.int64)
    for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(labels)), labels, hashes)):
        fold_of[held_out] = fold
    return fold_of


def fold_train_params(train: TrainParams, cfg: LabelIssuesParams) -> TrainParams:
    """``train.*`` as each fold's model uses it: ``label_issues.epochs``, plain fitting.

    No augmentation, schedule, smoothing or fine-tuning: plain probabilities of the given
    labels are what confident learning reads.
    """
    return train.model_copy(
        update={
            "epochs": cfg.epochs,
            "augment": "none",
            "schedule": "constant",
            "label_smoothing": 0.0,
            "calibrate": False,
            "resume": False,
            "fine_tune_epochs": 0,
        }
    )


def out_of_fold_probabilities(
    train: ImageSet,
    train_params: TrainParams,
    cfg: LabelIssuesParams,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each training image's class probabilities from the fold model that never saw it.

    Returns (probabilities, fold of each image).
    """
    import keras

    from classifier.training import batch_norm
    from classifier.training.loop import fit_epochs, new_model
    from classifier.training.precision import float32_model

    check_folds(train.labels, train.class_names, cfg.folds)
    fold_params = fold_train_params(train_params, cfg)
    fold_of = fold_of_each_image(
        train.labels, image_hashes(train.images), cfg.folds, fold_params.seed
    )
    probabilities = np.zeros((len(train.labels), len(train.class_names)), np.float32)
    for fold in range(cfg.folds):
        held_out = fold_of == fold
        fitted = ImageSet(train.images[~held_out], train.labels[~held_out], train.class_names)
        scored = ImageSet(train.images[held_out], train.labels[held_out], train.class_names)
        keras.utils.set_random_seed(fold_params.seed + fold)
        model = new_model(fold_params, fitted, None)
        fit_epochs(model, fold_params, fitted, scored, callbacks=[], first_epoch=0)
        # Scored in float32 whatever precision trained it: bfloat16 probabilities carry
        # three digits, and the likeliest errors differ in the sixth.
        scorer = float32_model(model, fold_params, train.image_shape, len(train.class_names))
        batch_norm.recompute_statistics(scorer, fitted.images)  # as the train stage does
        probabilities[held_out] = scorer.predict(scored.images, batch_size=256, verbose=0)
        accuracy = float((probabilities[held_out].argmax(axis=1) == scored.labels).mean())
        log.info("fold %d of %d: out-of-fold accuracy %.4f", fold + 1, cfg.folds, accuracy)
        if progress is not None:
            progress(fold + 1, cfg.folds)
        keras.backend.clear_session()
    return probabilities, fold_of


@dataclass(frozen=True)
class LabelIssues:
    """The flagged training images, most likely wrong first, and figures about them."""

    table: pd.DataFrame  # TABLE_COLUMNS, one row per flagged image
    checked: int  # training images checked
    out_of_fold_accuracy: float

    def summary(self) -> dict[str, float | int]:
        return {
            "checked_images": self.checked,
            "flagged": len(self.table),
            "flagged_fraction": round(len(self.table) / max(1, self.checked), 6),
            "out_of_fold_accuracy": round(self.out_of_fold_accuracy, 6),
        }


def rank_label_issues(
    labels: np.ndarray, probabilities: np.ndarray, class_names: tuple[str, ...], hashes: list[str]
) -> LabelIssues:
    """Confident learning on out-of-fold ``probabilities``: the flagged images, ranked."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    ranked = find_label_issues(labels, probabilities, return_indices_ranked_by=RANK_BY)
    scores = get_label_quality_scores(labels, probabilities, method=RANK_BY)
    suggested = probabilities.argmax(axis=1)
    names = np.asarray(class_names, dtype=object)
    table = pd.DataFrame(
        {
            "rank": np.arange(1, len(ranked) + 1),
            "index": ranked,
            "hash": [hashes[i] for i in ranked],
            "given": names[labels[ranked]],
            "suggested": names[suggested[ranked]],
            "score": scores[ranked],
            "suggested_probability": probabilities[ranked, suggested[ranked]],
        },
        columns=TABLE_COLUMNS,
    )
    accuracy = float((suggested == labels).mean()) if len(labels) else 0.0
    return LabelIssues(table, len(labels), accuracy)


def empty_issues() -> LabelIssues:
    """What the stage reports when it is off: nothing checked, nothing flagged."""
    return LabelIssues(pd.DataFrame(columns=TABLE_COLUMNS), 0, 0.0)


def flip_labels(
    labels: np.ndarray, fraction: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``labels`` with ``fraction`` of them changed to another class at random, and which.

    For measuring: planted errors whose positions are known.
    """
    rng = np.random.default_rng(seed)
    flipped = rng.choice(len(labels), size=math.ceil(fraction * len(labels)), replace=False)
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, num_classes, len(flipped))) % num_classes
    return noisy, np.sort(flipped)


def recall_in_top(ranked_indices: np.ndarray, planted: np.ndarray, top: int) -> float:
    """The share of the ``planted`` errors among the first ``top`` of ``ranked_indices``."""
    found = np.intersect1d(np.asarray(ranked_indices)[:top], planted)
    return len(found) / max(1, len(planted))
