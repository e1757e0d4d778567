"""The plan of a whole-slide run: the working grid on the slide, the tiles, the model's
options; and reading the slide's pixels on that grid (`read_working`).

A `SlidePlan` is small and picklable: every task (on any Dask worker) receives it and needs
nothing else but the model. Its `SlidePlan.signature` is stored in the result store, and a
resume must match it.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from ..grid import DEFAULT_MARGIN, DEFAULT_TILE, choose_level, level_factor, mpp_problem, resample_window, scaled_length
from ..postprocess import PostprocessOptions
from ..slide import Slide, SlideError

__all__ = ["SlidePlan", "plan_slide", "read_working", "check_tiling", "roi_box", "plan_problem"]

MAX_TILES = 10_000
"""A plan with more tiles to run is absurd unless confirmed (`plan_problem`; about a 40x slide of 160,000² px)."""
MAX_HOURS = 24.0
"""A plan estimated to take longer is absurd unless confirmed."""
MAX_UPSAMPLING = 4.0
"""A working grid this many times finer than the slide's level 0 (a wrong --mpp) is absurd unless confirmed."""
SECONDS_PER_WINDOW = 2.0
"""CPU seconds per 1152² window in float32 (docs/performance.md, whole slides), for the estimate only."""

SIGNATURE_DEFAULTS = {"amp": False, "tta": False, "type_names": [], "type_colors": []}
"""Plan fields added after stores were first written, with the value those stores were made with."""
SIGNATURE_RENAMES = {"boundary_threshold": "split_level", "mpp": "working_mpp"}
"""Plan fields renamed after stores were first written: old name -> new name."""


def stored_signature(signature: dict) -> dict:
    """A store's recorded plan signature in today's terms: renamed fields under their new
    names, fields added later at the value older stores were made with."""
    return {**SIGNATURE_DEFAULTS, **{SIGNATURE_RENAMES.get(k, k): v for k, v in signature.items()}}


@dataclass(frozen=True)
class SlidePlan:
    """Everything a task needs (picklable, small).

    Attributes:
        slide_path, backend: the slide (reopened by each worker); slide_mpp: its µm per level-0 pixel.
        level, level_downsample: the slide level read and its level-0 pixels per pixel.
        factor: level pixels per working pixel; working_mpp: working µm/px; height, width: the working grid.
        tile, margin: core size and context (working px); store: the result store.
        threshold, split_level, min_size, instances: post-processing.
        roi: working px (y0, x0, y1, x1) whose objects are kept.
        threads: torch threads per task (0: as is); amp: bf16 autocast; tta: the 8 flips and rotations.
        engine: the `napari_sgdc.engines` name that runs the network (recorded; a resume may use another).
        weights_sha256: the hash of the model's weights (a resume with other weights is refused).
        type_names, type_colors: the model's nucleus types (``ModelConfig.type_names`` and
            ``type_colors``; type id t is ``type_names[t - 1]``); empty for a model without types.
    """

    slide_path: str
    backend: str
    slide_mpp: float
    level: int
    level_downsample: float
    factor: float  # level pixels per working pixel
    working_mpp: float  # µm/px of the working grid (the model's, else the slide's level 0)
    height: int
    width: int
    tile: int
    margin: int
    store: str
    threshold: float
    split_level: float
    min_size: int
    instances: bool
    roi: tuple[int, int, int, int]  # working px: y0, x0, y1, x1
    threads: int = 0
    amp: bool = False  # bf16 autocast where the device runs it natively
    tta: bool = False  # test-time augmentation: 8 forward passes per tile
    weights_sha256: str | None = None  # the model's weights (`workers.weights_hash`); None: not recorded
    type_names: tuple[str, ...] = ()  # nucleus types of the model (empty: no types)
    type_colors: tuple[str, ...] = ()  # '#rrggbb' per type
    engine: str = "torch"  # napari_sgdc.engines name; like threads, not part of the signature

    @property
    def grid(self) -> tuple[int, int]:
        """Tiles along y and x."""
        return math.ceil(self.height / self.tile), math.ceil(self.width / self.tile)

    @property
    def window(self) -> int:
        """Side of a tile's window (core + margins)."""
        return self.tile + 2 * self.margin

    @property
    def to_level0(self) -> float:
        """Level-0 slide pixels per working pixel."""
        return self.factor * self.level_downsample

    def options(self) -> PostprocessOptions:
        return PostprocessOptions(self.threshold, self.split_level, self.min_size)

    def signature(self) -> dict:
        """What must match for a resume (threads and the store's place do not matter)."""
        values = asdict(self)
        values.pop("threads")
        values.pop("engine")
        values.pop("store")
        return values

    @classmethod
    def from_signature(cls, signature: dict, store: str | Path) -> "SlidePlan":
        """The plan a store was made with (its stored `signature`; fields added later take
        `SIGNATURE_DEFAULTS`)."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in stored_signature(signature).items() if k in known}
        values["roi"] = tuple(int(v) for v in values["roi"])
        values["type_names"], values["type_colors"] = tuple(values["type_names"]), tuple(values["type_colors"])
        return cls(**values, store=str(store))


def plan_problem(plan: SlidePlan, tiles: int) -> str | None:
    """Why running `tiles` tiles of `plan` looks absurd (one line), or None: more than `MAX_TILES`
    tiles, an estimate over `MAX_HOURS` hours (CPU, `SECONDS_PER_WINDOW`), or a working grid
    more than `MAX_UPSAMPLING` times finer than the slide (usually a wrong µm/px)."""
    hours = tiles * SECONDS_PER_WINDOW * (plan.window / 1152) ** 2 * (8 if plan.tta else 1) / 3600
    upsampling = 1.0 / plan.to_level0
    what = f"{tiles:,} tiles of {plan.tile} px (about {hours:,.1f} h on a CPU)"
    if upsampling > MAX_UPSAMPLING:
        return (f"the plan enlarges the slide {upsampling:.1f}x (slide {plan.slide_mpp:g} µm/px, model "
                f"{plan.working_mpp:g} µm/px) into {what}: is the µm/px right?")
    if tiles > MAX_TILES or hours > MAX_HOURS:
        return f"the plan has {what}, over the limit of {MAX_TILES:,} tiles or {MAX_HOURS:g} h"
    return None


def check_tiling(tile: int, margin: int) -> None:
    """One-line ValueError unless `tile` is a multiple of 32 >= 128 and `margin` a multiple of 32 in [0, tile]."""
    if tile < 128 or tile % 32:
        raise ValueError(f"tile must be a multiple of 32 and at least 128, got {tile}")
    if margin < 0 or margin % 32 or margin > tile:
        raise ValueError(f"margin must be a multiple of 32 in [0, tile], got {margin}")


def roi_box(roi, to_level0: float, height: int, width: int, slide_shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """The working-grid box (y0, x0, y1, x1) of a level-0 ``(x, y, width, height)`` roi (None: everything)."""
    if roi is None:
        return 0, 0, height, width
    x, y, w, h = (float(v) for v in roi)
    if w <= 0 or h <= 0:
        raise ValueError(f"roi (x, y, width, height) needs a positive size, got {roi}")
    box = (max(0, int(y // to_level0)), max(0, int(x // to_level0)),
           min(height, int(math.ceil((y + h) / to_level0))), min(width, int(math.ceil((x + w) / to_level0))))
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ValueError(f"roi {roi} lies outside the slide (level-0 size {slide_shape[1]}×{slide_shape[0]})")
    return box


def slide_mpp(slide: Slide, mpp: float | None) -> float:
    """The slide's µm per level-0 pixel: `mpp` when given, else its metadata; `SlideError` naming the file."""
    value = mpp if mpp is not None else slide.mpp
    if value is None:
        raise SlideError(f"{slide.path}: the slide has no µm/px (mpp) in its metadata; pass mpp= (CLI: --mpp), "
                         "e.g. 0.25 for a 40x scan")
    if mpp_problem(value):
        raise SlideError(f"{slide.path}: {mpp_problem(value)}")
    return float(value)


