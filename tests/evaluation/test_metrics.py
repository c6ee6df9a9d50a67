"""Verification metrics on hand-made scores and embeddings with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from trainer.evaluation.embedder import l2_normalise
from trainer.evaluation.verification import (
    best_threshold, evaluate_embeddings, evaluate_scores, fold_bounds, kfold_accuracy, roc_auc, tar_at_far,
)


def separable_scores(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Alternating genuine/impostor pairs: genuine cosines in [0.4213, 0.9], impostors in [-0.5, 0.3787]."""
    issame = np.arange(n) % 2 == 0
    scores = np.where(issame, rng.uniform(0.4213, 0.9, n), rng.uniform(-0.5, 0.3787, n))
    scores[np.flatnonzero(issame)[0]] = 0.4213  # the lowest genuine and highest impostor
    scores[np.flatnonzero(~issame)[0]] = 0.3787  # pin the gap
    return scores, issame


def test_folds_are_contiguous_like_sklearn_kfold():
    assert fold_bounds(103) == [(0, 11), (11, 22), (22, 33), (33, 43), (43, 53), (53, 63), (63, 73),
                                (73, 83), (83, 93), (93, 103)]
    with pytest.raises(ValueError, match="9 pairs cannot be split into 10 folds"):
        fold_bounds(9)


def test_perfectly_separable_embeddings_score_one():
    rng = np.random.default_rng(0)
    anchors = l2_normalise(rng.normal(size=(300, 64)))
    others = l2_normalise(rng.normal(size=(300, 64)))
    issame = np.arange(300) % 2 == 0
    # genuine: a slightly perturbed copy of the anchor; impostor: an independent vector
    partner = np.where(issame[:, None], l2_normalise(anchors + 0.05 * rng.normal(size=anchors.shape)), others)
    embeddings = np.empty((600, 64), np.float32)
    embeddings[0::2], embeddings[1::2] = anchors, partner
    pairs = np.arange(600).reshape(-1, 2)
    result = evaluate_embeddings("sep", embeddings, pairs, issame)
    assert result.accuracy == 1.0 and result.accuracy_std == 0.0
    assert result.auc == 1.0
    assert result.tar_at_far == {1e-2: 1.0}  # 150 impostors: 1e-3 is not resolvable
    assert result.num_pairs == 300


def test_random_embeddings_score_chance():
    rng = np.random.default_rng(1)
    embeddings = l2_normalise(rng.normal(size=(12000, 128)))
    issame = np.arange(6000) % 2 == 0
    result = evaluate_embeddings("random", embeddings, np.arange(12000).reshape(-1, 2), issame)
    assert abs(result.accuracy - 0.5) < 0.03
    assert abs(result.auc - 0.5) < 0.03
    assert set(result.tar_at_far) == {1e-2, 1e-3}  # 3000 impostors resolve 1e-3
    assert result.tar_at_far[1e-3] < 0.01


def test_known_threshold_and_fold_accuracies():
    """The only best threshold is the midpoint of the gap between 0.3787 and 0.4213, 0.40;
    one impostor at 0.6 in fold 3 (pairs 30..39) costs that fold exactly one pair."""
    scores, issame = separable_scores(100, np.random.default_rng(2))
    assert evaluate_scores("gap", scores, issame).best_threshold == pytest.approx(0.40)
    scores[31] = 0.6  # pair 31 is an impostor
    assert not issame[31]
    folds = kfold_accuracy(scores, issame)
    np.testing.assert_allclose(folds, [1, 1, 1, 0.9, 1, 1, 1, 1, 1, 1])
    result = evaluate_scores("gap", scores, issame)
    assert result.accuracy == pytest.approx(0.99)
    assert result.accuracy_std == pytest.approx(0.03)
    assert result.best_threshold == pytest.approx(0.40)


