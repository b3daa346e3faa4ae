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

from activeindex.dihedral import N_VIEWS, dihedral_views
from activeindex.edits import EditRecord, EditResult
from activeindex.edits.registry import NamedEdit
from activeindex.extractors import Extractor
from activeindex.features import describe_images


@dataclass(frozen=True)
class EditedCopies:
    """Descriptors (n, d) of edited copies and what each edit applied; ``views`` (n * 8, d): each
    copy's 8 D4 views, query-major, when described for dihedral queries (row 8 i is ``features[i]``)."""

    features: np.ndarray
    records: list[EditRecord]
    views: np.ndarray | None = None


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
    dihedral: bool = False,
) -> EditedCopies:
    """Edit ``images[i]`` with ``edits[i]`` and describe the copies; ``edit_keys[i]`` and
    ``image_keys[i]`` seed the draw (default: i for both). ``dihedral``: describe each copy under
    its 8 rotations/flips as well (``views``; the identity view gives ``features``), 8 times the
    model's work, ``batch_size`` model inputs a call."""
    n = len(images)
    if len(edits) != n:
        raise ValueError(f"{n} images but {len(edits)} edits")
    edit_keys = list(edit_keys) if edit_keys is not None else list(range(n))
    image_keys = list(image_keys) if image_keys is not None else list(range(n))
    v = N_VIEWS if dihedral else 1
    feats = np.empty((n * v, extractor.dim), np.float32)
    records: list[EditRecord] = []
    step = max(1, batch_size // v)

    def apply(i: int) -> EditResult:
        return edits[i](images[i], edit_rng(seed, edit_keys[i], image_keys[i]))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, n, step):
            results = list(pool.map(apply, range(start, min(start + step, n))))
            feats[start * v : (start + len(results)) * v] = describe_images(
                [r.image for r in results], extractor, batch_size=batch_size,
                views=dihedral_views if dihedral else None, n_views=v)
            records.extend(r.record for r in results)
            if progress is not None:
                progress(len(results))
    if dihedral:
        return EditedCopies(np.ascontiguousarray(feats[::N_VIEWS]), records, feats)
    return EditedCopies(feats, records)
