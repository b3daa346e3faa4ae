"""``add --activate``: add images to a collection and write their activated versions for release.

For each batch of images (similar sizes together, bounded in count and pixels):

1. decode the originals at full resolution and describe them as every query is described;
2. compute their targets from the index (the reconstruction of the code each will get);
3. optimise the perturbations (:func:`activate_batch`) and encode each released file within the PSNR
   budget (:func:`finalize`); describe each file again and check that it is found first unedited
   wherever its original is (:func:`release_batch`: activated again, or released unchanged, if not);
   write the files atomically to ``OUT/<stem><ext>`` (same pixel size);
4. add the *originals'* descriptors to the collection (pending → index written → indexed), with the
   quality of the released file and its path in the database;
5. once the last batch is stored, check every earlier file of the run again against the finished
   index (a later batch's code can be ranked first) and repair those that lost rank 1
   (:func:`recheck_run`; the Ray driver does the same for its workers' files).

Crash safety: a batch is durable once step 4 returns. A crash before that leaves at most that batch's
released files without rows; a rerun redoes the batch (same result, files replaced) and skips every
image already indexed (by content hash). Ids are never reused, the index and the database agree, and
the output folder holds exactly one file per activated image.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from PIL import Image

from activeindex.activation.competitors import find_competitors
from activeindex.activation.optimize import ActivationConfig, activate_batch
from activeindex.activation.release import OutputFormat, Released, finalize
from activeindex.activation.targets import check_target_support, compute_targets, effective_target
from activeindex.activation.verify import own_code_first
from activeindex.atomic import write_bytes_atomic
from activeindex.collection import AddReport, Collection
from activeindex.errors import ActivationError, ActiveIndexError, ImageLoadError
from activeindex.extractors import Extractor
from activeindex.features import Failure
from activeindex.images import DEFAULT_LIMITS, MAX_ACTIVATION_PIXELS, ImageLimits, load_image

logger = logging.getLogger(__name__)

DEFAULT_BATCH = 16
# Below this min cosine between the runtime's descriptors and the converted module's, activation warns.
MIN_RUNTIME_AGREEMENT = 0.99
# Pixels per batch (padded); bounds memory: about 10 float32 copies of the batch live at once.
DEFAULT_BATCH_PIXELS = 16 * 1024 * 1024


@dataclass(frozen=True)
class ReleaseRecord:
    id: int
    name: str
    released: str  # path of the written file
    psnr: float
    ssim: float | None
    linf: float
    scale: float  # share of the optimised perturbation kept to meet the budget
    cos_before: float  # cosine of the descriptor to its target, original → released file
    cos_after: float  # (the written file described as a query of it would be)
    fix: str = "none"  # a Fix value: how the file came to be found first unedited


@dataclass
class ActivationReport(AddReport):
    released: list[ReleaseRecord] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # ActivationConfig.record() of the run

    def fixes(self) -> dict[str, int]:
        """How many released files needed a second activation (``margin``), or were released
        unchanged (``original``) to stay found first unedited."""
        return {fix.value: sum(r.fix == fix.value for r in self.released) for fix in (Fix.MARGIN, Fix.ORIGINAL)}

    def quality_summary(self) -> dict[str, dict[str, float]]:
        """min / median / mean / max of PSNR, SSIM, L∞ and the cosine gain over released files."""
        out: dict[str, dict[str, float]] = {}
        for key in ("psnr", "ssim", "linf", "cos_before", "cos_after"):
            vals = np.array([getattr(r, key) for r in self.released if getattr(r, key) is not None], dtype=float)
            if len(vals):
                out[key] = {"min": float(vals.min()), "median": float(np.median(vals)),
                            "mean": float(vals.mean()), "max": float(vals.max())}
        return out


def _image_size(path: Path) -> int:
    try:
        with Image.open(path) as img:
            return img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001 - unreadable files fail properly when decoded
        return 0


def _batches(items: list, sizes: list[int], max_count: int, max_pixels: int) -> list[list]:
    """Group items into batches of at most ``max_count`` and about ``max_pixels`` padded pixels,
    sorted by size so that images padded together are alike."""
    batches: list[list] = []
    current: list = []
    for i in sorted(range(len(items)), key=lambda i: sizes[i]):
        if current and (len(current) >= max_count or sizes[i] * (len(current) + 1) > max_pixels):
            batches.append(current)
            current = []
        current.append(items[i])
    if current:
        batches.append(current)
    return batches


def activation_limits(max_pixels: int = MAX_ACTIVATION_PIXELS) -> ImageLimits:
    """The decoding limits of an image to activate: at most ``max_pixels``, checked on the header."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    return dataclasses.replace(DEFAULT_LIMITS, max_pixels=min(max_pixels, DEFAULT_LIMITS.max_pixels))


