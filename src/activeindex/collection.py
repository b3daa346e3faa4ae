"""A collection: one FAISS index, the extractor spec that fed it, and a SQLite metadata database.

Layout of the folder::

    collection.json   settings (format version, extractor spec + weights digest, factory, metric,
                      score normalisation, the calibrated copy threshold and how it was obtained)
    index.faiss       the FAISS index, with ids (not positions); replaced atomically on every write
    meta.sqlite       one row per image: id, name, path, sha256, added, mode, quality, status
    background.npy    descriptors of training images that score normalisation compares queries to
    calibration.npz   the calibration queries' top-1 scores, to re-derive the threshold for another
                      target without images (see :mod:`activeindex.scoring`)

Crash safety. Adding is a three-step protocol: (1) rows are inserted with status ``pending``, which
reserves their ids (``AUTOINCREMENT`` never reuses an id, even after a rollback or a delete);
(2) the index with the new vectors is written atomically; (3) the rows are marked ``indexed``.
A crash between (1) and (3) leaves ``pending`` rows: the next writer removes their ids from the
index, if it holds them, and deletes the rows, so a rerun adds those images again. Searches only
report ids whose row is ``indexed``. Writers take an exclusive lock on ``.lock``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from activeindex import index as ix
from activeindex.errors import CollectionError
from activeindex.extractors import Extractor, create_extractor
from activeindex.features import Failure, extract_paths
from activeindex.images import file_sha256
from activeindex.scoring import (
    Background,
    CalibrationScores,
    CopyTarget,
    Normalization,
    SINGLE_VIEW,
    Threshold,
    calibrate,
    describe_threshold,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_FILE = "collection.json"
INDEX_FILE = "index.faiss"
DB_FILE = "meta.sqlite"
LOCK_FILE = ".lock"
BACKGROUND_FILE = "background.npy"
CALIBRATION_FILE = "calibration.npz"

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    name    TEXT NOT NULL,
    path    TEXT,
    sha256  TEXT NOT NULL,
    added   REAL NOT NULL,
    mode    TEXT NOT NULL DEFAULT 'passive',   -- passive | activated
    psnr    REAL,
    ssim    REAL,
    linf    REAL,
    status  TEXT NOT NULL DEFAULT 'pending',   -- pending | indexed
    released TEXT                              -- path of the activated file that was released
);
CREATE INDEX IF NOT EXISTS images_sha256 ON images(sha256);
"""


@dataclass(frozen=True)
class CollectionConfig:
    """What ``collection.json`` holds. Written once at creation, read on every open."""

    extractor: dict[str, Any]
    factory: str
    metric: str
    nprobe: int
    dim: int
    created: float
    format_version: int = FORMAT_VERSION
    threshold: float | None = None  # calibrated copy threshold on the score; None until calibrated
    # Threshold.to_dict(): the target (false-positive rate or precision at a prior), the FPR, its
    # bound and the recall measured on calibration, the query counts, how they were drawn, in words.
    threshold_info: dict[str, Any] | None = None
    normalization: dict[str, Any] | None = None  # Normalization.to_dict(); None: raw similarities

    @classmethod
    def load(cls, path: Path) -> CollectionConfig:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CollectionError(f"{path.parent} is not a collection (no {CONFIG_FILE})") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise CollectionError(f"cannot read {path}: {exc}") from exc
        if data.get("format_version") != FORMAT_VERSION:
            raise CollectionError(
                f"{path} has format version {data.get('format_version')}; this activeindex reads "
                f"version {FORMAT_VERSION}"
            )
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then ``os.replace``: a crash leaves the old
    file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


@dataclass(frozen=True)
class Match:
    id: int
    name: str
    score: float  # normalised when the collection normalises scores (see activeindex.scoring)
    copy: bool | None  # score >= the calibrated threshold; None while the collection has none


