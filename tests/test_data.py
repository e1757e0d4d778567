"""Data loading, boundary targets, augmentation and input conversion."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import io as skio

from napari_sgdc.data import (
    CONSEP_VAL_PARENTS,
    Sample,
    SegmentationDataset,
    boundary_target,
    load_samples,
    read_rgb,
    to_float_rgb,
)
from napari_sgdc.data.transforms import (
    DERMOSCOPY_ARTIFACTS,
    augment_pair,
    dermoscopy_artifacts,
    pad_to_size,
    random_scale_crop,
    stain_jitter,
)
from napari_sgdc.files import read_mask

DATA = Path(os.environ.get("NAPARI_SGDC_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


# ----------------------------------------------------------------------------- loaders


def test_ph2_splits_and_max_images():
    samples = load_samples(DATA / "ph2", "ph2", "train", max_images=2)
    assert [s.name for s in samples] == ["IMD003", "IMD004"]  # first train ids in splits.json
    sample = samples[0]
    assert sample.image.dtype == np.uint8 and sample.image.ndim == 3 and sample.image.shape[2] == 3
    assert sample.mask.dtype == bool and sample.mask.shape == sample.image.shape[:2]
    assert 0.01 < sample.mask.mean() < 0.99
    val = load_samples(DATA / "ph2", "ph2", "val", max_images=1)
    test = load_samples(DATA / "ph2", "ph2", "test", max_images=1)
    assert len({samples[0].name, val[0].name, test[0].name}) == 3


def test_consep_val_split_is_by_parent_tile():
    val = load_samples(DATA / "consep", "consep", "val")
    assert len(val) == 16 * len(CONSEP_VAL_PARENTS)
    parents = {int(s.name.split("_")[1]) for s in val}
    assert parents == set(CONSEP_VAL_PARENTS)
    train = load_samples(DATA / "consep", "consep", "train", max_images=20)
    assert len(train) == 20
    assert all(int(s.name.split("_")[1]) not in CONSEP_VAL_PARENTS for s in train)
    # natural order: train_1_000 .. train_1_015, then train_2_000
    assert train[0].name == "train_1_000" and train[16].name == "train_2_000"
    sample = train[0]
    assert sample.mask.dtype == np.int32 and sample.mask.shape == (256, 256)
    assert len(np.unique(sample.mask)) > 10  # many nuclei with their own ids
    semantic = load_samples(DATA / "consep", "consep", "test", max_images=1, task="semantic")
    assert semantic[0].mask.dtype == bool and semantic[0].name == "test_1_000"


def test_monuseg_instances_where_available_else_masks():
    samples = load_samples(DATA / "monuseg", "monuseg", "train", max_images=2)
    # TCGA-18-5592 has no instance map (components of the binary mask); TCGA-21-5784 has one.
    assert [s.name for s in samples] == ["TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1"]
    assert all(s.mask.dtype == np.int32 for s in samples)
    assert samples[1].mask.max() == 398  # contiguous ids 1..398 from the instance map
    assert samples[0].mask.max() > 50  # connected components of the binary mask
    assert load_samples(DATA / "monuseg", "monuseg", "val") == []


def test_monuseg_instances_layout_keeps_only_images_with_instance_maps():
    pairs = [p for p in (DATA / "monuseg" / "train" / "instances").glob("*.png")]
    samples = load_samples(DATA / "monuseg", "monuseg-instances", "train", max_images=2)
    assert len(pairs) == 13 and samples[0].name == "TCGA-21-5784-01Z-00-DX1"  # TCGA-18-5592 has only a mask
    assert samples[0].mask.max() == 398
    assert load_samples(DATA / "monuseg", "monuseg-instances", "test") == []


def test_monuseg_masks_layout_is_the_complement_of_monuseg_instances():
    masks = {s.name for s in load_samples(DATA / "monuseg", "monuseg-masks", "train")}
    instances = {s.name for s in load_samples(DATA / "monuseg", "monuseg-instances", "train")}
    everything = {s.name for s in load_samples(DATA / "monuseg", "monuseg", "train")}
    assert len(masks) == 17 and "TCGA-18-5592-01Z-00-DX1" in masks  # the images without an instance map
    assert not masks & instances and masks | instances == everything


def _write_folder(root: Path, n: int = 3, instance: bool = False) -> None:
    (root / "images").mkdir(parents=True)
    (root / ("instances" if instance else "masks")).mkdir()
    rng = np.random.default_rng(1)
    for i in range(n):
        image = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
        skio.imsave(root / "images" / f"img{i}.png", image, check_contrast=False)
        if instance:
            labels = np.zeros((40, 50), np.uint16)
            labels[5:15, 5:15] = 7
            labels[5:15, 15:25] = 300  # touching the first
            skio.imsave(root / "instances" / f"img{i}.tif", labels, check_contrast=False)
        else:
            mask = np.zeros((40, 50), np.uint8)
            mask[10:30, 10:30] = 255
            skio.imsave(root / "masks" / f"img{i}_mask.png", mask, check_contrast=False)


def test_folders_semantic_and_instance(tmp_path):
    _write_folder(tmp_path / "sem")
    samples = load_samples(tmp_path / "sem", "folders", max_images=2)
    assert len(samples) == 2 and samples[0].mask.dtype == bool
    assert samples[0].mask.sum() == 400
    _write_folder(tmp_path / "inst", instance=True)
    samples = load_samples(tmp_path / "inst", "folders")
    assert len(samples) == 3 and samples[0].mask.dtype == np.int32
    assert set(np.unique(samples[0].mask)) == {0, 7, 300}
    assert load_samples(tmp_path / "sem", "folders", "val") == []


def test_bad_files_raise_value_error_naming_the_file(tmp_path):
    _write_folder(tmp_path)
    bad = tmp_path / "images" / "img1.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match="img1.png"):
        load_samples(tmp_path, "folders")
    with pytest.raises(ValueError, match="broken.jpg"):
        (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8garbage")
        read_rgb(tmp_path / "broken.jpg")
    two_channel = tmp_path / "two.tif"
    import tifffile

    tifffile.imwrite(two_channel, np.zeros((8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match="two.tif"):
        read_rgb(two_channel)
    # mask with another size than its image
    (tmp_path / "masks" / "img2_mask.png").unlink()
    skio.imsave(tmp_path / "masks" / "img2_mask.png", np.zeros((10, 10), np.uint8), check_contrast=False)
    bad.unlink()
    (tmp_path / "masks" / "img1_mask.png").unlink()
    with pytest.raises(ValueError, match="img2"):
        load_samples(tmp_path, "folders")
    with pytest.raises(ValueError, match="layout"):
        load_samples(tmp_path, "nope")


def test_read_mask_rgb_and_instances(tmp_path):
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[1:3, 1:3] = 255
    rgb[4:6, 4:6] = 255
    skio.imsave(tmp_path / "m.png", rgb, check_contrast=False)
    assert read_mask(tmp_path / "m.png").sum() == 8
    labels = read_mask(tmp_path / "m.png", instance=True)
    assert labels.max() == 2  # two separate components


# ----------------------------------------------------------------------------- targets


def test_boundary_band_width_semantic():
    mask = np.zeros((30, 30), bool)
    mask[10:20, 10:20] = True
    band1 = boundary_target(mask, 1)
    assert band1.sum() == 36 and not (band1 & ~mask).any()  # inner rim of a 10x10 square
    band3 = boundary_target(mask, 3)
    # two pixels inside, one outside along each side (square corners excluded outside)
    assert (band3 & mask).sum() == 100 - 36
    assert (band3 & ~mask).sum() == 40
    assert not band3[15, 15] and not band3[0, 0]
    full = np.ones((8, 8), bool)
    assert not boundary_target(full, 3).any()  # the image border is not a boundary
    assert not boundary_target(np.zeros((8, 8), bool), 3).any()
    with pytest.raises(ValueError):
        boundary_target(np.zeros((2, 3, 4)), 3)


def test_touching_instances_are_separated():
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 5:15] = 1
    labels[5:15, 15:25] = 2  # shares the column boundary 14|15 with instance 1
    semantic = boundary_target(labels > 0, 1, instance=False)
    instance = boundary_target(labels, 1, instance=True)
    assert not semantic[10, 14] and not semantic[10, 15]  # one merged blob: no line between
    assert instance[10, 14] and instance[10, 15]  # the contact line is a boundary
    # after removing the boundary, the interiors are two separate components
    from skimage.measure import label

    cores = label((labels > 0) & ~instance, connectivity=1)
    assert cores.max() == 2


# ----------------------------------------------------------------------------- transforms


def test_to_float_rgb_cases():
    gray8 = np.array([[0, 255]], np.uint8)
    out = to_float_rgb(gray8)
    assert out.shape == (1, 2, 3) and out.dtype == np.float32
    assert out[0, 1].tolist() == [1.0, 1.0, 1.0] and out[0, 0].tolist() == [0.0, 0.0, 0.0]
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = 7
    out = to_float_rgb(rgba)
    assert out.shape == (4, 5, 3) and np.all(out[..., 0] == 1.0) and np.all(out[..., 1:] == 0.0)
    out = to_float_rgb(np.full((3, 3, 3), 65535, np.uint16))
    assert np.allclose(out, 1.0)
    out = to_float_rgb(np.full((3, 3), 32768, np.uint16))
    assert np.allclose(out, 32768 / 65535)
    assert np.allclose(to_float_rgb(np.full((2, 2, 3), 0.25, np.float64)), 0.25)
    assert np.allclose(to_float_rgb(np.full((2, 2, 3), 127.5, np.float32)), 0.5)
    assert to_float_rgb(np.zeros((2, 2, 1), np.uint8)).shape == (2, 2, 3)
    for bad in (np.zeros((2, 4, 4, 3)), np.zeros((4, 4, 2)), np.zeros((3, 16, 16)), np.zeros((0, 4))):
        with pytest.raises(ValueError):
            to_float_rgb(bad)
    with pytest.raises(ValueError, match="channels"):
        to_float_rgb(np.zeros((4, 4, 2), np.uint8))


def test_pad_and_crop_of_small_images():
    image = np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3)
    mask = np.zeros((10, 12), bool)
    mask[2:5, 3:7] = True
    padded = pad_to_size(image, 64, 64)
    assert padded.shape == (64, 64, 3)
    assert np.array_equal(padded[:10, :12], image)
    crop_image, crop_mask = random_scale_crop(image, mask, 32, np.random.default_rng(0))
    assert crop_image.shape == (32, 32, 3) and crop_mask.shape == (32, 32)
    assert crop_image.dtype == np.uint8 and crop_mask.dtype == bool


def test_augmentation_shapes_ranges_and_determinism():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    labels = np.zeros((120, 90), np.int32)
    labels[40:60, 30:50] = 5
    labels[40:60, 50:70] = 9
    results = [augment_pair(image, labels, 64, np.random.default_rng(42), stain=True) for _ in range(2)]
    (img_a, lab_a), (img_b, lab_b) = results
    assert img_a.shape == (64, 64, 3) and img_a.dtype == np.float32
    assert 0.0 <= img_a.min() and img_a.max() <= 1.0
    assert lab_a.shape == (64, 64) and lab_a.dtype == np.int32
    assert set(np.unique(lab_a)) <= {0, 5, 9}  # nearest resampling keeps instance ids
    assert np.array_equal(img_a, img_b) and np.array_equal(lab_a, lab_b)
    img_c, _ = augment_pair(image, labels, 64, np.random.default_rng(43), stain=True)
    assert not np.array_equal(img_a, img_c)
    # foreground-centred crops: with foreground_prob=1 every crop contains foreground
    for seed in range(10):
        _, crop_mask = random_scale_crop(image, labels, 32, np.random.default_rng(seed), foreground_prob=1.0)
        assert crop_mask.any()


def test_aspect_jitter_stretches_the_crop_within_its_range():
    image = np.zeros((200, 200, 3), np.uint8)
    mask = np.zeros((200, 200), bool)
    mask[60:140, 60:140] = True  # an 80 x 80 square
    ratios = []
    for seed in range(30):
        _, crop = random_scale_crop(image, mask, 96, np.random.default_rng(seed), scale_range=(0.5, 0.5),
                                    foreground_prob=1.0, aspect_jitter=1.5)
        assert crop.shape == (96, 96)
        rows, cols = np.nonzero(crop.any(axis=1))[0], np.nonzero(crop.any(axis=0))[0]
        ratios.append((np.ptp(rows) + 1) / (np.ptp(cols) + 1))
    assert min(ratios) >= 1 / 1.5 - 0.05 and max(ratios) <= 1.5 + 0.05  # within the jitter range
    assert min(ratios) < 0.9 and max(ratios) > 1.1  # stretched both ways
    # aspect_jitter=1 draws nothing extra: the same crops as before the option existed
    plain = random_scale_crop(image, mask, 96, np.random.default_rng(0))
    same = random_scale_crop(image, mask, 96, np.random.default_rng(0), aspect_jitter=1.0)
    assert all(np.array_equal(a, b) for a, b in zip(plain, same))


@pytest.mark.parametrize("name", sorted(DERMOSCOPY_ARTIFACTS))
def test_each_dermoscopy_artifact_changes_the_image_and_keeps_its_range(name):
    draw, probability = DERMOSCOPY_ARTIFACTS[name]
    assert 0 < probability < 1
    image = np.full((96, 128, 3), 0.6, np.float32)
    changed = [np.abs(draw(image, np.random.default_rng(seed)) - image).max() > 0.1 for seed in range(5)]
    assert all(changed)
    out = dermoscopy_artifacts(image, np.random.default_rng(0))
    assert out.shape == image.shape and out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0


def test_artifacts_leave_the_mask_and_geometry_alone():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (150, 150, 3), dtype=np.uint8)
    mask = np.zeros((150, 150), bool)
    mask[30:100, 40:120] = True
    differs = 0
    for seed in range(12):
        plain_image, plain_mask = augment_pair(image, mask, 64, np.random.default_rng(seed), aspect_jitter=1.4)
        art_image, art_mask = augment_pair(image, mask, 64, np.random.default_rng(seed), aspect_jitter=1.4,
                                           artifacts=True)
        assert np.array_equal(plain_mask, art_mask)
        differs += not np.allclose(plain_image, art_image)
    assert 0 < differs < 12  # drawn with probabilities: some crops get artifacts, some none


def test_stain_jitter_changes_colour_but_keeps_range():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.2, 0.9, (32, 32, 3)).astype(np.float32)
    out = stain_jitter(image, np.random.default_rng(1), sigma_scale=0.1, sigma_shift=0.02)
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    difference = np.abs(out - image).mean()
    assert 0.001 < difference < 0.2


def test_segmentation_dataset_items():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)
    labels = np.zeros((50, 70), np.int32)
    labels[10:30, 10:30] = 1
    labels[10:30, 30:50] = 2
    samples = [Sample("a", image, labels)]
    dataset = SegmentationDataset(samples, crop_size=64, augment=True, boundary_width=2, stain_jitter=True)
    assert dataset.instance
    item = dataset[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 64, 64) and item["edge"].shape == (1, 64, 64)
    assert set(torch.unique(item["mask"]).tolist()) <= {0.0, 1.0}
    assert torch.equal(dataset[0]["image"], item["image"])  # same (seed, epoch, index)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["image"], item["image"])
    full = SegmentationDataset(samples, crop_size=None, augment=False, boundary_width=1)
    item = full[0]
    assert item["image"].shape == (3, 50, 70)
    assert item["mask"].sum() == 800
    assert item["edge"][0, 20, 29] == 1 and item["edge"][0, 20, 30] == 1  # contact line
    with pytest.raises(ValueError):
        SegmentationDataset([], crop_size=64)


def test_resize_samples_to_a_working_resolution():
    from napari_sgdc.data import Sample, resize_samples

    image = np.zeros((60, 90, 3), np.uint8)
    image[:, 45:] = 200
    labels = np.zeros((60, 90), np.int32)
    labels[10:30, 10:40] = 7
    (resized,) = resize_samples([Sample("a", image, labels)], 45)
    assert resized.image.shape == (30, 45, 3) and resized.image.dtype == np.uint8
    assert resized.mask.shape == (30, 45) and resized.mask.dtype == np.int32
    assert set(np.unique(resized.mask)) == {0, 7}  # nearest neighbour: no new label values
    assert np.count_nonzero(resized.mask == 7) == 10 * 15
    assert resized.image[:, :20].max() < 50 and resized.image[:, 25:].min() > 150
    assert resize_samples([Sample("a", image, labels)], 0)[0].image is image


def test_gbm40_is_partly_annotated_so_far_unlabelled_pixels_weigh_nothing():
    from napari_sgdc.data import resize_samples
    from napari_sgdc.data.datasets import GBM40_RING_PX

    samples = load_samples(DATA / "gbm40", "gbm40", "train", max_images=2)
    assert len(samples) == 2 and samples[0].is_instance and samples[0].mask.shape == (512, 512)
    assert load_samples(DATA / "gbm40", "gbm40", "val") == []
    sample = samples[0]
    weight = sample.weight
    assert weight.shape == sample.mask.shape and set(np.unique(weight)) == {0.0, 1.0}
    assert np.all(weight[sample.mask > 0] == 1)  # every annotated nucleus counts
    far = ndimage_distance(sample.mask > 0) > GBM40_RING_PX
    assert far.any() and np.all(weight[far] == 0)  # unlabelled pixels far from annotations are ignored
    item = SegmentationDataset(samples, crop_size=128, augment=True, task="instance")[0]
    assert item["weight"].shape == (1, 128, 128) and set(np.unique(item["weight"].numpy())) <= {0.0, 1.0}
    smaller = resize_samples(samples, 256)[0]
    assert smaller.weight.shape == (256, 256)
    mixed = SegmentationDataset([Sample("plain", sample.image, sample.mask), sample], crop_size=64, augment=False)
    assert float(mixed[0]["weight"].min()) == 1.0  # a fully annotated sample counts everywhere


def ndimage_distance(annotated: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(~annotated)


# ----------------------------------------------------------------------------- the layout table


def test_every_layout_has_one_row_with_task_classes_stain_and_splits():
    from napari_sgdc.data.datasets import LAYOUT_TABLE, LAYOUTS, SPLITS, layout_info

    assert LAYOUTS == tuple(LAYOUT_TABLE)
    for name, row in LAYOUT_TABLE.items():
        assert row.name == name and layout_info(name) is row
        assert row.task in (None, "semantic", "instance")
        assert row.stain in (None, "H&E", "dermoscopy")
        assert row.splits and set(row.splits) <= set(SPLITS) - {"all"}
    assert layout_info("ph2").class_names("semantic") == ("lesion",) and layout_info("ph2").stain == "dermoscopy"
    assert layout_info("folders").class_names("instance") == ("nucleus",)
    assert layout_info("folders").class_names("semantic") == ("foreground",)
    with pytest.raises(ValueError, match="layout must be one of"):
        layout_info("isbi")


@pytest.mark.parametrize("layout", ["consep", "monuseg", "monuseg-instances", "monuseg-masks", "gbm40"])
def test_stain_jitter_is_on_for_every_h_and_e_layout(layout):
    from napari_sgdc.data.datasets import layout_info
    from napari_sgdc.train.recipe import train_config_for

    assert layout_info(layout).stain == "H&E" and layout_info(layout).stain_jitter
    assert train_config_for({}, layout).stain_jitter is True
    assert train_config_for({"stain_jitter": False}, layout).stain_jitter is False  # the config still wins


@pytest.mark.parametrize("layout", ["ph2", "folders"])
def test_stain_jitter_is_off_for_other_layouts(layout):
    from napari_sgdc.train.recipe import train_config_for

    assert train_config_for({}, layout).stain_jitter is False


def test_splits_a_layout_lacks_load_as_empty_from_the_table():
    from napari_sgdc.data.datasets import layout_info

    for layout in ("monuseg", "monuseg-masks", "gbm40"):
        assert set(layout_info(layout).splits) == {"train"}
        assert load_samples(DATA / ("gbm40" if layout == "gbm40" else "monuseg"), layout, "test") == []
    assert len(load_samples(DATA / "monuseg", "monuseg-masks", "all", max_images=1)) == 1


def test_validation_dataset_serves_whole_images_at_the_models_resolution(tmp_path):
    from napari_sgdc.data.datasets import validation_dataset
    from napari_sgdc.model import tiny_config

    _write_folder(tmp_path, instance=True)
    samples = load_samples(tmp_path, "folders")  # 40 x 50 images
    dataset = validation_dataset(samples, tiny_config(task="instance", resize_long_side=100), boundary_width=1)
    item = dataset[0]
    assert item["image"].shape == (3, 80, 100) and "instances" in item and not dataset.augment
