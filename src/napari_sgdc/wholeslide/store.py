"""The result store of a whole-slide run: its layout, its names, and the public API to read
it (`open_store`, `ResultStore`, `store_state`) and to decide what happens to an existing one
(`check_outputs`, the one exists / resume / overwrite policy).

Layout (zarr v2, OME-NGFF 0.4)::

    S.ome.zarr/            multiscale image, axes (c, y, x): c = probability, boundary (uint8, p·255;
                           the separation map for distance and HoVer models)
    S.ome.zarr/labels/nuclei   multiscale uint32 instance labels (0 = background; `SLIDE_LABEL_DTYPE`)
    S.ome.zarr/labels/tissue   uint8 tissue mask (1 = tissue, 2 = tissue and processed) at thumbnail scale
    S.ome.zarr/tiles/i_j.npz   per-tile object records (`napari_sgdc.wholeslide.export_objects` reads them);
                           with nucleus types also each object's ``class_id`` (int16, 1..T) and
                           ``class_confidence`` (float32); the type names and colours are in the plan

The root's ``napari_sgdc`` attributes hold the format, ``complete``, the lifecycle ``status``
(`STATUSES`), the plan's signature (`SlidePlan.signature`, with the model's weights hash), the
exports written from the store (``exports``: name → sha256, so a user's own file of that name is
never replaced) and, once complete, ``n_objects`` and ``too_large``. Only this module reads and
writes them (atomically: a kill never leaves a half-written ``.zattrs``).

Lifecycle (`store_status`): ``new`` (created, no run yet) → ``running`` (a process is writing it,
with its pid and host) → ``complete``, or ``interrupted`` (Ctrl-C, SIGTERM, cancel, or a
``running`` store whose process is gone: kill -9, power loss) or ``failed`` (an error, recorded
with its one-line message). What each command does in each state is the table in docs/wholeslide.md;
`check_outputs` decides it. An overwrite writes a new store beside the old one (`incoming_path`)
and swaps them only when it completed (`swap_in`), so a failed overwrite keeps the old result.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..slide import TissueMask
from .plan import SlidePlan, stored_signature

__all__ = ["FORMAT", "SLIDE_LABEL_DTYPE", "STATUSES", "StoreExistsError", "ResultStore", "StorePaths", "check_outputs",
           "open_store", "read_store_attrs", "read_store_labels", "slide_stem", "store_paths", "store_state", "store_status"]

FORMAT = "napari-sgdc-wholeslide/1"
SCRATCH = "_work"
TWO_PART_SUFFIXES = (".ome.tiff", ".ome.tif", ".ome.zarr")
STATES = ("absent", "foreign", "partial", "complete")
STATUSES = ("new", "running", "interrupted", "failed", "complete")
"""The lifecycle of a napari-sgdc store (`store_status`); `store_state`'s ``partial`` is any but complete."""
SLIDE_LABEL_DTYPE = "uint32"
"""A slide's labels: uint32 always (its object count is not known when the store is created, and a
slide easily holds more than 65,535 objects; image files follow `napari_sgdc.files.label_dtype`)."""
INCOMING, OUTGOING = ".incoming", ".outgoing"  # an overwrite's new store, and the old one during the swap


class StoreExistsError(FileExistsError):
    """The output store exists and neither ``resume`` nor ``overwrite`` was asked for."""


def slide_stem(path: str | Path) -> str:
    """The name of a slide (or store) without its format suffix: a known two-part suffix
    (``.ome.tif``, ``.ome.tiff``, ``.ome.zarr``) or else exactly one extension.

    ``case.01.svs`` → ``case.01``; ``case.01.ome.tif`` → ``case.01``; ``a.b.c.ndpi`` → ``a.b.c``.
    """
    name = Path(path).name
    for suffix in TWO_PART_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


class StorePaths(NamedTuple):
    """The outputs of one slide: the store, the object table and the QuPath GeoJSON."""

    store: Path
    table: Path
    geojson: Path


def store_paths(out_dir: str | Path, slide_path: str | Path) -> StorePaths:
    """``S.ome.zarr``, ``S_objects.csv`` and ``S_objects.geojson`` in `out_dir`, S = `slide_stem`."""
    out_dir, stem = Path(out_dir), slide_stem(slide_path)
    return StorePaths(out_dir / f"{stem}.ome.zarr", out_dir / f"{stem}_objects.csv", out_dir / f"{stem}_objects.geojson")


