"""The extraction pipeline: image files → descriptors, decoding in threads while the model runs.

Decoding uses reduced-size JPEG decoding (DCT scaling) when the extractor needs fewer pixels than
the file has. Broken files are reported per path and the batch goes on. Pillow and torch both
release the GIL, so threads overlap decoding and the model in two ways:

- *batch streams* (CPU, several batches): each of k threads decodes a whole batch and then runs the
  model on it with its share (usually one) of torch's intra-op threads, so k batches are in flight
  and every core is either decoding or computing. This is the fast way on a CPU: a thread pool
  decoding *beside* an OpenMP team oversubscribes the cores, and each time a decoder preempts one
  OpenMP thread the others wait at the next barrier;
- *decode-ahead* (GPU, a single batch, or one torch thread): a small thread pool decodes a few
  batches ahead of the model, which runs in the calling thread (:func:`iter_batches`).

Both give the same descriptors for the same batches.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from activeindex.atomic import atomic_path
from activeindex.errors import ImageLoadError
from activeindex.extractors import Extractor
from activeindex.images import DEFAULT_LIMITS, ImageLimits, load_image, printable_name

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]  # called with the number of images just processed
# Several model inputs per image (b, S, S, 3) -> (b * v, S, S, 3), image-major, e.g.
# activeindex.dihedral.dihedral_views: the views are described in the same model call.
BatchViews = Callable[[np.ndarray], np.ndarray]


def _run_model(extractor: Extractor, batch: np.ndarray, views: BatchViews | None) -> np.ndarray:
    return extractor.features(batch if views is None else views(batch))


@dataclass
class Failure:
    path: Path
    reason: str


@dataclass
class ExtractionResult:
    """Descriptors of the images that could be read, in input order, and the ones that could not."""

    features: np.ndarray  # (n, d) float32, L2-normalised
    paths: list[Path]  # n paths, row i of features is paths[i]
    failures: list[Failure] = field(default_factory=list)


def _decode(path: Path, extractor: Extractor, limits: ImageLimits, reduced: bool) -> np.ndarray:
    pre = extractor.preprocessing
    img = load_image(path, min_side=pre.decode_min_side if reduced else None, limits=limits)
    return pre.prepare(img)


def iter_batches(
    paths: Sequence[Path],
    extractor: Extractor,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    reduced_decode: bool = True,
) -> Iterator[tuple[list[Path], np.ndarray, list[Failure]]]:
    """Yield (paths, uint8 (b, S, S, 3) batch, failures) with decoding ``prefetch`` batches ahead."""
    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[list[tuple[Path, Future[np.ndarray]]]] = deque()
        chunks = (paths[i : i + batch_size] for i in range(0, len(paths), batch_size))

        def submit_next() -> bool:
            chunk = next(chunks, None)
            if chunk is None:
                return False
            pending.append(
                [(p, pool.submit(_decode, p, extractor, limits, reduced_decode)) for p in chunk]
            )
            return True

        for _ in range(2):  # two batches in flight bound memory to ~3 batches of pixels
            submit_next()
        while pending:
            jobs = pending.popleft()
            submit_next()
            yield _assemble(((path, fut.result) for path, fut in jobs), extractor)


def _assemble(
    jobs: Iterable[tuple[Path, Callable[[], np.ndarray]]], extractor: Extractor
) -> tuple[list[Path], np.ndarray, list[Failure]]:
    """Run each path's decode and stack the images into a batch; a broken file becomes a Failure."""
    ok_paths, arrays, failures = [], [], []
    for path, decode in jobs:
        try:
            arrays.append(decode())
            ok_paths.append(path)
        except ImageLoadError as exc:
            failures.append(Failure(path, exc.reason))
    size = extractor.preprocessing.input_size
    batch = np.stack(arrays) if arrays else np.empty((0, size, size, 3), np.uint8)
    return ok_paths, batch, failures


def _stream_count(extractor: Extractor, n_batches: int, workers: int | None) -> int:
    """How many batches to run at once in batch-stream mode; 1 means use decode-ahead instead."""
    if extractor.device.type != "cpu":
        return 1  # an accelerator runs one batch at a time; the CPU only decodes
    return max(1, min(workers or torch.get_num_threads(), torch.get_num_threads(), n_batches))


def pin_torch_threads(threads: int) -> None:
    """Run torch ops of the calling thread on ``threads`` intra-op threads, whatever other threads
    set later.

    ``torch.set_num_threads`` sets the calling thread's OpenMP team size *and* a process-wide
    default; a thread's first parallel op then applies that default, as it stands at that moment,
    to the thread. Asking for the count right away applies it now: a stream thread that only set
    its count, and ran its first op after another thread had set a different one, ran with that
    other count (two OpenMP teams of two on two cores, each stalling the other at its barriers).
    """
    torch.set_num_threads(threads)
    torch.get_num_threads()


