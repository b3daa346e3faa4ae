"""The paper's experiment (METHOD.md §2), end to end, for several indexes and ways of releasing.

For each FAISS factory:

1. a collection is created: the index trained on a part of the training images' descriptors, the
   score-normalisation background (the other part calibrates, unseen by the index);
2. the distractors and the images under test are added *as originals* (the index always holds
   the original's code), then the copy threshold is calibrated on the other training images
   (:mod:`activeindex.calibration`; their copies are described once for all factories);
3. each method releases the images under test: ``passive`` as they are, ``plain`` activated
   (METHOD.md §1), ``robust`` activated through random differentiable edits; activation aims at
   this factory's index, so activated pixels differ between factories;
4. retrieval: every released image goes through each of the paper's 14 edits (the same draw for
   every method and factory) and is searched for (k nearest); R@1, R@10, rank per copy;
5. copy detection: one "auto" copy of every released image (a query with a match) and of every
   non-matching image (a query without one), searched for; the pooled (query, reference, score)
   predictions give µAP, recall at precision 0.9, and precision/recall at the collection's
   calibrated threshold.
6. with ``dihedral``: every query of 4 and 5 is also searched as a dihedral query (its 8
   rotations/flips, each reference's best score; :mod:`activeindex.dihedral`), an extra query mode
   beside the single one, judged at its own calibrated threshold; the same copies, described under
   their 8 views (the identity view is the single query), and the cost of both modes per query,
   timed in the same run.

Descriptors that do not depend on the factory (training images, distractors, originals, passive
copies, non-matching copies, calibration copies) are computed once. Each finished (factory, method)
run is checkpointed under ``OUT/checkpoints``; a rerun with the same settings and images resumes
after the last finished run.
"""

from __future__ import annotations

import enum
import hashlib
import io
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from activeindex import metrics
from activeindex.activation.add import Fix, release_batch
from activeindex.activation.optimize import ActivationConfig, configure
from activeindex.activation.targets import TargetKind, check_target_support, effective_target
from activeindex.calibration import CalibrationSet, calibrate_modes, calibration_set, split_training
from activeindex.atomic import write_bytes_atomic
from activeindex.collection import Collection
from activeindex.copies import EditedCopies, describe_copies
from activeindex.dihedral import N_VIEWS, dihedral_views
from activeindex.edits import EditRecord, paper_edits
from activeindex.edits.registry import NamedEdit
from activeindex.errors import ActiveIndexError, ImageLoadError
from activeindex.evaluation.sources import EvalData
from activeindex.extractors import Extractor
from activeindex.features import describe_images, extract_paths
from activeindex.hardware import machine_summary
from activeindex.images import load_image
from activeindex.evaluation.uncertainty import gain_interval, recall_intervals, uap_interval
from activeindex.intervals import wilson_interval
from activeindex.knobs import user_values
from activeindex.scoring import DEFAULT_FPR, CopyTarget, Normalization, QueryMode, describe_threshold

logger = logging.getLogger(__name__)

AUTO = NamedEdit("auto", "auto", {})
ICD_EDIT_KEY = 1000  # edit key of the copy-detection "auto" copies (the 14 edits use 0..13)
CSV_NEIGHBOURS = 10  # retrieved ids/scores written per row of retr_df.csv / icd_df.csv
CHECKPOINT_VERSION = 3  # 2: ISC ids are file stems; 3: ranks, raw predictions, intervals


class Method(str, enum.Enum):
    PASSIVE = "passive"
    PLAIN = "plain"
    ROBUST = "robust"


