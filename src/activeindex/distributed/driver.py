"""The driver: split images into shards, run them on Ray workers, merge the results into a collection.

An add runs in rounds of ``commit_every`` images, each under the collection's writer lock:

1. hash the round's files and drop content already in the collection (as the in-process add does);
2. reserve the ids of the rest as ``pending`` rows, in one transaction, in the order the in-process
   add would assign them (input order; for activation, its size-sorted batch order);
3. submit one task per shard: the worker gets the file paths, their ids, the extractor spec and the
   trained, empty index (put once in Ray's object store), and returns a shard index holding the
   codes under their final ids (plus, for activation, the records of the released files it wrote);
4. merge the shard indexes with FAISS's ``merge_from`` (:mod:`.shards`), write the index atomically
   and mark the rows ``indexed`` (:meth:`Collection.complete_add`); rows of images that failed are
   deleted (their ids are never reused).

Worker death: Ray retries the task (``max_retries``). Results are keyed by shard and only the first
result of a shard is merged; a shard's work is deterministic and its released files are written
atomically to fixed paths, so a retry cannot leave duplicates. A driver that dies leaves the
current round's rows ``pending``: the next open rolls them back and a rerun adds them again, skipping
every image already indexed — the same recovery as the in-process add.

Without failures (and with one round), a Ray add gives the same ids, codes and rows as the
in-process add; with unreadable files, their reserved ids are skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from activeindex import index as ix
from activeindex.activation.add import (
    DEFAULT_BATCH_PIXELS,
    ActivationReport,
    ReleaseRecord,
    RunCheck,
    plan_activation,
    recheck_run,
    release_path,
)
from activeindex.activation.optimize import ActivationConfig
from activeindex.activation.release import OutputFormat
from activeindex.collection import AddReport, Collection
from activeindex.distributed import shards as sh
from activeindex.distributed import worker as wk
from activeindex.errors import ActiveIndexError, CollectionError
from activeindex.extractors import Extractor
from activeindex.features import ExtractionResult, Failure
from activeindex.images import MAX_ACTIVATION_PIXELS

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class RayOptions:
    """Where and how to run. ``address`` joins a running cluster (``"auto"``, ``"HOST:6379"``,
    ``"ray://HOST:10001"``); otherwise a local Ray with ``workers`` CPUs is started (and stopped at
    the end). An already initialised Ray (``ray.init`` called by the caller) is used as it is."""

    workers: int | None = None
    address: str | None = None
    shard_size: int = 256  # images per task
    commit_every: int = 4096  # images per round: ids reserved, shards merged, index written
    threads_per_worker: int = 1  # CPUs (torch and FAISS threads) per task
    max_retries: int = 3  # retries of a task whose worker died

    def __post_init__(self) -> None:
        for name in ("shard_size", "commit_every", "threads_per_worker"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")


@dataclass
class RunStats:
    """What happened on the workers (filled in by the drivers when given)."""

    shards: int = 0
    worker_pids: set[int] = field(default_factory=set)
    worker_threads: set[int] = field(default_factory=set)
    worker_seconds: float = 0.0  # summed over shards
    ray_start_seconds: float = 0.0  # 0 when Ray was already running
    merged: bool | None = None  # shard indexes merged (True) or vectors added (False)


def import_ray() -> ModuleType:
    try:
        import ray
    except ImportError:
        raise ActiveIndexError(
            "Ray is not installed; install the optional extra: pip install 'activeindex[ray]'"
        ) from None
    return ray


@contextlib.contextmanager
def ray_session(options: RayOptions, stats: RunStats | None = None) -> Iterator[ModuleType]:
    """Ray, initialised: the caller's if running, else a local one (``workers`` CPUs) or the cluster
    at ``address``, shut down at the end."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    if options.address:
        ray.init(address=options.address, **kwargs)
    else:
        ray.init(num_cpus=options.workers or os.cpu_count() or 1, **kwargs)
    if stats is not None:
        stats.ray_start_seconds = time.perf_counter() - t0
    try:
        yield ray
    finally:
        ray.shutdown()


