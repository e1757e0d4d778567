"""npe2 reader: whole slides as multiscale images, and napari-sgdc OME-Zarr results as
multiscale probability images and labels. Nothing is read at full resolution: every level
is a lazy dask array (napari reads only the tiles on screen).

Claimed patterns (napari.yaml): .svs .ndpi .mrxs .ome.tif(f) and .ome.zarr folders. Other
files are declined (None), so plain images open with napari's built-in reader as before; a
generic tiled pyramidal .tif opens with ``viewer.open(path, plugin="napari-sgdc")``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["get_reader", "read_slide", "read_result_store", "store_layers"]


def get_reader(path):
    """The reader function for `path`, or None when it is neither a slide nor a napari-sgdc store."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    path = Path(path)
    if path.is_dir():
        from napari_sgdc.wholeslide import store_state

        return read_result_store if store_state(path) in ("partial", "complete") else None
    from napari_sgdc.slide import is_slide

    return read_slide if is_slide(path) else None


def read_slide(path):
    """[(levels, metadata, "image")]: every level as a lazy dask array, scale in µm when known."""
    from napari_sgdc.slide import open_slide

    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    slide = open_slide(path)  # stays open: the dask arrays read from it
    levels = [slide.level_array(level) for level in range(slide.level_count)]
    scale = (slide.mpp, slide.mpp) if slide.mpp else (1.0, 1.0)
    metadata = {"name": path.name, "multiscale": len(levels) > 1, "rgb": True, "scale": scale,
                "contrast_limits": [0, 255], "metadata": {"slide": slide, "slide_path": str(path), "mpp": slide.mpp},
                "units": ("µm", "µm") if slide.mpp else ("pixel", "pixel")}
    return [(levels if len(levels) > 1 else levels[0], metadata, "image")]


def _scale(multiscales: dict) -> tuple[float, float]:
    return tuple(multiscales["datasets"][0]["coordinateTransformations"][0]["scale"][-2:])


def read_result_store(path):
    """Probability and boundary (multiscale images), nuclei labels (multiscale) and the tissue mask.
    A store that is not complete says so: ``(incomplete: N of M tiles)`` in every layer name, in
    the layers' metadata (``sgdc_store``) and in a warning.

    Raises:
        ValueError: one line naming the folder when its layout or metadata is not a napari-sgdc store's.
    """
    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    layers = store_layers(path, mark_incomplete=True)
    note = layers[0][1]["metadata"]["sgdc_store"]["incomplete"]
    if note:
        from napari.utils.notifications import show_warning

        show_warning(f"{path.name}: {note}; the rest of the slide is empty (resume the run to finish it)")
    return layers


def store_layers(path, mark_incomplete: bool = False) -> list:
    """The layer data of a result store (`read_result_store` without the warning); each layer's
    ``metadata["sgdc_store"]`` holds its ``kind``, the ``store`` and the ``incomplete`` note
    ("" when complete), which `mark_incomplete` also appends to the names.

    Raises:
        ValueError: one line naming the folder when its layout or metadata is not a napari-sgdc store's.
    """
    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    try:
        return _store_layers(path, mark_incomplete)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OSError) as error:
        raise ValueError(f"{path}: not a readable napari-sgdc result store ({type(error).__name__}: "
                         f"{' '.join(str(error).split())})") from None


def _incomplete_note(store) -> str:
    """"incomplete: N of M tiles" for a store that is not complete, else ""."""
    if store.status == "complete":
        return ""
    done, total = store.tiles_done
    return f"incomplete: {done} of {total} tiles" if total else f"incomplete ({store.status})"


def _store_layers(path: Path, mark_incomplete: bool) -> list:
    import dask.array as da
    import zarr

    from napari_sgdc.wholeslide import open_store

    store = open_store(path)
    stem, note = store.stem, _incomplete_note(store)
    suffix = f" ({note})" if note and mark_incomplete else ""
    root = zarr.open_group(str(path), mode="r")
    multiscales = root.attrs["multiscales"][0]
    scale = _scale(multiscales)
    images = [da.from_zarr(root[d["path"]]) for d in multiscales["datasets"]]
    layers = []
    for channel, (name, colormap) in enumerate((("probability", "magenta"), ("boundary", "cyan"))):
        layers.append(([level[channel] for level in images],
                       {"name": f"{stem} {name}", "multiscale": True, "scale": scale, "colormap": colormap,
                        "blending": "additive", "contrast_limits": [0, 255], "visible": channel == 0,
                        "opacity": 0.5}, "image"))
    nuclei = root["labels/nuclei"]
    nuclei_ms = nuclei.attrs["multiscales"][0]
    layers.append(([da.from_zarr(nuclei[d["path"]]) for d in nuclei_ms["datasets"]],
                   {"name": f"{stem} nuclei", "multiscale": True, "scale": _scale(nuclei_ms)}, "labels"))
    tissue = root["labels/tissue"]
    tissue_ms = tissue.attrs["multiscales"][0]
    layers.append((da.from_zarr(tissue["0"]), {"name": f"{stem} tissue", "scale": _scale(tissue_ms),
                                              "opacity": 0.3, "visible": False}, "labels"))
    for _, meta, _ in layers:
        kind = meta["name"][len(stem) + 1:]
        meta["name"] += suffix
        meta["metadata"] = {"sgdc_store": {"kind": kind, "store": str(path), "incomplete": note}}
    return layers
