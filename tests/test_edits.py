"""Tests of activeindex.edits: the paper's 14 table edits, overlay onto screenshot, "auto", sweeps,
the AugLy compatibility layer, records and errors.

Images are tiny and seeded (128×96 and smaller); the whole module runs in seconds.
"""

from __future__ import annotations

import colorsys
import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image, features

import activeindex.edits as E
from activeindex.edits import assets, augly_compat
from activeindex.edits.auto_edit import PRIMITIVES, PlannedEdit
from activeindex.edits.base import Category, EditError, EditRecord, Source
from activeindex.errors import ActiveIndexError

W, H = 128, 96


def natural_image(width: int = W, height: int = H, seed: int = 0) -> Image.Image:
    """A photo-like test image: smooth colour regions (upsampled noise) plus fine grain."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 4, smooth.shape)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8), "RGB")


def grey_image(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(values.astype(np.uint8)[..., None], 3, axis=2), "RGB")


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float64)


def psnr(a: Image.Image, b: Image.Image) -> float:
    mse = np.mean((arr(a) - arr(b)) ** 2)
    return 10 * math.log10(255**2 / mse)


def laplacian_energy(img: Image.Image) -> float:
    """Mean squared 4-neighbour Laplacian: the image's high-frequency energy."""
    x = arr(img).mean(axis=2)
    lap = 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]
    return float(np.mean(lap**2))


@pytest.fixture(scope="module")
def img() -> Image.Image:
    return natural_image()


# -- the paper's table ---------------------------------------------------------------------------

TABLE = [
    # display name, registered edit, parameters the record must hold
    ("identity", "identity", {}),
    ("contrast 0.5", "contrast", {"factor": 0.5}),
    ("contrast 2.0", "contrast", {"factor": 2.0}),
    ("brightness 0.5", "brightness", {"factor": 0.5}),
    ("brightness 2.0", "brightness", {"factor": 2.0}),
    ("hue 0.2", "hue", {"factor": 0.2}),
    ("blur 11", "gaussian_blur", {"kernel_size": 11, "sigma": 2.0}),
    ("JPEG 50", "jpeg", {"quality": 50}),
    ("rotation 25", "rotate", {"degrees": 25.0}),
    ("rotation 90", "rotate", {"degrees": 90.0}),
    ("center crop 0.5", "center_crop", {"area": 0.5}),
    ("resize 0.5", "resize", {"area": 0.5}),
    ("meme format", "meme_format", {"text": "LOL", "font": "Raleway-ExtraBold.ttf",
                                    "caption_height": 250}),
    ("auto", "auto", {}),
]
SCREENSHOT = ("overlay onto screenshot", "overlay_onto_screenshot",
              {"template": "web.png", "crop_src_to_fit": False})


def expected_size(label: str, w: int, h: int) -> tuple[int, int] | None:
    """The output size each table edit must give for a w×h input (None: random, not checked)."""
    side = math.sqrt(0.5)
    if label == "rotation 90":
        return h, w
    if label == "rotation 25":
        a = math.radians(25)
        return round(w * math.cos(a) + h * math.sin(a)), round(w * math.sin(a) + h * math.cos(a))
    if label in ("center crop 0.5", "resize 0.5"):
        return int(w * side), int(h * side)
    if label == "meme format":
        return w, h + 250
    if label == "overlay onto screenshot":
        return 1200, 736  # the web template
    if label == "auto":
        return None
    return w, h


def test_paper_edits_are_the_14_table_edits_in_order():
    assert list(E.paper_edits()) == [label for label, _, _ in TABLE]
    assert [e.value for e in E.PaperEdit] == [label for label, _, _ in TABLE]
    assert list(E.paper_extra_edits()) == ["overlay onto screenshot"]


