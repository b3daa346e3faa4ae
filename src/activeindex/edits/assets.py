"""AugLy's bundled assets (emoji, fonts, screenshot templates) and lazy access to AugLy itself.

The assets ship inside the installed ``augly`` package, so nothing is downloaded (the machines are
offline). Edits name an asset by a short, portable name — ``"smileys/thinking_face.png"`` for an
emoji, ``"Raleway-ExtraBold.ttf"`` for a font, ``"web.png"`` for a template — and this module resolves
it to a path inside the installed package. Records therefore do not depend on where a virtual
environment lives.

AugLy is imported lazily, on the first edit that needs it, for two reasons: importing it has side
effects (``augly.utils.constants`` draws from the global ``random`` module at import time), and it
imports ``python-magic``, which needs the libmagic C library — on a machine without it only the
AugLy-backed edits fail (with an :class:`~activeindex.edits.base.EditError`), not the whole package.
"""

from __future__ import annotations

import functools
import os
import pickle
from types import ModuleType


def augly_functional() -> ModuleType:
    """``augly.image.functional``, imported on first use."""
    import augly.image.functional as functional

    return functional


@functools.cache
def _dirs() -> dict[str, str]:
    import augly.utils as augly_utils

    return {
        "emoji": augly_utils.EMOJI_DIR,
        "fonts": augly_utils.FONTS_DIR,
        "templates": augly_utils.SCREENSHOT_TEMPLATES_DIR,
        "bboxes": augly_utils.BBOXES_PATH,
    }


@functools.cache
def emoji_names() -> tuple[str, ...]:
    """Every bundled emoji as ``"<group>/<file>.png"``, sorted (872 in AugLy 1.0.0)."""
    root = _dirs()["emoji"]
    names = []
    for group in sorted(os.listdir(root)):
        sub = os.path.join(root, group)
        if os.path.isdir(sub):
            names.extend(f"{group}/{f}" for f in sorted(os.listdir(sub)) if f.endswith(".png"))
    return tuple(names)


@functools.cache
def font_names() -> tuple[str, ...]:
    """Every bundled TrueType font file name, sorted (364 in AugLy 1.0.0)."""
    return tuple(sorted(f for f in os.listdir(_dirs()["fonts"]) if f.endswith(".ttf")))


@functools.cache
def template_names() -> tuple[str, ...]:
    """The bundled screenshot templates, sorted: ``("mobile.png", "web.png")``."""
    return tuple(sorted(f for f in os.listdir(_dirs()["templates"]) if f.endswith(".png")))


def _resolve(kind: str, name: str, known: tuple[str, ...]) -> str:
    if name not in known:
        sample = ", ".join(known[:5])
        raise ValueError(f"unknown {kind} {name!r}; AugLy bundles {len(known)}, e.g. {sample}")
    return os.path.join(_dirs()["emoji" if kind == "emoji" else kind], name)


def emoji_path(name: str) -> str:
    """The file of a bundled emoji named like ``"smileys/thinking_face.png"``."""
    return _resolve("emoji", name, emoji_names())


def font_path(name: str) -> str:
    """The file of a bundled font named like ``"Raleway-ExtraBold.ttf"``."""
    return _resolve("fonts", name, font_names())


def template_path(name: str) -> str:
    """The file of a bundled screenshot template, ``"web.png"`` or ``"mobile.png"``."""
    return _resolve("templates", name, template_names())


def template_bboxes_path() -> str:
    """The JSON file giving, per template, the box where the image is pasted."""
    return _dirs()["bboxes"]


@functools.cache
def font_glyphs(name: str) -> tuple[int, ...]:
    """The code points AugLy lists as drawable with a font (its ``.pkl`` next to the ``.ttf``).

    Text overlays pick characters by index into this list. The files are part of the installed
    AugLy package (trusted, like its code), which is why unpickling them is acceptable.
    """
    pkl = os.path.splitext(font_path(name))[0] + ".pkl"
    with open(pkl, "rb") as f:
        glyphs = pickle.load(f)
    return tuple(int(c) for c in glyphs)
