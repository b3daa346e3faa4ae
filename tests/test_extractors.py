from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from activeindex.errors import ModelError
from activeindex.extractors import (
    BUILTIN_MODELS,
    Precision,
    Preprocessing,
    ResizePolicy,
    create_extractor,
    parse_spec,
)
from activeindex.extractors.base import IMAGENET_MEAN, IMAGENET_STD, calibration_batch
from activeindex.hardware import cpu_model, machine_summary, native_bf16


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("builtin", {"kind": "builtin", "name": "resnet-s"}),
        ("builtin:tiny", {"kind": "builtin", "name": "tiny"}),
        ("torchscript:/m/sscd.pt", {"kind": "torchscript", "path": "/m/sscd.pt"}),
        ("onnx:m.onnx", {"kind": "onnx", "path": "m.onnx"}),
    ],
)
def test_parse_spec(spec, expected):
    assert parse_spec(spec) == expected


def test_parse_spec_suggests_the_fix():
    with pytest.raises(ModelError, match="did you mean 'torchscript:model.pt'"):
        parse_spec("model.pt")
    with pytest.raises(ModelError, match="needs a file"):
        parse_spec("onnx:")


def test_unknown_builtin_lists_known_names():
    with pytest.raises(ModelError, match="tiny"):
        create_extractor("builtin:nope")


def test_builtin_is_deterministic_and_marked_untrained(tiny_extractor):
    again = create_extractor("builtin:tiny")
    assert again.digest == tiny_extractor.digest
    assert not tiny_extractor.trained  # no packaged weights for the test model
    x = calibration_batch(32, n=3)
    assert torch.equal(again.embed(x), tiny_extractor.embed(x))


def test_descriptors_are_unit_norm_and_shaped(tiny_extractor):
    batch = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    f = tiny_extractor.features(batch)
    assert f.shape == (5, tiny_extractor.dim) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny", "resnet-s"])
def test_builtin_features_run_a_trace_that_equals_the_eager_model(name):
    ex = create_extractor(f"builtin:{name}")
    s = ex.preprocessing.input_size
    x = np.random.default_rng(0).integers(0, 256, (9, s, s, 3), dtype=np.uint8)
    x01 = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        eager = ex._forward(x01, ex.autocast_dtype).numpy()
    # Same kernels, same numbers, up to rounding: on AVX2 CPUs the trace's oneDNN primitives can
    # accumulate in another order than eager ones (1 ulp, 1.2e-7, seen on an AMD EPYC without AVX-512);
    # on AVX-512 they are bitwise equal. bf16 rounds at 2**-8 relative, so a reordering shows more.
    atol = 1e-6 if ex.autocast_dtype == torch.float32 else 4e-3
    for b in (9, 1, 4, 9):  # traced on the first batch, then any batch size
        np.testing.assert_allclose(ex.features(x[:b]), eager[:b], rtol=0, atol=atol)
    assert isinstance(ex._traces[ex.autocast_dtype], torch.jit.ScriptModule)


def test_features_rejects_wrong_layout(tiny_extractor):
    with pytest.raises(ValueError, match="uint8"):
        tiny_extractor.features(np.zeros((2, 3, 32, 32), np.float32))


def test_builtin_refuses_preprocessing_overrides():
    with pytest.raises(ModelError, match="input_size"):
        create_extractor("builtin:tiny", input_size=64)


@pytest.mark.parametrize("precision", list(Precision))
def test_precision_modes_agree_with_fp32(precision):
    if precision is Precision.BF16 and not native_bf16():
        pytest.skip(f"this CPU has no native bf16 ({cpu_model()}); the refusal is tested below")
    ref = create_extractor("builtin:tiny", precision=Precision.FP32)
    ex = create_extractor("builtin:tiny", precision=precision)
    assert ex.precision in (Precision.FP32, Precision.BF16)
    if precision is Precision.FP32:
        assert ex.precision is Precision.FP32
    x = calibration_batch(32, n=4, seed=3)
    cos = (ex.embed(x) * ref.embed(x)).sum(1)
    # AUTO only picks bf16 when it stays within 0.99 cosine on the calibration batch.
    assert float(cos.min()) > (0.98 if precision is Precision.BF16 else 0.99)


