"""What export stores with the registered model for serving, and the figures behind it.

Called by the export stage after the formats passed parity:

1. the file to serve with: ``serve.runtime`` (``auto``: the fastest float format that
   passed parity and ships, classifier/serving/runtime.py), converted once more with the
   penultimate features as a second output and held to the float formats' parity bound;
   Keras when no such format passed;
2. the out-of-distribution statistics of the training split's features (ood.py);
3. the confidence threshold: the lowest at which the validation images the model answers
   are ``serve.target_accuracy`` accurate; and the OOD threshold, the ``serve.ood_quantile``
   of the validation images' OOD scores;
4. the monitor's reference: the validation split's confidences, OOD scores and predicted
   classes, and the training split's class counts;
5. the measurements: the AUROC of both OOD scores at telling the test images from images
   made from them that the model never saw the like of (:func:`shifted_images`), and the
   abstain rate against the accuracy when answering, on the validation and test splits.

Runs at export only (it imports Keras), so it does not ship with the model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from classifier.model.predict import padded
from classifier.serving import ood, runtime
from classifier.serving.pyfunc import (
    PREDICT_BATCH_SIZE,
    RUNTIME_ARTIFACT,
    SERVING_ARTIFACT,
    SERVING_FILE,
    STATISTICS_ARTIFACT,
    STATISTICS_FILE,
)
from classifier.tracking import names

if TYPE_CHECKING:
    from classifier.config import ServeParams
    from classifier.data.dataset import ImageSet

log = logging.getLogger(__name__)

RUNTIME_FILES = {"tflite_float32": "model_features.tflite", "onnx": "model_features.onnx"}
# Images made from the test split that are unlike any training image, each a kind of shift.
SHIFTS = ("noise", "inverted", "letters")
LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"
CURVE_POINTS = 101
ROUND = 6


@dataclass(frozen=True)
class Splits:
    """The prepared image sets serving is fitted and measured on."""

    train: ImageSet
    validation: ImageSet
    test: ImageSet


@dataclass(frozen=True)
class PreparedServing:
    """The files to ship with the model, its metrics and the abstain curves."""

    artifacts: dict[str, Path]  # pyfunc artifact key -> file
    metrics: dict[str, Any]  # metrics/serving.json
    curves: dict[str, list[dict[str, float]]]  # split -> rows of the abstain curve

    def moved_to(self, folder: Path) -> PreparedServing:
        """The same, its files now in ``folder`` (where the caller moved them)."""
        moved = {key: Path(folder) / path.name for key, path in self.artifacts.items()}
        return PreparedServing(moved, self.metrics, self.curves)

    def run_metrics(self) -> dict[str, float]:
        """Every number of the metrics, flat, as ``serving/<key>/...`` run metrics."""

        def flat(keys: tuple[str, ...], value: Any) -> dict[str, float]:
            if isinstance(value, dict):
                return {
                    k: v for key, item in value.items() for k, v in flat((*keys, key), item).items()
                }
            if isinstance(value, bool) or not isinstance(value, int | float):
                return {}
            return {names.serving_metric(*keys): float(value)}

        return flat((), self.metrics)

    def tags(self) -> dict[str, str]:
        """What the version serves with, for the model version and the run."""
        keys = ("runtime", "ood_score", "confidence_threshold", "ood_threshold")
        return {f"serving.{key}": str(self.metrics[key]) for key in keys}


# ---------------------------------------------------------------------------- shifted images


def _letter_images(count: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Capital letters, white on black like the digits, at random small offsets."""
    from PIL import Image, ImageDraw, ImageFont

    height, width, channels = shape
    font = ImageFont.load_default(size=max(8, int(min(height, width) * 0.8)))
    rng = np.random.default_rng(seed)
    images = np.empty((count, *shape), dtype=np.uint8)
    for index in range(count):
        canvas = Image.new("L", (width, height), 0)
        letter = LETTERS[index % len(LETTERS)]
        dx, dy = rng.integers(-2, 3, size=2)
        ImageDraw.Draw(canvas).text(
            (width / 2 + dx, height / 2 + dy), letter, fill=255, font=font, anchor="mm"
        )
        pixels = np.asarray(canvas)[..., np.newaxis]
        images[index] = np.repeat(pixels, channels, axis=-1)
    return images


