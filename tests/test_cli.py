"""The napari-sgdc command line, in-process: help, predict, evaluate, bad inputs, end to end."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage import io as skio

from napari_sgdc.cli import main
from napari_sgdc.config import ModelConfig
from napari_sgdc.checkpoints import load_checkpoint, read_metadata, save_checkpoint
from napari_sgdc.model import build_model

torch.set_num_threads(1)

MINI = dict(encoder="mini", pretrained=False, decoder_channels=(32, 16, 16, 8, 8), sge_channels=16,
            guide_channels=8, heads=4)
DATA = Path(os.environ.get("NAPARI_SGDC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if ": error: " in line]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    semantic = save_checkpoint(folder / "semantic.safetensors", build_model(ModelConfig(**MINI)))
    torch.manual_seed(1)
    instance_model = build_model(ModelConfig(**MINI, task="instance"))
    with torch.no_grad():  # a random net whose mask is partly on, so instances exist
        instance_model.mask_head.weight.mul_(200.0)
    instance = save_checkpoint(folder / "instance.safetensors", instance_model)
    return {"semantic": semantic, "instance": instance}


def _write_inputs(folder: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rgb = folder / "rgb.png"
    skio.imsave(str(rgb), (rng.random((50, 70, 3)) * 255).astype(np.uint8), check_contrast=False)
    gray16 = folder / "gray16.tif"
    tifffile.imwrite(str(gray16), (rng.random((40, 33)) * 65535).astype(np.uint16))
    return {"rgb": rgb, "gray16": gray16}


@pytest.mark.parametrize("command", [[], ["predict"], ["train"], ["evaluate"], ["tune"]])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: napari-sgdc {' '.join(command)}".rstrip())
    if command:
        assert "--model" in out or "--data" in out


def test_help_lists_every_subcommand_tune_included(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage == "usage: napari-sgdc [-h] [--version] {predict,train,evaluate,tune,export} ..."
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--help"])
    assert exit_info.value.code == 0 and "--overwrite" in capsys.readouterr().out


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_predict_writes_all_files(tmp_path, checkpoints, capsys):
    inputs = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(checkpoints["semantic"]), "--out", str(out), "--device", "cpu",
                 "--tile", "64", str(inputs["rgb"]), str(inputs["gray16"])])
    assert code == 0
    for stem, shape in (("rgb", (50, 70)), ("gray16", (40, 33))):
        mask = skio.imread(str(out / f"{stem}_mask.png"))
        prob = tifffile.imread(str(out / f"{stem}_prob.tif"))
        boundary = tifffile.imread(str(out / f"{stem}_boundary.tif"))
        assert mask.dtype == np.uint8 and mask.shape == shape
        assert set(np.unique(mask)) <= {0, 255}
        assert prob.dtype == np.float32 and prob.shape == shape
        assert boundary.dtype == np.float32 and boundary.shape == shape
        np.testing.assert_array_equal(mask == 255, prob > 0.5)
        assert not (out / f"{stem}_labels.tif").exists()
    err = capsys.readouterr().err
    assert "predict" in err and _error_lines(err) == []


def test_predict_folder_input_and_instance_labels(tmp_path, checkpoints):
    _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(checkpoints["instance"]), "--out", str(out), "--device", "cpu",
                 "--threshold", "0.5", "--min-size", "1", str(tmp_path / "in")])
    assert code == 0
    labels = tifffile.imread(str(out / "rgb_labels.tif"))
    mask = skio.imread(str(out / "rgb_mask.png"))
    assert labels.dtype in (np.uint8, np.uint16) and labels.shape == (50, 70)
    assert labels.max() >= 1
    np.testing.assert_array_equal(labels > 0, mask == 255)
    assert (out / "gray16_labels.tif").exists()


def test_predict_defaults_to_the_models_tuned_marker_threshold(tmp_path, checkpoints, capsys):
    from napari_sgdc.inference import segment
    from napari_sgdc.checkpoints import load_checkpoint
    from napari_sgdc.postprocess import PostprocessOptions

    model = load_checkpoint(checkpoints["instance"])[0]
    rgb = (np.random.default_rng(3).random((64, 80, 3)) * 255).astype(np.uint8)
    first = segment(model, rgb, tile=None)
    boundary = first.boundary[first.mask]
    level = float(np.round(np.quantile(boundary, 0.2), 4))  # well below 0.5: fewer seeds, other labels
    model.config.split_level = level
    tuned = save_checkpoint(tmp_path / "tuned.safetensors", model)
    (tmp_path / "in").mkdir()
    skio.imsave(str(tmp_path / "in" / "hne.png"), rgb, check_contrast=False)

    def predicted(*flags: str) -> np.ndarray:
        out = tmp_path / f"out{len(flags)}"
        assert main(["predict", "--model", str(tuned), "--out", str(out), "--device", "cpu", "--tile", "0",
                     "--min-size", "1", *flags, str(tmp_path / "in")]) == 0
        return tifffile.imread(str(out / "hne_labels.tif"))

    default = predicted()
    expected = segment(model, rgb, PostprocessOptions(split_level=level, min_size=1), tile=None).labels
    np.testing.assert_array_equal(default, expected)
    assert not np.array_equal(default, predicted("--split-level", "0.5"))  # the flag still wins
    capsys.readouterr()
    old_flag = predicted("--boundary-threshold", "0.5", "--overwrite")  # the old name, for one release
    np.testing.assert_array_equal(old_flag, predicted("--split-level", "0.5", "--overwrite"))
    assert "--boundary-threshold is deprecated" in capsys.readouterr().err


def test_predict_bad_inputs_one_line_each_and_exit_1(tmp_path, checkpoints, capsys):
    inputs = _write_inputs(tmp_path / "in")
    unreadable = tmp_path / "in" / "broken.png"
    unreadable.write_bytes(b"this is not an image")
    two_channel = tmp_path / "in" / "two_channel.tif"
    tifffile.imwrite(str(two_channel), np.zeros((30, 40, 2), np.uint8))
    volume = tmp_path / "in" / "volume.tif"
    tifffile.imwrite(str(volume), np.zeros((2, 3, 30, 40, 3), np.uint8))
    missing = tmp_path / "in" / "missing.jpg"
    out = tmp_path / "out"
    code = main(["predict", "--model", str(checkpoints["semantic"]), "--out", str(out), "--device", "cpu",
                 str(unreadable), str(inputs["rgb"]), str(two_channel), str(missing), str(volume),
                 str(inputs["gray16"])])
    assert code == 1
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 4
    for bad in (unreadable, two_channel, missing, volume):
        assert sum(str(bad) in line for line in errors) == 1
    for stem in ("rgb", "gray16"):
        for suffix in ("_mask.png", "_prob.tif", "_boundary.tif"):
            assert (out / f"{stem}{suffix}").is_file()
    assert not any(out.glob("broken*")) and not any(out.glob("two_channel*"))


def test_predict_tta_and_uncertainty(tmp_path, checkpoints):
    inputs = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", "--model", str(checkpoints["instance"]), "--out", str(out), "--device", "cpu",
                 "--tta", "--uncertainty", str(inputs["rgb"])]) == 0
    uncertainty = tifffile.imread(str(out / "rgb_uncertainty.tif"))
    assert uncertainty.shape == (50, 70) and uncertainty.dtype == np.float32
    assert 0.0 <= uncertainty.min() and uncertainty.max() <= 1.0
    assert (out / "rgb_labels.tif").exists()


def test_predict_refuses_colliding_stems_before_writing(tmp_path, checkpoints, capsys):
    first = _write_inputs(tmp_path / "a")["rgb"]
    second = _write_inputs(tmp_path / "b")["rgb"]
    same_stem_jpg = tmp_path / "a" / "rgb.jpg"
    skio.imsave(str(same_stem_jpg), skio.imread(str(first)), check_contrast=False)
    for pair in ((first, second), (first, same_stem_jpg)):
        out = tmp_path / f"out_{pair[1].parent.name}_{pair[1].suffix[1:]}"
        code = main(["predict", "--model", str(checkpoints["semantic"]), "--out", str(out), "--device", "cpu",
                     *map(str, pair)])
        assert code == 1
        errors = _error_lines(capsys.readouterr().err)
        assert len(errors) == 1 and str(pair[0]) in errors[0] and str(pair[1]) in errors[0]
        assert not out.exists() or not any(out.iterdir())
    # the same file named twice is one input, not a clash
    out = tmp_path / "out_twice"
    assert main(["predict", "--model", str(checkpoints["semantic"]), "--out", str(out), "--device", "cpu",
                 str(first), str(tmp_path / "a" / ".." / "a" / "rgb.png")]) == 0
    assert "1 of 1" in capsys.readouterr().err


def test_predict_never_replaces_existing_files_without_overwrite(tmp_path, checkpoints, capsys):
    inputs = _write_inputs(tmp_path / "in")
    ground_truth = tmp_path / "in" / "rgb_mask.png"  # a reference mask in the `folders` layout
    ground_truth.write_bytes(b"precious")
    args = ["predict", "--model", str(checkpoints["semantic"]), "--out", str(tmp_path / "in"), "--device", "cpu",
            str(inputs["rgb"])]
    assert main(args) == 1
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "rgb_mask.png" in errors[0] and "--overwrite" in errors[0]
    assert ground_truth.read_bytes() == b"precious"
    assert not (tmp_path / "in" / "rgb_prob.tif").exists()
    assert main([*args, "--overwrite"]) == 0
    assert skio.imread(str(ground_truth)).shape == (50, 70)


@pytest.mark.parametrize("option, value, field", [
    ("--threshold", "1.5", "threshold"), ("--threshold", "-1", "threshold"), ("--threshold", "nan", "threshold"),
    ("--split-level", "2", "split_level"), ("--min-size", "-3", "min_size"),
    ("--tile", "17", "tile"), ("--tile", "-5", "tile"),
])
def test_predict_out_of_range_options_are_one_line(tmp_path, checkpoints, capsys, option, value, field):
    inputs = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(checkpoints["semantic"]), "--out", str(out), "--device", "cpu",
                 option, value, str(inputs["rgb"])])
    assert code == 1
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and field in errors[0]
    assert not out.exists() or not any(out.iterdir())


def test_predict_unknown_model_is_one_line(tmp_path, capsys):
    inputs = _write_inputs(tmp_path / "in")
    code = main(["predict", "--model", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "out"),
                 str(inputs["rgb"])])
    assert code == 1
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "nope.safetensors" in errors[0]


def _write_labelled_folders(folder: Path) -> None:
    rng = np.random.default_rng(3)
    for name in ("images", "masks", "instances"):
        (folder / name).mkdir(parents=True)
    for index in range(2):
        skio.imsave(str(folder / "images" / f"img{index}.png"), (rng.random((64, 48, 3)) * 255).astype(np.uint8),
                    check_contrast=False)
        instances = np.zeros((64, 48), np.uint16)
        instances[5:20, 5:20] = 3
        instances[30:50, 10:30] = 8
        skio.imsave(str(folder / "masks" / f"img{index}.png"), ((instances > 0) * 255).astype(np.uint8),
                    check_contrast=False)
        skio.imsave(str(folder / "instances" / f"img{index}.png"), instances, check_contrast=False)


def test_evaluate_folders_writes_csv(tmp_path, checkpoints, capsys):
    _write_labelled_folders(tmp_path)
    # an image without a mask: reported on one line, the others are still scored
    skio.imsave(str(tmp_path / "images" / "orphan.png"), np.zeros((64, 48, 3), np.uint8), check_contrast=False)
    table = tmp_path / "scores" / "per_image.csv"
    code = main(["evaluate", "--model", str(checkpoints["instance"]), "--images", str(tmp_path / "images"),
                 "--masks", str(tmp_path / "masks"), "--instances", str(tmp_path / "instances"),
                 "--csv", str(table), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 1
    errors = _error_lines(captured.err)
    assert len(errors) == 1 and "orphan.png" in errors[0]
    with open(table) as stream:
        rows = list(csv.DictReader(stream))
    assert [row["image"] for row in rows] == ["img0.png", "img1.png"]
    assert set(rows[0]) == {"image", "iou", "dice", "hd95", "boundary_f1", "aji", "object_f1", "pq"}
    for row in rows:
        assert 0.0 <= float(row["iou"]) <= 1.0 and 0.0 <= float(row["aji"]) <= 1.0
        assert float(row["hd95"]) >= 0.0
    for label in ("IoU", "Dice", "HD95", "AJI", "Object F1"):
        assert any(line.startswith(label) and "±" in line for line in captured.out.splitlines()), label


def test_evaluate_semantic_only(tmp_path, checkpoints, capsys):
    _write_labelled_folders(tmp_path)
    table = tmp_path / "s.csv"
    code = main(["evaluate", "--model", str(checkpoints["semantic"]), "--images", str(tmp_path / "images"),
                 "--masks", str(tmp_path / "masks"), "--csv", str(table), "--device", "cpu"])
    assert code == 0
    header = table.read_text().splitlines()[0]
    assert header == "image,iou,dice,hd95,boundary_f1"
    assert "AJI" not in capsys.readouterr().out


def test_evaluate_never_replaces_an_existing_csv_without_overwrite(tmp_path, checkpoints, capsys):
    _write_labelled_folders(tmp_path)
    table = tmp_path / "scores.csv"
    table.write_bytes(b"image,iou\nprecious,1\n")
    args = ["evaluate", "--model", str(checkpoints["semantic"]), "--images", str(tmp_path / "images"),
            "--masks", str(tmp_path / "masks"), "--csv", str(table), "--device", "cpu"]
    # refused before any work: not even the (missing) model is loaded
    missing_model = [*args[:2], str(tmp_path / "missing.safetensors"), *args[3:]]
    assert main(missing_model) == 1
    captured = capsys.readouterr()
    errors = _error_lines(captured.err)
    assert len(errors) == 1 and str(table) in errors[0] and "--overwrite" in errors[0]
    assert "missing.safetensors" not in captured.err and captured.out == ""
    assert table.read_bytes() == b"image,iou\nprecious,1\n"
    assert main([*args, "--overwrite"]) == 0
    assert table.read_text().splitlines()[0] == "image,iou,dice,hd95,boundary_f1"
    assert not [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]


def test_train_resume_without_state_is_one_line(tmp_path, capsys):
    code = main(["train", "--data", str(DATA / "ph2"), "--layout", "ph2", "--out", str(tmp_path / "m.safetensors"),
                 "--max-images", "1", "--encoder", "mini", "--resume", "--device", "cpu"])
    assert code == 1
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1 and "resume" in errors[0]


def test_end_to_end_train_evaluate_predict(tmp_path, capsys):
    """Trains 2 epochs on PH2 images and on CoNSeP patches, evaluates and predicts via the CLI."""
    assert (DATA / "ph2" / "splits.json").is_file(), f"dataset missing at {DATA}"
    ph2_ckpt = tmp_path / "ph2" / "model.safetensors"
    common = ["--encoder", "mini", "--crop-size", "64", "--batch-size", "2", "--device", "cpu",
              "--max-images", "4", "--max-val-images", "2"]
    # PH2: one epoch, then --resume to the second.
    assert main(["train", "--data", str(DATA / "ph2"), "--layout", "ph2", "--out", str(ph2_ckpt), "--epochs", "1",
                 *common]) == 0
    assert main(["train", "--data", str(DATA / "ph2"), "--layout", "ph2", "--out", str(ph2_ckpt), "--epochs", "2",
                 "--resume", *common]) == 0
    state = torch.load(ph2_ckpt.with_name("model.last.pt"), weights_only=True)
    assert state["step"] == 4 and len(state["history"]["epoch_losses"]) == 2  # 2 epochs x (4 images / batch 2)
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "epoch 2/2" in err and "iou" in err

    # CoNSeP: instance task from the layout, with a YAML config for the rest.
    config = tmp_path / "consep.yaml"
    config.write_text("model:\n  kernel_size: 5\ntrain:\n  warmup_steps: 1\n  boundary_width: 1\n")
    consep_ckpt = tmp_path / "consep" / "model.safetensors"
    assert main(["train", "--data", str(DATA / "consep"), "--layout", "consep", "--out", str(consep_ckpt),
                 "--epochs", "2", "--config", str(config), *common]) == 0
    metadata = read_metadata(consep_ckpt)
    assert metadata["model_config"]["task"] == "instance"
    assert metadata["model_config"]["kernel_size"] == 5
    assert metadata["train_config"]["boundary_width"] == 1 and metadata["train_config"]["epochs"] == 2
    model, _ = load_checkpoint(consep_ckpt)
    assert model.config.encoder == "mini"
    capsys.readouterr()

    # Evaluate both on their test splits.
    ph2_csv = tmp_path / "ph2.csv"
    assert main(["evaluate", "--model", str(ph2_ckpt), "--layout", "ph2", "--data", str(DATA / "ph2"),
                 "--split", "test", "--max-images", "2", "--csv", str(ph2_csv), "--device", "cpu"]) == 0
    assert len(ph2_csv.read_text().splitlines()) == 3
    consep_csv = tmp_path / "consep.csv"
    assert main(["evaluate", "--model", str(consep_ckpt), "--layout", "consep", "--data", str(DATA / "consep"),
                 "--split", "test", "--max-images", "2", "--csv", str(consep_csv), "--device", "cpu"]) == 0
    with open(consep_csv) as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 and "aji" in rows[0] and "object_f1" in rows[0]
    out = capsys.readouterr().out
    assert sum(line.startswith("IoU ") for line in out.splitlines()) == 2 and "AJI" in out
    assert sum(line.startswith("Pooled IoU / Dice") for line in out.splitlines()) == 2

    # Predict through the CLI.
    predictions = tmp_path / "pred"
    ph2_image = sorted((DATA / "ph2" / "images").glob("*.jpg"))[0]
    consep_image = sorted((DATA / "consep" / "test" / "images").glob("*.jpg"))[0]
    assert main(["predict", "--model", str(ph2_ckpt), "--out", str(predictions), "--device", "cpu",
                 str(ph2_image)]) == 0
    assert main(["predict", "--model", str(consep_ckpt), "--out", str(predictions), "--device", "cpu",
                 str(consep_image)]) == 0
    ph2_shape = skio.imread(str(ph2_image)).shape[:2]
    assert skio.imread(str(predictions / f"{ph2_image.stem}_mask.png")).shape == ph2_shape
    assert tifffile.imread(str(predictions / f"{ph2_image.stem}_prob.tif")).shape == ph2_shape
    assert not (predictions / f"{ph2_image.stem}_labels.tif").exists()
    labels = tifffile.imread(str(predictions / f"{consep_image.stem}_labels.tif"))
    assert labels.shape == (256, 256) and labels.dtype in (np.uint8, np.uint16, np.uint32)
    assert tifffile.imread(str(predictions / f"{consep_image.stem}_boundary.tif")).dtype == np.float32


def test_train_on_several_splits_and_datasets_at_a_working_resolution(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  resize_long_side: 96\n  single_object: true\n")
    ckpt = tmp_path / "ph2.safetensors"
    assert main(["train", "--data", str(DATA / "ph2"), "--layout", "ph2", "--out", str(ckpt), "--epochs", "1",
                 "--config", str(config), "--train-splits", "train,val", "--val-split", "none", "--encoder", "mini",
                 "--crop-size", "64", "--batch-size", "2", "--device", "cpu", "--max-images", "3"]) == 0
    metadata = read_metadata(ckpt)
    assert metadata["model_config"]["resize_long_side"] == 96 and metadata["model_config"]["single_object"]
    assert metadata["provenance"]["n_train"] == 3 and metadata["provenance"]["n_val"] == 0

    nuclei = tmp_path / "nuclei.safetensors"
    assert main(["train", "--data", str(DATA / "consep"), "--layout", "consep", "--out", str(nuclei),
                 "--also", "monuseg", str(DATA / "monuseg"), "--val-split", "none", "--encoder", "mini",
                 "--crop-size", "64", "--batch-size", "8", "--device", "cpu", "--max-images", "2",
                 "--steps-per-epoch", "1", "--epochs", "1"]) == 0
    provenance = read_metadata(nuclei)["provenance"]
    assert provenance["n_train"] == 2 + 30 and provenance["also"] == [["monuseg", str(DATA / "monuseg")]]


def test_train_validates_on_another_dataset_too_with_dermoscopy_augmentation(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model:\n  resize_long_side: 96\ntrain:\n  aspect_jitter: 1.4\n  artifacts: true\n")
    ckpt = tmp_path / "derm.safetensors"
    assert main(["train", "--data", str(DATA / "isic2018"), "--layout", "ph2", "--out", str(ckpt), "--epochs", "1",
                 "--config", str(config), "--also", "ph2", str(DATA / "ph2"), "--also-val", "ph2", str(DATA / "ph2"),
                 "--encoder", "mini", "--crop-size", "64", "--batch-size", "2", "--steps-per-epoch", "1",
                 "--device", "cpu", "--max-images", "2", "--max-val-images", "2"]) == 0
    metadata = read_metadata(ckpt)
    assert metadata["provenance"]["n_train"] == 2 + 120 and metadata["provenance"]["n_val"] == 2 + 2
    assert metadata["provenance"]["also_val"] == [["ph2", str(DATA / "ph2")]]
    assert metadata["train_config"]["aspect_jitter"] == 1.4 and metadata["train_config"]["artifacts"] is True


@pytest.mark.parametrize("instance_map", ["distance", "hover"])
def test_train_and_evaluate_an_instance_map_model(tmp_path, capsys, instance_map):
    ckpt = tmp_path / f"{instance_map}.safetensors"
    assert main(["train", "--data", str(DATA / "consep"), "--layout", "consep", "--out", str(ckpt),
                 "--instance-map", instance_map, "--encoder", "mini", "--crop-size", "64", "--batch-size", "2",
                 "--steps-per-epoch", "2", "--epochs", "1", "--device", "cpu", "--max-images", "2",
                 "--max-val-images", "2"]) == 0
    metadata = read_metadata(ckpt)
    assert metadata["model_config"]["instance_map"] == instance_map
    assert "aji" in metadata["metrics"]  # validated by decoding the new head
    tuning = metadata["metrics"]["postprocess_tuning"]  # train ends by tuning the defaults on validation
    assert tuning["n_images"] == 2 and tuning["aji"] >= tuning["aji_default"]
    assert {name: metadata["model_config"][name] for name in ("threshold", "split_level", "min_size")} == \
        {name: tuning[name] for name in ("threshold", "split_level", "min_size")}
    model = load_checkpoint(ckpt)[0]
    assert model.config.instance_channels == (1 if instance_map == "distance" else 2)
    table = tmp_path / "scores.csv"
    capsys.readouterr()
    assert main(["evaluate", "--model", str(ckpt), "--layout", "consep", "--data", str(DATA / "consep"),
                 "--split", "test", "--max-images", "2", "--csv", str(table), "--device", "cpu"]) == 0
    assert "PQ (panoptic quality)" in capsys.readouterr().out


def test_tune_writes_a_copy_with_the_best_defaults_and_never_touches_the_input(tmp_path, capsys):
    from napari_sgdc.checkpoints import save_checkpoint
    from napari_sgdc.model import build_model, tiny_config

    torch.manual_seed(0)
    source = save_checkpoint(tmp_path / "in.safetensors", build_model(tiny_config(task="instance")))
    before = source.read_bytes()
    out = tmp_path / "tuned.safetensors"
    common = ["--data", str(DATA / "consep"), "--layout", "consep", "--max-images", "2", "--device", "cpu"]
    assert main(["tune", "--model", str(source), "--out", str(out), *common]) == 0
    assert "validation AJI" in capsys.readouterr().err
    assert source.read_bytes() == before
    metadata = read_metadata(out)
    tuning = metadata["metrics"]["postprocess_tuning"]
    assert metadata["model_config"]["min_size"] == tuning["min_size"]
    assert metadata["model_config"]["threshold"] == tuning["threshold"]
    assert main(["tune", "--model", str(source), "--out", str(out), *common]) == 1  # exists: not replaced
    assert "exists" in capsys.readouterr().err
    assert main(["tune", "--model", str(source), "--out", str(source), "--overwrite", *common]) == 1
    assert "never changed" in capsys.readouterr().err and source.read_bytes() == before
    semantic = save_checkpoint(tmp_path / "semantic.safetensors", build_model(tiny_config()))
    assert main(["tune", "--model", str(semantic), "--out", str(tmp_path / "x.safetensors"), *common]) == 1
    assert "instance model" in capsys.readouterr().err


def test_predict_help_states_the_label_types_pages_and_mpp_rule(capsys):
    """Findings 13, 15 and 17: the help says what --mpp does to slides, the label file types and pages."""
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "for slides it overrides their metadata" in out
    assert "S_labels.tif (uint16; uint32 when an image has more than 65,535 objects" in out
    assert "labels/nuclei are uint32" in out and "S_p0_mask.png" in out