def read_store_attrs(path: str | Path) -> dict | None:
    """The ``napari_sgdc`` attributes of a store, or None when `path` holds none (absent or foreign)."""
    try:
        with open(Path(path) / ".zattrs") as stream:
            attrs = json.load(stream)
    except (OSError, ValueError):
        return None
    value = attrs.get("napari_sgdc") if isinstance(attrs, dict) else None
    return value if isinstance(value, dict) else None


def store_state(path: str | Path) -> str:
    """``"absent"``, ``"foreign"`` (something else is there), ``"partial"`` (a run that has not
    finished: any lifecycle status but complete) or ``"complete"``; the coarse view of `store_status`."""
    status = store_status(path)
    return status if status in ("absent", "foreign", "complete") else "partial"


def _alive(pid: int) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, ValueError, TypeError):
        return True
    return True


def status_of(attrs: dict) -> str:
    """The lifecycle status (`STATUSES`) recorded in a store's attributes; a ``running`` store whose
    process is gone (on this host) is ``interrupted``; stores written before the lifecycle existed
    are ``complete`` or ``interrupted``."""
    if attrs.get("complete"):
        return "complete"
    status = attrs.get("status", "interrupted")
    if status == "running":
        owner = attrs.get("owner") or {}
        if owner.get("host") == socket.gethostname() and not _alive(owner.get("pid", 0)):
            return "interrupted"
    return status if status in STATUSES else "interrupted"


def store_status(path: str | Path) -> str:
    """``"absent"``, ``"foreign"``, or the lifecycle status of a napari-sgdc store (`STATUSES`)."""
    if not Path(path).exists():
        return "absent"
    attrs = read_store_attrs(path)
    return "foreign" if attrs is None else status_of(attrs)


def update_attrs(store: str | Path, **values) -> dict:
    """Updates the store's ``napari_sgdc`` attributes atomically (a temporary file, then a rename)."""
    from ..files import atomic_write

    path = Path(store) / ".zattrs"
    with open(path) as stream:
        attrs = json.load(stream)
    attrs["napari_sgdc"] = {**attrs.get("napari_sgdc", {}), **values}
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(attrs, indent=2, ensure_ascii=False)))
    return attrs["napari_sgdc"]


def set_status(store: str | Path, status: str, **values) -> None:
    """Records the lifecycle `status` (``running`` also records this process as the owner)."""
    owner = {"pid": os.getpid(), "host": socket.gethostname()} if status == "running" else None
    update_attrs(store, status=status, owner=owner, **values)


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record_export(store: str | Path, path: str | Path) -> None:
    """Records that `path` was written from `store` (its name and sha256), so a resume may replace it."""
    exports = dict((read_store_attrs(store) or {}).get("exports") or {})
    exports[Path(path).name] = file_digest(path)
    update_attrs(store, exports=exports)


def written_by(store: str | Path, path: str | Path) -> bool:
    """Whether the file at `path` is, byte for byte, the one `store` exported (`record_export`)."""
    recorded = ((read_store_attrs(store) or {}).get("exports") or {}).get(Path(path).name)
    return recorded is not None and Path(path).is_file() and file_digest(path) == recorded


def incoming_path(store: str | Path) -> Path:
    """Where an overwrite writes its new store, beside the old one."""
    return Path(f"{store}{INCOMING}")


def recover_swap(store: str | Path) -> None:
    """Finishes or undoes an overwrite's swap that a kill interrupted (the old result is never lost)."""
    store = Path(store)
    outgoing = Path(f"{store}{OUTGOING}")
    if outgoing.exists() and read_store_attrs(outgoing) is not None:
        if store.exists():
            shutil.rmtree(outgoing)  # the swap was done: only the old store's removal was left
        else:
            os.replace(outgoing, store)  # killed between the two renames: the old result comes back


def swap_in(incoming: str | Path, store: str | Path) -> None:
    """Replaces `store` by the completed `incoming` store (two renames; `recover_swap` repairs a kill between them)."""
    store = Path(store)
    outgoing = Path(f"{store}{OUTGOING}")
    if store.exists():
        os.replace(store, outgoing)
    os.replace(incoming, store)
    shutil.rmtree(outgoing, ignore_errors=True)