def test_bf16_is_refused_without_native_support_and_auto_falls_back_to_fp32(monkeypatch):
    import activeindex.extractors.base as base

    monkeypatch.setattr(base, "native_bf16", lambda device: False)  # an AVX2-only CPU
    with pytest.raises(ModelError, match="no native bf16"):
        create_extractor("builtin:tiny", precision=Precision.BF16)
    assert create_extractor("builtin:tiny", precision=Precision.AUTO).precision is Precision.FP32


def test_embed_is_differentiable(tiny_extractor):
    x = calibration_batch(32, n=2).requires_grad_(True)
    tiny_extractor.embed(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.mark.parametrize("policy", list(ResizePolicy))
def test_prepare_gives_square_input(policy):
    pre = Preprocessing(input_size=40, resize=policy)
    img = Image.new("RGB", (120, 60), (10, 20, 30))
    arr = pre.prepare(img)
    assert arr.shape == (40, 40, 3) and arr.dtype == np.uint8
    assert (arr == (10, 20, 30)).all()


def test_center_crop_keeps_the_centre():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 0, 255), (100, 0, 200, 100))  # blue centre square
    arr = Preprocessing(input_size=20, resize=ResizePolicy.CENTER_CROP).prepare(img)
    assert arr[..., 2].mean() > 240 and arr[..., 0].mean() < 15


class _Net(torch.nn.Module):
    def __init__(self, out_dim: int = 16, flatten: bool = True):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, out_dim, 3, 2)
        self.flatten = flatten

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        return y if self.flatten else y[:, :, None]


def test_torchscript_roundtrip_and_digest(tmp_path):
    path = tmp_path / "m.pt"
    torch.jit.script(_Net()).save(str(path))
    ex = create_extractor(f"torchscript:{path}", input_size=48)
    assert ex.dim == 16 and ex.preprocessing.input_size == 48 and ex.trained
    # A stored description rebuilds the same extractor (same digest, same preprocessing).
    again = create_extractor(ex.describe())
    assert again.digest == ex.digest and again.preprocessing == ex.preprocessing
    x = calibration_batch(48, n=2)
    torch.testing.assert_close(again.embed(x), ex.embed(x))


def test_torchscript_with_wrong_output_shape(tmp_path):
    path = tmp_path / "bad.pt"
    torch.jit.script(_Net(flatten=False)).save(str(path))
    with pytest.raises(ModelError, match=r"must return \(batch, dim\)"):
        create_extractor(f"torchscript:{path}")


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS))
def test_registered_models_build_within_the_package_limits(name):
    ex = create_extractor(f"builtin:{name}")
    assert ex.preprocessing.input_size <= 224 and 0 < ex.dim <= 512
    n_bytes = sum(p.numel() for p in ex.model.parameters()) * 2  # shipped as fp16
    assert n_bytes <= 25 * 2**20


