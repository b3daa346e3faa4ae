"""Calibrate a collection's copy threshold from training images (never its references).

The training images are split in two: a *background* set, which trains the index and which score
normalisation compares queries to, and *calibration* images, held out of both. A quarter of the
calibration images play references: their descriptors are added, under ids no image can have, to
a copy of the collection's index (with whatever it already holds, so that non-matching queries
meet the real collection's neighbours). Every calibration image then goes through
:data:`EDITS_PER_IMAGE` different edits among the paper's 14 and its overlay onto screenshot
(:func:`calibration_edits`; cycling, so both parts see the same mix), and each edited copy is
searched for. A query of the first quarter is right when its top-1 is its own original; the other
three quarters are non-matching queries, whose top-1 is always wrong. The threshold is chosen for
a false-positive rate on those (:func:`activeindex.scoring.calibrate`).

Why held out of index training: a PQ code reconstructs the vectors it was trained on far better
than new ones (with 8-byte codes and a few thousand training vectors, much better), so references
drawn from the training vectors score higher, against copies *and* against unrelated queries, than
the images a user adds: calibrated on them, the threshold was too strict on copies and said
nothing true about false positives. Why three non-matching queries per matching one: the
false-positive rate is the promise, and its upper confidence bound tightens with their number.
Why several edits per image: for the same reason, at a fraction of the cost of more images (the
training images a user has are the limit). The edits of one image are not independent queries:
the bound counts them through their design effect, measured at each threshold
(:func:`activeindex.scoring.design_effect`), so they tighten it only as far as they behave like
independent ones. With one edit per image, 768 non-matching queries (2,048 training images) could
show 1 % only with 2 of them flagged, a threshold far stricter than its target.

Dihedral queries (:mod:`activeindex.dihedral`) keep each reference's best score over 8 views of the
query, so unrelated images score higher than in single queries: the dihedral mode gets its own
threshold, for the same target and by the same method, from the first edit of each calibration image described
under its 8 views (the identity view is that single query: 8 descriptions per calibration image
in all for it, not 9; its other edits are described once).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from PIL import Image

from activeindex import index as ix
from activeindex.collection import Collection, write_bytes_atomic
from activeindex.copies import describe_copies
from activeindex.dihedral import N_VIEWS
from activeindex.edits import paper_edits
from activeindex.edits.registry import NamedEdit, paper_extra_edits
from activeindex.errors import ActiveIndexError, CollectionError, ImageLoadError
from activeindex.extractors import Extractor
from activeindex.features import describe_images, extract_paths
from activeindex.images import load_image
from activeindex.scoring import (
    CalibrationError, CalibrationScores, CopyTarget, Normalization, QueryMode, Threshold, threshold_is_stale,
)

logger = logging.getLogger(__name__)

# Calibration references get ids from here up: far above any id SQLite will hand out here.
CALIBRATION_ID_BASE = 1 << 50
MAX_CALIBRATION_IMAGES = 2000
MATCHING_SHARE = 0.25  # of the calibration images: references whose copies are searched for
MIN_CALIBRATION_IMAGES = 20
# Different edits each calibration image goes through (different queries of one image; see the module docstring).
EDITS_PER_IMAGE = 4
CALIBRATION_SET_FILE = "calibration_set.npz"  # calibration descriptors, kept in the collection
# Cosine above which two descriptors are taken to be of the same image (8-bit re-encodings differ a little).
SAME_IMAGE_SIMILARITY = 0.995


def calibration_edits() -> list[NamedEdit]:
    """The edits calibration queries go through: the paper's 14, and the overlay onto a screenshot
    that it reports apart. The overlay matters for false positives: it puts every query inside the
    same web-page template, which makes unrelated images look alike (without it in calibration, 22 %
    of such non-matching queries were flagged at a threshold calibrated for 1 %; bench/copy_fpr.py)."""
    return [*paper_edits().values(), *paper_extra_edits().values()]


def edit_keys(n: int, m: int, edits_per_image: int, n_edits: int) -> np.ndarray:
    """(edits_per_image, n) positions in the edit list: row j is edit j of each of ``n`` calibration
    images, the first ``m`` of them references. Row 0 cycles through the edits in both parts; the
    others are spread over the list from it (``n_edits // edits_per_image`` apart), so one image's
    edits are all different and unlike (contrast 0.5 and 2.0 are neighbours in the list)."""
    if not 1 <= edits_per_image <= n_edits:
        raise ValueError(f"edits per calibration image must be in [1, {n_edits}], got {edits_per_image}")
    first = np.asarray([(i if i < m else i - m) % n_edits for i in range(n)])
    step = n_edits // edits_per_image
    return (first[None, :] + step * np.arange(edits_per_image)[:, None]) % n_edits


def split_training(n: int, seed: int = 0, max_calibration: int = MAX_CALIBRATION_IMAGES) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint positions of the background and the calibration images among ``n`` training
    images: calibration gets half of them, at most ``max_calibration`` (an even count)."""
    n_cal = min(max_calibration, n // 2) // 2 * 2
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_cal:]), np.sort(perm[:n_cal])


