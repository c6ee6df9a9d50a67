"""Real photos: the small-data recipe trained on 10 Yale Face Database people verifies 5
others better than fisherfaces fitted on the same 10 people, and better than its own
initialisation.

The whole path a user takes, as benchmarks/real_faces.py runs it (one seed of its
table): `arcshard-data build` converts subjects 01-10, the trainer trains
trainer/configs/small_faces.yaml on them through torchrun on 2 CPU processes, and the
served (EMA) weights are scored with `evaluate_targets` on every genuine pair of subjects
11-15 plus as many impostor pairs (550). Fisherfaces are computed in the same test on the
same pairs. Skipped when `../shared/data/yalefaces` is absent.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import _faces
from benchmarks.real_faces import build_training_set, parse_args, score_trained, train
from trainer.backbones import get_backbone
from trainer.checkpoint import load_backbone
from trainer.evaluation.verification import VerificationSet, evaluate_targets

REPO = Path(__file__).resolve().parents[2]
YALE = REPO.parent / "shared" / "data" / "yalefaces"
# Accuracy the trained network must gain over fisherfaces of the same run (and over its
# own initialisation). Measured with seed 0, the first seed of the README's table
# (training is deterministic on CPU): trained 0.956, fisherfaces (PCA 45 + LDA) 0.862,
# +0.094; over 3 seeds the gain is +0.049 (0.911 ± 0.036). 0.04 leaves room for changes
# that shift the random streams.
MARGIN = 0.04


@pytest.mark.integration
@pytest.mark.skipif(not YALE.is_dir(), reason=f"{YALE} is absent (the shared data folder next to the repository)")
def test_small_faces_recipe_beats_fisherfaces_on_held_out_people(tmp_path: Path):
    split = _faces.TEST
    data = build_training_set(YALE, split, "crop", tmp_path)
    train(parse_args(["--work", str(tmp_path)]), data, seed=0, out=tmp_path / "run")

    images, labels = _faces.load_subjects(YALE, split.verify, "crop")
    pairs, issame = _faces.all_pairs(labels, seed=0)
    assert len(issame) == 550 and issame.sum() == 275  # 5 people x 11 photos: all 55 pairs each
    target = VerificationSet("heldout", YALE, images, pairs, issame)
    trained, _ = score_trained(tmp_path / "run", target, flip="config", weights="ema")
    assert trained["weights"] == "ema"
    fisher = next(c for c in _faces.classical(YALE, split, "crop", pairs_seed=0) if c.method == "fisher")

    cfg = load_backbone(tmp_path / "run").config
    torch.manual_seed(cfg.run.seed)  # the initialisation training started from
    untrained = get_backbone(cfg.backbone.name, embedding_size=cfg.backbone.embedding_size)
    before = evaluate_targets(untrained, [target], "cpu", batch_size=64, flip=False)["heldout"]
    print(f"\nuntrained {before.accuracy:.3f}, {fisher.name} {fisher.result.accuracy:.3f}, "
          f"trained {trained['accuracy']:.3f}")
    assert trained["accuracy"] >= fisher.result.accuracy + MARGIN
    assert trained["accuracy"] >= before.accuracy + MARGIN
