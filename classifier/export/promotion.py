"""The promotion rule: when a newly registered version becomes ``@champion``, on evidence.

On a test set of a few hundred images one image is a fraction of a point, so a raw gain
says little. The challenger and the champion are scored on the same test images, and the
rule looks at the images they disagree on: ``b`` that only the challenger gets right, ``c``
that only the champion does. With no difference between the two models, each of those
``b + c`` images is equally likely to fall either way, so McNemar's exact test (a binomial
test of ``b`` out of ``b + c`` at 1/2) says how surprising the split is.

The new version becomes ``@champion`` when:

1. its accuracy clears ``export.accuracy_floor``: a fixed number, or ``auto``, meaning
   significantly better than always answering the test set's largest class (an exact
   binomial test at ``export.promotion_alpha``), which makes sense for any data set;
2. there is no champion yet; or it beats the champion by at least
   ``export.promotion_margin`` *and* McNemar's one-sided exact test says it is better at
   ``export.promotion_alpha``.

Otherwise it is registered, and which alias it gets depends on the same paired test,
one-sided the other way (is it *worse*?), at ``export.promotion_alpha``:

3. significantly worse than the champion: no alias at all (the record and the model
   card say why), so a broken model is never the one ``@challenger`` points at;
4. significantly worse than the current ``@challenger``, scored on the same images: no
   alias either, the challenger stays;
5. otherwise it becomes ``@challenger``.

The record gives the paired difference in
accuracy, ``(b - c) / n``, with a 95 % interval: the exact (Clopper-Pearson) interval of
``b / (b + c)``, the quantity McNemar's test is about, carried over to the difference
(conditional on the ``b + c`` images that differ, as the test is).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from classifier.config import ExportParams

CHAMPION = "champion"
CHALLENGER = "challenger"
NO_ALIAS = "none"  # promotion.decision of a version that gets no alias
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Paired:
    """Two models' answers on the same images: where they differ, and what that says."""

    images: int
    challenger_only: int  # right by the challenger alone
    champion_only: int  # right by the champion alone
    difference: float  # challenger's accuracy minus the champion's
    ci_low: float
    ci_high: float
    p_value: float  # one-sided exact McNemar: the challenger is better
    p_two_sided: float  # two-sided exact McNemar: the two differ
    p_worse: float = 1.0  # one-sided exact McNemar: the challenger is worse

    def describe(self, other: str = "champion", *, worse: bool = False) -> str:
        """The difference, its interval, the split of the images that differ and the p-value
        of the one-sided test (that it is better, or with ``worse`` that it is worse)."""
        test = f"p={self.p_worse:.3g} that it is worse" if worse else f"p={self.p_value:.3g}"
        return (
            f"{self.difference:+.4f} ({CONFIDENCE:.0%} CI {self.ci_low:+.4f} to "
            f"{self.ci_high:+.4f}; {self.challenger_only} images right only by it, "
            f"{self.champion_only} only by the {other}; McNemar exact {test})"
        )


def compare_paired(challenger_correct: np.ndarray, champion_correct: np.ndarray) -> Paired:
    """McNemar's exact tests and the interval of the paired difference in accuracy."""
    from scipy.stats import binomtest

    challenger_correct = np.asarray(challenger_correct, bool)
    champion_correct = np.asarray(champion_correct, bool)
    images = len(challenger_correct)
    b = int(np.sum(challenger_correct & ~champion_correct))
    c = int(np.sum(champion_correct & ~challenger_correct))
    discordant = b + c
    if discordant == 0:
        return Paired(images, 0, 0, 0.0, 0.0, 0.0, 1.0, 1.0)
    one_sided = binomtest(b, discordant, 0.5, alternative="greater")
    worse = binomtest(c, discordant, 0.5, alternative="greater")
    two_sided = binomtest(b, discordant, 0.5, alternative="two-sided")
    interval = two_sided.proportion_ci(confidence_level=CONFIDENCE, method="exact")
    scale = discordant / images
    return Paired(
        images=images,
        challenger_only=b,
        champion_only=c,
        difference=(b - c) / images,
        ci_low=scale * (2 * interval.low - 1),
        ci_high=scale * (2 * interval.high - 1),
        p_value=float(one_sided.pvalue),
        p_two_sided=float(two_sided.pvalue),
        p_worse=float(worse.pvalue),
    )


@dataclass(frozen=True)
class Floor:
    """Whether a model's accuracy clears the floor, and how that was decided."""

    cleared: bool
    reason: str
    value: float  # the accuracy to clear (for auto: always guessing the largest class)
    kind: str  # auto or fixed
    p_value: float | None = None


def clear_floor(correct: np.ndarray, labels: np.ndarray, cfg: ExportParams) -> Floor:
    """The floor of ``export.accuracy_floor``, fixed or ``auto``, for these test answers."""
    from scipy.stats import binomtest

    correct = np.asarray(correct, bool)
    accuracy = float(correct.mean())
    if cfg.accuracy_floor != "auto":
        floor = float(cfg.accuracy_floor)
        if accuracy >= floor:
            return Floor(
                True, f"test accuracy {accuracy:.4f} clears the floor {floor}", floor, "fixed"
            )
        return Floor(
            False, f"test accuracy {accuracy:.4f} is below the floor {floor}", floor, "fixed"
        )
    counts = np.bincount(np.asarray(labels), minlength=1)
    chance = float(counts.max() / counts.sum())
    p_value = float(binomtest(int(correct.sum()), len(correct), chance, "greater").pvalue)
    versus = f"always guessing the largest class ({chance:.4f}): exact binomial p={p_value:.3g}"
    if p_value < cfg.promotion_alpha:
        reason = f"test accuracy {accuracy:.4f} is significantly above {versus}"
        return Floor(True, reason, chance, "auto", p_value)
    reason = (
        f"test accuracy {accuracy:.4f} is not significantly above {versus} >= {cfg.promotion_alpha}"
    )
    return Floor(False, reason, chance, "auto", p_value)


