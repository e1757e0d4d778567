"""bioimage.io export: packages validate offline, their test tensors reproduce through the
TorchScript and ONNX weights (and bioimageio.core where installed), and napari-sgdc loads
them back and segments identically."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("bioimageio.spec")
pytest.importorskip("onnx")

from napari_sgdc import export, load_model, segment  # noqa: E402
from napari_sgdc.checkpoints import CheckpointError, read_model_config, save_checkpoint  # noqa: E402
from napari_sgdc.cli import main  # noqa: E402
from napari_sgdc.config import TrainConfig  # noqa: E402
from napari_sgdc.model import build_model, tiny_config  # noqa: E402
from napari_sgdc.samples import read_sample  # noqa: E402
from napari_sgdc.train import finetune  # noqa: E402

TOLERANCE = 1e-4  # max absolute difference of a reproduced test output (float32 maps in [-1, 1])


@pytest.fixture
def offline(monkeypatch):
    """Any download would go to a closed port and fail."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


@pytest.fixture(scope="module")
def nuclei_package(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "nuclei.zip"
    assert main(["export", "--model", "nuclei", "--format", "bioimageio", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def finetuned_package(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny distance-map instance model fine-tuned for 2 steps, saved as the Fine-tune dock saves it."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("finetuned")
    model = build_model(tiny_config(task="instance", instance_map="distance", mpp=0.5))
    image = read_sample("nuclei")[:96, :96]
    labels = np.zeros((96, 96), np.int32)
    labels[10:30, 10:30], labels[40:70, 50:80] = 1, 2
    config = TrainConfig(epochs=1, max_steps=2, steps_per_epoch=2, batch_size=2, crop_size=64, lr_encoder=0.0,
                         warmup_steps=1, freeze_encoder=True, freeze_batchnorm=True, val_every=0, device="cpu")
    history = finetune(model, [image], [labels], config)
    provenance = {"base_model": "tiny", "finetuned_with": "napari-sgdc GUI", "corrected_images": 1,
                  "finetune_steps": int(history.steps),
                  "finetune_runs": [{"images": ["he"], "planes": 1, "steps": int(history.steps)}]}
    checkpoint = save_checkpoint(folder / "tuned.safetensors", model, train_config=config, provenance=provenance)
    return export(checkpoint, folder / "tuned.zip"), checkpoint


def _files(package: Path) -> tuple[dict, dict[str, bytes]]:
    with zipfile.ZipFile(package) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    return yaml.safe_load(files["bioimageio.yaml"]), files


def _array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data))


def _reproduce(package: Path) -> dict[str, float]:
    """Max abs difference of each weight format's outputs from the package's test outputs."""
    import onnxruntime

    rdf, files = _files(package)
    image = _array(files[rdf["inputs"][0]["test_tensor"]["source"]])
    assert rdf["inputs"][0]["preprocessing"][0]["kwargs"]["gain"] == pytest.approx(1 / 255)
    x = image.astype(np.float32) / 255.0
    expected = [_array(files[o["test_tensor"]["source"]]) for o in rdf["outputs"]]
    scripted = torch.jit.load(io.BytesIO(files[rdf["weights"]["torchscript"]["source"]]))
    with torch.no_grad():
        jit_out = [t.numpy() for t in scripted(torch.from_numpy(x))]
    session = onnxruntime.InferenceSession(files[rdf["weights"]["onnx"]["source"]],
                                           providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: x})
    return {fmt: max(float(np.abs(a - b).max()) for a, b in zip(outs, expected))
            for fmt, outs in (("torchscript", jit_out), ("onnx", onnx_out))}


def _validate_offline(package: Path) -> None:
    from bioimageio.spec import InvalidDescr, load_description

    descr = load_description(package, perform_io_checks=True)  # hashes every file; nothing to download
    assert not isinstance(descr, InvalidDescr), descr.validation_summary.format()


def test_builtin_package_validates_offline_and_reproduces(nuclei_package, offline):
    _validate_offline(nuclei_package)
    rdf, files = _files(nuclei_package)
    assert rdf["format_version"].startswith("0.5.")
    assert [o["id"] for o in rdf["outputs"]] == ["probability", "boundary", "hover"]
    assert rdf["inputs"][0]["axes"][2] == {"type": "space", "id": "y", "size": {"min": 64, "step": 32},
                                           "scale": 0.25, "unit": "micrometer"}
    assert set(rdf["weights"]) == {"pytorch_state_dict", "torchscript", "onnx"}
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["import_from"] == "napari_sgdc.modelzoo.network"
    assert any("2602.23496" in c["text"] for c in rdf["cite"])
    decoding = rdf["config"]["napari_sgdc"]["decoding"]
    config = read_model_config("nuclei")  # the shipped model's tuned defaults travel with the package
    assert (decoding["threshold"], decoding["split_level"], decoding["min_size"], decoding["instance_map"]) == \
        (config.threshold, config.split_level, config.min_size, "hover")
    licences = {d["name"]: d["licence"] for d in rdf["config"]["napari_sgdc"]["training_data"]}
    assert set(licences) == {"consep", "monuseg", "gbm40"} and "CC BY-NC-SA" in licences["monuseg"]
    assert b"split level 0.1" in files["README.md"] and files["cover.png"].startswith(b"\x89PNG")
    assert _array(files["test_image.npy"]).shape == (1, 3, 256, 256)
    differences = _reproduce(nuclei_package)
    assert max(differences.values()) <= TOLERANCE, differences


def test_builtin_package_loads_back_and_segments_identically(nuclei_package, tmp_path):
    image = read_sample("nuclei")[:192, :160]
    reference = segment(load_model("nuclei", device="cpu"), image)
    folder = tmp_path / "unpacked"
    zipfile.ZipFile(nuclei_package).extractall(folder)
    for source in (nuclei_package, folder):
        model = load_model(source, device="cpu")
        assert model.config == load_model("nuclei", device="cpu").config
        result = segment(model, image)
        np.testing.assert_array_equal(result.labels, reference.labels)
        np.testing.assert_array_equal(result.probability, reference.probability)


def test_finetuned_package_carries_provenance_and_reproduces(finetuned_package, offline):
    package, checkpoint = finetuned_package
    _validate_offline(package)
    rdf, files = _files(package)
    tuned = rdf["config"]["napari_sgdc"]["finetuned"]
    assert (tuned["base_model"], tuned["training_pairs"], tuned["steps"]) == ("tiny", 1, 2)
    assert [o["id"] for o in rdf["outputs"]] == ["probability", "boundary", "distance"]
    assert b"Fine-tuning provenance" in files["README.md"]
    differences = _reproduce(package)
    assert max(differences.values()) <= TOLERANCE, differences
    image = read_sample("nuclei")[:96, :128]
    np.testing.assert_array_equal(segment(load_model(package, device="cpu"), image).labels,
                                  segment(load_model(checkpoint, device="cpu"), image).labels)


def test_bioimageio_core_runs_the_test_tensors(finetuned_package):
    import bioimageio.core as core  # installed by scripts/install.sh (without its spec pin: see there)

    for weight_format in ("torchscript", "onnx", "pytorch_state_dict"):
        summary = core.test_model(finetuned_package[0], weight_format=weight_format)
        assert summary.status == "passed", summary.format()


def test_export_refuses_bad_requests(nuclei_package, tmp_path, capsys):
    before = nuclei_package.read_bytes()
    with pytest.raises(FileExistsError):
        export("nuclei", nuclei_package)
    assert nuclei_package.read_bytes() == before
    with pytest.raises(ValueError, match=".zip"):
        export("nuclei", tmp_path / "model.tar")
    with pytest.raises(ValueError, match="format"):
        export("nuclei", tmp_path / "m.zip", format="onnx")
    assert main(["export", "--model", "nope", "--out", str(tmp_path / "m.zip")]) == 1
    assert "no built-in model" in capsys.readouterr().err
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("rdf.yaml", "type: model\nname: other\n")
    with pytest.raises(CheckpointError, match="not made by napari-sgdc"):
        load_model(foreign, device="cpu")


def test_version_flag(capsys):
    from napari_sgdc import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"napari-sgdc {__version__}"
