"""Copy edits of the Active Image Indexing paper's DISC21 experiment.

Every edit is a plain function ``edit(img, *, <params>, rng=None) -> EditResult``: the edited RGB
image and an :class:`EditRecord` (name, exact parameters including random draws, sizes, sub-steps).
A failing edit raises :class:`EditError`; it is never replaced by the unedited image.

Typical use (``img`` a PIL image, one seed per query so edited queries can be regenerated)::

    from activeindex.edits import paper_edits
    for label, edit in paper_edits().items():        # the 14 table edits, by display name
        result = edit(img, np.random.default_rng(seed))
        result.image, result.record.to_dict()        # edited RGB image, JSON-ready record

Which code performs each edit (AugLy as installed, the AugLy compatibility layer, or our own) is
in ``EDITS[name].source``; see :mod:`activeindex.edits.augly_compat` for what AugLy 1.0.0 gets
wrong with current Pillow and NumPy.
"""

from activeindex.edits.auto_edit import N_EDITS_PROBS, PlannedEdit, apply_auto_plan, auto, sample_auto_plan
from activeindex.edits.base import (
    Category,
    EditError,
    EditRecord,
    EditResult,
    Source,
    UnknownEditError,
    identity,
)
from activeindex.edits.colour import brightness, contrast, grayscale, hue, saturation
from activeindex.edits.overlay import meme_format, overlay_emoji, overlay_onto_screenshot, overlay_text
from activeindex.edits.pixel import (
    blur,
    edge_enhance,
    gaussian_blur,
    jpeg,
    palette,
    pixelization,
    shuffle_pixels,
)
from activeindex.edits.registry import (
    EDITS,
    EditInfo,
    NamedEdit,
    PaperEdit,
    apply_edit,
    get_edit,
    paper_edits,
    paper_extra_edits,
    replay,
    sweeps,
)
from activeindex.edits.spatial import (
    center_crop,
    change_aspect_ratio,
    crop,
    hflip,
    pad_square,
    perspective_transform,
    resize,
    rotate,
    rotate_crop,
)

__all__ = [
    "EDITS",
    "N_EDITS_PROBS",
    "Category",
    "EditError",
    "EditInfo",
    "EditRecord",
    "EditResult",
    "NamedEdit",
    "PaperEdit",
    "PlannedEdit",
    "Source",
    "UnknownEditError",
    "apply_auto_plan",
    "apply_edit",
    "auto",
    "blur",
    "brightness",
    "center_crop",
    "change_aspect_ratio",
    "contrast",
    "crop",
    "edge_enhance",
    "gaussian_blur",
    "get_edit",
    "grayscale",
    "hflip",
    "hue",
    "identity",
    "jpeg",
    "meme_format",
    "overlay_emoji",
    "overlay_onto_screenshot",
    "overlay_text",
    "pad_square",
    "palette",
    "paper_edits",
    "paper_extra_edits",
    "perspective_transform",
    "pixelization",
    "replay",
    "resize",
    "rotate",
    "rotate_crop",
    "sample_auto_plan",
    "saturation",
    "shuffle_pixels",
    "sweeps",
]
