"""Activation: JND, the exact resize, targets, the optimisation, release files and add --activate."""

from __future__ import annotations

import json
import sqlite3

import faiss
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from activeindex.activation import ActivationConfig, OutputFormat, activate_batch, compute_targets
from activeindex.activation.add import add_activated
import activeindex.activation.jnd as jnd_module
import activeindex.activation.render as render_module
from activeindex.activation.jnd import jnd_heatmap
from activeindex.activation.optimize import CHECK_EVERY
import activeindex.activation.release as release_module
from activeindex.activation.release import decode, finalize, psnr, ssim
from activeindex.activation.render import Render, render
from activeindex.activation.resize import Banded, InputResize, apply_resize, batch_matrices, input_matrices
from activeindex.activation.targets import check_target_support
from activeindex.cli import app
from activeindex.collection import Collection
from activeindex.errors import ActivationError, ActiveIndexError
from activeindex.extractors.base import Extractor, Preprocessing
from activeindex.index import build_index
from activeindex.settings import ViewEdits

FP32 = dict(precision="fp32")


def _images(image_dir, n, start=0):
    paths = sorted(image_dir.glob("*.png"))[start : start + n]
    return paths, [np.asarray(Image.open(p).convert("RGB")) for p in paths]


@pytest.fixture()
def pq_coll(tmp_path, tiny_extractor, train_vectors):
    c = Collection.create(tmp_path / "c", tiny_extractor, "IVF4,PQ4x4", train_vectors, nprobe=1)
    yield c
    c.close()


def _describe(ex, images):
    return ex.features(np.stack([ex.preprocessing.prepare(Image.fromarray(a)) for a in images]))


# -- JND and resize --------------------------------------------------------------------------------
def test_jnd_floor_and_edges_in_both_directions():
    flat = torch.full((1, 3, 32, 32), 0.5)
    assert torch.allclose(jnd_heatmap(flat), torch.full((1, 1, 32, 32), 5 / 255), atol=1e-6)
    # Edges along x only and along y only must raise the JND alike (Sobel in x *and* y).
    vert = torch.zeros(1, 3, 32, 32)
    vert[..., 16:] = 1.0
    horiz = vert.transpose(-1, -2).contiguous()
    jv, jh = jnd_heatmap(vert), jnd_heatmap(horiz)
    assert jv[0, 0, 10, 16] > jv[0, 0, 10, 4] + 5 / 255
    assert torch.allclose(jv, jh.transpose(-1, -2), atol=1e-5)
    assert jv.min() >= 5 / 255 - 1e-6


@pytest.mark.parametrize("rows", [1, 5, 32])
@pytest.mark.parametrize("size", [(3, 3), (5, 8), (6, 6), (40, 33), (97, 130)])
def test_ssim_in_bands_is_scikit_images_ssim(monkeypatch, rows, size):
    from skimage.metrics import structural_similarity

    monkeypatch.setattr(release_module, "SSIM_ROWS", rows)
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    win = min(7, min(size) if min(size) % 2 else min(size) - 1)
    want = structural_similarity(a, b, channel_axis=2, data_range=255, win_size=win)
    assert ssim(a, b) == pytest.approx(want, abs=1e-6)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6) and ssim(a[:2], b[:2]) is None


@pytest.mark.parametrize("band", [1000, 7777, 10**9])
def test_jnd_in_bands_of_rows_is_the_whole_image_heatmap(monkeypatch, band):
    x = torch.rand(2, 3, 90, 64)
    whole = jnd_module._heatmap(x)
    monkeypatch.setattr(jnd_module, "BAND_ELEMENTS", band)  # 15, 121 rows, or the whole image
    assert torch.allclose(jnd_heatmap(x), whole, atol=1e-6)


def test_a_tiles_scalar_scales_alike_as_a_number_or_as_a_device_tensor():
    """The tile loops take per-image scalars as Python floats on a CPU and as tensors on a GPU
    (``render._scalars``): both forms of ``_times`` must give the same ``addcmul``."""
    base, a, b = (torch.rand(5, 7, generator=torch.Generator().manual_seed(k), dtype=torch.float64) for k in range(3))
    for s in (0.37, torch.tensor(0.37, dtype=torch.float64)):
        factor, value = render_module._times(b, s)
        assert isinstance(value, float)
        torch.testing.assert_close(torch.addcmul(base, a, factor, value=value), base + a * b * 0.37)


