"""The registered versions a new model is scored against, on the same test images.

The ``@champion`` and the ``@challenger`` where they can be compared (they answer the same
classes and take the same images), and, where nobody holds ``@champion`` any more, the most
accurate earlier version in its place. classifier/export/promotion.py decides on their
answers; stages/export.py registers the result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from classifier.data.dataset import ImageSet
from classifier.errors import StageError
from classifier.export.promotion import CHALLENGER, CHAMPION, Incumbent
from classifier.serving.pyfunc import probabilities_of
from classifier.tracking import registry

log = logging.getLogger(__name__)


class IncomparableChampion(StageError):
    """The champion answers other classes, or takes other images: it cannot be compared."""


@dataclass(frozen=True)
class Champion:
    """The registered model's current champion: its version, and which test images it gets
    right."""

    version: int | None = None
    correct: np.ndarray | None = None
    # Where no version is @champion: what the answers are of (see best_earlier_version).
    name: str | None = None

    @property
    def accuracy(self) -> float | None:
        return None if self.correct is None else float(np.mean(self.correct))


def comparable_champion(
    model_name: str, candidate: registry.ModelInterface
) -> registry.ModelInterface | None:
    """The champion's interface; IncomparableChampion if it is not the candidate's."""
    version = registry.aliased_version(model_name, CHAMPION)
    if version is None:
        return None
    champion = registry.interface_of(version)
    difference = champion.difference(candidate)
    if difference is not None:
        raise IncomparableChampion(
            f"{model_name}@champion (version {version.version}) answers {champion.describe()}; "
            f"this model answers {candidate.describe()}: {difference}, so the two cannot be "
            f"compared and nothing was registered. Register it under its own name: "
            f"dvc exp run -S export.model_name=<a new name>"
        )
    return champion


def _answers(model_name: str, label: str, version: int, model: Any, test: ImageSet) -> np.ndarray:
    """Which of ``test`` a registered version gets right; a broken one is named, not traced."""
    try:
        probabilities = probabilities_of(model.predict(test.images))
    except Exception as error:
        raise StageError(
            f"{model_name}{label} (version {version}) cannot score the test images: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
        ) from None
    return probabilities.argmax(axis=1) == test.labels


def score_champion(model_name: str, test: ImageSet, alias: str = CHAMPION) -> Champion:
    """The version ``alias`` (the champion) points at, and its accuracy on ``test``."""
    found = registry.aliased_model(model_name, alias)
    if found is None:
        return Champion()
    version, model = found
    return Champion(version, _answers(model_name, f"@{alias}", version, model, test))


# With no @champion, at most this many of the newest earlier versions are scored.
EARLIER_SCORED = 10


def best_earlier_version(
    model_name: str, test: ImageSet, candidate: registry.ModelInterface
) -> Champion:
    """With no ``@champion`` (someone removed the alias), the most accurate of the newest
    earlier versions that take these images, scored on ``test``, stands in for it: a new
    model is never "the first to clear the floor" over better versions before it. None
    compared (none exist, or none take these images) is said in the log."""
    earlier = registry.versions_of(model_name)
    comparable = [v for v in earlier if registry.interface_of(v).difference(candidate) is None]
    if not comparable:
        if earlier:
            log.warning(
                "%s has no @champion, and none of its %d versions takes these images: none "
                "compared",
                model_name,
                len(earlier),
            )
        return Champion()
    scored = [
        Champion(int(v.version), _answers(model_name, "", int(v.version), model, test))
        for v in comparable[:EARLIER_SCORED]
        for model in [registry.version_model(model_name, int(v.version))]
    ]
    best = max(scored, key=lambda one: (one.accuracy, one.version))
    name = (
        f"version {best.version}, the most accurate of the {len(scored)} newest earlier "
        "versions (none is @champion)"
    )
    log.warning("%s has no @champion: comparing with %s", model_name, name)
    return Champion(best.version, best.correct, name)


def score_challenger(
    model_name: str, test: ImageSet, candidate: registry.ModelInterface, champion: Champion
) -> Incumbent | None:
    """The current ``@challenger`` and its answers on ``test``, if it can be compared.

    None when there is none, when it is the champion's version, or when it answers other
    classes or takes other images (then it is said, and the new model may replace it).
    """
    version = registry.aliased_version(model_name, CHALLENGER)
    if version is None or int(version.version) == champion.version:
        return None
    difference = registry.interface_of(version).difference(candidate)
    if difference is not None:
        log.info(
            "%s@challenger (version %s) is not compared: %s",
            model_name,
            version.version,
            difference,
        )
        return None
    scored = score_champion(model_name, test, CHALLENGER)
    return None if scored.version is None else Incumbent(scored.version, scored.correct)