@dataclass(frozen=True)
class CalibrationSet:
    """Described calibration images: ``refs`` (m, d) of the first :data:`MATCHING_SHARE` of the n
    images, and ``queries`` (v * n, d) of each image's v = ``edits_per_image`` edited copies,
    edit-major (row j n + i is edit j of image i, a copy of reference i when i < m; the other
    images match nothing); ``query_views`` (n * 8, d): the 8 D4 views of each image's first edited
    copy, image-major (row 8 i is ``queries[i]``), or None when described without them."""

    refs: np.ndarray
    queries: np.ndarray
    seed: int
    query_views: np.ndarray | None = None
    edits_per_image: int = 1

    def __post_init__(self) -> None:
        if self.edits_per_image < 1 or len(self.queries) % self.edits_per_image:
            raise ValueError(f"{len(self.queries)} calibration queries are not {self.edits_per_image} per image")

    @property
    def n_images(self) -> int:
        return len(self.queries) // self.edits_per_image

    def groups(self) -> np.ndarray:
        """(v * n,) int: the calibration image each query is an edit of."""
        return np.arange(len(self.queries)) % self.n_images

    @property
    def method(self) -> str:
        m, n, v = len(self.refs), self.n_images, self.edits_per_image
        each = "" if v == 1 else f", {v} different edits of each image (their queries counted as dependent)"
        return (
            f"top-1 scores of {v * m} edited copies of {m} held-out training images against their originals "
            f"(added to a copy of the index) and {v * (n - m)} edited copies of {n - m} non-matching held-out "
            f"training images; the paper's 14 edits and its overlay onto screenshot, cycled{each}; seed {self.seed}"
        )


def calibration_set(
    extractor: Extractor,
    images: Sequence[Image.Image],
    *,
    seed: int = 0,
    progress: Callable[[float], None] | None = None,
    dihedral: bool = True,
    edits_per_image: int = EDITS_PER_IMAGE,
) -> CalibrationSet:
    """Describe calibration images and their ``edits_per_image`` edited copies each (independent
    of any index); ``dihedral``: the first copy of each image under its 8 rotations/flips too (8
    descriptions for it instead of 1). ``progress`` is told the images done, in fractions of
    an image (each pass over the images is one of its edits)."""
    n = len(images)
    if n < MIN_CALIBRATION_IMAGES:
        raise ActiveIndexError(f"calibration needs at least {MIN_CALIBRATION_IMAGES} images, got {n}")
    m = max(1, round(n * MATCHING_SHARE))
    edits = calibration_edits()
    keys = edit_keys(n, m, edits_per_image, len(edits))
    step = None if progress is None else (lambda k: progress(k / edits_per_image))
    queries, views = [], None
    for j, row in enumerate(keys):  # the dihedral views of the first edit only
        copies = describe_copies(images, [edits[k] for k in row], extractor, seed=seed, image_keys=list(range(n)),
                                 edit_keys=row.tolist(), progress=step, dihedral=dihedral and j == 0)
        queries.append(copies.features)
        views = copies.views if j == 0 else views
    return CalibrationSet(describe_images(images[:m], extractor), np.concatenate(queries), seed, views,
                          edits_per_image)


