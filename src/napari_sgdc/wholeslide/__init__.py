"""Whole-slide segmentation: `segment_slide` streams tiles of a `Slide` through a model
into a chunked OME-Zarr store, with bounded memory, resume, seams resolved by ownership,
an object table, QuPath GeoJSON, and optional execution on a Dask cluster.

Modules: `plan` (the working grid on the slide: `SlidePlan`, `plan_slide`, `read_working`),
`store` (the result store: layout, `slide_stem`, `store_paths`, `open_store` / `ResultStore`,
`store_state`, `store_status` (the lifecycle: new, running, interrupted, failed, complete), and `check_outputs`, the one exists / resume / overwrite policy), `tiles` (the
three kinds of task), `pipeline` (the single-process tile pipeline: reading, the network and
decoding overlap), `workers` (slide and model per process, the local and Dask executors),
`run` (`segment_slide`) and `export` (`export_objects`).

Geometry. Everything is computed on the *working grid* (`napari_sgdc.grid`): the slide
resampled to the model's µm/px (``ModelConfig.mpp``; the slide's own level-0 resolution when
the model's is unknown). The slide is read at the coarsest level that is at least that fine
(`napari_sgdc.grid.choose_level`) and resampled (`napari_sgdc.grid.resample_window`) where the
level's pixel size differs by more than `napari_sgdc.grid.RESAMPLE_TOLERANCE`. The grid is cut
into square *cores* of ``tile`` pixels, which are also the chunks of every level-0 array in the store.

One tile (phase 1, one task): the core plus a ``margin`` on every side is read and run
through the model in one pass (`napari_sgdc.inference.predict_maps`, with the run's ``amp`` and
``tta``), then through the one post-processing stage (`napari_sgdc.postprocess.postprocess`).
Ownership rule: the tile keeps exactly the objects whose centroid lies in its core (half-open,
so every centroid has exactly one owner); an object is whole because it lies inside the window
(objects that reach the window's edge are larger than the margin and are dropped and
counted as ``too_large``). The core's probability and boundary are written to their
chunk; the owned objects' local labels go to a scratch array; their measurements and
polygons to a per-tile record, written last (the record marks the tile done).

Labels (phase 2, one task per chunk): a chunk's labels are pasted from the owned objects
of its tile and its 8 neighbours (margin <= tile), with global ids = the tile's offset
(the number of objects owned by the tiles before it in row-major order) + local id, so
ids are unique, 1..N, and independent of the order or the machines tiles ran on.
Where objects of different tiles overlap, the first painted wins (own tile, then
neighbours in row-major order). Phase 3 builds the pyramid levels chunk by chunk.

Resume: tiles whose record exists are not run again; phases 2 and 3 are recomputed
(deterministic), so a resumed store equals an uninterrupted run's. Memory: a few windows
of the model plus a few chunks, independent of the slide size.

In one process (no cluster) the tiles of phase 1 go through a pipeline (`pipeline`): tile i + 2
is read on a reader thread and tile i decoded and written on the one decoder thread while tile
i + 1 runs through the network; bounded queues keep memory flat, and the store is the one the
sequential path (``segment_slide(..., pipeline=False)``) writes, bit for bit.

Scale-out: pass a ``dask.distributed`` ``Client``; tasks carry the plan (slide path and store
path), each worker opens the slide and loads (or receives) the model once. Tasks are
idempotent, so a task lost with a worker is simply run again elsewhere.
"""

from ..grid import DEFAULT_MARGIN, DEFAULT_TILE
from .export import CLASS_COLUMNS, OBJECT_COLUMNS, export_objects
from .plan import SlidePlan, plan_slide, read_working
from .run import SlideResult, segment_slide
from .store import (FORMAT, STATUSES, ResultStore, StoreExistsError, StorePaths, check_outputs, open_store,
                    read_store_attrs, read_store_labels, slide_stem, store_paths, store_state, store_status)

__all__ = ["SlideResult", "StoreExistsError", "export_objects", "read_store_labels", "segment_slide",
           "CLASS_COLUMNS", "OBJECT_COLUMNS", "DEFAULT_TILE", "DEFAULT_MARGIN", "FORMAT", "SlidePlan", "plan_slide",
           "read_working",
           "ResultStore", "StorePaths", "check_outputs", "open_store", "read_store_attrs", "slide_stem", "store_paths",
           "store_state", "store_status", "STATUSES"]

