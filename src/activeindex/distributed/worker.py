"""What a Ray worker runs for one shard of images. Plain functions: no Ray import here, so they can
be called (and tested) in-process too.

A worker process keeps what it built for its first shard (the extractor, the deserialised empty
index) for the next ones, in :data:`_CACHE`. Each shard function is idempotent: given the same
shard it returns the same result and writes the same released files (atomically, to the same
paths), so a shard retried after its worker died leaves no trace of the first attempt.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from activeindex.distributed.shards import deserialize, serialize
from activeindex.errors import ImageLoadError, ModelError
from activeindex.extractors import Extractor, create_extractor
from activeindex.features import Failure, extract_paths

logger = logging.getLogger(__name__)

# Per worker process: extractors by (digest, precision) and empty indexes by template key.
_CACHE: dict[tuple[str, ...], Any] = {}

# Test hook: "SHARD:MARKER" makes the worker die (os._exit) in the middle of shard SHARD, once: the
# first attempt creates MARKER, the retry finds it and goes on. Read by the driver, passed to tasks.
CRASH_ENV = "ACTIVEINDEX_TEST_CRASH_SHARD"


@dataclass(frozen=True)
class WorkerSetup:
    """What every shard of a run shares."""

    extractor: dict[str, Any]  # Extractor.describe() (with the weights digest, checked here)
    precision: str  # the precision the driver resolved, so every node computes alike
    threads: int = 1  # torch and FAISS threads in the worker
    template_key: str = ""  # names the empty index in the per-process cache
    return_index: bool = True  # return a shard index to merge; False: return the vectors
    crash: str | None = None  # CRASH_ENV's value, for tests


@dataclass
class ReleasedFile:
    id: int
    name: str
    path: str  # where the released file was written (absolute)
    quality: dict[str, float | None]
    scale: float
    cos_before: float
    cos_after: float
    fix: str = "none"  # activeindex.activation.add.Fix value
    # For the driver's check once every shard's codes are stored (activation.add.recheck_run):
    original: np.ndarray | None = None  # (d,) the original's descriptor
    descriptor: np.ndarray | None = None  # (d,) the released file's


@dataclass
class ShardResult:
    shard: int
    positions: list[int]  # positions (in the shard's input) of the images that were described
    ids: np.ndarray  # (n,) int64 ids of those images (empty for extraction)
    features: np.ndarray | None  # (n, d) float32 when the driver asked for vectors
    index: np.ndarray | None  # serialised shard index holding the n codes with their ids
    failures: list[Failure] = field(default_factory=list)
    released: list[ReleasedFile] = field(default_factory=list)
    pid: int = 0
    threads: int = 0
    seconds: float = 0.0


def _setup(setup: WorkerSetup) -> Extractor:
    torch.set_num_threads(setup.threads)
    faiss.omp_set_num_threads(setup.threads)
    key = ("extractor", str(setup.extractor.get("digest")), setup.precision)
    extractor = _CACHE.get(key)
    if extractor is None:
        extractor = create_extractor(setup.extractor, precision=setup.precision)
        if extractor.digest != setup.extractor.get("digest"):
            raise ModelError(
                f"worker {os.getpid()} loads {extractor.spec_string} with weights digest "
                f"{extractor.digest[:12]}…, the driver's has {str(setup.extractor.get('digest'))[:12]}…: "
                "every node must see the same model file"
            )
        _CACHE[key] = extractor
    return extractor


def _empty_index(setup: WorkerSetup, template: np.ndarray) -> faiss.Index:
    key = ("index", setup.template_key)
    if key not in _CACHE:
        for stale in [k for k in _CACHE if k[0] == "index"]:  # a worker reused by a later run
            del _CACHE[stale]
        _CACHE[key] = deserialize(template)
    return faiss.clone_index(_CACHE[key])


def _maybe_crash(setup: WorkerSetup, shard: int) -> None:
    if not setup.crash:
        return
    target, _, marker = setup.crash.partition(":")
    if int(target) == shard and marker and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        logger.warning("test hook: worker %d dies in the middle of shard %d", os.getpid(), shard)
        os._exit(1)


def extract_shard(shard: int, paths: list[str], setup: WorkerSetup, batch_size: int) -> ShardResult:
    """Describe the shard's images → features of those that could be read, and the failures."""
    t0 = time.perf_counter()
    extractor = _setup(setup)
    result = extract_paths(paths, extractor, batch_size=batch_size)
    _maybe_crash(setup, shard)
    where = {p: i for i, p in enumerate(map(Path, paths))}
    return ShardResult(
        shard=shard,
        positions=[where[p] for p in result.paths],
        ids=np.empty(0, np.int64),
        features=result.features,
        index=None,
        failures=result.failures,
        pid=os.getpid(),
        threads=torch.get_num_threads(),
        seconds=time.perf_counter() - t0,
    )