def _iter_streams(
    chunks: Sequence[Sequence[Path]],
    extractor: Extractor,
    streams: int,
    limits: ImageLimits,
    views: BatchViews | None = None,
) -> Iterator[tuple[list[Path], np.ndarray, list[Failure]]]:
    """Yield (paths, descriptors, failures) per chunk, in order, ``streams`` chunks at a time.

    Each pool thread decodes a chunk, then runs the model on it with ``threads // streams`` intra-op
    threads (torch applies a thread count per calling thread; the default that set_num_threads also
    changes for threads started later is restored at the end).
    """
    threads = torch.get_num_threads()

    def run(chunk: Sequence[Path]) -> tuple[list[Path], np.ndarray, list[Failure]]:
        ok, batch, failures = _assemble(
            ((p, partial(_decode, p, extractor, limits, True)) for p in chunk), extractor
        )
        feats = _run_model(extractor, batch, views) if len(batch) else np.empty((0, extractor.dim), np.float32)
        return ok, feats, failures

    pool = ThreadPoolExecutor(
        max_workers=streams,
        thread_name_prefix="extract",
        initializer=pin_torch_threads,
        initargs=(max(1, threads // streams),),
    )
    try:
        pending: deque[Future] = deque()
        todo = iter(chunks)
        for chunk in todo:  # one chunk queued behind each running one keeps every thread busy
            pending.append(pool.submit(run, chunk))
            if len(pending) >= 2 * streams:
                break
        while pending:
            result = pending.popleft().result()
            chunk = next(todo, None)
            if chunk is not None:
                pending.append(pool.submit(run, chunk))
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # an abandoned extraction stops soon
        # set_num_threads in the pool threads also set torch's default for threads started later.
        torch.set_num_threads(threads)


def extract_paths(
    paths: Sequence[str | os.PathLike[str]],
    extractor: Extractor,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    progress: ProgressCallback | None = None,
    views: BatchViews | None = None,
) -> ExtractionResult:
    """Descriptors for image files. Unreadable files land in ``failures`` with their reason.

    ``views``: describe several views of each prepared image (e.g. its 8 rotations/flips) in the
    same model call; ``features`` then has ``v`` rows per path, rows ``v i .. v i + v - 1`` for
    ``paths[i]``, and ``batch_size`` counts paths (the model sees ``v`` times as many inputs).

    ``workers``: how many threads decode at once (default: torch's thread count in batch-stream
    mode, ``min(4, cpu count)`` in decode-ahead mode; see the module docstring).
    """
    paths = [Path(p) for p in paths]
    feats: list[np.ndarray] = []
    ok: list[Path] = []
    failures: list[Failure] = []
    chunks = [paths[i : i + batch_size] for i in range(0, len(paths), batch_size)]
    streams = _stream_count(extractor, len(chunks), workers)
    if streams > 1:
        results = _iter_streams(chunks, extractor, streams, limits, views)
    else:
        results = (
            (batch_paths, _run_model(extractor, batch, views) if len(batch) else None, batch_failures)
            for batch_paths, batch, batch_failures in iter_batches(
                paths, extractor, batch_size=batch_size, workers=workers, limits=limits
            )
        )
    for batch_paths, batch_feats, batch_failures in results:
        for f in batch_failures:
            logger.debug("skipped %s: %s", f.path, f.reason)
        failures.extend(batch_failures)
        if batch_paths:
            feats.append(batch_feats)
            ok.extend(batch_paths)
        if progress is not None:
            progress(len(batch_paths) + len(batch_failures))
    features = np.concatenate(feats) if feats else np.empty((0, extractor.dim), np.float32)
    return ExtractionResult(features=features.astype(np.float32, copy=False), paths=ok, failures=failures)


def save_features(
    out: str | os.PathLike[str], features: np.ndarray, names: Sequence[str], *, torch_tensor: bool = False
) -> None:
    """Write ``features.npy`` (float32, n×d) and ``names.txt`` (one name per line, UTF-8) atomically;
    ``torch_tensor`` also writes ``fts.pt``, the layout the paper's seed tools read.

    Names are written as :func:`~activeindex.images.printable_name` gives them: a newline or other
    control character as ``\\n`` / ``\\xNN`` and the bytes of a non-UTF-8 name as ``\\xNN``, so line
    i is always row i."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(names) != len(features):
        raise ValueError(f"{len(features)} descriptors but {len(names)} names")
    lines = [printable_name(n) for n in names]

    def write(name: str, save: Callable[[Path], None]) -> None:
        with atomic_path(out / name) as tmp:
            save(tmp)

    feats = np.ascontiguousarray(features, dtype=np.float32)
    def save_npy(p: Path) -> None:
        with open(p, "wb") as fh:  # a file object: np.save would append ".npy" to a path
            np.save(fh, feats)

    write("features.npy", save_npy)
    write("names.txt", lambda p: p.write_text("".join(f"{n}\n" for n in lines), encoding="utf-8"))
    if torch_tensor:
        import torch

        write("fts.pt", lambda p: torch.save(torch.from_numpy(feats), p))


def describe_images(
    images: Sequence[Image.Image],
    extractor: Extractor,
    *,
    batch_size: int = 64,
    progress: ProgressCallback | None = None,
    views: BatchViews | None = None,
    n_views: int = 1,
) -> np.ndarray:
    """Descriptors (n, d) float32 of decoded RGB images, described exactly as files are (the
    extractor's own preprocessing), ``batch_size`` at a time.

    With ``views`` (``n_views`` model inputs per image, see :data:`BatchViews`): (n * n_views, d),
    image-major, and ``batch_size`` counts model inputs (``batch_size // n_views`` images a call)."""
    if (views is None) != (n_views == 1):
        raise ValueError(f"views and n_views go together (got n_views={n_views})")
    out = np.empty((len(images) * n_views, extractor.dim), np.float32)
    pre = extractor.preprocessing
    step = max(1, batch_size // n_views)
    for start in range(0, len(images), step):
        part = images[start : start + step]
        feats = _run_model(extractor, np.stack([pre.prepare(im) for im in part]), views)
        out[start * n_views : (start + len(part)) * n_views] = feats
        if progress is not None:
            progress(len(part))
    return out
