"""Loading image/label pairs and serving them as training tensors.

Layouts understood by `load_samples` (see ``shared/data/README.md``):

* ``ph2``: ``images/*.jpg`` + ``masks/*.png`` (0/255) + ``splits.json`` (train/val/test).
* ``consep``: ``{train,test}/images/*.jpg`` + ``{train,test}/instances/*.png`` (uint16).
  CoNSeP has no validation split; ``val`` is the train patches of parent tiles
  `CONSEP_VAL_PARENTS` (19 and 20, 32 patches) and ``train`` excludes them, so the
  split is by parent tile (neighbouring patches share nuclei).
* ``monuseg``: ``train/images/*.jpg`` + ``train/instances/*.png`` where present, else
  ``train/masks/*.png``. Training set only (``val``/``test`` are empty).
* ``monuseg-instances``: the MoNuSeg images that have an instance map (13 of 30). For
  training instance heads: a binary mask's connected components merge touching nuclei,
  which would teach the boundary, distance and HoVer heads not to split them.
* ``monuseg-masks``: the other 17, with binary masks only: the shipped ``nuclei`` model's
  out-of-domain check (pixel scores are exact; instance scores count touching nuclei
  merged in the mask's connected components as one).
* ``gbm40``: ``images/*.jpg`` + ``instances/*.png`` (uint16), **partly annotated**: many
  nuclei have no polygon, so unlabelled pixels are not reliable background. Each sample
  carries a loss weight (`napari_sgdc.data.targets.annotated_weight`): 1 on the annotated
  nuclei and a `GBM40_RING_PX` ring around them, 0 elsewhere, so the losses learn shape
  and separation from it and never learn that an unannotated nucleus is background.
  Training set only (``val``/``test`` are empty).
* ``folders``: ``<root>/images`` with ``<root>/masks`` (or ``labels``/``instances``);
  when ``<root>/<split>/images`` exists that folder is used instead. Masks are matched
  by stem, optionally with a ``_mask``/``_label``/``_labels``/``_segmentation`` suffix.

Everything the package knows about a layout (its default task, class names, stain, the
splits that hold images, whether it is partly annotated, and how its files pair up) is
one `Layout` row of `LAYOUT_TABLE`; the CLI and the training recipe read that table.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..files import IMAGE_SUFFIXES, MASK_SUFFIXES, read_image, read_mask
from .targets import annotated_weight, boundary_target, instance_map_target
from .transforms import augment_pair, center_crop, focus_points, to_float_rgb, to_uint8_rgb

__all__ = [
    "Layout",
    "Sample",
    "SegmentationDataset",
    "find_label_file",
    "layout_info",
    "load_samples",
    "read_rgb",
    "resize_samples",
    "validation_dataset",
    "LAYOUT_TABLE",
    "CONSEP_TYPES",
    "CONSEP_TYPE_COLORS",
    "type_table",
    "type_pixel_counts",
    "LAYOUTS",
    "SPLITS",
    "CONSEP_VAL_PARENTS",
    "GBM40_RING_PX",
]

SPLITS = ("train", "val", "test", "all")
CONSEP_VAL_PARENTS = (19, 20)
_MASK_STEM_SUFFIXES = ("", "_mask", "_label", "_labels", "_segmentation", "_instances")
GBM40_RING_PX = 6  # background kept in the loss around each annotated GBM40 nucleus


@dataclass
class Sample:
    """One image with its labels.

    Attributes:
        name: identifier (the file stem).
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool for semantic samples, or int32 instance ids (0 = background).
        weight: optional (H, W) float32 per-pixel loss weight (0 = ignore), for partly
            annotated data; None = every pixel counts.
        types: optional type table of an instance sample: a 1-D int array indexed by
            instance id, ``types[id]`` the nucleus type of that object (1..T; 0 = no type
            known); None: the sample has no types (its type loss is masked).
    """

    name: str
    image: np.ndarray
    mask: np.ndarray
    weight: np.ndarray | None = None
    types: np.ndarray | None = None

    @property
    def is_instance(self) -> bool:
        return self.mask.dtype != bool


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_rgb(path: str | Path) -> np.ndarray:
    """Reads an image file as (H, W, 3) uint8 RGB (gray, RGBA, uint16 and float converted
    with `to_float_rgb` rules).

    Raises:
        ValueError: naming the file when it cannot be read or has an unsupported shape.
    """
    raw = read_image(path)
    try:
        return to_uint8_rgb(raw)
    except ValueError as error:
        raise ValueError(f"bad image {path}: {error}") from None


def type_table(labels: np.ndarray, type_map: np.ndarray) -> np.ndarray:
    """The type table (see `Sample.types`) of an instance map and its per-pixel type map:
    each object takes the type most of its pixels carry (0 = none).

    Raises:
        ValueError: the maps differ in shape.
    """
    labels, type_map = np.asarray(labels), np.asarray(type_map)
    if labels.shape != type_map.shape:
        raise ValueError(f"type map has shape {type_map.shape}, the instance map {labels.shape}")
    table = np.zeros(int(labels.max(initial=0)) + 1, np.int16)
    inside = labels > 0
    if inside.any():
        ids, types = labels[inside].astype(np.int64), type_map[inside].astype(np.int64)
        counts = np.zeros((table.size, int(types.max()) + 1), np.int64)
        np.add.at(counts, (ids, types), 1)
        counts[:, 0] = 0  # a pixel without a type does not vote
        table[:] = np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), 0)
    return table


def _make_sample(image_path: Path, mask_path: Path, instance: bool, type_dir: str | None = None) -> Sample:
    image = read_rgb(image_path)
    mask = read_mask(mask_path, instance=instance)
    if mask.shape != image.shape[:2]:
        raise ValueError(
            f"mask {mask_path} has shape {mask.shape} but image {image_path} has {image.shape[:2]}"
        )
    types = None
    if type_dir is not None and instance and (mask_path.parent.parent / type_dir).is_dir():  # no folder: no types
        type_path = mask_path.parent.parent / type_dir / mask_path.name
        if not type_path.is_file():
            raise ValueError(f"type map {type_path} is missing")
        types = type_table(mask, read_image(type_path))
    return Sample(name=image_path.stem, image=image, mask=mask, types=types)


def find_label_file(mask_dirs: Sequence[Path], stem: str) -> Path | None:
    """The first ``<dir>/<stem><suffix>.<ext>`` label file (suffixes like ``_mask``), or None."""
    for mask_dir in mask_dirs:
        for suffix in _MASK_STEM_SUFFIXES:
            for extension in MASK_SUFFIXES:
                candidate = mask_dir / f"{stem}{suffix}{extension}"
                if candidate.is_file():
                    return candidate
    return None


def _list_images(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    return sorted(files, key=lambda p: _natural_key(p.name))


def _pairs_ph2(root: Path, split: str) -> list[tuple[Path, Path]]:
    splits_file = root / "splits.json"
    if not splits_file.is_file():
        raise ValueError(f"ph2 layout needs {splits_file}")
    splits = json.loads(splits_file.read_text())
    ids = sorted(splits["train"] + splits["val"] + splits["test"]) if split == "all" else splits[split]
    return [(root / "images" / f"{i}.jpg", root / "masks" / f"{i}.png") for i in ids]


def _consep_parent(stem: str) -> int:
    match = re.match(r"^[a-z]+_(\d+)_\d+$", stem)
    return int(match.group(1)) if match else -1


def _pairs_consep(root: Path, split: str) -> list[tuple[Path, Path]]:
    folders = {"train": ["train"], "val": ["train"], "test": ["test"], "all": ["train", "test"]}[split]
    pairs = []
    for folder in folders:
        image_dir = root / folder / "images"
        if not image_dir.is_dir():
            raise ValueError(f"consep layout needs {image_dir}")
        for image_path in _list_images(image_dir):
            parent = _consep_parent(image_path.stem)
            if split == "train" and parent in CONSEP_VAL_PARENTS:
                continue
            if split == "val" and parent not in CONSEP_VAL_PARENTS:
                continue
            pairs.append((image_path, root / folder / "instances" / f"{image_path.stem}.png"))
    return pairs


def _pairs_monuseg(root: Path, split: str) -> list[tuple[Path, Path]]:
    image_dir = root / "train" / "images"
    if not image_dir.is_dir():
        raise ValueError(f"monuseg layout needs {image_dir}")
    pairs = []
    for image_path in _list_images(image_dir):
        instance_path = root / "train" / "instances" / f"{image_path.stem}.png"
        mask_path = root / "train" / "masks" / f"{image_path.stem}.png"
        pairs.append((image_path, instance_path if instance_path.is_file() else mask_path))
    return pairs


def _pairs_monuseg_instances(root: Path, split: str) -> list[tuple[Path, Path]]:
    return [(image, label) for image, label in _pairs_monuseg(root, split) if label.parent.name == "instances"]


def _pairs_monuseg_masks(root: Path, split: str) -> list[tuple[Path, Path]]:
    return [(image, label) for image, label in _pairs_monuseg(root, split) if label.parent.name == "masks"]


def _pairs_folders(root: Path, split: str) -> list[tuple[Path, Path]]:
    base = root / split if (root / split / "images").is_dir() else root
    if base is root and split in ("val", "test"):
        return []
    image_dir = base / "images"
    if not image_dir.is_dir():
        raise ValueError(f"folders layout needs an images/ folder in {base}")
    mask_dirs = [base / name for name in ("masks", "labels", "instances") if (base / name).is_dir()]
    if not mask_dirs:
        raise ValueError(f"folders layout needs a masks/, labels/ or instances/ folder in {base}")
    pairs = []
    for image_path in _list_images(image_dir):
        mask_path = find_label_file(mask_dirs, image_path.stem)
        if mask_path is None:
            raise ValueError(f"no mask for image {image_path} in {', '.join(map(str, mask_dirs))}")
        pairs.append((image_path, mask_path))
    return pairs


def _pairs_gbm40(root: Path, split: str) -> list[tuple[Path, Path]]:
    image_dir = root / "images"
    if not image_dir.is_dir():
        raise ValueError(f"gbm40 layout needs {image_dir}")
    return [(path, root / "instances" / f"{path.stem}.png") for path in _list_images(image_dir)]


@dataclass(frozen=True)
class Layout:
    """What the package knows about one dataset layout.

    Attributes:
        name: the layout name (``--layout`` of the CLI).
        task: the default task, ``semantic`` or ``instance``; None: guessed from the first
            label file (``folders``).
        classes: class names a model trained on it carries; None: from the task
            (``nucleus`` for instance models, ``foreground`` otherwise).
        stain: ``H&E``, ``dermoscopy`` or None (unknown); H&E layouts train with stain jitter.
        splits: the splits that can hold images (others load as ``[]``; ``all`` is every one).
        annotated_ring_px: partly annotated labels: the loss weighs only the annotated
            objects and a ring of this many pixels around them (None: fully annotated).
        pairs: ``pairs(root, split)`` -> the (image, label) file pairs of a split.
        types: nucleus type names of the per-pixel type maps (id ``i + 1`` is ``types[i]``);
            None: the layout has no types.
        type_colors: one ``#rrggbb`` colour per type.
        type_dir: the folder, beside the label folder, that holds each label file's type
            map under the same file name.
    """

    name: str
    task: str | None
    classes: tuple[str, ...] | None
    stain: str | None
    splits: tuple[str, ...]
    pairs: Callable[[Path, str], list[tuple[Path, Path]]]
    annotated_ring_px: int | None = None
    types: tuple[str, ...] | None = None
    type_colors: tuple[str, ...] | None = None
    type_dir: str | None = None

    @property
    def stain_jitter(self) -> bool:
        """Whether training on this layout uses H&E stain jitter by default."""
        return self.stain == "H&E"

    def class_names(self, task: str) -> tuple[str, ...]:
        """The class names of a model trained on this layout for `task`."""
        if self.classes is not None:
            return self.classes
        return ("nucleus",) if task == "instance" else ("foreground",)


_HE_NUCLEI = dict(classes=("nucleus",), stain="H&E")
CONSEP_TYPES = ("other", "inflammatory", "epithelial", "spindle-shaped")
"""CoNSeP's class ids 1-4, read as HoVer-Net's merged classes (see shared/data/README.md)."""
CONSEP_TYPE_COLORS = ("#ffa500", "#00ff00", "#ff0000", "#0000ff")  # HoVer-Net's CoNSeP colours
LAYOUT_TABLE: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("ph2", "semantic", ("lesion",), "dermoscopy", ("train", "val", "test"), _pairs_ph2),
    Layout("consep", "instance", **_HE_NUCLEI, splits=("train", "val", "test"), pairs=_pairs_consep,
           types=CONSEP_TYPES, type_colors=CONSEP_TYPE_COLORS, type_dir="classes"),
    Layout("monuseg", "instance", **_HE_NUCLEI, splits=("train",), pairs=_pairs_monuseg),
    Layout("monuseg-instances", "instance", **_HE_NUCLEI, splits=("train",), pairs=_pairs_monuseg_instances),
    Layout("monuseg-masks", "instance", **_HE_NUCLEI, splits=("train",), pairs=_pairs_monuseg_masks),
    Layout("gbm40", "instance", **_HE_NUCLEI, splits=("train",), pairs=_pairs_gbm40,
           annotated_ring_px=GBM40_RING_PX),
    Layout("folders", None, None, None, ("train", "val", "test"), _pairs_folders),
)}
"""Every dataset layout `load_samples` understands (see the module docstring)."""
LAYOUTS = tuple(LAYOUT_TABLE)


def layout_info(name: str) -> Layout:
    """The `Layout` row of `name`.

    Raises:
        ValueError: an unknown layout (one line listing the known ones).
    """
    if name not in LAYOUT_TABLE:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {name!r}")
    return LAYOUT_TABLE[name]


def _guess_instance(mask_path: Path) -> bool:
    """Folders layout with task=None: instance when the file looks like an instance map."""
    if mask_path.parent.name == "instances":
        return True
    raw = read_image(mask_path)
    return raw.ndim == 2 and raw.dtype not in (np.uint8, bool) and np.unique(raw).size > 2


def load_samples(
    root: str | Path,
    layout: str,
    split: str = "train",
    max_images: int | None = None,
    task: str | None = None,
) -> list[Sample]:
    """Loads image/label pairs of a dataset layout into memory.

    Args:
        root: dataset folder (for example ``shared/data/ph2``).
        layout: one of `LAYOUTS` (see the module docstring).
        split: ``train``, ``val``, ``test`` or ``all``. Layouts without the split
            (monuseg val/test, folders without ``<root>/<split>/images``) return ``[]``.
        max_images: keep only the first N pairs (in sorted order).
        task: ``semantic`` (bool masks) or ``instance`` (int32 ids; binary masks are split
            into connected components). None: the layout's default (ph2 semantic,
            consep/monuseg instance, folders guessed from the first label file).

    Returns:
        the samples, sorted by name (natural order).

    Raises:
        ValueError: for an unknown layout/split/task, a missing folder, or a file that
            cannot be read or does not match its image (the message names the file).
    """
    info = layout_info(layout)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if task not in (None, "semantic", "instance"):
        raise ValueError(f"task must be 'semantic', 'instance' or None, got {task!r}")
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"dataset folder {root} does not exist")
    if split != "all" and split not in info.splits:
        return []
    pairs = info.pairs(root, split)
    if max_images is not None:
        if max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {max_images}")
        pairs = pairs[:max_images]
    if not pairs:
        return []
    task = task or info.task
    if task is None:
        instance = _guess_instance(pairs[0][1])
    else:
        instance = task == "instance"
    for image_path, mask_path in pairs:
        if not image_path.is_file():
            raise ValueError(f"image file {image_path} is missing")
        if not mask_path.is_file():
            raise ValueError(f"mask file {mask_path} is missing")
    samples = [_make_sample(image_path, mask_path, instance, info.type_dir) for image_path, mask_path in pairs]
    if info.annotated_ring_px is not None:  # partly annotated: only annotated objects and their surroundings count
        samples = [dataclasses.replace(s, weight=annotated_weight(s.mask, info.annotated_ring_px)) for s in samples]
    return samples


class SegmentationDataset(Dataset):
    """Serves samples as float tensors with mask and boundary targets.

    With ``augment=True`` every item is a random scale-crop of ``crop_size`` with flips,
    90-degree rotations, colour jitter and (``stain_jitter=True``) H&E stain jitter. The
    randomness of item ``i`` comes only from ``(seed, epoch, i)``, so a run is
    reproducible whatever the number of DataLoader workers; `set_epoch` changes it.
    With ``augment=False`` an item is the central ``crop_size`` window, or the whole image
    when ``crop_size`` is None (validation on full images; sizes then vary per item).
    Images smaller than the crop are reflect-padded.

    Args:
        samples: the samples.
        crop_size: crop side in pixels, or None for whole images (only without augment).
        augment: apply random augmentation.
        boundary_width: width of the boundary band target (see `boundary_target`).
        stain_jitter: add H&E stain jitter (histology).
        task: ``semantic`` or ``instance`` (boundaries between touching instances are
            part of the edge target); None: instance when the samples carry instance ids.
        scale_range: random zoom range of the scale-crop.
        foreground_prob: probability that a random crop is centred on foreground.
        aspect_jitter: largest stretch of a random crop window (1 = square windows).
        artifacts: add dermoscopy artifacts (hair, rulers, ink, vignetting) to random crops.
        instance_map: ``ModelConfig.instance_map`` of the model to train: ``distance`` or
            ``hover`` add that regression target (see `napari_sgdc.data.targets`).
        seed: base seed of the per-item generators.
        weights: optional per-sample (H, W) float loss-weight maps (None entries: all 1),
            cropped and augmented with the mask; random crops are then centred on pixels
            weighing more than 1 (see `random_scale_crop`). Default: the samples' own
            ``weight`` maps when any has one (partly annotated data).
        types: add the ``type`` target (the model has a type head): each object's type
            from its sample's type table (`Sample.types`), 0 where unknown.

    Items:
        dict with ``image`` (3, h, w) float32 in [0, 1], ``mask`` (1, h, w) float32 {0, 1}
        and ``edge`` (1, h, w) float32 {0, 1}; instance datasets add ``instances`` (1, h, w)
        int32 ids (0 = background), e.g. for AJI in validation, and, for ``instance_map``
        ``distance`` or ``hover``, that target ((1, h, w) or (2, h, w) float32); with
        `weights`, ``weight`` (1, h, w) float32; with `types`, ``type`` (1, h, w) int64
        (0 = background or no type known: the type loss ignores those pixels).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        crop_size: int | None = 256,
        augment: bool = True,
        boundary_width: int = 3,
        stain_jitter: bool = False,
        task: str | None = None,
        *,
        scale_range: tuple[float, float] = (0.75, 1.33),
        foreground_prob: float = 0.5,
        aspect_jitter: float = 1.0,
        artifacts: bool = False,
        instance_map: str = "boundary",
        seed: int = 0,
        weights: Sequence[np.ndarray | None] | None = None,
        types: bool = False,
    ) -> None:
        if not samples:
            raise ValueError("SegmentationDataset needs at least one sample")
        if augment and not crop_size:
            raise ValueError("augment=True needs a crop_size")
        if task not in (None, "semantic", "instance"):
            raise ValueError(f"task must be 'semantic', 'instance' or None, got {task!r}")
        self.samples = list(samples)
        self.crop_size = crop_size
        self.augment = augment
        self.boundary_width = boundary_width
        self.stain_jitter = stain_jitter
        self.instance = (task == "instance") if task else self.samples[0].is_instance
        self.scale_range = scale_range
        self.foreground_prob = foreground_prob
        self.aspect_jitter = aspect_jitter
        self.artifacts = artifacts
        self.instance_map = instance_map
        self.seed = seed
        self.types = bool(types) and self.instance
        self.epoch = 0
        self.weights = None
        if weights is None and any(sample.weight is not None for sample in self.samples):
            weights = [sample.weight for sample in self.samples]  # partly annotated samples
        if weights is not None:
            if len(weights) != len(self.samples):
                raise ValueError(f"{len(weights)} weight maps for {len(self.samples)} samples")
            self.weights = []
            for sample, weight in zip(self.samples, weights):
                weight = np.ones(sample.mask.shape, np.float32) if weight is None else np.asarray(weight, np.float32)
                if weight.shape != sample.mask.shape:
                    raise ValueError(f"weight map of {sample.name} has shape {weight.shape}, "
                                     f"its mask {sample.mask.shape}")
                self.weights.append(weight)

        self._focus: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # per sample, found once (`focus_points`)

    def focus(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, cols) of the pixels random crops of sample `index` are centred on with
        probability ``foreground_prob`` (`focus_points`: edits, else foreground), computed
        on its first use and kept: the search over a whole image is not repeated per patch.
        Only for datasets with loss weights (fine-tuning: a few images, many patches each); None
        otherwise, where keeping every training image's foreground coordinates would cost
        gigabytes (1,600 ISIC masks) and each image gives few patches an epoch."""
        if self.weights is None:
            return None
        if index not in self._focus:
            self._focus[index] = focus_points(self.samples[index].mask, self.weights[index])
        return self._focus[index]

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        """Selects the random stream of an epoch (and optionally a new base seed)."""
        self.epoch = int(epoch)
        if seed is not None:
            self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        image, mask = sample.image, sample.mask
        weight = None if self.weights is None else self.weights[index]
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            augmented = augment_pair(
                image, mask, self.crop_size, rng,
                stain=self.stain_jitter, scale_range=self.scale_range,
                foreground_prob=self.foreground_prob, weight=weight,
                aspect_jitter=self.aspect_jitter, artifacts=self.artifacts, focus=self.focus(index),
            )
            image_float, mask = augmented[:2]
            weight = augmented[2] if weight is not None else None
        else:
            if self.crop_size:
                image, mask = center_crop(image, mask, self.crop_size)
                weight = None if weight is None else center_crop(weight, weight, self.crop_size)[1]
            image_float = to_float_rgb(image)
        if not self.instance:
            mask = mask > 0
        edge = boundary_target(mask, self.boundary_width, instance=self.instance)
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image_float.transpose(2, 0, 1))),  # (3, h, w)
            "mask": torch.from_numpy((mask > 0)[None].astype(np.float32)),  # (1, h, w)
            "edge": torch.from_numpy(edge[None].astype(np.float32)),  # (1, h, w)
        }
        if self.instance:
            item["instances"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.int32)[None])  # (1, h, w)
            target = instance_map_target(mask, self.instance_map)  # (1 or 2, h, w) or None
            if target is not None:
                item[self.instance_map] = torch.from_numpy(target)
            if self.types:
                item["type"] = torch.from_numpy(_type_target(mask, sample.types)[None])  # (1, h, w)
        if weight is not None:
            item["weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32)[None])  # (1, h, w)
        return item


def _type_target(labels: np.ndarray, table: np.ndarray | None) -> np.ndarray:
    """(h, w) int64 type of each pixel's object (0: background, or no type known)."""
    if table is None:
        return np.zeros(labels.shape, np.int64)
    ids = np.clip(labels, 0, None).astype(np.int64)
    padded = np.zeros(max(int(ids.max(initial=0)) + 1, table.size), np.int64)
    padded[:table.size] = table
    return padded[ids]


