"""The plugin's one background-job runner, and the segment and fine-tune jobs built on it.

`BackgroundJob` runs its `work` in a napari thread worker and owns everything around it:
a napari progress bar fed from the worker (`report`), a Cancel event (`cancel`), and the
outcome: a value, a cancellation, or an error. Errors are caught inside the worker, logged
with their traceback (nothing is lost) and shown as one-line napari notifications
(`notify_error`), never as a traceback dialog. `SegmentJob`, `FinetuneJob` and the
whole-slide `SlideJob` (`_wholeslide`) are subclasses; `JobChain` runs jobs one after another.
When `segment` runs out of memory and retries with smaller tiles or on the CPU
(`OutOfMemoryFallback`), the user gets a warning notification that says so.
"""

from __future__ import annotations

import abc
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
    gate_layer_of,
    image_planes,
    layer_mpp,
    set_confidence_features,
    show_result_layers,
)
from napari_sgdc.session import CachedResult, CorrectionSession, FinetuneRun, PlaneInput, error_line

LOG = logging.getLogger(__name__)


class Relay(QObject):
    """Carries progress, events and warnings from a worker thread to the GUI thread (queued signals)."""

    progressed = Signal(int, int)
    event = Signal(object)
    warned = Signal(str)


@dataclass
class Outcome:
    """How a job ended: a value, or the error it caught.

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


class BackgroundJob(abc.ABC):
    """One piece of work in a napari thread worker, with a progress bar, Cancel and one-line errors.

    Subclasses implement `work` (worker thread: call `report(done, total)`, watch `cancel`,
    emit ``relay.event`` / ``relay.warned``) and `on_value` (GUI thread); `on_cancelled`,
    `on_failed`, `on_event` and `on_warning` have defaults. Call `start` at the end of
    the subclass's ``__init__``.

    Args:
        title: names the job in notifications (``"Segmentation of 'lesion'"``).
        desc: the progress bar's text.
        total: the progress bar's total (0: set by the first `report`).
        on_done: called on the GUI thread with ``(job, outcome)`` after the outcome was handled.

    Attributes:
        cancel: set it to stop the job at its next check.
        done, total: progress so far.
        pbar: the napari progress bar (closed when the job ends).
        running: whether the job has not ended yet.
        outcome: the `Outcome` once the worker returned.
        worker: the napari FunctionWorker.
    """

    def __init__(self, title: str, desc: str, *, total: int = 0,
                 on_done: Callable[[Any, Outcome], None] | None = None) -> None:
        self.title = title
        self.on_done = on_done
        self.cancel = threading.Event()
        self.done, self.total = 0, int(total)
        self.outcome: Outcome | None = None
        self.worker: Any = None
        self.relay = Relay()
        self.relay.progressed.connect(self._on_progress)
        self.relay.event.connect(self.on_event)
        self.relay.warned.connect(self.on_warning)
        self.pbar: Any = progress(total=self.total, desc=desc)
        self.running = True

    def start(self) -> "BackgroundJob":
        """Starts the worker."""
        self.worker = create_worker(self._guarded, _start_thread=False)
        self.worker.returned.connect(self._on_returned)
        self.worker.finished.connect(self._close_bar)
        self.worker.start()
        return self

    # -- worker thread -------------------------------------------------------------------
    @abc.abstractmethod
    def work(self) -> Any:
        """The job (worker thread); raise `napari_sgdc.inference.Cancelled` to stop."""

    def report(self, done: int, total: int) -> None:
        """Progress from the worker thread."""
        self.relay.progressed.emit(int(done), int(total))

    def _guarded(self) -> Outcome:
        start = time.perf_counter()
        try:
            value = self.work()
        except Exception as exc:  # noqa: BLE001 - every failure becomes a notification
            from napari_sgdc.inference import Cancelled

            if isinstance(exc, Cancelled):
                return Outcome(cancelled=True, seconds=time.perf_counter() - start)
            LOG.exception("napari-sgdc: %s failed", self.title)
            return Outcome(error=exc, seconds=time.perf_counter() - start)
        return Outcome(value=value, seconds=time.perf_counter() - start)

    # -- GUI thread ----------------------------------------------------------------------
    def _on_progress(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        pbar = self.pbar
        if not self.running:
            return  # a late report after the job ended
        if total and pbar.total != total:
            pbar.total = total
        pbar.update(max(0, done - pbar.n))  # may process queued events: last

    def _close_bar(self) -> None:
        if self.running:
            self.running = False
            self.pbar.close()

    def _on_returned(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self._close_bar()
        try:
            self.finish(outcome)
        finally:
            if self.on_done is not None:
                self.on_done(self, outcome)

    def finish(self, outcome: Outcome) -> None:
        """Hands the outcome to `on_value`, `on_cancelled` or `on_failed`."""
        if outcome.cancelled:
            self.on_cancelled()
        elif outcome.error is not None:
            self.on_failed(outcome.error)
        else:
            self.on_value(outcome.value)

    def on_value(self, value: Any) -> None:
        """The job's result (GUI thread)."""

    def on_cancelled(self) -> None:
        """Says that the job was cancelled."""
        show_info(f"{self.title} cancelled.")

    def on_failed(self, error: BaseException) -> None:
        """Says in one line why the job failed (the traceback is in the log)."""
        notify_error(f"{self.title} failed: {error_line(error)}")

    def on_event(self, event: Any) -> None:
        """An event the worker sent through ``relay.event``."""

    def on_warning(self, message: str) -> None:
        """A warning the worker sent through ``relay.warned``."""
        show_warning(f"{self.title}: {message}")


