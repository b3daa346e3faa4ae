"""Where the evaluation's images come from: a DISC21 folder, or the built-in synthetic benchmark.

Both give the four disjoint sets of the paper's protocol (METHOD.md §2):

* ``train``: images the index is trained on (and the normalisation background / calibration
  images are drawn from); never added to the collection;
* ``distractors``: references added as they are, to fill the index;
* ``under_test``: references that are released passively or activated, then edited and searched;
* ``nonmatching``: images that are not in the collection, edited and searched, for copy detection.

DISC21 layout (the folder as the dataset ships, or a small one in that layout)::

    DIR/train/T000000.jpg ...
    DIR/references/R000000.jpg ...
    DIR/dev_queries/Q00000.jpg ...            (optional)
    DIR/dev_queries_groundtruth.csv           query_id,reference_id (empty reference_id: no match)

Images under test are the references named in the ground truth (the paper's 10k); the other
references are distractors. Non-matching queries are the dev queries whose ground-truth reference
is empty; without a queries folder, training images held out from index training stand in for
them. Any cap on a set's size is recorded in :attr:`EvalData.notes` and the summary.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from activeindex.datasets.synthetic import make_images
from activeindex.errors import ActiveIndexError
from activeindex.images import list_images

GROUND_TRUTH_NAMES = ("dev_queries_groundtruth.csv", "dev_ground_truth.csv", "groundtruth.csv", "ground_truth.csv")
QUERY_DIRS = ("dev_queries", "queries")


class SourceError(ActiveIndexError):
    """An evaluation source folder that does not have the expected layout."""


@dataclass
class EvalData:
    """The four image sets of one evaluation, and notes on how they were drawn."""

    name: str
    train: list[Path]
    distractors: list[Path]
    under_test: list[Path]
    nonmatching: list[Path]
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "distractors", "under_test", "nonmatching")}


def _cap(items: list[Path], n: int | None, what: str, notes: list[str]) -> list[Path]:
    if n is not None and len(items) > n:
        notes.append(f"{what}: the first {n} of {len(items)} (sorted by name)")
        return items[:n]
    return items


def synthetic_source(
    root: str | Path,
    *,
    n_train: int = 2048,
    n_refs: int = 2048,
    n_test: int = 200,
    n_nonmatch: int = 200,
    seed: int = 7,
    size: int = 256,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalData:
    """Generate (or reuse) the synthetic benchmark under ``root``: one source seed, disjoint index
    ranges, so no two sets share content. The first ``n_test`` references are under test."""
    if not 0 < n_test <= n_refs:
        raise SourceError(f"need 0 < n_test <= n_refs, got n_test={n_test}, n_refs={n_refs}")
    if n_train < 1 or n_nonmatch < 1:
        raise SourceError(f"need n_train >= 1 and n_nonmatch >= 1, got {n_train} and {n_nonmatch}")
    root = Path(root)

    def make(folder: str, n: int, start: int) -> list[Path]:
        seen = [0]

        def counted(total: int) -> None:  # make_images reports running totals; progress wants steps
            if progress is not None:
                progress(total - seen[0])
            seen[0] = total

        return make_images(root / folder, n, start=start, seed=seed, size=(size, size), workers=workers,
                           progress=counted)

    train = make("train", n_train, 0)
    refs = make("references", n_refs, n_train)
    nonmatch = make("nonmatching", n_nonmatch, n_train + n_refs)
    return EvalData(
        name=f"synthetic (seed {seed}, {size}x{size})",
        train=train,
        distractors=refs[n_test:],
        under_test=refs[:n_test],
        nonmatching=nonmatch,
    )


def _images_in(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise SourceError(f"{folder} is missing: a DISC21 folder has train/ and references/")
    return {p.stem: p for p in sorted(list_images([folder]).images)}


def read_ground_truth(path: Path) -> list[tuple[str, str]]:
    """(query_id, reference_id) rows of a DISC21 ground-truth CSV; reference_id is '' for a
    non-matching query."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    if not rows or not {"query_id", "reference_id"} <= set(rows[0]):
        raise SourceError(f"{path} must be a CSV with columns query_id,reference_id")
    return [(r["query_id"].strip(), (r["reference_id"] or "").strip()) for r in rows]


def disc21_source(
    root: str | Path,
    *,
    ground_truth: str | Path | None = None,
    n_train: int | None = None,
    n_distractors: int | None = None,
    n_test: int | None = None,
    n_nonmatch: int | None = None,
) -> EvalData:
    """The sets of a DISC21 folder (see the module docstring); ``n_*`` cap each set."""
    root = Path(root)
    if ground_truth is None:
        found = [root / n for n in GROUND_TRUTH_NAMES if (root / n).is_file()]
        if not found:
            raise SourceError(f"no ground-truth CSV in {root} (looked for {', '.join(GROUND_TRUTH_NAMES)}); pass --ground-truth")
        ground_truth = found[0]
    gt = read_ground_truth(Path(ground_truth))
    refs = _images_in(root / "references")
    train = list(_images_in(root / "train").values())
    notes: list[str] = []
    wanted = sorted({r for _, r in gt if r})
    missing = [r for r in wanted if r not in refs]
    if missing:
        raise SourceError(f"{len(missing)} references named in {ground_truth} are not in {root / 'references'}, e.g. {missing[0]}")
    under_test = _cap([refs[r] for r in wanted], n_test, "images under test", notes)
    wanted_set = set(wanted)
    distractors = _cap([p for s, p in refs.items() if s not in wanted_set], n_distractors, "distractors", notes)
    query_dir = next((root / d for d in QUERY_DIRS if (root / d).is_dir()), None)
    if query_dir is not None:
        queries = _images_in(query_dir)
        nonmatching = [queries[q] for q, r in sorted(gt) if not r and q in queries]
        nonmatching = _cap(nonmatching, n_nonmatch, "non-matching queries", notes)
    else:
        # Hold out the last training images: they are not used to train the index.
        k = n_nonmatch if n_nonmatch is not None else max(1, len(train) // 5)
        if k >= len(train):
            raise SourceError(f"{len(train)} training images cannot spare {k} as non-matching queries")
        nonmatching, train = train[-k:], train[:-k]
        notes.append(f"no query folder ({' or '.join(QUERY_DIRS)}): {k} held-out training images are the non-matching queries")
    train = _cap(train, n_train, "training images", notes)
    if not under_test:
        raise SourceError(f"{ground_truth} names no reference: nothing to evaluate")
    return EvalData(f"DISC21 folder {root}", train, distractors, under_test, nonmatching, notes)