def _check_resume(store: Path, attrs: dict, plan: SlidePlan | None) -> None:
    """Refuses a resume into a store another process is writing, or made with other settings or weights."""
    status = status_of(attrs)
    if status == "running":
        owner = attrs.get("owner") or {}
        raise StoreExistsError(f"{store} is being written by another run (pid {owner.get('pid')} on "
                               f"{owner.get('host')}); wait for it, or stop it first")
    if plan is None:
        return
    stored = stored_signature(attrs.get("plan") or {})
    wanted = json.loads(json.dumps(plan.signature()))
    stored_hash, wanted_hash = stored.pop("weights_sha256", None), wanted.pop("weights_sha256", None)
    if stored != wanted:
        raise ValueError(f"{store}: cannot resume: the store was made with other settings "
                         "(slide, model µm/px, tile, margin, thresholds, roi, amp, tta or nucleus types); "
                         "use overwrite")
    if stored_hash is None:
        warnings.warn(f"{store} does not record its model's weights (written before 0.2): resuming it trusts that "
                      "the model is the one that made it", stacklevel=3)
    elif wanted_hash is not None and stored_hash != wanted_hash:
        raise ValueError(f"{store}: cannot resume: the store was made by a model with other weights "
                         f"(sha256 {stored_hash[:12]}…, this one {wanted_hash[:12]}…); use overwrite or that model")


def check_outputs(store: str | Path, plan: SlidePlan | None = None, *, resume: bool = False, overwrite: bool = False,
                  others: tuple[str | Path, ...] = ()) -> str:
    """The one policy for existing outputs; decides, deletes nothing (the table in docs/wholeslide.md).

    Args:
        store: the store path. plan: the run's plan; a resume must match the store's settings and
            model weights (None: not checked).
        resume, overwrite: what the user asked for. others: further outputs (the object table and
            GeoJSON): they must not exist unless `overwrite`, or `resume` of the store that wrote them.

    Returns:
        ``"create"`` (nothing there), ``"resume"`` (continue the store, or nothing to do when it is
        complete) or ``"replace"`` (write a new store beside it and swap on success).

    Raises:
        StoreExistsError: something exists and neither `resume` nor `overwrite` is set, the store
            is not a napari-sgdc store (never replaced), another process is writing it, or a resume
            would replace a file the store did not write. ValueError: resume with other settings or weights.
    """
    recover_swap(store)
    state = store_state(store)
    if state == "foreign":
        raise StoreExistsError(f"{store} exists and is not a napari-sgdc slide store; not replaced")
    if not (resume or overwrite):
        for path in (store, *others):
            if Path(path).exists():
                raise StoreExistsError(f"{path} already exists; not replaced (resume or overwrite it)")
    if overwrite:
        if state != "absent" and status_of(read_store_attrs(store)) == "running":
            _check_resume(Path(store), read_store_attrs(store), None)
        return "create" if state == "absent" else "replace"
    for path in others:
        if Path(path).exists() and (state == "absent" or not written_by(store, path)):
            raise StoreExistsError(f"{path} exists and was not written by {Path(store).name}; not replaced "
                                   "(move it away, or use overwrite)")
    if state == "absent":
        return "create"
    _check_resume(Path(store), read_store_attrs(store), plan)
    return "resume"