@pytest.mark.parametrize(("label", "name", "params"), [*TABLE, SCREENSHOT], ids=lambda v: str(v))
def test_table_edit_output_record_and_size(img, label, name, params):
    edit = {**E.paper_edits(), **E.paper_extra_edits()}[label]
    before = img.tobytes()
    result = edit(img, np.random.default_rng(7))

    out, rec = result.image, result.record
    assert out.mode == "RGB" and out is not img
    assert img.tobytes() == before, "an edit must not modify its input"
    assert rec.name == name
    assert params.items() <= dict(rec.params).items()
    assert rec.input_size == img.size and rec.output_size == out.size
    assert rec.changed == (label != "identity")
    size = expected_size(label, *img.size)
    if label == "rotation 25":  # Pillow rounds the expanded canvas outwards
        assert all(abs(a - b) <= 2 for a, b in zip(out.size, size))
    elif size is not None:
        assert out.size == size
    json.dumps(rec.to_dict())  # records are written next to every benchmark output


def test_identity_equals_input(img):
    assert E.identity(img).image.tobytes() == img.tobytes()


def test_brightness_2_doubles_a_mid_grey_image_clipped():
    values = np.random.default_rng(0).integers(40, 200, (48, 64))
    out = arr(E.brightness(grey_image(values), factor=2.0).image)[..., 0]
    np.testing.assert_array_equal(out, np.minimum(2 * values, 255))
    flat = arr(E.brightness(grey_image(np.full((8, 8), 100)), factor=2.0).image)
    assert flat.mean() == 200


def test_brightness_0_5_halves():
    values = np.random.default_rng(1).integers(0, 256, (48, 64))
    out = arr(E.brightness(grey_image(values), factor=0.5).image)[..., 0]
    assert np.abs(out - values / 2).max() <= 1


def test_contrast_0_5_halves_deviations_around_the_mean():
    values = np.random.default_rng(2).integers(60, 200, (48, 64)).astype(np.float64)
    out = arr(E.contrast(grey_image(values), factor=0.5).image)[..., 0]
    assert abs(out.mean() - values.mean()) <= 1
    assert out.std() == pytest.approx(values.std() / 2, rel=0.02)
    mean = round(values.mean())  # Pillow blends with the rounded mean grey level
    assert np.abs(out - (mean + 0.5 * (values - mean))).max() <= 1


def test_contrast_2_0_doubles_deviations_clipped():
    values = np.random.default_rng(3).integers(100, 156, (48, 64)).astype(np.float64)
    out = arr(E.contrast(grey_image(values), factor=2.0).image)[..., 0]
    mean = round(values.mean())
    assert np.abs(out - np.clip(mean + 2 * (values - mean), 0, 255)).max() <= 1


def test_hue_0_2_turns_pure_red_to_hue_0_2():
    out = E.hue(Image.new("RGB", (8, 8), (255, 0, 0)), factor=0.2).image
    assert out.getpixel((3, 3)) == (204, 255, 0)
    h, s, v = colorsys.rgb_to_hsv(*(c / 255 for c in out.getpixel((3, 3))))
    assert h == pytest.approx(0.2, abs=1 / 255) and s == 1 and v == 1


def test_hue_keeps_greys_and_wraps_negative_shifts():
    grey = grey_image(np.random.default_rng(4).integers(0, 256, (8, 8)))
    assert E.hue(grey, factor=0.3).image.tobytes() == grey.tobytes()
    red = Image.new("RGB", (4, 4), (255, 0, 0))
    h, _, _ = colorsys.rgb_to_hsv(*(c / 255 for c in E.hue(red, factor=-0.2).image.getpixel((0, 0))))
    assert h == pytest.approx(0.8, abs=2 / 255)  # -0.2 of a turn is +0.8


def test_jpeg_50_differs_with_a_sane_psnr(img):
    out = E.jpeg(img, quality=50).image
    assert out.tobytes() != img.tobytes()
    assert 25 < psnr(img, out) < 45
    assert psnr(img, E.jpeg(img, quality=10).image) < psnr(img, out)  # lower quality, more loss


