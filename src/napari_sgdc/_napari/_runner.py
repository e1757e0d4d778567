"""Background jobs for the widgets: segmentation and fine-tuning in napari thread workers.

The worker functions only call the headless API (`napari_sgdc.inference.segment`,
`napari_sgdc.train.finetune`); progress and events cross back to the GUI thread
through a Qt signal relay. Exceptions are caught inside the worker and shown as
one-line napari notifications, never as a traceback dialog. When `segment` runs out of
memory and retries with smaller tiles or on the CPU (`OutOfMemoryFallback`), the user
gets a warning notification that says so.
"""

from __future__ import annotations

import logging
import threading
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils import progress
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QObject, Signal

from napari_sgdc._napari._layers import (
    PlaneInput,
    gate_layer_of,
    image_planes,
    layer_mpp,
    set_confidence_features,
    show_result_layers,
)
from napari_sgdc._napari._session import CachedResult, ModelState, SGDCSession

LOG = logging.getLogger(__name__)


class Relay(QObject):
    """Carries progress from a worker thread to the GUI thread (queued signals)."""

    progressed = Signal(int, int)
    event = Signal(object)
    warned = Signal(str)


@dataclass
class Outcome:
    """What a worker function returns: a value, or the error it caught.

    Attributes:
        value: the result when the job succeeded.
        error: the caught exception, or None.
        cancelled: the job stopped because Cancel was pressed.
        seconds: wall time of the job.
    """

    value: Any = None
    error: BaseException | None = None
    cancelled: bool = False
    seconds: float = 0.0


def notify_error(message: str) -> None:
    """Shows a one-line error notification (no traceback dialog)."""
    show_error(message)


