"""``napari-sgdc train`` robustness: bad settings, --seed, corrupt --resume, Ctrl-C."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from skimage import io as skio

import napari_sgdc.train
from napari_sgdc.cli import main

torch.set_num_threads(1)


def _folders_dataset(root: Path, n: int = 4, size: int = 72) -> Path:
    """``<root>/images/*.png`` with ``<root>/masks/*.png``: bright discs on a noisy background."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows, cols = np.mgrid[:size, :size]
    for index in range(n):
        cy, cx = rng.integers(20, size - 20, 2)
        mask = (rows - cy) ** 2 + (cols - cx) ** 2 < 14 ** 2
        image = np.clip(np.where(mask[..., None], 200.0, 60.0) + rng.normal(0, 10, (size, size, 3)), 0, 255)
        skio.imsave(str(root / "images" / f"im{index}.png"), image.astype(np.uint8), check_contrast=False)
        skio.imsave(str(root / "masks" / f"im{index}.png"), mask.astype(np.uint8) * 255, check_contrast=False)
    return root


def _train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--layout", "folders", "--out", str(out), "--encoder", "mini",
            "--no-pretrained", "--crop-size", "64", "--batch-size", "2", "--steps-per-epoch", "3", "--epochs", "1",
            "--device", "cpu", *extra]


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _folders_dataset(tmp_path_factory.mktemp("data") / "set")


@pytest.mark.parametrize("flags, name", [(["--epochs", "0"], "epochs"), (["--epochs", "-1"], "epochs"),
                                         (["--batch-size", "0"], "batch_size"), (["--crop-size", "48"], "crop_size"),
                                         (["--lr", "-1"], "lr"), (["--lr", "nan"], "lr")])
def test_bad_settings_are_refused_before_loading_data(tmp_path, capsys, flags, name):
    out = tmp_path / "m.safetensors"
    code = main(_train_args(tmp_path / "no-such-folder", out, *flags))
    err = capsys.readouterr().err
    assert code == 1
    errors = _errors(err)
    assert len(errors) == 1 and name in errors[0] and "no-such-folder" not in errors[0]
    assert "saved" not in err and not out.exists()


def test_same_seed_gives_bit_identical_weights(data, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name / "m.safetensors"
        torch.manual_seed(len(runs) + 100)  # the global generator state must not matter
        assert main(_train_args(data, out, "--seed", "3")) == 0
        runs.append(load_file(str(out)))
    first, second = runs
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_resume_with_a_corrupt_state_is_one_line(data, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    assert main(_train_args(data, out)) == 0
    state = tmp_path / "m.last.pt"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    code = main(_train_args(data, out, "--resume", "--epochs", "2"))
    err = capsys.readouterr().err
    assert code == 1
    errors = _errors(err)
    assert len(errors) == 1 and str(state) in errors[0]
    assert "Traceback" not in err


def _fit_with(monkeypatch, callback=None, raise_at_start=False):
    real_fit = napari_sgdc.train.fit

    def patched(*args, callbacks=None, **kwargs):
        if raise_at_start:
            raise KeyboardInterrupt
        return real_fit(*args, callbacks=[*(callbacks or []), callback], **kwargs)

    monkeypatch.setattr(napari_sgdc.train, "fit", patched)


def test_ctrl_c_saves_progress_and_says_how_to_resume(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.safetensors"
    handler_before = signal.getsignal(signal.SIGINT)

    def press_ctrl_c(event):
        if event["kind"] == "step" and event["step"] == 1:
            signal.raise_signal(signal.SIGINT)

    _fit_with(monkeypatch, press_ctrl_c)
    code = main(_train_args(data, out))
    err = capsys.readouterr().err
    assert code == 130
    assert signal.getsignal(signal.SIGINT) is handler_before
    state = torch.load(tmp_path / "m.last.pt", weights_only=True)
    assert state["step"] == 1
    assert "--resume" in err and "step 1" in err and "Traceback" not in err
    monkeypatch.undo()
    assert main(_train_args(data, out, "--resume")) == 0
    assert torch.load(tmp_path / "m.last.pt", weights_only=True)["step"] == 3


def test_ctrl_c_before_anything_is_saved_does_not_suggest_resume(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.safetensors"
    _fit_with(monkeypatch, raise_at_start=True)
    assert main(_train_args(data, out)) == 130
    err = capsys.readouterr().err
    assert "--resume" not in err and "nothing was saved" in err
    assert not (tmp_path / "m.last.pt").exists()