def test_gaussian_blur_lowers_high_frequency_energy(img):
    out = E.gaussian_blur(img, kernel_size=11).image
    assert out.tobytes() != img.tobytes()
    assert laplacian_energy(out) < 0.1 * laplacian_energy(img)
    assert abs(arr(out).mean() - arr(img).mean()) < 1  # a normalised kernel keeps the mean


def test_gaussian_blur_matches_a_torch_reference(img):
    """torchvision's algorithm, rebuilt with torch: reflect padding, separable kernel, rounding."""
    torch = pytest.importorskip("torch")
    k, sigma = 11, 2.0
    x = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :]).expand(3, 1, k, k)
    t = torch.from_numpy(arr(img)).permute(2, 0, 1)[None]
    t = torch.nn.functional.pad(t, [k // 2] * 4, mode="reflect")
    ref = torch.nn.functional.conv2d(t, kernel, groups=3)[0].permute(1, 2, 0).round().numpy()
    ours = arr(E.gaussian_blur(img, kernel_size=k).image)
    assert np.abs(ours - ref).max() <= 1 and np.mean(ours != ref) < 0.01


def test_gaussian_blur_default_sigma_is_torchvision_s():
    assert E.gaussian_blur(natural_image(16, 16), kernel_size=11).record.params["sigma"] == 2.0
    assert E.gaussian_blur(natural_image(16, 16), kernel_size=3).record.params["sigma"] == 0.8


def test_rotation_90_is_a_counter_clockwise_quarter_turn(img):
    out = E.rotate(img, degrees=90).image
    np.testing.assert_array_equal(np.asarray(out), np.rot90(np.asarray(img)))


def test_rotation_25_expands_the_canvas_with_black_corners(img):
    out = np.asarray(E.rotate(img, degrees=25).image)
    assert out.shape[0] > img.height and out.shape[1] > img.width
    assert (out[0, 0] == 0).all() and (out[-1, -1] == 0).all()


def test_center_crop_keeps_the_centre(img):
    out = E.center_crop(img, area=0.5).image
    tw, th = out.size
    left, top = round((img.width - tw) / 2), round((img.height - th) / 2)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img)[top:top + th, left:left + tw])


def test_resize_keeps_the_picture(img):
    out = E.resize(img, area=0.5).image
    assert np.abs(arr(out).mean(axis=(0, 1)) - arr(img).mean(axis=(0, 1))).max() < 2


def test_meme_format_puts_the_image_under_a_captioned_band(img):
    out = np.asarray(E.meme_format(img).image)
    np.testing.assert_array_equal(out[250:], np.asarray(img))
    band = out[:250]
    dark = band.max(axis=2) < 128
    assert 0.005 < dark.mean() < 0.5 and (band[~dark] > 128).all()  # black text on white
    cols = np.flatnonzero(dark.any(axis=0))
    assert abs((cols[0] + cols[-1]) / 2 - img.width / 2) <= 3  # centred
    assert cols[0] >= 4 and cols[-1] <= img.width - 5  # within width - 10


def test_overlay_onto_screenshot_pastes_into_the_template(img):
    out = E.overlay_onto_screenshot(img).image
    template = Image.open(assets.template_path("web.png")).convert("RGB")
    assert out.size == template.size
    diff = np.any(np.asarray(out) != np.asarray(template), axis=2)
    ys, xs = np.nonzero(diff)
    assert diff.mean() > 0.05
    assert xs.min() >= 254 and xs.max() < 783 and ys.min() >= 424 and ys.max() < 710  # its box


# -- auto -----------------------------------------------------------------------------------------

RANGES = {  # what METHOD.md §2 allows for each primitive's parameters
    "brightness": {"factor": (0.1, 1.9)},
    "saturation": {"factor": (2.0, 5.0)},
    "overlay_emoji": {"emoji_size": (0.4, 0.8), "opacity": (0.5, 1.0), "x_pos": (0, 0.8),
                      "y_pos": (0, 0.8)},
    "overlay_text": {"font_size": (0.1, 0.3), "x_pos": (0, 0.6), "y_pos": (0, 0.6)},
    "blur": {"radius": (5, 10)},
    "palette": {"colors": (2, 16)},
    "jpeg": {"quality": (5, 25)},
    "pixelization": {"ratio": (0.2, 0.5)},
    "shuffle_pixels": {"factor": (0.1, 0.3)},
    "change_aspect_ratio": {"ratio": (0.5, 2.0)},
    "perspective_transform": {"sigma": (30, 60)},
    "rotate_crop": {"degrees": (-90, 90)},
}


