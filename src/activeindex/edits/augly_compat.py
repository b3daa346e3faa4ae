"""Replacements for the AugLy 1.0.0 image functions that fail with today's Pillow and NumPy.

AugLy 1.0.0 (the last release) is the DISC21 edit library, but three of the functions the paper's
experiment uses break in this environment (Pillow 13, NumPy 2):

=========================  ==================================================================
AugLy function             why it fails here
=========================  ==================================================================
``meme_format``            measures the caption with ``FreeTypeFont.getsize_multiline``,
                           removed in Pillow 10 → ``AttributeError``
``perspective_transform``  builds its least-squares system with ``np.float``, removed in
                           NumPy 1.24 → ``AttributeError``
``overlay_text``           19 of its 364 bundled fonts (OstrichSans*, PlayfairDisplay*) list
                           code point 13 (carriage return) as drawable; with Pillow's default
                           Raqm layout engine drawing it raises ``RuntimeError: raqm_layout()
                           failed``, so about one text overlay in ten with those fonts fails
=========================  ==================================================================

Each replacement here follows the AugLy function's documented behaviour (same parameters, same
geometry, same random draws for the same seed) with the broken call replaced; everything else
about the edit stays AugLy's. Text is laid out with Pillow's BASIC engine, which renders the fonts'
glyph lists without failing and gives the same pixels whether or not libraqm is installed. The
tests in ``tests/test_edits.py`` call the plain AugLy functions and expect them to fail: when a
fixed AugLy makes those tests fail, the corresponding replacement can be deleted.

These are image-in, image-out helpers; the recorded edits that use them live in
:mod:`activeindex.edits.overlay` and :mod:`activeindex.edits.spatial`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from activeindex.edits import assets

# Pillow's font layout engine for every text edit: BASIC needs no libraqm (identical pixels on
# every machine) and draws the control characters in AugLy's glyph lists (Raqm fails on them).
_LAYOUT = ImageFont.Layout.BASIC

# Pillow < 10 ``getsize_multiline`` default line spacing, which AugLy's meme layout relied on.
_LINE_SPACING = 4


def _truetype(font_file: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_file, size, layout_engine=_LAYOUT)


def multiline_text_size(font: ImageFont.FreeTypeFont, text: str) -> tuple[int, int]:
    """``(width, height)`` of ``text`` as Pillow < 10's ``getsize_multiline`` measured it.

    The old ``getsize(line)`` was the right and bottom edge of the line's box drawn at (0, 0)
    (the offset included), i.e. ``getbbox(line)[2:]`` today; lines were ``getsize("A")[1] + 4``
    pixels apart, and the last line's spacing was not counted.
    """
    lines = text.split("\n")
    width = max(font.getbbox(line)[2] for line in lines)
    line_height = font.getbbox("A")[3] + _LINE_SPACING
    return int(width), int(len(lines) * line_height - _LINE_SPACING)


def meme_format(
    image: Image.Image,
    *,
    text: str = "LOL",
    font_file: str,
    text_color: tuple[int, int, int] = (0, 0, 0),
    caption_height: int = 250,
    meme_bg_color: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """AugLy's ``meme_format``: the image under a ``caption_height``-pixel caption band.

    The font starts at ``caption_height - 10`` pixels and shrinks by 5 until the text fits within
    ``width - 10`` by ``caption_height - 10``; the text is centred in the band. Raises
    ``ValueError`` when no positive font size fits (an image a few pixels wide), where AugLy
    would loop into a Pillow error. AugLy's ``opacity`` is not offered: it drew on an RGB canvas,
    where the alpha of the fill is ignored, so it never had an effect.
    """
    if caption_height <= 10:
        raise ValueError(f"caption_height must be greater than 10, got {caption_height}")
    width, height = image.size
    font_size = caption_height - 10
    while True:
        if font_size <= 0:
            raise ValueError(f"caption {text!r} does not fit a {width}-pixel-wide meme at any size")
        font = _truetype(font_file, font_size)
        text_width, text_height = multiline_text_size(font, text)
        if text_width <= width - 10 and text_height <= caption_height - 10:
            break
        font_size -= 5

    meme = Image.new("RGB", (width, height + caption_height), meme_bg_color)
    meme.paste(image.convert("RGB"), (0, caption_height))
    x = round((width - text_width) / 2)
    y = round((caption_height - text_height) / 2)
    ImageDraw.Draw(meme).multiline_text(
        (x, y), text, font=font, fill=tuple(text_color), spacing=_LINE_SPACING, align="center"
    )
    return meme


def perspective_coeffs(
    src: Sequence[tuple[float, float]], dst: Sequence[tuple[float, float]]
) -> np.ndarray:
    """The 8 coefficients of PIL's ``PERSPECTIVE`` transform sending ``dst`` corners to ``src``.

    PIL maps each *output* pixel (x, y) to the input point
    ``((a x + b y + c) / (g x + h y + 1), (d x + e y + f) / (g x + h y + 1))``; four corner pairs
    give 8 linear equations in (a..h). AugLy solved them by normal equations with ``np.float``;
    the 8×8 system is square, so it is solved directly here.
    """
    rows, rhs = [], []
    for (sx, sy), (dx, dy) in zip(src, dst, strict=True):
        rows.append([dx, dy, 1.0, 0.0, 0.0, 0.0, -sx * dx, -sx * dy])
        rows.append([0.0, 0.0, 0.0, dx, dy, 1.0, -sy * dx, -sy * dy])
        rhs.extend([sx, sy])
    return np.linalg.solve(np.asarray(rows, dtype=np.float64), np.asarray(rhs, dtype=np.float64))


def perspective_transform(
    image: Image.Image,
    *,
    sigma: float = 50.0,
    dx: float = 0.0,
    dy: float = 0.0,
    seed: int = 42,
    crop_out_black_border: bool = False,
) -> Image.Image:
    """AugLy's ``perspective_transform``: a random homography, as if photographed off a screen.

    Each image corner moves to ``N(corner, sigma) + (dx, dy)``, drawn in AugLy's order (x then y,
    corners clockwise from the top left) from ``numpy.random.RandomState(seed)`` — a local
    generator, so the same seed gives AugLy's exact corners without touching global state.
    Bicubic resampling onto a same-size canvas. With ``crop_out_black_border`` the result is
    cropped to the largest axis-aligned box inside the moved corners; ``ValueError`` when the
    transform is so strong that no such box exists (AugLy raised a bare ``Exception``).
    """
    if sigma < 0:
        raise ValueError(f"sigma must be non-negative, got {sigma}")
    rs = np.random.RandomState(seed)
    width, height = image.size
    src = [(0.0, 0.0), (float(width), 0.0), (float(width), float(height)), (0.0, float(height))]
    dst = [(rs.normal(x, sigma) + dx, rs.normal(y, sigma) + dy) for x, y in src]
    coeffs = perspective_coeffs(src, dst)
    out = image.transform(
        (width, height),
        Image.Transform.PERSPECTIVE,
        tuple(float(c) for c in coeffs),
        Image.Resampling.BICUBIC,
    )
    if crop_out_black_border:
        top_left, top_right, bottom_right, bottom_left = dst
        left = max(0.0, top_left[0], bottom_left[0])
        right = min(float(width), top_right[0], bottom_right[0])
        top = max(0.0, top_left[1], top_right[1])
        bottom = min(float(height), bottom_left[1], bottom_right[1])
        if left >= right or top >= bottom:
            raise ValueError(
                f"no black-border-free crop exists for this perspective transform "
                f"(sigma={sigma} on a {width}x{height} image)"
            )
        out = out.crop((left, top, right, bottom))
    return out


def overlay_text(
    image: Image.Image,
    *,
    text: Sequence[int],
    font: str,
    font_size: float = 0.15,
    color: tuple[int, int, int] = (255, 0, 0),
    x_pos: float = 0.0,
    y_pos: float = 0.5,
) -> Image.Image:
    """AugLy's ``overlay_text`` for one line of text, with a layout that cannot fail on its glyphs.

    ``text`` holds indices into the font's glyph list (:func:`assets.font_glyphs`), taken modulo
    its length, as in AugLy; ``font`` is a bundled font name. The font is
    ``int(font_size * min(width, height))`` pixels; the text starts at
    ``(x_pos * width, y_pos * height)``. AugLy's ``opacity`` is not offered: it drew the fill's
    alpha into an RGBA copy and then dropped the alpha channel, so it never had an effect.
    """
    width, height = image.size
    size = int(min(width, height) * font_size)
    if size < 1:
        raise ValueError(
            f"font_size {font_size} gives a {size}-pixel font on a {width}x{height} image"
        )
    glyphs = assets.font_glyphs(font)
    line = "".join(chr(glyphs[int(c) % len(glyphs)]) for c in text)
    out = image.convert("RGB")  # always a new image (a copy when already RGB): never draw on the input
    ImageDraw.Draw(out).text(
        (x_pos * width, y_pos * height),
        line,
        fill=tuple(color),
        font=_truetype(assets.font_path(font), size),
    )
    return out