@dataclass(frozen=True)
class EvalSettings:
    """Everything that decides an evaluation's numbers; written to ``summary.json``."""

    factories: tuple[str, ...] = ("IVF256,PQ8x8",)
    # Robust activation is a method of its own, run on request: it costs 2-4.5x plain's time (and is
    # sscd-distilled's default in add; here `plain` stays plain, so both can be compared).
    methods: tuple[Method, ...] = (Method.PASSIVE, Method.PLAIN)
    nprobe: int = 1
    k: int = 100  # neighbours per retrieval query (the paper's 100)
    k_icd: int = 10  # predictions per copy-detection query
    # The activation knobs the user set (activeindex.knobs: name → value); the others take the
    # model's own defaults, else ActivationConfig's; ``robust`` is the method's.
    activation: Mapping[str, Any] = field(default_factory=dict)
    target_fpr: float = DEFAULT_FPR  # the calibrated copy threshold's false-positive rate
    beta: float = 1.0
    n_background: int = 3  # score normalisation's top-n
    batch_size: int = 16  # images activated together
    seed: int = 0
    examples: int = 4  # released images kept for the report
    dihedral: bool = False  # also evaluate dihedral queries (8 rotations/flips each), an extra query mode

    def __post_init__(self) -> None:
        # Checked here, when the settings are made, so that a bad value fails before any work
        # (an evaluation first makes or reads thousands of images).
        object.__setattr__(self, "methods", tuple(Method(m) for m in self.methods))
        object.__setattr__(self, "activation", user_values(self.activation))
        if not self.factories or not self.methods:
            raise ActiveIndexError("an evaluation needs at least one index factory and one method")
        for name in ("nprobe", "k", "k_icd", "n_background", "batch_size"):
            if getattr(self, name) < 1:
                raise ActiveIndexError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.target_fpr < 1.0:
            raise ActiveIndexError(f"the target false-positive rate must be in (0, 1), got {self.target_fpr}")

    def activation_config(self, method: Method, extractor: Extractor | None = None) -> ActivationConfig:
        """How ``method`` activates: the knobs set here, else ``extractor``'s defaults, else the
        library's (:func:`activeindex.activation.optimize.configure`)."""
        return configure({**self.activation, "robust": method is Method.ROBUST}, extractor)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["methods"] = [m.value for m in self.methods]
        d["activation"] = {k: v.value if isinstance(v, enum.Enum) else v for k, v in self.activation.items()}
        d["factories"] = list(self.factories)
        return d


@dataclass
class RunResult:
    """One (factory, method): per-copy retrieval rows, copy-detection predictions, summary."""

    factory: str
    method: Method
    retrieval: list[dict[str, Any]] = field(default_factory=list)
    icd: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[tuple[str, str, float]] = field(default_factory=list)
    raw_predictions: list[tuple[str, str, float]] = field(default_factory=list)  # raw similarities
    ground_truth: list[tuple[str, str]] = field(default_factory=list)  # (query_id, reference_id) pairs
    queries: list[str] = field(default_factory=list)  # every copy-detection query id, matching first
    ranks: np.ndarray | None = None  # (14 edits, n images): rank of the original, k if not found
    summary: dict[str, Any] = field(default_factory=dict)
    curve: tuple[np.ndarray, np.ndarray] | None = None  # (recall, precision) of the pooled predictions
    psnr: np.ndarray | None = None
    examples: list[np.ndarray] = field(default_factory=list)


@dataclass
class Shared:
    """Factory-independent inputs, computed once."""

    xt: np.ndarray
    bg: np.ndarray
    cal: CalibrationSet
    x_distractors: np.ndarray
    distractor_names: list[str]
    originals: list[np.ndarray]
    test_names: list[str]
    x_originals: np.ndarray
    nonmatch_copies: np.ndarray
    nonmatch_names: list[str]
    nonmatch_records: list[EditRecord]
    passive_copies: dict[str, EditedCopies] | None = None  # the same for every factory: made once
    nonmatch_views: np.ndarray | None = None  # (n * 8, d) with settings.dihedral
    query_cost: dict[str, Any] | None = None  # seconds per query described, single vs dihedral