def release_path(out_dir: Path, name: str, fmt: OutputFormat) -> Path:
    """Where the released version of an image named ``name`` (a file name, or a path relative to
    the folder it was found in) is written: the same relative path and stem, the format's extension
    (a ``.jpeg`` original written as JPEG keeps its extension)."""
    stem, ext = os.path.splitext(name)
    keep = {OutputFormat.JPEG: {".jpg", ".jpeg"}, OutputFormat.PNG: {".png"}, OutputFormat.WEBP: {".webp"}}[fmt]
    return out_dir / (name if ext.lower() in keep else stem + fmt.extension)


def add_activated(
    coll: Collection,
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: ActivationConfig = ActivationConfig(),
    *,
    names: Sequence[str] | None = None,
    fmt: OutputFormat | str = OutputFormat.PNG,
    quality: int = 95,
    batch_size: int = DEFAULT_BATCH,
    max_batch_pixels: int = DEFAULT_BATCH_PIXELS,
    max_pixels: int = MAX_ACTIVATION_PIXELS,
    progress: Callable[[int], None] | None = None,
) -> ActivationReport:
    """Activate ``paths`` against ``coll``, write the released files to ``out_dir``, add the
    originals' codes. See the module docstring for the protocol. Images over ``max_pixels`` are
    refused (reported in ``failures``, from their header: never decoded), since activation memory
    grows with the pixel count."""
    plan = plan_activation(coll, paths, out_dir, config, names=names, fmt=fmt, quality=quality,
                           batch_size=batch_size, max_batch_pixels=max_batch_pixels, progress=progress)
    checks: list[RunCheck] = []
    for b, batch in enumerate(plan.batches):
        done = _activate_and_add(coll, batch, plan.out_dir, plan.config, plan.fmt, quality, plan.report, max_pixels)
        if b < len(plan.batches) - 1:  # the last batch was checked against every code of the run
            checks.extend(done)
        if progress:
            progress(len(batch))
    recheck_run(coll, plan.report, checks, plan.config, plan.fmt, quality, batch_size, max_pixels)
    coll.resolve_repeats(plan.repeats, plan.report)
    return plan.report


@dataclass
class ActivationPlan:
    """What an activated add will do, decided before any work (shared by the in-process and the
    Ray paths, so both check and batch alike)."""

    config: ActivationConfig  # as it will run: codec-aware, with the target the index can serve
    fmt: OutputFormat
    out_dir: Path
    report: ActivationReport  # duplicates and unreadable files found while planning
    batches: list[list[tuple[Path, str, str]]]  # (path, name, sha256), similar sizes together
    repeats: list[tuple[str, str]]  # repeats of a file earlier in the input: (name, sha256)