def shifted_images(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """As many images as ``images``, of their shape, shifted by ``kind`` (one of SHIFTS, or
    ``rotated``): uniform noise, the images inverted, rendered capital letters, or the
    images turned a quarter."""
    images = np.asarray(images)
    if kind == "noise":
        return np.random.default_rng(seed).integers(0, 256, images.shape, dtype=np.uint8)
    if kind == "inverted":
        return 255 - images
    if kind == "letters":
        return _letter_images(len(images), images.shape[1:], seed)
    if kind == "rotated" and images.shape[1] == images.shape[2]:
        return np.rot90(images, k=1, axes=(1, 2)).copy()
    raise ValueError(f"unknown shift {kind!r}, expected one of {[*SHIFTS, 'rotated']}")


# ---------------------------------------------------------------------------- thresholds


def confidence_threshold(
    confidence: np.ndarray, correct: np.ndarray, target: float
) -> tuple[float, bool]:
    """The lowest confidence threshold at which the images answered are ``target`` accurate,
    and whether any is. When none is, the threshold of the highest such accuracy.

    Answering means confidence >= threshold, so images of equal confidence go together.
    0.0 when the model may answer every image.
    """
    if len(confidence) == 0:
        return 0.0, False
    order = np.argsort(-confidence, kind="stable")
    ranked = confidence[order]
    accuracy = np.cumsum(correct[order]) / np.arange(1, len(ranked) + 1)
    # Answer the k most confident, k at the end of a group of equal confidences.
    ends = np.flatnonzero(np.append(ranked[1:] < ranked[:-1], True))
    reaching = ends[accuracy[ends] >= target]
    met = len(reaching) > 0
    end = reaching[-1] if met else ends[np.flatnonzero(accuracy[ends] == accuracy[ends].max())[-1]]
    return (0.0 if end == len(ranked) - 1 else float(ranked[end])), met


def abstain_curve(
    confidence: np.ndarray, correct: np.ndarray, thresholds: np.ndarray
) -> list[dict[str, float]]:
    """For each threshold, the share abstained on and the accuracy on the rest (thresholds
    that leave nothing to answer are skipped)."""
    rows = []
    for threshold in thresholds:
        answered = confidence >= threshold
        if not answered.any():
            continue
        rows.append(
            {
                "threshold": round(float(threshold), ROUND),
                "abstain_rate": round(1 - float(answered.mean()), ROUND),
                "accuracy_when_answering": round(float(correct[answered].mean()), ROUND),
            }
        )
    return rows


def answering(reasons: list[str | None], correct: np.ndarray) -> dict[str, float | int | None]:
    """Abstain rate, accuracy overall and when answering, for one split under the rule."""
    answered = np.array([reason is None for reason in reasons], dtype=bool)
    return {
        "images": len(reasons),
        "abstain_rate": round(1 - float(answered.mean()), ROUND) if len(reasons) else None,
        "accuracy": round(float(correct.mean()), ROUND) if len(reasons) else None,
        "accuracy_when_answering": (
            round(float(correct[answered].mean()), ROUND) if answered.any() else None
        ),
        "abstained_low_confidence": reasons.count(ood.LOW_CONFIDENCE),
        "abstained_out_of_distribution": reasons.count(ood.OUT_OF_DISTRIBUTION),
    }


# ---------------------------------------------------------------------------- preparing


def outputs_of(loaded: runtime.Runtime, images: np.ndarray) -> dict[str, np.ndarray]:
    """The runtime's outputs for ``images``, run in batches of one shape (the last padded:
    a Keras runtime then traces once, classifier/model/predict.py)."""
    batches, size = padded(images, PREDICT_BATCH_SIZE)
    outputs = [loaded.run(batches[start : start + size]) for start in range(0, len(batches), size)]
    return {
        name: np.concatenate([batch[name] for batch in outputs])[: len(images)]
        for name in outputs[0]
    }


def _served_runtime(
    cfg: ServeParams,
    keras_path: Path,
    report: Mapping[str, Mapping[str, Any]],
    keras_test: dict[str, np.ndarray],
    test_images: np.ndarray,
    out_dir: Path,
) -> tuple[runtime.Runtime, Path | None, dict[str, Any]]:
    """The runtime to serve with, its file (None for Keras) and its parity with Keras."""
    from classifier.export import formats

    fmt = runtime.choose(report, cfg.runtime)
    if fmt == runtime.KERAS:
        log.info("serving with Keras: no fast float format passed parity")
        return runtime.keras_model(keras_path), None, {"runtime": fmt}
    path = formats.export_with_features(keras_path, fmt, out_dir / RUNTIME_FILES[fmt])
    loaded = runtime.load(fmt, path)
    served = outputs_of(loaded, test_images)
    parity = {
        "runtime": fmt,
        "runtime_max_abs_diff": float(
            np.max(np.abs(served[runtime.PROBABILITIES] - keras_test[runtime.PROBABILITIES]))
        ),
        "runtime_features_max_abs_diff": float(
            np.max(np.abs(served[runtime.FEATURES] - keras_test[runtime.FEATURES]))
        ),
    }
    if parity["runtime_max_abs_diff"] > formats.FLOAT_TOLERANCE:
        raise formats.ParityError(
            f"{fmt} with features: max_abs_diff {parity['runtime_max_abs_diff']:.3g} > "
            f"{formats.FLOAT_TOLERANCE:g} from the Keras model"
        )
    log.info("serving with %s (%s)", fmt, path.name)
    return loaded, path, parity


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """The AUROC of the scores at telling ``out_scores``' images from ``in_scores``'."""
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return round(float(roc_auc_score(labels, np.r_[in_scores, out_scores])), 4)


def ood_aurocs(
    statistics: ood.Statistics,
    loaded: runtime.Runtime,
    test_features: np.ndarray,
    test_images: np.ndarray,
    shifts: tuple[str, ...] = SHIFTS,
) -> dict[str, dict[str, float]]:
    """Each score's AUROC at telling the test images from each kind of shifted image."""
    shifted = {
        kind: outputs_of(loaded, shifted_images(test_images, kind))[runtime.FEATURES]
        for kind in shifts
    }
    return {
        score: {
            kind: auroc(statistics.score(score, test_features), statistics.score(score, features))
            for kind, features in shifted.items()
        }
        for score in ood.SCORES
    }


def fit_statistics(keras_path: Path, train: ImageSet, train_features: np.ndarray) -> ood.Statistics:
    """OOD statistics of the training features, with the model's last layer and temperature."""
    from classifier.model.files import load_model

    model = load_model(str(keras_path))
    weights, bias = runtime.features_layer(model).get_weights()[:2]
    return ood.fit(
        train_features,
        train.labels,
        len(train.class_names),
        weights,
        bias,
        runtime.temperature_of(model),
    )


# Long because it is the recipe the module docstring lists, step by step, in one place.
def prepare_serving(
    cfg: ServeParams,
    *,
    keras_path: Path,
    splits: Splits,
    report: Mapping[str, Mapping[str, Any]],
    out_dir: Path,
) -> PreparedServing:
    """Write what the served model needs into ``out_dir``; return it with its figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_test = outputs_of(runtime.keras_model(keras_path), splits.test.images)
    if runtime.FEATURES not in keras_test:
        raise ValueError(f"{keras_path}: the model has no Dense layer, so no OOD features")
    loaded, runtime_path, parity = _served_runtime(
        cfg, keras_path, report, keras_test, splits.test.images, out_dir
    )
    train = outputs_of(loaded, splits.train.images)
    statistics = fit_statistics(keras_path, splits.train, train[runtime.FEATURES])
    scored = {}
    for name, image_set in (("validation", splits.validation), ("test", splits.test)):
        outputs = outputs_of(loaded, image_set.images)
        probabilities = outputs[runtime.PROBABILITIES]
        scored[name] = {
            "confidence": probabilities.max(axis=1),
            "predicted": probabilities.argmax(axis=1),
            "correct": probabilities.argmax(axis=1) == image_set.labels,
            "features": outputs[runtime.FEATURES],
            "ood": statistics.score(cfg.ood_score, outputs[runtime.FEATURES]),
        }
    validation, test = scored["validation"], scored["test"]
    threshold, met = confidence_threshold(
        validation["confidence"], validation["correct"], cfg.target_accuracy
    )
    if not met:
        log.warning(
            "no confidence threshold makes the validation answers %.3f accurate; using %.4f",
            cfg.target_accuracy,
            threshold,
        )
    ood_threshold = (
        None
        if cfg.ood_quantile is None
        else float(np.quantile(validation["ood"], cfg.ood_quantile))
    )
    rule = ood.AbstainRule(threshold, ood_threshold)
    settings = {
        "runtime": parity["runtime"],
        "input_shape": list(loaded.input_shape),
        "temperature": statistics.temperature,
        "ood_score": cfg.ood_score,
        "confidence_threshold": threshold,
        "ood_threshold": ood_threshold,
        "target_accuracy": cfg.target_accuracy,
        "target_met": met,
    }
    (out_dir / SERVING_FILE).write_text(json.dumps(settings, indent=2) + "\n")
    ood.save(
        out_dir / STATISTICS_FILE,
        statistics,
        reference_confidence=validation["confidence"],
        reference_ood_score=validation["ood"],
        reference_class_index=validation["predicted"],
        train_class_counts=np.bincount(
            splits.train.labels, minlength=len(splits.train.class_names)
        ),
    )
    artifacts = {
        SERVING_ARTIFACT: out_dir / SERVING_FILE,
        STATISTICS_ARTIFACT: out_dir / STATISTICS_FILE,
    }
    if runtime_path is not None:
        artifacts[RUNTIME_ARTIFACT] = runtime_path
    grid = np.unique(np.quantile(validation["confidence"], np.linspace(0, 1, CURVE_POINTS)))
    metrics = {
        **settings,
        **{key: value for key, value in parity.items() if key != "runtime"},
        "validation": answering(
            list(rule.reasons(validation["confidence"], validation["ood"])), validation["correct"]
        ),
        "test": answering(list(rule.reasons(test["confidence"], test["ood"])), test["correct"]),
        "ood_auroc": ood_aurocs(statistics, loaded, test["features"], splits.test.images),
    }
    curves = {
        name: abstain_curve(scored[name]["confidence"], scored[name]["correct"], grid)
        for name in scored
    }
    log.info(
        "serving: confidence threshold %.4f (validation answers %s accurate, abstains on %s); "
        "OOD AUROC %s",
        threshold,
        metrics["validation"]["accuracy_when_answering"],
        metrics["validation"]["abstain_rate"],
        metrics["ood_auroc"][cfg.ood_score],
    )
    return PreparedServing(artifacts, metrics, curves)