@contextmanager
def stage(desc: str, total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar for one stage (stderr; silent when not a terminal)."""
    with tqdm(total=total, desc=desc, unit="img", disable=None, leave=False) as bar:
        yield bar.update


def _say(log: Callable[[str], None] | None, msg: str) -> None:
    if log is not None:
        log(msg)
    logger.info(msg)


def _left_out(failures: Sequence[tuple[Path, str]], desc: str, notes: list[str]) -> None:
    """Unreadable images are left out of their set, and the summary says so."""
    if failures:
        path, reason = failures[0]
        notes.append(f"{desc}: {len(failures)} unreadable images left out, e.g. {path}: {reason}")
        logger.warning(notes[-1])


def _describe_files(paths: Sequence[Path], ex: Extractor, desc: str, notes: list[str]) -> tuple[np.ndarray, list[Path]]:
    with stage(desc, len(paths)) as update:
        res = extract_paths(paths, ex, progress=update)
    _left_out([(f.path, f.reason) for f in res.failures], desc, notes)
    return res.features, res.paths


def _load(paths: Sequence[Path], desc: str, notes: list[str]) -> tuple[list[Image.Image], list[Path]]:
    images, ok, failed = [], [], []
    for p in tqdm(paths, desc=desc, unit="img", disable=None, leave=False):
        try:
            images.append(load_image(p))
            ok.append(p)
        except ImageLoadError as exc:
            failed.append((p, exc.reason))
    _left_out(failed, desc, notes)
    return images, ok


def prepare_shared(data: EvalData, ex: Extractor, settings: EvalSettings, log: Callable[[str], None] | None = None) -> Shared:
    notes = data.notes
    xt, train_paths = _describe_files(data.train, ex, "training images", notes)
    bg, cal_idx = split_training(len(train_paths), settings.seed)
    cal_images, _ = _load([train_paths[i] for i in cal_idx], "calibration images", notes)
    with stage("calibration copies", len(cal_images)) as update:
        cal = calibration_set(ex, cal_images, seed=settings.seed, progress=update, dihedral=settings.dihedral)
    _say(log, f"   {len(xt)} training descriptors: {len(bg)} background, {len(cal_idx)} calibration images")
    x_d, d_paths = _describe_files(data.distractors, ex, "distractors", notes)
    test_images, test_paths = _load(data.under_test, "images under test", notes)
    with stage("originals", len(test_images)) as update:
        x_o = describe_images(test_images, ex, progress=update)
    nonmatch, nonmatch_paths = _load(data.nonmatching, "non-matching queries", notes)
    with stage("non-matching copies", len(nonmatch)) as update:
        copies = describe_copies(nonmatch, [AUTO] * len(nonmatch), ex, seed=settings.seed + 1,
                                    edit_keys=[ICD_EDIT_KEY] * len(nonmatch), progress=update,
                                    dihedral=settings.dihedral)
    cost = description_cost(nonmatch[:COST_PROBE_IMAGES], ex) if settings.dihedral and nonmatch else None
    return Shared(
        xt=xt, bg=xt[bg], cal=cal, x_distractors=x_d, distractor_names=[p.stem for p in d_paths],
        originals=[np.asarray(im) for im in test_images], test_names=[p.stem for p in test_paths], x_originals=x_o,
        nonmatch_copies=copies.features, nonmatch_names=[p.stem for p in nonmatch_paths],
        nonmatch_records=copies.records, nonmatch_views=copies.views, query_cost=cost,
    )


COST_PROBE_IMAGES = 64  # non-matching images described both ways to time the dihedral mode


def description_cost(images: Sequence[Image.Image], ex: Extractor, batch_size: int = 32,
                     rounds: int = 3) -> dict[str, Any]:
    """Seconds per query image to prepare and describe it once and under its 8 views, the model
    seeing ``batch_size`` inputs a call in both modes. The two modes alternate for ``rounds``
    rounds and each keeps its fastest: on a shared machine the load changes over seconds, and
    alternating exposes both modes to it alike (the first round also warms caches)."""
    best = {"single": float("inf"), "dihedral": float("inf")}
    for _ in range(rounds):
        for mode, kw in (("single", {}), ("dihedral", {"views": dihedral_views, "n_views": N_VIEWS})):
            t0 = time.perf_counter()
            describe_images(images, ex, batch_size=batch_size, **kw)
            best[mode] = min(best[mode], time.perf_counter() - t0)
    single, dihedral = best["single"] / len(images), best["dihedral"] / len(images)
    return {"images": len(images), "describe_s_single": single, "describe_s_dihedral": dihedral}


def build_collection(root: Path, factory: str, ex: Extractor, shared: Shared, settings: EvalSettings) -> tuple[Collection, list[int]]:
    """A fresh collection at ``root`` for ``factory``: trained, calibrated, holding the distractors
    and the originals of the images under test; returns it and the originals' ids. Built from
    descriptors: the image names stand in for content hashes."""
    shutil.rmtree(root, ignore_errors=True)
    # Trained on the background part only: the calibration images stay unseen by the index, as
    # the images under test are (see activeindex.calibration).
    coll = Collection.create(root, ex, factory, shared.bg, nprobe=settings.nprobe, background=shared.bg,
                             normalization=Normalization(settings.beta, settings.n_background))
    names = shared.distractor_names
    coll.add_vectors(shared.x_distractors, names, [f"distractor:{n}" for n in names])
    ids = coll.add_vectors(shared.x_originals, shared.test_names, [f"test:{n}" for n in shared.test_names])
    # Calibrated on the filled index, as `activeindex calibrate` does after adding: non-matching
    # calibration queries then meet the neighbours real queries meet.
    try:  # both query modes' thresholds when the calibration copies have their 8 views
        calibrate_modes(coll, shared.cal, CopyTarget(fpr=settings.target_fpr))
    except ActiveIndexError as exc:
        logger.warning("%s: copy threshold not calibrated: %s", factory, exc)
    return coll, ids


def release(coll: Collection, originals: list[np.ndarray], ids: list[int], method: Method,
            settings: EvalSettings) -> tuple[list[np.ndarray], dict[str, Any]]:
    """Released pixels of ``originals`` (stored in ``coll`` under ``ids``) under ``method`` and what
    releasing cost."""
    if method is Method.PASSIVE:
        return originals, {}
    config = settings.activation_config(method, coll.extractor)
    config = replace(config, target=effective_target(coll.index, config.target))
    check_target_support(coll.index, config.target)
    out: list[np.ndarray] = []
    q: dict[str, list[float]] = {"psnr": [], "ssim": [], "linf": [], "cos_before": [], "cos_after": []}
    fixes = {fix.value: 0 for fix in Fix}
    t0 = time.perf_counter()
    with stage(f"activate ({method.value})", len(originals)) as update:
        for start in range(0, len(originals), settings.batch_size):
            stop = start + settings.batch_size
            rb = release_batch(coll.extractor, coll.index, originals[start:stop], config,
                               own_ids=np.asarray(ids[start:stop], np.int64))
            for r, fix in zip(rb.files, rb.fixes):
                if isinstance(r, Exception):  # a lossless PNG always meets its budget
                    raise r
                out.append(r.pixels)
                for k, v in r.quality().items():
                    q[k].append(v)
                fixes[fix.value] += 1
            q["cos_before"].extend(rb.cos_before.tolist())
            q["cos_after"].extend(rb.cos_after.tolist())
            update(len(rb.files))
    seconds = time.perf_counter() - t0
    arr = {k: np.asarray([x for x in v if x is not None], dtype=float) for k, v in q.items()}
    stats = {f"{k}_mean": float(v.mean()) for k, v in arr.items() if len(v)}
    stats.update(psnr_min=float(arr["psnr"].min()), psnr_std=float(arr["psnr"].std()),
                 linf_max=float(arr["linf"].max()), images_per_s=len(originals) / seconds, target=config.target.value,
                 config=config.record(), psnr_all=arr["psnr"].tolist(), fixes=fixes)
    return out, stats


def _copies(released: list[np.ndarray], ex: Extractor, settings: EvalSettings, desc: str) -> dict[str, EditedCopies]:
    """Descriptors of the 14 edited copies and the "auto" copy-detection copy of each image."""
    images = [Image.fromarray(a) for a in released]
    n = len(images)
    out: dict[str, EditedCopies] = {}
    edits = list(paper_edits().items())
    with stage(f"copies ({desc})", n * (len(edits) + 1)) as update:
        for e, (name, edit) in enumerate(edits):
            out[name] = describe_copies(images, [edit] * n, ex, seed=settings.seed, edit_keys=[e] * n, progress=update,
                                        dihedral=settings.dihedral)
        out["icd"] = describe_copies(images, [AUTO] * n, ex, seed=settings.seed, edit_keys=[ICD_EDIT_KEY] * n,
                                     progress=update, dihedral=settings.dihedral)
    return out


def _fmt(values: np.ndarray, digits: int = 4) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def evaluate_run(coll: Collection, ids: list[int], copies: dict[str, EditedCopies], shared: Shared, factory: str,
                 method: Method, settings: EvalSettings) -> RunResult:
    """Retrieval and copy detection of one (factory, method) from its copies' descriptors."""
    run = RunResult(factory, method)
    ids_arr = np.asarray(ids)
    r1: dict[str, float] = {}
    r10: dict[str, float] = {}
    ranks = []
    for name in paper_edits():
        c = copies[name]
        S, I, raw = coll.search_arrays(c.features, settings.k)
        hit = I == ids_arr[:, None]
        rank = np.where(hit.any(axis=1), hit.argmax(axis=1), settings.k)
        ranks.append(rank)
        r1[name] = float((rank < 1).mean())
        r10[name] = float((rank < 10).mean())
        for i in range(len(ids)):
            rec = c.records[i]
            run.retrieval.append({
                "index": factory, "method": method.value, "batch": i // settings.batch_size,
                "image_index": ids[i], "image_name": shared.test_names[i], "attack": name,
                "attack_param": json.dumps(rec.to_dict()["params"]), "rank": int(rank[i]),
                "r@1": int(rank[i] < 1), "r@10": int(rank[i] < 10), "r@100": int(rank[i] < 100),
                "ap": 1.0 / (rank[i] + 1) if rank[i] < settings.k else 0.0,
                "retrieved_distances": _fmt(2.0 - 2.0 * raw[i, :CSV_NEIGHBOURS]),
                "retrieved_scores": _fmt(S[i, :CSV_NEIGHBOURS]),
                "retrieved_indices": " ".join(map(str, I[i, :CSV_NEIGHBOURS])),
            })
    r1["mean"] = float(np.mean(list(r1.values())))
    r10["mean"] = float(np.mean(list(r10.values())))

    # Copy detection: positives (one auto copy per released image) then non-matching queries.
    xq = np.concatenate([copies["icd"].features, shared.nonmatch_copies])
    records = copies["icd"].records + shared.nonmatch_records
    qnames = [f"pos{i:06d}" for i in range(len(ids))] + [f"neg{j:06d}" for j in range(len(shared.nonmatch_names))]
    S, I, raw = coll.search_arrays(xq, settings.k_icd)
    names = coll.names(np.unique(I[I >= 0]).tolist())
    raw_preds = run.raw_predictions
    for qi, qn in enumerate(qnames):
        keep = I[qi] >= 0
        for s, r, i in zip(S[qi][keep], raw[qi][keep], I[qi][keep]):
            run.predictions.append((qn, names[int(i)], float(s)))
            raw_preds.append((qn, names[int(i)], float(r)))
        matching = qi < len(ids)
        run.icd.append({
            "index": factory, "method": method.value, "batch": qi // 64, "query_id": qn,
            "image_index": ids[qi] if matching else -1,
            "image_name": shared.test_names[qi] if matching else shared.nonmatch_names[qi - len(ids)],
            "attack": json.dumps(records[qi].to_dict()),
            "retrieved_distances": _fmt(2.0 - 2.0 * raw[qi, :CSV_NEIGHBOURS]),
            "retrieved_scores": _fmt(S[qi, :CSV_NEIGHBOURS]),
            "retrieved_ids": " ".join(map(str, I[qi, :CSV_NEIGHBOURS])),
        })
    gt = [(qnames[i], shared.test_names[i]) for i in range(len(ids))]
    run.ground_truth, run.queries, run.ranks = gt, qnames, np.stack(ranks)
    m = metrics.evaluate(_as_triples(run.predictions), gt)
    uap_raw = metrics.micro_average_precision(_as_triples(raw_preds), gt)
    precision, recall, _ = metrics.precision_recall_curve(_as_triples(run.predictions), gt)
    run.curve = (recall, precision)
    run.summary = {
        "r@1": r1, "r@10": r10,
        "uap": m.uap, "uap_raw": uap_raw, "recall_at_p90": m.recall_at_p90, "threshold_at_p90": m.threshold_at_p90,
        "icd_recall_at_1": m.recall_at_1, "icd_recall_at_10": m.recall_at_10, "at_calibrated_threshold": at_threshold(coll, run, len(ids)),
        "n_images": len(ids), "n_matching_queries": len(ids), "n_nonmatching_queries": len(shared.nonmatch_names),
        "intervals": {
            "r@1": dict(zip([*paper_edits(), "mean"], recall_intervals(run.ranks, 1, seed=settings.seed).values())),
            "r@10": dict(zip([*paper_edits(), "mean"], recall_intervals(run.ranks, 10, seed=settings.seed).values())),
            "uap": uap_interval(run.predictions, gt, qnames, seed=settings.seed),
            "uap_raw": uap_interval(raw_preds, gt, qnames, seed=settings.seed),
        },
    }
    if settings.dihedral:
        run.summary["dihedral"] = evaluate_dihedral(coll, ids, copies, shared, settings, run)
    return run


def _search_seconds(coll: Collection, xq: np.ndarray, k: int, mode: QueryMode) -> tuple[tuple[np.ndarray, ...], float]:
    t0 = time.perf_counter()
    out = coll.search_arrays(xq, k, mode)
    return out, time.perf_counter() - t0


def evaluate_dihedral(coll: Collection, ids: list[int], copies: dict[str, EditedCopies], shared: Shared,
                      settings: EvalSettings, single: RunResult) -> dict[str, Any]:
    """The dihedral query mode on the same copies as ``single`` (the single-mode run): R@1 and R@10
    per edit with intervals, µAP and the copy decision at the dihedral threshold, and the cost per
    query of both modes (description timed in :func:`description_cost`, search here)."""
    ids_arr = np.asarray(ids)
    r1: dict[str, float] = {}
    r10: dict[str, float] = {}
    ranks = []
    t_single = t_dihedral = 0.0
    n_searched = 0
    for name in paper_edits():
        c = copies[name]
        assert c.views is not None, "dihedral evaluation needs copies described with their views"
        (_, I, _), t = _search_seconds(coll, c.views, settings.k, QueryMode.DIHEDRAL)
        t_dihedral += t
        t_single += _search_seconds(coll, c.features, settings.k, QueryMode.SINGLE)[1]
        n_searched += len(c.features)
        hit = I == ids_arr[:, None]
        rank = np.where(hit.any(axis=1), hit.argmax(axis=1), settings.k)
        ranks.append(rank)
        r1[name] = float((rank < 1).mean())
        r10[name] = float((rank < 10).mean())
    r1["mean"] = float(np.mean(list(r1.values())))
    r10["mean"] = float(np.mean(list(r10.values())))
    ranks_arr = np.stack(ranks)
    assert copies["icd"].views is not None and shared.nonmatch_views is not None
    xq = np.concatenate([copies["icd"].views, shared.nonmatch_views])
    S, I, _ = coll.search_arrays(xq, settings.k_icd, QueryMode.DIHEDRAL)
    names = coll.names(np.unique(I[I >= 0]).tolist())
    preds = [(qn, names[int(i)], float(s)) for qi, qn in enumerate(single.queries)
             for s, i in zip(S[qi], I[qi]) if i >= 0]
    run = RunResult(single.factory, single.method, predictions=preds, ground_truth=single.ground_truth,
                    queries=single.queries)
    m = metrics.evaluate(_as_triples(preds), single.ground_truth)
    cost = dict(shared.query_cost or {})
    cost.update(search_s_single=t_single / max(1, n_searched), search_s_dihedral=t_dihedral / max(1, n_searched))
    if "describe_s_single" in cost:
        total_single = cost["describe_s_single"] + cost["search_s_single"]
        total_dihedral = cost["describe_s_dihedral"] + cost["search_s_dihedral"]
        cost.update(query_s_single=total_single, query_s_dihedral=total_dihedral, ratio=total_dihedral / total_single)
    out = {
        "r@1": r1, "r@10": r10,
        "gain_r@1": {e: r1[e] - single.summary["r@1"][e] for e in r1},
        "gain_over_single": {f"r@{k}": {
            "gain": (r1 if k == 1 else r10)["mean"] - single.summary[f"r@{k}"]["mean"],
            "interval": gain_interval(ranks_arr, single.ranks, k, seed=settings.seed)} for k in (1, 10)},
        "uap": m.uap, "recall_at_p90": m.recall_at_p90,
        "at_calibrated_threshold": at_threshold(coll, run, len(ids), QueryMode.DIHEDRAL),
        "intervals": {
            "r@1": dict(zip([*paper_edits(), "mean"], recall_intervals(ranks_arr, 1, seed=settings.seed).values())),
            "r@10": dict(zip([*paper_edits(), "mean"], recall_intervals(ranks_arr, 10, seed=settings.seed).values())),
        },
        "cost": cost,
    }
    # What reusing the single-view threshold would do: the share of non-matching dihedral queries
    # whose best score reaches it (the reason the dihedral mode has a threshold of its own).
    thr1 = coll.threshold(QueryMode.SINGLE)
    best_non = S[len(ids):, 0]
    out["nonmatching_flagged_at_single_threshold"] = (
        None if thr1 is None or not len(best_non) else float((best_non >= thr1).mean()))
    return out


def at_threshold(coll: Collection, run: RunResult, n_matching: int,
                 mode: QueryMode = QueryMode.SINGLE) -> dict[str, Any]:
    """The collection's copy decision on this run's copy-detection queries: a query is flagged when
    its best score is >= the threshold; ``fpr`` is the share of non-matching queries flagged,
    ``recall`` the share of matching ones flagged with their original, ``precision`` the share of
    flagged (query, reference) pairs that are right at this evaluation's mix."""
    thr = coll.threshold(mode)
    out: dict[str, Any] = {"threshold": thr, "precision": None, "recall": None, "fpr": None, "fpr_interval": None,
                           "recall_interval": None,
                           "copy_decision": describe_threshold(coll.threshold_info(mode), mode)}
    if thr is None:
        return out
    gts = set(run.ground_truth)
    best: dict[str, tuple[float, str]] = {}
    for q, r, s in run.predictions:
        if q not in best or s > best[q][0]:
            best[q] = (s, r)
    flagged = {q for q, (s, _) in best.items() if s >= thr}
    right = sum((q, best[q][1]) in gts for q in flagged)
    non = run.queries[n_matching:]
    n_fp = sum(q in flagged for q in non)
    chosen = [(q, r) for q, r, s in run.predictions if s >= thr]
    tp = sum(p in gts for p in chosen)
    out.update(precision=tp / len(chosen) if chosen else None, recall=right / max(1, n_matching),
               fpr=n_fp / len(non) if non else None, fpr_interval=list(wilson_interval(n_fp, len(non))),
               recall_interval=list(wilson_interval(right, n_matching)))
    return out


def _as_triples(preds: list[tuple[str, str, float]]) -> tuple[list[str], list[str], np.ndarray]:
    if not preds:
        return [], [], np.zeros(0)
    q, r, s = zip(*preds)
    return list(q), list(r), np.asarray(s, dtype=np.float64)


def run_evaluation(
    data: EvalData,
    ex: Extractor,
    settings: EvalSettings,
    out: str | Path,
    *,
    log: Callable[[str], None] | None = None,
) -> tuple[list[RunResult], dict[str, Any]]:
    """Run the protocol; returns the (factory, method) results and the summary (also written,
    with the CSVs and predictions, by :func:`activeindex.evaluation.outputs.write_outputs`)."""
    out = Path(out)
    t0 = time.perf_counter()
    check_settings(settings, ex)
    _say(log, f"   sets: {data.counts()}")
    key = run_key(data, ex, settings)
    done = {(f, m): load_checkpoint(out, f, m, key) for f in settings.factories for m in settings.methods}
    if any(v is not None for v in done.values()):
        _say(log, f"   resuming: {sum(v is not None for v in done.values())} of {len(done)} runs already done in {out}")
    shared = prepare_shared(data, ex, settings, log) if any(v is None for v in done.values()) else None
    results: list[RunResult] = []
    factories: dict[str, Any] = {}
    for factory in settings.factories:
        if all(done[(factory, m)] is not None for m in settings.methods):
            results.extend(done[(factory, m)][0] for m in settings.methods)
            factories[factory] = done[(factory, settings.methods[0])][1]
            continue
        assert shared is not None
        coll, ids = build_collection(out / "collections" / factory_slug(factory), factory, ex, shared, settings)
        factories[factory] = {"threshold": coll.config.threshold_info, "index_bytes": (coll.root / "index.faiss").stat().st_size}
        if settings.dihedral:
            factories[factory]["dihedral_threshold"] = coll.config.dihedral_threshold_info
        with coll:
            for method in settings.methods:
                if done[(factory, method)] is not None:
                    results.append(done[(factory, method)][0])
                    continue
                released, stats = release(coll, shared.originals, ids, method, settings)
                if method is Method.PASSIVE and shared.passive_copies is not None:
                    copies = shared.passive_copies
                else:
                    copies = _copies(released, ex, settings, f"{factory}, {method.value}")
                    if method is Method.PASSIVE:
                        shared.passive_copies = copies
                run = evaluate_run(coll, ids, copies, shared, factory, method, settings)
                run.psnr = np.asarray(stats.pop("psnr_all")) if stats else None
                run.summary["release"] = stats
                run.examples = released[: settings.examples]
                save_checkpoint(out, run, factories[factory], key)
                results.append(run)
                s = run.summary
                _say(log, f"   {factory:24s} {method.value:8s} mean R@1 {s['r@1']['mean']:.3f}  µAP {s['uap']:.3f}  "
                          f"R@P90 {s['recall_at_p90']:.3f}" + (f"  PSNR {stats['psnr_mean']:.2f} dB" if stats else ""))
                if "dihedral" in s:
                    d = s["dihedral"]
                    _say(log, f"   {'':24s} {'dihedral':8s} mean R@1 {d['r@1']['mean']:.3f}  µAP {d['uap']:.3f}  "
                              f"R@P90 {d['recall_at_p90']:.3f}")
    add_gains(results, settings.seed)
    summary = {
        "source": data.name, "counts": data.counts(), "notes": data.notes, "model": ex.spec_string,
        "model_digest": ex.digest, "settings": settings.to_dict(), "factories": factories,
        "results": {f"{r.factory} | {r.method.value}": {"factory": r.factory, "method": r.method.value, **r.summary}
                    for r in results},
        "seconds": time.perf_counter() - t0,
        # which CPU kind the times and the precision belong to (bf16 only where it is native)
        "machine": {**machine_summary().to_dict(), "extractor_precision": ex.precision.value},
    }
    return results, summary


def add_gains(results: Sequence[RunResult], seed: int = 0) -> None:
    """Each activated run's gain in mean R@1 and R@10 over the passive run of its index, with a
    paired bootstrap interval over images (``summary["gain_over_passive"]``)."""
    passive = {r.factory: r for r in results if r.method is Method.PASSIVE and r.ranks is not None}
    for r in results:
        base = passive.get(r.factory)
        if r.method is Method.PASSIVE or base is None or r.ranks is None:
            continue
        r.summary["gain_over_passive"] = {
            f"r@{k}": {"gain": r.summary[f"r@{k}"]["mean"] - base.summary[f"r@{k}"]["mean"],
                       "interval": gain_interval(r.ranks, base.ranks, k, seed=seed)}
            for k in (1, 10)
        }


def run_key(data: EvalData, ex: Extractor, settings: EvalSettings) -> str:
    """What a finished (factory, method) run depends on, besides its factory and method: a rerun
    with the same key reuses it, one with another key recomputes it."""
    d = settings.to_dict()
    for k in ("factories", "methods", "examples"):
        d.pop(k)
    if not d["dihedral"]:
        d.pop("dihedral")  # runs checkpointed before the dihedral mode existed stay valid
    # The activation as it resolves (the model's and the library's defaults too, not only the knobs
    # the user set): a run made under other defaults is recomputed, not reused.
    resolved = settings.activation_config(Method.ROBUST, ex).record()
    resolved.pop("sources")
    d["activation_resolved"] = resolved
    sets = {k: [str(p) for p in getattr(data, k)] for k in ("train", "distractors", "under_test", "nonmatching")}
    blob = json.dumps({"settings": d, "sets": sets, "model": ex.digest, "version": CHECKPOINT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _checkpoint_path(out: Path, factory: str, method: Method) -> Path:
    # NumPy's npz with JSON inside, read with allow_pickle=False: a file planted in the output
    # folder can at worst be ignored, never run code (a pickle would).
    return out / "checkpoints" / f"{factory_slug(factory)}__{method.value}.npz"


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def save_checkpoint(out: Path, run: RunResult, factory_info: dict[str, Any], key: str) -> None:
    """Keep a finished run (atomically): an interrupted evaluation resumes after it."""
    path = _checkpoint_path(out, run.factory, run.method)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"key": key, "factory": run.factory, "method": run.method.value, "retrieval": run.retrieval,
            "icd": run.icd, "predictions": run.predictions, "summary": run.summary,
            "factory_info": factory_info, "examples": len(run.examples),
            "curve": run.curve is not None, "psnr": run.psnr is not None}
    arrays: dict[str, np.ndarray] = {
        "meta": np.frombuffer(json.dumps(meta, default=_json_default).encode(), dtype=np.uint8)}
    if run.curve is not None:
        arrays["curve_recall"], arrays["curve_precision"] = (np.asarray(a) for a in run.curve)
    if run.psnr is not None:
        arrays["psnr"] = np.asarray(run.psnr)
    if run.ranks is not None:  # the paired gain over passive and the report's example ranks need them
        arrays["ranks"] = np.asarray(run.ranks)
    for i, ex in enumerate(run.examples):
        arrays[f"example_{i}"] = np.asarray(ex)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_bytes_atomic(path, buf.getvalue())


def load_checkpoint(out: Path, factory: str, method: Method, key: str) -> tuple[RunResult, dict[str, Any]] | None:
    path = _checkpoint_path(out, factory, method)
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            if meta.get("key") != key:
                return None
            run = RunResult(
                factory=meta["factory"], method=Method(meta["method"]), retrieval=meta["retrieval"],
                icd=meta["icd"], predictions=[tuple(p) for p in meta["predictions"]], summary=meta["summary"],
                curve=(z["curve_recall"], z["curve_precision"]) if meta["curve"] else None,
                psnr=z["psnr"] if meta["psnr"] else None,
                examples=[z[f"example_{i}"] for i in range(int(meta["examples"]))],
                ranks=z["ranks"] if "ranks" in z.files else None,  # absent from the first version-3 files
            )
            return run, meta["factory_info"]
    except FileNotFoundError:
        return None
    except Exception as exc:  # noqa: BLE001 - an unreadable checkpoint is recomputed, not fatal
        logger.warning("ignoring unreadable checkpoint %s: %s", path, exc)
        return None


def check_settings(settings: EvalSettings, ex: Extractor) -> None:
    """Refuse factories that cannot run with ``ex`` (bad strings, no target for activation): cheap,
    to be called before any work."""
    import faiss

    from activeindex.index import build_index

    for f in settings.factories:
        idx = build_index(f, ex.dim)
        if all(m is Method.PASSIVE for m in settings.methods):
            continue
        if "LSH" in f:
            raise ActiveIndexError(f"{f}: LSH codes cannot give an activation target")
        target = settings.activation_config(Method.PLAIN, ex).target
        if target is TargetKind.CENTROID and faiss.try_extract_index_ivf(idx) is None:
            raise ActiveIndexError(f"{f}: the 'centroid' target needs an IVF index")


def factory_slug(factory: str) -> str:
    """A file-name-safe form of a factory string."""
    return "".join(c if c.isalnum() else "_" for c in factory)
