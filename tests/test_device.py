"""The device: one resolver (``auto`` / ``cpu`` / ``cuda[:N]``), ``--device`` on the commands that
describe, activate or train, and the GPU path itself.

Everything here but the last tests runs without a GPU: the CUDA answers torch would give are
monkeypatched where a refusal or a choice depends on them. ``test_cuda_matches_cpu`` runs
extraction, one activation batch and a training step on a CUDA GPU and compares them with the
CPU; it is skipped, with its reason, where torch sees none (a CPU build of torch, as pinned here).
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from activeindex.activation import ActivationConfig, activate_batch, compute_targets
from activeindex.cli import app
from activeindex.collection import Collection
from activeindex.datasets.synthetic import write_synthetic_images
from activeindex.errors import ActiveIndexError, DeviceError
from activeindex.extractors import create_extractor
from activeindex.hardware import native_bf16, resolve_device
from helpers import run_main

NO_CUDA = not torch.cuda.is_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="tests the refusal of a CUDA device this machine lacks")
needs_cuda = pytest.mark.skipif(
    NO_CUDA, reason=f"needs a CUDA GPU (torch {torch.__version__}: torch.cuda.is_available() is False)")


def _images(image_dir, n, start=0):
    paths = sorted(image_dir.glob("*.png"))[start : start + n]
    return paths, [np.asarray(Image.open(p).convert("RGB")) for p in paths]


# -- the resolver ----------------------------------------------------------------------------------
def test_auto_is_the_gpu_when_torch_sees_one_else_the_cpu(monkeypatch):
    assert resolve_device("auto") == resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("text", ["cpu", " CPU ", torch.device("cpu")])
def test_cpu_in_any_spelling(text):
    assert resolve_device(text) == torch.device("cpu")


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "cuda:", "", "cpu0", "mps", "auto:0", torch.device("meta")])
def test_a_value_that_is_not_a_device_is_refused(text):
    with pytest.raises(DeviceError, match="is not a device; use auto, cpu, cuda or cuda:N") as info:
        resolve_device(text)
    assert isinstance(info.value, ActiveIndexError)  # the CLI prints it, exit 2


@pytest.mark.parametrize("text", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused_with_the_reason(monkeypatch, text):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(DeviceError) as info:
        resolve_device(text, name="--device")
    assert str(info.value) == (f"--device {text}: no CUDA device is available (torch {torch.__version__} is a "
                               "CPU build); use --device cpu or auto")
    monkeypatch.setattr(torch.version, "cuda", "12.8")  # a CUDA build on a machine without a GPU
    with pytest.raises(DeviceError, match=r"is built for CUDA 12\.8 but found no GPU"):
        resolve_device(text)


def test_a_cuda_index_beyond_the_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match=r"cuda:3: this machine has 1 CUDA device \(cuda:0\)"):
        resolve_device("cuda:3")


def test_native_bf16_on_cuda_means_compute_capability_8(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert native_bf16("cuda") is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for major, native in ((7, False), (8, True), (9, True)):  # Volta/Turing emulate bf16; Ampere on
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, m=major: types.SimpleNamespace(major=m))
        assert native_bf16(torch.device("cuda:0")) is native
    assert native_bf16("meta") is False


# -- the library takes the device ------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_collection(tmp_path_factory, train_vectors):
    """A collection made by `create --device cpu` from a .npy of descriptors."""
    tmp = tmp_path_factory.mktemp("device")
    np.save(tmp / "xt.npy", train_vectors)
    root = tmp / "coll"
    r = CliRunner().invoke(app, ["create", str(root), "--model", "builtin:tiny", "--index", "IVF4,PQ4x4",
                                 "--train", str(tmp / "xt.npy"), "--device", "cpu"])
    assert r.exit_code == 0, (r.output, r.exception)
    return root


def test_extractors_and_collections_take_the_device(cli_collection):
    ex = create_extractor("builtin:tiny", device="auto")
    assert ex.device == resolve_device("auto")
    root = cli_collection
    with Collection.open(root, device=torch.device("cpu")) as coll:
        assert coll.extractor.device == torch.device("cpu")
    # The device is not part of the collection: one made on a GPU opens on a CPU.
    stored = json.loads((root / "collection.json").read_text())
    assert "device" not in stored and "device" not in stored["extractor"]
    with pytest.raises(DeviceError):
        Collection.open(root, device="gpu")


@needs_no_cuda
def test_cuda_is_refused_by_the_library_before_any_model_is_built(cli_collection):
    with pytest.raises(DeviceError, match="no CUDA device is available"):
        create_extractor("builtin:tiny", device="cuda")
    with pytest.raises(DeviceError, match="no CUDA device is available"):
        Collection.open(cli_collection, device="cuda")


def test_activation_on_a_device_object_equals_the_default(tiny_extractor, train_vectors, image_dir, tmp_path):
    """Activation computes on ``extractor.device``, given as a torch.device: the same numbers."""
    _, imgs = _images(image_dir, 2)
    with Collection.create(tmp_path / "c", tiny_extractor, "IVF4,PQ4x4", train_vectors) as coll:
        pre = tiny_extractor.preprocessing
        x = tiny_extractor.features(np.stack([pre.prepare(Image.fromarray(a)) for a in imgs]))
        t = compute_targets(coll.index, x)
    cfg = ActivationConfig(stop_cos=None, iterations=2, precision="fp32")
    on_object = activate_batch(create_extractor("builtin:tiny", device=torch.device("cpu")), imgs, t, cfg)
    default = activate_batch(tiny_extractor, imgs, t, cfg)
    for a, b in zip(on_object.perturbations, default.perturbations):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(on_object.cos_after, default.cos_after)


# -- the command line ------------------------------------------------------------------------------
def test_device_cpu_on_the_commands(cli_collection, image_dir, tmp_path):
    runner = CliRunner()
    paths, _ = _images(image_dir, 4)

    def ok(*args):
        r = runner.invoke(app, [str(a) for a in args])
        assert r.exit_code == 0, (r.output, r.exception)
        return r

    r = ok("extract", *paths, "-o", tmp_path / "feats", "--model", "builtin:tiny", "--device", "cpu")
    assert np.load(tmp_path / "feats" / "features.npy").shape == (4, 32) and ", cpu)" in r.output
    ok("add", cli_collection, *paths[:2], "--device", "cpu")
    added = json.loads(ok("add", cli_collection, *paths[2:], "--activate", "--out", tmp_path / "rel", "--json",
                          "--iterations", "2", "--device", "cpu").stdout)
    assert len(added["released"]) == 2
    q = json.loads(ok("query", cli_collection, paths[0], "-k", "2", "--json", "--device", "cpu").stdout)
    assert q[0]["matches"][0]["name"] == paths[0].name
    write_synthetic_images(tmp_path / "others", 24, seed=5, size=(48, 48))  # not in the collection
    ok("calibrate", cli_collection, "--images", tmp_path / "others", "--device", "cpu", "--no-dihedral")


CUDA_COMMANDS = {
    "extract": ["extract", "IMG", "-o", "OUT", "--model", "builtin:tiny"],
    "create": ["create", "NEW", "--index", "Flat", "--train", "IMG", "--model", "builtin:tiny"],
    "add": ["add", "COLL", "IMG"],
    "add --activate": ["add", "COLL", "IMG", "--activate", "--out", "OUT"],
    "query": ["query", "COLL", "IMG"],
    "calibrate": ["calibrate", "COLL", "--images", "IMG"],
    "evaluate": ["evaluate", "--out", "OUT", "--model", "builtin:tiny"],
    "serve": ["serve", "COLL", "--model-processes", "0"],
    "train-descriptor": ["train-descriptor", "IMG", "-o", "OUT", "--arch", "tiny", "--steps", "1"],
}


@needs_no_cuda
@pytest.mark.parametrize("command", CUDA_COMMANDS)
def test_device_cuda_without_a_gpu_is_a_clear_error(command, cli_collection, image_dir, tmp_path, monkeypatch, capsys):
    where = {"IMG": image_dir, "OUT": tmp_path / "out", "NEW": tmp_path / "new", "COLL": cli_collection}
    args = [str(where.get(a, a)) for a in CUDA_COMMANDS[command]]
    code, out, err = run_main(monkeypatch, capsys, *args, "--device", "cuda")
    assert code == 2, (out, err)
    assert f"error: --device cuda: no CUDA device is available (torch {torch.__version__}" in err
    assert "Traceback" not in err + out
    assert not (tmp_path / "out").exists() and not (tmp_path / "new").exists()  # refused before any work


def test_a_device_typo_is_a_usage_error(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "extract", tmp_path, "-o", tmp_path / "o", "--device", "gpu")
    assert code == 2 and "Invalid value for '--device': 'gpu' is not a device; use auto, cpu, cuda or cuda:N" in err


def test_ray_runs_on_cpu_workers_and_refuses_a_gpu_asked_for(monkeypatch, capsys, image_dir, tmp_path):
    code, _, err = run_main(monkeypatch, capsys, "extract", image_dir, "-o", tmp_path / "o", "--model",
                            "builtin:tiny", "--workers", "1", "--device", "cuda:0")
    assert code == 2 and "--device cuda:0: --workers/--ray-address describe and activate on Ray's CPU workers" in err


# -- on a GPU --------------------------------------------------------------------------------------
@needs_cuda
def test_cuda_matches_cpu(train_vectors, image_dir, tmp_path):
    """Extraction, one activation batch and one training step on CUDA agree with the CPU (fp32
    both; CUDA convolutions may use TF32, hence tolerances rather than equality)."""
    from activeindex.extractors.builtin import build_builtin
    from activeindex.training.losses import info_nce, koleo
    from activeindex.training.trainer import TrainConfig, train_descriptor

    cpu = create_extractor("builtin:tiny", precision="fp32", device="cpu")
    gpu = create_extractor("builtin:tiny", precision="fp32", device="cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    _, imgs = _images(image_dir, 8)
    batch = np.stack([cpu.preprocessing.prepare(Image.fromarray(a)) for a in imgs])
    x_cpu, x_gpu = cpu.features(batch), gpu.features(batch)
    assert x_gpu.dtype == np.float32 and x_gpu.shape == x_cpu.shape
    assert (x_cpu * x_gpu).sum(axis=1).min() > 0.999

    # One activation batch, towards the same targets.
    with Collection.create(tmp_path / "c", cpu, "IVF4,PQ4x4", train_vectors) as coll:
        t = compute_targets(coll.index, x_cpu[:3])
    cfg = ActivationConfig(stop_cos=None, iterations=5, precision="fp32")
    a_cpu = activate_batch(cpu, imgs[:3], t, cfg)
    a_gpu = activate_batch(gpu, imgs[:3], t, cfg)
    assert (a_gpu.cos_after > a_gpu.cos_before).all()
    np.testing.assert_allclose(a_gpu.cos_before, a_cpu.cos_before, atol=1e-3)
    np.testing.assert_allclose(a_gpu.cos_after, a_cpu.cos_after, atol=0.05)
    for p_cpu, p_gpu in zip(a_cpu.perturbations, a_gpu.perturbations):
        assert p_gpu.shape == p_cpu.shape
        assert np.corrcoef(p_cpu.ravel(), p_gpu.ravel())[0, 1] > 0.9

    # A training step: the same weights and views give the same loss and gradients on both devices.
    model, _, _ = build_builtin("tiny", load_weights=False)
    views = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    results = []
    for device in ("cpu", "cuda"):
        m = model.to(device).train()
        m.zero_grad(set_to_none=True)
        z = F.normalize(m(views.to(device)).float(), dim=-1)
        z1, z2 = z.chunk(2)
        loss = info_nce(z1, z2, 0.1) + 0.5 * koleo(z)
        loss.backward()
        grads = torch.cat([p.grad.flatten().cpu() for p in m.parameters() if p.grad is not None])
        results.append((float(loss), grads))
    assert abs(results[0][0] - results[1][0]) < 1e-3 * max(1.0, abs(results[0][0]))
    assert F.cosine_similarity(results[0][1], results[1][1], dim=0) > 0.99

    # The trainer on CUDA: runs, resumes (the GPU's generator state is checkpointed), exports.
    pool = torch.from_numpy(np.stack([np.asarray(Image.fromarray(a).resize((48, 48))) for a in imgs]))
    pool = pool.permute(0, 3, 1, 2).contiguous()
    cfg_t = TrainConfig(arch="tiny", steps=4, batch_size=4, load_size=48, warmup_steps=1, checkpoint_every=2)
    trained = train_descriptor(pool, tmp_path / "train", cfg_t, device="cuda")
    assert next(trained.parameters()).device.type == "cuda"
    log = [json.loads(line) for line in (tmp_path / "train" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in log)
    ckpt = torch.load(tmp_path / "train" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert "cuda_rng" in ckpt