def plan_activation(
    coll: Collection,
    paths: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    config: ActivationConfig,
    *,
    names: Sequence[str] | None,
    fmt: OutputFormat | str,
    quality: int,
    batch_size: int,
    max_batch_pixels: int,
    progress: Callable[[int], None] | None = None,
) -> ActivationPlan:
    """Resolve the configuration, refuse what cannot be done (an index without a target, two
    inputs released to one file, a file that would replace another image's release), sort out
    duplicates, make ``out_dir`` and batch the rest. ``progress`` is told of skipped images."""
    fmt = OutputFormat(fmt)
    if fmt.lossy(quality) and config.jpeg_quality is None:
        # Optimise through the (differentiable JPEG stand-in for the) codec the file will go through.
        config = dataclasses.replace(config, jpeg_quality=int(quality))
    config = dataclasses.replace(config, target=effective_target(coll.index, config.target))
    check_target_support(coll.index, config.target)
    _check_runtime_agreement(coll)
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    names = list(names) if names is not None else [p.name for p in paths]
    _check_destinations(paths, names, out_dir, fmt)
    report = ActivationReport(config=config.record())
    todo, repeats = coll.plan_add(list(zip(paths, names)), report)
    _check_not_released(coll, todo, out_dir, fmt)
    out_dir.mkdir(parents=True, exist_ok=True)
    if progress and len(paths) > len(todo):
        progress(len(paths) - len(todo))
    batches = _batches(todo, [_image_size(t[0]) for t in todo], batch_size, max_batch_pixels)
    return ActivationPlan(config, fmt, out_dir, report, batches, repeats)


def _check_runtime_agreement(coll: Collection) -> None:
    """Activation optimises the converted module's descriptor; the collection stores its runtime's.
    Say so when the two disagree enough to cost gain (SSCD int8: min cosine 0.9989)."""
    extractor = coll.extractor
    agreement = extractor.runtime_agreement()
    if agreement < MIN_RUNTIME_AGREEMENT:
        logger.warning(
            "%s: the converted module that activation differentiates agrees with %s only at cosine "
            "%.3f on a calibration batch; activated images will gain less (try --runtime torch at create)",
            extractor.spec_string, extractor.runtime.value, agreement,
        )


def _check_destinations(paths: list[Path], names: list[str], out_dir: Path, fmt: OutputFormat) -> None:
    """Refuse, before any work, to write two inputs to one file or over an input."""
    seen: dict[Path, Path] = {}
    inputs = {p.resolve() for p in paths}
    for path, name in zip(paths, names):
        dest = release_path(out_dir, name, fmt)
        if dest in seen:
            raise ActivationError(f"{seen[dest]} and {path} would both be released as {dest}; rename one")
        seen[dest] = path
        if dest.resolve() in inputs:
            raise ActivationError(f"releasing {path} to {dest} would overwrite an input; choose another --out")


def _check_not_released(coll: Collection, todo: list[tuple[Path, str, str]], out_dir: Path, fmt: OutputFormat) -> None:
    """Refuse to replace the released file of an indexed image (``todo`` holds no indexed image:
    a file recorded for another row belongs to another image)."""
    for path, name, _ in todo:
        dest = release_path(out_dir, name, fmt)
        holder = coll.released_by(str(dest.resolve()))
        if holder is not None:
            raise ActivationError(
                f"{dest} already holds the released version of another image ({holder}); "
                f"releasing {path} there would replace it: choose another --out"
            )


# The competitor term of a second try for an image whose released file lost rank 1 (the best
# setting measured in docs/activation-study.md, "The competitor term"); a user's stronger one stays.
REPAIR_MARGIN = {"margin_weight": 3.0, "margin": 0.05}


class Fix(str, enum.Enum):
    """How an image's released file came to be found first unedited (see :func:`release_batch`)."""

    NONE = "none"  # the first activation was found first (or the original is not either)
    MARGIN = "margin"  # activated again with the competitor term
    ORIGINAL = "original"  # released unchanged: both activations ranked another code first