@dataclass
class AddReport:
    added: list[tuple[int, str]] = field(default_factory=list)  # (id, name)
    duplicates: list[tuple[str, int]] = field(default_factory=list)  # (name, id holding that content)
    failures: list[Failure] = field(default_factory=list)


@dataclass
class QueryResult:
    query: str
    matches: list[Match]


class Collection:
    """Open with :meth:`open`, make with :meth:`create`. Use as a context manager to close the DB."""

    def __init__(self, root: Path, config: CollectionConfig, index: faiss.Index, extractor: Extractor | None) -> None:
        self.root = root
        self.config = config
        self.index = index
        self._extractor = extractor
        self.read_only = False  # set by open(mmap=True): the index is mapped, every write is refused
        self._locked = False  # this object holds the writer lock (see writing())
        self.background: Background | None = None
        if config.normalization is not None:
            xb = np.load(root / BACKGROUND_FILE, allow_pickle=False)
            self.background = Background(xb, config.metric, Normalization(**config.normalization))
        self.db = sqlite3.connect(root / DB_FILE, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(images)")}
        if "released" not in columns:  # collections made before activation existed
            self.db.execute("ALTER TABLE images ADD COLUMN released TEXT")

    # -- life cycle ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        root: str | os.PathLike[str],
        extractor: Extractor,
        factory: str,
        xt: np.ndarray,
        *,
        metric: ix.Metric | str = ix.Metric.L2,
        nprobe: int = 1,
        background: np.ndarray | None = None,
        normalization: Normalization | None = None,
    ) -> Collection:
        """Train ``factory`` on ``xt`` (n, d) and write an empty collection at ``root``.

        ``background`` (nb, d): descriptors of training images to normalise scores against (never
        references); with it, scores are normalised as ``normalization`` says (default β=1, n=3).
        """
        root = Path(root)
        if (root / CONFIG_FILE).exists():
            raise CollectionError(f"{root} already holds a collection")
        if root.exists() and any(root.iterdir()):
            raise CollectionError(f"{root} exists and is not empty; choose a new folder")
        metric = ix.Metric(metric)
        index = ix.build_index(factory, extractor.dim, metric)
        ix.train_index(index, xt)
        ix.set_nprobe(index, nprobe)
        norm = None
        if background is not None:
            background = ix.as_float32_matrix(background, extractor.dim, "background descriptors")
            norm = dataclasses.replace(normalization or Normalization(), background=len(background))
            Background(background, metric, norm)  # validates before anything is written
        root.mkdir(parents=True, exist_ok=True)
        config = CollectionConfig(
            extractor=extractor.describe(),
            factory=factory,
            metric=metric.value,
            nprobe=int(nprobe),
            dim=extractor.dim,
            created=time.time(),
            normalization=None if norm is None else norm.to_dict(),
        )
        ix.write_index_atomic(index, root / INDEX_FILE)
        if background is not None:
            buf = io.BytesIO()
            np.save(buf, background)
            write_bytes_atomic(root / BACKGROUND_FILE, buf.getvalue())
        # collection.json last: its presence marks a complete collection.
        config.save(root / CONFIG_FILE)
        return cls(root, config, index, extractor)

    @classmethod
    def open(
        cls, root: str | os.PathLike[str], *, extractor: Extractor | None = None, mmap: bool = False
    ) -> Collection:
        """Open a collection. ``extractor`` must match the stored digest; by default it is rebuilt
        lazily from the stored spec when images need describing."""
        root = Path(root)
        config = CollectionConfig.load(root / CONFIG_FILE)
        if extractor is not None:
            check_extractor(config, extractor)
        index = ix.read_index(root / INDEX_FILE, mmap=mmap)
        if index.d != config.dim:
            raise CollectionError(f"{root / INDEX_FILE} has d={index.d}, collection.json says {config.dim}")
        ix.set_nprobe(index, config.nprobe)
        coll = cls(root, config, index, extractor)
        coll.read_only = mmap
        if not mmap:
            with coll._write_lock():
                coll._recover_pending()
        return coll

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def extractor(self) -> Extractor:
        if self._extractor is None:
            extractor = create_extractor(self.config.extractor)
            check_extractor(self.config, extractor)
            self._extractor = extractor
        return self._extractor

    @property
    def metric(self) -> ix.Metric:
        return ix.Metric(self.config.metric)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        if self.read_only:
            # A memory-mapped index is a read-only view of the file: FAISS would abort the process
            # on an add, and a write would replace the file under the other readers anyway.
            raise CollectionError(
                f"{self.root} is open read-only (memory-mapped index); open it without mmap to write"
            )
        with open(self.root / LOCK_FILE, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self._locked = True
            try:
                yield
            finally:
                self._locked = False
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _recover_pending(self) -> None:
        """Undo the rows of an add that crashed before completing (see the module docstring)."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM images WHERE status = 'pending'")]
        if not ids:
            return
        logger.warning("recovering %d images of an interrupted add; they will be re-added on rerun", len(ids))
        with contextlib.suppress(Exception):
            # Some index types (HNSW) cannot remove; their orphan vectors stay invisible to search.
            if ix.remove_ids(self.index, np.array(ids)):
                ix.write_index_atomic(self.index, self.root / INDEX_FILE)
        self.db.execute(f"DELETE FROM images WHERE id IN ({','.join('?' * len(ids))})", ids)

    # -- writes --------------------------------------------------------------------------------
    def add_vectors(
        self,
        xb: np.ndarray,
        names: Sequence[str],
        hashes: Sequence[str],
        *,
        paths: Sequence[str | None] | None = None,
        mode: str = "passive",
        quality: Sequence[dict[str, float | None]] | None = None,
        released: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Store descriptors (n, d) with their names and content hashes; returns the new ids.
        Activated images also give the quality of their released file and its path."""
        xb = ix.as_float32_matrix(xb, self.config.dim, "descriptors")
        n = len(xb)
        if len(names) != n or len(hashes) != n:
            raise ValueError(f"{n} descriptors but {len(names)} names and {len(hashes)} hashes")
        if n == 0:
            return []
        paths = list(paths) if paths is not None else [None] * n
        quality = list(quality) if quality is not None else [{}] * n
        released = list(released) if released is not None else [None] * n
        now = time.time()
        with self._write_lock():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                ids = []
                for name, sha, path, q, rel in zip(names, hashes, paths, quality, released):
                    cur = self.db.execute(
                        "INSERT INTO images (name, path, sha256, added, mode, psnr, ssim, linf, released) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, path, sha, now, mode, q.get("psnr"), q.get("ssim"), q.get("linf"), rel),
                    )
                    ids.append(int(cur.lastrowid))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            ix.add_with_ids(self.index, xb, np.array(ids))
            ix.write_index_atomic(self.index, self.root / INDEX_FILE)
            self._mark_indexed(ids)
        return ids

    def _mark_indexed(self, ids: list[int]) -> None:
        """Step (3) of an add: the rows become visible to searches."""
        self.db.execute(
            f"UPDATE images SET status = 'indexed' WHERE id IN ({','.join('?' * len(ids))})", ids
        )

    # -- an add driven step by step (the distributed driver: activeindex.distributed) -----------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock across the steps of an add driven from outside: :meth:`reserve_ids`
        (1), vectors or merged shard indexes put into ``self.index``, then :meth:`complete_add` (2, 3).
        Pending rows of a writer that crashed are rolled back first. Do not call :meth:`add_vectors`
        or :meth:`remove` inside (they take the lock themselves)."""
        with self._write_lock():
            self._recover_pending()
            yield

    def _require_lock(self, what: str) -> None:
        if not self._locked:
            raise CollectionError(f"{what} needs the writer lock: call it inside `with collection.writing():`")

    def reserve_ids(
        self,
        names: Sequence[str],
        hashes: Sequence[str],
        *,
        paths: Sequence[str | None] | None = None,
        mode: str = "passive",
    ) -> list[int]:
        """Step (1) for work done elsewhere: insert ``pending`` rows in one transaction and return
        their ids, in order. The rows stay invisible to searches until :meth:`complete_add`; a crash
        before that rolls them back (next open), and the ids are never reused."""
        self._require_lock("reserve_ids")
        if len(names) != len(hashes):
            raise ValueError(f"{len(names)} names but {len(hashes)} hashes")
        paths = list(paths) if paths is not None else [None] * len(names)
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ids = [
                int(
                    self.db.execute(
                        "INSERT INTO images (name, path, sha256, added, mode) VALUES (?, ?, ?, ?, ?)",
                        (name, path, sha, now, mode),
                    ).lastrowid
                )
                for name, sha, path in zip(names, hashes, paths)
            ]
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return ids

    def complete_add(
        self,
        ids: Sequence[int],
        *,
        dropped: Sequence[int] = (),
        quality: Sequence[dict[str, float | None]] | None = None,
        released: Sequence[str | None] | None = None,
    ) -> None:
        """Steps (2) and (3) for reserved ids whose vectors are now in ``self.index``: write the index
        atomically, then, in one transaction, record each released file's quality and path, mark the
        rows ``indexed`` and delete the rows of ``dropped`` ids (reserved for images that failed)."""
        self._require_lock("complete_add")
        ids = [int(i) for i in ids]
        quality = list(quality) if quality is not None else [{}] * len(ids)
        released = list(released) if released is not None else [None] * len(ids)
        if len(quality) != len(ids) or len(released) != len(ids):
            raise ValueError(f"{len(ids)} ids but {len(quality)} quality records and {len(released)} released paths")
        if ids:
            ix.write_index_atomic(self.index, self.root / INDEX_FILE)
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.executemany(
                "UPDATE images SET psnr = ?, ssim = ?, linf = ?, released = ?, status = 'indexed' "
                "WHERE id = ? AND status = 'pending'",
                [(q.get("psnr"), q.get("ssim"), q.get("linf"), rel, i) for i, q, rel in zip(ids, quality, released)],
            )
            self.db.executemany(
                "DELETE FROM images WHERE id = ? AND status = 'pending'", [(int(i),) for i in dropped]
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def add_images(
        self,
        paths: Sequence[str | os.PathLike[str]],
        *,
        names: Sequence[str] | None = None,
        chunk_size: int = 512,
        progress: Callable[[int], None] | None = None,
    ) -> AddReport:
        """Describe and add image files, ``chunk_size`` at a time (each chunk is durable once done,
        so an interrupted run loses at most one chunk and a rerun skips what is in).
        Files whose content is already in the collection are reported as duplicates."""
        paths = [Path(p) for p in paths]
        names = list(names) if names is not None else [p.name for p in paths]
        report = AddReport()
        for start in range(0, len(paths), chunk_size):
            chunk = list(zip(paths[start : start + chunk_size], names[start : start + chunk_size]))
            todo, repeats = self.plan_add(chunk, report)
            skipped = len(chunk) - len(todo)
            if progress and skipped:
                progress(skipped)
            result = extract_paths([t[0] for t in todo], self.extractor, progress=progress)
            report.failures.extend(result.failures)
            ok = {p: i for i, p in enumerate(result.paths)}
            kept = [t for t in todo if t[0] in ok]
            ids = self.add_vectors(
                result.features[[ok[t[0]] for t in kept]],
                [t[1] for t in kept],
                [t[2] for t in kept],
                paths=[str(t[0].resolve()) for t in kept],
            )
            report.added.extend(zip(ids, (t[1] for t in kept)))
            self.resolve_repeats(repeats, report)
        return report

    def plan_add(
        self, chunk: Sequence[tuple[Path, str]], report: AddReport
    ) -> tuple[list[tuple[Path, str, str]], list[tuple[str, str]]]:
        """Hash (path, name) pairs and sort them out: → (to add: (path, name, sha256), repeats of a
        file earlier in ``chunk``: (name, sha256)). Content already in the collection goes to
        ``report.duplicates``, unreadable files to ``report.failures``."""
        todo: list[tuple[Path, str, str]] = []
        seen: set[str] = set()
        repeats: list[tuple[str, str]] = []
        for path, name in chunk:
            try:
                sha = file_sha256(path)
            except OSError as exc:
                report.failures.append(Failure(path, f"cannot read file ({exc.strerror or exc})"))
                continue
            existing = self.find_hash(sha)
            if existing is not None:
                report.duplicates.append((name, existing))
            elif sha in seen:
                repeats.append((name, sha))
            else:
                seen.add(sha)
                todo.append((path, name, sha))
        return todo, repeats

    def resolve_repeats(self, repeats: Sequence[tuple[str, str]], report: AddReport) -> None:
        """Report repeats of a file added meanwhile as duplicates (those of a file that failed are
        left out: they failed too)."""
        for name, sha in repeats:
            existing = self.find_hash(sha)
            if existing is not None:
                report.duplicates.append((name, existing))

    def remove(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Remove images by id from index and database → (removed ids, unknown ids)."""
        ids = sorted({int(i) for i in ids})
        with self._write_lock():
            known = {
                r[0]
                for r in self.db.execute(
                    f"SELECT id FROM images WHERE id IN ({','.join('?' * len(ids))})", ids
                )
            } if ids else set()
            removed = sorted(known)
            if removed:
                ix.remove_ids(self.index, np.array(removed))
                ix.write_index_atomic(self.index, self.root / INDEX_FILE)
                self.db.execute(
                    f"DELETE FROM images WHERE id IN ({','.join('?' * len(removed))})", removed
                )
        return removed, [i for i in ids if i not in known]

    # -- reads ---------------------------------------------------------------------------------
    def find_hash(self, sha256: str) -> int | None:
        row = self.db.execute(
            "SELECT id FROM images WHERE sha256 = ? AND status = 'indexed' LIMIT 1", (sha256,)
        ).fetchone()
        return None if row is None else int(row[0])

    def names(self, ids: Sequence[int]) -> dict[int, str]:
        """id → name for the given ids that are indexed."""
        ids = [int(i) for i in ids if i >= 0]
        out: dict[int, str] = {}
        for start in range(0, len(ids), 900):  # SQLite's bound-parameter limit
            part = ids[start : start + 900]
            rows = self.db.execute(
                f"SELECT id, name FROM images WHERE status = 'indexed' AND id IN ({','.join('?' * len(part))})",
                part,
            )
            out.update((int(i), n) for i, n in rows)
        return out

    def search_arrays(self, xq: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k-NN of query descriptors (nq, d) → (scores, ids, raw similarities), each (nq, k).

        Scores are the raw similarities normalised against the background (when the collection has
        one), the numbers copy decisions are made on. Ids are -1 where fewer than k were found;
        ids of images not (or no longer) ``indexed`` may appear: :meth:`search` filters them.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        xq = ix.as_float32_matrix(xq, self.config.dim, "query descriptors")
        raw, I = ix.search(self.index, xq, k, self.metric)
        S = raw if self.background is None else self.background.normalize(raw, xq)
        return S, I, raw

    def search(self, xq: np.ndarray, k: int = 10) -> list[list[Match]]:
        """k nearest stored images per query descriptor (nq, d), with scores and copy decisions."""
        S, I, _ = self.search_arrays(xq, k)
        names = self.names(np.unique(I[I >= 0]).tolist())
        thr = self.config.threshold
        return [
            [
                Match(i, names[i], s, None if thr is None else s >= thr)
                for s, i in zip(srow, irow)
                if i in names
            ]
            for srow, irow in zip(S.tolist(), I.tolist())  # Python floats and ints, row by row
        ]

    def query_images(
        self, paths: Sequence[str | os.PathLike[str]], k: int = 10, progress: Callable[[int], None] | None = None
    ) -> tuple[list[QueryResult], list[Failure]]:
        result = extract_paths(paths, self.extractor, progress=progress)
        matches = self.search(result.features, k) if len(result.paths) else []
        return [QueryResult(str(p), m) for p, m in zip(result.paths, matches)], result.failures

    # -- copy decisions ------------------------------------------------------------------------
    def calibrate(
        self, scores: CalibrationScores | None = None, target: CopyTarget = CopyTarget(), method: str = ""
    ) -> Threshold:
        """Set the copy threshold for ``target`` from calibration ``scores`` (stored for later),
        or, without ``scores``, from the ones stored by an earlier calibration. Only the
        single-view query mode exists: a mode with several views per query would keep its own
        scores file and threshold, calibrated the same way."""
        if target.query_mode != SINGLE_VIEW:
            raise CollectionError(f"query mode {target.query_mode!r} has no calibration yet (only {SINGLE_VIEW!r})")
        with self._write_lock():
            if scores is None:
                try:
                    scores = CalibrationScores.from_bytes((self.root / CALIBRATION_FILE).read_bytes())
                except FileNotFoundError:
                    raise CollectionError(
                        f"{self.root} has no calibration queries yet; calibrate it from training images "
                        "(activeindex calibrate COLLECTION --images DIR)"
                    ) from None
                method = method or (self.config.threshold_info or {}).get("method", "")
            thr = calibrate(scores, target, method)
            thr = dataclasses.replace(thr, n_indexed=self.count())
            thr = dataclasses.replace(thr, meaning=describe_threshold(thr.to_dict()))
            write_bytes_atomic(self.root / CALIBRATION_FILE, scores.to_bytes())
            self.config = dataclasses.replace(self.config, threshold=thr.threshold, threshold_info=thr.to_dict())
            self.config.save(self.root / CONFIG_FILE)
        return thr

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM images WHERE status = 'indexed'").fetchone()[0])

    def info(self) -> dict[str, Any]:
        by_mode = dict(
            self.db.execute("SELECT mode, COUNT(*) FROM images WHERE status = 'indexed' GROUP BY mode").fetchall()
        )
        n_act, psnr_min, psnr_mean, ssim_mean, linf_max = self.db.execute(
            "SELECT COUNT(psnr), MIN(psnr), AVG(psnr), AVG(ssim), MAX(linf) FROM images "
            "WHERE status = 'indexed' AND mode = 'activated'"
        ).fetchone()
        released = (
            {"psnr_min": psnr_min, "psnr_mean": psnr_mean, "ssim_mean": ssim_mean, "linf_max": linf_max}
            if n_act else None
        )
        return {
            "path": str(self.root.resolve()),
            "images": self.count(),
            "by_mode": by_mode,
            "released_quality": released,
            "index_ntotal": int(self.index.ntotal),
            "index_bytes": (self.root / INDEX_FILE).stat().st_size,
            **asdict(self.config),
            "copy_decision": describe_threshold(self.config.threshold_info),
        }


def check_extractor(config: CollectionConfig, extractor: Extractor) -> None:
    """Refuse an extractor whose weights or dimension differ from the collection's."""
    stored = config.extractor
    if extractor.digest != stored.get("digest"):
        raise CollectionError(
            f"this collection was built with {stored.get('kind')}:{stored.get('name') or stored.get('path')} "
            f"(weights digest {str(stored.get('digest'))[:12]}…), not {extractor.spec_string} "
            f"(digest {extractor.digest[:12]}…); descriptors of different models cannot be compared"
        )
    if extractor.dim != config.dim:
        raise CollectionError(f"extractor dimension {extractor.dim} != collection dimension {config.dim}")
