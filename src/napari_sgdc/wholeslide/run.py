"""`segment_slide`: the whole-slide run, from the plan through the three phases of tasks to a
complete store (see the package docstring for the geometry, the ownership rule and resume)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..deprecation import renamed_field
from ..engines import engine_name
from ..grid import DEFAULT_MARGIN, DEFAULT_TILE
from ..postprocess import PostprocessOptions
from ..slide import Slide, TissueMask, detect_tissue, open_slide
from .plan import SlidePlan, plan_slide
from .store import (SCRATCH, StoreExistsError, check_outputs, create_store, ensure_scratch, incoming_path, mark_complete, n_levels,
                    read_store_attrs, record_path, scratch_present, set_status, slide_stem, swap_in)
from .tiles import Stages, label_chunk_task, pyramid_task
from .workers import DaskExecutor, LocalExecutor, model_config, weights_hash

__all__ = ["SlideResult", "segment_slide", "tiles_to_run"]


@renamed_field("mpp", "working_mpp")
@dataclass
class SlideResult:
    """Summary of a `segment_slide` run.

    Attributes:
        store: the OME-Zarr store.
        n_objects: objects (instances) found.
        tiles_total: tiles of the grid; tiles_run: tiles with tissue (run or resumed);
        tiles_resumed: tiles already done by an earlier run.
        too_large: objects dropped because they reached a window's edge (larger than the margin).
        working_mpp: µm per pixel of the outputs (the working grid); shape: its (height, width).
            (``mpp`` before 0.2, still readable, deprecated.)
        level: slide level read; tissue_fraction: of the grid's tiles, the share run.
        seconds: wall time.
        stages: seconds per stage of this run: ``tissue`` (detection), ``read``, ``network``, ``decode``
            (of which ``postprocess`` and ``polygons``) and ``write`` summed over the tiles run in this
            process (not on a cluster), ``tiles_wall`` (the wall time of the tile phase), ``labels`` and
            ``pyramid`` (the wall time of phases 2 and 3). With the pipeline the tile stages overlap,
            so read + network + decode + write exceeds ``tiles_wall``.
    """

    store: Path
    n_objects: int
    tiles_total: int
    tiles_run: int
    tiles_resumed: int
    too_large: int
    working_mpp: float
    shape: tuple[int, int]
    level: int
    tissue_fraction: float
    seconds: float
    stages: dict[str, float] = field(default_factory=dict)


def tiles_to_run(plan: SlidePlan, tissue: TissueMask | None) -> np.ndarray:
    """bool (ny, nx): tiles whose core meets the roi and the tissue.

    A tile owns the objects whose centroid lies in its core, and a centroid lies on the
    object, so on tissue: a core without tissue owns nothing, even when its margin (read
    by the neighbours that own the objects there) holds tissue. So only the core is
    tested; testing core + margin ran most blank tiles next to tissue.
    """
    ny, nx = plan.grid
    run = np.zeros((ny, nx), bool)
    ry0, rx0, ry1, rx1 = plan.roi
    s = plan.to_level0
    for i in range(ny):
        for j in range(nx):
            y0, x0 = i * plan.tile, j * plan.tile
            if y0 >= ry1 or y0 + plan.tile <= ry0 or x0 >= rx1 or x0 + plan.tile <= rx0:
                continue
            run[i, j] = tissue is None or tissue.any_in(x0 * s, y0 * s, (x0 + plan.tile) * s, (y0 + plan.tile) * s)
    return run


def _tissue_mask(tissue, slide: Slide, mpp: float) -> TissueMask:
    if isinstance(tissue, TissueMask):
        return tissue
    if tissue == "auto":
        return detect_tissue(slide, mpp=mpp)
    if tissue in ("none", None):
        level = slide.thumbnail_level()
        return TissueMask(np.ones(slide.level_shapes[level], bool), slide.level_downsamples[level])
    raise ValueError(f"tissue must be 'auto', 'none' or a TissueMask, got {tissue!r}")


def _near(offsets: dict, i: int, j: int) -> dict:
    """The id offsets of tile (i, j) and its 8 neighbours (all a label chunk needs)."""
    return {(a, b): offsets[(a, b)] for a in range(i - 1, i + 2) for b in range(j - 1, j + 2) if (a, b) in offsets}


def _tile_count(plan: SlidePlan, i: int, j: int) -> int:
    return int(np.load(record_path(plan, i, j))["ids"].size)


def done_tiles(plan: SlidePlan, tiles: list) -> int:
    """How many of `tiles` are done; a tile whose record holds objects but whose scratch labels are
    gone (a partly cleaned scratch folder) is not done: its record is removed, so it runs again."""
    done = 0
    for i, j in tiles:
        record = record_path(plan, i, j)
        if record.exists() and _tile_count(plan, i, j) and not scratch_present(plan, i, j):
            record.unlink()
        done += record.exists()
    return done


def _run_phases(plan: SlidePlan, executor, tiles: list, resumed: int, progress, cancel,
                stages: Stages) -> tuple[int, int]:
    """Phases 1-3 over the `tiles` to run; returns (objects, too large). `stages` gets the seconds per
    stage (`SlideResult.stages`)."""
    pending = [(i, j) for i, j in tiles if not record_path(plan, i, j).exists()]

    def tile_done(done: int) -> None:
        if progress is not None:
            progress(resumed + done, len(tiles))

    with stages.time("tiles_wall"):
        counts = dict(zip(pending, executor.run_tiles(plan, pending, tile_done, cancel, stages)))
    for i, j in tiles:
        if (i, j) not in counts:
            counts[(i, j)] = _tile_count(plan, i, j)
    offsets, total = {}, 0
    for key in sorted(counts):
        offsets[key] = (total, counts[key])
        total += counts[key]
    ny, nx = plan.grid
    chunks = sorted({(a, b) for i, j in tiles for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
                     if 0 <= a < ny and 0 <= b < nx})
    with stages.time("labels"):
        executor.run(label_chunk_task, [(plan, a, b, _near(offsets, a, b)) for a, b in chunks], cancel=cancel)
    active = set(chunks)
    with stages.time("pyramid"):
        for level in range(1, n_levels(plan)):
            active = sorted({(a // 2, b // 2) for a, b in active})
            executor.run(pyramid_task, [(plan, level, a, b) for a, b in active], cancel=cancel)
    too_large = sum(int(np.load(record_path(plan, i, j))["too_large"]) for i, j in tiles)
    return total, too_large


def _target(out: Path, action: str) -> Path:
    """Where the run writes: the store itself, or (overwrite) a new store beside it, swapped in on success."""
    if action != "replace":
        return out
    target = incoming_path(out)
    if target.exists():  # left by an overwrite that was killed: ours to replace, never someone else's
        if read_store_attrs(target) is None:
            raise StoreExistsError(f"{target} exists and is not a napari-sgdc slide store; not replaced")
        shutil.rmtree(target)
    return target


def _run_store(plan: SlidePlan, executor, tiles: list, progress, cancel, keep: bool,
               stages: Stages) -> tuple[int, int, int]:
    """Runs the phases with the store's lifecycle recorded: running, then complete, interrupted
    (cancel, Ctrl-C) or failed (an error, recorded). A failed or interrupted overwrite (`keep` False)
    removes its new store: the old one was never touched. Returns (objects, too large, tiles resumed)."""
    from ..inference import Cancelled

    store = Path(plan.store)
    set_status(store, "running")
    try:
        ensure_scratch(plan)
        resumed = done_tiles(plan, tiles)
        total, too_large = _run_phases(plan, executor, tiles, resumed, progress, cancel, stages)
    except (Cancelled, KeyboardInterrupt) as error:
        _stopped(store, keep, "interrupted", error=str(error) or "interrupted")
        raise
    except BaseException as error:
        _stopped(store, keep, "failed", error=" ".join(str(error).split()) or type(error).__name__)
        raise
    mark_complete(plan, total, too_large)
    shutil.rmtree(store / SCRATCH, ignore_errors=True)  # after complete: a kill here loses nothing
    return total, too_large, resumed


def _stopped(store: Path, keep: bool, status: str, error: str) -> None:
    try:
        if keep:
            set_status(store, status, error=error)
        else:
            shutil.rmtree(store, ignore_errors=True)
    except OSError:  # a full disk: the store stays "running" with a dead owner, which reads as interrupted
        pass


def _finished(plan: SlidePlan, out: Path, attrs: dict, start: float) -> SlideResult:
    """The result of a resume of a complete store: nothing to do."""
    from .store import open_store

    tiles, _ = open_store(out).tiles_done
    shutil.rmtree(out / SCRATCH, ignore_errors=True)
    ny, nx = plan.grid
    return SlideResult(store=out, n_objects=int(attrs["n_objects"]), tiles_total=ny * nx, tiles_run=tiles,
                       tiles_resumed=tiles, too_large=int(attrs["too_large"]), working_mpp=plan.working_mpp,
                       shape=(plan.height, plan.width), level=plan.level, tissue_fraction=tiles / max(1, ny * nx),
                       seconds=time.perf_counter() - start)


def segment_slide(model, slide: Slide | str | Path, out: str | Path, *, roi=None, tissue="auto",
                  mpp: float | None = None, tile: int = DEFAULT_TILE, margin: int = DEFAULT_MARGIN,
                  options: PostprocessOptions | None = None, progress: Callable[[int, int], None] | None = None,
                  cancel: threading.Event | None = None, resume: bool = False, overwrite: bool = False,
                  client=None, threads: int = 0, amp: bool = False, tta: bool = False,
                  uncertainty: bool | str = False, engine: str = "torch",
                  before_start: Callable[[SlidePlan, int], None] | None = None,
                  pipeline: bool = True) -> SlideResult:
    """Segments a whole slide into an OME-Zarr store (see the package docstring).

    Args:
        model: an `SGDCSegmenter` (or any module with ``.config`` and the same outputs), or a
            built-in model name / checkpoint path (then each Dask worker loads it itself).
        slide: a `Slide` or a slide path (opened with `open_slide`). A `Slide` is not modified.
        out: the store directory to create, conventionally ``<stem>.ome.zarr`` (`store_paths`).
        roi: ``(x, y, width, height)`` in level-0 slide pixels; None = the whole slide. Objects
            whose centroid lies in the roi are kept whole.
        tissue: ``"auto"`` (`detect_tissue`, background tiles skipped), ``"none"`` (every tile),
            or a precomputed `TissueMask`.
        mpp: the slide's µm per level-0 pixel, overriding or supplying its metadata.
        tile: core (and chunk) size in working pixels (a multiple of 32, >= 128).
        margin: context added on every side of a core (multiple of 32, <= tile); objects larger
            than the margin are dropped (counted in ``too_large``).
        options: post-processing thresholds (default: the model's, `PostprocessOptions.for_model`).
        progress: ``progress(done, total)`` after every tile written, on the calling thread.
        cancel: a `threading.Event`; when set, the run stops before the next tile's network (the tiles
            already through it are written) and raises `napari_sgdc.inference.Cancelled`; ``resume=True``
            continues it later.
        resume: continue an interrupted run into an existing store made with the same settings and
            the same model weights (a complete store: nothing to do).
        overwrite: replace an existing store (only one written by this function): the new store is
            written beside it and swapped in only when complete; a failure keeps the old one.
        client: a ``dask.distributed.Client``: tiles run as tasks on its cluster.
        threads: torch threads per task (0 = leave as is).
        amp: bf16 autocast for the network where the device runs bf16 natively (as in
            `napari_sgdc.inference.segment`); part of the settings a resume must match.
        tta: test-time augmentation, as in `segment`: each tile's maps are the mean over the 8
            flips and 90° rotations (8× the network time); part of the settings a resume must match.
        engine: the `napari_sgdc.engines` name that runs the network in every tile (``auto``: chosen
            once here, so every worker runs the same one); recorded in the plan, not part of the resume check.
        uncertainty: not available for whole slides (the store holds no uncertainty map):
            anything but False is refused with a ValueError before any work.
        before_start: ``before_start(plan, tiles to run)`` after planning, before anything is
            written; it may raise to refuse the run (the CLI's check of an absurd plan).
        pipeline: without a `client`, overlap the tiles' stages (`napari_sgdc.wholeslide.pipeline`: tile
            i + 2 is read and tile i decoded and written while tile i + 1 runs through the network);
            False runs them one after the other (the same result, bit for bit; for comparisons).

    Returns:
        A `SlideResult`.

    Raises:
        SlideError: a slide that cannot be read, or no µm/px; nothing is written.
        StoreExistsError: `out` exists and neither `resume` nor `overwrite` is set (`check_outputs`).
        ValueError: resume with other settings, bad tile/margin/roi, or `uncertainty`.
        Cancelled: `cancel` was set (the store is recorded as interrupted).
        SlideError: a tile that cannot be read, named (the store is recorded as failed).
    """
    if uncertainty:
        raise ValueError("uncertainty maps are not available for whole slides; segment a region as an image for them")
    start = time.perf_counter()
    owned_slide = not isinstance(slide, Slide)
    if owned_slide:
        slide = open_slide(slide, mpp=mpp)
    try:
        out = Path(out)
        settings = dict(roi=roi, mpp=mpp, tile=int(tile), margin=int(margin), options=options, threads=int(threads),
                        amp=amp, tta=tta, weights_sha256=weights_hash(model), engine=engine_name(engine, amp))
        plan = plan_slide(model_config(model), slide, out, **settings)
        action = check_outputs(out, plan, resume=resume, overwrite=overwrite)
        done = read_store_attrs(out) if action == "resume" else None
        if done and done.get("complete"):  # resuming a finished run: nothing left to do
            return _finished(plan, out, done, start)
        target = _target(out, action)
        if target != out:
            plan = plan_slide(model_config(model), slide, target, **settings)
        stages = Stages()
        with stages.time("tissue"):
            tissue_mask = _tissue_mask(tissue, slide, plan.slide_mpp)
        run = tiles_to_run(plan, tissue_mask)
        if before_start is not None:
            before_start(plan, int(run.sum()))
        if action != "resume":
            create_store(plan, tissue_mask, run, slide_stem(out))
        tiles = [(int(i), int(j)) for i, j in zip(*np.nonzero(run))]
        executor = DaskExecutor(client, model) if client is not None else LocalExecutor(model, pipeline=pipeline)
        total, too_large, resumed = _run_store(plan, executor, tiles, progress, cancel, keep=target == out,
                                               stages=stages)
        if target != out:
            swap_in(target, out)
        ny, nx = plan.grid
        return SlideResult(store=out, n_objects=total, tiles_total=ny * nx, tiles_run=len(tiles),
                           tiles_resumed=resumed, too_large=too_large, working_mpp=plan.working_mpp,
                           shape=(plan.height, plan.width), level=plan.level,
                           tissue_fraction=len(tiles) / max(1, ny * nx), seconds=time.perf_counter() - start,
                           stages=dict(stages.seconds))
    finally:
        if owned_slide:
            slide.close()