def test_auto_plans_follow_the_paper_s_recipe():
    rng = np.random.default_rng(0)
    plans = [E.sample_auto_plan(rng) for _ in range(4000)]
    counts = Counter(len(p) for p in plans)
    for n, prob in zip((1, 2, 3, 4), E.N_EDITS_PROBS):
        assert counts[n] / len(plans) == pytest.approx(prob, abs=0.03)
    seen = set()
    for plan in plans:
        cats = [s.category for s in plan]
        assert len(set(cats)) == len(cats), "one primitive per family"
        names = [s.name for s in plan]
        if "crop" in names:
            assert names[0] == "crop"
        if "palette" in names:
            assert names[-1] == "palette"
        for step in plan:
            seen.add(step.name)
            assert step.category is E.get_edit(step.name).category
            for key, (lo, hi) in RANGES.get(step.name, {}).items():
                assert lo <= step.params[key] <= hi, (step.name, key)
            if step.name == "crop":
                p = step.params
                assert 0.3 <= p["x2"] - p["x1"] <= 0.6 and 0.3 <= p["y2"] - p["y1"] <= 0.6
                assert 0 <= p["x1"] and p["x2"] <= 1 and 0 <= p["y1"] and p["y2"] <= 1
            if step.name == "overlay_text":
                assert 5 <= len(step.params["text"]) <= 15
    assert seen == {p.name for p in PRIMITIVES}
    assert {p.category for p in PRIMITIVES} == set(Category)


@pytest.mark.parametrize("seed", range(6))
def test_auto_is_deterministic_per_seed_and_records_what_it_applied(img, seed):
    a = E.auto(img, rng=np.random.default_rng(seed))
    b = E.auto(img, rng=np.random.default_rng(seed))
    assert a.image.tobytes() == b.image.tobytes() and a.record == b.record
    rec = a.record
    assert rec.name == "auto" and 1 <= rec.params["n"] <= 4 and len(rec.steps) == rec.params["n"]
    cats = rec.params["categories"]
    assert len(set(cats)) == len(cats)
    assert list(cats) == [E.get_edit(s.name).category.value for s in rec.steps]
    names = [s.name for s in rec.steps]
    assert "crop" not in names[1:] and "palette" not in names[:-1]
    assert rec.steps[0].input_size == img.size and rec.steps[-1].output_size == a.image.size
    for prev, nxt in zip(rec.steps, rec.steps[1:]):
        assert prev.output_size == nxt.input_size
    # The record alone reproduces the output, also after a JSON round trip.
    again = E.replay(img, EditRecord.from_dict(json.loads(json.dumps(rec.to_dict()))))
    assert again.image.tobytes() == a.image.tobytes() and again.record == rec


def test_auto_differs_across_seeds(img):
    outs = {E.auto(img, rng=np.random.default_rng(s)).image.tobytes() for s in range(8)}
    assert len(outs) == 8


def test_auto_needs_a_generator(img):
    with pytest.raises(EditError, match="rng"):
        E.auto(img)


def test_auto_step_failure_raises_naming_the_step():
    tiny = natural_image(16, 16)
    plan = (
        PlannedEdit("grayscale", Category.COLOUR, {}),
        PlannedEdit("perspective_transform", Category.SPATIAL,
                    {"sigma": 60.0, "seed": 0, "crop_out_black_border": True}),
    )
    with pytest.raises(EditError, match="step 2 of 2, perspective_transform") as info:
        E.apply_auto_plan(tiny, plan)
    assert info.value.edit == "auto"
    assert isinstance(info.value.__cause__, EditError)