def _run_shards(
    ray: ModuleType,
    fn: Callable[..., wk.ShardResult],
    jobs: dict[int, tuple],
    sizes: dict[int, int],
    options: RayOptions,
    progress: ProgressCallback | None,
    stats: RunStats | None,
) -> dict[int, wk.ShardResult]:
    """Run ``fn(*jobs[k])`` for every shard k on the workers → results by shard (first one wins)."""
    remote = ray.remote(num_cpus=options.threads_per_worker, max_retries=options.max_retries)(fn)
    refs = {remote.remote(*args): k for k, args in jobs.items()}
    results: dict[int, wk.ShardResult] = {}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        for ref in ready:
            k = refs[ref]
            try:
                res = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, ActiveIndexError):
                    raise cause from None
                raise ActiveIndexError(f"shard {k} failed on its worker: {exc}") from exc
            except ray.exceptions.RayError as exc:
                raise ActiveIndexError(
                    f"shard {k} failed after {options.max_retries} retries: {type(exc).__name__}: {exc}"
                ) from exc
            if res.shard in results:  # never merge a shard twice
                logger.warning("shard %d returned twice; keeping the first result", res.shard)
                continue
            results[res.shard] = res
            if stats is not None:
                stats.shards += 1
                stats.worker_pids.add(res.pid)
                stats.worker_threads.add(res.threads)
                stats.worker_seconds += res.seconds
            if progress is not None:
                progress(sizes[k])
    return results


def _setup(extractor: Extractor, options: RayOptions, *, template_key: str = "", return_index: bool = True) -> wk.WorkerSetup:
    return wk.WorkerSetup(
        extractor=extractor.describe(),
        precision=extractor.precision.value,
        threads=options.threads_per_worker,
        template_key=template_key,
        return_index=return_index,
        crash=os.environ.get(wk.CRASH_ENV),
    )


def _map_failures(failures: list[Failure], given: dict[str, Path]) -> list[Failure]:
    """Failures name the absolute paths the workers got: give back the paths the caller gave."""
    return [Failure(given.get(str(f.path), f.path), f.reason) for f in failures]


# -- extract -----------------------------------------------------------------------------------
def extract_paths_ray(
    paths: Sequence[str | os.PathLike[str]],
    extractor: Extractor,
    *,
    options: RayOptions = RayOptions(),
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    stats: RunStats | None = None,
) -> ExtractionResult:
    """:func:`activeindex.features.extract_paths` on Ray workers: the same result, rows in input
    order. Workers must reach the files under the same paths (a shared file system)."""
    paths = [Path(p) for p in paths]
    absolute = [str(p.resolve()) for p in paths]
    given = dict(zip(absolute, paths))
    setup = _setup(extractor, options)
    jobs: dict[int, tuple] = {}
    sizes: dict[int, int] = {}
    for k, s in enumerate(range(0, len(paths), options.shard_size)):
        jobs[k] = (k, absolute[s : s + options.shard_size], setup, batch_size)
        sizes[k] = len(jobs[k][1])
    with ray_session(options, stats) as ray:
        results = _run_shards(ray, wk.extract_shard, jobs, sizes, options, progress, stats)
    feats, ok, failures = [], [], []
    for k in sorted(results):
        r = results[k]
        start = k * options.shard_size
        ok.extend(paths[start + i] for i in r.positions)
        if r.features is not None and len(r.features):
            feats.append(r.features)
        failures.extend(_map_failures(r.failures, given))
    features = np.concatenate(feats) if feats else np.empty((0, extractor.dim), np.float32)
    return ExtractionResult(features=features.astype(np.float32, copy=False), paths=ok, failures=failures)


# -- add ---------------------------------------------------------------------------------------
@dataclass
class _Template:
    ref: Any  # ObjectRef of the serialised empty index
    setup: wk.WorkerSetup