def brute_force_kfold(scores: np.ndarray, issame: np.ndarray) -> list[float]:
    """The 10-fold protocol written out with loops: every candidate threshold of the
    training folds (midpoints of distinct scores, below all, at the top) tried in turn."""
    n = len(scores)
    sizes = [n // 10 + (k < n % 10) for k in range(10)]
    out, start = [], 0
    for size in sizes:
        test = range(start, start + size)
        train = [i for i in range(n) if i not in test]
        values = sorted({scores[i] for i in train})
        candidates = [values[0] - 1e-9] + [(x + y) / 2 for x, y in zip(values, values[1:])] + [values[-1]]
        correct = [sum((scores[i] > t) == issame[i] for i in train) for t in candidates]
        ties = [t for t, c in zip(candidates, correct) if c == max(correct)]
        best_t = ties[len(ties) // 2]
        out.append(sum((scores[i] > best_t) == issame[i] for i in test) / size)
        start += size
    return out


def brute_force_auc(genuine: np.ndarray, impostor: np.ndarray) -> float:
    wins = sum((g > i) + 0.5 * (g == i) for g in genuine for i in impostor)
    return wins / (len(genuine) * len(impostor))


def brute_force_tar(genuine: np.ndarray, impostor: np.ndarray, far: float) -> float:
    """Max TAR over every threshold (accept score >= t) whose FAR is at most `far`."""
    best = 0.0
    for t in np.concatenate([np.unique(np.concatenate([genuine, impostor])), [np.inf]]):
        if (impostor >= t).mean() <= far + 1e-12:
            best = max(best, (genuine >= t).mean())
    return best


def test_overlapping_scores_match_brute_force():
    rng = np.random.default_rng(3)
    issame = rng.random(213) < 0.4
    # rounded to 2 decimals: many ties, between classes too
    scores = np.round(np.where(issame, rng.normal(0.35, 0.2, 213), rng.normal(0.05, 0.2, 213)), 2)
    np.testing.assert_allclose(kfold_accuracy(scores, issame), brute_force_kfold(scores, issame))
    genuine, impostor = scores[issame], scores[~issame]
    assert roc_auc(scores, issame) == pytest.approx(brute_force_auc(genuine, impostor), abs=1e-12)
    for far in (0.01, 0.05, 0.1, 0.3):
        assert tar_at_far(scores, issame, far) == pytest.approx(brute_force_tar(genuine, impostor, far))


def test_threshold_separates_scores_closer_than_any_fixed_grid():
    """Cosines of an early-training network all lie within 1e-4 of each other."""
    rng = np.random.default_rng(5)
    issame = np.arange(200) % 2 == 0
    scores = 0.9999 + np.where(issame, rng.uniform(5e-5, 1e-4, 200), rng.uniform(0, 4e-5, 200))
    result = evaluate_scores("close", scores, issame)
    assert result.accuracy == 1.0
    assert scores[~issame].max() < result.best_threshold < scores[issame].min()
    assert best_threshold(np.array([0.5, 0.5]), np.array([True, False])) in (0.5, np.nextafter(0.5, 0))


def test_tar_at_far_needs_enough_impostors():
    scores = np.array([0.9, 0.8, 0.1, 0.2, 0.3])
    labels = np.array([True, True, False, False, False])
    assert tar_at_far(scores, labels, 0.5) == 1.0  # 3 impostors, 1 may pass
    assert tar_at_far(scores, labels, 0.1) is None  # 3 impostors cannot resolve 10%
    assert math.isclose(tar_at_far(np.array([0.5, 0.9, 0.7]), np.array([True, False, False]), 0.5), 0.0)


def test_result_as_dict_is_json_ready():
    scores, issame = separable_scores(400, np.random.default_rng(4))
    d = json.loads(json.dumps(evaluate_scores("x", scores, issame).as_dict()))
    assert d == {"name": "x", "accuracy": 1.0, "accuracy_std": 0.0, "best_threshold": pytest.approx(0.40),
                 "auc": 1.0, "tar_at_far": {"1e-02": 1.0}, "num_pairs": 400}
