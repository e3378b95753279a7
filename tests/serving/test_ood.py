"""Out-of-distribution scores, the abstain rule and the thresholds export chooses."""

import numpy as np
import pytest
from scipy.special import logsumexp

from classifier.serving import ood
from classifier.serving.prepare import (
    SHIFTS,
    abstain_curve,
    confidence_threshold,
    shifted_images,
)


@pytest.fixture(scope="module")
def clusters():
    """Three well-separated Gaussian classes of 8-dimensional features, and a linear head."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (3, 8))
    labels = np.repeat(np.arange(3), 200)
    features = centres[labels] + rng.normal(0, 1, (600, 8))
    weights, bias = rng.normal(0, 1, (8, 3)), rng.normal(0, 1, 3)
    return features, labels, weights, bias


def test_mahalanobis_is_the_whitened_distance_to_the_nearest_class_mean(clusters):
    features, labels, weights, bias = clusters
    statistics = ood.fit(features, labels, 3, weights, bias, temperature=1.0)
    precision = statistics.whitening @ statistics.whitening.T
    probe = features[:5] + 0.5
    expected = [
        min(np.sqrt((row - mean) @ precision @ (row - mean)) for mean in statistics.class_means)
        for row in probe
    ]
    np.testing.assert_allclose(statistics.mahalanobis(probe), expected, rtol=1e-6)
    np.testing.assert_allclose(statistics.class_means[1], features[labels == 1].mean(0))
    # Far from every class is far: a point 50 away scores higher than every training point.
    assert statistics.mahalanobis(np.full((1, 8), 50.0))[0] > statistics.mahalanobis(features).max()


def test_energy_is_minus_t_logsumexp_of_the_logits_over_t(clusters):
    features, labels, weights, bias = clusters
    statistics = ood.fit(features, labels, 3, weights, bias, temperature=1.7)
    logits = features[:7] @ weights + bias
    np.testing.assert_allclose(
        statistics.energy(features[:7]), -1.7 * logsumexp(logits / 1.7, axis=1), rtol=1e-9
    )
    with pytest.raises(ValueError, match="unknown OOD score 'knn'"):
        statistics.score("knn", features)


def test_statistics_and_reference_round_trip_through_a_plain_npz(clusters, tmp_path):
    features, labels, weights, bias = clusters
    statistics = ood.fit(features, labels, 3, weights, bias, temperature=2.0)
    ood.save(tmp_path / "s.npz", statistics, reference_confidence=np.array([0.5, 0.9]))
    loaded, reference = ood.load(tmp_path / "s.npz")
    np.testing.assert_allclose(loaded.mahalanobis(features), statistics.mahalanobis(features))
    assert loaded.temperature == 2.0
    assert list(reference) == ["reference_confidence"]


def test_out_of_distribution_wins_over_low_confidence_and_no_threshold_means_none():
    rule = ood.AbstainRule(confidence_threshold=0.8, ood_threshold=10.0)
    reasons = rule.reasons(np.array([0.9, 0.5, 0.5, 0.95]), np.array([1.0, 2.0, 20.0, 11.0]))
    assert reasons == [None, "low_confidence", "out_of_distribution", "out_of_distribution"]
    without_ood = ood.AbstainRule(0.8, None).reasons(np.array([0.9, 0.5]), np.array([50.0, 1.0]))
    assert without_ood == [None, "low_confidence"]


def test_the_threshold_is_the_lowest_whose_answers_reach_the_target():
    confidence = np.array([0.99, 0.95, 0.9, 0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 1, 0, 1, 0, 1], dtype=bool)
    # Answering >= 0.9 gives 3/4, >= 0.95 gives 2/2: the lowest reaching 0.8 is 0.8 (4/5).
    assert confidence_threshold(confidence, correct, 0.8) == (0.8, True)
    assert confidence_threshold(confidence, correct, 0.95) == (0.95, True)
    # Everything right: answer everything.
    assert confidence_threshold(confidence, np.ones(7, bool), 0.99) == (0.0, True)
    # Never reached: the most accurate threshold, and the target is said to be missed.
    assert confidence_threshold(confidence, np.zeros(7, bool), 0.5) == (0.0, False)


def test_the_abstain_curve_answers_fewer_images_as_the_threshold_rises():
    confidence = np.array([0.99, 0.95, 0.9, 0.6])
    correct = np.array([1, 1, 0, 0], dtype=bool)
    rows = abstain_curve(confidence, correct, np.array([0.5, 0.92, 1.0]))
    assert rows == [
        {"threshold": 0.5, "abstain_rate": 0.0, "accuracy_when_answering": 0.5},
        {"threshold": 0.92, "abstain_rate": 0.5, "accuracy_when_answering": 1.0},
    ]


@pytest.mark.parametrize("kind", [*SHIFTS, "rotated"])
def test_shifted_images_keep_the_shape_and_type_and_change_the_pixels(kind):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 28, 28, 1), dtype=np.uint8)
    shifted = shifted_images(images, kind)
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    assert not np.array_equal(shifted, images)
    np.testing.assert_array_equal(shifted_images(images, kind), shifted)  # deterministic


def test_mahalanobis_uses_the_ledoit_wolf_covariance_of_the_centred_training_features():
    from sklearn.covariance import LedoitWolf

    # One direction spreads 100 times wider than the other: a step along it is ordinary,
    # the same step across it is far. Plain Euclidean distance cannot tell the two apart.
    rng = np.random.default_rng(3)
    labels = np.repeat([0, 1], 200)
    features = rng.normal(size=(400, 2)) * [10.0, 0.1] + np.where(labels[:, None] == 1, 30, 0)
    statistics = ood.fit(features, labels, 2, np.zeros((2, 2)), np.zeros(2), temperature=1.0)
    along, across = np.array([[5.0, 0.0]]), np.array([[0.0, 2.0]])
    # Shrinkage evens the two out somewhat, and still the short step across is the far one.
    assert statistics.mahalanobis(along)[0] < 1.0 < 2.0 < statistics.mahalanobis(across)[0]
    # The value itself, from the shrunk covariance computed here, not the code's whitening.
    means = np.stack([features[labels == k].mean(0) for k in (0, 1)])
    covariance = LedoitWolf(assume_centered=True).fit(features - means[labels]).covariance_
    precision = np.linalg.inv(covariance)
    probe = np.array([[3.0, 0.2], [28.0, -0.3], [12.0, 0.05]])
    expected = [min(np.sqrt((p - m) @ precision @ (p - m)) for m in means) for p in probe]
    np.testing.assert_allclose(statistics.mahalanobis(probe), expected, rtol=1e-6)
