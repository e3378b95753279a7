"""The monitor's comparison of a window of predictions with the training data."""

import numpy as np
import pytest

from classifier.serving import monitor


def reference(seed: int = 0) -> monitor.Reference:
    rng = np.random.default_rng(seed)
    return monitor.Reference(
        class_names=[str(i) for i in range(10)],
        train_class_counts=np.full(10, 120),
        confidence=rng.beta(20, 1, 400),
        ood_score=rng.gamma(9, 0.6, 400),
        settings={"confidence_threshold": 0.9, "ood_threshold": 11.0},
    )


def records(count: int, seed: int, shifted: bool = False) -> list[dict]:
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, 3 if shifted else 10, count)
    confidence = rng.beta(3, 2, count) if shifted else rng.beta(20, 1, count)
    scores = rng.gamma(9, 2.0, count) if shifted else rng.gamma(9, 0.6, count)
    return [
        {"time": f"2026-01-01T00:00:{i % 60:02d}+00:00", "model": "m", "version": 2,
         "class_index": int(c), "confidence": float(p), "ood_score": float(s),
         "abstain_reason": None}
        for i, (c, p, s) in enumerate(zip(classes, confidence, scores, strict=True))
    ]  # fmt: skip


def test_a_window_like_the_training_data_is_not_flagged():
    comparison = monitor.compare(records(150, seed=1), reference(), alpha=0.01)
    assert [s.name for s in comparison.signals] == ["class mix", "confidence", "ood score"]
    assert not comparison.drift, comparison.summary()
    assert comparison.metrics()["monitor/drift"] == 0.0


def test_a_shifted_window_is_flagged_on_every_signal_with_its_threshold():
    comparison = monitor.compare(records(150, seed=2, shifted=True), reference(), alpha=0.01)
    assert comparison.drift
    assert all(signal.drift and signal.value > signal.threshold for signal in comparison.signals)
    assert comparison.summary()["signals"][0]["statistic"] == "chi-square"


def test_too_small_a_window_is_refused():
    with pytest.raises(monitor.MonitorError, match="only 5 predictions"):
        monitor.compare(records(5, seed=3), reference(), alpha=0.01)


def test_the_report_says_drift_and_escapes_what_it_shows():
    window = records(60, seed=4, shifted=True)
    window[-1]["model"] = "<script>alert(1)</script>"
    comparison = monitor.compare(window, reference(), alpha=0.01)
    html = monitor.render_html(comparison, reference(), window)
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert 'class="drift">drift</span>' in html
    assert html.count("data:image/png;base64,") == 2  # confidence and OOD score


@pytest.mark.parametrize("alpha", [0.01, 0.05])
def test_the_ks_threshold_is_kolmogorovs_critical_value_for_the_two_sample_sizes(alpha):
    from scipy.stats import kstwobign

    rng = np.random.default_rng(4)
    window, reference_values = rng.normal(size=300), rng.normal(size=500)
    signal = monitor.ks_signal("confidence", window, reference_values, alpha)
    # Kolmogorov's limit law: sqrt(n m / (n + m)) D exceeds kstwobign's (1 - alpha) quantile
    # with probability alpha when the two samples come from one distribution.
    expected = kstwobign.isf(alpha) * np.sqrt((300 + 500) / (300 * 500))
    assert signal.threshold == pytest.approx(expected, rel=1e-3)
    assert signal.drift == (signal.value > signal.threshold)
