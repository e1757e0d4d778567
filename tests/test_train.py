"""Losses, the fit loop (determinism, cancel, resume, checkpoints) and fine-tuning."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from napari_sgdc.config import ModelConfig, TrainConfig
from napari_sgdc.data import Sample, SegmentationDataset
from napari_sgdc.checkpoints import load_checkpoint
from napari_sgdc.model import build_model
from napari_sgdc.train import History, edge_loss, finetune, fit, mask_loss, total_loss
from napari_sgdc.train.fit import TrainingDiverged

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
    before, modes = weights(model), _modes(model)
    history = finetune(model, [image], [labels], cfg)
    assert history.steps == 3 and len(history.losses) == 3 and all(np.isfinite(history.losses))
    assert any(not torch.equal(before[k], v) for k, v in weights(model).items())
    assert _modes(model) == modes  # every module's mode as before (here: train mode, as built)


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


def test_finetune_trains_on_the_grid_segment_uses(monkeypatch):
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
    cfg = TrainConfig(max_steps=1, epochs=1, batch_size=2, crop_size=32, val_every=0)
    finetune_module.finetune(model, [image], [labels], cfg)
    assert seen["shapes"] == [(48, 64, 3)]

    # A model with a scale: each image is resampled from its µm/px, as segment(mpp=...) does.
    scaled = build_model(tiny_config(mpp=0.25))
    finetune_module.finetune(scaled, [image, image], [labels, labels], cfg, mpp=[0.5, None])
    assert seen["shapes"] == [(240, 320, 3), (120, 160, 3)]  # 20x → 40x doubles; None: as given
    finetune_module.finetune(scaled, [image], [labels], cfg, mpp=0.125)
    assert seen["shapes"] == [(60, 80, 3)]
    with pytest.raises(ValueError, match="2 mpp values for 1 images"):
        finetune_module.finetune(scaled, [image], [labels], cfg, mpp=[0.5, 0.5])
    with pytest.raises(ValueError, match="does not record the µm/px"):
        finetune_module.finetune(build_model(tiny_config()), [image], [labels], cfg, mpp=0.5)


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


# ----------------------------------------------------------------------------- state files, validation, config


def _trained_run(tmp_path, **overrides):
    out = tmp_path / "run.safetensors"
    fit(tiny_model(), train_set(), None, run_config(epochs=1, steps_per_epoch=1, **overrides), out=out)
    return out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_dict", "wrong_format", "missing_keys",
                                    "wrong_weights"])
def test_corrupt_state_file_is_one_clear_error(tmp_path, damage):
    from napari_sgdc.checkpoints import CheckpointError
    from napari_sgdc.train import state_path_for

    out = _trained_run(tmp_path)
    state_file = state_path_for(out)
    raw = state_file.read_bytes()
    state = torch.load(state_file, weights_only=True)
    if damage == "truncated":
        state_file.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        state_file.write_bytes(b"\x00not a state file" * 10)
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], state_file)
    elif damage == "wrong_format":
        torch.save({**state, "format": "something-else/9"}, state_file)
    elif damage == "missing_keys":
        torch.save({key: value for key, value in state.items() if key != "optimizer"}, state_file)
    else:
        torch.save({**state, "model": {"nope": torch.zeros(1)}}, state_file)
    with pytest.raises(CheckpointError) as error:
        fit(tiny_model(), train_set(), None, run_config(epochs=2, steps_per_epoch=1), out=out, resume=out)
    assert str(state_file) in str(error.value) and "\n" not in str(error.value)


def test_state_round_trip_keeps_the_format(tmp_path):
    from napari_sgdc.train import last_checkpoint_path_for, state_path_for
    from napari_sgdc.train.state import STATE_FORMAT

    out = _trained_run(tmp_path)
    assert last_checkpoint_path_for(out) == tmp_path / "run.last.safetensors"
    for given in (out, tmp_path / "run.last.safetensors", tmp_path / "run.last.pt"):
        assert state_path_for(given) == tmp_path / "run.last.pt"
    state = torch.load(tmp_path / "run.last.pt", weights_only=True)
    assert state["format"] == STATE_FORMAT and state["step"] == 1


def test_cancel_before_the_first_step_writes_no_state(tmp_path):
    cancel = threading.Event()
    cancel.set()
    out = tmp_path / "run.safetensors"
    history = fit(tiny_model(), train_set(), None, run_config(), out=out, cancel=cancel)
    assert history.cancelled and history.steps == 0
    assert list(tmp_path.iterdir()) == []  # nothing to resume from


def test_fit_removes_stale_temporaries_of_its_run_only(tmp_path):
    stale = [tmp_path / ".run.safetensors.k2j3.tmp", tmp_path / ".run.last.safetensors.x1.tmp",
             tmp_path / ".run.last.pt.abc.tmp"]
    kept = [tmp_path / ".other.safetensors.k2j3.tmp", tmp_path / "run.safetensors.tmp",
            tmp_path / ".run.safetensors.k2j3.tmp.keep"]
    for path in stale + kept:
        path.write_bytes(b"partial")
    _trained_run(tmp_path)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)


def test_validate_reports_aji_and_instance_models_select_by_it(tmp_path):
    from skimage.measure import label

    from napari_sgdc.train import validate
    from napari_sgdc.train.validate import MARKER_THRESHOLDS

    def instance_samples(n, size, seed):
        return [Sample(s.name, s.image, label(s.mask).astype(np.int32)) for s in synthetic_samples(n, size, seed)]

    train = SegmentationDataset(instance_samples(6, 80, 0), crop_size=64, augment=True, boundary_width=2)
    val = SegmentationDataset(instance_samples(2, 70, 9), crop_size=None, augment=False, boundary_width=2)
    model = tiny_model(task="instance")
    out = tmp_path / "nuclei.safetensors"
    history = fit(model, train, val, run_config(epochs=2, steps_per_epoch=2, select_metric="auto"), out=out)
    assert history.select_metric == "aji"
    assert all(0.0 <= m["aji"] <= 1.0 for m in history.val_metrics)
    assert history.best_metric == max(m["aji"] for m in history.val_metrics)
    metadata = load_checkpoint(out)[1]
    assert metadata["metrics"]["aji"] == pytest.approx(history.best_metric)
    # the marker level tuned at the best epoch travels in the checkpoint's config
    best = next(m for m in history.val_metrics if m["epoch"] == history.best_epoch)
    assert metadata["model_config"]["split_level"] == best["split_level"]
    scores = validate(model, val, device="cpu")
    assert set(scores) == {"iou", "dice", "val_loss", "aji", "split_level"}
    # the reported AJI is the best of the levels, each scored alone
    single = [validate(model, val, device="cpu", marker_thresholds=(level,))["aji"] for level in MARKER_THRESHOLDS]
    assert scores["aji"] == pytest.approx(max(single))
    assert scores["split_level"] == MARKER_THRESHOLDS[int(np.argmax(single))]
    with pytest.raises(ValueError, match="marker_thresholds"):
        validate(model, val, device="cpu", marker_thresholds=())
    semantic = fit(tiny_model(), train_set(), val_set(), run_config(epochs=1, steps_per_epoch=1, select_metric="auto"))
    assert semantic.select_metric == "iou" and "aji" not in semantic.val_metrics[0]
    with pytest.raises(ValueError, match="aji"):
        fit(tiny_model(), train_set(), val_set(), run_config(select_metric="aji"))


def test_tune_postprocess_finds_the_best_combination(tmp_path):
    from skimage.measure import label

    from napari_sgdc import metrics
    from napari_sgdc.inference import head_maps
    from napari_sgdc.postprocess import PostprocessOptions, postprocess, separation_map
    from napari_sgdc.train import tune_postprocess

    samples = [Sample(s.name, s.image, label(s.mask).astype(np.int32)) for s in synthetic_samples(6, 80, 0)]
    train = SegmentationDataset(samples, crop_size=64, augment=True, boundary_width=2)
    val = SegmentationDataset([Sample(s.name, s.image, label(s.mask).astype(np.int32))
                               for s in synthetic_samples(3, 64, 9)], crop_size=None, augment=False)
    model = tiny_model(task="instance")
    fit(model, train, None, run_config(epochs=1, steps_per_epoch=3))
    grid = dict(thresholds=(0.3, 0.6), levels=(0.2, 0.7), min_sizes=(30, 60))
    found = tune_postprocess(model, val, **grid)
    expected = {}
    model.eval()
    with torch.no_grad():
        maps = []
        for index in range(len(val)):
            item = val[index]
            outputs = model(item["image"][None])
            plane = {name: value.numpy() for name, value in head_maps(outputs).items()}
            maps.append((plane, item["instances"][0].numpy()))
    for threshold in grid["thresholds"]:
        for level in grid["levels"]:
            for size in grid["min_sizes"]:
                options = PostprocessOptions(threshold, level, size)
                scored = [metrics.instance_scores(postprocess(m["probability"], separation_map(m), options,
                                                              instances=True)[1], ref) for m, ref in maps]
                aji, pq = np.mean([s["aji"] for s in scored]), np.mean([s["pq"] for s in scored])
                expected[(threshold, level, size)] = (aji + pq) / 2  # AJI and PQ together
    best = max(expected, key=lambda key: expected[key])
    assert (found["threshold"], found["split_level"], found["min_size"]) == best
    assert found["objective"] == pytest.approx(expected[best])
    assert len(set(np.round(list(expected.values()), 6))) > 1  # the grid matters on this data
    with pytest.raises(ValueError, match="instance model"):
        tune_postprocess(tiny_model(), val)
    with pytest.raises(ValueError, match="MIN_SIZE_FLOOR"):
        tune_postprocess(model, val, min_sizes=(10, 60))


def test_param_groups_split_encoder_and_skip_frozen():
    model = tiny_model()
    groups = model.param_groups(1e-4, 1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("encoder", 1e-4), ("decoder", 1e-3)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    model.encoder.requires_grad_(False)
    model.mask_head.bias.requires_grad_(False)
    groups = model.param_groups(1e-4, 1e-3)
    assert [g["name"] for g in groups] == ["decoder"]
    assert all(p.requires_grad for p in groups[0]["params"])
    assert len(groups[0]["params"]) == sum(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("field, value", [
    ("epochs", 0), ("epochs", -1), ("batch_size", 0), ("crop_size", 48), ("crop_size", 0), ("crop_size", -32),
    ("lr_decoder", -1e-3), ("lr_encoder", float("nan")), ("lr_decoder", float("inf")), ("max_steps", -1),
    ("steps_per_epoch", -2), ("warmup_steps", -1), ("grad_clip", -1.0), ("val_every", -1), ("seed", -1),
    ("edge_weight", -0.5), ("boundary_width", 0), ("num_workers", -1), ("weight_decay", float("nan")),
    ("select_metric", "bogus"), ("epochs", 1.5), ("batch_size", True), ("aspect_jitter", 0.5),
    ("aspect_jitter", float("nan")), ("artifacts", "yes"),
])
def test_bad_train_config_is_refused_before_training(field, value):
    from napari_sgdc.train import check_train_config

    cfg = run_config(**{field: value})
    with pytest.raises(ValueError, match=field) as error:
        check_train_config(cfg)
    assert "\n" not in str(error.value)
    model = tiny_model()
    before = weights(model)
    with pytest.raises(ValueError, match=field):
        fit(model, train_set(), val_set(), cfg)
    assert all(torch.equal(before[name], value) for name, value in weights(model).items())


def test_good_train_configs_pass_the_check():
    from napari_sgdc.config import PRESETS
    from napari_sgdc.train import check_train_config

    for cfg in (TrainConfig(), run_config(), *PRESETS.values(), run_config(select_metric="auto")):
        check_train_config(cfg)


# ----------------------------------------------------------------------------- fine-tuning safety


def _finetune_pair(size: int = 96):
    sample = synthetic_samples(1, size=size, seed=3)[0]
    return sample.image, sample.mask.astype(np.uint8)


def _modes(model):
    return [module.training for module in model.modules()]


def _finetune_config(**overrides):
    values = dict(epochs=1, max_steps=4, steps_per_epoch=4, batch_size=2, crop_size=64, lr_encoder=1e-3,
                  lr_decoder=1e-3, warmup_steps=1, freeze_encoder=True, val_every=0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("how", ["error", "cancel", "nan"])
def test_failed_or_cancelled_finetune_restores_the_model(how):
    model = tiny_model()
    model.eval()
    model.decoder[0].train()  # an unusual mix of modes, restored module by module
    model.edge_head.weight.requires_grad_(False)
    before, modes, flags = weights(model), _modes(model), [p.requires_grad for p in model.parameters()]
    cancel = threading.Event()

    def callback(event):
        if event["kind"] == "step" and event["step"] == 2:
            if how == "error":
                raise RuntimeError("callback failed")
            if how == "cancel":
                cancel.set()
            if how == "nan":
                with torch.no_grad():
                    model.mask_head.bias.fill_(float("nan"))

    image, labels = _finetune_pair()
    expected = {"error": RuntimeError, "nan": TrainingDiverged}.get(how)
    if expected is None:
        history = finetune(model, [image], [labels], _finetune_config(freeze_encoder=False, freeze_batchnorm=False),
                           callbacks=[callback], cancel=cancel)
        assert history.cancelled and history.steps == 2
    else:
        with pytest.raises(expected):
            finetune(model, [image], [labels], _finetune_config(freeze_encoder=False, freeze_batchnorm=False),
                     callbacks=[callback], cancel=cancel)
    after = weights(model)
    assert all(torch.equal(before[name], after[name]) for name in before)  # bit for bit, buffers included
    assert _modes(model) == modes
    assert [p.requires_grad for p in model.parameters()] == flags


def test_successful_finetune_keeps_modes_and_flags():
    model = tiny_model().eval()
    image, labels = _finetune_pair()
    before = weights(model)
    finetune(model, [image], [labels], _finetune_config())
    assert any(not torch.equal(before[name], value) for name, value in weights(model).items())
    assert not any(_modes(model)) and all(p.requires_grad for p in model.parameters())


def test_segment_during_finetune_does_not_disturb_training():
    from napari_sgdc.inference import segment
    from napari_sgdc.locks import model_lock

    model = tiny_model().eval()
    image, labels = _finetune_pair()
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    encoder_modes, lock_free_elsewhere = [], []

    def probe_lock():
        lock = model_lock(model)
        got = lock.acquire(blocking=False)
        if got:
            lock.release()
        lock_free_elsewhere.append(got)

    def callback(event):
        if event["kind"] != "step":
            return
        segment(model, image, tile=None)  # same thread: the lock is re-entrant
        encoder_modes.append(model.encoder.training or any(m.training for m in model.encoder.modules()))
        thread = threading.Thread(target=probe_lock)
        thread.start()
        thread.join()

    finetune(model, [image], [labels], _finetune_config(freeze_batchnorm=True), callbacks=[callback])
    assert encoder_modes == [False] * 4  # the frozen encoder stayed in eval mode
    assert lock_free_elsewhere == [False] * 4  # fit holds the model's lock
    assert all(torch.equal(buffers[name], value) for name, value in model.named_buffers())
    probe_lock()
    assert lock_free_elsewhere[-1]  # released afterwards


def test_segment_from_another_thread_waits_for_finetune():
    from napari_sgdc.inference import segment
    from napari_sgdc.locks import model_lock

    model = tiny_model().eval()
    image, labels = _finetune_pair()
    order = []

    def other_thread():
        with model_lock(model):  # what segment() does
            order.append("segment")
            segment(model, image, tile=None)

    threads = []

    def callback(event):
        if event["kind"] == "step":
            order.append(f"step {event['step']}")
            if event["step"] == 1:
                threads.append(threading.Thread(target=other_thread))
                threads[0].start()

    finetune(model, [image], [labels], _finetune_config(max_steps=3, steps_per_epoch=3), callbacks=[callback])
    threads[0].join()
    assert order == ["step 1", "step 2", "step 3", "segment"]