@dataclass
class BatchRelease:
    """What :func:`release_batch` made of one batch of originals."""

    features: np.ndarray  # (B, d) the originals' descriptors, as every query is described
    files: list[Released | ActiveIndexError]  # the encoded file, or what kept it from the budget
    cos_before: np.ndarray  # (B,) cosine of the original's descriptor to its target
    cos_after: np.ndarray  # (B,) of the *written file's* descriptor to the target (NaN: no file)
    released_features: np.ndarray  # (B, d) the written files' descriptors (the original's: no file)
    fixes: list[Fix]
    iterations_run: int  # of the first activation


def _map_threads(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(item) for item in items]`` on as many threads as torch may use (every core, or the one
    a Ray worker is given): for work that releases the GIL (Pillow's resize and codecs, zlib, the
    SSIM filters)."""
    threads = min(len(items), torch.get_num_threads())
    if threads < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def load_arrays(paths: Sequence[str | os.PathLike[str]], limits: ImageLimits) -> list[np.ndarray | ImageLoadError]:
    """Decode the originals of a batch (in threads) → uint8 (h, w, 3) arrays, or why one could not be."""
    def load(path: str | os.PathLike[str]) -> np.ndarray | ImageLoadError:
        try:
            return np.asarray(load_image(path, limits=limits))
        except ImageLoadError as exc:
            return exc

    return _map_threads(load, list(paths))


def describe_arrays(extractor: Extractor, images: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 (h, w, 3) arrays → (B, d) descriptors, exactly as every query is described."""
    pre = extractor.preprocessing
    return extractor.features(np.stack(_map_threads(lambda a: pre.prepare(Image.fromarray(a)), images)))


def release_batch(
    extractor: Extractor,
    index: faiss.Index,
    originals: list[np.ndarray],
    config: ActivationConfig,
    fmt: OutputFormat = OutputFormat.PNG,
    quality: int = 95,
    *,
    start: Fix = Fix.NONE,
    own_ids: np.ndarray | None = None,
) -> BatchRelease:
    """One batch of originals (uint8 (h, w, 3)) → their descriptors and released files.
    ``index`` is the collection's (or a trained, empty copy: its codebooks give the targets).

    Each written file is described again, as a query of it would be, and checked
    (:func:`.verify.own_code_first`): wherever the original is found first unedited, its released
    file must be too. A file that is not is activated again with the competitor term
    (:data:`REPAIR_MARGIN`), and if that does not hold either, the original is released unchanged
    — an activated image is never harder to find than its original; ``fixes`` says which images
    needed which (callers report them). ``start=Fix.MARGIN`` begins with the competitor term (files
    that lost rank 1 after their release: :func:`recheck_run`). ``own_ids``: where the originals'
    codes are stored in ``index`` already, their ids (the check then leaves each own code out of
    the rivals by id, not by its distance)."""
    ex = extractor
    n = len(originals)
    x = describe_arrays(ex, originals)
    targets = compute_targets(index, x, config.target)
    passive = own_code_first(index, x, x, own_ids=own_ids)
    files: list[Released | ActiveIndexError] = [ActivationError("not released")] * n
    y = x.copy()  # descriptors of the written files (an image without one keeps its original's)
    fixes = [Fix.NONE] * n
    todo, iterations = list(range(n)), 0
    for fix in list(Fix)[list(Fix).index(start):]:
        if fix is Fix.ORIGINAL:
            perturbations = [np.zeros(originals[i].shape, np.float32) for i in todo]
        else:
            cfg = config if fix is Fix.NONE else dataclasses.replace(
                config, **{k: max(v, getattr(config, k)) for k, v in REPAIR_MARGIN.items()})
            try:
                perturbations, steps = _optimise(ex, index, [originals[i] for i in todo], x[todo], targets[todo], cfg)
            except ActivationError:
                if fix is Fix.NONE:
                    raise
                continue  # the index cannot give the competitor term (no reconstruction by id)
            iterations = iterations or steps
        for i, rel in zip(todo, _finalize_all([originals[i] for i in todo], perturbations, config, fmt, quality)):
            files[i] = rel
            fixes[i] = fix
        done = [i for i in todo if isinstance(files[i], Released)]
        if done:
            y[done] = describe_arrays(ex, [files[i].pixels for i in done])  # type: ignore[union-attr]
        first = own_code_first(index, x, y, own_ids=own_ids)
        todo = [i for i in done if passive[i] and not first[i]]
        if not todo:
            break
    cos_before = np.einsum("nd,nd->n", x, targets)
    cos_after = np.where([isinstance(f, Released) for f in files], np.einsum("nd,nd->n", y, targets), np.nan)
    return BatchRelease(x, files, cos_before, cos_after, y, fixes, iterations)


