"""SyntheticIdentities: determinism, split invariance, learnability signal, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.data.synthetic import SyntheticIdentities


def make(**overrides) -> SyntheticIdentities:
    args = dict(
        num_classes=50, num_samples=64, batch_size=8, rank=0, world_size=1, image_size=32
    )
    args.update(overrides)
    return SyntheticIdentities(**args)


@pytest.mark.parametrize("mode", ["identities", "noise"])
def test_same_arguments_same_batches(mode):
    a = make(mode=mode, seed=3).batch(epoch=2, step=5)
    b = make(mode=mode, seed=3).batch(epoch=2, step=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_batches_differ_by_step_epoch_seed_and_rank():
    base = make(world_size=2, batch_size=4).batch(0, 0)[0]
    others = [
        make(world_size=2, batch_size=4).batch(0, 1)[0],
        make(world_size=2, batch_size=4).batch(1, 0)[0],
        make(world_size=2, batch_size=4, seed=1).batch(0, 0)[0],
        make(world_size=2, batch_size=4, rank=1).batch(0, 0)[0],
    ]
    for other in others:
        assert not torch.equal(base, other)


def test_resume_reproduces_the_tail_of_an_epoch():
    source = make()
    full = list(source.epoch_batches(epoch=1))
    resumed = list(make().epoch_batches(epoch=1, start_step=5))
    assert len(full) == source.steps_per_epoch == 8 and len(resumed) == 3
    for (xa, ya), (xb, yb) in zip(full[5:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert list(source.epoch_batches(epoch=1, start_step=8)) == []


def test_base_image_cache_is_bounded_and_eviction_does_not_change_images(monkeypatch):
    monkeypatch.setattr("trainer.data.synthetic._CACHE_BYTES", 1)  # room for one image
    tiny = make(num_classes=5)
    tiny_batch = tiny.batch(0, 3)
    assert len(tiny._cache) == 1
    monkeypatch.undo()
    roomy = make(num_classes=5)
    assert torch.equal(tiny_batch[0], roomy.batch(0, 3)[0])
    assert len(roomy._cache) == len(tiny_batch[1].unique())


@pytest.mark.parametrize("mode", ["identities", "noise"])
@pytest.mark.parametrize("world_size", [2, 4])
def test_global_batch_is_independent_of_world_size(mode, world_size):
    one = make(mode=mode, world_size=1, batch_size=8).batch(0, 2)
    ranks = [
        make(mode=mode, world_size=world_size, batch_size=8 // world_size, rank=r).batch(0, 2)
        for r in range(world_size)
    ]
    assert torch.equal(torch.cat([labels for _, labels in ranks]), one[1])
    if mode == "identities":  # noise images are per-rank by design; labels are global
        assert torch.equal(torch.cat([images for images, _ in ranks]), one[0])


@pytest.mark.parametrize("world_size, batch_size", [(1, 8), (2, 4), (3, 2), (4, 3)])
def test_every_rank_runs_the_same_number_of_steps(world_size, batch_size):
    steps = [
        len(list(make(num_samples=50, world_size=world_size, batch_size=batch_size,
                      rank=r, mode="noise").epoch_batches(0)))
        for r in range(world_size)
    ]  # fmt: skip
    assert steps == [50 // (world_size * batch_size)] * world_size


def test_shapes_dtypes_and_ranges():
    images, labels = make(num_classes=7, image_size=112, batch_size=4, num_samples=8).batch(0, 1)
    assert images.shape == (4, 3, 112, 112) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert images.min() >= -1 and images.max() <= 1
    assert images.std() > 0.2  # structured, not flat
    labels = torch.cat([y for _, y in make(num_classes=7, num_samples=400).epoch_batches(0)])
    assert labels.min() >= 0 and labels.max() < 7 and len(labels.unique()) == 7


def test_noise_mode():
    images, labels = make(mode="noise", num_classes=1000, image_size=48).batch(0, 0)
    assert images.shape == (8, 3, 48, 48) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 1000
    assert abs(images.mean()) < 0.05 and abs(images.std() - 1) < 0.05


def test_views_of_one_identity_are_more_alike_than_views_of_two():
    source = make(num_classes=4, num_samples=256, batch_size=64)
    images, labels = source.batch(0, 0)
    flat = F.normalize(images.flatten(1), dim=1)
    cosine = flat @ flat.T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~torch.eye(len(labels), dtype=torch.bool)
    same_mean = cosine[same & off_diagonal].mean()
    other_mean = cosine[~same].mean()
    assert same_mean > other_mean + 0.25, (same_mean, other_mean)
    # ...but views are not copies: the task is not trivial.
    assert cosine[same & off_diagonal].min() < 0.9


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_samples=7), "num_samples 7 is less than one global batch .*batch_size 8"),
        (dict(num_samples=15, world_size=2), "world_size 2 = 16"),
        (dict(num_classes=0), "num_classes 0"),
        (dict(batch_size=0), "batch_size 0"),
        (dict(rank=2, world_size=2), r"rank 2 must be in \[0, world_size=2\)"),
        (dict(world_size=0), "world_size 0"),
        (dict(image_size=8), "image_size 8"),
        (dict(seed=-1), "seed -1"),
        (dict(mode="faces"), "mode 'faces'"),
    ],
)
def test_bad_arguments(overrides, message):
    with pytest.raises(ValueError, match=message):
        make(**overrides)


def test_bad_step_epoch_and_start_step():
    source = make()
    with pytest.raises(ValueError, match=r"step 8 must be in \[0, steps_per_epoch=8\)"):
        source.batch(0, 8)
    with pytest.raises(ValueError, match="epoch -1"):
        source.batch(-1, 0)
    with pytest.raises(ValueError, match="start_step 9"):
        next(source.epoch_batches(0, start_step=9))