def calibration_scores(coll: Collection, cal: CalibrationSet,
                       mode: QueryMode | str = QueryMode.SINGLE) -> CalibrationScores:
    """Top-1 scores of the calibration queries against ``coll`` plus the calibration references
    (see the module docstring), searched as ``mode`` queries; ``coll`` itself is not changed."""
    mode = QueryMode(mode)
    m = len(cal.refs)
    index = faiss.clone_index(coll.index)
    ix.set_nprobe(index, coll.config.nprobe)
    ix.add_with_ids(index, cal.refs, CALIBRATION_ID_BASE + np.arange(m))
    if mode is QueryMode.DIHEDRAL:
        if cal.query_views is None:
            raise CollectionError("the calibration descriptors have no dihedral views: calibrate from images "
                                  "(activeindex calibrate COLLECTION --images DIR)")
        xq = cal.query_views
        groups = np.arange(cal.n_images)  # the first edit of each image only
    else:
        xq = cal.queries
        groups = cal.groups()
    n = len(groups)
    raw, I = ix.search(index, xq, 1, coll.metric)
    S = raw if coll.background is None else coll.background.normalize(raw, xq)
    if mode is QueryMode.DIHEDRAL:  # top-1 of the best view: the best of each view's top-1
        best = S.reshape(n, N_VIEWS).argmax(axis=1)
        S = S.reshape(n, N_VIEWS)[np.arange(n), best][:, None]
        I = I.reshape(n, N_VIEWS)[np.arange(n), best][:, None]
    matching = groups < m
    correct = matching & (I[:, 0] == CALIBRATION_ID_BASE + groups)
    return CalibrationScores(S[:, 0].astype(np.float32), correct, matching, groups)


def save_calibration_set(coll: Collection, cal: CalibrationSet) -> None:
    """Keep the calibration descriptors in the collection (atomically), so that the threshold can be
    recalibrated against the index as it grows, without the images (:func:`recalibrate`)."""
    buf = io.BytesIO()
    views = {} if cal.query_views is None else {"query_views": cal.query_views}
    np.savez(buf, refs=cal.refs, queries=cal.queries, seed=np.int64(cal.seed),
             edits_per_image=np.int64(cal.edits_per_image), **views)
    write_bytes_atomic(coll.root / CALIBRATION_SET_FILE, buf.getvalue())


def load_calibration_set(coll: Collection) -> CalibrationSet:
    try:
        with np.load(coll.root / CALIBRATION_SET_FILE, allow_pickle=False) as z:
            views = z["query_views"].astype(np.float32) if "query_views" in z.files else None
            v = int(z["edits_per_image"]) if "edits_per_image" in z.files else 1  # one edit each before
            return CalibrationSet(z["refs"].astype(np.float32), z["queries"].astype(np.float32), int(z["seed"]),
                                  views, v)
    except FileNotFoundError:
        raise CollectionError(
            f"{coll.root} keeps no calibration descriptors; calibrate it from training images "
            "(activeindex calibrate COLLECTION --images DIR)"
        ) from None


def calibrate_modes(coll: Collection, cal: CalibrationSet, target: CopyTarget) -> Threshold:
    """Calibrate the single-view threshold and, when ``cal`` has dihedral views, the dihedral one,
    both for ``target``; returns the single-view one. A dihedral calibration that fails
    (:class:`CalibrationError`) is logged and leaves no dihedral threshold: never a wrong one."""
    thr = coll.calibrate(calibration_scores(coll, cal), replace(target, query_mode=QueryMode.SINGLE.value), cal.method)
    if cal.query_views is not None:
        try:
            coll.calibrate(calibration_scores(coll, cal, QueryMode.DIHEDRAL),
                           replace(target, query_mode=QueryMode.DIHEDRAL.value),
                           cal.method + "; dihedral: the 8 D4 views of each image's first edit")
        except CalibrationError as exc:
            logger.warning("dihedral copy threshold not calibrated: %s", exc)
    return thr


def recalibrate(coll: Collection, target: CopyTarget = CopyTarget()) -> Threshold:
    """Recalibrate ``coll`` against its index as it is now, from the stored calibration descriptors:
    the non-matching calibration queries meet every image added since (more references, more
    chances of a high-scoring wrong match: the false-positive rate of a fixed threshold grows).
    The dihedral threshold too, when the stored descriptors have its views (otherwise a warning)."""
    cal = load_calibration_set(coll)
    if cal.refs.shape[1] != coll.config.dim:
        raise CollectionError(f"stored calibration descriptors are {cal.refs.shape[1]}-d, the collection {coll.config.dim}-d")
    if cal.query_views is None:
        logger.warning("the stored calibration descriptors have no dihedral views: no dihedral copy threshold "
                       "(calibrate from images: activeindex calibrate %s --images DIR)", coll.root)
    return calibrate_modes(coll, cal, target)


def stored_target(info: dict[str, Any] | None) -> CopyTarget:
    """The target a stored threshold (:meth:`Threshold.to_dict`) was calibrated for; the default
    target (1 % false positives) when the collection has none."""
    if not info:
        return CopyTarget()
    return CopyTarget(fpr=info.get("target_fpr"), precision=info.get("target_precision"),
                      prior=info.get("prior"), confidence=info.get("confidence", CopyTarget().confidence))