def error_text(exc: BaseException) -> str:
    """One line describing `exc` for a notification."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, (ValueError, FileNotFoundError, RuntimeError)) else f"{type(exc).__name__}: {text}"


def _guarded(job: Callable[[], Any]) -> Callable[[], Outcome]:
    """Wraps `job` so the worker returns an Outcome instead of raising."""

    def run() -> Outcome:
        start = time.perf_counter()
        try:
            value = job()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a notification
            from napari_sgdc.inference import Cancelled

            if isinstance(exc, Cancelled):
                return Outcome(cancelled=True, seconds=time.perf_counter() - start)
            LOG.exception("napari-sgdc job failed")
            return Outcome(error=exc, seconds=time.perf_counter() - start)
        return Outcome(value=value, seconds=time.perf_counter() - start)

    return run


class SegmentJob:
    """One segmentation of one image layer in a thread worker.

    The caller holds the session's `Busy` state for the job and releases it in `on_done`.

    Attributes:
        worker: the napari FunctionWorker (started).
        cancel: set it to stop the job at the next tile.
        image: the image layer being segmented.
        settings: the run settings copied when the job started.
    """

    def __init__(
        self,
        viewer: Any,
        session: SGDCSession,
        image: Image,
        source: str,
        on_done: Callable[["SegmentJob", Outcome], None] | None = None,
    ) -> None:
        self.viewer = viewer
        self.session = session
        self.image = image
        self.source = source
        self.on_done = on_done
        self.cancel = threading.Event()
        self.settings = replace(session.settings)
        if not self.settings.mpp:  # 0: the layer's own µm/px when its scale has a length unit
            self.settings.mpp = layer_mpp(image) or 0.0
        self.planes = image_planes(image, self.settings.planes, viewer.dims.point)
        self.relay = Relay()
        self.pbar = progress(total=0, desc=f"SGDC segment {image.name}")
        self.relay.progressed.connect(self._on_progress)
        self.relay.warned.connect(self._on_warned)
        self.fallbacks: list[str] = []
        self.outcome: Outcome | None = None
        self.worker = create_worker(_guarded(self._work), _start_thread=False)
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self.pbar.close)
        self.worker.start()

    def _work(self) -> tuple[ModelState, Any]:
        from napari_sgdc import inference

        settings = self.settings
        state = self.session.get_model(self.source, settings.device)
        planes = self.planes.planes
        image = planes if len(planes) > 1 else planes[0]
        config = state.model.config
        mpp = settings.mpp_for(config)
        with relay_out_of_memory(self.relay.warned.emit):
            result = inference.segment(
                state.model,
                image,
                self.session.options,
                tile=settings.tile,
                device=settings.device,
                return_gates=settings.gates,
                uncertainty=settings.uncertainty,
                progress=self.relay.progressed.emit,
                cancel=self.cancel,
                stack=len(planes) > 1,
                mpp=mpp,
                amp=settings.amp,
            )
        return state, result

    def _on_warned(self, message: str) -> None:
        self.fallbacks.append(message)
        show_warning(f"Segmenting '{self.image.name}': {message}. "
                     "The result is the same; a smaller tile size avoids the retry.")

    def _on_progress(self, done: int, total: int) -> None:
        if self.pbar.total != total:
            self.pbar.total = total
        self.pbar.update(max(0, done - self.pbar.n))

    def _on_returned(self, outcome: Outcome) -> None:
        self.outcome = outcome
        if outcome.cancelled:
            show_info(f"Segmentation of '{self.image.name}' cancelled.")
        elif outcome.error is not None:
            notify_error(f"Segmentation of '{self.image.name}' failed: {error_text(outcome.error)}")
        elif self.image not in self.viewer.layers:
            show_info(f"'{self.image.name}' was closed during segmentation; result dropped.")
        else:
            state, result = outcome.value
            cache = store_and_show(self.viewer, self.session, self.image, self.planes, state, result)
            cache.mpp = self.settings.mpp_for(state.model.config)
        if self.on_done is not None:
            self.on_done(self, outcome)


class relay_out_of_memory:
    """Context manager for a worker thread: `OutOfMemoryFallback` warnings raised inside go to
    ``send(message)`` (a queued signal to the GUI thread, which shows a notification)
    instead of the warnings machinery; other warnings are passed on when the block ends.

    The message loses its ``segment:`` prefix (the notification names the job).
    """

    def __init__(self, send: Callable[[str], Any]) -> None:
        self._send = send
        self._catcher = warnings.catch_warnings()
        self._others: list[tuple] = []

    def __enter__(self) -> "relay_out_of_memory":
        from napari_sgdc.inference import OutOfMemoryFallback

        self._catcher.__enter__()
        warnings.simplefilter("always", OutOfMemoryFallback)
        send, others = self._send, self._others

        def show(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
            if issubclass(category, OutOfMemoryFallback):
                text = str(message)
                send(text.split(":", 1)[1].strip() if text.startswith("segment:") else text)
            else:
                others.append((message, category, filename, lineno, file, line))

        warnings.showwarning = show
        return self

    def __exit__(self, *exc: Any) -> None:
        self._catcher.__exit__(*exc)
        for args in self._others:
            warnings.showwarning(*args)


def _as_planes(array: np.ndarray, n: int) -> np.ndarray:
    """(H, W) or (n, H, W) -> (n, H, W)."""
    array = np.asarray(array)
    return array[None] if array.ndim == 2 and n == 1 else array


def store_and_show(viewer: Any, session: SGDCSession, image: Image, planes: PlaneInput, state: ModelState,
                   result: Any) -> CachedResult:
    """Merges a SegmentationResult into the layer's cache and writes the result layers.

    The mask layer gets ``cache.postprocessed(session.options)``: the same single
    post-processing of all segmented planes that the sliders run. With an uncertainty map
    the ``<image> uncertainty`` layer is written too, and an instance mask gets each
    object's confidence in its features.

    Args:
        viewer: the napari viewer.
        session: the shared session (its `results` cache is updated).
        image: the segmented image layer.
        planes: the planes that were segmented.
        state: the model that produced `result`.
        result: the SegmentationResult of `planes`.
    """
    n_total, n_new = planes.n_planes, len(planes.indices)
    height, width = planes.spatial_shape
    config = state.model.config
    instances = config.is_instance
    old = session.results.get(image)
    reuse = (
        old is not None
        and old.probability.shape == (n_total, height, width)
        and old.instances == instances
        and n_new < n_total
    )
    if reuse:
        cache = old
    else:
        cache = CachedResult(
            probability=np.zeros((n_total, height, width), np.float32),
            boundary=np.zeros((n_total, height, width), np.float32),
            segmented=np.zeros(n_total, bool),
            lead_shape=planes.lead_shape,
            instances=instances,
            written_mask=np.zeros((n_total, height, width), np.int32 if instances else np.uint8),
            model_source=state.source,
        )
    cache.model_source = state.source
    cache.single_object = config.single_object
    cache.probability[planes.indices] = _as_planes(result.probability, n_new)
    cache.boundary[planes.indices] = _as_planes(result.boundary, n_new)
    if result.separation is not None and result.separation is not result.boundary:  # distance and HoVer models
        if cache.separation is None:
            cache.separation = cache.boundary.copy()  # planes segmented before split on their boundary
        cache.separation[planes.indices] = _as_planes(result.separation, n_new)
    elif cache.separation is not None:
        cache.separation[planes.indices] = cache.boundary[planes.indices]
    cache.segmented[planes.indices] = True
    if result.uncertainty is None:
        cache.uncertainty = None  # stale for the planes segmented now
    else:
        if cache.uncertainty is None or not reuse:
            cache.uncertainty = np.zeros((n_total, height, width), np.float32)
        cache.uncertainty[planes.indices] = _as_planes(result.uncertainty, n_new)
    session.adopt_model_defaults(state)  # a model's tuned marker threshold, once per switch
    cache.written_mask = cache.postprocessed(session.options)
    session.results[image] = cache

    gates = _gate_planes(viewer, image, result.gates, planes) if result.gates else None
    layers = show_result_layers(
        viewer, image, cache.probability, cache.boundary, cache.written_mask.copy(), cache.lead_shape, gates,
        uncertainty=cache.uncertainty,
    )
    set_confidence_features(layers["mask"], cache.confidence())
    session.emit("segmented", image=image)
    return cache


def _gate_planes(viewer: Any, image: Image, gate_maps: list, planes: PlaneInput) -> list[dict[str, Any]]:
    """GateMaps -> dicts with data (2, N, h, w), keeping the other planes of existing gate layers."""
    n_total, n_new = planes.n_planes, len(planes.indices)
    gates = []
    for gate in gate_maps:
        data = np.asarray(gate.data)
        data = data[None] if data.ndim == 3 else data  # (n, 2, h, w)
        data = np.moveaxis(data, 1, 0)  # (2, n, h, w)
        full = np.zeros((2, n_total, *data.shape[-2:]), dtype=data.dtype)
        if n_new < n_total:
            for index in range(2):
                existing = gate_layer_of(viewer, image, index, gate.name)
                if existing is not None and np.size(existing.data) == full[index].size:
                    full[index] = np.asarray(existing.data).reshape(full[index].shape)
        full[:, planes.indices] = data
        gates.append({"name": gate.name, "stride": int(gate.stride), "data": full})
    return gates