@pytest.mark.parametrize("tile", [64, 1000, 10**9])  # one row, a few rows, the whole image per tile
@pytest.mark.parametrize("case", ["binding", "loose", "zero"])
def test_render_equals_the_op_chain_and_its_gradient(monkeypatch, tile, case):
    """The tiled forward/backward of the budgeted perturbation is the autograd of the op chain it
    replaces, in float64: saturated pixels (the clamp stops the gradient), padding (bound 0), the
    budget binding (s < 1, gradient through s) or not (s = 1), and δ = 0 (the first iteration)."""
    monkeypatch.setattr(render_module, "TILE_ELEMENTS", tile)
    g = torch.Generator().manual_seed(0)
    b, c, h, w = 3, 3, 37, 50
    x0 = torch.rand(b, c, h, w, generator=g, dtype=torch.float64)
    x0[0, :, :5], x0[1, :, :5] = 1.0, 0.0
    bound = torch.rand(b, c, h, w, generator=g, dtype=torch.float64) * 0.05
    bound[2, :, 30:] = 0.0
    n_valid = torch.tensor([c * h * w, c * h * w, c * 30 * w], dtype=torch.float64)
    mse_max = 1.0 if case == "loose" else 10 ** -4.21
    spread = 0.0 if case == "zero" else 2.0
    delta = (torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * spread).requires_grad_(True)
    gx, gl = torch.randn(b, c, h, w, generator=g, dtype=torch.float64), torch.randn(b, generator=g, dtype=torch.float64)

    p = bound * torch.tanh(delta)
    mse = torch.linalg.vector_norm(p, dim=(1, 2, 3)).square() / n_valid
    s = torch.sqrt(mse_max / mse.clamp_min(1e-20)).clamp(max=1.0)
    x_ref, loss_ref = (x0 + p * s.view(b, 1, 1, 1)).clamp(0, 1), mse * s.square()
    (g_ref,) = torch.autograd.grad((x_ref * gx).sum() + (loss_ref * gl).sum(), delta)
    assert (s < 1).all() if case == "binding" else (s == 1).all()

    r = Render(x0, bound, n_valid, mse_max)
    assert len(r.tiles) == (3 if tile > c * h * w else 3 * -(-c * h * w // max(w, tile // w * w)))
    x, loss = render(delta, r)
    (g_got,) = torch.autograd.grad((x * gx).sum() + (loss * gl).sum(), delta)
    assert torch.allclose(x, x_ref, atol=1e-14) and torch.allclose(loss, loss_ref, rtol=1e-12, atol=0)
    assert torch.allclose(g_got, g_ref, rtol=1e-10, atol=1e-14)
    assert torch.allclose(r.perturbation(delta.detach()), p.detach() * s.view(b, 1, 1, 1), atol=1e-14)


@pytest.mark.parametrize("policy", ["square", "center-crop"])
def test_render_and_resize_reuse_their_buffers_across_iterations(policy):
    """The rendered x and the gradients live in buffers reused by the next iteration: a second
    forward/backward through the same Render and resize gives what fresh ones give, whatever the
    buffers held before (stale values are overwritten, rows no image reads are zeroed: the
    centre crop of a tall image leaves whole blocks of rows unread)."""
    g = torch.Generator().manual_seed(1)
    b, c, h, w = 2, 3, 80, 40
    x0 = torch.rand(b, c, h, w, generator=g, dtype=torch.float64)
    bound = torch.rand(b, c, h, w, generator=g, dtype=torch.float64) * 0.05
    n_valid = torch.full((b,), float(c * h * w), dtype=torch.float64)
    pre = Preprocessing(input_size=16, resize=policy)
    a_h, a_w = (m.double() for m in batch_matrices([(h, w)] * b, pre, (h, w)))
    steps = [(torch.randn(b, c, h, w, generator=g, dtype=torch.float64) * 2).requires_grad_(True) for _ in range(2)]
    weights = torch.randn(b, c, 16, 16, generator=g, dtype=torch.float64)

    def step(r: Render, resize: InputResize, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, loss = render(delta, r)
        y = resize(x)
        (grad,) = torch.autograd.grad((y * weights).sum() + loss.sum(), delta)
        return y.detach().clone(), grad.clone()

    shared_r, shared_resize = Render(x0, bound, n_valid, 10 ** -4.21), InputResize(a_h, a_w)
    first = step(shared_r, shared_resize, steps[0])
    for buffer in (shared_r._x, shared_r._g_pre, shared_r._g_delta,
                   *(t for _, at in shared_resize._axes for t in at._out.values())):
        buffer.fill_(float("nan"))  # what the first iteration left, made visible if it leaked
    second = step(shared_r, shared_resize, steps[1])
    for delta, got in zip(steps, (first, second)):
        fresh = step(Render(x0, bound, n_valid, 10 ** -4.21), InputResize(a_h, a_w), delta)
        assert torch.equal(got[0], fresh[0]) and torch.equal(got[1], fresh[1])
    assert not torch.equal(first[1], second[1])


@pytest.mark.parametrize("policy", ["square", "center-crop"])
@pytest.mark.parametrize("size", [(48, 64), (100, 37), (20, 20), (300, 200)])
def test_matrix_resize_matches_pil(policy, size):
    pre = Preprocessing(input_size=32, resize=policy)
    a = (np.random.default_rng(0).random((*size, 3)) * 255).astype(np.uint8)
    ref = pre.prepare(Image.fromarray(a)).astype(np.float32)
    a_h, a_w = (torch.from_numpy(m).float()[None] for m in input_matrices(*size, pre))
    x = torch.from_numpy(a).permute(2, 0, 1)[None].float()
    got = apply_resize(x, a_h, a_w)[0].permute(1, 2, 0).numpy()
    # PIL rounds to 8 bits after its block reduction and between its two passes; nothing more.
    assert np.abs(got - ref).max() <= 1.5 and np.abs(got - ref).mean() < 0.5


def test_padded_batch_resize_equals_single():
    pre = Preprocessing(input_size=16)
    sizes = [(40, 30), (25, 50)]
    imgs = [torch.rand(1, 3, h, w) for h, w in sizes]
    batch = torch.zeros(2, 3, 40, 50)
    for i, (h, w) in enumerate(sizes):
        batch[i, :, :h, :w] = imgs[i][0]
    a_h, a_w = batch_matrices(sizes, pre, (40, 50))
    together = apply_resize(batch, a_h, a_w)
    for i, (h, w) in enumerate(sizes):
        s_h, s_w = batch_matrices([(h, w)], pre, (h, w))
        assert torch.allclose(together[i], apply_resize(imgs[i], s_h, s_w)[0], atol=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 16, 64])
@pytest.mark.parametrize("policy", ["square", "center-crop"])
def test_banded_resize_equals_the_dense_product_and_its_gradient(rows, policy):
    """The block-by-block product skips only zero weights: values and input gradients are those of
    ``A_h · x · A_wᵀ``, for a padded batch of mixed sizes (a 3× block reduction and an upscale
    among them) and any block height (one that divides no axis, one larger than the output)."""
    pre = Preprocessing(input_size=24, resize=policy)
    sizes = [(97, 130), (120, 40), (18, 22)]
    a_h, a_w = batch_matrices(sizes, pre, (120, 130))
    x = torch.rand(3, 3, 120, 130, dtype=torch.float64, requires_grad=True)
    g = torch.rand(3, 3, 24, 24, dtype=torch.float64)
    a_h, a_w = a_h.double(), a_w.double()
    dense = torch.matmul(a_h.unsqueeze(1), torch.matmul(x, a_w.transpose(1, 2).unsqueeze(1)))
    (g_dense,) = torch.autograd.grad(dense, x, g)
    banded = InputResize(a_h, a_w, rows)(x)
    (g_banded,) = torch.autograd.grad(banded, x, g)
    assert banded.shape == dense.shape
    assert torch.allclose(banded, dense, atol=1e-12) and torch.allclose(g_banded, g_dense, atol=1e-12)
    assert g_banded[1, :, :, 40:].abs().max() == 0  # nothing flows into an image's padding


def test_banded_blocks_read_only_the_rows_they_need():
    pre = Preprocessing(input_size=160)
    a_h, _ = batch_matrices([(1024, 1024)], pre, (1024, 1024))
    band = Banded.of(a_h, 16)
    widths = [hi - lo for _, _, lo, hi in band.blocks]
    assert len(widths) == 10 and max(widths) < 1024 // 4  # a 6.4× reduction: ~110 of 1024 rows
    assert sum(widths) < 1.2 * 1024  # the blocks overlap only by the filter's support


# -- targets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", ["IVF4,PQ4x4", "PQ4x4", "OPQ4,IVF4,PQ4x4", "IVF4,Flat", "Flat", "HNSW8", "IVF4,SQ8"])
def test_reconstruction_target_is_the_stored_code(factory, train_vectors):
    index = build_index(factory, train_vectors.shape[1])
    index.train(train_vectors)
    x = train_vectors[:5]
    index.add_with_ids(x, np.arange(100, 105))
    t = compute_targets(index, x)
    stored = np.stack([index.reconstruct(100 + i) for i in range(5)])
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    assert np.allclose(t, stored, atol=1e-5)
    assert np.allclose(np.linalg.norm(t, axis=1), 1.0, atol=1e-5)


def test_centroid_target_and_refusals(train_vectors):
    ivf = build_index("IVF4,PQ4x4", train_vectors.shape[1])
    ivf.train(train_vectors)
    t = compute_targets(ivf, train_vectors[:3], "centroid")
    _, lists = faiss.extract_index_ivf(ivf).quantizer.search(train_vectors[:3], 1)
    cents = faiss.extract_index_ivf(ivf).quantizer.reconstruct_batch(lists[:, 0])
    assert np.allclose(t, cents / np.linalg.norm(cents, axis=1, keepdims=True), atol=1e-5)
    flat = build_index("Flat", train_vectors.shape[1])
    with pytest.raises(ActivationError, match="centroid.*needs an IVF index"):
        check_target_support(flat, "centroid")
    lsh = faiss.index_factory(train_vectors.shape[1], "LSH")
    lsh.train(train_vectors)
    with pytest.raises(ActivationError, match="binary codes"):
        compute_targets(lsh, train_vectors[:2])
    untrained = build_index("IVF4,PQ4x4", train_vectors.shape[1])
    with pytest.raises(ActivationError, match="not trained"):
        compute_targets(untrained, train_vectors[:2])


def test_the_auto_target_is_the_centroid_on_ivf_indexes_only(train_vectors):
    from activeindex.activation.targets import effective_target
    from activeindex.extractors import create_extractor

    d = train_vectors.shape[1]
    ivf, pq = build_index("IVF4,PQ4x4", d), build_index("PQ4x4", d)
    ivf.train(train_vectors)
    pq.train(train_vectors)
    assert effective_target(ivf, "auto").value == "centroid"
    assert effective_target(pq, "auto").value == "reconstruction"
    np.testing.assert_array_equal(compute_targets(ivf, train_vectors[:3], "auto"),
                                  compute_targets(ivf, train_vectors[:3], "centroid"))
    np.testing.assert_array_equal(compute_targets(pq, train_vectors[:3], "auto"),
                                  compute_targets(pq, train_vectors[:3], "reconstruction"))
    # Not a default (it costs copy-detection µAP, docs/activation-study.md): the paper's stays.
    assert "target" not in create_extractor("builtin").activation_defaults
    assert ActivationConfig().target.value == "reconstruction"


# -- the optimisation ------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["cosine", "mse"])
@pytest.mark.parametrize("target", ["reconstruction", "centroid"])
def test_activation_moves_descriptors_to_target(pq_coll, tiny_extractor, image_dir, loss, target):
    _, imgs = _images(image_dir, 6)
    x = _describe(tiny_extractor, imgs)
    t = compute_targets(pq_coll.index, x, target)
    cfg = ActivationConfig(loss=loss, target=target, stop_cos=None, psnr=36.0, **FP32)
    out = activate_batch(tiny_extractor, imgs, t, cfg)
    assert out.iterations_run == cfg.iterations
    assert (out.cos_after > out.cos_before).all()
    # The written file itself (rounded, decoded, described like any query) is closer to the target.
    files = [finalize(a, p, cfg.psnr, OutputFormat.PNG) for a, p in zip(imgs, out.perturbations)]
    released = [decode(f.data) for f in files]
    y = _describe(tiny_extractor, released)
    assert ((y * t).sum(1) > (x * t).sum(1)).mean() >= 5 / 6
    assert all(f.psnr >= 36.0 for f in files)


def test_batched_equals_per_image(pq_coll, tiny_extractor, image_dir):
    _, imgs = _images(image_dir, 3)
    imgs = [imgs[0], imgs[1][:40, :30], imgs[2][5:, :]]  # three different sizes in one batch
    t = compute_targets(pq_coll.index, _describe(tiny_extractor, imgs))
    cfg = ActivationConfig(stop_cos=None, iterations=5, **FP32)
    together = activate_batch(tiny_extractor, imgs, t, cfg)
    for i, a in enumerate(imgs):
        alone = activate_batch(tiny_extractor, [a], t[i : i + 1], cfg)
        assert together.perturbations[i].shape == a.shape
        assert np.abs(together.perturbations[i] - alone.perturbations[0]).max() < 2e-3
        assert abs(together.cos_after[i] - alone.cos_after[0]) < 1e-3


def test_early_stop_leaves_converged_images_alone(pq_coll, tiny_extractor, image_dir):
    _, imgs = _images(image_dir, 2)
    t = compute_targets(pq_coll.index, _describe(tiny_extractor, imgs))
    out = activate_batch(tiny_extractor, imgs, t, ActivationConfig(stop_cos=-1.0, **FP32))
    assert all(np.abs(p).max() == 0 for p in out.perturbations)  # already "deep enough": untouched
    assert out.iterations_run == CHECK_EVERY  # the loop ends at the first check


def test_early_stop_freezes_only_the_converged_images_of_a_batch(tiny_extractor, image_dir):
    """One image already at its target (its own descriptor), one far from it: the first is never
    moved (no gradient, no momentum) while the second is optimised as usual."""
    _, imgs = _images(image_dir, 2)
    x = _describe(tiny_extractor, imgs)
    t = np.stack([x[0], -x[1]]).astype(np.float32)
    out = activate_batch(tiny_extractor, imgs, t, ActivationConfig(stop_cos=0.99, iterations=4, **FP32))
    assert np.abs(out.perturbations[0]).max() == 0
    assert np.abs(out.perturbations[1]).max() > 0 and out.cos_after[1] > out.cos_before[1]


def test_robust_and_codec_aware_activation_run_within_budget(pq_coll, tiny_extractor, image_dir):
    _, imgs = _images(image_dir, 2)
    t = compute_targets(pq_coll.index, _describe(tiny_extractor, imgs))
    for cfg in (ActivationConfig(robust=True, views=2, iterations=3),
                ActivationConfig(robust=True, views=4, view_edits=ViewEdits.COLOUR, iterations=3),
                ActivationConfig(jpeg_quality=90, iterations=3)):
        out = activate_batch(tiny_extractor, imgs, t, cfg)
        assert np.isfinite(out.cos_after).all()
        for a, p in zip(imgs, out.perturbations):
            assert psnr(a, np.rint(np.clip(a / 255 + p, 0, 1) * 255).astype(np.uint8)) >= cfg.psnr - 0.2


def test_robust_views_add_to_the_unedited_view_instead_of_diluting_it(pq_coll, tiny_extractor, image_dir):
    """The unedited view keeps weight 1 whatever the views: with ``view_weight=0`` robust activation
    is plain activation (the views are computed and weigh nothing); with a weight they change it."""
    _, imgs = _images(image_dir, 2)
    t = compute_targets(pq_coll.index, _describe(tiny_extractor, imgs))
    plain = activate_batch(tiny_extractor, imgs, t, ActivationConfig(iterations=3, lr=0.1, **FP32))
    zero = activate_batch(tiny_extractor, imgs, t, ActivationConfig(robust=True, views=2, view_weight=0.0,
                                                                    iterations=3, lr=0.1, **FP32))
    heavy = activate_batch(tiny_extractor, imgs, t, ActivationConfig(robust=True, views=2, view_weight=3.0,
                                                                     iterations=3, lr=0.1, **FP32))
    for p, z, h in zip(plain.perturbations, zero.perturbations, heavy.perturbations):
        np.testing.assert_allclose(z, p, atol=1e-5)
        assert np.abs(h - p).max() > 1e-3


class _Detached(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 8)

    def forward(self, x):
        return self.lin(x.mean(dim=(2, 3))).detach()


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_model_without_gradients_is_refused(image_dir, precision):
    ex = Extractor(_Detached(), Preprocessing(input_size=16), {"kind": "test", "name": "detached"}, "0" * 64, precision=precision)
    _, imgs = _images(image_dir, 1)
    with pytest.raises(ActivationError, match="no usable gradient"):
        activate_batch(ex, imgs, np.ones((1, 8), np.float32) / 8**0.5, ActivationConfig())


def test_targets_of_the_wrong_dimension_are_refused(tiny_extractor, image_dir):
    _, imgs = _images(image_dir, 1)
    with pytest.raises(ActivationError, match="extractor gives 32-d"):
        activate_batch(tiny_extractor, imgs, np.ones((1, 5), np.float32), ActivationConfig())


# -- release files and add --activate --------------------------------------------------------------
@pytest.mark.parametrize("budget", [34.0, 42.0, 50.0])
def test_every_released_file_meets_the_budget_and_keeps_its_size(pq_coll, image_dir, tmp_path, budget):
    paths, imgs = _images(image_dir, 8)
    out = tmp_path / "released"
    report = add_activated(pq_coll, paths, out, ActivationConfig(psnr=budget, **FP32), batch_size=3)
    assert len(report.added) == 8 and not report.failures
    rows = dict(pq_coll.db.execute("SELECT name, psnr FROM images WHERE mode = 'activated'").fetchall())
    for path, original in zip(paths, imgs):
        written = np.asarray(Image.open(out / path.name).convert("RGB"))
        assert written.shape == original.shape
        measured = psnr(original, written)
        assert measured >= budget
        assert abs(rows[path.name] - measured) < 1e-6
    assert report.quality_summary()["psnr"]["min"] >= budget


def test_activated_copies_are_found(pq_coll, image_dir, tmp_path):
    paths, _ = _images(image_dir, 6)
    report = add_activated(pq_coll, paths, tmp_path / "r", ActivationConfig(**FP32))
    ids = dict((n, i) for i, n in report.added)

    def own_scores(queries):  # the query path end to end: file → descriptor → index score
        results, _ = pq_coll.query_images(queries, k=len(paths))
        return np.array([next(m.score for m in r.matches if m.id == ids[p.name]) for r, p in zip(results, paths)])

    # Released files score higher against their own stored code than the originals themselves —
    # except a file released unchanged because no activation of it stayed found first unedited
    # (on this tiny index, one of the six on an AVX2-only AMD EPYC): that one scores the same, and
    # the report says so.
    fix = {r.name: r.fix for r in report.released}
    kept = np.array([fix[p.name] == "original" for p in paths])
    assert kept.sum() <= 1, report.fixes()
    released, original = own_scores([tmp_path / "r" / p.name for p in paths]), own_scores(paths)
    assert (released[~kept] > original[~kept]).all()
    np.testing.assert_allclose(released[kept], original[kept], atol=1e-6)


@pytest.mark.parametrize(("fmt", "quality"), [("jpeg", 98), ("webp", 100)])
def test_jpeg_and_webp_releases_meet_budget_on_the_decoded_file(pq_coll, image_dir, tmp_path, fmt, quality):
    paths, imgs = _images(image_dir, 3)
    rep = add_activated(pq_coll, paths, tmp_path / "hi", ActivationConfig(psnr=36.0, iterations=2), fmt=fmt, quality=quality)
    assert len(rep.added) == 3
    ext = OutputFormat(fmt).extension
    for p, a in zip(paths, imgs):
        with Image.open(tmp_path / "hi" / (p.stem + ext)) as written:
            assert written.format == fmt.upper() and written.size == (a.shape[1], a.shape[0])
            assert psnr(a, np.asarray(written.convert("RGB"))) >= 36.0


def test_jpeg_release_fails_clearly_when_the_codec_alone_breaks_the_budget(pq_coll, image_dir, tmp_path):
    paths2, _ = _images(image_dir, 2, start=10)
    rep = add_activated(pq_coll, paths2, tmp_path / "lo", ActivationConfig(psnr=45.0, iterations=2), fmt="jpeg", quality=5)
    assert not rep.added and len(rep.failures) == 2
    assert "JPEG at quality 5 alone gives" in rep.failures[0].reason
    assert not list((tmp_path / "lo").glob("*.jpg"))  # nothing unbudgeted was written


def test_bad_destinations_are_refused_before_any_work(pq_coll, image_dir, tmp_path):
    paths, _ = _images(image_dir, 2)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / paths[0].name).write_bytes(paths[0].read_bytes())
    with pytest.raises(ActivationError, match="would both be released"):
        add_activated(pq_coll, [paths[0], tmp_path / "a" / paths[0].name], tmp_path / "out", ActivationConfig())
    with pytest.raises(ActivationError, match="overwrite an input"):
        add_activated(pq_coll, paths, image_dir, ActivationConfig())
    assert pq_coll.count() == 0
    # Another image under a released image's name must not replace its released file.
    add_activated(pq_coll, paths[:1], tmp_path / "out", ActivationConfig(iterations=1))
    before = (tmp_path / "out" / paths[0].name).read_bytes()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / paths[0].name).write_bytes(paths[1].read_bytes())
    with pytest.raises(ActivationError, match="already holds the released version"):
        add_activated(pq_coll, [tmp_path / "b" / paths[0].name], tmp_path / "out", ActivationConfig())
    assert (tmp_path / "out" / paths[0].name).read_bytes() == before and pq_coll.count() == 1


