"""The single-process tile pipeline (issue 24): the same store as the sequential path, bit for bit; the same
one-line errors and the same kept tiles; cancel and resume; bounded memory; the per-stage times."""

from __future__ import annotations

import errno
import threading
import time

import numpy as np
import pytest
import torch
import zarr

from _slides import PixelModel, TypedPixelModel, synthetic_rgb, write_slide
from napari_sgdc.config import ModelConfig
from napari_sgdc.inference import Cancelled
from napari_sgdc.model import build_model
from napari_sgdc.postprocess import PostprocessOptions
from napari_sgdc.slide import SlideError
from napari_sgdc.wholeslide import export_objects, pipeline, segment_slide, store_status, tiles

TILE, MARGIN = 256, 32
STAGES = {"tissue", "read", "network", "decode", "postprocess", "polygons", "write", "tiles_wall", "labels", "pyramid"}


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory):
    return write_slide(tmp_path_factory.mktemp("slide") / "syn.ome.tif", synthetic_rgb())


def _arrays(store):
    """Every array of a store (all levels, labels, tissue) and every tile record, as {name: ndarray}."""
    root = zarr.open_group(str(store), mode="r")
    out = {}
    for level in range(len(root.attrs["multiscales"][0]["datasets"])):
        out[str(level)] = np.asarray(root[str(level)][...])
    for group in ("labels/nuclei", "labels/tissue"):
        for name, array in root[group].arrays():
            out[f"{group}/{name}"] = np.asarray(array[...])
    for record in sorted((store / "tiles").glob("*.npz")):
        with np.load(record) as data:
            for key in data.files:
                out[f"tiles/{record.stem}/{key}"] = data[key]
    return out


def _records(store) -> list[str]:
    return sorted(p.stem for p in (store / "tiles").glob("*.npz"))


def _mini_model():
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder="mini", pretrained=False, decoder_channels=(32, 16, 16, 8, 8),
                                    sge_channels=16, guide_channels=8, heads=4, task="instance", mpp=0.25))
    return model.eval()


@pytest.mark.parametrize("make, options, roi", [(PixelModel, None, None), (TypedPixelModel, None, None),
                                                (_mini_model, PostprocessOptions(threshold=0.3, min_size=4),
                                                 (256, 256, 768, 768))],  # a real network: 3 × 3 tiles
                         ids=["pixel", "typed", "mini-network"])
def test_the_pipeline_writes_the_sequential_store_bit_for_bit(make, options, roi, slide_path, tmp_path):
    model = make()
    runs = {}
    for mode in (False, True):
        out = tmp_path / f"{mode}.ome.zarr"
        runs[mode] = segment_slide(model, slide_path, out, tile=TILE, margin=MARGIN, options=options, roi=roi,
                                   pipeline=mode)
        export_objects(out, tmp_path / f"{mode}.csv")
    assert runs[True].n_objects == runs[False].n_objects and runs[True].tiles_run == runs[False].tiles_run > 5
    left, right = _arrays(tmp_path / "False.ome.zarr"), _arrays(tmp_path / "True.ome.zarr")
    assert sorted(left) == sorted(right) and any(k.endswith("poly_xy") for k in left)
    for key in left:  # probability, boundary, labels at every level, every record (objects and polygons)
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)
    assert (tmp_path / "False.csv").read_bytes() == (tmp_path / "True.csv").read_bytes()
    for result in runs.values():
        assert set(result.stages) == STAGES


class FailingModel(PixelModel):
    """Raises on its `fail_at`-th forward pass."""

    def __init__(self, fail_at):
        super().__init__()
        self.calls, self.fail_at = 0, fail_at

    def forward(self, x, return_gates=False):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("the network broke\non two lines")
        return super().forward(x, return_gates)


def _fault(kind, monkeypatch):
    """A model, and a fault injected at the 4th tile in one stage: reading, the network or writing."""
    if kind == "network":
        return FailingModel(4)
    if kind == "read":
        real, calls = tiles.read_working, []

        def read(slide, plan, y0, x0, height, width):
            calls.append((y0, x0))
            if len(calls) == 4:
                raise SlideError("syn.ome.tif: cannot read level 0 (DeflateError: corrupt)")
            return real(slide, plan, y0, x0, height, width)

        monkeypatch.setattr(tiles, "read_working", read)
    else:  # the 4th record: a full disk
        real, calls = tiles.atomic_write, []

        def write(path, function):
            calls.append(path)
            if len(calls) == 4:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
            return real(path, function)

        monkeypatch.setattr(tiles, "atomic_write", write)
    return PixelModel()


