"""Batch prediction of image files and slides (what ``napari-sgdc predict`` runs).

`collect_inputs` turns files and folders into image files and slide files,
`predict_files` segments image files into result files (see
`napari_sgdc.files.write_result`), and `predict_slides` segments whole slides into
result stores with their object tables (see `napari_sgdc.wholeslide`). Errors about one
input are reported through ``on_error`` (one line naming the file) and counted; the
other inputs still run.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .grid import DEFAULT_MARGIN, DEFAULT_TILE
from .wholeslide.store import StorePaths, store_paths

__all__ = [
    "PredictSummary", "cancel_on_signals", "check_outputs", "collect_inputs", "expand_inputs", "image_targets",
    "predict_files", "predict_slides", "segment_file",
]

ErrorSink = Callable[[str], Any] | None


def _noop(message: str) -> None:
    """The default error sink: the failures are only counted."""


def expand_inputs(inputs: Sequence[Path], on_error: ErrorSink = None) -> tuple[list[Path], int]:
    """Files from files and folders (a folder gives its images and slides, sorted).

    Returns:
        (files, number of bad paths, each reported through `on_error`).
    """
    from .files import IMAGE_SUFFIXES
    from .slide import OPENSLIDE_SUFFIXES

    report = on_error or _noop
    files, bad = [], 0
    for path in map(Path, inputs):
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + OPENSLIDE_SUFFIXES)
            if not found:
                report(f"{path}: folder holds no images ({' '.join(IMAGE_SUFFIXES)})")
                bad += 1
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            report(f"{path}: no such file or folder")
            bad += 1
    return files, bad


def collect_inputs(inputs: Sequence[Path], on_error: ErrorSink = None) -> tuple[list[Path], list[Path], int]:
    """The image files and slide files of `inputs` (a file named twice counts once).

    Returns:
        (image files, slide files, number of bad paths reported through `on_error`).
    """
    from .slide import is_slide

    files, bad = expand_inputs(inputs, on_error)
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)
    files = list(unique.values())
    slides = [path for path in files if is_slide(path)]
    return [path for path in files if path not in slides], slides, bad


def image_targets(files: Sequence[Path]) -> list[tuple[Path, int | None, str]]:
    """(file, page, output stem) of every image in `files`: the file's stem, or ``S_p0``,
    ``S_p1``, … for the pages of a multi-page TIFF, each segmented as its own image whatever
    their sizes (`napari_sgdc.files.image_pages`)."""
    from .files import image_pages

    targets: list[tuple[Path, int | None, str]] = []
    for path in map(Path, files):
        pages = image_pages(path)
        if pages == 1:
            targets.append((path, None, path.stem))
        else:
            targets.extend((path, page, f"{path.stem}_p{page}") for page in range(pages))
    return targets


def check_outputs(files: Sequence[Path], out_dir: Path, *, instances: bool, uncertainty: bool,
                  overwrite: bool, types: bool = False, slides: Sequence[Path] = ()) -> None:
    """Refuses, before any work, inputs whose outputs collide or would replace existing files
    (a multi-page TIFF writes one set per page, `image_targets`; `types`: the model has nucleus
    types). `slides` predicted into the same folder own their outputs too (`store_paths`): an image
    ``S.png`` and a slide ``S.svs`` would both write ``S_objects.csv``.

    Raises:
        ValueError: one line naming the two inputs, or the existing file.
    """
    from .files import result_paths

    owners: dict[Path, Path] = {target: Path(slide) for slide in slides for target in store_paths(out_dir, slide)}
    for path, _, stem in image_targets(files):
        for target in result_paths(out_dir, stem, instances=instances, uncertainty=uncertainty, types=types):
            if target in owners and owners[target] != path:
                raise ValueError(f"{owners[target]} and {path} would both write {target.name}: "
                                 "rename one or predict them into different --out folders")
            owners[target] = path
            if not overwrite and target.exists():
                raise ValueError(f"{target} already exists; not replaced (use --overwrite, or another --out)")


def segment_file(model, path: Path, options=None, *, tile: int | None = 512, overlap: float = 0.25,
                 tta: bool = False, uncertainty: bool = False, mpp: float | None = None, amp: bool = False,
                 progress: Callable[[int, int], None] | None = None, page: int | None = None, engine="torch"):
    """`napari_sgdc.inference.segment` of one image file, or of one `page` of a multi-page TIFF
    (a ValueError names its shape and dtype)."""
    from .files import read_image
    from .inference import segment

    image = read_image(path, page)
    try:
        return segment(model, image, options, tile=tile or None, overlap=overlap, tta=tta, uncertainty=uncertainty,
                       progress=progress, stack=False, mpp=mpp, amp=amp, engine=engine)
    except ValueError as error:
        raise ValueError(f"unsupported image (shape {image.shape}, dtype {image.dtype}): {error}") from None


@dataclass
class PredictSummary:
    """What `predict_files` did: ``done`` of ``total`` files written, and the failure lines."""

    done: int = 0
    total: int = 0
    failures: list[str] = field(default_factory=list)


def predict_files(model, paths: Sequence[Path], out_dir: str | Path, options=None, *, overwrite: bool = False,
                  tile: int | None = 512, overlap: float = 0.25, tta: bool = False, mpp: float | None = None,
                  amp: bool = False, uncertainty: bool = False, engine="torch",
                  progress: Callable[[int, int, str], Any] | None = None,
                  on_error: ErrorSink = None) -> PredictSummary:
    """Segments image files and writes, per stem S, ``S_mask.png``, ``S_prob.tif``,
    ``S_boundary.tif`` (plus ``S_labels.tif`` and the object table ``S_objects.csv`` for instance
    models, ``S_classes.tif`` for models with nucleus types, and ``S_uncertainty.tif`` with
    `uncertainty`) into `out_dir` (`napari_sgdc.files.write_result`). Each page of a multi-page
    TIFF is an image of its own, written as ``S_p0_…``, ``S_p1_…`` (`image_targets`).

    Args:
        model: an `SGDCSegmenter`.
        paths: image files.
        out_dir: output folder (created).
        options: `PostprocessOptions` (default: the model's).
        overwrite: replace existing result files.
        tile, overlap, tta, mpp, amp, uncertainty, engine: as in `napari_sgdc.inference.segment`.
        progress: called with (files done, files total, status text) as the run advances.
        on_error: called with one line per file that fails (the others still run).

    Raises:
        ValueError: before any work, for colliding stems, existing files without
            `overwrite`, or a µm/px the model cannot use.
    """
    from .files import write_result
    from .inference import check_mpp

    out_dir = Path(out_dir)
    type_names = tuple(getattr(model.config, "type_names", ()) or ())
    check_outputs(paths, out_dir, instances=model.config.is_instance, uncertainty=uncertainty, overwrite=overwrite,
                  types=bool(type_names))
    check_mpp(mpp, model.config)  # before any work: one line for a model without a scale
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = image_targets(paths)
    summary, report, advance = PredictSummary(total=len(targets)), on_error or _noop, progress or (lambda *a: None)
    for index, (path, page, stem) in enumerate(targets):
        name = path.name if page is None else f"{path.name} page {page}"
        advance(index, len(targets), name)

        def on_tile(tiles_done: int, tiles_total: int) -> None:
            advance(index, len(targets), f"{name} tile {tiles_done}/{tiles_total}")

        try:
            result = segment_file(model, path, options, tile=tile, overlap=overlap, tta=tta, uncertainty=uncertainty,
                                  mpp=mpp, amp=amp, progress=on_tile, page=page, engine=engine)
            write_result(result, out_dir, stem, overwrite=overwrite, type_names=type_names)
            summary.done += 1
        except (ValueError, OSError) as error:
            summary.failures.append(f"{path}{'' if page is None else f' (page {page})'}: {error}")
            report(summary.failures[-1])
    advance(len(targets), len(targets), "")
    return summary


# --------------------------------------------------------------------------- whole slides


def _dask_client(scheduler: str | None, workers: int):
    """A dask.distributed Client for `scheduler` or `workers` > 1, or None (single process)."""
    if not scheduler and workers <= 1:
        return None, None
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--workers/--scheduler need dask.distributed: pip install 'napari-sgdc[cluster]'") from None
    if scheduler:
        return Client(scheduler), None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def _model_spec(name: str) -> str:
    from .checkpoints import builtin_models

    return name if name in builtin_models() else str(Path(name).expanduser().resolve())


def plan_slide_outputs(slides: Sequence[Path], out_dir: Path) -> list[StorePaths]:
    """The outputs of each slide (`napari_sgdc.wholeslide.store_paths`), refusing before any
    work two slides whose outputs would share a name (``case.01.ome.tif`` and ``case.01.svs``)."""
    owners: dict[Path, Path] = {}
    outputs = []
    for path in slides:
        paths = store_paths(out_dir, path)
        if paths.store in owners:
            raise ValueError(f"{owners[paths.store]} and {path} would both write {paths.store.name}: "
                             "rename one or predict them into different --out folders")
        owners[paths.store] = path
        outputs.append(paths)
    return outputs


def _slide_line(path: Path, error: BaseException) -> str:
    """One line about a slide's error, naming the slide once (the message may name it already)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if path.name in text else f"{path}: {text}"


def _kept(store: Path, resume_command: str | None) -> str:
    """What a stopped run kept, and how to resume it (empty when nothing was kept)."""
    from .wholeslide import open_store, store_state

    state = store_state(store)
    if state == "complete":
        return f"; the earlier result {store} is kept unchanged"
    if state != "partial":
        return ""
    done, total = open_store(store).tiles_done
    if not done:
        return ""
    how = resume_command or "segment_slide(..., resume=True)"
    return f"; kept {done} of {total} tiles in {store}; resume with: {how}"


def _check_size(path: Path, yes: bool, confirm):
    """`segment_slide`'s before_start: refuses an absurd plan unless `yes` or `confirm(problem)`."""
    from .wholeslide.plan import plan_problem

    def check(plan, tiles: int) -> None:
        problem = plan_problem(plan, tiles)
        if problem and not yes and not (confirm is not None and confirm(f"{path.name}: {problem}")):
            raise ValueError(f"{path}: {problem}; not started (pass --yes to run it anyway)")

    return check


def predict_slides(model, slides: Sequence[Path], out_dir: str | Path, options, *, model_source: str,
                   roi: tuple[int, int, int, int] | None = None, mpp: float | None = None,
                   tile: int = DEFAULT_TILE, margin: int = DEFAULT_MARGIN, workers: int = 0,
                   scheduler: str | None = None, resume: bool = False, overwrite: bool = False, amp: bool = False,
                   tta: bool = False, uncertainty: bool = False, on_error: ErrorSink = None, tissue: str = "auto",
                   yes: bool = False, confirm: Callable[[str], bool] | None = None, cancel=None,
                   resume_command: str | None = None, engine: str = "torch") -> int:
    """The slide branch of predict: ``S.ome.zarr``, ``S_objects.csv`` and ``S_objects.geojson``
    per slide, through `napari_sgdc.wholeslide.segment_slide` and `export_objects`.

    Args:
        model: the loaded model (single process).
        slides: slide files.
        out_dir: output folder (created).
        options: the run's `PostprocessOptions`.
        model_source: the model's built-in name or checkpoint path (each cluster worker loads it).
        roi, mpp, tile, margin, resume, overwrite, amp, tta, uncertainty, tissue, engine: as in `segment_slide`
            (which refuses ``uncertainty`` in one line).
        workers: run tiles on a local Dask cluster of N processes (> 1).
        scheduler: run tiles on an existing Dask cluster at this address.
        on_error: called with one line per slide that fails (with what was kept and how to resume).
        yes, confirm: an absurd plan (`napari_sgdc.wholeslide.plan.plan_problem`) runs only with
            `yes` or when ``confirm(problem)`` returns True; else it is refused before any work.
        cancel: a `threading.Event` (the CLI sets it on Ctrl-C and SIGTERM): the run stops after
            the current tile, reports what it kept, and the remaining slides are not started.
        resume_command: the command that resumes, for the one line after an interrupt or error.

    Returns:
        the number of slides that failed (or were interrupted).
    """
    from .inference import Cancelled

    report, out_dir = on_error or _noop, Path(out_dir)
    failures = 0
    outputs = plan_slide_outputs(slides, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    client = cluster = None
    settings = dict(roi=roi, mpp=mpp, tile=tile, margin=margin, options=options, resume=resume, overwrite=overwrite,
                    amp=amp, tta=tta, uncertainty=uncertainty, tissue=tissue, cancel=cancel, engine=engine)
    try:
        if scheduler or workers > 1:
            client, cluster = _dask_client(scheduler, workers)
        threads = max(1, (os.cpu_count() or 1) // workers) if cluster is not None else 0
        # on a cluster each worker loads the model itself, once
        spec = _model_spec(model_source) if client is not None else model
        for path, paths in zip(slides, outputs):
            try:
                _predict_slide(spec, path, paths, client=client, threads=threads,
                               before_start=_check_size(path, yes, confirm), **settings)
            except (Cancelled, KeyboardInterrupt):
                report(f"{path}: interrupted{_kept(paths.store, resume_command)}")
                return failures + 1
            except (ValueError, OSError) as error:
                report(_slide_line(path, error) + _kept(paths.store, resume_command))
                failures += 1
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return failures


def _predict_slide(model, path: Path, paths: StorePaths, *, mpp, resume: bool, overwrite: bool, **settings) -> None:
    """One slide: its store, then its table and GeoJSON (each recorded in the store once written,
    so a later resume may replace them and nothing else)."""
    from tqdm import tqdm

    from .slide import open_slide
    from .wholeslide import check_outputs, export_objects, segment_slide
    from .wholeslide.store import record_export

    from .wholeslide.store import store_status, written_by

    store, table, geojson = paths
    check_outputs(store, resume=resume, overwrite=overwrite, others=(table, geojson))
    if resume and not overwrite and store_status(store) == "complete":
        for target in (table, geojson):  # written again only where missing (a disk that filled up)
            if not written_by(store, target):
                export_objects(store, target if target == table else None, target if target == geojson else None,
                               overwrite=True)
                record_export(store, target)
        print(f"{path}: {store} is already complete; nothing to do", file=sys.stderr)
        return
    with open_slide(path, mpp=mpp) as slide, tqdm(total=0, desc=path.name, unit="tile", file=sys.stderr) as bar:
        def on_tile(done, total):
            bar.total = total
            bar.n = done
            bar.refresh()

        result = segment_slide(model, slide, store, mpp=mpp, progress=on_tile, resume=resume, overwrite=overwrite,
                               **settings)
    count = export_objects(store, table, overwrite=True)
    record_export(store, table)
    export_objects(store, None, geojson, overwrite=True)
    record_export(store, geojson)
    print(f"{path}: {count} objects, {result.tiles_run} of {result.tiles_total} tiles with tissue, "
          f"{result.seconds:.1f} s -> {store}", file=sys.stderr)


def cancel_on_signals(cancel, log: Callable[[str], Any]):
    """A context manager: SIGINT (Ctrl-C) and SIGTERM set `cancel` (the run stops after the current
    tile and says how to resume); a second Ctrl-C stops at once. Only in the main thread."""
    import contextlib
    import signal
    import threading

    @contextlib.contextmanager
    def manager():
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_signal(signum, frame) -> None:
            if cancel.is_set() and signum == signal.SIGINT:
                raise KeyboardInterrupt
            cancel.set()
            log("interrupt: stopping after the current tile (Ctrl-C again to stop at once)")

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    return manager()
