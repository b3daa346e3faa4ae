"""Small JPEG renderings of indexed images for the web page.

An image is named by its integer id; its file is the one the collection's database recorded when it
was added. No path from a request reaches this module. Renderings are cached (ids are never reused,
so a cached thumbnail cannot show another image; a removed id is refused before the cache is asked).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from activeindex.images import ImageLimits, load_image

THUMBNAIL_QUALITY = 85


def render_thumbnail(path: Path, size: int, limits: ImageLimits) -> bytes:
    """JPEG bytes of the image at ``path`` fitted inside ``size`` × ``size`` (aspect kept).
    Raises :class:`~activeindex.errors.ImageLoadError` when the file cannot be read."""
    img = load_image(path, min_side=size, limits=limits)
    img.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY)
    return buf.getvalue()


class ThumbnailCache:
    """An LRU of rendered thumbnails keyed by (image id, size), bounded in bytes."""

    def __init__(self, limits: ImageLimits, max_bytes: int = 32 * 1024 * 1024) -> None:
        self._limits = limits
        self._max_bytes = max_bytes
        self._items: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, image_id: int, path: Path, size: int) -> bytes:
        key = (image_id, size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        data = render_thumbnail(path, size, self._limits)  # outside the lock: renders run in parallel
        with self._lock:
            if key not in self._items:
                self._items[key] = data
                self._bytes += len(data)
            while self._bytes > self._max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return data

    def forget(self, image_id: int) -> None:
        with self._lock:
            for key in [k for k in self._items if k[0] == image_id]:
                self._bytes -= len(self._items.pop(key))