def _optimise(ex: Extractor, index: faiss.Index, originals: list[np.ndarray], x: np.ndarray,
              targets: np.ndarray, config: ActivationConfig) -> tuple[list[np.ndarray], int]:
    """→ the perturbations of ``originals`` (descriptors ``x``) and the iterations run."""
    competitors = find_competitors(index, x, config.competitors) if config.margin_weight > 0 else None
    act = activate_batch(ex, originals, targets, config, competitors, features=x, measure_after=False)
    return act.perturbations, act.iterations_run


def _finalize_all(originals: list[np.ndarray], perturbations: list[np.ndarray], config: ActivationConfig,
                  fmt: OutputFormat, quality: int) -> list[Released | ActiveIndexError]:
    def release(item: tuple[np.ndarray, np.ndarray]) -> Released | ActiveIndexError:
        try:
            return finalize(item[0], item[1], config.psnr, fmt, quality)
        except ActiveIndexError as exc:
            return exc

    # Encoding (zlib, libjpeg, libwebp) and the SSIM filters release the GIL: one thread per core
    # halves this step on 2 cores (it is a third of an activated image's time at 5 iterations).
    return _map_threads(release, list(zip(originals, perturbations)))


def _activate_and_add(
    coll: Collection,
    batch: list[tuple[Path, str, str]],
    out_dir: Path,
    config: ActivationConfig,
    fmt: OutputFormat,
    quality: int,
    report: ActivationReport,
    max_pixels: int = MAX_ACTIVATION_PIXELS,
) -> list[RunCheck]:
    """One batch: released files written, originals' codes stored → what :func:`recheck_run` needs."""
    loaded: list[tuple[Path, str, str, np.ndarray]] = []
    for (path, name, sha), image in zip(batch, load_arrays([t[0] for t in batch], activation_limits(max_pixels))):
        if isinstance(image, ImageLoadError):
            report.failures.append(Failure(path, image.reason))
        else:
            loaded.append((path, name, sha, image))
    if not loaded:
        return []
    rb = release_batch(coll.extractor, coll.index, [item[3] for item in loaded], config, fmt, quality)

    kept, records = [], []
    for i, ((path, name, _, _), rel) in enumerate(zip(loaded, rb.files)):
        if isinstance(rel, ActiveIndexError):
            report.failures.append(Failure(path, str(rel)))
            continue
        dest = release_path(out_dir, name, fmt)
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(dest, rel.data)
        kept.append(i)
        records.append((dest, rel, float(rb.cos_before[i]), float(rb.cos_after[i]), rb.fixes[i].value))
    if not kept:
        return []
    ids = coll.add_vectors(
        rb.features[kept],
        [loaded[i][1] for i in kept],
        [loaded[i][2] for i in kept],
        paths=[str(loaded[i][0].resolve()) for i in kept],
        mode="activated",
        quality=[r[1].quality() for r in records],
        released=[str(r[0].resolve()) for r in records],
    )
    for id_, i, (dest, rel, before, after, fix) in zip(ids, kept, records):
        report.added.append((id_, loaded[i][1]))
        report.released.append(
            ReleaseRecord(id_, loaded[i][1], str(dest), rel.psnr, rel.ssim, rel.linf, rel.scale, before, after, fix)
        )
    return [RunCheck(id_, loaded[i][0], rb.features[i], rb.released_features[i]) for id_, i in zip(ids, kept)]