class JobChain:
    """Starts jobs one after the other; a cancelled job ends the chain.

    Args:
        makers: ``(name, make)`` per job; ``make(on_done)`` builds and starts it. A job that
            cannot start is skipped with a notification naming it.
        on_finished: called when the chain ends.
    """

    def __init__(self, makers: list[tuple[str, Callable[[Callable], BackgroundJob]]],
                 on_finished: Callable[[], None]) -> None:
        self._makers = list(makers)
        self._on_finished = on_finished
        self.jobs: list[BackgroundJob] = []

    def start(self) -> "JobChain":
        """Starts the first job."""
        self._next()
        return self

    def cancel(self) -> None:
        """Cancels the running job and starts no other."""
        self._makers.clear()
        for job in self.jobs:
            job.cancel.set()

    def _next(self) -> None:
        if not self._makers:
            self._on_finished()
            return
        name, make = self._makers.pop(0)
        try:
            self.jobs.append(make(self._done))
        except Exception as exc:  # noqa: BLE001 - shown to the user
            notify_error(f"{name} failed: {error_line(exc)}")
            self._next()

    def _done(self, job: BackgroundJob, outcome: Outcome) -> None:
        if outcome.cancelled:
            self._makers.clear()
        self._next()


class SegmentJob(BackgroundJob):
    """One segmentation of one image layer; the result goes into the session and the layers.

    The caller holds the session's `Busy` state for the job and releases it in `on_done`.

    Attributes:
        image: the image layer being segmented.
        settings: the run settings copied when the job started.
        planes: the planes being segmented.
        fallbacks: the out-of-memory retries of the run.
    """

    def __init__(self, viewer: Any, session: CorrectionSession, image: Image, source: str,
                 on_done: Callable[["SegmentJob", Outcome], None] | None = None) -> None:
        self.viewer, self.session, self.image, self.source = viewer, session, image, source
        self.settings = replace(session.settings)
        self.layer_mpp = layer_mpp(image)  # used when the settings' µm/px is 0
        self.planes = image_planes(image, self.settings.planes, viewer.dims.point)
        self.fallbacks: list[str] = []
        super().__init__(f"Segmentation of '{image.name}'", f"SGDC segment {image.name}", on_done=on_done)
        self.start()

    def work(self) -> tuple[Any, Any, Any]:
        with relay_out_of_memory(self.relay.warned.emit):
            return self.session.segment(self.planes, self.source, self.settings, layer_mpp=self.layer_mpp,
                                        progress=self.report, cancel=self.cancel)

    def on_warning(self, message: str) -> None:
        self.fallbacks.append(message)
        show_warning(f"Segmenting '{self.image.name}': {message}. "
                     "The result is the same; a smaller tile size avoids the retry.")

    def on_value(self, value: tuple[Any, Any, Any]) -> None:
        if self.image not in self.viewer.layers:
            show_info(f"'{self.image.name}' was closed during segmentation; result dropped.")
            return
        state, used, result = value
        cache = self.session.store_result(self.image, self.planes, state, result, used=used)
        show_segmentation(self.viewer, self.session, self.image, self.planes, cache, result.gates)


class FinetuneJob(BackgroundJob):
    """One fine-tune run (`CorrectionSession.run_finetune`): kept when it finishes, dropped
    (the weights restored bit for bit) when it is cancelled or fails.

    Attributes:
        run: the run.
        info: the kept run's provenance (None until kept).
    """

    def __init__(self, session: CorrectionSession, run: FinetuneRun,
                 on_event: Callable[[dict], None] | None = None,
                 on_done: Callable[["FinetuneJob", Outcome], None] | None = None) -> None:
        self.session, self.run = session, run
        self.info: dict[str, Any] | None = None
        self._event_callback = on_event
        super().__init__("Fine-tune", "SGDC fine-tune", total=int(run.config.max_steps or 0), on_done=on_done)
        self.start()

    def work(self) -> Any:
        from napari_sgdc.inference import Cancelled

        history = self.session.run_finetune(self.run, callbacks=[self._step], cancel=self.cancel)
        if getattr(history, "cancelled", False):
            raise Cancelled("fine-tune cancelled")
        return history

    def _step(self, event: dict) -> None:
        if event.get("kind") == "step":
            self.relay.event.emit(event)
            self.report(int(event.get("step", 0)), int(event.get("total_steps") or 0))

    def on_event(self, event: Any) -> None:
        if self.running and self._event_callback is not None:  # not a late event after the run
            self._event_callback(event)

    def on_value(self, history: Any) -> None:
        self.info = self.session.keep_finetune(self.run, history)

    def on_cancelled(self) -> None:
        self.run.state.drop_run(self.run)
        show_info("Fine-tune cancelled; the model is unchanged.")

    def on_failed(self, error: BaseException) -> None:
        self.run.state.drop_run(self.run)
        notify_error(f"Fine-tune failed (model unchanged): {error_line(error)}")


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


def show_segmentation(viewer: Any, session: CorrectionSession, image: Image, planes: PlaneInput,
                      cache: CachedResult, gate_maps: list | None) -> dict[str, Any]:
    """Writes a cached result into the image's result layers (the written mask as it is: no
    post-processing here) and emits the session's ``segmented`` event.

    Returns:
        The layers by kind (`show_result_layers`).
    """
    gates = _gate_planes(viewer, image, gate_maps, planes) if gate_maps else None
    layers = show_result_layers(viewer, image, cache.probability, cache.boundary, cache.written_mask.copy(),
                                cache.lead_shape, gates, uncertainty=cache.uncertainty)
    set_confidence_features(layers["mask"], cache.confidence())
    session.emit("segmented", image=image)
    return layers


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