def type_pixel_counts(dataset: "SegmentationDataset", n_types: int) -> np.ndarray:
    """(n_types + 1,) pixels of each type over the whole training images (index 0: no type)."""
    counts = np.zeros(n_types + 1, np.int64)
    for sample in dataset.samples:
        if sample.types is not None:
            values = _type_target(sample.mask, sample.types)
            counts += np.bincount(values[values <= n_types].ravel(), minlength=n_types + 1)
    return counts


def resize_samples(samples: Sequence[Sample], long_side: int) -> list[Sample]:
    """Resizes each sample so its longer side has `long_side` pixels (0 = unchanged).

    Images are resized bilinearly with anti-aliasing, masks and labels by nearest
    neighbour: the same working resolution that `segment` uses for a model with
    ``ModelConfig.resize_long_side``.
    """
    from .transforms import resize_image, resize_labels, working_size

    if not long_side:
        return list(samples)
    resized = []
    for sample in samples:
        size = working_size(*sample.image.shape[:2], long_side)
        weight = None if sample.weight is None else resize_labels(sample.weight, size)
        resized.append(Sample(sample.name, resize_image(sample.image, size), resize_labels(sample.mask, size), weight,
                              sample.types))
    return resized


def validation_dataset(samples: Sequence[Sample], config: Any, boundary_width: int = 3) -> SegmentationDataset:
    """Whole-image validation items of `samples` for a model of `config`, as training validates.

    Args:
        samples: the validation samples (brought to ``config.resize_long_side`` first).
        config: the model's `napari_sgdc.config.ModelConfig` (``resize_long_side``, ``task``
            and ``instance_map`` are read).
        boundary_width: width of the boundary band target.
    """
    samples = resize_samples(samples, config.resize_long_side)
    return SegmentationDataset(samples, crop_size=None, augment=False, boundary_width=boundary_width,
                               task=config.task, instance_map=config.instance_map, types=config.has_types)