@dataclass(frozen=True)
class RunCheck:
    """A released file of this run, to check again once the run's last code is stored."""

    id: int
    source: Path  # the original, to activate again
    original: np.ndarray  # (d,) its descriptor (the stored code's)
    released: np.ndarray  # (d,) the written file's descriptor


RECHECK_CHUNK = 4096  # files checked per index search
SAME_ORIGINAL_COS = 0.999  # an original read again must describe as it did (else it was replaced)


def recheck_run(
    coll: Collection,
    report: ActivationReport,
    checks: Sequence[RunCheck],
    config: ActivationConfig,
    fmt: OutputFormat,
    quality: int,
    batch_size: int = DEFAULT_BATCH,
    max_pixels: int = MAX_ACTIVATION_PIXELS,
) -> int:
    """Check the run's released files again now that all its codes are stored, and repair those
    that lost rank 1 → how many were repaired.

    :func:`release_batch` checks a file against the codes stored before it and its batch's; the
    codes of later batches (or, on Ray, of the other shards) can still be ranked first. Wherever
    the original is found first in the final index, its released file must be too: those that are
    not are activated again with the competitor term, or released unchanged (as in
    :func:`release_batch`), rewritten atomically, and their quality updated in the collection and
    in ``report``. A crash in between leaves valid files (within the budget, the last ones maybe
    outranked), each with its own quality recorded or, for at most one batch, the one it replaced.
    Memory: the run keeps two float32 descriptors per released file until here (4 KB at 512-d)."""
    if not checks:
        return 0
    lost: list[RunCheck] = []
    for start in range(0, len(checks), RECHECK_CHUNK):
        part = checks[start : start + RECHECK_CHUNK]
        x = np.stack([c.original for c in part])
        ids = np.array([c.id for c in part], dtype=np.int64)
        passive = own_code_first(coll.index, x, x, mates=False, own_ids=ids)
        first = own_code_first(coll.index, x, np.stack([c.released for c in part]), mates=False, own_ids=ids)
        lost.extend(c for c, p, f in zip(part, passive, first) if p and not f)
    if not lost:
        return 0
    logger.info("%d released files lost rank 1 to codes stored after them: activating them again", len(lost))
    where = {r.id: k for k, r in enumerate(report.released)}
    limits = activation_limits(max_pixels)
    repaired = 0
    for start in range(0, len(lost), batch_size):
        part, originals = [], []
        chunk = lost[start : start + batch_size]
        for c, image in zip(chunk, load_arrays([c.source for c in chunk], limits)):
            if isinstance(image, ImageLoadError):  # gone since: its file stays as released
                logger.warning("%s lost rank 1 after its release but cannot be read again: %s", c.source, image.reason)
            else:
                part.append(c)
                originals.append(image)
        if not part:
            continue
        rb = release_batch(coll.extractor, coll.index, originals, config, fmt, quality, start=Fix.MARGIN,
                           own_ids=np.array([c.id for c in part], np.int64))
        ids, qualities = [], []
        for c, rel, fix, after, x in zip(part, rb.files, rb.fixes, rb.cos_after, rb.features):
            old = report.released[where[c.id]]
            if float(x @ c.original) < SAME_ORIGINAL_COS:  # the file was replaced during the run
                logger.warning("%s changed since it was added: its released file is left as it was", c.source)
                continue
            if isinstance(rel, ActiveIndexError):  # the old file stays: within the budget, outranked
                logger.warning("%s: lost rank 1 after its release and could not be released again: %s", old.name, rel)
                continue
            write_bytes_atomic(Path(old.released), rel.data)
            report.released[where[c.id]] = dataclasses.replace(
                old, psnr=rel.psnr, ssim=rel.ssim, linf=rel.linf, scale=rel.scale, cos_after=float(after), fix=fix.value)
            ids.append(c.id)
            qualities.append(rel.quality())
        coll.update_release_quality(ids, qualities)
        repaired += len(ids)
    return repaired