@dataclass(frozen=True)
class ResultStore:
    """A napari-sgdc slide store, opened for reading (`open_store`).

    Attributes:
        path: the store folder. attrs: its ``napari_sgdc`` attributes.
    """

    path: Path
    attrs: dict

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def state(self) -> str:
        return "complete" if self.complete else "partial"

    @property
    def status(self) -> str:
        """The lifecycle status (`STATUSES`)."""
        return status_of(self.attrs)

    @property
    def tiles_done(self) -> tuple[int, int]:
        """(tiles done, tiles to run) of the run that wrote the store (0 to run: not recorded)."""
        done = sum(1 for _ in (self.path / "tiles").glob("*.npz"))
        return done, int(self.attrs.get("tiles_to_run") or 0)

    @property
    def stem(self) -> str:
        return slide_stem(self.path)

    @property
    def plan(self) -> SlidePlan:
        """The plan (and so the options: thresholds, amp, tta, roi) the store was made with."""
        return SlidePlan.from_signature(self.attrs["plan"], self.path)

    @property
    def working_mpp(self) -> float:
        """µm per pixel of level 0 (the working grid)."""
        return self.plan.working_mpp

    @property
    def n_objects(self) -> int | None:
        return self.attrs.get("n_objects")

    @property
    def type_names(self) -> tuple[str, ...]:
        """The nucleus types of the model that made the store (type id t is ``type_names[t - 1]``); empty: none."""
        return self.plan.type_names

    @property
    def type_colors(self) -> tuple[str, ...]:
        """``#rrggbb`` per nucleus type (`type_names`)."""
        return self.plan.type_colors

    def object_types(self) -> tuple[np.ndarray, np.ndarray]:
        """The type table of the store's objects: (N + 1,) int16 type id and float32 confidence per object
        id (`napari_sgdc.wholeslide.export.read_object_types`; all 0 without types)."""
        from .export import read_object_types

        return read_object_types(self.path)

    @property
    def levels(self) -> int:
        """Pyramid levels."""
        return len(open_group(self.path, mode="r").attrs["multiscales"][0]["datasets"])

    @property
    def roi(self) -> tuple[int, int, int, int]:
        """The working-grid box (y0, x0, y1, x1) the run kept objects in."""
        return self.plan.roi

    def crop_box(self, roi: tuple[float, float, float, float], max_side: int = 2048) -> tuple[int, int, int, int]:
        """(y0, x0, h, w) on the working grid of the level-0 slide box `roi` (x, y, w, h),
        centred and at most `max_side` on a side."""
        plan = self.plan
        x, y, w, h = roi
        s = plan.to_level0
        y0, x0 = int(y // s), int(x // s)
        y1, x1 = min(plan.height, int(math.ceil((y + h) / s))), min(plan.width, int(math.ceil((x + w) / s)))
        if y1 - y0 > max_side:
            y0 = (y0 + y1 - max_side) // 2
            y1 = y0 + max_side
        if x1 - x0 > max_side:
            x0 = (x0 + x1 - max_side) // 2
            x1 = x0 + max_side
        return y0, x0, y1 - y0, x1 - x0

    def labels(self, level: int = 0) -> np.ndarray:
        """The instance labels at pyramid `level`, in memory (a small store or level)."""
        return read_store_labels(self.path, level)

    def read_pixels(self, y0: int, x0: int, height: int, width: int) -> np.ndarray:
        """(height, width, 3) uint8 slide pixels on the working grid (the pixels the model saw)."""
        from ..slide import open_slide
        from .plan import read_working

        plan = self.plan
        with open_slide(plan.slide_path, backend=plan.backend, mpp=plan.slide_mpp) as slide:
            return read_working(slide, plan, y0, x0, height, width)


def open_store(path: str | Path) -> ResultStore:
    """The napari-sgdc store at `path`; a one-line ValueError when there is none."""
    attrs = read_store_attrs(path)
    if attrs is None:
        raise ValueError(f"{path}: not a napari-sgdc slide store")
    return ResultStore(Path(path), attrs)


def read_store_labels(store: str | Path, level: int = 0) -> np.ndarray:
    """The instance labels of a (small) store at pyramid `level`, in memory."""
    return np.asarray(open_group(store, mode="r")[f"labels/nuclei/{level}"][...])


# --------------------------------------------------------------------------- writing


def open_group(store: str | Path, mode: str = "r+"):
    import zarr

    return zarr.open_group(str(store), mode=mode, zarr_format=2)


def _compressor():
    from numcodecs import Blosc

    return Blosc(cname="zstd", clevel=3, shuffle=Blosc.BITSHUFFLE)


def n_levels(plan: SlidePlan) -> int:
    """Pyramid levels: halved until the longer side fits one tile (at most 12)."""
    levels, side = 1, max(plan.height, plan.width)
    while side > plan.tile and levels < 12:
        side = math.ceil(side / 2)
        levels += 1
    return levels


def level_shape(plan: SlidePlan, level: int) -> tuple[int, int]:
    return math.ceil(plan.height / 2 ** level), math.ceil(plan.width / 2 ** level)


def record_path(plan: SlidePlan, i: int, j: int) -> Path:
    """The object record of tile (i, j) (its existence marks the tile done)."""
    return Path(plan.store) / "tiles" / f"{i}_{j}.npz"


def _array(group, name: str, shape, chunks, dtype: str, chunk_keys: bool = True):
    extra = {"chunk_key_encoding": {"name": "v2", "separator": "/"}} if chunk_keys else {}
    return group.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0,
                              compressors=_compressor(), **extra)


