"""A collection: one FAISS index, the extractor spec that fed it, and a SQLite metadata database.

Layout of the folder::

    collection.json   settings (format version, extractor spec + weights digest, factory, metric,
                      score normalisation, the calibrated copy threshold and how it was obtained)
    index.faiss       the FAISS index, with ids (not positions); replaced atomically on every write
    meta.sqlite       one row per image: id, name, path, sha256, added, mode, quality, status
    background.npy    descriptors of training images that score normalisation compares queries to
    calibration.npz   the calibration queries' top-1 scores, to re-derive the threshold for another
                      target without images (see :mod:`activeindex.scoring`)
    calibration_dihedral.npz  the same for dihedral queries (8 rotations/flips per query,
                      :mod:`activeindex.dihedral`), whose threshold is stored apart

Crash safety. Adding is a three-step protocol: (1) rows are inserted with status ``pending``, which
reserves their ids (``AUTOINCREMENT`` never reuses an id, even after a rollback or a delete);
(2) the index with the new vectors is written atomically; (3) the rows are marked ``indexed``.
A crash between (1) and (3) leaves ``pending`` rows: the next writer removes their ids from the
index, if it holds them, and deletes the rows, so a rerun adds those images again. Searches only
report ids whose row is ``indexed``.

Concurrent writers. Every write (add, remove, calibrate, recovery) holds an exclusive ``flock`` on
``.lock`` from step (1) to step (3), and, once it holds it, first reloads ``index.faiss`` (and
``collection.json``) if another process changed them since this object read them: a writer always
extends the latest index, never the copy it loaded when it opened, so two writers (CLI processes,
the service, the distributed driver) never erase each other's images.

Integrity. ``collection.json`` and the database's ``meta`` table hold the same collection id, and
the database counts index generations; opening refuses a database of another collection, a deleted
and recreated one, and an index that is older or newer than the database (compared by vector
count), instead of answering with wrong names. :func:`check_collection` (``activeindex check``)
compares them id by id and repairs what it can.
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
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from activeindex import index as ix
from activeindex.dihedral import N_VIEWS, merge_views
from activeindex.atomic import remove_stale_temps, write_bytes_atomic, write_text_atomic
from activeindex.errors import CollectionError
from activeindex.extractors import Extractor, create_extractor
from activeindex.features import Failure, extract_paths
from activeindex.hardware import resolve_device
from activeindex.images import file_sha256, storable_text
from activeindex.scoring import (
    Background,
    CalibrationScores,
    CopyTarget,
    Normalization,
    QueryMode,
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
CALIBRATION_FILES = {QueryMode.SINGLE: CALIBRATION_FILE, QueryMode.DIHEDRAL: "calibration_dihedral.npz"}

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
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# meta keys: uuid (the collection id, also in collection.json), generation (index writes so far),
# orphans (vectors left in an index type that cannot remove them, by a rolled-back add).

# Ids bound per statement: SQLite builds before 3.32 allow at most 999 variables.
SQL_CHUNK = 900

def _chunks(ids: Sequence[int], size: int = SQL_CHUNK) -> Iterator[list[int]]:
    for start in range(0, len(ids), size):
        yield [int(i) for i in ids[start : start + size]]


def _marks(n: int) -> str:
    return ",".join("?" * n)


def _folder_writable(root: Path) -> bool:
    """Whether this process may write the collection's files (the folder and the database)."""
    db = root / DB_FILE
    return os.access(root, os.W_OK) and (not db.exists() or os.access(db, os.W_OK))


def _index_stamp(root: Path) -> tuple[int, int, int]:
    """What identifies one version of ``index.faiss`` (each write is a new file, renamed over it)."""
    try:
        st = (root / INDEX_FILE).stat()
    except FileNotFoundError:  # reading it then fails with the reason
        return (0, 0, -1)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@contextlib.contextmanager
