"""Loading insightface .bin sets (Python 2 and 3 pickles, bad files) and evaluating a network,
in one process and split over a real 2-rank gloo group."""

from __future__ import annotations

import io
import pickle
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.distributed import run_world
from tests.evaluation.conftest import jpeg, make_bin, random_faces
from trainer.backbones import get_backbone
from trainer.evaluation.embedder import TorchEmbedder, embed, preprocess
from trainer.evaluation.verification import (
    batch_ranges, embed_distributed, evaluate_embeddings, evaluate_targets, load_bin,
)


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def python2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """`(bins, issame)` as Python 2's cPickle (protocol 2) writes it: images are py2 `str`
    (BINSTRING opcodes), which Python 3 can only read with `encoding="bytes"`."""
    out = [b"\x80\x02", b"]", b"("]  # PROTO 2, EMPTY_LIST, MARK
    for data in bins:
        out.append(b"T" + struct.pack("<I", len(data)) + data)  # BINSTRING
    out += [b"e", b"]", b"("]  # APPENDS, EMPTY_LIST, MARK
    out += [b"\x88" if same else b"\x89" for same in issame]  # NEWTRUE / NEWFALSE
    out += [b"e", b"\x86", b"."]  # APPENDS, TUPLE2, STOP
    return b"".join(out)


def test_python3_bin_round_trip(tmp_path: Path):
    path = tmp_path / "lfw.bin"
    bins, issame = make_bin(path, num_images=12, num_pairs=20)
    target = load_bin(path)
    assert target.name == "lfw" and target.num_pairs == 20
    assert len(target.images) == len(set(bins)) <= 12  # each distinct image decoded once
    for i in range(20):
        np.testing.assert_array_equal(target.images[target.pairs[i, 0]], decoded(bins[2 * i]))
        np.testing.assert_array_equal(target.images[target.pairs[i, 1]], decoded(bins[2 * i + 1]))
    np.testing.assert_array_equal(target.issame, issame)


def test_python2_pickle_and_numpy_variants(tmp_path: Path):
    bins = [jpeg(face) for face in random_faces(20, seed=1)]
    issame = [i % 2 == 0 for i in range(10)]
    py2 = tmp_path / "py2.bin"
    py2.write_bytes(python2_pickle(bins, issame))
    with pytest.raises(UnicodeDecodeError):  # why the loader must pass encoding="bytes"
        pickle.loads(py2.read_bytes())
    arrays = tmp_path / "arrays.bin"  # images as uint8 arrays of their bytes, labels as an array
    arrays.write_bytes(pickle.dumps(([np.frombuffer(b, np.uint8) for b in bins], np.array(issame))))
    for path in (py2, arrays):
        target = load_bin(path)
        np.testing.assert_array_equal(target.issame, issame)
        np.testing.assert_array_equal(target.images[target.pairs[3, 1]], decoded(bins[7]))


def test_other_sizes_are_resized(tmp_path: Path):
    faces = random_faces(20, seed=2, size=96)
    path = tmp_path / "small.bin"
    pickle.dump(([jpeg(f) for f in faces], [i % 2 == 0 for i in range(10)]), open(path, "wb"))
    assert load_bin(path).images.shape == (20, 112, 112, 3)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"not a pickle at all", "not an insightface verification .bin"),
        (pickle.dumps((["x"] * 3, [True])), "3 images, an odd count"),
        (pickle.dumps(([b"x"] * 4, [True, False, True])), "4 images make 2 pairs but issame_list has 3 labels"),
        (pickle.dumps(([b"\xff\xd8garbage", b"x"] * 10, [True, False] * 5)), "image 0 cannot be decoded"),
        (pickle.dumps(([b"x"] * 4, [True, True])), "needs both genuine and impostor pairs"),
        (pickle.dumps({"bins": []}), "expected a pickled (images, issame_list) pair"),
    ],
    ids=["not-pickle", "odd-count", "issame-length", "undecodable", "one-class", "not-a-pair"],
)
def test_bad_bins_name_the_file(tmp_path: Path, payload: bytes, message: str):
    path = tmp_path / "bad.bin"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + re.escape(message)):
        load_bin(path)


def test_truncated_bin(small_bin: Path):
    data = small_bin.read_bytes()
    small_bin.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"{small_bin}: not an insightface verification .bin")):
        load_bin(small_bin)


def test_a_pickle_that_would_run_code_is_refused(tmp_path: Path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps(([Evil()], [True])))
    with pytest.raises(ValueError, match="builtins.print, which a verification set never holds"):
        load_bin(path)


def test_batch_ranges_cover_every_image_once():
    for n, batch, world in [(10, 4, 2), (7, 4, 3), (100, 8, 4), (3, 64, 2)]:
        ranges = [batch_ranges(n, batch, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(start % batch == 0 for start, _ in ranges)


def test_evaluate_targets_restores_mode_and_matches_direct_embedding(small_bin: Path):
    torch.manual_seed(0)
    module = get_backbone("mobilefacenet", embedding_size=32).train()
    target = load_bin(small_bin)
    result = evaluate_targets(module, [target], "cpu", batch_size=4, flip=True)["small"]
    assert module.training  # mode restored
    assert all(p.grad is None for p in module.parameters())
    direct = embed(TorchEmbedder(module, batch_size=4), preprocess(target.images), flip=True)
    expected = evaluate_embeddings("small", direct, target.pairs, target.issame)
    assert result.accuracy == pytest.approx(expected.accuracy)
    assert result.auc == pytest.approx(expected.auc, abs=1e-6)
    with pytest.raises(ValueError, match="distinct file names"):
        evaluate_targets(module, [target, target], "cpu", batch_size=4, flip=True)


def _evaluate_on_rank(rank: int, world_size: int, bin_path: str) -> tuple[dict, np.ndarray]:
    torch.manual_seed(0)
    module = get_backbone("mobilefacenet", embedding_size=32)
    target = load_bin(bin_path)
    results = evaluate_targets(module, [target], "cpu", batch_size=2, flip=True)
    embeddings = embed_distributed(TorchEmbedder(module, batch_size=2), target.images, True, 2, torch.device("cpu"))
    return results["small"].as_dict(), embeddings


def test_two_ranks_give_exactly_the_single_process_numbers(small_bin: Path):
    """World 2 vs this process without a process group (one torch thread in both)."""
    single = _evaluate_on_rank(0, 1, str(small_bin))
    double = run_world(_evaluate_on_rank, 2, str(small_bin))
    assert len(load_bin(small_bin).images) == 6  # 3 batches of 2: rank 0 embeds 1, rank 1 embeds 2
    for result, embeddings in double:
        assert result == single[0]
        np.testing.assert_array_equal(embeddings, single[1])