def test_onnx_model_matches_its_torch_source(tmp_path):
    """An ONNX export of a network gives the same descriptors as the network, with gradients."""
    import warnings

    net = _Net().eval()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, torch.zeros(1, 3, 40, 40), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "b"}})
    ex = create_extractor(f"onnx:{path}", precision=Precision.FP32, runtime="torch")
    assert ex.preprocessing.input_size == 40  # read from the file's static input shape
    x = calibration_batch(40, n=3).requires_grad_(True)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (ex.preprocessing.mean, ex.preprocessing.std))
    ref = torch.nn.functional.normalize(net((x - mean) / std), dim=-1)
    out = ex.embed(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_shipped_default_weights_load_match_their_card_and_are_deterministic():
    from activeindex.extractors.builtin import DEFAULT_BUILTIN, packaged_digest, weights_resource

    assert weights_resource(DEFAULT_BUILTIN).is_file(), "the default descriptor's weights must ship"
    assert weights_resource(DEFAULT_BUILTIN).stat().st_size <= 25 * 2**20
    a = create_extractor("builtin")
    b = create_extractor("builtin")
    assert a.trained and a.digest == packaged_digest(DEFAULT_BUILTIN) == b.digest
    x = calibration_batch(a.preprocessing.input_size, n=2, seed=5)
    torch.testing.assert_close(a.embed(x), b.embed(x), atol=0, rtol=0)


def test_damaged_weights_are_refused(monkeypatch):
    import activeindex.extractors as extractors

    monkeypatch.setattr(extractors, "packaged_digest", lambda name: "0" * 64)
    with pytest.raises(ModelError, match="damaged"):
        create_extractor("builtin")


def test_machine_summary_names_the_cpu_and_its_bf16():
    m = machine_summary()
    assert m.cpu and m.threads >= 1 and m.bf16_native == native_bf16()
    assert ("native bf16" if m.bf16_native else "no native bf16") in str(m) and m.cpu in str(m)


class _SSCDLike(torch.nn.Module):
    """SSCD's TorchScript interface (``sscd_disc_mixup.torchscript.pt``): NCHW float input,
    ImageNet-normalised, any size; an L2-normalised 512-d descriptor out (GeM pooling inside)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 32, 3, 2, 1)
        self.fc = torch.nn.Linear(32, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(x)).clamp(min=1e-6).pow(3.0).mean((2, 3)).pow(1.0 / 3.0)
        return torch.nn.functional.normalize(self.fc(f), dim=1)


def test_torchscript_with_sscds_interface(tmp_path):
    from activeindex.extractors import InputLayout, ValueRange

    torch.manual_seed(0)
    net = _SSCDLike().eval()
    path = tmp_path / "sscd_like.torchscript.pt"
    torch.jit.script(net).save(str(path))
    ex = create_extractor(f"torchscript:{path}", input_size=40, precision=Precision.FP32)
    pre = ex.preprocessing
    assert ex.dim == 512 and pre.layout is InputLayout.NCHW and pre.value_range is ValueRange.UNIT
    assert pre.mean == IMAGENET_MEAN and pre.std == IMAGENET_STD  # what SSCD's files expect
    batch = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    x01 = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    np.testing.assert_allclose(ex.features(batch), net((x01 - mean) / std).detach().numpy(), atol=1e-5)
    # Input gradient against central finite differences along random directions (float32: a step
    # of 1e-2 over 4800 pixels stays far above rounding noise; agreement to 2 %).
    w = torch.randn(2, 512, generator=torch.Generator().manual_seed(1))
    f = lambda t: (ex.embed(t) * w).sum()  # noqa: E731
    x = x01.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(f(x), x)
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        v = torch.randn(x.shape, generator=g)
        v /= v.norm()
        with torch.no_grad():
            fd = float(f(x + 1e-2 * v) - f(x - 1e-2 * v)) / 2e-2
        assert fd == pytest.approx(float((grad * v).sum()), rel=0.02, abs=1e-4)


@pytest.mark.parametrize("name", ["tiny", "resnet-s"])
def test_folded_batchnorm_computes_the_trained_function(name):
    """The extractor runs the module with each BatchNorm folded into its convolution: no BN is left,
    outputs and input gradients equal the module as trained (BN in eval mode) up to float rounding,
    and the digest is still the trained module's."""
    from activeindex.extractors.base import state_dict_digest
    from activeindex.extractors.builtin import build_builtin, fold_batchnorm

    trained = build_builtin(name)[0].eval()
    # BN statistics away from the identity, so that a missed or wrong fold shows
    with torch.random.fork_rng():
        torch.manual_seed(1)
        for m in trained.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)
    folded = fold_batchnorm(trained)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in trained.modules())  # the original is untouched
    size = BUILTIN_MODELS[name].preprocessing.input_size
    x = calibration_batch(size).requires_grad_(True)
    outs, grads = [], []
    for module in (trained, folded):
        y = module(x)
        (g,) = torch.autograd.grad(y.square().sum(), x)
        outs.append(y.detach())
        grads.append(g.flatten(1))
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-5 * outs[0].abs().max().item())
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=1).min() > 0.99999
    ex = create_extractor(f"builtin:{name}")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ex.model.modules())
    assert ex.digest == state_dict_digest(build_builtin(name)[0])
