"""Gathers concurrent requests into batches for the model.

A CNN on a CPU describes a batch of 16 images several times faster than 16 batches of one. Requests
hand their jobs to the batcher; a worker takes everything that arrived while it was busy, preparing
each job as it takes it (``prepare``: decoding an upload), and runs one function on the whole batch
(``fn``: the model and the search). While another worker is running its batch, a gathering worker
goes on taking jobs as they arrive, up to ``max_batch``, for at most ``linger`` seconds after its
first: under load a batch of 16 costs a CPU thread about 30 % less per image than a batch of 4,
and the wait is spent decoding. When no worker is running a batch, a gathering worker runs what it
has as soon as the queue is empty: an idle service never waits, and under load the workers take
turns, one running its batch while the other gathers and decodes the next.

On a CPU the batcher runs as many workers as torch has threads, each with its share (usually one)
of the intra-op threads: the "batch streams" of :mod:`activeindex.features`. One model call with
all threads would stall at every OpenMP barrier whenever another thread of the process (the event
loop, a write) preempts one of its threads; with one thread per stream, a preempted stream slows
only itself.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

import torch

from activeindex.features import pin_torch_threads

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = TypeVar("P")
R = TypeVar("R")

_STOP = object()


class Batcher(Generic[T, P, R]):
    """Runs ``fn`` on batches of submitted jobs, from ``workers`` threads that each run torch with
    ``threads_per_worker`` intra-op threads (default: torch's count divided among them).

    ``prepare(job)`` runs on each job as a worker takes it (default: the job as it is); an exception
    it raises fails that job alone (a broken upload fails its own request, not its batch).
    ``fn(prepared)`` returns one result per job, in order; an exception it raises fails the whole
    batch. ``on_batch(size, seconds)`` reports each call of ``fn``.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[P]], Sequence[R]],
        *,
        prepare: Callable[[T], P] | None = None,
        max_batch: int = 32,
        workers: int = 1,
        threads_per_worker: int | None = None,
        linger: float = 0.01,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or workers < 1:
            raise ValueError(f"max_batch and workers must be >= 1, got {max_batch} and {workers}")
        self._fn = fn
        self._prepare = prepare
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._linger = linger
        self._busy = 0  # workers running ``fn`` now
        self._busy_lock = threading.Lock()
        self._closed = False
        threads = torch.get_num_threads()
        per_worker = threads_per_worker or max(1, threads // workers)
        ready = threading.Barrier(workers + 1)
        self._workers = [
            threading.Thread(target=self._run, args=(per_worker, ready), name=f"batch-{i}", daemon=True)
            for i in range(workers)
        ]
        try:
            for t in self._workers:
                t.start()
            ready.wait()
        finally:
            # set_num_threads in a worker also set torch's default for threads started later.
            torch.set_num_threads(threads)

    def submit(self, job: T) -> Future[R]:
        """Queue one job; the future gives its outcome."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        fut: Future[R] = Future()
        self._queue.put((job, fut))
        return fut

    def close(self) -> None:
        """Finish what is queued, then stop the workers."""
        self._closed = True
        for _ in self._workers:
            self._queue.put(_STOP)
        for t in self._workers:
            t.join()

    def _gather(self) -> list | None:
        """Block for a first job, then take (and prepare) jobs as they come, until ``max_batch``, or
        until the queue is empty and either no worker is running a batch or ``linger`` has passed
        since the first job; None: stop. Idle workers gather side by side, sharing what arrives."""
        batch: list = []
        deadline = None  # set by the first job
        while len(batch) < self._max_batch:
            if deadline is None:
                item = self._queue.get()
            else:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    wait = deadline - time.perf_counter()
                    if wait <= 0 or not self._busy:
                        break
                    try:
                        item = self._queue.get(timeout=min(wait, 0.002))
                    except queue.Empty:
                        continue
            if item is _STOP:
                if not batch:
                    return None
                self._queue.put(_STOP)  # for this worker's next turn, after this batch
                break
            job, fut = item
            # A job cancelled while queued (its client went away) is dropped; once running, it can
            # no longer be cancelled, and setting its outcome cannot fail.
            if not fut.set_running_or_notify_cancel():
                continue
            if self._prepare is not None:
                try:
                    job = self._prepare(job)
                except BaseException as exc:  # noqa: BLE001 - this job's own failure
                    fut.set_exception(exc)
                    continue
            batch.append((job, fut))
            if deadline is None:
                deadline = time.perf_counter() + self._linger
        return batch

    def _run(self, threads: int, ready: threading.Barrier) -> None:
        pin_torch_threads(threads)
        ready.wait()
        while (items := self._gather()) is not None:
            t0 = time.perf_counter()
            with self._busy_lock:
                self._busy += 1
            try:
                results = self._fn([job for job, _ in items])
                if len(results) != len(items):
                    raise RuntimeError(f"the batch function gave {len(results)} results for {len(items)} jobs")
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                logger.exception("a batch of %d failed", len(items))
                for _, fut in items:
                    fut.set_exception(exc)
                continue
            finally:
                with self._busy_lock:
                    self._busy -= 1
            if self._on_batch is not None:
                self._on_batch(len(items), time.perf_counter() - t0)
            for (_, fut), out in zip(items, results):
                fut.set_result(out)