def add_shard(
    shard: int, paths: list[str], ids: list[int], setup: WorkerSetup, template: np.ndarray, batch_size: int
) -> ShardResult:
    """Describe the shard's images and encode them, with their reserved ids, into an empty copy of
    the collection's index → the shard index (or the vectors), and the failures."""
    t0 = time.perf_counter()
    extractor = _setup(setup)
    index = _empty_index(setup, template)
    result = extract_paths(paths, extractor, batch_size=batch_size)
    _maybe_crash(setup, shard)
    where = {p: i for i, p in enumerate(map(Path, paths))}
    positions = [where[p] for p in result.paths]
    kept_ids = np.asarray([ids[i] for i in positions], dtype=np.int64)
    return _finish(shard, setup, index, positions, kept_ids, result.features, result.failures, [], t0)


def _finish(
    shard: int,
    setup: WorkerSetup,
    index: faiss.Index,
    positions: list[int],
    ids: np.ndarray,
    features: np.ndarray,
    failures: list[Failure],
    released: list[ReleasedFile],
    t0: float,
) -> ShardResult:
    data = None
    if setup.return_index:
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(features, dtype=np.float32), ids)
        data = serialize(index)
    return ShardResult(
        shard=shard,
        positions=positions,
        ids=ids,
        features=None if setup.return_index else features,
        index=data,
        failures=failures,
        released=released,
        pid=os.getpid(),
        threads=torch.get_num_threads(),
        seconds=time.perf_counter() - t0,
    )


def activate_shard(
    shard: int,
    batches: list[list[tuple[str, str, int]]],
    out_dir: str,
    setup: WorkerSetup,
    template: np.ndarray,
    config: Any,  # ActivationConfig
    fmt: str,
    quality: int,
    max_pixels: int | None = None,
) -> ShardResult:
    """Activate the shard's batches of (path, name, id) against the empty index (its codebooks give
    the targets), write each released file atomically to ``out_dir``, and encode the originals'
    descriptors with their ids → the shard index, the released files' records, the failures."""
    from activeindex.activation.add import activation_limits, load_arrays, release_batch, release_path
    from activeindex.activation.release import OutputFormat
    from activeindex.atomic import write_bytes_atomic
    from activeindex.errors import ActiveIndexError

    t0 = time.perf_counter()
    extractor = _setup(setup)
    index = _empty_index(setup, template)
    fmt = OutputFormat(fmt)
    positions: list[int] = []
    kept_ids: list[int] = []
    feats: list[np.ndarray] = []
    failures: list[Failure] = []
    released: list[ReleasedFile] = []
    pos = 0
    for b, batch in enumerate(batches):
        loaded = []
        images = load_arrays([item[0] for item in batch], activation_limits(*([max_pixels] if max_pixels else [])))
        for (path, name, id_), image in zip(batch, images):
            if isinstance(image, ImageLoadError):
                failures.append(Failure(Path(path), image.reason))
            else:
                loaded.append((pos, path, name, id_, image))
            pos += 1
        if not loaded:
            continue
        rb = release_batch(extractor, index, [item[4] for item in loaded], config, fmt, quality)
        for i, ((p, path, name, id_, _), rel) in enumerate(zip(loaded, rb.files)):
            if isinstance(rel, ActiveIndexError):
                failures.append(Failure(Path(path), str(rel)))
                continue
            dest = release_path(Path(out_dir), name, fmt)
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(dest, rel.data)
            positions.append(p)
            kept_ids.append(id_)
            feats.append(rb.features[i])
            released.append(ReleasedFile(id_, name, str(dest), rel.quality(), rel.scale,
                                         float(rb.cos_before[i]), float(rb.cos_after[i]), rb.fixes[i].value,
                                         rb.features[i], rb.released_features[i]))
        if b == 0:
            _maybe_crash(setup, shard)  # after the first batch's files are written: mid-shard
    d = extractor.dim
    features = np.stack(feats) if feats else np.empty((0, d), np.float32)
    return _finish(shard, setup, index, positions, np.asarray(kept_ids, np.int64), features, failures,
                   released, t0)
