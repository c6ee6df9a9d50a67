"""manifest.json + property: round trip and the checks of load_manifest/check_shard_files."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from data_tools.manifest import (
    Manifest,
    check_shard_files,
    describe_shard,
    load_manifest,
    write_manifest,
)


def _dataset(tmp_path) -> Manifest:
    (tmp_path / "train-00000.rec").write_bytes(b"r" * 40)
    (tmp_path / "train-00000.idx").write_bytes(b"0\t0\n")
    (tmp_path / "train-00001.rec").write_bytes(b"s" * 12)
    (tmp_path / "train-00001.idx").write_bytes(b"0\t0\n1\t8\n")
    shards = [describe_shard(tmp_path, "train-00000.rec", "train-00000.idx", 1),
              describe_shard(tmp_path, "train-00001.rec", "train-00001.idx", 2)]
    m = Manifest(num_images=3, num_classes=2, image_size=(112, 96), shards=shards,
                 class_names=["alice", "bob"], source="/data/faces", tool_version="0.1.0", seed=7)
    write_manifest(tmp_path, m)
    return m


def test_round_trip_and_property(tmp_path):
    m = _dataset(tmp_path)
    assert load_manifest(tmp_path) == m
    assert m.shards[0].rec_sha256 == hashlib.sha256(b"r" * 40).hexdigest()
    assert (m.shards[1].rec_bytes, m.shards[1].idx_bytes) == (12, 8)
    assert (tmp_path / "property").read_text() == "2,112,96\n"
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["format"] == "arcshard-recordio" and data["image_size"] == [112, 96]
    assert not list(tmp_path.glob(".*.tmp"))
    check_shard_files(tmp_path, m)


def _edit(tmp_path, change) -> None:
    path = tmp_path / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format="something"), "not an arcshard-recordio manifest (format='something')"),
    (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
    (lambda d: d.update(num_images=4), "shards hold 3 records but num_images is 4"),
    (lambda d: d.update(class_names=["alice"]), "1 class names for 2 classes"),
    (lambda d: d.pop("num_classes"), "malformed manifest"),
    (lambda d: d.update(surprise=1), "malformed manifest"),
    (lambda d: d["shards"][0].pop("rec_sha256"), "malformed manifest"),
    (lambda d: d.update(image_size=[112]), "malformed manifest"),
    (lambda d: d.update(num_classes="2"), "malformed manifest"),
    (lambda d: d.update(fit="zoom"), "fit 'zoom' is not one of crop, squash, pad"),
    (lambda d: d.update(fit=None), "fit None is not one of crop, squash, pad"),
])
def test_load_errors(tmp_path, change, message):
    _dataset(tmp_path)
    _edit(tmp_path, change)
    with pytest.raises(ValueError, match="manifest.json: ") as err:
        load_manifest(tmp_path)
    assert message in str(err.value)


@pytest.mark.parametrize("text, message", [
    ("{not json", "unreadable manifest"),
    ("[1, 2]", "not an arcshard-recordio manifest (format='list')"),
])
def test_load_errors_unparsable(tmp_path, text, message):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="manifest.json: ") as err:
        load_manifest(tmp_path)
    assert message in str(err.value)


def test_a_manifest_from_before_fit_means_crop(tmp_path):
    m = _dataset(tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())["fit"] == "crop"
    _edit(tmp_path, lambda d: d.pop("fit"))
    assert load_manifest(tmp_path) == m and m.fit == "crop"
    _edit(tmp_path, lambda d: d.update(fit="pad"))
    assert load_manifest(tmp_path).fit == "pad"


def test_missing_manifest(tmp_path):
    with pytest.raises(ValueError, match="no manifest: is .* a dataset made by `arcshard-data build`"):
        load_manifest(tmp_path)


def test_check_shard_files(tmp_path):
    m = _dataset(tmp_path)
    (tmp_path / "train-00001.rec").write_bytes(b"s" * 8)
    with pytest.raises(ValueError, match=r"train-00001.rec: 8 bytes, manifest.json says 12"):
        check_shard_files(tmp_path, m)
    (tmp_path / "train-00000.idx").unlink()
    with pytest.raises(ValueError, match=r"train-00000.idx: listed in manifest.json but missing"):
        check_shard_files(tmp_path, m)


def test_check_shard_files_counts_index_lines(tmp_path):
    m = _dataset(tmp_path)
    check_shard_files(tmp_path, m)  # as written
    m.shards[1] = dataclasses.replace(m.shards[1], num_records=100)  # sizes still match
    with pytest.raises(ValueError, match=r"train-00001.idx: indexes 2 records, manifest.json says 100 "
                                         r"for train-00001.rec; run `arcshard-data verify "):
        check_shard_files(tmp_path, m)


def test_write_manifest_leaves_no_temporary_files(tmp_path):
    _dataset(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
