"""Gathers concurrent requests into batches for the model.

A CNN on a CPU describes a batch of 16 images several times faster than 16 batches of one.
Requests hand their jobs to the batcher, which runs one function (``fn``: decoding, the model, the
search) on a batch of them at a time in each of its ``slots`` (worker threads). Its dispatcher
thread gathers the next batch while the slots are busy: it takes jobs as they arrive and hands
them over the moment a slot is free, or waits for one once it holds ``max_batch`` jobs. So an idle
service answers at once (a lone job runs as soon as it arrives), and under load each batch holds
what arrived while the previous ones ran, with no slot kept waiting for a batch to fill.

On a CPU the service has one slot per torch thread, each running torch on its share (usually one)
of the intra-op threads, in this process or in a model process (:mod:`.describers`): the "batch
streams" of :mod:`activeindex.features`. One model call with all threads would stall at every
OpenMP barrier whenever another thread (the event loop, a write) preempts one of its threads; with
one thread per stream, a preempted stream slows only itself.
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
R = TypeVar("R")

_STOP = object()  # to the dispatcher (then to each slot): finish what is queued, then stop
_FREED = object()  # to the dispatcher: a slot was freed, hand over the jobs it holds


class Batcher(Generic[T, R]):
    """Runs ``fn`` on batches of submitted jobs, at most ``slots`` batches at a time, each slot a
    thread running torch with ``threads_per_slot`` intra-op threads (default: torch's count divided
    among the slots).

    ``fn(jobs)`` returns one result per job, in order: an exception among them fails that job
    alone, an exception ``fn`` raises fails the whole batch. ``on_batch(size, seconds)`` reports
    each call of ``fn``. A job cancelled before its batch starts is dropped.
    """

    def __init__(
        self,
        fn: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        max_batch: int = 32,
        slots: int = 1,
        threads_per_slot: int | None = None,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1 or slots < 1:
            raise ValueError(f"max_batch and slots must be >= 1, got {max_batch} and {slots}")
        self._fn = fn
        self._max_batch = max_batch
        self._slots = slots
        self._on_batch = on_batch
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (job, future), _STOP; _FREED from slots
        self._batches: queue.SimpleQueue = queue.SimpleQueue()  # from the dispatcher to the slots
        self._busy = 0  # slots holding a batch
        self._slot_free = threading.Condition()
        self._closed = False
        threads = torch.get_num_threads()
        per_slot = threads_per_slot or max(1, threads // slots)
        ready = threading.Barrier(slots + 1)
        self._threads = [
            threading.Thread(target=self._slot, args=(per_slot, ready), name=f"batch-{i}", daemon=True)
            for i in range(slots)
        ]
        self._threads.append(threading.Thread(target=self._dispatch, name="batch-dispatch", daemon=True))
        try:
            for t in self._threads:
                t.start()
            ready.wait()
        finally:
            # set_num_threads in a slot also set torch's default for threads started later.
            torch.set_num_threads(threads)

    def submit(self, job: T) -> Future[R]:
        """Queue one job; the future gives its outcome."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        fut: Future[R] = Future()
        self._jobs.put((job, fut))
        return fut

    def close(self) -> None:
        """Finish what is queued, then stop the threads."""
        self._closed = True
        self._jobs.put(_STOP)
        for t in self._threads:
            t.join()

    # -- the dispatcher ------------------------------------------------------------------------
    def _dispatch(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._gather()
            if batch:
                with self._slot_free:
                    while self._busy >= self._slots:
                        self._slot_free.wait()
                    self._busy += 1
                self._batches.put(batch)
        for _ in range(self._slots):
            self._batches.put(_STOP)

    def _gather(self) -> tuple[list, bool]:
        """Block for a first job, then take jobs as they come until ``max_batch``, or until the queue
        is empty while a slot is free; → (the batch, whether to stop after it)."""
        batch: list = []
        while len(batch) < self._max_batch:
            if batch and self._busy < self._slots and self._jobs.empty():
                break
            item = self._jobs.get()  # a job, or a slot freed
            if item is _STOP:
                return batch, True
            if item is not _FREED:
                batch.append(item)
        return batch, False

    # -- the slots -----------------------------------------------------------------------------
    def _slot(self, threads: int, ready: threading.Barrier) -> None:
        pin_torch_threads(threads)
        ready.wait()
        while (batch := self._batches.get()) is not _STOP:
            try:
                self._run_batch(batch)
            finally:
                with self._slot_free:
                    self._busy -= 1
                    self._slot_free.notify()
                self._jobs.put(_FREED)  # wakes the dispatcher, should it hold jobs

    def _run_batch(self, taken: list) -> None:
        # A job cancelled while queued (its client went away) is dropped; once running, it can no
        # longer be cancelled, and setting its outcome cannot fail.
        items = [(job, fut) for job, fut in taken if fut.set_running_or_notify_cancel()]
        if not items:
            return
        t0 = time.perf_counter()
        try:
            results = self._fn([job for job, _ in items])
            if len(results) != len(items):
                raise RuntimeError(f"the batch function gave {len(results)} results for {len(items)} jobs")
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
            logger.exception("a batch of %d failed", len(items))
            for _, fut in items:
                fut.set_exception(exc)
            return
        if self._on_batch is not None:
            self._on_batch(len(items), time.perf_counter() - t0)
        for (_, fut), out in zip(items, results):
            if isinstance(out, BaseException):
                fut.set_exception(out)
            else:
                fut.set_result(out)
