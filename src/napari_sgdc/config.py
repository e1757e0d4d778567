"""Configuration dataclasses that travel inside every checkpoint.

`ModelConfig` fully describes a network (``build_model(cfg)`` needs nothing else),
`TrainConfig` describes one training run, and `PRESETS` holds the fine-tuning
presets used by the GUI's correct-and-retrain loop.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from .deprecation import rename_keys, renamed_field
from .grid import check_mpp

TASKS = ("semantic", "instance")
ENCODER_NAMES = ("efficientnet_lite0", "resnet50", "mini")
"""The encoders a config may name; `napari_sgdc.model.registry` maps each to its class."""
BLOCK_NAMES = ("sgdc", "pooling", "static")
"""The guided decoder blocks a config may name; `napari_sgdc.model.registry` maps each to its class."""
INSTANCE_MAPS = ("boundary", "distance", "hover")
MAX_CHANNELS = 4096
MAX_CLASSES = 256
MAX_KERNEL = 31
MAX_WORKING_SIDE = 16384


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _whole(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}")


def _sequence(name: str, value: Any, length: int) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise ValueError(f"{name} needs {length} values, got {value!r}")
    return tuple(value)


def _from_dict(cls, data: dict[str, Any]):
    """Builds dataclass `cls` from `data`, turning lists back into tuples.

    Raises:
        ValueError: if `data` holds keys that `cls` does not know.
    """
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}")
    kwargs = {}
    for name, value in data.items():
        if isinstance(value, list) and "tuple" in str(known[name].type):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


@renamed_field("boundary_threshold", "split_level")
@dataclass
class ModelConfig:
    """Everything needed to build an `SGDCSegmenter`.

    Attributes:
        encoder: ``efficientnet_lite0`` (ImageNet weights shipped offline), ``resnet50``
            (as in the paper) or ``mini`` (a small random-init CNN for tests and quick runs).
        pretrained: load the encoder's ImageNet weights where the package ships them.
        block: guided decoder block: ``sgdc`` (the paper), ``pooling`` (pooling-based
            dynamic convolution, the paper's baseline) or ``static`` (plain convolution).
        task: ``semantic`` (one mask) or ``instance`` (mask + boundary split into instances).
        instance_map: how an instance model separates touching objects (see
            `napari_sgdc.postprocess`): ``boundary`` (the boundary head: mask − boundary
            seeds), ``distance`` (an extra head regressing each object's distance to its
            border, normalised to 1 at its centre) or ``hover`` (two extra heads regressing
            HoVer-Net's horizontal and vertical offsets to the object's centre, in [-1, 1]).
        n_classes: mask-head channels (1 for a binary foreground).
        decoder_channels: decoder widths at strides 16, 8, 4, 2, 1.
        sge_channels: SGE bottleneck and fused width (``bottleneck`` and ``mid``).
        guide_channels: channels of the SGE guidance map.
        kernel_size: SGDC dynamic kernel size k.
        heads: SGDC kernel heads h (kernels are shared by the channels of a head).
        pool_grid: grid size of the adaptive average pooling in the pooling baseline.
        edge_supervision: whether the SGE edge output is supervised (ablation switch).
        class_names: names of the mask classes.
        norm_mean: per-channel input mean, in 0..255 units, subtracted inside the model.
        norm_std: per-channel input std, in 0..255 units.
        resize_long_side: working resolution. When > 0, images are resized so that their
            longer side has this many pixels before the network sees them (training and
            inference alike) and the outputs are resized back; 0 keeps the native pixel
            size (histology, where magnification matters).
        single_object: the images hold one object (a skin lesion): the mask keeps its
            largest connected region with holes filled.
        mpp: µm per pixel of the training images (0 = unknown); whole-slide inference reads
            slides at this resolution (the nuclei model: 0.25, i.e. 40×).
        split_level: the model's default `PostprocessOptions.split_level` (the instance split
            level: the separation value below which instance seeds grow; ``boundary_threshold``
            before 0.2, still read from checkpoints and accepted, deprecated). Training sets it, for instance
            models, to the value with the best validation AJI (`napari_sgdc.train.validate`).
        threshold: the model's default `PostprocessOptions.threshold` (mask probability).
        min_size: the model's default `PostprocessOptions.min_size`, in pixels at the model's
            scale. For instance models, `napari_sgdc.train.tune_postprocess` sets both, with
            ``split_level``, to the combination with the best validation AJI.
        type_names: nucleus types of an instance model's type head (empty: no type head).
            The type id of ``type_names[i]`` is ``i + 1``; 0 means background or no type, so a
            model trained on CoNSeP keeps CoNSeP's class ids (see `napari_sgdc.data.datasets`).
        type_colors: one ``#rrggbb`` colour per type (layers, legend, QuPath classification).
    """

    encoder: str = "efficientnet_lite0"
    pretrained: bool = True
    block: str = "sgdc"
    task: str = "semantic"
    instance_map: str = "boundary"
    n_classes: int = 1
    decoder_channels: tuple[int, ...] = (128, 64, 48, 32, 16)
    sge_channels: int = 64
    guide_channels: int = 16
    kernel_size: int = 7
    heads: int = 4
    pool_grid: int = 4
    edge_supervision: bool = True
    class_names: tuple[str, ...] = ("foreground",)
    norm_mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    norm_std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    resize_long_side: int = 0
    single_object: bool = False
    mpp: float = 0.0
    split_level: float = 0.5
    threshold: float = 0.5
    min_size: int = 20
    type_names: tuple[str, ...] = ()
    type_colors: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Checks every field's type and range, so a bad config (or checkpoint metadata)
        fails with one line naming the field before anything is allocated."""
        _choice("encoder", self.encoder, ENCODER_NAMES)
        _choice("block", self.block, BLOCK_NAMES)
        _choice("task", self.task, TASKS)
        _choice("instance_map", self.instance_map, INSTANCE_MAPS)
        if self.instance_map != "boundary" and self.task != "instance":
            raise ValueError(f"instance_map {self.instance_map!r} needs task 'instance', got task {self.task!r}")
        for name in ("pretrained", "edge_supervision", "single_object"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        _whole("n_classes", self.n_classes, 1, MAX_CLASSES)
        _whole("sge_channels", self.sge_channels, 1, MAX_CHANNELS)
        _whole("guide_channels", self.guide_channels, 1, MAX_CHANNELS)
        _whole("kernel_size", self.kernel_size, 1, MAX_KERNEL)
        if self.kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd, got {self.kernel_size}")
        _whole("heads", self.heads, 1, MAX_CHANNELS)
        _whole("pool_grid", self.pool_grid, 1, 64)
        _whole("resize_long_side", self.resize_long_side, 0, MAX_WORKING_SIDE)
        if 0 < self.resize_long_side < 32:
            raise ValueError(f"resize_long_side must be 0 or at least 32, got {self.resize_long_side}")
        self.decoder_channels = _sequence("decoder_channels", self.decoder_channels, 5)
        for width in self.decoder_channels:
            _whole("decoder_channels", width, 1, MAX_CHANNELS)
        for width in self.decoder_channels[:3]:  # the guided blocks at strides 16, 8, 4
            if width % self.heads:
                raise ValueError(f"decoder_channels {self.decoder_channels[:3]} (guided blocks) must be divisible "
                                 f"by heads={self.heads}")
        self.class_names = _sequence("class_names", self.class_names, self.n_classes)
        if not all(isinstance(name, str) for name in self.class_names):
            raise ValueError(f"class_names must be {self.n_classes} text names, got {self.class_names!r}")
        self.norm_mean = _sequence("norm_mean", self.norm_mean, 3)
        self.norm_std = _sequence("norm_std", self.norm_std, 3)
        for name, values, low in (("norm_mean", self.norm_mean, -math.inf), ("norm_std", self.norm_std, 0.0)):
            if not all(_is_number(v) and math.isfinite(v) and v > low for v in values):
                raise ValueError(f"{name} must be 3 finite numbers{' > 0' if low == 0 else ''}, got {values!r}")
        if not (_is_number(self.mpp) and self.mpp == 0):
            check_mpp(self.mpp, "mpp (0: unknown)")
        self.mpp = float(self.mpp)
        for name in ("split_level", "threshold"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
            setattr(self, name, float(value))
        _whole("min_size", self.min_size, 0, 10**9)
        self._check_types()

    def _check_types(self) -> None:
        self.type_names = _sequence("type_names", self.type_names, len(self.type_names or ()))
        self.type_colors = _sequence("type_colors", self.type_colors, len(self.type_names))
        if self.type_names and self.task != "instance":
            raise ValueError(f"type_names need task 'instance', got task {self.task!r}")
        if len(self.type_names) > MAX_CLASSES - 1:
            raise ValueError(f"at most {MAX_CLASSES - 1} type_names, got {len(self.type_names)}")
        if not all(isinstance(name, str) and name.strip() for name in self.type_names) or \
                len(set(self.type_names)) != len(self.type_names):
            raise ValueError(f"type_names must be distinct non-empty names, got {self.type_names!r}")
        if not all(isinstance(c, str) and re.fullmatch(r"#[0-9a-fA-F]{6}", c) for c in self.type_colors):
            raise ValueError(f"type_colors must be '#rrggbb' colours, one per type, got {self.type_colors!r}")

    @property
    def is_instance(self) -> bool:
        """Whether the model splits its mask into instances (``task == "instance"``)."""
        return self.task == "instance"

    @property
    def has_types(self) -> bool:
        """Whether the model has a type head (``type_names`` not empty)."""
        return bool(self.type_names)

    @property
    def instance_channels(self) -> int:
        """Channels of the extra instance head: 0 (boundary), 1 (distance) or 2 (hover)."""
        return {"boundary": 0, "distance": 1, "hover": 2}[self.instance_map] if self.is_instance else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return _from_dict(cls, rename_keys(cls, data))  # checkpoints before 0.2 say boundary_threshold


@dataclass
class TrainConfig:
    """One training or fine-tuning run.

    Attributes:
        epochs: passes over the training set (an epoch is `steps_per_epoch` steps when set).
        max_steps: stop after this many optimiser steps (0 = no limit); fine-tuning uses it.
        steps_per_epoch: fixed epoch length in steps (0 = one pass over the dataset).
        batch_size: images per step.
        crop_size: square training crop, a multiple of 32.
        lr_encoder: AdamW learning rate of the encoder.
        lr_decoder: AdamW learning rate of everything else.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up before the cosine decay.
        grad_clip: max gradient norm (0 = off).
        amp: bf16 autocast where the device runs bf16 natively (`napari_sgdc.device.autocast`).
        freeze_encoder: keep the encoder's weights (and BatchNorm statistics) fixed.
        freeze_batchnorm: keep every BatchNorm layer's running statistics fixed. Fine-tuning
            on one or a few images otherwise replaces the base model's statistics with those
            of the corrected images, which hurts every other image.
        seed: seeds Python, NumPy and torch; the run is deterministic for a seed on CPU.
        val_every: validate every this many epochs (0 = never).
        edge_weight: weight of the edge (boundary) loss in the total loss.
        boundary_width: width in pixels of the semantic boundary band target.
        stain_jitter: H&E stain augmentation (histology) instead of plain colour jitter only.
        aspect_jitter: largest height/width stretch of a training crop (1 = none); see
            `napari_sgdc.data.transforms.random_scale_crop`.
        artifacts: add dermoscopy artifacts (hair, rulers, ink, vignetting) to training crops.
        num_workers: DataLoader workers.
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``.
        select_metric: validation metric that picks the best checkpoint (``auto``: AJI for
            instance models, IoU otherwise; or ``iou``, ``dice``, ``aji``, ``loss``).
        l2sp: L2-SP strength λ: the loss gains ``λ · Σ ‖w − w_start‖²`` over the trainable
            weights, ``w_start`` being their values when the run started (0 = off); keeps a
            fine-tuned model near its base model so it forgets less of its base domain.
        type_weight: weight λ_type of the type loss (models with nucleus types).
        type_balance: exponent of the type loss's class weights (inverse pixel frequency
            to this power; 0 = unweighted): see `napari_sgdc.train.losses.type_class_weights`.
        init: start from the weights of this checkpoint (layers of the same name and shape;
            a new head, e.g. the type head, starts fresh); empty: from the config's encoder.
    """

    epochs: int = 30
    max_steps: int = 0
    steps_per_epoch: int = 0
    batch_size: int = 8
    crop_size: int = 256
    lr_encoder: float = 3e-4
    lr_decoder: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    grad_clip: float = 1.0
    amp: bool = False
    freeze_encoder: bool = False
    freeze_batchnorm: bool = False
    seed: int = 0
    val_every: int = 1
    edge_weight: float = 0.5
    boundary_width: int = 3
    stain_jitter: bool = False
    aspect_jitter: float = 1.0
    artifacts: bool = False
    num_workers: int = 0
    device: str = "auto"
    select_metric: str = "auto"
    l2sp: float = 0.0
    type_weight: float = 1.0
    type_balance: float = 0.5
    init: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, data)


PRESETS: dict[str, TrainConfig] = {
    # Fine-tuning presets for the GUI's correct-and-retrain loop (frozen encoder, small LR, L2-SP
    # towards the base weights: see docs/results.md, "Fine-tuning: corrected-domain gain vs forgetting").
    # `quick` runs under bf16 autocast where the device has native bf16 (AVX512-BF16 or AMX CPUs, CUDA;
    # a no-op elsewhere, `napari_sgdc.device.autocast`): issue 24; GBM40 / CoNSeP scores within 0.05 points of
    # float32 (docs/results.md, "bf16 autocast in `quick`").
    "quick": TrainConfig(
        epochs=1, max_steps=30, steps_per_epoch=30, batch_size=4, crop_size=256,
        lr_encoder=0.0, lr_decoder=3e-4, warmup_steps=3, freeze_encoder=True, freeze_batchnorm=True,
        val_every=0, l2sp=3.0, amp=True,
    ),
    "standard": TrainConfig(
        epochs=1, max_steps=120, steps_per_epoch=120, batch_size=4, crop_size=256,
        lr_encoder=3e-5, lr_decoder=3e-4, warmup_steps=10, freeze_encoder=True, freeze_batchnorm=True,
        val_every=0, l2sp=3.0,
    ),
}
