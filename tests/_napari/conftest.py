"""Fixtures for the GUI tests: tiny checkpoints, docked widgets, captured notifications."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def sgdc_cache(tmp_path, monkeypatch) -> Path:
    """Every GUI test autosaves into its own temporary cache folder, never the user's."""
    folder = tmp_path / "sgdc-cache"
    monkeypatch.setenv("NAPARI_SGDC_CACHE", str(folder))
    return folder


def _save_tiny(path: Path, task: str, **config) -> Path:
    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.model import build_model, tiny_config

    torch.manual_seed(0)
    model = build_model(tiny_config(task=task, **config)).eval()
    return save_checkpoint(path, model, provenance={"note": f"random tiny {task} model for GUI tests"})


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny semantic model saved with io.save_checkpoint."""
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny_semantic.safetensors", "semantic")


@pytest.fixture(scope="session")
def tiny_instance_checkpoint(tmp_path_factory) -> Path:
    """A random tiny instance model saved with io.save_checkpoint."""
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny_instance.safetensors", "instance")


@pytest.fixture(scope="session")
def tiny_hover_checkpoint(tmp_path_factory) -> Path:
    """A random tiny instance model with HoVer maps (``instance_map="hover"``)."""
    return _save_tiny(tmp_path_factory.mktemp("models") / "tiny_hover.safetensors", "instance", instance_map="hover")


def lesion_image(size: int = 192, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic dermoscopy-like RGB image: a dark disk on light skin, and the disk mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    disk = (yy - size * 0.5) ** 2 + (xx - size * 0.55) ** 2 < (size * 0.28) ** 2
    image = np.empty((size, size, 3), np.float32)
    image[:] = (225, 180, 160)
    image[disk] = (90, 55, 40)
    image += rng.normal(0, 8, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), disk


class Notes:
    """Collects napari notifications shown during a test."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def __call__(self, notification: Any) -> None:
        self.messages.append(str(notification.message))

    def matching(self, text: str) -> list[str]:
        """Messages that contain `text` (case-insensitive)."""
        return [m for m in self.messages if text.lower() in m.lower()]


@pytest.fixture
def notes():
    """Records every napari notification (errors are shown as notifications, not dialogs)."""
    from napari.utils.notifications import notification_manager

    collector = Notes()
    notification_manager.notification_ready.connect(collector)
    yield collector
    notification_manager.notification_ready.disconnect(collector)


@pytest.fixture
def sgdc(make_napari_viewer, tiny_checkpoint):
    """A viewer with both SGDC widgets docked, the tiny model loaded and a lesion image open."""
    viewer = make_napari_viewer()
    _, segment_widget = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Segment")
    _, finetune_widget = viewer.window.add_plugin_dock_widget("napari-sgdc", "SGDC Fine-tune")
    image, disk = lesion_image()
    layer = viewer.add_image(image, name="lesion", rgb=True)
    assert segment_widget.load_checkpoint(str(tiny_checkpoint))
    segment_widget.image_layer.value = layer
    return viewer, segment_widget, finetune_widget, layer, disk


@pytest.fixture
def wait_segment(qtbot):
    """``wait_segment(job)``: waits until a SegmentJob delivered its outcome and returns it."""

    def wait(job, timeout: int = 30_000) -> Any:
        assert job is not None, "segmentation did not start (see notifications)"
        qtbot.waitUntil(lambda: job.outcome is not None, timeout=timeout)
        return job.outcome

    return wait


@pytest.fixture
def wait_idle(qtbot):
    """``wait_idle(session)``: waits until no SGDC job (segment, fine-tune, re-segment) runs."""

    def wait(session, timeout: int = 60_000) -> None:
        qtbot.waitUntil(lambda: session.busy.idle, timeout=timeout)

    return wait
