"""Fixtures shared by the test files that need a saved tiny checkpoint and sample images."""

from pathlib import Path

import pytest
from saved_checkpoint import save_images, save_tiny_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny Dense Connector saved with model, processor, `vicuna_v1` chat template and remote code."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("checkpoint"))


@pytest.fixture(scope="module")
def image_paths(tmp_path_factory) -> list[Path]:
    return save_images(tmp_path_factory.mktemp("images"))
