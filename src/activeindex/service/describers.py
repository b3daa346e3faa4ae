"""Where the service turns uploads into descriptors: in its own threads, or in model processes.

A describer takes a batch of uploads (their bytes) and gives back a :class:`DescribedBatch`:
one descriptor per upload, or the reason it could not be decoded. :class:`LocalDescriber` does it
in the calling thread; :class:`ProcessDescriber` in a child process of its own.

Why processes. In one process the event loop (HTTP parsing, JSON), the decoding and the model
share one GIL: Pillow and torch release it for their native work and take it back many times per
image, and with as many busy threads as cores every hand-over can leave a core idle
(``bench/service.py --model-processes 0`` prints the share of idle cores during a saturated run:
about twice what the same work leaves idle in a batch job). A model process decodes and describes with an
interpreter of its own; the server keeps the HTTP front end, the index and the search. Through the
pipe go the uploads' bytes (tens of kB each) one way and d floats per upload back.

A model process that dies (killed, out of memory, a crash in a native decoder) fails only the
batch it held, with :class:`DescriberLost`; the next batch starts a new process. Processes are
started with ``spawn`` (a fork of a process running OpenMP and server threads is not safe), ignore
SIGINT (the server stops them) and exit when the server's end of their pipe closes, so none
outlives a killed server.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from activeindex.dihedral import N_VIEWS, dihedral_views
from activeindex.errors import ImageLoadError, ModelError
from activeindex.extractors import Extractor, create_extractor
from activeindex.features import pin_torch_threads
from activeindex.images import ImageLimits, decode_image

logger = logging.getLogger(__name__)

START_TIMEOUT = 300.0  # seconds for a model process to import torch, load the model and trace it


@dataclass(frozen=True)
class DescribedBatch:
    """A batch described: ``descriptors`` (n, d), with a row of zeros where ``errors`` holds the
    reason an upload could not be decoded (None where it could); seconds spent decoding each
    upload and running the model. ``views`` (n, 8, d): the 8 D4 views of the uploads described
    dihedrally (zeros elsewhere), None when none was."""

    descriptors: np.ndarray
    errors: list[str | None]
    decode_seconds: list[float]
    model_seconds: float
    views: np.ndarray | None = None


class DescriberLost(RuntimeError):
    """The model process died while describing a batch (the batch's requests fail; later batches
    start a new process)."""


def describe_batch(extractor: Extractor, items: Sequence[tuple[bytes, str]], limits: ImageLimits,
                   dihedral: Sequence[bool] = ()) -> DescribedBatch:
    """Decode each upload (bytes, label) as the CLI decodes files and run the model once on those
    that decoded: the uploads flagged in ``dihedral`` (one flag per upload, or none) under their 8
    rotations/flips (the identity view is their descriptor), the others once."""
    pre = extractor.preprocessing
    pixels: list[np.ndarray] = []
    errors: list[str | None] = []
    decode_seconds = []
    for data, label in items:
        t0 = time.perf_counter()
        try:
            pixels.append(pre.prepare(decode_image(data, label, min_side=pre.decode_min_side, limits=limits)))
            errors.append(None)
        except ImageLoadError as exc:
            errors.append(exc.reason)
        decode_seconds.append(time.perf_counter() - t0)
    out = np.zeros((len(items), extractor.dim), np.float32)
    flags = list(dihedral) or [False] * len(items)
    if len(flags) != len(items):
        raise ValueError(f"{len(items)} uploads but {len(flags)} dihedral flags")
    ok = [i for i, e in enumerate(errors) if e is None]
    multi = [j for j, i in enumerate(ok) if flags[i]]  # positions among the decoded
    views = np.zeros((len(items), N_VIEWS, extractor.dim), np.float32) if multi else None
    t0 = time.perf_counter()
    if pixels:
        batch = np.stack(pixels)
        single = [j for j in range(len(ok)) if not flags[ok[j]]]
        # One model call: the single uploads, then the 8 views of each dihedral one.
        parts = [batch[single]] + ([dihedral_views(batch[multi])] if multi else [])
        feats = extractor.features(np.concatenate(parts))
        out[[ok[j] for j in single]] = feats[: len(single)]
        if multi:
            assert views is not None
            v = feats[len(single):].reshape(len(multi), N_VIEWS, -1)
            views[[ok[j] for j in multi]] = v
            out[[ok[j] for j in multi]] = v[:, 0]
    return DescribedBatch(out, errors, decode_seconds, time.perf_counter() - t0, views)


class LocalDescriber:
    """Describes in the calling thread (a thread-safe extractor: several threads may share one)."""

    def __init__(self, extractor: Extractor, limits: ImageLimits) -> None:
        self.extractor = extractor
        self.limits = limits

    def describe(self, items: Sequence[tuple[bytes, str]], dihedral: Sequence[bool] = ()) -> DescribedBatch:
        return describe_batch(self.extractor, items, self.limits, dihedral)

    def close(self) -> None:
        pass


class ProcessDescriber:
    """A child process with its own copy of ``extractor`` (rebuilt from its description and checked
    against its weights digest), running torch on ``threads`` threads. One batch at a time: the
    caller owns it while :meth:`describe` runs."""

    def __init__(self, extractor: Extractor, limits: ImageLimits, threads: int = 1) -> None:
        self._args = (extractor.describe(), extractor.precision.value, str(extractor.device), limits, threads)
        self.threads = threads
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self.starts = 0
        self.start()

    def start(self) -> None:
        """Start the child (without waiting for it: :meth:`wait_ready`)."""
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, *self._args), name="activeindex-model", daemon=True)
        self._proc.start()
        child.close()  # the child's end lives in the child: EOF here once it exits
        self._conn = parent
        self._ready = False
        self.starts += 1

    def wait_ready(self) -> None:
        """Block until the child has loaded the model; a child that fails says why (ModelError)."""
        if self._ready:
            return
        assert self._conn is not None
        if not self._conn.poll(START_TIMEOUT):
            self._stop(kill=True)
            raise ModelError(f"a model process did not start within {START_TIMEOUT:.0f} s")
        try:
            kind, detail = self._conn.recv()
        except (EOFError, OSError):
            code = self._stop(kill=True)
            raise ModelError(f"a model process exited while starting (exit code {code})") from None
        if kind != "ready":
            self._stop(kill=True)
            raise ModelError(f"a model process could not load the model: {detail}")
        self._ready = True

    def describe(self, items: Sequence[tuple[bytes, str]], dihedral: Sequence[bool] = ()) -> DescribedBatch:
        with self._lock:
            if self._proc is not None and not self._proc.is_alive():
                code = self._stop(kill=True)
                logger.warning("a model process exited (exit code %s) between batches; starting a new one", code)
            if self._conn is None:
                self.start()
            self.wait_ready()
            assert self._conn is not None
            try:
                self._conn.send((list(items), list(dihedral)))
                kind, out = self._conn.recv()
            except (EOFError, OSError) as exc:
                code = self._stop(kill=True)
                raise DescriberLost(
                    f"the model process describing this batch of {len(items)} exited (exit code {code}); "
                    "the next batch starts a new one"
                ) from exc
        if kind != "ok":
            raise RuntimeError(f"the model process failed on this batch: {out}")
        return out

    def _stop(self, *, kill: bool) -> int | None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()  # EOF in the child: it exits
        if proc is None:
            return None
        proc.join(5 if kill else 60)  # a batch in hand is finished first, unless killing
        if proc.is_alive():
            proc.kill()
            proc.join()
        return proc.exitcode

    def close(self) -> None:
        with self._lock:
            self._stop(kill=False)


def start_processes(
    extractor: Extractor, limits: ImageLimits, processes: int, threads: int,
    progress: Callable[[int], None] | None = None,
) -> list[ProcessDescriber]:
    """``processes`` model processes, started side by side; returns once all have loaded the model.
    ``progress(n)`` is called as the n-th has loaded it (start-up takes seconds per process)."""
    started: list[ProcessDescriber] = []
    try:
        for _ in range(processes):
            started.append(ProcessDescriber(extractor, limits, threads))
        for n, d in enumerate(started, 1):
            d.wait_ready()
            if progress is not None:
                progress(n)
    except BaseException:
        for d in started:
            d.close()
        raise
    return started


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    Every batch allocates the same large activations; by default glibc maps each one afresh and
    unmaps it when freed, and every new page then costs a page fault, a few hundred per image
    described (``bench/service.py`` prints the page faults per query of the server and of the
    library in-process). Only for a process of ours: a library must not change its host process's
    allocator.
    The process keeps its peak memory (one batch's activations) for its lifetime. Returns False
    where there is no glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h>
    # Blocks below 32 MB (glibc's largest mmap threshold on 64-bit systems) come from the heap,
    # which is trimmed back to the kernel only past 1 GB free.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def _child_main(conn: Connection, description: dict, precision: str, device: str, limits: ImageLimits,
                threads: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server stops us
    keep_freed_memory()
    try:
        pin_torch_threads(threads)
        extractor = create_extractor(description, precision=precision, device=device)
        if extractor.digest != description["digest"]:
            raise ModelError(
                f"{extractor.spec_string} has weights digest {extractor.digest[:12]}…, "
                f"the server's has {description['digest'][:12]}… (was the file changed?)"
            )
        pre = extractor.preprocessing
        extractor.features(np.zeros((1, pre.input_size, pre.input_size, 3), np.uint8))  # trace it now
    except Exception as exc:  # noqa: BLE001 - reported to the server, which refuses to start
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            items, dihedral = conn.recv()
        except (EOFError, OSError):
            return  # the server closed its end, or died
        try:
            reply: tuple[str, Any] = ("ok", describe_batch(extractor, items, limits, dihedral))
        except Exception as exc:  # noqa: BLE001 - this batch's failure, reported; the process goes on
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)
