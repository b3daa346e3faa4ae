"""Deterministic procedural images: a small, diverse image source for tests and the demo.

Each image is a function of ``(seed, index)`` only, so any subset can be regenerated in any order
and in parallel. Content: a smooth colour field, random rectangles/ellipses/polygons (an occlusion
model), strokes, and fine-grained noise, so that images differ in layout, colour and texture.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def synthetic_image(index: int, *, seed: int = 0, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """The ``index``-th image of the source ``seed``: an RGB image of ``size`` (width, height)."""
    rng = np.random.default_rng([seed, index])
    w, h = size
    # Background: bicubic upsampling of a tiny random colour grid.
    grid = rng.integers(0, 256, size=(rng.integers(2, 6), rng.integers(2, 6), 3), dtype=np.uint8)
    img = Image.fromarray(grid).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 30))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * (w, h)
        bw, bh = rng.uniform(0.05, 0.6, 2) * (w, h)
        box = [float(x0), float(y0), float(x0 + bw), float(y0 + bh)]
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        elif kind == 2:
            pts = [tuple(float(v) for v in rng.uniform(0, 1, 2) * (w, h)) for _ in range(int(rng.integers(3, 7)))]
            draw.polygon(pts, fill=colour)
        else:
            pts = [tuple(float(v) for v in rng.uniform(0, 1, 2) * (w, h)) for _ in range(int(rng.integers(2, 6)))]
            draw.line(pts, fill=colour, width=int(rng.integers(1, max(2, w // 25))))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
    arr = np.asarray(img, dtype=np.int16)
    noise = rng.normal(0, rng.uniform(2, 12), size=arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def write_synthetic_images(
    out: str | os.PathLike[str], n: int, *, seed: int = 0, size: tuple[int, int] = (256, 256), start: int = 0
) -> list[Path]:
    """Write images ``start .. start+n-1`` of source ``seed`` as PNG files; returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        path = out / f"img_{i:06d}.png"
        if not path.exists():
            tmp = out / f".img_{i:06d}.png.tmp"
            synthetic_image(i, seed=seed, size=size).save(tmp, format="PNG")
            os.replace(tmp, path)
        paths.append(path)
    return paths