def _prepare(ray: ModuleType, coll: Collection, options: RayOptions, stats: RunStats | None) -> _Template:
    """Ship the trained, empty index once; decide whether shard indexes can be merged."""
    empty = sh.empty_copy(coll.index)
    data = sh.serialize(empty)
    merge = sh.can_merge(coll.index, sh.deserialize(data))
    if stats is not None:
        stats.merged = merge
    setup = _setup(coll.extractor, options, template_key=uuid.uuid4().hex, return_index=merge)
    return _Template(ray.put(data), setup)


def _merge(coll: Collection, results: dict[int, wk.ShardResult], reserved: dict[int, list[int]]) -> set[int]:
    """Put every shard's codes into the collection's index → the ids now in it."""
    indexed: set[int] = set()
    for k in sorted(results):
        got = results[k].ids.tolist()
        # A shard holds only ids reserved for it, each once: a retried shard cannot add twice.
        assert set(got) <= set(reserved[k]) and len(set(got)) == len(got), f"shard {k} returned foreign ids"
        indexed.update(got)
    if any(r.index is not None for r in results.values()):
        sh.merge_shards(coll.index, [sh.deserialize(results[k].index) for k in sorted(results)])
    else:
        for k in sorted(results):
            r = results[k]
            if len(r.ids):
                ix.add_with_ids(coll.index, r.features, r.ids)
    return indexed


def _check_writable(coll: Collection) -> None:
    if coll.read_only:
        raise CollectionError(f"{coll.root} is open read-only ({coll.read_only_reason})")


def add_images_ray(
    coll: Collection,
    paths: Sequence[str | os.PathLike[str]],
    *,
    names: Sequence[str] | None = None,
    options: RayOptions = RayOptions(),
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
    stats: RunStats | None = None,
) -> AddReport:
    """:meth:`Collection.add_images` with extraction and encoding on Ray workers (see the module
    docstring for the protocol)."""
    _check_writable(coll)
    paths = [Path(p) for p in paths]
    names = list(names) if names is not None else [p.name for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(paths)} paths but {len(names)} names")
    report = AddReport()
    next_shard = 0
    with ray_session(options, stats) as ray:
        template = _prepare(ray, coll, options, stats)
        for start in range(0, len(paths), options.commit_every):
            chunk = list(zip(paths[start : start + options.commit_every], names[start : start + options.commit_every]))
            with coll.writing():
                todo, repeats = coll.plan_add(chunk, report)
                if progress and len(chunk) > len(todo):
                    progress(len(chunk) - len(todo))
                if todo:
                    absolute = [str(t[0].resolve()) for t in todo]
                    ids = coll.reserve_ids([t[1] for t in todo], [t[2] for t in todo], paths=absolute)
                    jobs: dict[int, tuple] = {}
                    reserved: dict[int, list[int]] = {}
                    for s in range(0, len(todo), options.shard_size):
                        k, next_shard = next_shard, next_shard + 1
                        reserved[k] = ids[s : s + options.shard_size]
                        jobs[k] = (k, absolute[s : s + options.shard_size], reserved[k], template.setup,
                                   template.ref, batch_size)
                    results = _run_shards(ray, wk.add_shard, jobs, {k: len(v) for k, v in reserved.items()},
                                          options, progress, stats)
                    indexed = _merge(coll, results, reserved)
                    kept = [i for i in ids if i in indexed]
                    coll.complete_add(kept, dropped=[i for i in ids if i not in indexed])
                    report.added.extend((i, t[1]) for i, t in zip(ids, todo) if i in indexed)
                    given = {a: t[0] for a, t in zip(absolute, todo)}
                    for k in sorted(results):
                        report.failures.extend(_map_failures(results[k].failures, given))
            coll.resolve_repeats(repeats, report)
    return report


