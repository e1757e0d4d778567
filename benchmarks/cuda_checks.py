"""CUDA checks, run by benchmarks/gpu_check.sh on a machine with a GPU (not part of CI).

They fail, rather than skip, when CUDA is missing: run them only where it exists.
    python -m pytest benchmarks/cuda_checks.py
"""

from __future__ import annotations

import numpy as np
import torch

from napari_sgdc.config import ModelConfig, TrainConfig
from napari_sgdc.device import autocast, resolve_device
from napari_sgdc.inference import segment
from napari_sgdc.model import build_model, tiny_config
from napari_sgdc.model.sgdc import dynamic_aggregate, unfold_aggregate_reference

CUDA = torch.device("cuda")


def test_cuda_is_available_and_auto_picks_it():
    assert torch.cuda.is_available()
    assert resolve_device("auto").type == "cuda"


def test_shift_and_sum_matches_unfold_on_cuda_float64():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 20, 24, dtype=torch.float64, generator=generator).to(CUDA).requires_grad_()
    kernel = torch.randn(2, 4, 49, 20, 24, dtype=torch.float64, generator=generator).softmax(2).to(CUDA)
    kernel.requires_grad_()
    ours, reference = dynamic_aggregate(x, kernel, 7), unfold_aggregate_reference(x, kernel, 7)
    assert (ours - reference).abs().max() < 1e-10
    grad = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, (x, kernel), grad), torch.autograd.grad(reference, (x, kernel), grad)):
        assert (a - b).abs().max() < 1e-10


def test_lite0_forward_on_cuda_with_and_without_bf16():
    model = build_model(ModelConfig()).to(CUDA).eval()
    x = torch.rand(2, 3, 512, 512, device=CUDA)
    with torch.no_grad():
        full = model(x, return_gates=True)
        with autocast(CUDA, enabled=True):
            half = model(x)
    assert full["mask"].shape == (2, 1, 512, 512) and len(full["gates"]) == 3
    assert torch.isfinite(half["mask"]).all()
    assert (torch.sigmoid(half["mask"].float()) - torch.sigmoid(full["mask"])).abs().max() < 0.1


def test_segment_on_cuda_matches_cpu():
    torch.manual_seed(0)
    model = build_model(tiny_config(task="instance")).eval()
    image = (np.random.default_rng(0).random((300, 410, 3)) * 255).astype(np.uint8)
    on_cpu = segment(model, image, device="cpu", tile=256)
    on_gpu = segment(model, image, device="cuda", tile=256, return_gates=True)
    assert np.abs(on_cpu.probability - on_gpu.probability).max() < 1e-3
    assert on_gpu.labels is not None and len(on_gpu.gates) == 3


def test_fit_runs_with_amp_on_cuda():
    from napari_sgdc.data import Sample, SegmentationDataset
    from napari_sgdc.train import fit

    rng = np.random.default_rng(0)
    samples = []
    for index in range(4):
        image = (rng.random((96, 96, 3)) * 60).astype(np.uint8)
        mask = np.zeros((96, 96), bool)
        mask[20:70, 25:75] = True
        image[mask] += 150
        samples.append(Sample(f"s{index}", image, mask))
    data = SegmentationDataset(samples, crop_size=64, augment=True)
    model = build_model(tiny_config())
    history = fit(model, data, None, TrainConfig(epochs=3, batch_size=4, amp=True, device="cuda", val_every=0,
                                                 warmup_steps=1))
    assert history.steps == 3 and all(np.isfinite(history.losses))
    assert next(model.parameters()).device.type == "cuda"
