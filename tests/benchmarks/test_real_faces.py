"""benchmarks/real_faces.py's parts: the pairs it scores, the classical baselines it
computes (checked on synthetic data with a known answer, then on the Yale photos when
../shared is present), its table's verdict line, and --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import _faces
from benchmarks.real_faces import print_table

REPO = Path(__file__).resolve().parents[2]
YALE = REPO.parent / "shared" / "data" / "yalefaces"
needs_yale = pytest.mark.skipif(not YALE.is_dir(), reason=f"{YALE} is absent")


def test_pairs_are_every_genuine_pair_and_as_many_distinct_impostors():
    labels = np.repeat(np.arange(5), [11, 11, 10, 11, 10])  # subjects 11-15's photo counts
    pairs, issame = _faces.all_pairs(labels, seed=0)
    genuine = {tuple(p) for p in pairs[issame]}
    assert len(genuine) == issame.sum() == 3 * 55 + 2 * 45 == 255
    assert all(labels[a] == labels[b] and a < b for a, b in genuine)
    impostors = {tuple(p) for p in pairs[~issame]}
    assert len(impostors) == 255 and all(labels[a] != labels[b] for a, b in impostors)
    assert not np.all(issame[::2]) and not np.all(issame[1::2])  # shuffled, so folds are mixed
    again, _ = _faces.all_pairs(labels, seed=0)
    other, _ = _faces.all_pairs(labels, seed=1)
    assert np.array_equal(pairs, again) and not np.array_equal(pairs, other)


def test_lda_finds_the_discriminant_direction_pca_ranks_last():
    """Classes differ along a low-variance axis while a high-variance one is noise: the
    leading principal axis is the noise, Fisher's direction is the class axis."""
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 200)
    z = np.stack([rng.normal(0, 10, 400), labels * 3.0 + rng.normal(0, 0.5, 400)], axis=1)
    direction = _faces._lda(z, labels)[:, 0]
    assert abs(direction[1]) / np.linalg.norm(direction) > 0.99
    _, axes = _faces._pca(z)
    assert abs(axes[0, 0]) > 0.99


def test_verdict_line_names_the_best_classical_and_the_margin(capsys):
    rows = [
        {"kind": "classical", "name": "raw pixels", "method": "raw", "accuracy": [0.85], "auc": [0.9], "seconds": [1]},
        {"kind": "classical", "name": "fisherfaces (PCA 30 + LDA)", "method": "fisherfaces",
         "accuracy": [0.871], "auc": [0.9], "seconds": [1]},
        {"kind": "trained", "name": "arcshard", "accuracy": [0.90, 0.92, 0.916], "auc": [0.95] * 3, "seconds": [60] * 3},
    ]
    verdict = print_table(rows, _faces.TEST, 550, "crop")
    assert verdict == "verdict: trained 0.912 ± 0.009, best classical fisherfaces 0.871, margin +0.041"
    assert capsys.readouterr().out.strip().splitlines()[-1] == verdict


@needs_yale
def test_classical_baselines_on_yale_are_deterministic_and_above_chance():
    first = _faces.classical(YALE, _faces.TEST, "crop", pairs_seed=0)
    assert [c.method for c in first] == ["raw", "eigen", "fisher"]
    assert all(0.7 < c.result.accuracy < 1.0 and c.result.num_pairs == 550 for c in first)
    again = _faces.classical(YALE, _faces.TEST, "crop", pairs_seed=0)
    assert [c.result.accuracy for c in again] == [c.result.accuracy for c in first]
    assert first[1].dims in _faces.EIGEN_DIMS and first[2].dims in _faces.FISHER_PCA_DIMS


def test_help():
    done = subprocess.run([sys.executable, "benchmarks/real_faces.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "verdict" in done.stdout and "--split" in done.stdout
