"""What the service loads once at start-up, and the operations its routes call.

Concurrency. A query is checked (size, format, pixels: the header only) where it arrives, then
handed to the :class:`Batcher`. Its dispatcher gathers the queries that arrive while its slots are
busy, and each slot runs one batch at a time: the uploads decoded and described in one model call
by a describer (:mod:`.describers`: a model process of its own by default with ``serve``, or this
process's thread), then one index search for the batch, under the reader side of a readers-writer
lock. That is what a batch job does with files (:func:`~activeindex.features.extract_paths`): the
HTTP front end adds the requests' parsing, and nothing per query that the batch could share.
Writes (add, remove) are serialised by ``write_mutex``; the index itself is changed only inside
:meth:`ServedCollection.add_vectors` / :meth:`ServedCollection.remove`, under the writer side, so a
search never walks an index being changed. Other processes may write the collection while it is
served (a CLI ``add``): every write here takes the collection's inter-process lock and extends the
latest index on disk (:class:`~activeindex.collection.Collection`), and a search batch first
reloads the index when another process replaced it, so the service sees their images too. Everything else a write does (describing, activating,
which reads the index for its targets) runs beside the searches.

Durability. An add is acknowledged only after the collection's pending → index written atomically →
indexed protocol returns; a crash before that loses only the request being served, and the next
start rolls its pending rows back (:meth:`Collection.open`).
"""

from __future__ import annotations

import base64
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activeindex.activation.optimize import ActivationConfig
from activeindex.activation.add import add_activated
from activeindex.atomic import write_bytes_atomic
from activeindex.collection import Collection, Match
from activeindex.extractors import Extractor
from activeindex.settings import QueryMode
from activeindex.service.batcher import Batcher
from activeindex.service.describers import LocalDescriber, ProcessDescriber, start_processes
from activeindex.service.locks import RWLock
from activeindex.service.metrics import ServiceMetrics
from activeindex.service.thumbnails import ThumbnailCache
from activeindex.service.uploads import ServiceLimits, Upload, UploadRejected, decode_upload


UPLOADS_DIR = "uploads"  # inside the collection: files added through the service, named by SHA-256
RELEASED_DIR = "released"  # inside the collection: activated files released through the service
MAX_AUTO_PROCESSES = 4  # model processes by default, at most (each holds torch and the model)


