"""`CorrectionSession`: the state behind the segment-correct-retrain loop, without a GUI.

One session holds the loaded models (`ModelState`, with undo and provenance), the
post-processing options and run settings, the segmentation cached per image
(`CachedResult`, keyed by any hashable object: the napari plugin uses the image layer),
which job uses the model (`Busy`), and plain-callback events. It turns corrections into
training pairs (label conversion), counts edits, and runs, keeps, drops and undoes
fine-tunes. The napari docks only bind widgets to it (`napari_sgdc._napari`).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Sequence

import numpy as np

from napari_sgdc.postprocess import PostprocessOptions
from napari_sgdc.session.edits import EditCount, count_edits
from napari_sgdc.session.models import FinetuneRun, ModelState, load_state
from napari_sgdc.session.results import CachedResult, PlaneInput, merge_result
from napari_sgdc.session.types import TypeChange
from napari_sgdc.grid import usable_mpp
from napari_sgdc.training_pairs import InputError, TrainingPair, collect_pair, pair_arrays

__all__ = ["Busy", "CorrectionSession", "Job", "NO_MODEL", "RunSettings", "error_line"]

NO_MODEL = "No model: pick one in SGDC Segment (or Load checkpoint…) and segment first."


def error_line(exc: BaseException) -> str:
    """One line describing `exc` for the user (its type too, unless it is a plain input error)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, (ValueError, FileNotFoundError, RuntimeError)) else f"{type(exc).__name__}: {text}"


@dataclass
class RunSettings:
    """How the network runs (the Segment dock's settings; fine-tuning re-segments alike).

    Attributes:
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (`napari_sgdc.device.DEVICES`).
        tile: tile size in pixels.
        planes: ``all`` planes of a stack, or the ``current`` plane only.
        gates: compute the SGDC gate maps.
        uncertainty: compute the per-pixel uncertainty (free: from the one forward pass).
        mpp: the image's µm per pixel, for models that record their own scale; 0 = the
            image's own scale when known, else the model's. Ignored by other models.
        amp: bf16 autocast where the device runs bf16 natively.
        tta: test-time augmentation (the 8 flips and rotations averaged; about 8× the time), for
            images and slides alike.
        engine: what runs the network (`napari_sgdc.engines.ENGINES`; ``auto``: the measured choice).
    """

    device: str = "auto"
    tile: int = 512
    planes: str = "all"
    gates: bool = True
    uncertainty: bool = True
    mpp: float = 0.0
    amp: bool = False
    tta: bool = False
    engine: str = "auto"

    def mpp_for(self, config: Any, layer_mpp: float | None = None) -> float | None:
        """The `mpp` to pass `segment` for a model of `config` (`napari_sgdc.grid.usable_mpp`):
        `mpp`, or when it is 0 the image layer's own scale `layer_mpp`."""
        return usable_mpp(self.mpp or layer_mpp, config)


class Job(Enum):
    """The kinds of work that use the shared model (one at a time)."""

    SEGMENT = "segmenting"
    FINETUNE = "fine-tuning"
    RESEGMENT = "re-segmenting"


