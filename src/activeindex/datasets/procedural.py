"""Procedural image primitives: palettes, 1/f noise, textures, dead leaves, strokes, text, gradients.

Every function takes the ``numpy.random.Generator`` it draws from, so an image is a pure function of
that generator's seed. Pixel arrays are ``float32 [H, W, 3]`` in 0..1 (cheap to blend); strokes and
text are drawn with Pillow on ``uint8`` RGB images. Sizes are ``(width, height)`` like Pillow's, and
lengths are drawn relative to ``min(width, height)`` so any output size gives a similar image.

Random numbers are drawn in vectorised blocks before the Python loops that draw: a 256-px image
must cost a few milliseconds (the source has to sustain ≥ 50 images/s on one core).
"""

from __future__ import annotations

import functools
import math
import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from activeindex.datasets.photos import Photo, photo_fragment

Size = tuple[int, int]


# -- colour --------------------------------------------------------------------------------------------
def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """``[..., 3]`` HSV in 0..1 → RGB in 0..1 (vectorised)."""
    h, s, v = hsv[..., 0] * 6.0, hsv[..., 1], hsv[..., 2]
    i = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = np.stack([np.stack(c, -1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))])
    return np.take_along_axis(table, i[None, ..., None].repeat(3, -1), 0)[0].astype(np.float32)


def random_palette(rng: np.random.Generator, k: int) -> np.ndarray:
    """``k`` colours, ``float32 [k, 3]``, following one of a few colour schemes.

    A per-image palette makes an image's colours coherent (as in real scenes and designs) while the
    schemes (near-grey, monochrome, analogous, complementary, random) make images differ from each
    other in colour statistics, which a copy detector must not rely on alone.
    """
    scheme = int(rng.integers(5))
    h0 = rng.random()
    spread = (0.03, 0.03, 0.1, 0.1, 0.5)[scheme]
    hue = h0 + rng.uniform(-spread, spread, k)
    if scheme == 3:  # complementary: half the colours on the opposite hue
        hue = hue + 0.5 * (rng.random(k) < 0.5)
    sat = rng.random(k) ** rng.uniform(0.4, 2.0)
    if scheme == 0:
        sat = sat * 0.12  # near-grey
    val = rng.uniform(0.04, 1.0, k) ** rng.uniform(0.5, 1.2)
    return hsv_to_rgb(np.stack([hue % 1.0, sat, val], -1))


def pick(rng: np.random.Generator, palette: np.ndarray, jitter: float = 0.06) -> np.ndarray:
    """A palette colour with a little noise, ``float32 [3]``."""
    c = palette[int(rng.integers(len(palette)))] + rng.normal(0.0, jitter, 3)
    return np.clip(c, 0.0, 1.0).astype(np.float32)


def ramp_lut(rng: np.random.Generator, palette: np.ndarray, stops: int) -> np.ndarray:
    """A 256-entry colour ramp through ``stops`` palette colours: ``float32 [256, 3]``."""
    cols = np.stack([pick(rng, palette) for _ in range(stops)])
    t = np.linspace(0.0, 1.0, 256, dtype=np.float32)
    at = np.sort(rng.uniform(0, 1, stops)).astype(np.float32)
    at[0], at[-1] = 0.0, 1.0
    return np.stack([np.interp(t, at, cols[:, c]) for c in range(3)], -1).astype(np.float32)