@dataclass(frozen=True)
class Decision:
    """Whether the new model becomes champion, why, and the evidence."""

    promoted: bool
    reason: str
    floor: Floor
    paired: Paired | None = None
    champion_version: int | None = None
    # Not promoted: whether it may take @challenger (False: it is significantly worse than
    # the champion or the challenger, and gets no alias).
    challenger: bool = True
    versus_challenger: Paired | None = None  # against the current @challenger, if scored
    challenger_version: int | None = None

    @property
    def alias(self) -> str | None:
        """The alias the new version gets: champion, challenger, or None."""
        if self.promoted:
            return CHAMPION
        return CHALLENGER if self.challenger else None

    def summary(self) -> dict:
        """The decision as the DVC metrics file and the registration record give it."""
        return {
            "promoted": self.promoted,
            "alias": self.alias,
            "reason": self.reason,
            "champion_version": self.champion_version,
            "challenger_version": self.challenger_version,
            "floor": asdict(self.floor),
            "paired": None if self.paired is None else asdict(self.paired),
            "versus_challenger": None
            if self.versus_challenger is None
            else asdict(self.versus_challenger),
        }

    def tags(self) -> dict[str, str]:
        """The decision as tags, for the model version and the training run."""
        tags = {
            "promotion.decision": self.alias or NO_ALIAS,
            "promotion.reason": self.reason,
            "promotion.champion_version": ""
            if self.champion_version is None
            else str(self.champion_version),
        }
        if self.paired is not None:
            tags.update(
                {
                    "promotion.difference": f"{self.paired.difference:.6f}",
                    "promotion.ci_low": f"{self.paired.ci_low:.6f}",
                    "promotion.ci_high": f"{self.paired.ci_high:.6f}",
                    "promotion.p_value": f"{self.paired.p_value:.6g}",
                }
            )
        return tags


def significantly_worse(paired: Paired, alpha: float) -> bool:
    """Whether McNemar's one-sided exact test says the new model is worse, at ``alpha``."""
    return paired.p_worse < alpha


@dataclass(frozen=True)
class Incumbent:
    """A registered version the new model is scored against, and its answers."""

    version: int
    correct: np.ndarray


def decide(
    candidate_correct: np.ndarray,
    champion_correct: np.ndarray | None,
    labels: np.ndarray,
    cfg: ExportParams,
    champion_version: int | None = None,
    challenger: Incumbent | None = None,
    champion_name: str | None = None,
) -> Decision:
    """The promotion rule (see the module docstring), on per-image right-or-wrong answers.

    ``challenger`` is the current ``@challenger`` and its answers on the same images, if
    there is one that can be compared. ``champion_name`` says what the champion's answers
    are of, where they are not the ``@champion``'s (``champion version N`` by default).
    """
    floor = clear_floor(candidate_correct, labels, cfg)
    if champion_correct is None:
        if floor.cleared:
            return Decision(True, f"first model to clear the floor: {floor.reason}", floor)
        return _challenger_or_none(
            candidate_correct, floor.reason, floor, None, None, challenger, cfg
        )
    paired = compare_paired(candidate_correct, champion_correct)
    champion_name = champion_name or f"champion version {champion_version}"
    versus = f"{champion_name}: {paired.describe()}"
    if significantly_worse(paired, cfg.promotion_alpha):
        reason = (
            f"no alias: significantly worse (alpha {cfg.promotion_alpha}) than "
            f"{champion_name}: {paired.describe(worse=True)}"
        )
        return Decision(False, reason, floor, paired, champion_version, challenger=False)
    if not floor.cleared:
        reason = floor.reason
    elif paired.difference < cfg.promotion_margin:
        reason = f"gains less than the margin {cfg.promotion_margin} over {versus}"
    elif paired.p_value >= cfg.promotion_alpha:
        reason = f"is not significantly better (alpha {cfg.promotion_alpha}) than {versus}"
    else:
        reason = f"beats {versus}, by at least the margin {cfg.promotion_margin}"
        return Decision(True, reason, floor, paired, champion_version)
    return _challenger_or_none(
        candidate_correct, reason, floor, paired, champion_version, challenger, cfg
    )


def _challenger_or_none(
    candidate_correct: np.ndarray,
    reason: str,
    floor: Floor,
    paired: Paired | None,
    champion_version: int | None,
    challenger: Incumbent | None,
    cfg: ExportParams,
) -> Decision:
    """Not promoted: @challenger, unless significantly worse than the current challenger."""
    evidence = dict(floor=floor, paired=paired, champion_version=champion_version)
    if challenger is None:
        return Decision(False, reason, **evidence)
    versus = compare_paired(candidate_correct, challenger.correct)
    known = dict(versus_challenger=versus, challenger_version=challenger.version)
    if significantly_worse(versus, cfg.promotion_alpha):
        reason = (
            f"no alias: significantly worse (alpha {cfg.promotion_alpha}) than the current "
            f"challenger version {challenger.version}, which stays: "
            f"{versus.describe('challenger', worse=True)}; not promoted: {reason}"
        )
        return Decision(False, reason, **evidence, challenger=False, **known)
    return Decision(False, reason, **evidence, **known)
