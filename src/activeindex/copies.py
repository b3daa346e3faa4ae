"""Edited copies as queries: apply copy edits to images and describe the results.

The query side of calibration and of the evaluation protocol. Each copy is a pure function of
(image, edit, seed): the random draws of edit ``e`` on image ``i`` come from
``np.random.default_rng([seed, e, i])``, so every way of releasing an image (passive, activated)
meets exactly the same edit. Edits run in a few threads (Pillow releases the GIL) while the model
describes the previous batch; a failing edit raises, it never yields the unedited image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from PIL import Image

from activeindex.edits import EditRecord
from activeindex.edits.registry import NamedEdit
from activeindex.extractors import Extractor
from activeindex.features import describe_images


@dataclass(frozen=True)
class EditedCopies:
    """Descriptors (n, d) of edited copies and what each edit applied."""

    features: np.ndarray
    records: list[EditRecord]


def edit_rng(seed: int, edit_key: int, image_key: int) -> np.random.Generator:
    """The generator for edit ``edit_key`` applied to image ``image_key`` (see the module doc)."""
    return np.random.default_rng([seed, edit_key, image_key])


def describe_copies(
    images: Sequence[Image.Image],
    edits: Sequence[NamedEdit],
    extractor: Extractor,
    *,
    seed: int = 0,
    edit_keys: Sequence[int] | None = None,
    image_keys: Sequence[int] | None = None,
    batch_size: int = 64,
    workers: int = 2,
    progress: Callable[[int], None] | None = None,
    keep_images: Callable[[int], bool] | None = None,
) -> tuple[EditedCopies, dict[int, Image.Image]]:
    """Edit ``images[i]`` with ``edits[i]`` and describe the copies.

    ``edit_keys[i]`` / ``image_keys[i]`` seed the draw (default: i for both); ``keep_images(i)``
    selects copies to return as images too (for reports). Returns the copies' descriptors and
    records, and the kept images by position.
    """
    n = len(images)
    if len(edits) != n:
        raise ValueError(f"{n} images but {len(edits)} edits")
    edit_keys = list(edit_keys) if edit_keys is not None else list(range(n))
    image_keys = list(image_keys) if image_keys is not None else list(range(n))
    feats = np.empty((n, extractor.dim), np.float32)
    records: list[EditRecord] = []
    kept: dict[int, Image.Image] = {}

    def apply(i: int) -> Image.Image:
        result = edits[i](images[i], edit_rng(seed, edit_keys[i], image_keys[i]))
        records_by_pos[i] = result.record
        return result.image

    records_by_pos: dict[int, EditRecord] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, n, batch_size):
            idx = range(start, min(start + batch_size, n))
            edited = list(pool.map(apply, idx))
            feats[start : start + len(edited)] = describe_images(edited, extractor, batch_size=batch_size)
            if keep_images is not None:
                kept.update((i, im) for i, im in zip(idx, edited) if keep_images(i))
            if progress is not None:
                progress(len(edited))
    records = [records_by_pos[i] for i in range(n)]
    return EditedCopies(feats, records), kept
