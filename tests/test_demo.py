"""The README's headless main job."""

from __future__ import annotations

import numpy as np
import torch
from skimage import io as skio

from napari_sgdc.demo import main
from napari_sgdc.checkpoints import save_checkpoint
from napari_sgdc.model import build_model, tiny_config


def test_headless_demo_writes_mask_boundary_and_gate_pngs(tmp_path):
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "tiny.safetensors", build_model(tiny_config(task="instance")))
    out = tmp_path / "demo"
    assert main(["--headless", "--sample", "nuclei", "--model", str(checkpoint), "--out", str(out), "--device", "cpu"]) == 0
    names = {path.name for path in out.iterdir()}
    assert {"nuclei_mask.png", "nuclei_boundary.png", "nuclei_probability.png", "nuclei_labels.png"} <= names
    assert sum(name.startswith("nuclei_gate1_sgdc_s") for name in names) == 3
    mask = skio.imread(str(out / "nuclei_mask.png"))
    image = skio.imread(str(out / "nuclei_image.png"))
    assert mask.shape == image.shape[:2] and mask.dtype == np.uint8


def test_headless_demo_unknown_model_is_one_line(tmp_path, capsys):
    assert main(["--headless", "--model", "no-such-model", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]
