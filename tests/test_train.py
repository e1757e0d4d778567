"""Losses, the fit loop (determinism, cancel, resume, checkpoints) and fine-tuning."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_sgdc.config import ModelConfig, TrainConfig
from napari_sgdc.data import Sample, SegmentationDataset
from napari_sgdc.io import load_checkpoint
from napari_sgdc.model import build_model
from napari_sgdc.train import History, edge_loss, finetune, fit, mask_loss, total_loss

torch.set_num_threads(1)


def tiny_model(**overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    values = dict(encoder="mini", pretrained=False, decoder_channels=(32, 16, 16, 8, 8),
                  sge_channels=16, guide_channels=8, heads=4)
    values.update(overrides)
    return build_model(ModelConfig(**values))


def synthetic_samples(n: int, size: int = 80, seed: int = 0) -> list[Sample]:
    """Bright discs on a dark noisy background."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size]
    samples = []
    for index in range(n):
        mask = np.zeros((size, size), bool)
        for _ in range(3):
            cy, cx = rng.integers(12, size - 12, 2)
            mask |= (rows - cy) ** 2 + (cols - cx) ** 2 < int(rng.integers(5, 12)) ** 2
        image = np.full((size, size, 3), 50.0)
        image[mask] = (210, 110, 160)
        image = np.clip(image + rng.normal(0, 12, image.shape), 0, 255).astype(np.uint8)
        samples.append(Sample(f"s{index}", image, mask))
    return samples


def run_config(**overrides) -> TrainConfig:
    values = dict(epochs=2, steps_per_epoch=2, batch_size=2, crop_size=64, lr_encoder=2e-3,
                  lr_decoder=3e-3, warmup_steps=1, device="cpu", val_every=1, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def train_set(seed: int = 0) -> SegmentationDataset:
    return SegmentationDataset(synthetic_samples(6, seed=seed), crop_size=64, augment=True, boundary_width=2)


def val_set() -> SegmentationDataset:
    return SegmentationDataset(synthetic_samples(2, size=70, seed=9), crop_size=None, augment=False, boundary_width=2)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# ----------------------------------------------------------------------------- losses


def test_losses_prefer_correct_predictions():
    target = torch.zeros(2, 1, 16, 16)  # (B, 1, H, W)
    target[:, :, 4:12, 4:12] = 1
    good = (target * 2 - 1) * 8  # confident and right
    bad = -good
    assert mask_loss(good, target) < 0.05 < mask_loss(bad, target)
    assert edge_loss(good, target) < edge_loss(bad, target)
    outputs = {"mask": good, "edge": bad}
    batch = {"mask": target, "edge": target}
    with_edge, parts = total_loss(outputs, batch, edge_weight=0.5)
    without_edge, parts_off = total_loss(outputs, batch, edge_weight=0.5, edge_supervision=False)
    assert torch.isclose(with_edge, without_edge + 0.5 * edge_loss(bad, target))
    assert parts_off["edge"] == 0.0 and parts["edge"] > 0
    with pytest.raises(ValueError, match="shape"):
        mask_loss(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4))


def test_edge_loss_weights_rare_positives():
    target = torch.zeros(1, 1, 32, 32)
    target[0, 0, 10, :] = 1  # 1/32 positives
    all_negative = torch.full_like(target, -6.0)
    # a network predicting "no boundary" everywhere is penalised more than plain BCE would
    plain = torch.nn.functional.binary_cross_entropy_with_logits(all_negative, target)
    assert edge_loss(all_negative, target) > plain + 1.0


# ----------------------------------------------------------------------------- fit


def test_fit_loss_decreases_and_events():
    model = tiny_model()
    events = []
    cfg = run_config(epochs=4, steps_per_epoch=4, val_every=2)
    history = fit(model, train_set(), val_set(), cfg, callbacks=[events.append])
    assert isinstance(history, History)
    assert history.steps == 16 and len(history.losses) == 16 and not history.cancelled
    assert np.mean(history.losses[-4:]) < 0.85 * np.mean(history.losses[:4])
    steps = [e for e in events if e["kind"] == "step"]
    epochs = [e for e in events if e["kind"] == "epoch"]
    assert [e["step"] for e in steps] == list(range(1, 17))
    assert all(e["total_steps"] == 16 and e["eta_s"] >= 0 for e in steps)
    assert len(epochs) == 4 and epochs[-1]["eta_s"] == 0
    assert "iou" in epochs[1]["metrics"] and "iou" not in epochs[0]["metrics"]  # val_every=2
    assert [m["epoch"] for m in history.val_metrics] == [1, 3]
    assert history.val_metrics[-1]["iou"] > 0.5  # it learnt the discs
    assert not model.training  # left in eval mode