def apply_lut(t: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map ``t`` in 0..1 (``[H, W]``) through a ``[256, 3]`` ramp → ``[H, W, 3]``."""
    return lut[np.clip(t * 255.0, 0, 255).astype(np.uint8)]


def to_uint8(x: np.ndarray) -> np.ndarray:
    """``float32`` 0..1 → ``uint8`` 0..255 (rounded, clipped)."""
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


# -- 1/f noise -----------------------------------------------------------------------------------------
def spectral_noise(
    rng: np.random.Generator,
    size: Size,
    alpha: float,
    channels: int = 1,
    anisotropy: float = 1.0,
    angle: float = 0.0,
) -> np.ndarray:
    """Coloured noise with power spectrum ∝ 1/f^alpha: ``float32 [H, W, channels]``, zero mean, unit std.

    alpha ≈ 2 is the spectrum of natural images; 1 is rougher, 3 is cloud-like. ``anisotropy`` > 1
    stretches the texture along ``angle`` (wood, brushed metal, streaks). The spectrum is drawn
    directly (complex Gaussian × amplitude), which saves the forward FFT of white noise.
    """
    w, h = size
    fy = np.fft.fftfreq(h).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(w).astype(np.float32)[None, :]
    c, s = math.cos(angle), math.sin(angle)
    u, v = fx * c + fy * s, fy * c - fx * s
    f2 = (u * anisotropy) ** 2 + (v / anisotropy) ** 2
    f2[0, 0] = 1.0
    amp = f2 ** np.float32(-alpha / 4.0)  # amplitude = power^(1/2) = f^(-alpha/2)
    amp[0, 0] = 0.0  # no DC: the caller sets the mean
    shape = (channels, h, w // 2 + 1)
    spec = rng.standard_normal(shape, dtype=np.float32) + 1j * rng.standard_normal(shape, dtype=np.float32)
    x = np.fft.irfft2(spec * amp, s=(h, w)).astype(np.float32)
    x -= x.mean(axis=(1, 2), keepdims=True)
    x /= x.std(axis=(1, 2), keepdims=True) + 1e-8
    return np.ascontiguousarray(x.transpose(1, 2, 0))


def noise_image(rng: np.random.Generator, size: Size, palette: np.ndarray) -> np.ndarray:
    """The ``SPECTRAL_NOISE`` family: 1/f^α noise rendered one of three ways, ``float32 [H, W, 3]``.

    * colour — three fields mixed by a random colour matrix (clouds, marble, camouflage blur);
    * ramp — one field through a palette ramp, sometimes posterised into flat level sets (maps,
      camouflage), whose sharp contours give a descriptor something to lock on;
    * ridged — 1 − |field| through a ramp (veins, lightning, cracks).
    """
    mode = int(rng.integers(3))
    # α < 1.5 is mostly fine-grained noise: flat once downscaled, so a poor image to find copies of.
    alpha = rng.uniform(1.5, 3.2)
    anis = float(np.exp(rng.normal(0.0, 0.5))) if rng.random() < 0.4 else 1.0
    angle = rng.uniform(0, math.pi)
    if mode == 0:
        f = spectral_noise(rng, size, alpha, 3, anis, angle)
        mix = rng.normal(0.0, 1.0, (3, 3)).astype(np.float32)
        mix /= np.linalg.norm(mix, axis=0, keepdims=True) + 1e-6
        return np.clip(pick(rng, palette, 0.1) + f @ (mix * np.float32(rng.uniform(0.12, 0.3))), 0, 1)
    f = spectral_noise(rng, size, alpha, 1, anis, angle)[..., 0]
    if mode == 1:
        t = 0.5 + 0.5 * np.tanh(f * np.float32(rng.uniform(0.4, 1.2)))
        if alpha > 2.0 and rng.random() < 0.6:  # at low α, level sets would be salt-and-pepper
            levels = int(rng.integers(3, 9))
            t = np.floor(t * levels) / (levels - 1)
    else:
        t = np.clip(1.0 - np.abs(f) * np.float32(rng.uniform(0.4, 1.0)), 0, 1) ** np.float32(rng.uniform(1, 6))
    return apply_lut(t, ramp_lut(rng, palette, int(rng.integers(2, 6))))


# -- smooth fields -------------------------------------------------------------------------------------
def gradient_image(rng: np.random.Generator, size: Size, palette: np.ndarray) -> np.ndarray:
    """The ``GRADIENT`` family's base: a bicubic colour grid plus a linear and/or radial ramp.

    The grid (3–7 nodes a side) gives each image enough degrees of freedom that two smooth images
    are not near-duplicates of each other; ramps give the long directional gradients of skies,
    studio backdrops and vignettes.
    """
    w, h = size
    kx, ky = int(rng.integers(3, 8)), int(rng.integers(3, 8))
    grid = np.stack([pick(rng, palette, 0.15) for _ in range(kx * ky)]).reshape(ky, kx, 3)
    x = np.asarray(Image.fromarray(to_uint8(grid)).resize((w, h), Image.BICUBIC), np.float32) / 255.0
    yy, xx = _unit_grid(size)
    if rng.random() < 0.6:
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
        c0, c1 = pick(rng, palette), pick(rng, palette)
        wgt = np.float32(rng.uniform(0.3, 0.8))
        x = x * (1 - wgt) + wgt * (c0 + t[..., None] * (c1 - c0))
    if rng.random() < 0.5:
        cy, cx = rng.uniform(-0.2, 1.2, 2) * (yy.max(), xx.max())
        t = np.clip(np.hypot(yy - cy, xx - cx) / rng.uniform(0.2, 1.2), 0, 1)[..., None]
        # A radial glow: the centre colour fades into the field (1 - t is 1 at the centre).
        x = x + np.float32(rng.uniform(0.4, 1.0)) * (1 - t) * (pick(rng, palette) - x)
    return np.clip(x, 0, 1).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _unit_grid(size: Size) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in units of ``min(w, h)``: ``(yy [H, 1], xx [1, W])`` (broadcastable)."""
    w, h = size
    s = float(min(w, h))
    yy = ((np.arange(h, dtype=np.float32) + 0.5) / s)[:, None]
    xx = ((np.arange(w, dtype=np.float32) + 0.5) / s)[None, :]
    return yy, xx


def background(rng: np.random.Generator, size: Size, palette: np.ndarray) -> np.ndarray:
    """A backdrop for strokes and text: flat, smooth gradient, or low-contrast noise (paper, wall)."""
    w, h = size
    kind = int(rng.integers(3))
    if kind == 0:
        return np.broadcast_to(pick(rng, palette), (h, w, 3)).copy()
    if kind == 1:
        return gradient_image(rng, size, palette)
    f = spectral_noise(rng, size, rng.uniform(1.0, 2.5))
    return np.clip(pick(rng, palette) + f * np.float32(rng.uniform(0.02, 0.1)), 0, 1)


# -- textures for shapes -------------------------------------------------------------------------------
FLAT, LINEAR, GRATING, NOISE, PHOTO = range(5)


class _NoiseBank:
    """Two full-image 1/f fields that shapes sample at random (wrapped) offsets, so textured shapes
    cost an indexing operation instead of an FFT each. Built on first use (from its own seed, so the
    caller's generator does not depend on whether a NOISE texture came up)."""

    def __init__(self, rng: np.random.Generator, size: Size) -> None:
        self._seed = int(rng.integers(2**63))
        self._size = size
        self._fields: list[np.ndarray] | None = None

    def crop(self, rng: np.random.Generator, hh: int, ww: int) -> np.ndarray:
        if self._fields is None:
            own = np.random.default_rng(self._seed)
            alphas = (own.uniform(1.0, 1.8), own.uniform(1.8, 3.0))
            self._fields = [spectral_noise(own, self._size, a)[..., 0] for a in alphas]
        f = self._fields[int(rng.integers(2))]
        h, w = f.shape
        ys = (np.arange(hh) + int(rng.integers(h))) % h
        xs = (np.arange(ww) + int(rng.integers(w))) % w
        return f[ys[:, None], xs[None, :]]


def texture(
    kind: int,
    rng: np.random.Generator,
    hh: int,
    ww: int,
    palette: np.ndarray,
    bank: _NoiseBank,
    photos: tuple[Photo, ...] = (),
) -> np.ndarray:
    """An ``hh × ww`` patch of texture ``kind``: ``float32 [hh, ww, 3]`` (FLAT returns ``[3]``)."""
    c0 = pick(rng, palette)
    if kind == FLAT:
        return c0
    if kind == PHOTO:
        return photo_fragment(photos, rng, (ww, hh))
    c1 = pick(rng, palette)
    if kind == NOISE:
        t = 0.5 + 0.5 * np.tanh(bank.crop(rng, hh, ww) * np.float32(rng.uniform(0.3, 1.0)))
    else:
        a = rng.uniform(0, 2 * math.pi)
        yy = np.arange(hh, dtype=np.float32)[:, None]
        xx = np.arange(ww, dtype=np.float32)[None, :]
        d = xx * np.float32(math.cos(a)) + yy * np.float32(math.sin(a))
        if kind == LINEAR:
            t = (d - d.min()) / (d.max() - d.min() + 1e-6)
        else:  # GRATING: sine or square wave, period 3 px .. the shape's size
            period = float(np.exp(rng.uniform(math.log(3.0), math.log(max(4.0, max(hh, ww))))))
            t = 0.5 + 0.5 * np.sin(d * np.float32(2 * math.pi / period) + np.float32(rng.uniform(0, 6.3)))
            if rng.random() < 0.5:
                t = (t > 0.5).astype(np.float32)
    return c0 + t[..., None] * (c1 - c0)


# -- dead leaves ---------------------------------------------------------------------------------------
def power_law(rng: np.random.Generator, n: int, lo: float, hi: float, exponent: float) -> np.ndarray:
    """``n`` samples with density ∝ r^-exponent on [lo, hi] (inverse CDF; exponent > 1).

    Exponent 3 makes the dead-leaves model scale-invariant, like natural images: as many small
    occluders per unit area at each scale.
    """
    a = 1.0 - exponent
    u = rng.random(n)
    return (lo**a + u * (hi**a - lo**a)) ** (1.0 / a)


def dead_leaves(
    rng: np.random.Generator,
    size: Size,
    palette: np.ndarray,
    *,
    n: int,
    radius: tuple[float, float],
    exponent: float,
    texture_p: tuple[float, float, float, float, float],
    photos: tuple[Photo, ...] = (),
    base: np.ndarray | None = None,
) -> np.ndarray:
    """The occlusion (dead-leaves) model: ``n`` random shapes stacked in order, each hiding the ones
    below it. ``float32 [H, W, 3]``.

    Shapes are discs/ellipses, rotated rectangles and random star-shaped polygons, with radii (in
    units of ``min(w, h)``) drawn from a power law on ``radius``; each is filled with a texture drawn
    with probabilities ``texture_p`` over (FLAT, LINEAR, GRATING, NOISE, PHOTO). With ``base`` the
    shapes are laid over it (an overlay), otherwise over a textured background.

    The shapes' ids are drawn into an integer label map with Pillow, and then each *visible* shape's
    texture is computed on its bounding box only: cost ∝ visible area, not ∝ n × image area.
    """
    w, h = size
    s = min(w, h)
    # Radii below 1.5 px would be sub-pixel specks (small outputs): clamp the range's lower end there.
    lo = max(radius[0], 1.5 / s)
    r = power_law(rng, n, lo, max(radius[1], 2 * lo), exponent) * s
    cx = rng.uniform(-0.1, 1.1, n) * w
    cy = rng.uniform(-0.1, 1.1, n) * h
    kind = rng.choice(3, size=n, p=(0.45, 0.3, 0.25))
    aspect = np.exp(rng.normal(0.0, 0.45, n))
    angle = rng.uniform(0, math.pi, n)
    tex = rng.choice(5, size=n, p=texture_p)
    label = Image.new("I", (w, h), 0)
    draw = ImageDraw.Draw(label)
    boxes = [(0, 0, h, w)]
    for k in range(n):
        rx, ry = float(r[k] * aspect[k] ** 0.5), float(r[k] / aspect[k] ** 0.5)
        x0, y0 = float(cx[k]), float(cy[k])
        if kind[k] == 0:
            draw.ellipse((x0 - rx, y0 - ry, x0 + rx, y0 + ry), fill=k + 1)
        else:
            if kind[k] == 1:
                th = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
                rad = np.full(4, math.sqrt(2.0))
            else:
                m = int(rng.integers(3, 9))
                th = np.sort(rng.uniform(0, 2 * math.pi, m))
                rad = rng.uniform(0.4, 1.0, m)
            px, py = rad * np.cos(th) * rx, rad * np.sin(th) * ry
            c, si = math.cos(angle[k]), math.sin(angle[k])
            pts = np.stack([x0 + px * c - py * si, y0 + px * si + py * c], 1)
            draw.polygon([tuple(p) for p in pts.tolist()], fill=k + 1)
        ext = max(rx, ry) * 1.5 + 1
        top, left = max(0, int(y0 - ext)), max(0, int(x0 - ext))
        boxes.append((top, left, min(h, int(y0 + ext) + 1), min(w, int(x0 + ext) + 1)))
    lab = np.asarray(label)
    bank = _NoiseBank(rng, size)
    if base is None:
        out = texture(int(rng.choice([LINEAR, NOISE])), rng, h, w, palette, bank).astype(np.float32)
    else:
        out = base.copy()
    if not photos:
        tex = np.where(tex == PHOTO, NOISE, tex)
    for k in range(1, n + 1):
        y0, x0, y1, x1 = boxes[k]
        if y1 <= y0 or x1 <= x0:
            continue
        m = lab[y0:y1, x0:x1] == k
        if not m.any():
            continue  # entirely hidden by later shapes (or off-image)
        patch = texture(int(tex[k - 1]), rng, y1 - y0, x1 - x0, palette, bank, photos)
        region = out[y0:y1, x0:x1]
        region[m] = patch if patch.ndim == 1 else patch[m]
    return out


# -- strokes -------------------------------------------------------------------------------------------
def _bezier(p: np.ndarray, m: int) -> np.ndarray:
    """``m`` points of the cubic Bézier curve with control points ``p [4, 2]``."""
    t = np.linspace(0.0, 1.0, m)[:, None]
    return (1 - t) ** 3 * p[0] + 3 * (1 - t) ** 2 * t * p[1] + 3 * (1 - t) * t**2 * p[2] + t**3 * p[3]


def draw_strokes(img: Image.Image, rng: np.random.Generator, palette: np.ndarray, n: int) -> None:
    """Draw ``n`` strokes on ``img`` (RGB, in place): straight polylines, cubic Bézier curves, and
    outlined ellipses/rectangles, with widths from a power law (hairlines to bold marker strokes)."""
    w, h = img.size
    s = min(w, h)
    draw = ImageDraw.Draw(img)
    kind = rng.choice(4, size=n, p=(0.3, 0.4, 0.15, 0.15))
    width = np.maximum(1, power_law(rng, n, 0.004, 0.08, 2.0) * s).astype(int)
    for k in range(n):
        colour = tuple(int(v) for v in to_uint8(pick(rng, palette, 0.1)))
        if kind[k] <= 1:
            if kind[k] == 0:
                pts = rng.uniform(-0.1, 1.1, (int(rng.integers(2, 6)), 2)) * (w, h)
            else:
                c0 = rng.uniform(0, 1, 2) * (w, h)
                pts = _bezier(c0 + rng.normal(0, 0.35, (4, 2)) * s, max(8, s // 8))
            draw.line([tuple(p) for p in pts.tolist()], fill=colour, width=int(width[k]), joint="curve")
        else:
            cx, cy = rng.uniform(0, 1, 2) * (w, h)
            rx, ry = rng.uniform(0.03, 0.4, 2) * s
            box = (float(cx - rx), float(cy - ry), float(cx + rx), float(cy + ry))
            if kind[k] == 2:
                draw.ellipse(box, outline=colour, width=int(width[k]))
            else:
                draw.rectangle(box, outline=colour, width=int(width[k]))


# -- text ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` px (FreeType build; the bitmap font otherwise)."""
    return ImageFont.load_default(size=size)


_CHARS = string.ascii_letters + string.digits + "     .,:;!?-'&@#%()"


def _glyph_alphabet(rng: np.random.Generator, k: int) -> list[list[np.ndarray]]:
    """``k`` invented glyphs, each 1–3 strokes between points of a 3×3 lattice in the unit box: a fake
    script, so text marks are not all Latin letters in one typeface."""
    lattice = np.array([(x, y) for y in (0.0, 0.5, 1.0) for x in (0.0, 0.5, 1.0)])
    glyphs = []
    for _ in range(k):
        strokes = []
        for _ in range(int(rng.integers(1, 4))):
            strokes.append(lattice[rng.choice(9, size=int(rng.integers(2, 4)), replace=False)])
        glyphs.append(strokes)
    return glyphs


def draw_text(img: Image.Image, rng: np.random.Generator, palette: np.ndarray, lines: int) -> None:
    """Draw ``lines`` lines of text-like marks on ``img`` (RGB, in place).

    Each line is random letters/words in Pillow's built-in font or words of an invented glyph
    alphabet, at a random size, colour and position; some lines are rotated (drawn on a mask layer,
    rotated, then pasted), as in captions, signs, watermarks and scanned pages.
    """
    w, h = img.size
    s = min(w, h)
    draw = ImageDraw.Draw(img)
    glyphs = _glyph_alphabet(rng, 24)
    for _ in range(lines):
        fsize = max(6, int(float(np.exp(rng.uniform(math.log(0.04), math.log(0.22)))) * s))
        colour = tuple(int(v) for v in to_uint8(pick(rng, palette, 0.1)))
        x0, y0 = float(rng.uniform(-0.1, 0.8) * w), float(rng.uniform(-0.05, 0.95) * h)
        rotate = rng.random() < 0.25
        if rotate:
            layer = Image.new("L", (w, fsize * 2), 0)
            target, ox, oy = ImageDraw.Draw(layer), 0.0, fsize * 0.4
        else:
            target, ox, oy = draw, x0, y0
        fill = 255 if rotate else colour
        if rng.random() < 0.6:
            n = int(rng.integers(3, 30))
            text = "".join(_CHARS[i] for i in rng.integers(0, len(_CHARS), n))
            if rng.random() < 0.3:
                text = text.upper()
            target.text((ox, oy), text, font=_font(fsize), fill=fill)
        else:
            width = max(1, fsize // 9)
            x = ox
            for g in rng.integers(0, len(glyphs), int(rng.integers(3, 20))):
                if rng.random() < 0.15:  # a space between words
                    x += fsize * 0.6
                    continue
                for stroke in glyphs[g]:
                    pts = stroke * (fsize * 0.55, fsize * 0.8) + (x, oy)
                    target.line([tuple(p) for p in pts.tolist()], fill=fill, width=width, joint="curve")
                x += fsize * 0.75
        if rotate:
            layer = layer.rotate(float(rng.uniform(-90, 90)), expand=True, resample=Image.BILINEAR)
            img.paste(colour, (int(x0), int(y0 - layer.height / 2)), layer)


# -- contrast ------------------------------------------------------------------------------------------
def ensure_contrast(x: np.ndarray, target: float = 0.08, max_gain: float = 4.0) -> np.ndarray:
    """Stretch ``x`` (``float32 [H, W, 3]``) around its mean when its coarse structure is faint.

    The measure is the std of the luma of 16×16-pixel block means (what a thumbnail or a descriptor
    at low resolution sees); below ``target`` the image is scaled up by at most ``max_gain``. Near-flat
    images carry nothing a copy detector could recognise, and they all look alike.
    """
    h, w = x.shape[:2]
    b = max(1, min(h, w) // 16)
    luma = x[: h - h % b, : w - w % b] @ np.array([0.299, 0.587, 0.114], np.float32)
    std = float(luma.reshape(h // b, b, w // b, b).mean(axis=(1, 3)).std())
    if std >= target:
        return x
    gain = np.float32(min(max_gain, target / max(std, 1e-4)))
    mean = x.mean(axis=(0, 1))
    return np.clip((x - mean) * gain + mean, 0.0, 1.0)


# -- lighting ------------------------------------------------------------------------------------------
def shade(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Multiply ``x`` (``float32 [H, W, 3]``) by a smooth illumination field: a directional ramp, a
    vignette/spotlight, or low-frequency 1/f noise (uneven lighting, shadows)."""
    h, w = x.shape[:2]
    yy, xx = _unit_grid((w, h))
    kind = int(rng.integers(3))
    if kind == 0:
        a = rng.uniform(0, 2 * math.pi)
        t = xx * math.cos(a) + yy * math.sin(a)
        t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    elif kind == 1:
        cy, cx = rng.uniform(0.2, 0.8, 2) * (yy.max(), xx.max())
        t = 1.0 - np.clip(np.hypot(yy - cy, xx - cx) / rng.uniform(0.4, 1.0), 0, 1)
    else:
        t = 0.5 + 0.5 * np.tanh(spectral_noise(rng, (w, h), 3.0)[..., 0])
    lo = np.float32(rng.uniform(0.35, 0.8))
    return x * (lo + (np.float32(1.15) - lo) * t.astype(np.float32))[..., None]