# -- every registered edit works here ------------------------------------------------------------

SAMPLE_PARAMS = {  # fixed parameters for the edits "auto" never draws
    "identity": {}, "contrast": {"factor": 0.5}, "hue": {"factor": 0.2},
    "gaussian_blur": {"kernel_size": 5}, "rotate": {"degrees": 30.0},
    "center_crop": {"area": 0.5}, "resize": {"area": 0.5}, "meme_format": {},
}


@pytest.mark.parametrize("name", sorted(set(E.EDITS) - {"auto"}))
def test_every_registered_edit_runs_and_changes_the_image(img, name):
    """Each AugLy function used, each compat replacement and each own edit works in this env."""
    info = E.get_edit(name)
    if name in SAMPLE_PARAMS:
        params = SAMPLE_PARAMS[name]
    else:
        params = next(p for p in PRIMITIVES if p.name == name).sample(np.random.default_rng(3))
    result = E.apply_edit(name, img, **params)
    assert result.image.mode == "RGB"
    assert result.record.name == name == info.fn.__name__
    assert result.record.changed == (name != "identity")
    assert result.record == E.replay(img, result.record).record


def test_registry_says_whose_code_runs_each_edit():
    by_source = {s: {n for n, i in E.EDITS.items() if i.source is s} for s in Source}
    assert by_source[Source.COMPAT] == {"meme_format", "perspective_transform", "overlay_text"}
    assert {"hue", "gaussian_blur", "rotate", "center_crop", "shuffle_pixels"} <= by_source[Source.OWN]
    assert {"jpeg", "contrast", "brightness", "overlay_onto_screenshot"} <= by_source[Source.AUGLY]
    assert E.get_edit("gaussian_blur").defaults == {"kernel_size": 11, "sigma": None}
    assert E.get_edit("contrast").required == ("factor",)


def test_palette_has_at_most_the_drawn_number_of_colours(img):
    out = np.asarray(E.palette(img, colors=5).image).reshape(-1, 3)
    assert 2 <= len(np.unique(out, axis=0)) <= 5


# -- sweeps ---------------------------------------------------------------------------------------

SWEEP_VALUES = {
    "rotation": ("degrees", [float(d) for d in range(-90, 91, 10)]),
    "center crop": ("area", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
    "resize": ("area", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]),
    "blur": ("kernel_size", list(range(3, 30, 2))),
    "JPEG": ("quality", list(range(10, 101, 10))),
    "contrast": ("factor", [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7,
                            1.8, 1.9]),
    "brightness": ("factor", [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7,
                              1.8, 1.9]),
    "hue": ("factor", [-0.5, -0.4, -0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3, 0.4, 0.5]),
}
# Exactly neutral points. "hue 0.0" is not: the 8-bit RGB → HSV → RGB round trip is lossy.
NEUTRAL = {"rotation 0", "center crop 1.0", "resize 1.0", "contrast 1.0", "brightness 1.0"}


def test_sweeps_enumerate_the_paper_s_values():
    sweeps = E.sweeps()
    assert list(sweeps) == list(SWEEP_VALUES)
    for family, (key, values) in SWEEP_VALUES.items():
        assert [e.params[key] for e in sweeps[family]] == values
        assert len({e.label for e in sweeps[family]}) == len(values)
    assert [e.label for e in sweeps["hue"]][5] == "hue 0.0"
    assert sweeps["blur"][4].params == {"kernel_size": 11, "sigma": 2.0}  # = the table's blur


def test_every_sweep_edit_applies_and_only_neutral_points_leave_the_image_unchanged():
    small = natural_image(32, 24, seed=5)
    for family in E.sweeps().values():
        for edit in family:
            result = edit(small)
            assert result.image.mode == "RGB"
            assert result.record.changed == (edit.label not in NEUTRAL), edit.label
            if edit.label == "hue 0.0":
                assert psnr(small, result.image) > 35


# -- failures are errors, never the unedited image -----------------------------------------------