def test_fit_is_deterministic_under_seed():
    runs = []
    for seed in (5, 5, 6):
        model = tiny_model()
        history = fit(model, train_set(), None, run_config(epochs=1, steps_per_epoch=3, seed=seed))
        runs.append((weights(model), history.losses))
    (w_a, loss_a), (w_b, loss_b), (w_c, _) = runs
    assert loss_a == loss_b
    assert all(torch.equal(w_a[name], w_b[name]) for name in w_a)
    assert any(not torch.equal(w_a[name], w_c[name]) for name in w_a)


def test_cancel_is_honoured_within_one_step():
    cancel = threading.Event()
    seen = []

    def stop_at_two(event):
        if event["kind"] == "step":
            seen.append(event["step"])
            if event["step"] == 2:
                cancel.set()

    history = fit(tiny_model(), train_set(), val_set(), run_config(epochs=3, steps_per_epoch=3),
                  callbacks=[stop_at_two], cancel=cancel)
    assert history.cancelled and history.steps == 2 and seen == [1, 2]
    assert history.val_metrics == []
    cancel_first = threading.Event()
    cancel_first.set()
    model = tiny_model()
    before = weights(model)
    history = fit(model, train_set(), None, run_config(), cancel=cancel_first)
    assert history.cancelled and history.steps == 0
    assert all(torch.equal(before[name], value) for name, value in weights(model).items())


def test_resume_continues_exactly(tmp_path):
    cfg = run_config(epochs=2, steps_per_epoch=3)
    full_model = tiny_model()
    full = fit(full_model, train_set(), val_set(), cfg, out=tmp_path / "full.safetensors")

    cancel = threading.Event()
    out = tmp_path / "run.safetensors"

    def stop_mid_epoch(event):
        if event["kind"] == "step" and event["step"] == 4:
            cancel.set()

    first = fit(tiny_model(), train_set(), val_set(), cfg, out=out, cancel=cancel, callbacks=[stop_mid_epoch])
    assert first.cancelled and first.steps == 4
    assert (tmp_path / "run.last.pt").is_file() and (tmp_path / "run.last.safetensors").is_file()
    steps_seen = []
    resumed_model = tiny_model(block="sgdc")
    torch.nn.init.constant_(next(resumed_model.parameters()), 0.3)  # weights must come from the state
    resumed = fit(resumed_model, train_set(), val_set(), cfg, out=out, resume=out,
                  callbacks=[lambda e: e["kind"] == "step" and steps_seen.append(e["step"])])
    assert steps_seen == [5, 6]
    assert resumed.steps == 6 and not resumed.cancelled
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    reference = weights(full_model)
    assert all(torch.allclose(reference[name], value, atol=1e-6) for name, value in weights(resumed_model).items())
    with pytest.raises(FileNotFoundError):
        fit(tiny_model(), train_set(), None, cfg, resume=tmp_path / "missing.safetensors")


def test_best_checkpoint_is_saved_and_loadable(tmp_path):
    out = tmp_path / "best.safetensors"
    model = tiny_model()
    history = fit(model, train_set(), val_set(), run_config(epochs=2, steps_per_epoch=2), out=out)
    assert history.checkpoint == out and out.is_file()
    loaded, metadata = load_checkpoint(out)
    best = max(history.val_metrics, key=lambda m: m["iou"])
    assert metadata["metrics"]["iou"] == pytest.approx(best["iou"])
    assert metadata["train_config"]["crop_size"] == 64
    assert loaded.config.encoder == "mini"
    assert list(tmp_path.glob("*.tmp")) == []  # atomic writes leave no temporaries
    with pytest.raises(ValueError, match="select_metric"):
        fit(tiny_model(), train_set(), val_set(), run_config(select_metric="bogus"))


