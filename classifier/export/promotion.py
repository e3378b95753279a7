"""The promotion rule: when a newly registered version becomes ``@champion``.

The new model and the current champion are scored on the same test split. The new
version becomes ``@champion`` only if its accuracy clears ``export.accuracy_floor`` and
beats the champion's by at least ``export.promotion_margin`` (the first model to clear
the floor becomes champion); otherwise it is registered as ``@challenger``.
"""

from __future__ import annotations

from dataclasses import dataclass

from classifier.config import ExportParams

CHAMPION = "champion"
CHALLENGER = "challenger"


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