@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("jpeg", {"quality": 101}),
        ("hue", {"factor": 0.7}),
        ("center_crop", {"area": 0.0}),
        ("gaussian_blur", {"kernel_size": 4}),
        ("crop", {"x1": 0.5, "y1": 0.0, "x2": 0.5, "y2": 1.0}),
        ("pad_square", {"color": (300, 0, 0)}),
        ("overlay_emoji", {"emoji": "no/such.png"}),
        ("overlay_text", {"text": [1, 2], "font": "NoSuchFont.ttf"}),
        ("overlay_onto_screenshot", {"template": "tablet.png"}),
        ("contrast", {"factor": 0.5, "strength": 2}),
        ("contrast", {}),
    ],
)
def test_bad_parameters_raise_edit_error_with_name_and_params(img, name, params):
    with pytest.raises(EditError) as info:
        E.apply_edit(name, img, **params)
    assert info.value.edit == name and isinstance(info.value, ActiveIndexError)
    assert name in str(info.value)


def test_badly_typed_or_unknown_parameters_raise_edit_error_on_direct_calls(img):
    with pytest.raises(EditError, match="contrast"):
        E.contrast(img, factor="strong")
    with pytest.raises(EditError, match="jpeg"):
        E.jpeg(img, quality=50, strength=1)
    with pytest.raises(EditError, match="overlay_text"):
        E.overlay_text(img, text=["a", "b"])
    # Every registered edit has that guard.
    assert all(hasattr(info.fn, "__wrapped__") for info in E.EDITS.values())


def test_a_library_failure_raises_edit_error_not_the_input(img, monkeypatch):
    functional = assets.augly_functional()

    def broken(*args, **kwargs):
        raise OSError("encoder exploded")

    monkeypatch.setattr(functional, "encoding_quality", broken)
    with pytest.raises(EditError, match="encoder exploded") as info:
        E.jpeg(img, quality=50)
    assert info.value.params == {"quality": 50}
    assert isinstance(info.value.__cause__, OSError)


def test_meme_that_cannot_fit_raises():
    with pytest.raises(EditError, match="does not fit"):
        E.meme_format(natural_image(4, 40))


def test_impossible_perspective_crop_raises():
    with pytest.raises(EditError, match="black-border-free"):
        E.perspective_transform(natural_image(16, 16), sigma=60.0, seed=0, crop_out_black_border=True)


def test_non_images_and_unknown_edits_raise():
    with pytest.raises(EditError, match="PIL.Image"):
        E.jpeg(np.zeros((8, 8, 3), np.uint8), quality=50)
    with pytest.raises(E.UnknownEditError, match="known edits") as info:
        E.get_edit("solarize")
    assert isinstance(info.value, KeyError)


def test_non_rgb_inputs_are_converted(img):
    out = E.jpeg(img.convert("L"), quality=50)
    assert out.image.mode == "RGB" and out.record.input_size == img.size


# -- the AugLy compatibility layer ---------------------------------------------------------------
# The "plain AugLy fails" tests are canaries: when a fixed AugLy makes one of them fail, delete the
# matching replacement in activeindex/edits/augly_compat.py.


def test_plain_augly_meme_format_fails_here(img):
    with pytest.raises(AttributeError, match="getsize_multiline"):
        assets.augly_functional().meme_format(img)


def test_plain_augly_perspective_transform_fails_here(img):
    with pytest.raises(AttributeError, match="float"):
        assets.augly_functional().perspective_transform(img, sigma=20.0)


