from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from activeindex.collection import Collection
from activeindex.errors import CollectionError, DimensionError
from activeindex.extractors import create_extractor


@pytest.fixture()
def coll(tmp_path, tiny_extractor, train_vectors):
    c = Collection.create(tmp_path / "c", tiny_extractor, "IVF8,Flat", train_vectors, nprobe=8)
    yield c
    c.close()


def test_create_writes_config_and_refuses_reuse(coll, tiny_extractor, train_vectors):
    cfg = json.loads((coll.root / "collection.json").read_text())
    assert cfg["factory"] == "IVF8,Flat" and cfg["dim"] == tiny_extractor.dim
    assert cfg["extractor"]["digest"] == tiny_extractor.digest
    assert cfg["extractor"]["preprocessing"]["input_size"] == 32
    with pytest.raises(CollectionError, match="already holds a collection"):
        Collection.create(coll.root, tiny_extractor, "Flat", train_vectors)


def test_add_query_remove_images(coll, image_dir):
    paths = sorted(image_dir.glob("*.png"))[:20]
    report = coll.add_images(paths)
    assert [n for _, n in report.added] == [p.name for p in paths]
    assert not report.duplicates and not report.failures
    results, failures = coll.query_images(paths[:5], k=3)
    assert not failures
    for path, r in zip(paths[:5], results):
        assert r.matches[0].name == path.name  # an indexed image finds itself first
        assert r.matches[0].copy is None  # no calibrated threshold yet
    first_id = report.added[0][0]
    removed, unknown = coll.remove([first_id, 99999])
    assert removed == [first_id] and unknown == [99999]
    results, _ = coll.query_images(paths[:1], k=20)
    assert all(m.id != first_id for m in results[0].matches)
    assert coll.count() == 19 and coll.index.ntotal == 19


def test_duplicates_by_content_are_reported_not_added(coll, image_dir, tmp_path):
    src = sorted(image_dir.glob("*.png"))[0]
    copy = tmp_path / "same-bytes.png"
    copy.write_bytes(src.read_bytes())
    report = coll.add_images([src, copy])  # a repeat inside one batch
    assert len(report.added) == 1
    assert report.duplicates == [("same-bytes.png", report.added[0][0])]
    again = coll.add_images([src])  # a repeat of an indexed image
    assert not again.added and again.duplicates == [(src.name, report.added[0][0])]
    assert coll.index.ntotal == 1


def test_reopen_checks_the_extractor_digest(coll, image_dir):
    coll.add_images(sorted(image_dir.glob("*.png"))[:3])
    root = coll.root
    coll.close()
    with Collection.open(root) as again:
        assert again.count() == 3
        assert again.extractor.digest == json.loads((root / "collection.json").read_text())["extractor"]["digest"]
    other = create_extractor("builtin:tiny")
    torch_param = next(other.model.parameters())
    torch_param.data.add_(0.01)  # other weights, same architecture
    from activeindex.extractors.base import state_dict_digest

    other.digest = state_dict_digest(other.model)
    with pytest.raises(CollectionError, match="descriptors of different models cannot be compared"):
        Collection.open(root, extractor=other)


def test_wrong_dimension_is_refused(coll):
    with pytest.raises(DimensionError, match="expected"):
        coll.add_vectors(np.zeros((2, 7), np.float32), ["a", "b"], ["h1", "h2"])


def test_interrupted_add_is_recovered_and_rerun_completes(coll, image_dir, monkeypatch):
    paths = sorted(image_dir.glob("*.png"))[:6]
    coll.add_images(paths[:2])
    from activeindex.features import extract_paths

    res = extract_paths(paths[2:], coll.extractor)

    def crash(ids):  # the process dies after the index write, before the rows are marked
        raise RuntimeError("injected failure")

    monkeypatch.setattr(coll, "_mark_indexed", crash)
    with pytest.raises(RuntimeError, match="injected"):
        coll.add_vectors(res.features, [p.name for p in res.paths], ["x%d" % i for i in range(4)])
    root = coll.root
    coll.close()
    # The crash left 4 pending rows and 4 vectors in the index file.
    db = sqlite3.connect(root / "meta.sqlite")
    assert db.execute("SELECT COUNT(*) FROM images WHERE status='pending'").fetchone()[0] == 4
    db.close()
    with Collection.open(root) as again:  # recovery removes the half-added images
        assert again.count() == 2 and again.index.ntotal == 2
        report = again.add_images(paths)  # the rerun adds the rest, no duplicate ids
        assert len(report.added) == 4 and len(report.duplicates) == 2
        ids = [r[0] for r in again.db.execute("SELECT id FROM images")]
        assert len(ids) == len(set(ids)) == 6 == again.index.ntotal
        assert min(i for i, _ in report.added) > 6  # ids of the crashed add are never reused


def test_open_missing_collection(tmp_path):
    with pytest.raises(CollectionError, match="not a collection"):
        Collection.open(tmp_path)


def test_info(coll, image_dir):
    coll.add_images(sorted(image_dir.glob("*.png"))[:4])
    info = coll.info()
    assert info["images"] == 4 and info["index_ntotal"] == 4 and info["by_mode"] == {"passive": 4}