class Busy:
    """Which job uses the shared model now; refuses a second one until released (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._job: Job | None = None
        self._detail = ""

    @property
    def job(self) -> Job | None:
        """The running job, or None when idle."""
        return self._job

    @property
    def idle(self) -> bool:
        """Whether no job runs."""
        return self._job is None

    def __bool__(self) -> bool:
        return not self.idle

    def __str__(self) -> str:
        if self._job is None:
            return "idle"
        return f"{self._job.value} {self._detail}".strip()

    def acquire(self, job: Job, detail: str = "") -> bool:
        """Marks `job` as running; False (and nothing changes) while another job runs."""
        with self._lock:
            if self._job is not None:
                return False
            self._job, self._detail = job, detail
            return True

    def release(self, job: Job) -> None:
        """Ends `job` (a no-op if another job, or none, runs)."""
        with self._lock:
            if self._job is job:
                self._job, self._detail = None, ""


class CorrectionSession:
    """The models, results and fine-tuning of one segment-correct-retrain loop.

    Attributes:
        options: the post-processing of every mask.
        defaults_source: the model whose tuned defaults `options` last took (`adopt_model_defaults`).
        settings: how the network runs.
        models: loaded models by source.
        current_source: the picked model's source, or None.
        results: cached segmentation per image key (weakly keyed).
        busy: which job uses the model now.
        lock: held while a model loads.
    """

    def __init__(self) -> None:
        self.options = PostprocessOptions()
        self.defaults_source: str | None = None
        self.settings = RunSettings()
        self.models: dict[str, ModelState] = {}
        self.current_source: str | None = None
        self.results: "weakref.WeakKeyDictionary[Any, CachedResult]" = weakref.WeakKeyDictionary()
        self.busy = Busy()
        self.lock = threading.RLock()
        self._listeners: dict[str, list[Callable[[], Any]]] = {}

    # -- events ----------------------------------------------------------------------------
    def connect(self, event: str, callback: Callable[..., None]) -> None:
        """Calls `callback(**kwargs)` whenever `event` is emitted (``segmented``, ``model_changed``,
        ``options_changed``, ``types_changed``). Bound methods are held weakly, so a closed widget is not kept alive."""
        ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else (lambda: callback)
        self._listeners.setdefault(event, []).append(ref)

    def emit(self, event: str, **kwargs: Any) -> None:
        """Calls every live callback of `event`."""
        refs = self._listeners.get(event, [])
        refs[:] = [ref for ref in refs if ref() is not None]
        for ref in list(refs):
            callback = ref()
            if callback is not None:
                callback(**kwargs)

    # -- models ----------------------------------------------------------------------------
    def current(self) -> ModelState | None:
        """The picked model's state, or None when it is not loaded yet."""
        return None if self.current_source is None else self.models.get(self.current_source)

    def get_model(self, source: str, device: str = "auto") -> ModelState:
        """The loaded model of `source`, loading it on first use (a fine-tuned model stays in
        memory with its new weights).

        Raises:
            FileNotFoundError: the checkpoint or built-in does not exist.
            ValueError: the checkpoint is not a valid napari-sgdc checkpoint.
        """
        with self.lock:
            state = self.models.get(source)
            if state is None:
                state = self.models[source] = load_state(source, device)
            return state

    def picked_model(self) -> ModelState:
        """The picked model, loaded if needed.

        Raises:
            InputError: no model picked, or it cannot be loaded.
        """
        state = self.current()
        if state is not None:
            return state
        if self.current_source is None:
            raise InputError(NO_MODEL)
        try:
            return self.get_model(self.current_source, self.settings.device)
        except Exception as exc:  # noqa: BLE001 - one line for the user
            raise InputError(f"Could not load model: {error_line(exc)}") from exc

    def options_for(self, state: ModelState) -> PostprocessOptions:
        """The options a run of `state` post-processes with: the model's tuned defaults on its
        first run after a switch (`adopt_model_defaults` then shows them), else `options`."""
        if state.source == self.defaults_source:
            return self.options
        return PostprocessOptions.for_model(state.model.config)

    def adopt_model_defaults(self, state: ModelState) -> bool:
        """The first result of a model after a switch sets the options to its defaults
        (``ModelConfig.threshold``, ``split_level``, ``min_size``); emits
        ``options_changed`` when they changed.

        Returns:
            Whether `options` changed.
        """
        if state.source == self.defaults_source:
            return False
        self.defaults_source = state.source
        defaults = PostprocessOptions.for_model(state.model.config)
        if defaults == self.options:
            return False
        self.options = defaults
        self.emit("options_changed")
        return True

    # -- results ---------------------------------------------------------------------------
    def segment(self, planes: PlaneInput, source: str, settings: RunSettings | None = None, *,
                layer_mpp: float | None = None, progress: Callable[[int, int], None] | None = None,
                cancel: threading.Event | None = None) -> tuple[ModelState, PostprocessOptions, Any]:
        """Runs `napari_sgdc.inference.segment` on `planes` with model `source` and `settings`
        (default: the session's), post-processed with `options_for` the model; the image's
        µm/px is `settings.mpp`, or when 0 `layer_mpp` (`RunSettings.mpp_for`). Thread-safe
        (the model is locked while it runs); `store_result` caches what it returns.

        Returns:
            ``(state, options used, SegmentationResult)``.
        """
        from napari_sgdc import inference

        settings = settings or self.settings
        state = self.get_model(source, settings.device)
        options = self.options_for(state)
        stack = planes.planes
        result = inference.segment(
            state.model, stack if len(stack) > 1 else stack[0], options, tile=settings.tile, device=settings.device,
            return_gates=settings.gates, uncertainty=settings.uncertainty, progress=progress, cancel=cancel,
            stack=len(stack) > 1, mpp=settings.mpp_for(state.model.config, layer_mpp), amp=settings.amp,
            tta=settings.tta, engine=settings.engine)
        return state, options, result

    def store_result(self, key: Any, planes: PlaneInput, state: ModelState, result: Any, *,
                     used: PostprocessOptions) -> CachedResult:
        """Caches the `SegmentationResult` of `planes` of image `key` (and the µm/px it was made
        at, ``result.mpp``), with the mask `segment` post-processed (with `used`) as its written
        mask (`merge_result`).

        Returns:
            The image's cache.
        """
        self.adopt_model_defaults(state)
        config = state.model.config
        cache = merge_result(self.results.get(key), planes, result, model_source=state.source,
                             instances=config.is_instance, single_object=config.single_object,
                             used=used, options=self.options)
        cache.mpp = result.mpp
        cache.type_names, cache.type_colors = tuple(config.type_names), tuple(config.type_colors)
        cache.retype()
        self.results[key] = cache
        return cache

    def rethreshold(self, key: Any) -> CachedResult | None:
        """Post-processes the cached maps of `key` again with `options` (no forward pass).

        Returns:
            The cache with its new written mask, or None when `key` has no result.
        """
        cache = self.results.get(key)
        if cache is not None:
            cache.written_mask = cache.postprocessed(self.options)
            cache.retype()
        return cache

    # -- nucleus types ---------------------------------------------------------------------
    def object_types(self, key: Any, labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
        """The type table of `labels` (default: the written mask) of image `key`
        (`CachedResult.types_of`: the user's types win), or None without a typed result."""
        cache = self.results.get(key)
        if cache is None or (labels is not None and np.size(labels) != cache.written_mask.size):
            return None
        return cache.types_of(labels)

    def set_object_type(self, key: Any, label_id: int, type_id: int, labels: np.ndarray | None = None) -> TypeChange:
        """Sets the type of object `label_id` of `labels` (default: the written mask) of image
        `key` to `type_id` (1-based): an edit (counted, and weighted in fine-tuning), undone by
        `undo_type_change`. Emits ``types_changed`` (``key``).

        Raises:
            InputError: no typed result, an unknown type, or no such object.
        """
        cache = self.results.get(key)
        table = self.object_types(key, labels)
        if cache is None or table is None:
            raise InputError("Types: segment the image with a model that has nucleus types first")
        if not 1 <= int(type_id) <= len(cache.type_names):
            raise InputError(f"Types: no type {type_id}; the model has {len(cache.type_names)}")
        types = table[0]
        label_id = int(label_id)
        present = labels if labels is not None else cache.written_mask
        if not 0 < label_id < types.size or not np.any(np.asarray(present) == label_id):
            raise InputError(f"Types: there is no object {label_id}")
        change = TypeChange(label_id, int(types[label_id]), int(type_id), cache.type_names)
        cache.overrides.set(change)
        self.emit("types_changed", key=key)
        return change

    def undo_type_change(self, key: Any) -> TypeChange | None:
        """Takes back the latest type change of image `key`; emits ``types_changed``.

        Returns:
            The change undone, or None when there is none.
        """
        cache = self.results.get(key)
        change = cache.overrides.undo() if cache is not None else None
        if change is not None:
            self.emit("types_changed", key=key)
        return change

    # -- corrections -----------------------------------------------------------------------
    def mask_edits(self, key: Any, labels: np.ndarray) -> EditCount | None:
        """What the user changed in `key`'s own mask; None without a result of that size."""
        cache = self.results.get(key)
        if cache is None or np.size(labels) != cache.written_mask.size:
            return None
        table = cache.types_of(labels)
        return count_edits(labels, cache.written_mask, instances=cache.instances, stack=bool(cache.lead_shape),
                           types=None if table is None else table[0], written_types=cache.object_types)

    @staticmethod
    def region_edits(labels: np.ndarray, written: np.ndarray) -> EditCount:
        """What the user changed in a slide region's corrections (instance labels)."""
        if np.shape(labels) != np.shape(written):
            return EditCount(0, 0, 0, int(np.size(labels)))
        return count_edits(labels, written, instances=True)

    def image_pair(self, key: Any, planes: np.ndarray, labels: np.ndarray, *, image_shape: Sequence[int],
                   image_name: str, labels_name: str, own_mask: bool, image_mpp: float | None) -> TrainingPair:
        """Corrections of image `key` as a training pair, for the model that segmented it (else
        the picked one) at the µm/px that segmentation used (else the settings', else `image_mpp`).
        On the image's own mask (`own_mask`) only the planes the user changed are kept.

        Raises:
            InputError: no model, or what `collect_pair` rejects.
        """
        cache = self.results.get(key)
        source = cache.model_source if cache is not None else self.current_source
        if source is None:
            raise InputError(NO_MODEL)
        mpp = cache.mpp if cache is not None else (self.settings.mpp or image_mpp)
        predicted = cache.written_mask if own_mask and cache is not None else None
        table = cache.types_of(labels) if predicted is not None and np.size(labels) == predicted.size else None
        return collect_pair(planes, labels, image_shape=image_shape, image_name=image_name, labels_name=labels_name,
                            model_source=source, predicted=predicted, mpp=mpp,
                            types=None if table is None else table[0],
                            predicted_types=None if table is None else cache.object_types)

    def region_pair(self, crop: np.ndarray, labels: np.ndarray, written: np.ndarray, *, image_name: str,
                    labels_name: str, model_source: str | None) -> TrainingPair:
        """A corrected slide region (`crop`: the pixels the model saw) as a training pair; only edits count.

        Raises:
            InputError: no model, or no edits.
        """
        source = model_source or self.current_source
        if source is None:
            raise InputError(NO_MODEL)
        labels = np.asarray(labels)
        return collect_pair(np.asarray(crop)[None], labels, image_shape=labels.shape, image_name=image_name,
                            labels_name=labels_name, model_source=source, predicted=np.asarray(written)[None])

    # -- fine-tuning -----------------------------------------------------------------------
    @staticmethod
    def run_finetune(run: FinetuneRun, callbacks: Sequence[Callable[[dict], Any]] = (),
                     cancel: threading.Event | None = None) -> Any:
        """Trains `run.state.model` on `run.pairs` with `napari_sgdc.train.finetune` (blocking).

        Returns:
            The `History`; the weights are as before when it was cancelled or raised.
        """
        from napari_sgdc import train

        arrays = pair_arrays(run.pairs, run.state.model.config)
        return train.finetune(run.state.model, arrays.images, arrays.labels, preset=run.config,
                              predictions=arrays.predictions, mpp=arrays.mpp, types=arrays.types,
                              predicted_types=arrays.predicted_types, callbacks=list(callbacks), cancel=cancel)

    def keep_finetune(self, run: FinetuneRun, history: Any) -> dict[str, Any]:
        """Keeps a finished run (undoable) and emits ``model_changed``.

        Returns:
            The run's provenance.
        """
        info = run.state.keep_run(run, history)
        self.emit("model_changed")
        return info

    def undo(self) -> dict[str, Any]:
        """Restores the picked model's weights from before its latest kept run and emits ``model_changed``.

        Returns:
            The undone run's provenance (``images`` names what to re-segment).

        Raises:
            InputError: nothing to undo.
        """
        state = self.current()
        run = state.undo_run() if state is not None else None
        if run is None:
            raise InputError("Nothing to undo: the model has not been fine-tuned.")
        self.emit("model_changed")
        return run