# The 19 bundled fonts whose glyph list starts with "\r" (code point 13), which Raqm cannot lay out.
RAQM_FAILING_FONTS = (
    "OstrichSans-Black.ttf", "OstrichSans-Bold.ttf", "OstrichSans-Heavy.ttf",
    "OstrichSans-Light.ttf", "OstrichSans-Medium.ttf", "OstrichSansDashed-Medium.ttf",
    "OstrichSansRounded-Medium.ttf", "PlayfairDisplay-Black.ttf", "PlayfairDisplay-BlackItalic.ttf",
    "PlayfairDisplay-Bold.ttf", "PlayfairDisplay-BoldItalic.ttf", "PlayfairDisplay-Italic.ttf",
    "PlayfairDisplay-Regular.ttf", "PlayfairDisplaySC-Black.ttf", "PlayfairDisplaySC-BlackItalic.ttf",
    "PlayfairDisplaySC-Bold.ttf", "PlayfairDisplaySC-BoldItalic.ttf", "PlayfairDisplaySC-Italic.ttf",
    "PlayfairDisplaySC-Regular.ttf",
)


@pytest.mark.skipif(not features.check("raqm"), reason="the failure needs Pillow's Raqm layout")
def test_plain_augly_overlay_text_fails_on_a_carriage_return_glyph(img):
    font = "OstrichSans-Black.ttf"
    assert assets.font_glyphs(font)[0] == 13  # index 0 is "\r"
    with pytest.raises(RuntimeError, match="raqm"):
        assets.augly_functional().overlay_text(img, text=[0, 1, 2], font_file=assets.font_path(font))


@pytest.mark.parametrize("font", RAQM_FAILING_FONTS)
def test_compat_overlay_text_draws_every_glyph_list(font):
    small = natural_image(48, 32)
    result = E.overlay_text(small, text=[0, 1, 2, 3, 4, 5], font=font, font_size=0.3,
                            color=(255, 0, 255), x_pos=0.1, y_pos=0.1)
    assert result.record.changed


def test_compat_overlay_text_draws_where_asked(img):
    out = np.asarray(E.overlay_text(img, text=list(range(30, 40)), font="Raleway-ExtraBold.ttf",
                                    font_size=0.3, color=(255, 0, 255), x_pos=0.5,
                                    y_pos=0.4).image)
    ys, xs = np.nonzero(np.any(out != np.asarray(img), axis=2))
    assert xs.min() >= 0.5 * img.width - 2 and ys.min() >= 0.4 * img.height - 2


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # AugLy's np.matrix
@pytest.mark.parametrize("crop_out_black_border", [False, True])
def test_compat_perspective_matches_augly_with_np_float_restored(img, monkeypatch, crop_out_black_border):
    monkeypatch.setattr(np, "float", float, raising=False)  # what AugLy 1.0.0 expects of NumPy
    ref = assets.augly_functional().perspective_transform(
        img, sigma=8.0, seed=3, crop_out_black_border=crop_out_black_border
    )
    ours = augly_compat.perspective_transform(
        img, sigma=8.0, seed=3, crop_out_black_border=crop_out_black_border
    )
    assert ours.size == ref.size
    diff = np.abs(arr(ours) - arr(ref))
    assert diff.max() <= 1 and np.mean(diff > 0) < 0.01  # only least-squares vs solve rounding


def test_compat_meme_measures_text_like_old_pillow():
    font = augly_compat._truetype(assets.font_path("Raleway-ExtraBold.ttf"), 40)
    width, height = augly_compat.multiline_text_size(font, "LOL")
    # Pillow < 10: width of the widest line's box, height counted in lines of "A" plus spacing 4.
    assert (width, height) == (font.getbbox("LOL")[2], font.getbbox("A")[3])
    _, two_lines = augly_compat.multiline_text_size(font, "LOL\nLOL")
    assert two_lines == 2 * height + 4


def test_own_shuffle_matches_augly_without_touching_global_state(img):
    state = np.random.get_state()
    try:
        ref = assets.augly_functional().shuffle_pixels(img, factor=0.2, seed=10)
    finally:
        np.random.set_state(state)
    draws_before = np.random.get_state()[1].copy()
    ours = E.shuffle_pixels(img, factor=0.2, seed=10).image
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
    np.testing.assert_array_equal(np.random.get_state()[1], draws_before)


def test_importing_the_package_does_not_import_augly():
    code = "import sys, activeindex.edits; assert 'augly' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
