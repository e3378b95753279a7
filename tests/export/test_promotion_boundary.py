"""The promotion rule at the boundary docs/serving.md states: with no margin and alpha 0.05,
5 images right only by the new model promote it (p = 0.031), 4 do not (p = 0.0625), and a
tie never moves the champion, whatever its size."""

import numpy as np
import pytest

from classifier.export import promotion
from tests.helpers import project_params

LABELS = np.arange(270) % 10
CFG = project_params().export.model_copy(
    update={"accuracy_floor": "auto", "promotion_margin": 0.0, "promotion_alpha": 0.05}
)


def paired(new_only: int, champion_only: int, both: int = 230) -> tuple[np.ndarray, np.ndarray]:
    """Right-or-wrong answers of a new model and the champion on the same 270 images."""
    new, champion = np.zeros(270, bool), np.zeros(270, bool)
    new[:both] = champion[:both] = True
    new[both : both + new_only] = True
    champion[both + new_only : both + new_only + champion_only] = True
    return new, champion


@pytest.mark.parametrize(
    ("new_only", "champion_only", "promoted", "p_value"),
    [(5, 0, True, 0.03125), (4, 0, False, 0.0625), (3, 3, False, 0.65625), (12, 12, False, None)],
)
def test_five_discordant_images_promote_four_do_not_and_a_tie_never_does(
    new_only, champion_only, promoted, p_value
):
    new, champion = paired(new_only, champion_only)
    decision = promotion.decide(new, champion, LABELS, CFG, champion_version=1)
    assert decision.promoted is promoted, decision.reason
    assert (decision.paired.challenger_only, decision.paired.champion_only) == (
        new_only,
        champion_only,
    )
    if p_value is not None:
        assert decision.paired.p_value == pytest.approx(p_value)
