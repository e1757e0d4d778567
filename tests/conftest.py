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


try:  # property-based tests (tests/test_properties.py); select with --hypothesis-profile ci|slow
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # hypothesis is in the "testing" extra; other tests do not need it
    pass
else:
    _RELAXED = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                HealthCheck.large_base_example]
    # "ci" (default): few examples, the same ones every run, no shrinking (the minimal failing
    # examples found so far run as test_known_failing_example); "slow": many random examples,
    # shrunk to a minimal failing one. HYPOTHESIS_PROFILE=slow also selects it.
    settings.register_profile("ci", max_examples=20, deadline=None, suppress_health_check=_RELAXED,
                              database=None, derandomize=True, print_blob=True,
                              phases=[Phase.explicit, Phase.generate])
    settings.register_profile("slow", max_examples=300, deadline=None, suppress_health_check=_RELAXED,
                              database=None, print_blob=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
