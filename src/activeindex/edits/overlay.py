"""Overlay edits: meme format, overlay onto a screenshot, emoji and text overlays.

All use AugLy's bundled assets, named portably (see :mod:`activeindex.edits.assets`).
:func:`overlay_onto_screenshot` and :func:`overlay_emoji` are AugLy's as installed;
:func:`meme_format` and :func:`overlay_text` go through :mod:`activeindex.edits.augly_compat`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image

from activeindex.edits import assets, augly_compat
from activeindex.edits.assets import augly_functional
from activeindex.edits.base import EditResult, check, check_rgb_color, edit_function, run_edit

MEME_DEFAULT_FONT = "Raleway-ExtraBold.ttf"  # AugLy's meme default
TEXT_DEFAULT_FONT = "NotoNaskhArabic-Regular.ttf"  # AugLy's overlay_text default
EMOJI_DEFAULT = "smileys/smiling_face_with_heart_eyes.png"  # AugLy's overlay_emoji default


@edit_function
def meme_format(
    img: Image.Image,
    *,
    text: str = "LOL",
    font: str = MEME_DEFAULT_FONT,
    text_color: Sequence[int] = (0, 0, 0),
    caption_height: int = 250,
    bg_color: Sequence[int] = (255, 255, 255),
    rng: np.random.Generator | None = None,
) -> EditResult:
    """The image under a ``caption_height``-pixel caption band with centred ``text`` (AugLy
    ``meme_format``, through the compatibility layer). Output is ``(w, h + caption_height)``.

    Raises :class:`EditError` when the caption cannot fit (images a few pixels wide).
    """
    params = {
        "text": str(text),
        "font": str(font),
        "text_color": tuple(text_color),
        "caption_height": int(caption_height),
        "bg_color": tuple(bg_color),
    }
    fg = check_rgb_color("meme_format", params, text_color)
    bg = check_rgb_color("meme_format", params, bg_color)
    check(caption_height > 10, "meme_format", params, "caption_height must be greater than 10")
    return run_edit(
        "meme_format",
        params,
        img,
        lambda im: augly_compat.meme_format(
            im,
            text=str(text),
            font_file=assets.font_path(str(font)),
            text_color=fg,
            caption_height=int(caption_height),
            meme_bg_color=bg,
        ),
    )


def _onto_screenshot(im: Image.Image, template: str, crop_src_to_fit: bool) -> Image.Image:
    # AugLy opens its bboxes.json without closing it; the ResourceWarning is AugLy's, harmless,
    # and would otherwise show up once per call.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        return augly_functional().overlay_onto_screenshot(
            im,
            template_filepath=assets.template_path(template),
            template_bboxes_filepath=assets.template_bboxes_path(),
            crop_src_to_fit=crop_src_to_fit,
        )


@edit_function
def overlay_onto_screenshot(
    img: Image.Image,
    *,
    template: str = "web.png",
    crop_src_to_fit: bool = False,
    rng: np.random.Generator | None = None,
) -> EditResult:
    """Paste the image, scaled to fit, into a social-media screenshot template (AugLy
    ``overlay_onto_screenshot``). The output has the template's size (web: 1200×736, mobile:
    414×736). ``crop_src_to_fit`` crops rather than letterboxes when the aspect ratios differ."""
    params = {"template": str(template), "crop_src_to_fit": bool(crop_src_to_fit)}
    return run_edit(
        "overlay_onto_screenshot",
        params,
        img,
        lambda im: _onto_screenshot(im, str(template), bool(crop_src_to_fit)),
    )


@edit_function
def overlay_emoji(
    img: Image.Image,
    *,
    emoji: str = EMOJI_DEFAULT,
    opacity: float = 1.0,
    emoji_size: float = 0.15,
    x_pos: float = 0.4,
    y_pos: float = 0.8,
    rng: np.random.Generator | None = None,
) -> EditResult:
    """Paste an emoji ``emoji_size`` × image height tall with its top left at
    ``(x_pos * width, y_pos * height)`` and the given ``opacity`` (AugLy ``overlay_emoji``)."""
    params = {
        "emoji": str(emoji),
        "opacity": float(opacity),
        "emoji_size": float(emoji_size),
        "x_pos": float(x_pos),
        "y_pos": float(y_pos),
    }
    check(0 <= opacity <= 1 and 0 <= emoji_size <= 1 and 0 <= x_pos <= 1 and 0 <= y_pos <= 1,
          "overlay_emoji", params, "opacity, emoji_size, x_pos and y_pos must be in [0, 1]")
    return run_edit(
        "overlay_emoji",
        params,
        img,
        lambda im: augly_functional().overlay_emoji(
            im,
            emoji_path=assets.emoji_path(str(emoji)),
            opacity=float(opacity),
            emoji_size=float(emoji_size),
            x_pos=float(x_pos),
            y_pos=float(y_pos),
        ),
    )


@edit_function
def overlay_text(
    img: Image.Image,
    *,
    text: Sequence[int],
    font: str = TEXT_DEFAULT_FONT,
    font_size: float = 0.15,
    color: Sequence[int] = (255, 0, 0),
    x_pos: float = 0.0,
    y_pos: float = 0.5,
    rng: np.random.Generator | None = None,
) -> EditResult:
    """Draw one line of text: ``text`` indexes the font's glyph list (AugLy ``overlay_text``,
    through the compatibility layer). The font is ``font_size × min(width, height)`` pixels."""
    params = {
        "text": tuple(int(c) for c in text),
        "font": str(font),
        "font_size": float(font_size),
        "color": tuple(color),
        "x_pos": float(x_pos),
        "y_pos": float(y_pos),
    }
    rgb = check_rgb_color("overlay_text", params, color)
    check(len(params["text"]) > 0, "overlay_text", params, "text must not be empty")
    check(0 <= font_size <= 1 and 0 <= x_pos <= 1 and 0 <= y_pos <= 1, "overlay_text", params,
          "font_size, x_pos and y_pos must be in [0, 1]")
    return run_edit(
        "overlay_text",
        params,
        img,
        lambda im: augly_compat.overlay_text(
            im,
            text=params["text"],
            font=str(font),
            font_size=float(font_size),
            color=rgb,
            x_pos=float(x_pos),
            y_pos=float(y_pos),
        ),
    )
