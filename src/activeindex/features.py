"""The extraction pipeline: image files → descriptors, decoding in threads while the model runs.

Decoding (Pillow, which releases the GIL) runs in a small thread pool a few batches ahead of the
model, with reduced-size JPEG decoding (DCT scaling) when the extractor needs fewer pixels than the
file has. Broken files are reported per path and the batch goes on.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from activeindex.errors import ImageLoadError
from activeindex.extractors import Extractor
from activeindex.images import DEFAULT_LIMITS, ImageLimits, load_image

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int], None]  # called with the number of images just processed


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
            ok_paths, arrays, failures = [], [], []
            for path, fut in jobs:
                try:
                    arrays.append(fut.result())
                    ok_paths.append(path)
                except ImageLoadError as exc:
                    failures.append(Failure(path, exc.reason))
            size = extractor.preprocessing.input_size
            batch = np.stack(arrays) if arrays else np.empty((0, size, size, 3), np.uint8)
            yield ok_paths, batch, failures


def extract_paths(
    paths: Sequence[str | os.PathLike[str]],
    extractor: Extractor,
    *,
    batch_size: int = 32,
    workers: int | None = None,
    limits: ImageLimits = DEFAULT_LIMITS,
    progress: ProgressCallback | None = None,
) -> ExtractionResult:
    """Descriptors for image files. Unreadable files land in ``failures`` with their reason."""
    paths = [Path(p) for p in paths]
    feats: list[np.ndarray] = []
    ok: list[Path] = []
    failures: list[Failure] = []
    for batch_paths, batch, batch_failures in iter_batches(
        paths, extractor, batch_size=batch_size, workers=workers, limits=limits
    ):
        for f in batch_failures:
            logger.debug("skipped %s: %s", f.path, f.reason)
        failures.extend(batch_failures)
        if len(batch):
            feats.append(extractor.features(batch))
            ok.extend(batch_paths)
        if progress is not None:
            progress(len(batch_paths) + len(batch_failures))
    features = np.concatenate(feats) if feats else np.empty((0, extractor.dim), np.float32)
    return ExtractionResult(features=features.astype(np.float32, copy=False), paths=ok, failures=failures)


def save_features(
    out: str | os.PathLike[str], features: np.ndarray, names: Sequence[str], *, torch_tensor: bool = False
) -> None:
    """Write ``features.npy`` (float32, n×d) and ``names.txt`` (one name per line) atomically;
    ``torch_tensor`` also writes ``fts.pt``, the layout the paper's seed tools read."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(names) != len(features):
        raise ValueError(f"{len(features)} descriptors but {len(names)} names")
    bad = [n for n in names if "\n" in n]
    if bad:
        raise ValueError(f"names cannot contain newlines: {bad[0]!r}")

    def write(name: str, save: Callable[[Path], None]) -> None:
        tmp = out / f".{name}.tmp"
        save(tmp)
        os.replace(tmp, out / name)

    feats = np.ascontiguousarray(features, dtype=np.float32)
    def save_npy(p: Path) -> None:
        with open(p, "wb") as fh:  # a file object: np.save would append ".npy" to a path
            np.save(fh, feats)

    write("features.npy", save_npy)
    write("names.txt", lambda p: p.write_text("".join(f"{n}\n" for n in names)))
    if torch_tensor:
        import torch

        write("fts.pt", lambda p: torch.save(torch.from_numpy(feats), p))