def plan_slide(config, slide: Slide, out: str | Path, *, roi=None, mpp: float | None = None,
               tile: int = DEFAULT_TILE, margin: int = DEFAULT_MARGIN, options: PostprocessOptions | None = None,
               threads: int = 0, amp: bool = False, tta: bool = False,
               weights_sha256: str | None = None, engine: str = "torch") -> SlidePlan:
    """The plan of segmenting `slide` with a model of `config` into the store `out`.

    The working grid is the slide at the model's µm/px (the slide's own when the model's is
    unknown, with a warning), read from `napari_sgdc.grid.choose_level`'s level. `slide` is
    not modified (`mpp` overrides its metadata for this plan only).

    Raises:
        SlideError: no µm/px, or one out of range. ValueError: a bad tile, margin or roi.
    """
    level0_mpp = slide_mpp(slide, mpp)
    model_mpp = float(getattr(config, "mpp", 0.0) or 0.0)
    if model_mpp <= 0:
        warnings.warn("the model does not record its µm/px (ModelConfig.mpp = 0): the slide is segmented at its "
                      "full resolution", stacklevel=3)
        model_mpp = level0_mpp
    level_mpps = [level0_mpp * d for d in slide.level_downsamples]
    level = choose_level(level_mpps, model_mpp)
    factor = level_factor(level_mpps[level], model_mpp)
    height = scaled_length(slide.level_shapes[level][0], 1.0 / factor)
    width = scaled_length(slide.level_shapes[level][1], 1.0 / factor)
    check_tiling(tile, margin)
    box = roi_box(roi, factor * slide.level_downsamples[level], height, width, slide.shape)
    options = options or PostprocessOptions.for_model(config)
    return SlidePlan(slide_path=str(Path(slide.path).resolve()), backend=slide.backend, slide_mpp=level0_mpp,
                     level=level, level_downsample=slide.level_downsamples[level], factor=factor, working_mpp=model_mpp,
                     height=height, width=width, tile=tile, margin=margin, store=str(Path(out).resolve()),
                     threshold=options.threshold, split_level=options.split_level,
                     min_size=options.min_size, instances=bool(getattr(config, "is_instance", True)), roi=box,
                     threads=threads, amp=bool(amp), tta=bool(tta), weights_sha256=weights_sha256,
                     type_names=tuple(getattr(config, "type_names", ()) or ()),
                     type_colors=tuple(getattr(config, "type_colors", ()) or ()), engine=str(engine))


def read_working(slide: Slide, plan: SlidePlan, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 of the working grid at working pixel (y0, x0); white outside the slide
    (`napari_sgdc.grid.resample_window` on the plan's level)."""
    d, level = plan.level_downsample, plan.level

    def read(r0: int, c0: int, rows: int, cols: int) -> np.ndarray:
        return slide.read_region(int(round(c0 * d)), int(round(r0 * d)), cols, rows, level)

    return resample_window(read, plan.factor, y0, x0, height, width)