class ServedCollection(Collection):
    """A :class:`Collection` whose index changes hold the writer side of ``rw`` (so a search never
    walks an index being changed or replaced). Writes follow the collection's inter-process
    protocol: under its lock, the latest index on disk is reloaded first, so a CLI ``add`` while
    the service runs and the service's own adds never erase each other."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.rw = RWLock()
        super().__init__(*args, **kwargs)

    # The inter-process lock first, the writer side of ``rw`` inside it: waiting for another
    # process's write (the distributed driver holds the lock for a whole round) must not stall the
    # searches. Reloading the latest index (when taking the lock) only swaps ``self.index`` for a
    # new object, which a running search does not see; the in-place change happens under ``rw``.
    def add_vectors(self, *args: Any, **kwargs: Any) -> list[int]:
        with self._write_lock(), self.rw.write():
            return super().add_vectors(*args, **kwargs)

    def remove(self, ids: Any) -> tuple[list[int], list[int]]:
        with self._write_lock(), self.rw.write():
            return super().remove(ids)

    def catch_up(self) -> None:
        """Reload the index if another process replaced it (cheap when it did not: one stat)."""
        if self.index_changed_on_disk():
            with self.rw.write():
                if self.index_changed_on_disk():
                    self.reload()


@dataclass(frozen=True)
class Job:
    """One upload for the batcher: described, and searched when ``k`` is given (``dihedral``: under
    its 8 rotations/flips, each match's best view kept)."""

    upload: Upload
    k: int | None = None
    dihedral: bool = False
    submitted: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class Outcome:
    """A job's outcome: the descriptor (d,), and the k best matches when it was a query."""

    descriptor: np.ndarray
    matches: list[Match] | None = None


@dataclass(frozen=True)
class AddOutcome:
    id: int
    name: str
    duplicate: bool  # the content was already in the collection under ``id``
    mode: str  # passive | activated
    released: dict[str, Any] | None = None  # activated: quality and the file (base64)


class Service:
    """The loaded collection and extractor, the batcher, locks, metrics and limits."""

    def __init__(
        self,
        collection_path: str | os.PathLike[str],
        limits: ServiceLimits,
        metrics: ServiceMetrics,
        *,
        mmap: bool = False,
        model_processes: int | None = 0,
        progress: Callable[[str], None] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        say = progress or (lambda line: None)
        self.limits = limits
        self.metrics = metrics
        self.collection = ServedCollection.open(collection_path, mmap=mmap, device=device)
        self._describers: list[LocalDescriber | ProcessDescriber] = []
        try:
            self.extractor: Extractor = self.collection.extractor  # loaded (and checked) once, here
            say(f"loaded {self.collection.root.name}: {self.collection.count()} images, "
                f"{self.collection.config.factory}, model {self.extractor.spec_string}")
            self.write_mutex = threading.Lock()
            root = self.collection.root.resolve()
            self.uploads_dir = root / UPLOADS_DIR
            self.released_dir = root / RELEASED_DIR
            self.thumbnails = ThumbnailCache(limits.image_limits)
            threads = torch.get_num_threads()
            if model_processes is None:  # one per core torch uses, on a CPU (a GPU is one process's)
                model_processes = min(threads, MAX_AUTO_PROCESSES) if self.extractor.device.type == "cpu" else 0
            if model_processes > 0:
                # Each process runs its share of torch's threads (see .describers).
                n = model_processes
                say(f"starting {n} model process{'es' if n > 1 else ''} (each loads torch and the model)…")
                self._describers = list(start_processes(
                    self.extractor, limits.image_limits, n, max(1, threads // n),
                    progress=lambda i: say(f"model process {i}/{n} ready"),
                ))
            else:
                # On a CPU, one slot per torch thread ("batch streams", see .batcher).
                slots = threads if self.extractor.device.type == "cpu" else 1
                self._describers = [LocalDescriber(self.extractor, limits.image_limits)] * slots
                # One forward pass now, so the first request does not pay for lazy initialisation
                # (a model process makes its own before it says it is ready).
                pre = self.extractor.preprocessing
                self.extractor.features(np.zeros((1, pre.input_size, pre.input_size, 3), np.uint8))
            self._idle: queue.SimpleQueue[LocalDescriber | ProcessDescriber] = queue.SimpleQueue()
            for describer in self._describers:
                self._idle.put(describer)
            self.batcher: Batcher[Job, Outcome] = Batcher(
                self._run_batch, max_batch=limits.max_batch, slots=len(self._describers),
                on_batch=lambda size, _: metrics.batch_size.observe(size),
            )
        except BaseException:
            self._close_describers()
            self.collection.close()
            raise

    def close(self) -> None:
        self.batcher.close()
        self._close_describers()
        self.collection.close()

    def describers_summary(self) -> str:
        """Where uploads are decoded and described, in words."""
        n = len(self._describers)
        if isinstance(self._describers[0], ProcessDescriber):
            return f"{n} model process{'es' if n > 1 else ''} ({self._describers[0].threads} torch thread{'s' if self._describers[0].threads > 1 else ''} each)"
        return f"{n} thread{'s' if n > 1 else ''} of the server process"

    def _close_describers(self) -> None:
        for describer in set(self._describers):
            describer.close()

    # -- the batch -----------------------------------------------------------------------------
    def _run_batch(self, jobs: Sequence[Job]) -> list[Outcome | Exception]:
        """Decode the batch's uploads as the CLI decodes files and describe them in one model call
        (in a describer: this thread or a model process), then one index search for its queries.
        An upload that fails to decode is a 400 for its own request."""
        start = time.perf_counter()
        for job in jobs:
            self.metrics.stage.labels("queue").observe(start - job.submitted)
        describer = self._idle.get()
        try:
            out = describer.describe([(job.upload.data, job.upload.name) for job in jobs],
                                     [job.dihedral and job.k is not None for job in jobs])
        finally:
            self._idle.put(describer)
        for seconds in out.decode_seconds:
            self.metrics.stage.labels("decode").observe(seconds)
        self.metrics.stage.labels("model").observe(out.model_seconds)
        x = out.descriptors
        queries = [i for i, job in enumerate(jobs) if job.k is not None and out.errors[i] is None]
        found: dict[int, list[Match]] = {}
        single = [i for i in queries if not jobs[i].dihedral]
        multi = [i for i in queries if jobs[i].dihedral]
        if queries:
            self.collection.catch_up()
        for group, mode in ((single, QueryMode.SINGLE), (multi, QueryMode.DIHEDRAL)):
            if not group:
                continue
            k = max(int(jobs[i].k or 0) for i in group)
            if mode is QueryMode.DIHEDRAL:
                assert out.views is not None
                xq = out.views[group].reshape(-1, x.shape[1])
            else:
                xq = x[group]
            with self.metrics.time("search"), self.collection.rw.read():
                rows = self.collection.search(xq, k, mode)
            found.update({i: row[: jobs[i].k] for i, row in zip(group, rows)})
        return [
            Outcome(x[i], found.get(i)) if error is None else UploadRejected(400, error)
            for i, error in enumerate(out.errors)
        ]

    # -- reads ---------------------------------------------------------------------------------
    def query(self, upload: Upload, k: int, dihedral: bool = False) -> Future[Outcome]:
        """The k best matches of an upload, batched with concurrent queries (a future);
        ``dihedral``: searched under its 8 rotations/flips (see :mod:`activeindex.dihedral`)."""
        return self.batcher.submit(Job(upload, k, dihedral=dihedral))

    def describe(self, upload: Upload) -> np.ndarray:
        """An upload's descriptor (d,), batched with concurrent queries."""
        return self.batcher.submit(Job(upload)).result().descriptor

    def record(self, image_id: int) -> dict[str, Any] | None:
        with self.collection.rw.read():
            return self.collection.record(image_id)

    def count(self) -> int:
        with self.collection.rw.read():
            return self.collection.count()

    def info(self) -> dict[str, Any]:
        with self.collection.rw.read():
            info = self.collection.info()
        info.pop("path", None)  # the server's file system is not the client's business
        return info

    # -- writes --------------------------------------------------------------------------------
    def _store_upload(self, upload: Upload) -> Path:
        """Keep an added upload's bytes (thumbnails and activation read them): named by content."""
        self.uploads_dir.mkdir(exist_ok=True)
        path = self.uploads_dir / f"{upload.sha256}{upload.extension}"
        if not path.exists():
            write_bytes_atomic(path, upload.data)
        return path

    def add_passive(self, upload: Upload) -> AddOutcome:
        x = self.describe(upload)  # outside the write mutex: describing runs beside other writes
        # The collection's lock too: a CLI `add` of the same bytes cannot slip in between the check
        # and the add.
        with self.write_mutex, self.collection.writing(), self.metrics.time("add"):
            existing = self.collection.find_hash(upload.sha256)
            if existing is not None:
                return AddOutcome(existing, self._name_of(existing), True, self._mode_of(existing))
            path = self._store_upload(upload)
            (image_id,) = self.collection.add_vectors(x[None], [upload.name], [upload.sha256], paths=[str(path)])
        return AddOutcome(image_id, upload.name, False, "passive")

    def add_activated(self, upload: Upload, config: ActivationConfig) -> AddOutcome:
        """Activate an upload, keep its released file under ``released/``, add the original's code.
        Raises :class:`ActivationFailed` when no file within the budget could be made."""
        # Fail a broken file with its reason before taking the write mutex.
        pixels = upload.width * upload.height
        if pixels > self.limits.max_activation_pixels:
            raise UploadRejected(
                413, f"{upload.width}×{upload.height} = {pixels} pixels is too large to activate (the limit is "
                f"{self.limits.max_activation_pixels}: activation needs about 180 bytes per pixel); downscale it"
            )
        with self.metrics.time("decode"):
            decode_upload(upload, self.limits)
        stem, ext = os.path.splitext(upload.name)
        name = f"{stem}-{upload.sha256[:8]}{ext}"  # released as released/<name>.png: unique per content
        with self.write_mutex, self.metrics.time("activate"):
            existing = self.collection.find_hash(upload.sha256)
            if existing is not None:
                return AddOutcome(existing, self._name_of(existing), True, self._mode_of(existing),
                                  self._released_of(existing))
            path = self._store_upload(upload)
            report = add_activated(self.collection, [path], self.released_dir, config, names=[name],
                                   max_pixels=self.limits.max_activation_pixels)
        if report.failures:
            raise ActivationFailed(report.failures[0].reason)
        if report.duplicates:  # cannot happen under the mutex, but never report a wrong outcome
            existing = report.duplicates[0][1]
            return AddOutcome(existing, self._name_of(existing), True, self._mode_of(existing))
        rec = report.released[0]
        released = self._released_of(rec.id, rec)
        if released is not None:
            released["activation"] = report.config
        return AddOutcome(rec.id, rec.name, False, "activated", released)

    def remove(self, image_id: int) -> bool:
        with self.write_mutex, self.metrics.time("remove"):
            record = self.collection.record(image_id)
            removed, _ = self.collection.remove([image_id])
            if removed and record and record["path"]:
                stored = Path(record["path"])
                if stored.parent == self.uploads_dir:  # a file only the service made: ours to delete
                    stored.unlink(missing_ok=True)
        self.thumbnails.forget(image_id)
        return bool(removed)

    # -- helpers -------------------------------------------------------------------------------
    def _name_of(self, image_id: int) -> str:
        return (self.collection.record(image_id) or {}).get("name", "")

    def _mode_of(self, image_id: int) -> str:
        return (self.collection.record(image_id) or {}).get("mode", "passive")

    def _released_of(self, image_id: int, rec: Any = None) -> dict[str, Any] | None:
        record = self.collection.record(image_id)
        if not record or not record["released"]:
            return None
        path = Path(record["released"])
        out: dict[str, Any] = {
            "psnr": record["psnr"], "ssim": record["ssim"], "linf": record["linf"],
            "url": f"/api/images/{image_id}/released", "media_type": "image/png",
        }
        if rec is not None:
            out.update(cos_before=rec.cos_before, cos_after=rec.cos_after, scale=rec.scale, fix=rec.fix)
        if path.is_file():
            out["data_base64"] = base64.b64encode(path.read_bytes()).decode("ascii")
        return out


class ActivationFailed(Exception):
    """No released file could be made within the budget; the reason says why."""
