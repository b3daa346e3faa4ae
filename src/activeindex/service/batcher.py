"""Gathers concurrent queries into one model call.

A CNN on a CPU describes a batch of 16 images several times faster than 16 batches of one. Each
request decodes its upload in its own thread and hands the prepared pixels to the batcher; one
thread runs the model on everything that arrived while the previous batch ran (no waiting window:
under low load a query runs alone, under high load batches grow by themselves, up to
``max_batch``). One model call at a time also keeps torch's intra-op threads from fighting over
the cores.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

logger = logging.getLogger(__name__)

_STOP = object()


class Batcher:
    """``fn``: uint8 (B, S, S, 3) → float32 (B, d). ``on_batch(size, seconds)`` reports each call."""

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 32,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._fn = fn
        self._max_batch = max_batch
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="extract-batcher", daemon=True)
        self._thread.start()

    def submit(self, image: np.ndarray) -> Future:
        """Queue one prepared image (S, S, 3) uint8; the future gives its descriptor (d,)."""
        if not self._thread.is_alive():
            raise RuntimeError("the batcher is closed")
        fut: Future = Future()
        self._queue.put((image, fut))
        return fut

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        stop = False
        while not stop:
            item = self._queue.get()
            if item is _STOP:
                break
            items = [item]
            while len(items) < self._max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True  # finish what was queued before the stop
                    break
                items.append(nxt)
            t0 = time.perf_counter()
            try:
                out = self._fn(np.stack([image for image, _ in items]))
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                logger.exception("model call on a batch of %d failed", len(items))
                for _, fut in items:
                    fut.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(items), time.perf_counter() - t0)
            for (_, fut), row in zip(items, out):
                fut.set_result(row)
