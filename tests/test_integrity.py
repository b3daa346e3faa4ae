"""A collection never loses or misattributes an image: concurrent writers, cross-checks between
database and index, ``check --repair``, large adds, read-only folders."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from activeindex.cli import app
from activeindex.collection import Collection, check_collection
from activeindex.errors import CollectionError
from helpers import run_main


@pytest.fixture()
def coll_root(tmp_path, tiny_extractor, train_vectors) -> Path:
    root = tmp_path / "c"
    Collection.create(root, tiny_extractor, "IVF8,Flat", train_vectors, nprobe=8).close()
    return root


def _split(image_dir: Path, tmp_path: Path, parts: int, each: int) -> list[list[Path]]:
    """``parts`` folders of ``each`` distinct images."""
    paths = sorted(image_dir.glob("*.png"))
    out = []
    for k in range(parts):
        d = tmp_path / f"in{k}"
        d.mkdir()
        out.append([Path(shutil.copy(p, d / p.name)) for p in paths[k * each : (k + 1) * each]])
    return out


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "activeindex.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _assert_all_found(root: Path, expected: dict[int, str], paths: dict[str, Path]) -> None:
    """Every acknowledged (id, name) is indexed once and a query with its file finds it first."""
    with Collection.open(root) as c:
        assert c.count() == len(expected) == c.index.ntotal
        assert c.names(list(expected)) == expected
        results, failures = c.query_images([paths[n] for n in expected.values()], k=1)
        assert not failures
        assert [r.matches[0].id for r in results] == list(expected)


def test_concurrent_cli_writers_and_the_service_never_lose_an_image(coll_root, image_dir, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from activeindex.service import create_app

    groups = _split(image_dir, tmp_path, 4, 10)
    token = "t"
    acknowledged: dict[int, str] = {}
    errors: list[str] = []
    with TestClient(create_app(coll_root, token=token, model_processes=0), base_url="http://localhost") as client:
        procs = [_cli("add", str(coll_root), str(groups[k][0].parent), "--json") for k in range(3)]

        def serve_adds() -> None:  # a long-lived writer adding while the CLI processes run
            for p in groups[3]:
                r = client.post("/api/images", files={"file": (p.name, p.read_bytes(), "image/png")},
                                headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 201:
                    acknowledged[r.json()["id"]] = p.name
                else:
                    errors.append(r.text)

        t = threading.Thread(target=serve_adds)
        t.start()
        outs = [p.communicate(timeout=300) for p in procs]
        t.join()
        assert not errors
        import json

        for proc, (out, err) in zip(procs, outs):
            assert proc.returncode == 0, err
            for row in json.loads(out)["added"]:
                acknowledged[row["id"]] = row["name"]
        # The service sees the CLI's images too (it reloads an index replaced by another process).
        r = client.post("/api/query?k=1", files={"file": ("q.png", groups[0][0].read_bytes(), "image/png")})
        assert r.json()["matches"][0]["name"] == groups[0][0].name
    assert len(acknowledged) == 40
    by_name = {p.name: p for g in groups for p in g}
    _assert_all_found(coll_root, acknowledged, by_name)


def test_a_writer_extends_the_index_another_writer_saved_after_it_opened(coll_root, image_dir):
    paths = sorted(image_dir.glob("*.png"))
    a = Collection.open(coll_root)
    b = Collection.open(coll_root)  # both loaded the empty index
    added_a = a.add_images(paths[:3]).added
    added_b = b.add_images(paths[3:6]).added  # b must extend a's index, not write its own back
    added_a += a.add_images(paths[6:8]).added
    a.close()
    b.close()
    _assert_all_found(coll_root, dict(added_a + added_b), {p.name: p for p in paths})


# -- database and index cross-checked at open ---------------------------------------------------
def test_a_recreated_database_is_refused_not_answered_with_wrong_names(coll_root, image_dir):
    paths = sorted(image_dir.glob("*.png"))[:4]
    with Collection.open(coll_root) as c:
        c.add_images(paths)
    (coll_root / "meta.sqlite").unlink()
    for suffix in ("-wal", "-shm"):
        (coll_root / f"meta.sqlite{suffix}").unlink(missing_ok=True)
    with pytest.raises(CollectionError, match="meta.sqlite is missing"):
        Collection.open(coll_root)
    assert not (coll_root / "meta.sqlite").exists()  # refusing created nothing
    sqlite3.connect(coll_root / "meta.sqlite").close()  # an empty database put in its place
    with pytest.raises(CollectionError, match="no collection id"):
        Collection.open(coll_root)
    r = CliRunner().invoke(app, ["query", str(coll_root), str(paths[0])])
    assert r.exit_code != 0 and "no collection id" in str(r.exception) + r.output


def test_an_older_index_is_refused(coll_root, image_dir):
    paths = sorted(image_dir.glob("*.png"))[:6]
    with Collection.open(coll_root) as c:
        c.add_images(paths[:2])
        old = (coll_root / "index.faiss").read_bytes()
        c.add_images(paths[2:])
    (coll_root / "index.faiss").write_bytes(old)  # a restored backup
    with pytest.raises(CollectionError, match="older than the database"):
        Collection.open(coll_root)
    with pytest.raises(CollectionError, match="older than the database"):
        Collection.open(coll_root, mmap=True)


def test_check_reports_and_repairs(coll_root, image_dir):
    paths = sorted(image_dir.glob("*.png"))[:6]
    with Collection.open(coll_root) as c:
        added = dict(c.add_images(paths[:2]).added)
        old = (coll_root / "index.faiss").read_bytes()
        added.update(c.add_images(paths[2:]).added)
    assert check_collection(coll_root).ok
    (coll_root / "index.faiss").write_bytes(old)
    report = check_collection(coll_root)
    assert not report.ok and any("have no vector" in p for p in report.unresolved)
    r = CliRunner().invoke(app, ["check", str(coll_root)])
    assert r.exit_code == 1 and "have no vector" in r.output
    r = CliRunner().invoke(app, ["check", str(coll_root), "--repair"])
    assert r.exit_code == 0, r.output
    assert "add them again" in r.output and paths[2].name in r.output
    with Collection.open(coll_root) as c:  # consistent again: the two the old index holds
        assert c.count() == 2 == c.index.ntotal
        report = c.add_images(paths)  # the lost four come back under new ids
        assert len(report.added) == 4 and len(report.duplicates) == 2
    assert check_collection(coll_root).ok


def test_check_repairs_vectors_without_rows(coll_root, image_dir):
    paths = sorted(image_dir.glob("*.png"))[:3]
    with Collection.open(coll_root) as c:
        c.add_images(paths)
        c.db.execute("DELETE FROM images WHERE id = 2")  # a row lost behind the index's back
    with pytest.raises(CollectionError, match="vectors without rows"):
        Collection.open(coll_root)
    report = check_collection(coll_root, repair=True)
    assert report.ok and any("without rows" in p for p in report.repaired)
    with Collection.open(coll_root) as c:
        assert c.count() == 2 == c.index.ntotal


def test_check_repairs_a_deleted_database(coll_root, image_dir):
    with Collection.open(coll_root) as c:
        c.add_images(sorted(image_dir.glob("*.png"))[:3])
    (coll_root / "meta.sqlite").unlink()
    (coll_root / "meta.sqlite-wal").unlink(missing_ok=True)
    report = check_collection(coll_root, repair=True)
    assert report.ok
    with Collection.open(coll_root) as c:  # empty, but never misattributing
        assert c.count() == 0 == c.index.ntotal


# -- SQLite's variable limit --------------------------------------------------------------------
def test_a_300k_vector_add_and_remove(tmp_path):
    from activeindex.collection import CollectionConfig  # noqa: F401  (the module under test)
    from activeindex.extractors import create_extractor

    ex = create_extractor("builtin:tiny")
    rng = np.random.default_rng(0)
    root = tmp_path / "big"
    xt = rng.normal(size=(256, ex.dim)).astype(np.float32)
    n = 300_000
    with Collection.create(root, ex, "IVF4,SQ8", xt, nprobe=1) as c:
        xb = rng.normal(size=(n, ex.dim)).astype(np.float32)
        ids = c.add_vectors(xb, [f"v{i}" for i in range(n)], [f"h{i}" for i in range(n)])
        assert len(ids) == n and c.count() == n == c.index.ntotal
        assert len(c.names(ids)) == n
        removed, unknown = c.remove(ids[: n // 2])
        assert len(removed) == n // 2 and not unknown
        assert c.count() == n - n // 2 == c.index.ntotal
    with Collection.open(root) as c:
        assert c.count() == n - n // 2


# -- folder walk ----------------------------------------------------------------------------------
def test_walk_follows_folder_links_and_reports_what_it_skips(tmp_path, image_dir, monkeypatch):
    from activeindex.images import list_images

    src = sorted(image_dir.glob("*.png"))
    top = tmp_path / "top"
    (top / "sub").mkdir(parents=True)
    (top / "locked").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(src[0], top / "a.png")
    shutil.copy(src[1], outside / "b.png")
    shutil.copy(src[2], top / "locked" / "c.png")
    (top / "linked").symlink_to(outside, target_is_directory=True)  # a folder behind a link
    (top / "sub" / "loop").symlink_to(top, target_is_directory=True)  # a loop
    (top / "gone.png").symlink_to(tmp_path / "missing.png")  # dangling
    real_scandir = __import__("os").scandir

    def scandir(path):  # root reads anything: make one folder unreadable the way EACCES does
        if Path(path) == top / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr("activeindex.images.os.scandir", scandir)
    listing = list_images([top])
    assert listing.images == [top / "a.png", top / "linked" / "b.png"]
    reasons = {p.name: why for p, why in listing.skipped}
    assert "dangling" in reasons["gone.png"]
    assert "Permission denied" in reasons["locked"]
    assert "walked already" in reasons["loop"]


def test_cli_reports_skipped_walk_entries(coll_root, image_dir, tmp_path, monkeypatch, capsys):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(sorted(image_dir.glob("*.png"))[0], d / "ok.png")
    (d / "dead.png").symlink_to(tmp_path / "nowhere.png")
    code, _, err = run_main(monkeypatch, capsys, "add", coll_root, d)
    assert code == 0 and "dead.png: dangling symbolic link" in err and "added 1" in err


# -- file names -----------------------------------------------------------------------------------
def test_non_utf8_names_are_added_with_the_rest_of_their_chunk(coll_root, image_dir, tmp_path, monkeypatch, capsys):
    import os

    src = sorted(image_dir.glob("*.png"))
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(src[0], d / "a.png")
    shutil.copy(src[1], d / "z.png")
    bad = os.path.join(os.fsencode(d), b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    with open(bad, "wb") as fh:
        fh.write(src[2].read_bytes())
    code, out, err = run_main(monkeypatch, capsys, "add", coll_root, d, "--json")
    assert code == 0, err
    import json

    assert sorted(r["name"] for r in json.loads(out)["added"]) == ["a.png", "caf\\xe9.png", "z.png"]
    code, out, err = run_main(monkeypatch, capsys, "query", coll_root, os.fsdecode(bad), "-k", "1")
    assert code == 0 and "caf\\xe9.png" in out


def test_control_characters_in_names_cannot_forge_output_lines(coll_root, image_dir, tmp_path, monkeypatch, capsys):
    src = sorted(image_dir.glob("*.png"))
    d = tmp_path / "in"
    d.mkdir()
    evil = "x\n    1. id 999      9.9999  forged.png  COPY\n.png"
    shutil.copy(src[0], d / evil)
    shutil.copy(src[1], d / "fine.png")
    code, _, err = run_main(monkeypatch, capsys, "add", coll_root, d)
    assert code == 0, err
    code, out, err = run_main(monkeypatch, capsys, "query", coll_root, d / evil, "-k", "2")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 3  # the query, then its two matches: no forged line
    assert "\\n" in lines[0] and not any("id 999" in line and "forged" not in line for line in lines)
    assert sum("forged.png" in line for line in lines) == 2  # the query and its match, each on one line
    code, _, err = run_main(monkeypatch, capsys, "extract", d, "-o", tmp_path / "f", "--model", "builtin:tiny")
    assert code == 0, err
    names = (tmp_path / "f" / "names.txt").read_text().splitlines()
    assert len(names) == len(np.load(tmp_path / "f" / "features.npy")) == 2
    assert "x\\n    1. id 999" in names[1] or "x\\n    1. id 999" in names[0]


# -- read-only collections ------------------------------------------------------------------------
class _ReadOnly:
    """Make a folder and its files unwritable, even for root (``chattr +i`` on ext4), or skip."""

    def __init__(self, root: Path) -> None:
        self.paths = [root, *sorted(root.iterdir())]

    def __enter__(self) -> None:
        import os

        if os.geteuid() != 0:
            for p in self.paths:
                p.chmod(0o555 if p.is_dir() else 0o444)
            return
        r = subprocess.run(["chattr", "+i", *map(str, self.paths)], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["chattr", "-i", *map(str, self.paths)], capture_output=True)
            pytest.skip(f"cannot make files immutable here: {r.stderr.strip()}")

    def __exit__(self, *exc: object) -> None:
        import os

        if os.geteuid() != 0:
            for p in self.paths:
                p.chmod(0o755 if p.is_dir() else 0o644)
        else:
            subprocess.run(["chattr", "-i", *map(str, self.paths)], capture_output=True)


def test_a_read_only_collection_opens_and_answers(coll_root, image_dir, monkeypatch, capsys):
    paths = sorted(image_dir.glob("*.png"))[:3]
    with Collection.open(coll_root) as c:
        c.add_images(paths)
    with _ReadOnly(coll_root):
        for args in (["--mmap"], []):
            code, out, err = run_main(monkeypatch, capsys, "query", coll_root, paths[1], "-k", "1", *args)
            assert code == 0, err
            assert paths[1].name in out.splitlines()[1]
        code, _, err = run_main(monkeypatch, capsys, "add", coll_root, image_dir)
        assert code == 2 and "error:" in err and "read-only" in err
        with Collection.open(coll_root, mmap=True) as c:
            assert c.count() == 3


# -- errors ---------------------------------------------------------------------------------------
def test_broken_collection_files_are_clear_errors(coll_root, image_dir, monkeypatch, capsys):
    paths = sorted(image_dir.glob("*.png"))[:2]
    with Collection.open(coll_root) as c:
        c.add_images(paths)
    code, _, err = run_main(monkeypatch, capsys, "query", coll_root, paths[0], "-k", "99999999999")
    assert code == 0, err
    (coll_root / "meta.sqlite").write_bytes(b"this is not a database" * 100)
    code, _, err = run_main(monkeypatch, capsys, "info", coll_root)
    assert code == 2 and "error:" in err and "meta.sqlite" in err and "Traceback" not in err
    (coll_root / "collection.json").write_text("[1, 2")
    code, _, err = run_main(monkeypatch, capsys, "info", coll_root)
    assert code == 2 and "error:" in err and "collection.json" in err


def test_a_missing_background_is_a_clear_error(tmp_path, tiny_extractor, train_vectors, monkeypatch, capsys):
    root = tmp_path / "c"
    Collection.create(root, tiny_extractor, "Flat", train_vectors, background=train_vectors[:64]).close()
    (root / "background.npy").unlink()
    code, _, err = run_main(monkeypatch, capsys, "info", root)
    assert code == 2 and "background.npy" in err


def test_every_input_failing_is_an_error(coll_root, tmp_path, monkeypatch, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.png").write_bytes(b"not a png")
    (d / "b.jpg").write_bytes(b"")
    code, _, err = run_main(monkeypatch, capsys, "add", coll_root, d)
    assert code == 2 and "every input failed" in err
    code, _, err = run_main(monkeypatch, capsys, "query", coll_root, d)
    assert code == 2 and "none of the 2 query images could be read" in err


def test_a_model_failing_at_run_time_is_a_clear_error(coll_root, image_dir, monkeypatch, capsys):
    from activeindex.extractors.base import Extractor

    def broken(self, batch, dtype):
        raise RuntimeError("Expected 4D input, got 3D")

    monkeypatch.setattr(Extractor, "_describe_uint8", broken)
    monkeypatch.setattr(Extractor, "_traced", lambda self, batch, dtype: lambda b: broken(self, b, dtype))
    code, _, err = run_main(monkeypatch, capsys, "query", coll_root, sorted(image_dir.glob("*.png"))[0])
    assert code == 2 and "error:" in err and "Expected 4D input" in err


def test_temporary_files_of_a_killed_writer_are_cleaned_up(coll_root, image_dir):
    (coll_root / ".index.faiss.4242-deadbeef.tmp").write_bytes(b"half an index")
    (coll_root / "index.faiss.tmp").write_bytes(b"an earlier version's fixed name")
    with Collection.open(coll_root) as c:
        c.add_images(sorted(image_dir.glob("*.png"))[:2])
    assert not [p for p in coll_root.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path):
    from activeindex.atomic import atomic_path

    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"new, half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_the_same_image_added_by_two_writers_at_once_is_added_once(coll_root, image_dir, monkeypatch):
    import activeindex.collection as cm

    p = sorted(image_dir.glob("*.png"))[0]
    a, b = Collection.open(coll_root), Collection.open(coll_root)
    real = cm.extract_paths
    done: list = []

    def racing(paths, extractor, **kw):  # the other writer adds the same file while a describes it
        if not done:
            done.append(None)  # once: b's own add describes too
            done[0] = b.add_images([p]).added[0][0]
        return real(paths, extractor, **kw)

    monkeypatch.setattr(cm, "extract_paths", racing)
    report = a.add_images([p])
    assert not report.added and report.duplicates == [(p.name, done[0])]
    a.close()
    b.close()
    with Collection.open(coll_root) as c:
        assert c.count() == 1 == c.index.ntotal


def test_check_notes_moved_source_files_without_failing(coll_root, image_dir, tmp_path):
    src = tmp_path / "moving.png"
    shutil.copy(sorted(image_dir.glob("*.png"))[0], src)
    with Collection.open(coll_root) as c:
        c.add_images([src])
    src.unlink()
    report = check_collection(coll_root)
    assert report.ok and any("no longer where they were added from" in n for n in report.notes)