def test_freeze_encoder_keeps_weights_and_batchnorm_stats():
    model = tiny_model()
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    rest_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("encoder.")}
    fit(model, train_set(), None, run_config(epochs=1, steps_per_epoch=2, freeze_encoder=True))
    assert any("running_mean" in k for k in encoder_before)
    assert all(torch.equal(encoder_before[k], v) for k, v in model.encoder.state_dict().items())
    after = model.state_dict()
    assert any(not torch.equal(rest_before[k], after[k]) for k in rest_before)
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_edge_supervision_off_drops_edge_term():
    history = fit(tiny_model(edge_supervision=False), train_set(), None, run_config(epochs=1, steps_per_epoch=1))
    assert history.loss_parts[0]["edge"] == 0.0
    assert history.losses[0] == pytest.approx(history.loss_parts[0]["mask"], rel=1e-5)


# ----------------------------------------------------------------------------- finetune


def test_finetune_small_image_instance_labels():
    model = tiny_model(task="instance")
    image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)  # smaller than the crop
    labels = np.zeros((40, 50), np.uint16)
    labels[10:20, 10:20] = 3
    labels[10:20, 20:30] = 8
    cfg = TrainConfig(epochs=1, max_steps=3, steps_per_epoch=3, batch_size=2, crop_size=64,
                      lr_encoder=0.0, lr_decoder=1e-3, warmup_steps=1, freeze_encoder=True, val_every=0)
    before = weights(model)
    history = finetune(model, [image], [labels], cfg)
    assert history.steps == 3 and len(history.losses) == 3 and all(np.isfinite(history.losses))
    assert any(not torch.equal(before[k], v) for k, v in weights(model).items())
    assert not model.training


def test_finetune_errors_are_clear():
    model = tiny_model()
    image = np.zeros((32, 32, 3), np.uint8)
    labels = np.zeros((32, 32), np.uint8)
    with pytest.raises(ValueError, match="at least one"):
        finetune(model, [], [])
    with pytest.raises(ValueError, match="shape"):
        finetune(model, [image], [np.ones((16, 32), np.uint8)])
    with pytest.raises(ValueError, match="all background"):
        finetune(model, [image], [labels])
    with pytest.raises(ValueError, match="preset"):
        finetune(model, [image], [labels + 1], "nope")
    with pytest.raises(ValueError, match="images"):
        finetune(model, [image, image], [labels + 1])


def test_finetune_trains_at_the_models_working_resolution(monkeypatch):
    import importlib

    from napari_sgdc.config import TrainConfig
    from napari_sgdc.model import build_model, tiny_config

    finetune_module = importlib.import_module("napari_sgdc.train.finetune")  # the package exports the function
    seen = {}
    real_dataset = finetune_module.SegmentationDataset

    def spy(samples, **kwargs):
        seen["shapes"] = [sample.image.shape for sample in samples]
        return real_dataset(samples, **kwargs)

    monkeypatch.setattr(finetune_module, "SegmentationDataset", spy)
    model = build_model(tiny_config(resize_long_side=64))
    image = np.zeros((120, 160, 3), np.uint8)
    labels = np.zeros((120, 160), np.uint8)
    labels[30:90, 40:120] = 1
    finetune_module.finetune(model, [image], [labels], TrainConfig(max_steps=1, epochs=1, batch_size=2,
                                                                    crop_size=32, val_every=0))
    assert seen["shapes"] == [(48, 64, 3)]


def test_freeze_batchnorm_keeps_running_statistics_of_the_base_model():
    from napari_sgdc.config import PRESETS, TrainConfig
    from napari_sgdc.model import build_model, tiny_config
    from napari_sgdc.train import finetune

    assert PRESETS["quick"].freeze_batchnorm and PRESETS["standard"].freeze_batchnorm
    torch.manual_seed(0)
    model = build_model(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    image = (np.random.default_rng(0).random((96, 96, 3)) * 255).astype(np.uint8)
    labels = np.zeros((96, 96), np.uint8)
    labels[20:70, 30:80] = 1
    finetune(model, [image], [labels], TrainConfig(max_steps=3, epochs=1, batch_size=2, crop_size=64, val_every=0,
                                                  freeze_encoder=False, freeze_batchnorm=True))
    after = model.state_dict()
    running = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert running and all(torch.equal(before[k], after[k]) for k in running)
    assert not torch.equal(before["mask_head.weight"], after["mask_head.weight"])
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder.") and k.endswith(".weight"))
