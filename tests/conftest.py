"""Shared fixtures: the data folder and a tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def data_root() -> Path:
    """``<repo>/../shared/data``, or the folder named by ``NAPARI_SGDC_DATA``."""
    override = os.environ.get("NAPARI_SGDC_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = data_root()
    assert root.is_dir(), f"shared data folder not found at {root} (set NAPARI_SGDC_DATA)"
    return root


@pytest.fixture
def tiny_model():
    from napari_sgdc.model import build_model, tiny_config

    torch.manual_seed(0)
    return build_model(tiny_config()).eval()
