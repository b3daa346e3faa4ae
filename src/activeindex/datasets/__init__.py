"""Image sources that work offline: deterministic synthetic images mixing procedural generators and
tiles of the real photos bundled with scikit-image (:mod:`activeindex.datasets.synthetic`)."""

from activeindex.datasets.synthetic import (
    Family,
    Overlay,
    SyntheticRecord,
    make_images,
    synthetic_image,
    synthetic_image_info,
    synthetic_image_with_info,
    write_synthetic_images,
)

__all__ = [
    "Family",
    "Overlay",
    "SyntheticRecord",
    "make_images",
    "synthetic_image",
    "synthetic_image_info",
    "synthetic_image_with_info",
    "write_synthetic_images",
]