def test_killed_activation_resumes_consistently(pq_coll, image_dir, tmp_path, monkeypatch):
    paths, _ = _images(image_dir, 10)
    out = tmp_path / "released"
    real_mark = Collection._mark_indexed
    calls = {"n": 0}

    def dies_on_second_batch(self, ids):
        calls["n"] += 1
        if calls["n"] == 2:  # index written, rows still pending: the worst moment to be killed
            raise KeyboardInterrupt
        return real_mark(self, ids)

    monkeypatch.setattr(Collection, "_mark_indexed", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        add_activated(pq_coll, paths, out, ActivationConfig(iterations=2), batch_size=4)
    monkeypatch.setattr(Collection, "_mark_indexed", real_mark)
    root = pq_coll.root
    pq_coll.close()

    with Collection.open(root) as again:  # recovers the pending batch
        assert again.count() == 4
        report = add_activated(again, paths, out, ActivationConfig(iterations=2), batch_size=4)
        assert len(report.added) == 6 and len(report.duplicates) == 4
        ids = [r[0] for r in again.db.execute("SELECT id FROM images WHERE status = 'indexed'")]
        assert len(ids) == len(set(ids)) == 10 == again.index.ntotal
        released = {r[0] for r in again.db.execute("SELECT released FROM images")}
    files = sorted(out.iterdir())
    assert [f.name for f in files] == sorted(p.name for p in paths)  # one file each, no temp files
    assert released == {str(f.resolve()) for f in files}


def test_cli_add_activate(tmp_path, image_dir, train_vectors):
    runner = CliRunner()
    np.save(tmp_path / "xt.npy", train_vectors)
    coll = tmp_path / "c"
    r = runner.invoke(app, ["create", str(coll), "--model", "builtin:tiny", "--index", "IVF4,PQ4x4", "--train", str(tmp_path / "xt.npy")])
    assert r.exit_code == 0, r.output
    paths, _ = _images(image_dir, 3)
    r = runner.invoke(app, ["add", str(coll), *map(str, paths), "--activate", "--out", str(tmp_path / "rel"), "--json", "--iterations", "3"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert len(data["released"]) == 3 and data["quality"]["psnr"]["min"] >= 42.0
    mode = sqlite3.connect(coll / "meta.sqlite").execute("SELECT DISTINCT mode FROM images").fetchall()
    assert mode == [("activated",)]
    r = runner.invoke(app, ["add", str(coll), str(paths[0]), "--activate"])
    assert isinstance(r.exception, ActiveIndexError) and "--activate and --out go together" in str(r.exception)


def test_bf16_activation_is_refused_without_native_bf16(monkeypatch, tiny_extractor):
    import activeindex.activation.optimize as optimize

    monkeypatch.setattr(optimize, "native_bf16", lambda device: False)  # an AVX2-only CPU
    with pytest.raises(ActivationError, match="no native bf16"):
        optimize.gradient_precision(tiny_extractor, "bf16")
    assert optimize.gradient_precision(tiny_extractor, "fp32") == torch.float32


def test_images_over_the_activation_pixel_limit_are_refused_not_decoded(pq_coll, image_dir, tmp_path):
    from PIL import Image

    small, _ = _images(image_dir, 1)
    big = tmp_path / "big.png"
    Image.new("RGB", (100, 80), (10, 200, 30)).save(big)
    report = add_activated(pq_coll, [small[0], big], tmp_path / "out", ActivationConfig(iterations=1),
                           max_pixels=64 * 48)
    assert [n for _, n in report.added] == [small[0].name]
    assert len(report.failures) == 1 and report.failures[0].path == big
    assert "8000 pixels exceeds the limit of 3072" in report.failures[0].reason
    assert not (tmp_path / "out" / "big.png").exists()