def _file_lock(root: Path, *, shared: bool) -> Iterator[None]:
    """``flock`` on the collection's lock file: exclusive for writers, shared for readers that open
    (so they never read an index and a database from two different moments). A reader of a folder
    it cannot write, whose lock file does not exist, reads without a lock: no writer can be there."""
    path = root / LOCK_FILE
    try:
        fh = open(path, "a")
    except OSError:
        if not shared:
            raise
        try:
            fh = open(path)
        except OSError:
            yield
            return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _connect(root: Path, read_only: bool) -> sqlite3.Connection:
    """Open the database: read-write (WAL, created if missing), or read-only without writing
    anything (``immutable`` when the folder cannot be written: SQLite could not even make its
    shared-memory file there)."""
    path = root / DB_FILE
    try:
        if read_only:
            if not path.exists():
                raise CollectionError(f"{path} is missing")
            query = "mode=ro" + ("" if _folder_writable(root) else "&immutable=1")
            uri = f"file:{urllib.parse.quote(str(path.resolve()))}?{query}"
            db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        else:
            db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(images)")}
            if "released" not in columns:  # collections made before activation existed
                db.execute("ALTER TABLE images ADD COLUMN released TEXT")
        db.execute("SELECT COUNT(*) FROM images").fetchone()
        return db
    except sqlite3.Error as exc:
        raise CollectionError(f"cannot read the database {path}: {exc}") from exc


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
    # The same for dihedral queries (8 views each, activeindex.dihedral), calibrated apart: the best
    # of 8 views scores higher on unrelated images too. None: made or calibrated without it.
    dihedral_threshold_info: dict[str, Any] | None = None
    normalization: dict[str, Any] | None = None  # Normalization.to_dict(); None: raw similarities
    uuid: str | None = None  # the collection's id, also in the database; None: made before ids existed

    @classmethod
    def load(cls, path: Path) -> CollectionConfig:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CollectionError(f"{path.parent} is not a collection (no {CONFIG_FILE})") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CollectionError(f"cannot read {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise CollectionError(f"{path} is not a collection's settings (a JSON object)")
        if data.get("format_version") != FORMAT_VERSION:
            raise CollectionError(
                f"{path} has format version {data.get('format_version')}; this activeindex reads "
                f"version {FORMAT_VERSION}"
            )
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:  # a required field is missing
            raise CollectionError(f"{path} is incomplete: {exc}") from exc

    def save(self, path: Path) -> None:
        write_text_atomic(path, json.dumps(asdict(self), indent=2) + "\n")


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


ID_RANGE = (-(2**63), 2**63 - 1)  # FAISS ids and SQLite integers are int64


def is_storable_id(image_id: int) -> bool:
    """Whether ``image_id`` fits the int64 of FAISS and SQLite (a larger one names no image;
    SQLite and NumPy raise OverflowError on it rather than find nothing)."""
    return ID_RANGE[0] <= image_id <= ID_RANGE[1]


class Collection:
    """Open with :meth:`open`, make with :meth:`create`. Use as a context manager to close the DB."""

    def __init__(
        self,
        root: Path,
        config: CollectionConfig,
        index: faiss.Index,
        extractor: Extractor | None,
        db: sqlite3.Connection | None = None,
        *,
        read_only: str | None = None,
        mmap: bool = False,
        device: str | torch.device = "cpu",
    ) -> None:
        """Prefer :meth:`open` / :meth:`create`. ``read_only``: why writes are refused (None: writable);
        ``device``: where the extractor rebuilt from the stored spec runs."""
        self.root = root
        self.config = config
        self.index = index
        self._extractor = extractor
        self._device = resolve_device(device)
        self._read_only_reason = read_only
        self._mmap = mmap
        self._lock_depth = 0  # this object holds the writer lock (see _write_lock)
        self._thread_lock = threading.RLock()  # threads of one process sharing this object
        self._stamp: tuple[int, int, int] | None = None  # index.faiss as this object read it
        self._generation = 0  # the database's index generation this object's index is at
        self.background: Background | None = None
        if config.normalization is not None:
            try:
                xb = np.load(root / BACKGROUND_FILE, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise CollectionError(
                    f"cannot read {root / BACKGROUND_FILE} (the score-normalisation background): {exc}"
                ) from exc
            self.background = Background(xb, config.metric, Normalization(**config.normalization))
        self.db = db if db is not None else _connect(root, read_only is not None)

    @property
    def read_only(self) -> bool:
        """True when writes are refused: memory-mapped index, or a folder this process cannot write."""
        return self._read_only_reason is not None

    @property
    def read_only_reason(self) -> str | None:
        """Why writes are refused, in words; None when writable."""
        return self._read_only_reason

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
        references); with it, scores are normalised as ``normalization`` says (default β=0.75, n=5).
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
            uuid=uuid.uuid4().hex,
        )
        ix.write_index_atomic(index, root / INDEX_FILE)
        if background is not None:
            buf = io.BytesIO()
            np.save(buf, background)
            write_bytes_atomic(root / BACKGROUND_FILE, buf.getvalue())
        db = _connect(root, read_only=False)
        db.execute("INSERT INTO meta (key, value) VALUES ('uuid', ?), ('generation', '0')", (config.uuid,))
        # collection.json last: its presence marks a complete collection.
        config.save(root / CONFIG_FILE)
        coll = cls(root, config, index, extractor, db, device=extractor.device)
        coll._stamp = _index_stamp(root)
        return coll

    @classmethod
    def open(
        cls,
        root: str | os.PathLike[str],
        *,
        extractor: Extractor | None = None,
        mmap: bool = False,
        verify: bool = True,
        device: str | torch.device = "cpu",
    ) -> Collection:
        """Open a collection. ``extractor`` must match the stored digest; by default it is rebuilt
        lazily from the stored spec when images need describing, on ``device`` (as
        :func:`activeindex.hardware.resolve_device` takes it: ``auto``, ``cpu``, ``cuda[:N]`` or a
        :class:`torch.device`). The device is not part of the collection: one made on a GPU opens
        on a CPU, and the other way round.

        ``mmap`` maps the index read-only; a folder this process cannot write opens read-only too
        (queries work, writes are refused). ``verify`` (default) refuses a database and an index
        that disagree (see the module docstring); ``activeindex check`` opens with it off.
        """
        root = Path(root)
        config = CollectionConfig.load(root / CONFIG_FILE)
        if extractor is not None:
            check_extractor(config, extractor)
        reason = None
        if mmap:
            reason = "memory-mapped index: open it without mmap to write"
        elif not _folder_writable(root):
            reason = "this process cannot write its folder"
        if reason is not None:
            # No lock: a reader never waits for a writer (the distributed driver holds the lock for
            # a whole round). A writer between reading the index and the database can make them
            # look inconsistent only by replacing the index file: then read it again.
            stamp = _index_stamp(root)
            coll = cls(root, config, _load_index(root, config, mmap), extractor,
                       _connect(root, read_only=True), read_only=reason, mmap=mmap, device=device)
            try:
                for attempt in range(5):
                    if attempt:
                        stamp = _index_stamp(root)
                        coll.index = _load_index(root, config, mmap)
                    coll._stamp = stamp
                    coll._generation = coll._meta_int("generation")
                    problems = coll.disagreements() if verify else []
                    if not problems or _index_stamp(root) == coll._stamp:
                        break
                if problems:
                    coll.verify()
            except BaseException:
                coll.close()
                raise
            return coll
        stamp = _index_stamp(root)
        index = _load_index(root, config, mmap=False)
        if verify and not (root / DB_FILE).exists() and (config.uuid is not None or index.ntotal):
            raise CollectionError(
                f"{root / DB_FILE} is missing: the names of the {index.ntotal} indexed images are lost, and a "
                f"new database would give their ids to other images; restore it, or run "
                f"`activeindex check {root} --repair` to empty the index"
            )
        coll = cls(root, config, index, extractor, device=device)
        coll._stamp = stamp
        coll._generation = coll._meta_int("generation")  # a writer since: the stamp differs
        try:
            with coll._write_lock():  # reloads the index if a writer replaced it meanwhile
                coll._adopt_identity()
                remove_stale_temps(root, [INDEX_FILE, CONFIG_FILE, CALIBRATION_FILE, BACKGROUND_FILE])
                if verify:
                    coll.verify()
                coll._recover_pending()
        except BaseException:
            coll.close()
            raise
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
            extractor = create_extractor(self.config.extractor, device=self._device)
            check_extractor(self.config, extractor)
            self._extractor = extractor
        return self._extractor

    @property
    def metric(self) -> ix.Metric:
        return ix.Metric(self.config.metric)

    # -- the writer lock and the files on disk -------------------------------------------------
    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """Hold the inter-process writer lock, with this object synchronised to the files on disk
        (the latest index and settings). Re-entrant within one thread."""
        if self._read_only_reason is not None:
            # A memory-mapped index is a read-only view of the file: FAISS would abort the process
            # on an add, and a write would replace the file under the other readers anyway.
            raise CollectionError(f"{self.root} is open read-only ({self._read_only_reason})")
        with self._thread_lock:
            if self._lock_depth:
                self._lock_depth += 1
                try:
                    yield
                finally:
                    self._lock_depth -= 1
                return
            with _file_lock(self.root, shared=False):
                self._lock_depth = 1
                try:
                    self._sync_with_disk()
                    yield
                finally:
                    self._lock_depth = 0

    def _sync_with_disk(self) -> None:
        """Under the lock: pick up what other writers committed since this object read the files."""
        self.config = CollectionConfig.load(self.root / CONFIG_FILE)
        if self._meta_int("generation") != self._generation or _index_stamp(self.root) != self._stamp:
            self._reload_index()

    def _reload_index(self) -> None:
        # Generation, then stamp, then the file: whatever a writer does in between, one of the two
        # then differs from the disk and the next write reloads again (never a missed change).
        generation = self._meta_int("generation")
        stamp = _index_stamp(self.root)
        self.index = _load_index(self.root, self.config, self._mmap)
        self._stamp = stamp
        self._generation = generation

    def index_changed_on_disk(self) -> bool:
        """Whether another process replaced ``index.faiss`` since this object read it (a reader can
        then :meth:`reload` to see its additions)."""
        try:
            return _index_stamp(self.root) != self._stamp
        except OSError:
            return False

    def reload(self) -> None:
        """Read ``index.faiss`` again (a long-lived reader catching up with writers; no lock needed:
        the file is replaced atomically). Images a writer has not marked ``indexed`` yet stay
        invisible to searches. The caller keeps other threads from changing this object's index
        meanwhile (the service: its readers-writer lock)."""
        self._reload_index()

    def _write_index(self) -> None:
        """Step (2): bump the generation, then replace ``index.faiss`` atomically (under the lock)."""
        self._require_lock("writing the index")
        gen = self._meta_int("generation") + 1
        self._set_meta("generation", str(gen))
        ix.write_index_atomic(self.index, self.root / INDEX_FILE)
        self._generation = gen
        self._stamp = _index_stamp(self.root)

    def _meta(self, key: str) -> str | None:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:  # a read-only database made before the meta table
            return None
        return None if row is None else str(row[0])

    def _meta_int(self, key: str) -> int:
        return int(self._meta(key) or 0)

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _adopt_identity(self) -> None:
        """Under the lock: give a collection made before collection ids one (in both files), and a
        database created just now (an empty collection: nothing to misattribute) the config's."""
        db_uuid = self._meta("uuid")
        if self.config.uuid is None:
            new = db_uuid or uuid.uuid4().hex
            if db_uuid is None:
                self._set_meta("uuid", new)
            self.config = dataclasses.replace(self.config, uuid=new)
            self.config.save(self.root / CONFIG_FILE)
        elif db_uuid is None and self.index.ntotal == 0 and self._row_counts() == (0, 0):
            self._set_meta("uuid", self.config.uuid)

    def _row_counts(self) -> tuple[int, int]:
        """(indexed rows, pending rows)."""
        counts = dict(self.db.execute("SELECT status, COUNT(*) FROM images GROUP BY status").fetchall())
        return int(counts.get("indexed", 0)), int(counts.get("pending", 0))

    def disagreements(self) -> list[str]:
        """What is wrong between ``collection.json``, the database and the index, judged from the
        collection ids and the counts (cheap: no id-by-id comparison, see :func:`check_collection`).
        Pending rows of an interrupted add may or may not have their vectors in the index."""
        problems = []
        db_uuid = self._meta("uuid")
        if self.config.uuid is not None and db_uuid is None:
            problems.append(
                f"{DB_FILE} has no collection id, {CONFIG_FILE} has {self.config.uuid}: the database was "
                "deleted and recreated, or comes from an older collection"
            )
        elif self.config.uuid is not None and db_uuid != self.config.uuid:
            problems.append(
                f"{DB_FILE} belongs to collection {db_uuid}, {CONFIG_FILE} to {self.config.uuid}: "
                "files of two collections are mixed"
            )
        indexed, pending = self._row_counts()
        orphans = self._meta_int("orphans")
        nt = int(self.index.ntotal)
        if nt < indexed + orphans:
            problems.append(
                f"{INDEX_FILE} holds {nt} vectors but {DB_FILE} has {indexed} indexed images: the index is "
                "older than the database (restored or copied?), so images would vanish from searches"
            )
        elif nt > indexed + pending + orphans:
            problems.append(
                f"{INDEX_FILE} holds {nt} vectors but {DB_FILE} knows {indexed + pending} images: vectors "
                "without rows (an older or recreated database?) would answer with other images' names"
            )
        return problems

    def verify(self) -> None:
        """Raise :class:`CollectionError` when :meth:`disagreements` finds any."""
        problems = self.disagreements()
        if problems:
            raise CollectionError(
                f"{self.root}: " + "; ".join(problems)
                + f". Nothing was changed; `activeindex check {self.root}` compares them id by id "
                "and `--repair` fixes what it can"
            )

    def _recover_pending(self) -> None:
        """Undo the rows of an add that crashed before completing (see the module docstring)."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM images WHERE status = 'pending'")]
        if not ids:
            return
        logger.warning("recovering %d images of an interrupted add; they will be re-added on rerun", len(ids))
        self._drop_from_index(ids)
        for part in _chunks(ids):
            self.db.execute(f"DELETE FROM images WHERE id IN ({_marks(len(part))})", part)

    def _drop_from_index(self, ids: Sequence[int]) -> int:
        """Remove ``ids`` from the index and write it when it changed → how many vectors went.
        An index type that cannot remove (HNSW) keeps them as counted orphans, invisible to searches
        (no row is ``indexed`` under their ids)."""
        present = np.intersect1d(ix.stored_ids(self.index), np.asarray(ids, np.int64))
        if not len(present):
            return 0
        try:
            removed = ix.remove_ids(self.index, present)
        except CollectionError:
            self._set_meta("orphans", str(self._meta_int("orphans") + len(present)))
            return 0
        self._write_index()
        return removed

    # -- writes: one add protocol (reserve ids → index written atomically → mark) --------------
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
        Activated images also give the quality of their released file and its path.
        Durable and visible to searches once it returns."""
        xb = ix.as_float32_matrix(xb, self.config.dim, "descriptors")
        n = len(xb)
        if len(names) != n or len(hashes) != n:
            raise ValueError(f"{n} descriptors but {len(names)} names and {len(hashes)} hashes")
        if n == 0:
            return []
        with self._write_lock():
            ids = self.reserve_ids(names, hashes, paths=paths, mode=mode, quality=quality, released=released)
            ix.add_with_ids(self.index, xb, np.array(ids))
            self.complete_add(ids)
        return ids

    def _mark_indexed(self, ids: list[int]) -> None:
        """Step (3) of an add: the rows become visible to searches."""
        for part in _chunks(ids):
            self.db.execute(
                f"UPDATE images SET status = 'indexed' WHERE status = 'pending' AND id IN ({_marks(len(part))})", part
            )

    # -- an add driven step by step (the distributed driver: activeindex.distributed) -----------
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the writer lock across the steps of an add driven from outside: :meth:`reserve_ids`
        (1), vectors or merged shard indexes put into ``self.index``, then :meth:`complete_add` (2, 3).
        The index is the latest on disk; pending rows of a writer that crashed are rolled back first."""
        with self._write_lock():
            self._recover_pending()
            yield

    def _require_lock(self, what: str) -> None:
        if not self._lock_depth:
            raise CollectionError(f"{what} needs the writer lock: call it inside `with collection.writing():`")

    def reserve_ids(
        self,
        names: Sequence[str],
        hashes: Sequence[str],
        *,
        paths: Sequence[str | None] | None = None,
        mode: str = "passive",
        quality: Sequence[dict[str, float | None]] | None = None,
        released: Sequence[str | None] | None = None,
    ) -> list[int]:
        """Step (1): insert ``pending`` rows in one transaction and return their ids, in order.
        The rows stay invisible to searches until :meth:`complete_add`; a crash before that rolls
        them back (next writer), and the ids are never reused."""
        self._require_lock("reserve_ids")
        n = len(names)
        if len(hashes) != n:
            raise ValueError(f"{n} names but {len(hashes)} hashes")
        paths = list(paths) if paths is not None else [None] * n
        quality = list(quality) if quality is not None else [{}] * n
        released = list(released) if released is not None else [None] * n
        if len(paths) != n or len(quality) != n or len(released) != n:
            raise ValueError(f"{n} names but {len(paths)} paths, {len(quality)} qualities, {len(released)} released")
        names = [storable_text(n) for n in names]  # a non-UTF-8 file name must not fail the batch
        paths = [None if p is None else storable_text(p) for p in paths]
        released = [None if r is None else storable_text(r) for r in released]
        now = time.time()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ids = [
                int(
                    self.db.execute(
                        "INSERT INTO images (name, path, sha256, added, mode, psnr, ssim, linf, released) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, path, sha, now, mode, q.get("psnr"), q.get("ssim"), q.get("linf"), rel),
                    ).lastrowid
                )
                for name, sha, path, q, rel in zip(names, hashes, paths, quality, released)
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
        atomically, then, in one transaction, record each released file's quality and path (when
        given), mark the rows ``indexed`` and delete the rows of ``dropped`` ids (reserved for
        images that failed)."""
        self._require_lock("complete_add")
        ids = [int(i) for i in ids]
        if quality is not None or released is not None:
            quality = list(quality) if quality is not None else [{}] * len(ids)
            released = list(released) if released is not None else [None] * len(ids)
            if len(quality) != len(ids) or len(released) != len(ids):
                raise ValueError(
                    f"{len(ids)} ids but {len(quality)} quality records and {len(released)} released paths"
                )
        if ids:
            self._write_index()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if quality is not None and released is not None:
                self.db.executemany(
                    "UPDATE images SET psnr = ?, ssim = ?, linf = ?, released = ? WHERE id = ? AND status = 'pending'",
                    [(q.get("psnr"), q.get("ssim"), q.get("linf"), rel, i) for i, q, rel in zip(ids, quality, released)],
                )
            self._mark_indexed(ids)
            self.db.executemany(
                "DELETE FROM images WHERE id = ? AND status = 'pending'", [(int(i),) for i in dropped]
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def update_release_quality(self, ids: Sequence[int], quality: Sequence[dict[str, float | None]]) -> None:
        """Record the quality of released files written again (activated again after their run:
        :func:`activeindex.activation.add.recheck_run`), in one transaction."""
        if len(ids) != len(quality):
            raise ValueError(f"{len(ids)} ids but {len(quality)} quality records")
        if not ids:
            return
        with self._write_lock():
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(
                    "UPDATE images SET psnr = ?, ssim = ?, linf = ? WHERE id = ? AND status = 'indexed'",
                    [(q.get("psnr"), q.get("ssim"), q.get("linf"), int(i)) for i, q in zip(ids, quality)],
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
            with self._write_lock():
                # Another writer may have added the same content while this one was describing.
                kept = self.drop_added_meanwhile(kept, report)
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

    def drop_added_meanwhile(
        self, todo: Sequence[tuple[Path, str, str]], report: AddReport
    ) -> list[tuple[Path, str, str]]:
        """Under the writer lock, just before adding: move the (path, name, sha256) items whose
        content another writer indexed since :meth:`plan_add` to ``report.duplicates``."""
        self._require_lock("drop_added_meanwhile")
        kept = []
        for item in todo:
            existing = self.find_hash(item[2])
            if existing is None:
                kept.append(item)
            else:
                report.duplicates.append((item[1], existing))
        return kept

    def resolve_repeats(self, repeats: Sequence[tuple[str, str]], report: AddReport) -> None:
        """Report repeats of a file added meanwhile as duplicates (those of a file that failed are
        left out: they failed too)."""
        for name, sha in repeats:
            existing = self.find_hash(sha)
            if existing is not None:
                report.duplicates.append((name, existing))

    def remove(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """Remove images by id from index and database → (removed ids, unknown ids). An id outside
        the int64 range of FAISS and SQLite ids is unknown."""
        ids = sorted({int(i) for i in ids})
        storable = [i for i in ids if is_storable_id(i)]
        with self._write_lock():
            known: set[int] = set()
            for part in _chunks(storable):
                known.update(
                    r[0] for r in self.db.execute(f"SELECT id FROM images WHERE id IN ({_marks(len(part))})", part)
                )
            removed = sorted(known)
            if removed:
                ix.remove_ids(self.index, np.array(removed))  # raises for index types that cannot
                self._write_index()
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    for part in _chunks(removed):
                        self.db.execute(f"DELETE FROM images WHERE id IN ({_marks(len(part))})", part)
                    self.db.execute("COMMIT")
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
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
        for part in _chunks(ids):  # SQLite's bound-parameter limit
            rows = self.db.execute(
                f"SELECT id, name FROM images WHERE status = 'indexed' AND id IN ({_marks(len(part))})", part
            )
            out.update((int(i), n) for i, n in rows)
        return out

    def search_arrays(self, xq: np.ndarray, k: int = 10, mode: QueryMode | str = QueryMode.SINGLE,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """k-NN of query descriptors (nq, d) → (scores, ids, raw similarities), each (nq, k).

        Scores are the raw similarities normalised against the background (when the collection has
        one), the numbers copy decisions are made on. Ids are -1 where fewer than k were found;
        ids of images not (or no longer) ``indexed`` may appear: :meth:`search` filters them.

        ``mode="dihedral"``: ``xq`` is (nq * 8, d), the 8 views of each query, query-major
        (:func:`activeindex.dihedral.dihedral_views`); all are searched in one call, each view's
        scores normalised as a query's, and each reference keeps its best view (score -inf where
        fewer than k were found; ``raw`` is that best view's similarity).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        mode = QueryMode(mode)
        xq = ix.as_float32_matrix(xq, self.config.dim, "query descriptors")
        if mode is QueryMode.DIHEDRAL and len(xq) % N_VIEWS:
            raise ValueError(f"dihedral queries come as {N_VIEWS} views each; got {len(xq)} descriptors")
        raw, I = ix.search(self.index, xq, k, self.metric)
        S = raw if self.background is None else self.background.normalize(raw, xq)
        if mode is QueryMode.DIHEDRAL:
            S, I, raw = merge_views(S, I, k, raw=raw)
        return S, I, raw

    def threshold_info(self, mode: QueryMode | str = QueryMode.SINGLE) -> dict[str, Any] | None:
        """The calibrated copy threshold of query ``mode`` (:meth:`Threshold.to_dict`), or None."""
        if QueryMode(mode) is QueryMode.DIHEDRAL:
            return self.config.dihedral_threshold_info
        return self.config.threshold_info

    def threshold(self, mode: QueryMode | str = QueryMode.SINGLE) -> float | None:
        """The score at and above which a best match of a ``mode`` query is a copy; None: not calibrated."""
        if QueryMode(mode) is QueryMode.SINGLE:
            return self.config.threshold
        info = self.config.dihedral_threshold_info
        return None if info is None else float(info["threshold"])

    def copy_decision(self, mode: QueryMode | str = QueryMode.SINGLE) -> str:
        """What a ``mode`` query's copy flag means, in words, and whether the calibration is stale;
        for a collection without a dihedral threshold, that dihedral matches carry no verdict and
        the command that calibrates one."""
        fix = f"activeindex calibrate {self.root}"
        if QueryMode(mode) is QueryMode.DIHEDRAL and not self.calibration_has_views():
            fix += " --images TRAINING_IMAGES (its stored calibration descriptors have no dihedral views)"
        return describe_threshold(self.threshold_info(mode), mode, fix, indexed_now=self.count())

    def calibration_has_views(self) -> bool:
        """Whether the stored calibration descriptors include the 8 views of each query (then
        ``activeindex calibrate`` recalibrates the dihedral threshold without images)."""
        from activeindex.calibration import CALIBRATION_SET_FILE  # calibration imports this module

        try:
            with np.load(self.root / CALIBRATION_SET_FILE, allow_pickle=False) as z:
                return "query_views" in z.files
        except (OSError, ValueError):
            return False

    def search(self, xq: np.ndarray, k: int = 10, mode: QueryMode | str = QueryMode.SINGLE) -> list[list[Match]]:
        """k nearest stored images per query descriptor (nq, d), with scores and copy decisions.
        Any ``k`` >= 1 is accepted: there are never more matches than stored vectors, so no more
        room is allocated (``k=10**11`` must not try to allocate terabytes).

        ``mode="dihedral"``: ``xq`` holds 8 views per query (see :meth:`search_arrays`), the copy
        decision uses the dihedral threshold, and ``copy`` is None where there is none (never the
        single-view threshold: it would flag more unrelated images than it says)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        S, I, _ = self.search_arrays(xq, min(int(k), max(1, int(self.index.ntotal))), mode)
        names = self.names(np.unique(I[I >= 0]).tolist())
        thr = self.threshold(mode)
        return [
            [
                Match(i, names[i], s, None if thr is None else s >= thr)
                for s, i in zip(srow, irow)
                if i in names
            ]
            for srow, irow in zip(S.tolist(), I.tolist())  # Python floats and ints, row by row
        ]

    def query_images(
        self, paths: Sequence[str | os.PathLike[str]], k: int = 10, progress: Callable[[int], None] | None = None,
        mode: QueryMode | str = QueryMode.SINGLE,
    ) -> tuple[list[QueryResult], list[Failure]]:
        """Describe and search image files; ``mode="dihedral"`` describes each under its 8
        rotations/flips (in one batch) and keeps each reference's best view."""
        mode = QueryMode(mode)
        if mode is QueryMode.DIHEDRAL:
            from activeindex.dihedral import dihedral_views

            # 4 files a batch: the model sees 32 inputs, as it does for 32 single queries.
            result = extract_paths(paths, self.extractor, progress=progress, views=dihedral_views,
                                   batch_size=max(1, 32 // N_VIEWS))
        else:
            result = extract_paths(paths, self.extractor, progress=progress)
        matches = self.search(result.features, k, mode) if len(result.paths) else []
        return [QueryResult(str(p), m) for p, m in zip(result.paths, matches)], result.failures

    # -- copy decisions ------------------------------------------------------------------------
    def calibrate(
        self, scores: CalibrationScores | None = None, target: CopyTarget = CopyTarget(), method: str = ""
    ) -> Threshold:
        """Set the copy threshold of ``target.query_mode`` for ``target`` from calibration
        ``scores`` (stored for later), or, without ``scores``, from the ones stored by an earlier
        calibration. Each query mode keeps its own scores file and threshold: the dihedral one is
        calibrated the same way, on calibration queries described under their 8 views."""
        mode = QueryMode(target.query_mode)
        path = self.root / CALIBRATION_FILES[mode]
        with self._write_lock():
            if scores is None:
                try:
                    scores = CalibrationScores.from_bytes(path.read_bytes())
                except FileNotFoundError:
                    raise CollectionError(
                        f"{self.root} has no calibration queries yet"
                        + (" for dihedral queries" if mode is QueryMode.DIHEDRAL else "")
                        + "; calibrate it from training images (activeindex calibrate COLLECTION --images DIR)"
                    ) from None
                method = method or (self.threshold_info(mode) or {}).get("method", "")
            thr = calibrate(scores, target, method)
            thr = dataclasses.replace(thr, n_indexed=self.count())
            thr = dataclasses.replace(thr, meaning=describe_threshold(thr.to_dict(), mode))
            write_bytes_atomic(path, scores.to_bytes())
            if mode is QueryMode.DIHEDRAL:
                self.config = dataclasses.replace(self.config, dihedral_threshold_info=thr.to_dict())
            else:
                self.config = dataclasses.replace(self.config, threshold=thr.threshold, threshold_info=thr.to_dict())
            self.config.save(self.root / CONFIG_FILE)
        return thr

    def released_by(self, path: str) -> str | None:
        """The name of the indexed image whose released file is ``path``, or None."""
        row = self.db.execute(
            "SELECT name FROM images WHERE released = ? AND status = 'indexed'", (path,)
        ).fetchone()
        return None if row is None else str(row[0])

    def record(self, image_id: int) -> dict[str, Any] | None:
        """The database row of an indexed image, or None (also for an id beyond int64)."""
        if not is_storable_id(image_id):
            return None
        cur = self.db.execute(
            "SELECT id, name, path, sha256, added, mode, psnr, ssim, linf, released FROM images "
            "WHERE id = ? AND status = 'indexed'",
            (int(image_id),),
        )
        row = cur.fetchone()
        return None if row is None else dict(zip([c[0] for c in cur.description], row))

    def first_ids(self, n: int) -> list[int]:
        """The ``n`` smallest ids of indexed images."""
        return [int(r[0]) for r in self.db.execute(
            "SELECT id FROM images WHERE status = 'indexed' ORDER BY id LIMIT ?", (int(n),))]

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
            "copy_decision": self.copy_decision(),
            "dihedral_copy_decision": self.copy_decision(QueryMode.DIHEDRAL),
        }


def _load_index(root: Path, config: CollectionConfig, mmap: bool) -> faiss.Index:
    index = ix.read_index(root / INDEX_FILE, mmap=mmap)
    if index.d != config.dim:
        raise CollectionError(f"{root / INDEX_FILE} has d={index.d}, collection.json says {config.dim}")
    ix.set_nprobe(index, config.nprobe)
    return index


@dataclass
class CheckReport:
    """What :func:`check_collection` found (``problems``) and, with ``repair``, did (``repaired``).
    ``unresolved`` lists the problems a repair could not fix (all of them without ``repair``)."""

    problems: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)
    lost: list[tuple[int, str, str | None]] = field(default_factory=list)  # (id, name, path) to re-add
    notes: list[str] = field(default_factory=list)  # harmless to the index: moved source files, ...

    @property
    def ok(self) -> bool:
        return not self.unresolved


def check_collection(root: str | os.PathLike[str], *, repair: bool = False) -> CheckReport:
    """Compare a collection's database, index and files id by id, and with ``repair`` fix what
    can be fixed without guessing:

    - rows of an interrupted add (``pending``): rolled back, as the next writer would;
    - index vectors whose id has no row (a database older than the index, or recreated): removed
      from the index, since they would answer with no name or another image's;
    - ``indexed`` rows whose vector is missing (an index older than the database): deleted, and
      listed in ``lost`` with their stored paths so they can be added again;
    - a missing database: recreated empty, with the index emptied (the names are gone);
    - a database of another collection, a missing background, missing source or released files:
      reported only.

    Raises :class:`CollectionError` when ``collection.json`` or the index cannot be read at all.
    """
    root = Path(root)
    report = CheckReport()
    config = CollectionConfig.load(root / CONFIG_FILE)
    if repair and not _folder_writable(root):
        raise CollectionError(f"cannot repair {root}: this process cannot write its folder")
    if not (root / DB_FILE).exists():
        report.problems.append(f"{DB_FILE} is missing")
        if not repair:
            report.unresolved = list(report.problems)
            return report
    if config.normalization is not None and not (root / BACKGROUND_FILE).exists():
        report.problems.append(f"{BACKGROUND_FILE} is missing: queries cannot be scored (restore it)")
        report.unresolved.append(report.problems[-1])
        return report
    if repair:
        coll = Collection.open(root, verify=False) if (root / DB_FILE).exists() else None
        if coll is None:  # a new database, and an index emptied of the vectors nobody can name
            index = _load_index(root, config, mmap=False)
            coll = Collection(root, config, index, None)
            coll._stamp = _index_stamp(root)
            with coll._write_lock():
                coll._set_meta("uuid", config.uuid or uuid.uuid4().hex)
                coll._adopt_identity()
        with coll:
            with coll._write_lock():
                _compare(coll, report, repair=True)
        return report
    # The shared lock for the whole comparison: a writer's add in progress is not an interruption.
    with _file_lock(root, shared=True), _reader(root) as coll:
        _compare(coll, report, repair=False)
    return report


def _reader(root: Path) -> Collection:
    """The collection opened read-only (nothing written, not even recovery), whatever the folder."""
    config = CollectionConfig.load(root / CONFIG_FILE)
    stamp = _index_stamp(root)
    index = _load_index(root, config, mmap=False)
    coll = Collection(root, config, index, None, _connect(root, read_only=True), read_only="checking")
    coll._stamp = stamp
    return coll


def _compare(coll: Collection, report: CheckReport, *, repair: bool) -> None:
    def problem(text: str, fixed: str | None) -> None:
        report.problems.append(text)
        if repair and fixed:
            report.repaired.append(fixed)
        else:
            report.unresolved.append(text)

    db_uuid = coll._meta("uuid")
    if coll.config.uuid is not None and db_uuid is not None and db_uuid != coll.config.uuid:
        problem(f"{DB_FILE} belongs to collection {db_uuid}, {CONFIG_FILE} to {coll.config.uuid}", None)
        return  # comparing two collections id by id would only mislead
    if coll.config.uuid is not None and db_uuid is None:
        fix = None
        if repair:
            coll._set_meta("uuid", coll.config.uuid)
            fix = f"gave {DB_FILE} the collection id {coll.config.uuid}"
        problem(f"{DB_FILE} has no collection id (deleted and recreated, or from an older version)", fix)
    rows = {int(i): (s, n, p) for i, s, n, p in coll.db.execute("SELECT id, status, name, path FROM images")}
    stored = ix.stored_ids(coll.index)
    uniq, counts = np.unique(stored, return_counts=True)
    in_index = set(uniq.tolist())
    pending = sorted(i for i, r in rows.items() if r[0] == "pending")
    if pending:
        problem(f"{len(pending)} rows of an interrupted add are pending",
                f"rolled back {len(pending)} pending rows" if repair else None)
        if repair:
            coll._recover_pending()
            in_index = set(ix.stored_ids(coll.index).tolist())
            rows = {i: r for i, r in rows.items() if r[0] != "pending"}
    dup = uniq[counts > 1].tolist()
    if dup:
        problem(f"{len(dup)} ids are stored more than once in {INDEX_FILE} (e.g. {dup[:5]})", None)
    unknown = sorted(in_index - set(rows))
    if unknown:
        fix = None
        if repair:
            coll._drop_from_index(unknown)
            fix = f"removed {len(unknown)} vectors without rows from {INDEX_FILE}"
        problem(f"{INDEX_FILE} holds {len(unknown)} vectors whose ids have no row (e.g. {unknown[:5]}): "
                "they would answer with no name", fix)
    missing = sorted(i for i, r in rows.items() if r[0] == "indexed" and i not in in_index)
    if missing:
        fix = None
        if repair:
            report.lost.extend((i, rows[i][1], rows[i][2]) for i in missing)
            for part in _chunks(missing):
                coll.db.execute(f"DELETE FROM images WHERE id IN ({_marks(len(part))})", part)
            fix = f"deleted {len(missing)} rows whose vectors are gone (listed: add them again)"
        problem(f"{len(missing)} indexed images have no vector in {INDEX_FILE} (e.g. ids {missing[:5]}): "
                "searches cannot find them", fix)
    if repair:
        orphans = int(coll.index.ntotal) - coll._row_counts()[0]  # what the index could not remove
        coll._set_meta("orphans", str(max(0, orphans)))
    gone_src = [r[1] for r in rows.values() if r[0] == "indexed" and r[2] and not os.path.exists(r[2])]
    if gone_src:
        report.notes.append(f"{len(gone_src)} source files are no longer where they were added from "
                            f"(e.g. {gone_src[0]}); the index does not need them")
    released = [r[0] for r in coll.db.execute(
        "SELECT released FROM images WHERE status = 'indexed' AND released IS NOT NULL")]
    gone_rel = [r for r in released if not os.path.exists(r)]
    if gone_rel:
        report.notes.append(f"{len(gone_rel)} released files are missing (e.g. {gone_rel[0]})")


def check_extractor(config: CollectionConfig, extractor: Extractor) -> None:
    """Refuse an extractor whose weights or dimension differ from the collection's."""
    stored = config.extractor
    if extractor.digest != stored.get("digest"):
        raise CollectionError(
            f"this collection was built with {stored.get('kind')}:{stored.get('name') or stored.get('path')} "
            f"(weights digest {str(stored.get('digest'))[:12]}…), not {extractor.spec_string} "
            f"(digest {extractor.digest[:12]}…); descriptors of different models cannot be compared"
        )
    stored_runtime = stored.get("runtime", "torch")
    if extractor.runtime.value != stored_runtime:
        raise CollectionError(
            f"this collection's descriptors were computed by {stored_runtime}, not "
            f"{extractor.runtime.value}: the two paths differ slightly (cosine ~0.999) and are never mixed"
        )
    if extractor.dim != config.dim:
        raise CollectionError(f"extractor dimension {extractor.dim} != collection dimension {config.dim}")