def recalibrate_if_stale(coll: Collection) -> tuple[float, Threshold] | None:
    """Recalibrate ``coll`` for its stored target when its threshold is stale (the index has grown
    more than :data:`~activeindex.scoring.STALE_FACTOR`-fold since calibration, so the threshold
    flags more unrelated images than it says) and the collection keeps its calibration
    descriptors; → (the old threshold, the new one), or None when nothing was done. Each doubling
    of the index costs one search of the calibration queries, so a growing collection keeps the
    false-positive rate it promises without images or a command."""
    info = coll.threshold_info(QueryMode.SINGLE)
    if not threshold_is_stale(info, coll.count()) or not (coll.root / CALIBRATION_SET_FILE).exists():
        return None
    assert info is not None
    return float(info["threshold"]), recalibrate(coll, stored_target(info))


def load_images(paths: Sequence[Path]) -> tuple[list[Image.Image], list[tuple[Path, str]]]:
    """Decode ``paths``; unreadable ones come back as (path, reason)."""
    images, failed = [], []
    for p in paths:
        try:
            images.append(load_image(p))
        except ImageLoadError as exc:
            failed.append((p, exc.reason))
    return images, failed


def calibrate_from_images(
    coll: Collection,
    paths: Sequence[str | os.PathLike[str]],
    target: CopyTarget = CopyTarget(),
    *,
    seed: int = 0,
    max_images: int = MAX_CALIBRATION_IMAGES,
    progress: Callable[[float], None] | None = None,
    dihedral: bool = True,
) -> Threshold:
    """Calibrate ``coll``'s copy threshold for ``target`` from training images ``paths``
    (images that are not in the collection; those of the normalisation background are left out,
    and at most ``max_images`` are used). Stores the threshold and the calibration scores.
    ``dihedral``: the dihedral query mode's threshold too (each calibration copy described under
    its 8 rotations/flips: 8 times the descriptions); returns the single-view threshold."""
    images, failed = load_images([Path(p) for p in paths])
    for p, reason in failed:
        logger.warning("calibration: skipped %s: %s", p, reason)
    if coll.background is not None and images:
        # An image of the background would be compared with itself by the normalisation.
        x = describe_images(images, coll.extractor)
        S, _ = ix.search(coll.background.index, x, 1, coll.metric)
        fresh = S[:, 0] < SAME_IMAGE_SIMILARITY
        if not fresh.all():
            logger.warning("calibration: %d of %d images are in the normalisation background; left out",
                           int((~fresh).sum()), len(images))
            images = [im for im, ok in zip(images, fresh) if ok]
    images = images[:max_images]
    cal = calibration_set(coll.extractor, images, seed=seed, progress=progress, dihedral=dihedral)
    thr = calibrate_modes(coll, cal, target)
    save_calibration_set(coll, cal)
    return thr


def create_collection(
    root: str | os.PathLike[str],
    extractor: Extractor,
    factory: str,
    train: Sequence[str | os.PathLike[str]],
    *,
    metric: ix.Metric | str = ix.Metric.L2,
    nprobe: int = 1,
    target: CopyTarget = CopyTarget(),
    normalization: Normalization | None = Normalization(),
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    dihedral: bool = True,
) -> tuple[Collection, Threshold | None]:
    """Create a collection from training images: train the index on the descriptors of one part of
    them, which is also the normalisation background, and calibrate the copy threshold on the rest
    (held out of index training: see the module docstring).

    ``normalization=None`` keeps raw similarities. The threshold is None (and a warning logged)
    when no threshold meets ``target``; the collection is usable and can be calibrated again.
    """
    result = extract_paths(train, extractor, progress=progress)
    for f in result.failures:
        logger.warning("training: skipped %s: %s", f.path, f.reason)
    bg, cal = split_training(len(result.paths), seed)
    if len(cal) < MIN_CALIBRATION_IMAGES:
        raise ActiveIndexError(
            f"{len(result.paths)} readable training images are too few to calibrate a copy threshold "
            f"(at least {2 * MIN_CALIBRATION_IMAGES} are needed)"
        )
    coll = Collection.create(
        root, extractor, factory, result.features[bg], metric=metric, nprobe=nprobe,
        background=result.features[bg] if normalization is not None else None, normalization=normalization,
    )
    try:
        thr = calibrate_from_images(coll, [result.paths[i] for i in cal], target, seed=seed, dihedral=dihedral)
    except CalibrationError as exc:
        logger.warning("copy threshold not calibrated: %s", exc)
        thr = None
    return coll, thr