# -- add --activate ----------------------------------------------------------------------------
def add_activated_ray(
    coll: Collection,
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: ActivationConfig = ActivationConfig(),
    *,
    names: Sequence[str] | None = None,
    fmt: OutputFormat | str = OutputFormat.PNG,
    quality: int = 95,
    batch_size: int = 16,
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS,
    max_pixels: int = MAX_ACTIVATION_PIXELS,
    options: RayOptions = RayOptions(),
    progress: ProgressCallback | None = None,
    stats: RunStats | None = None,
) -> ActivationReport:
    """:func:`activeindex.activation.add.add_activated` with activation on Ray workers: the same
    checks before any work, the same batches (a shard is a run of whole batches), the same ids.
    Workers write the released files to ``out_dir`` (a shared file system), atomically."""
    _check_writable(coll)
    plan = plan_activation(coll, paths, out_dir, config, names=names, fmt=fmt, quality=quality,
                           batch_size=batch_size, max_batch_pixels=max_batch_pixels, progress=progress)
    config, fmt, out_dir, report, batches, repeats = (
        plan.config, plan.fmt, plan.out_dir, plan.report, plan.batches, plan.repeats)
    rounds: list[list[list[tuple[Path, str, str]]]] = [[]]
    for b in batches:
        if sum(map(len, rounds[-1])) >= options.commit_every:
            rounds.append([])
        rounds[-1].append(b)
    next_shard = 0
    checks: list[RunCheck] = []
    out_abs = str(out_dir.resolve())
    with ray_session(options, stats) as ray:
        template = _prepare(ray, coll, options, stats)
        for round_batches in rounds:
            flat = [t for b in round_batches for t in b]
            if not flat:
                continue
            with coll.writing():
                absolute = [str(t[0].resolve()) for t in flat]
                ids = coll.reserve_ids([t[1] for t in flat], [t[2] for t in flat], paths=absolute, mode="activated")
                id_of = {t[0]: i for t, i in zip(flat, ids)}
                jobs: dict[int, tuple] = {}
                reserved: dict[int, list[int]] = {}
                group: list[list[tuple[str, str, int]]] = []
                for bi, b in enumerate(round_batches):
                    group.append([(str(t[0].resolve()), t[1], id_of[t[0]]) for t in b])
                    if sum(map(len, group)) >= options.shard_size or bi == len(round_batches) - 1:
                        k, next_shard = next_shard, next_shard + 1
                        reserved[k] = [item[2] for g in group for item in g]
                        jobs[k] = (k, group, out_abs, template.setup, template.ref, config, fmt.value, quality, max_pixels)
                        group = []
                results = _run_shards(ray, wk.activate_shard, jobs, {k: len(v) for k, v in reserved.items()},
                                      options, progress, stats)
                indexed = _merge(coll, results, reserved)
                files = {f.id: f for r in results.values() for f in r.released}
                kept = [i for i in ids if i in indexed]
                coll.complete_add(
                    kept,
                    dropped=[i for i in ids if i not in indexed],
                    quality=[files[i].quality for i in kept],
                    released=[files[i].path for i in kept],
                )
                for i, (path, name, _) in zip(ids, flat):
                    if i in indexed:
                        f = files[i]
                        q = f.quality
                        report.added.append((i, name))
                        report.released.append(ReleaseRecord(
                            i, name, str(release_path(out_dir, name, fmt)), q["psnr"], q["ssim"], q["linf"],
                            f.scale, f.cos_before, f.cos_after, f.fix,
                        ))
                        checks.append(RunCheck(i, path, f.original, f.descriptor))
                given = {a: t[0] for a, t in zip(absolute, flat)}
                for k in sorted(results):
                    report.failures.extend(_map_failures(results[k].failures, given))
    # Workers checked each file against its batch only: the driver checks them all against the
    # collection as it now is, and activates again (here) the few that lost rank 1.
    recheck_run(coll, report, checks, config, fmt, quality, batch_size, max_pixels)
    coll.resolve_repeats(repeats, report)
    return report
