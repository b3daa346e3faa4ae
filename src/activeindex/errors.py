"""Exceptions raised at the library's public boundaries.

Every error carries the offending value (a path, a spec, a dimension) in its message so that a CLI
user can act on it without a traceback. The CLI catches :class:`ActiveIndexError` and prints it.
"""

from __future__ import annotations


class ActiveIndexError(Exception):
    """Base class of every error this package raises on purpose."""


class ImageLoadError(ActiveIndexError):
    """An image file could not be read: missing, empty, truncated, not an image, too large."""

    def __init__(self, path: object, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class ModelError(ActiveIndexError):
    """A model spec could not be resolved or loaded, or the model misbehaves."""


class DimensionError(ActiveIndexError):
    """Descriptors of the wrong dimension for an index or collection."""


class CollectionError(ActiveIndexError):
    """A collection is missing, corrupt, or used with a mismatching extractor."""


class ActivationError(ActiveIndexError):
    """Activation cannot run: an index that cannot give a target, a model without gradients, an
    output that cannot meet its quality budget."""


class DeviceError(ActiveIndexError):
    """A device that is not one (``gpu``), or one this machine does not have (``cuda`` on a CPU
    build of torch, ``cuda:3`` on a one-GPU machine)."""
