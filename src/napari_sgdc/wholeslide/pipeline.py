"""The single-process tile pipeline (phase 1 without a cluster): while the network runs tile i + 1
on the caller's thread, a decoder thread decodes tile i (post-processing, owned objects, polygons)
and writes it to the store, and a reader thread reads tile i + 2 ahead.

Three stages, each `napari_sgdc.wholeslide.tiles`' function of the sequential `tile_task`:

* reader (`read_tile`): one thread of a `concurrent.futures.ThreadPoolExecutor`, at most
  `READ_AHEAD` windows read and not yet taken by the network;
* network (`tile_maps`): the caller's thread (torch releases the GIL while it computes);
* decoder (`decode_tile`): one thread, so the store has exactly one writer, which decodes and
  writes the tiles in their order (FIFO); at most `DECODE_DEPTH` tiles wait for it or are being
  decoded, the network waits otherwise.

So at most ``READ_AHEAD + 1 + DECODE_DEPTH`` windows (and their maps) are alive, whatever the
slide's size: memory stays flat. The results are those of the sequential path, bit for bit (the same
functions on the same inputs, and the records written in the same order).

Progress and cancel are handled on the caller's thread: ``progress`` after each tile is written;
a set ``cancel`` stops before the next tile's network, the tiles already through the network are
decoded and written, then `Cancelled` is raised. Errors: the one of the earliest tile wins, as
in the sequential path (an error of tile k is raised only after the decodes of the tiles before it
finished, and raised instead when one of those failed); after a failed decode the decoder
writes nothing more, and no thread of the pipeline runs when the error reaches the caller, so
the store's lifecycle (failed, interrupted) is recorded after its last write.
"""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

from .plan import SlidePlan
from .tiles import Stages, decode_tile, read_tile, tile_maps
from .workers import resolve_model

__all__ = ["READ_AHEAD", "DECODE_DEPTH", "run_pipeline"]

READ_AHEAD = 2
"""Windows the reader holds ready beyond the one in the network."""
DECODE_DEPTH = 2
"""Tiles through the network that wait for the decoder or are being decoded."""


class _Skipped(Exception):
    """A queued decode not run because an earlier one failed (or a second Ctrl-C)."""


def _read(stages: Stages, plan: SlidePlan, i: int, j: int):
    with stages.time("read"):
        return read_tile(plan, i, j)


def _decode(stop: threading.Event, stages: Stages, plan: SlidePlan, i: int, j: int, rgb, maps) -> int:
    if stop.is_set():
        raise _Skipped
    try:
        return decode_tile(plan, i, j, rgb, maps, stages)
    except BaseException:
        stop.set()  # the tiles after a failed one are not written (as in the sequential path)
        raise


def run_pipeline(plan: SlidePlan, model, tiles: list, progress=None, cancel: threading.Event | None = None,
                 stages: Stages | None = None) -> list[int]:
    """Runs `tiles` ((i, j) each, none of them done yet) through the three stages; returns their object
    counts in order. ``progress(done)`` after each tile written; `cancel` as described above."""
    import torch

    from ..inference import Cancelled

    stages = stages if stages is not None else Stages()
    if plan.threads:
        torch.set_num_threads(plan.threads)
    model = resolve_model(model)
    counts: list[int] = []
    todo = iter(tiles)
    reads: deque[tuple[tuple[int, int], Future]] = deque()
    decodes: deque[Future] = deque()
    stop = threading.Event()

    with ThreadPoolExecutor(1, thread_name_prefix="sgdc-read") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="sgdc-decode") as decoder:

        def read_ahead() -> None:
            while len(reads) < READ_AHEAD:
                tile = next(todo, None)
                if tile is None:
                    return
                reads.append((tile, reader.submit(_read, stages, plan, *tile)))

        def collect(keep: int) -> None:
            """Waits until at most `keep` decodes are outstanding, then takes those already done (in order)."""
            while decodes and (len(decodes) > keep or decodes[0].done()):
                counts.append(decodes.popleft().result())
                if progress is not None:
                    progress(len(counts))

        try:
            read_ahead()
            while reads:
                if cancel is not None and cancel.is_set():
                    collect(0)  # the tiles through the network are written
                    raise Cancelled("whole-slide segmentation cancelled")
                (i, j), future = reads.popleft()
                rgb = future.result()
                read_ahead()
                with stages.time("network"):
                    maps = tile_maps(plan, model, rgb)
                collect(DECODE_DEPTH - 1)
                decodes.append(decoder.submit(_decode, stop, stages, plan, i, j, rgb, maps))
                del rgb, maps
                collect(DECODE_DEPTH)
            collect(0)
        except BaseException as error:
            for _, future in reads:
                future.cancel()
            if isinstance(error, KeyboardInterrupt):
                stop.set()  # a second Ctrl-C: the queued decodes are dropped, the running one ends
            earlier = _first_error(decodes)
            if earlier is not None and earlier is not error:
                raise earlier from None
            raise
    return counts


def _first_error(decodes: deque) -> BaseException | None:
    """Waits for every outstanding decode (those of tiles before the failing one); the first error among them."""
    first = None
    for future in decodes:
        error = future.exception()
        if first is None and error is not None and not isinstance(error, _Skipped):
            first = error
    return first