@pytest.mark.parametrize("kind", ["read", "network", "write"])
def test_an_error_in_any_stage_is_the_sequential_error_with_the_same_tiles_kept(kind, slide_path, tmp_path,
                                                                                monkeypatch):
    said, kept = {}, {}
    for mode in (False, True):
        with monkeypatch.context() as patch:
            model = _fault(kind, patch)
            out = tmp_path / f"{mode}.ome.zarr"
            with pytest.raises(Exception) as caught:
                segment_slide(model, slide_path, out, tile=TILE, margin=MARGIN, pipeline=mode)
        said[mode] = type(caught.value), str(caught.value).replace(out.name, "S")  # one line, the same
        kept[mode] = _records(out)
        assert store_status(out) == "failed"
        assert not [t for t in threading.enumerate() if t.name.startswith(("sgdc-read", "sgdc-decode"))]  # no stage runs
    assert said[True] == said[False]
    assert kept[True] == kept[False] and len(kept[True]) == 3  # the 3 tiles before the fault, as sequentially
    if kind == "read":
        assert "[tile " in said[True][1]
    # the failed store resumes into the uninterrupted result
    reference = segment_slide(PixelModel(), slide_path, tmp_path / "ref.ome.zarr", tile=TILE, margin=MARGIN)
    resumed = segment_slide(PixelModel(), slide_path, tmp_path / "True.ome.zarr", tile=TILE, margin=MARGIN,
                            resume=True)
    assert resumed.tiles_resumed == 3 and resumed.n_objects == reference.n_objects
    left, right = _arrays(tmp_path / "ref.ome.zarr"), _arrays(tmp_path / "True.ome.zarr")
    for key in left:
        np.testing.assert_array_equal(left[key], right[key], err_msg=key)


def test_cancel_writes_the_tiles_through_the_network_then_resumes(slide_path, tmp_path):
    cancel, seen = threading.Event(), []

    def progress(done, total):
        seen.append((threading.current_thread() is threading.main_thread(), done))
        if done >= 4:
            cancel.set()

    out = tmp_path / "syn.ome.zarr"
    with pytest.raises(Cancelled):
        segment_slide(PixelModel(), slide_path, out, tile=TILE, margin=MARGIN, progress=progress, cancel=cancel)
    assert store_status(out) == "interrupted" and all(main for main, _ in seen)  # progress on the caller's thread
    assert [done for _, done in seen] == list(range(1, len(seen) + 1)) and len(_records(out)) == len(seen)
    reference = segment_slide(PixelModel(), slide_path, tmp_path / "ref.ome.zarr", tile=TILE, margin=MARGIN,
                              pipeline=False)
    result = segment_slide(PixelModel(), slide_path, out, tile=TILE, margin=MARGIN, resume=True)
    assert 4 <= result.tiles_resumed < reference.tiles_run and result.n_objects == reference.n_objects
    np.testing.assert_array_equal(_arrays(out)["labels/nuclei/0"], _arrays(tmp_path / "ref.ome.zarr")["labels/nuclei/0"])


def test_windows_in_flight_stay_bounded_and_the_stages_overlap(slide_path, tmp_path, monkeypatch):
    """At most READ_AHEAD + 1 + DECODE_DEPTH windows are alive whatever the number of tiles (memory is
    flat), with a slow network and a slow decoder; and the stages overlap: the decoder of a tile waits
    for the network to be busy with a later tile, which a sequential loop would never let happen (an
    event, not a timing: no clock is compared)."""
    alive, peak, lock = [0], [0], threading.Lock()
    in_network, overlapped = threading.Event(), []
    read, decode, maps = pipeline.read_tile, pipeline.decode_tile, pipeline.tile_maps

    def reading(plan, i, j):
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        return read(plan, i, j)

    def network(*args):
        in_network.set()
        try:
            return maps(*args)
        finally:
            in_network.clear()

    def decoding(*args):
        overlapped.append(in_network.wait(timeout=2))  # the network runs a later tile meanwhile
        try:
            return decode(*args)
        finally:
            with lock:
                alive[0] -= 1

    monkeypatch.setattr(pipeline, "read_tile", reading)
    monkeypatch.setattr(pipeline, "tile_maps", network)
    monkeypatch.setattr(pipeline, "decode_tile", decoding)
    result = segment_slide(PixelModel(delay=0.03), slide_path, tmp_path / "s.ome.zarr", tile=TILE, margin=MARGIN,
                           tissue="none")
    assert result.tiles_run == 30 and alive[0] == 0
    assert peak[0] <= pipeline.READ_AHEAD + 1 + pipeline.DECODE_DEPTH
    assert any(overlapped[:-1])  # some tile was decoded while the network ran another (the last has none after it)
    stages = result.stages
    assert stages["postprocess"] + stages["polygons"] <= stages["decode"]


def test_the_sequential_stages_add_up_to_at_most_the_wall_time(slide_path, tmp_path):
    result = segment_slide(PixelModel(), slide_path, tmp_path / "s.ome.zarr", tile=TILE, margin=MARGIN,
                           pipeline=False)
    stages = result.stages
    assert stages["read"] + stages["network"] + stages["decode"] + stages["write"] <= stages["tiles_wall"]
    assert stages["tiles_wall"] + stages["labels"] + stages["pyramid"] + stages["tissue"] <= result.seconds
