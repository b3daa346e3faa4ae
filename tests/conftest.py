"""Shared fixtures: tiny seeded data so the suite runs in minutes on 2 cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from activeindex.datasets.synthetic import write_synthetic_images
from activeindex.extractors import Extractor, create_extractor


@pytest.fixture(scope="session")
def tiny_extractor() -> Extractor:
    """The registered 32-px, 32-d test model (untrained, deterministic)."""
    return create_extractor("builtin:tiny")


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 distinct synthetic PNG images of 64×48 pixels."""
    out = tmp_path_factory.mktemp("images")
    write_synthetic_images(out, 64, seed=1, size=(64, 48))
    return out


@pytest.fixture(scope="session")
def train_vectors(tiny_extractor: Extractor) -> np.ndarray:
    """512 unit vectors of the tiny model's dimension, for training small indexes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, tiny_extractor.dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