def _multiscale(name: str, axes: list, scales: list, kind: str) -> dict:
    datasets = [{"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
                for level, scale in enumerate(scales)]
    return {"version": "0.4", "name": name, "axes": axes, "datasets": datasets, "type": kind}


def scratch_present(plan: SlidePlan, i: int, j: int) -> bool:
    """Whether tile (i, j)'s owned labels are still in the scratch array (a partly cleaned scratch
    folder loses them: the tile is then run again, so the labels always match the records)."""
    return (Path(plan.store) / SCRATCH / "owned" / str(i) / str(j) / "0" / "0").is_file()


def ensure_scratch(plan: SlidePlan) -> None:
    """Creates the scratch array of the tiles' owned labels unless it is there (a cleaned scratch
    folder is made again; the tiles whose labels it lost run again, `scratch_present`)."""
    root = open_group(plan.store)
    if SCRATCH in root and "owned" in root[SCRATCH]:
        return
    ny, nx = plan.grid
    group = root[SCRATCH] if SCRATCH in root else root.create_group(SCRATCH)
    _array(group, "owned", (ny, nx, plan.window, plan.window), (1, 1, plan.window, plan.window), "int32")


def create_store(plan: SlidePlan, tissue: TissueMask, processed: np.ndarray, name: str) -> None:
    """Creates the empty store of `plan` with its tissue mask (2 where `processed` tiles lie) and metadata."""
    root = open_group(plan.store, mode="w")
    levels = n_levels(plan)
    labels = root.create_group("labels")
    nuclei = labels.create_group("nuclei")
    for level in range(levels):
        h, w = level_shape(plan, level)
        _array(root, str(level), (2, h, w), (1, plan.tile, plan.tile), "uint8")
        _array(nuclei, str(level), (h, w), (plan.tile, plan.tile), SLIDE_LABEL_DTYPE)
    tissue_group = labels.create_group("tissue")
    tissue_map = tissue.mask.astype(np.uint8)
    _array(tissue_group, "0", tissue_map.shape, tissue_map.shape, "uint8", chunk_keys=False)[...] = \
        tissue_map + processed_on(tissue, processed, plan)
    ensure_scratch(plan)
    (Path(plan.store) / "tiles").mkdir(exist_ok=True)
    um, tissue_um = plan.working_mpp, plan.slide_mpp * tissue.downsample
    axes_yx = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    scales = [[um * 2 ** level] * 2 for level in range(levels)]
    channel = {"window": {"start": 0, "end": 255, "min": 0, "max": 255}}
    root.attrs.update({
        "multiscales": [_multiscale(name, [{"name": "c", "type": "channel"}] + axes_yx,
                                    [[1.0, *scale] for scale in scales], "mean")],
        "omero": {"channels": [{"label": "probability", "color": "FF00FF", **channel},
                               {"label": "boundary", "color": "00FFFF", **channel}]},
        "napari_sgdc": {"format": FORMAT, "complete": False, "status": "new", "plan": plan.signature(),
                        "tiles_to_run": int(processed.sum()), "probability_scale": "uint8 = round(255 * p)"},
    })
    labels.attrs["labels"] = ["nuclei", "tissue"]
    source = {"version": "0.4", "source": {"image": "../../"}}
    nuclei.attrs.update({"multiscales": [_multiscale("nuclei", axes_yx, scales, "nearest")], "image-label": source})
    tissue_group.attrs.update({"multiscales": [_multiscale("tissue", axes_yx, [[tissue_um, tissue_um]], "nearest")],
                               "image-label": {**source, "colors": [{"label-value": 1, "rgba": [0, 160, 0, 96]},
                                                                    {"label-value": 2, "rgba": [0, 255, 0, 96]}]}})


def processed_on(tissue: TissueMask, processed: np.ndarray, plan: SlidePlan) -> np.ndarray:
    """1 on the tissue-mask pixels whose tile was run (so the saved mask shows what was skipped)."""
    rows = ((np.arange(tissue.mask.shape[0]) + 0.5) * tissue.downsample / plan.to_level0 // plan.tile).astype(int)
    cols = ((np.arange(tissue.mask.shape[1]) + 0.5) * tissue.downsample / plan.to_level0 // plan.tile).astype(int)
    rows, cols = np.clip(rows, 0, processed.shape[0] - 1), np.clip(cols, 0, processed.shape[1] - 1)
    return (processed[rows[:, None], cols[None, :]] & tissue.mask).astype(np.uint8)


def mark_complete(plan: SlidePlan, n_objects: int, too_large: int) -> None:
    """Records a finished run in the store's attributes (before the scratch labels are removed)."""
    update_attrs(plan.store, complete=True, status="complete", owner=None, n_objects=n_objects, too_large=too_large)
