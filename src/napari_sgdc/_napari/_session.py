"""The in-memory model state shared by the Segment and Fine-tune widgets.

This module is plain Python (no Qt): one `SGDCSession` per napari viewer holds the
loaded models, the undo snapshots of fine-tuning, the segmentation results cached
per image layer (so the sliders can re-threshold without a forward pass), the
post-processing options and run settings of the Segment widget (which the Fine-tune
widget reuses to re-segment), and which job is using the model.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import numpy as np

from napari_sgdc.postprocess import PostprocessOptions

BUILTIN_PREFIX = "built-in: "


@dataclass
class RunSettings:
    """How the Segment widget runs the network (shared so Fine-tune re-segments alike).

    Attributes:
        device: ``auto``, ``cpu``, ``cuda`` or ``mps`` (`napari_sgdc.device.DEVICES`).
        tile: tile size in pixels.
        planes: ``all`` planes of a stack, or the ``current`` plane only.
        gates: compute and show the SGDC gate maps.
        uncertainty: compute the per-pixel uncertainty (free: from the one forward pass) and
            show it as the ``<image> uncertainty`` layer; instance masks get per-object confidence.
        mpp: the image's µm per pixel, for models that record their own scale (the nuclei
            model: 0.25); 0 = the image layer's scale when it has a length unit
            (`napari_sgdc._napari._layers.layer_mpp`), else the model's. Ignored by other models.
        amp: bf16 autocast where the device runs bf16 natively (`napari_sgdc.inference.segment`).
    """

    device: str = "auto"
    tile: int = 512
    planes: str = "all"
    gates: bool = True
    uncertainty: bool = True
    mpp: float = 0.0
    amp: bool = False

    def mpp_for(self, config: Any) -> float | None:
        """The `mpp` to pass `segment` for a model of `config` (`usable_mpp`)."""
        return usable_mpp(self.mpp, config)


def usable_mpp(mpp: float | None, config: Any) -> float | None:
    """The `mpp` to pass `segment` and `finetune` for a model of `config`: the image µm/px
    for models that record their own scale, else None (the image as it is)."""
    return mpp if mpp and config.mpp and not config.resize_long_side else None


class Job(Enum):
    """The kinds of work that use the shared model (one at a time)."""

    SEGMENT = "segmenting"
    FINETUNE = "fine-tuning"
    RESEGMENT = "re-segmenting"


class Busy:
    """Which job uses the shared model now; refuses a second one until released.

    ``acquire`` and ``release`` are thread-safe; the widgets call them from the GUI thread.
    """

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


@dataclass
class CachedResult:
    """One image layer's latest segmentation, in flattened plane form.

    Attributes:
        probability: (N, H, W) float32 mask probability, N = number of planes.
        boundary: (N, H, W) float32 boundary probability.
        segmented: (N,) bool, which planes hold a real result.
        lead_shape: the image's plane axes (``()`` for a 2-D image).
        instances: whether the mask is an instance labelling.
        written_mask: (N, H, W) copy of what was last written into the mask layer,
            used to tell whether the user painted corrections.
        model_source: the model that produced the result.
        single_object: semantic masks keep one filled region (the model config's
            ``single_object``, e.g. one lesion per dermoscopy image).
        uncertainty: (N, H, W) float32 per-pixel uncertainty in [0, 1]
            (`napari_sgdc.inference.segment(uncertainty=True)`), or None when it was not computed.
        separation: (N, H, W) float32 map the instance split thresholds, for models whose
            ``instance_map`` is ``distance`` or ``hover`` (`SegmentationResult.separation`);
            None when it is the boundary.
        mpp: the image's µm per pixel the model was run with (`segment(mpp=...)`), so
            fine-tuning on corrections of this image resamples it alike; None: as given.
    """

    probability: np.ndarray
    boundary: np.ndarray
    segmented: np.ndarray
    lead_shape: tuple[int, ...]
    instances: bool
    written_mask: np.ndarray
    model_source: str
    single_object: bool = False
    uncertainty: np.ndarray | None = None
    separation: np.ndarray | None = None  # (N, H, W) for distance and HoVer models; None: the boundary
    mpp: float | None = None  # the image µm/px the network ran at (`RunSettings.mpp_for`); None: as given

    def has_uncertainty(self, plane: int) -> bool:
        """Whether plane `plane` was segmented with its uncertainty computed."""
        return self.uncertainty is not None and bool(self.segmented[plane])

    def confidence(self, mask: np.ndarray | None = None) -> np.ndarray | None:
        """Per-object confidence of an instance mask (`napari_sgdc.postprocess.object_confidence`).

        Args:
            mask: (N, H, W) instance labels; default the written mask.

        Returns:
            float32 (K + 1,), confidence[i] of label i (0 for the background and absent ids),
            or None for semantic masks or without uncertainty.
        """
        if not self.instances or self.uncertainty is None:
            return None
        from napari_sgdc.postprocess import object_confidence

        labels = self.written_mask if mask is None else mask
        indices = np.flatnonzero(self.segmented)
        return object_confidence(labels[indices], self.uncertainty[indices])

    def postprocessed(self, options: PostprocessOptions) -> np.ndarray:
        """The mask of every segmented plane from the cached probabilities (no network call).

        All segmented planes go through `napari_sgdc.postprocess.postprocess` together,
        so instance ids stay unique across the planes of a stack, exactly as `segment` gives.

        Returns:
            (N, H, W) mask (uint8 0/1) or instance labels (int32); planes never segmented are 0.
        """
        from napari_sgdc.postprocess import postprocess

        out = np.zeros(self.probability.shape, np.int32 if self.instances else np.uint8)
        indices = np.flatnonzero(self.segmented)
        if len(indices):
            split = self.boundary if self.separation is None else self.separation
            mask, labels = postprocess(self.probability[indices], split[indices], options,
                                       single_object=self.single_object, instances=self.instances)
            out[indices] = labels if self.instances else mask
        return out


@dataclass
class ModelState:
    """One loaded model and its fine-tuning history.

    Attributes:
        source: a built-in model name or a checkpoint path.
        model: the torch module (the one both widgets use).
        undo: weight snapshots taken before each fine-tune, newest last.
        runs: provenance of each fine-tune run kept (parallel to `undo`).
        last_train_config: the TrainConfig of the latest kept run.
    """

    source: str
    model: Any
    undo: list[dict[str, Any]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)
    last_train_config: Any = None

    @property
    def display_name(self) -> str:
        """Short name for the model picker."""
        return display_name(self.source)

    def snapshot(self) -> dict[str, Any]:
        """Returns an exact copy of the model's parameters and buffers."""
        return {key: value.detach().clone() for key, value in self.model.state_dict().items()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Restores weights bit for bit from `snapshot`."""
        self.model.load_state_dict(snapshot, strict=True)

    def provenance(self) -> dict[str, Any]:
        """Provenance for a checkpoint: the base model and the fine-tuning kept so far."""
        base = self.model_metadata().get("provenance") or {}
        images = sorted({name for run in self.runs for name in run["images"]})
        return {
            "base_model": self.source,
            "base_provenance": base,
            "finetuned_with": "napari-sgdc GUI",
            "corrected_images": len(images),
            "corrected_image_names": images,
            "finetune_steps": int(sum(run["steps"] for run in self.runs)),
            "finetune_runs": list(self.runs),
        }

    def model_metadata(self) -> dict[str, Any]:
        """The metadata that io.load_checkpoint attached (a copy)."""
        return dict(self.model.metadata)


def display_name(source: str) -> str:
    """Model picker text for a built-in name or a checkpoint path."""
    if source.startswith(BUILTIN_PREFIX):
        return source
    return Path(source).name


class SGDCSession:
    """Shared state of one viewer's SGDC widgets (thread-safe where workers touch it).

    Attributes:
        options: the post-processing of every mask (the Segment widget's sliders).
        defaults_source: the model whose tuned defaults `options` last took
            (`adopt_model_defaults`).
        settings: how the network runs (device, tile, planes, gates).
        models: loaded models by source.
        current_source: the source picked in the model picker, or None.
        results: cached segmentation per image layer (weakly keyed by the layer).
        busy: which job uses the model now (segmenting, fine-tuning, re-segmenting).
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

    # -- events (plain callbacks; widgets connect here) --------------------------------
    def connect(self, event: str, callback: Callable[..., None]) -> None:
        """Calls `callback(**kwargs)` whenever `event` is emitted.

        Bound methods are held weakly, so a closed widget does not stay alive
        (and keep its viewer alive) through the session.
        """
        ref = weakref.WeakMethod(callback) if hasattr(callback, "__self__") else (lambda: callback)
        self._listeners.setdefault(event, []).append(ref)

    def emit(self, event: str, **kwargs: Any) -> None:
        """Calls every live callback of `event` (from the GUI thread)."""
        refs = self._listeners.get(event, [])
        refs[:] = [ref for ref in refs if ref() is not None]
        for ref in list(refs):
            callback = ref()
            if callback is not None:
                callback(**kwargs)

    # -- models ------------------------------------------------------------------------
    def current(self) -> ModelState | None:
        """The picked model's state, or None when it is not loaded yet."""
        if self.current_source is None:
            return None
        return self.models.get(self.current_source)

    def adopt_model_defaults(self, state: ModelState) -> bool:
        """The first result of a model after a switch sets the options to the model's defaults
        (``ModelConfig.threshold``, ``boundary_threshold`` and ``min_size``, tuned on
        validation for instance models); emits ``options_changed`` when they changed.

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

    def get_model(self, source: str, device: str = "auto") -> ModelState:
        """Returns the loaded model for `source`, loading it on first use.

        A model that was fine-tuned stays in memory with its new weights, so
        switching models in the picker and back does not lose fine-tuning.

        Args:
            source: ``"built-in: <name>"`` or a checkpoint path.
            device: device to load onto.

        Raises:
            FileNotFoundError: the checkpoint or built-in does not exist.
            ValueError: the checkpoint is not a valid napari-sgdc checkpoint.
        """
        with self.lock:
            state = self.models.get(source)
            if state is None:
                from napari_sgdc.io import load_model

                name = source[len(BUILTIN_PREFIX):] if source.startswith(BUILTIN_PREFIX) else source
                model = load_model(name, device=device)
                state = ModelState(source=source, model=model)
                self.models[source] = state
            return state


_SESSIONS: dict[int, SGDCSession] = {}


def real_viewer(viewer: Any) -> Any:
    """The viewer behind napari's public-only proxy (which wraps every layer it returns
    in a new object, so caches keyed by layer identity need the real viewer)."""
    return getattr(viewer, "__wrapped__", viewer)


def get_session(viewer: Any) -> SGDCSession:
    """Returns the session of `viewer`, creating it on first use.

    The registry holds no reference to the viewer (keyed by id and dropped when
    the viewer is garbage-collected), so closing a viewer releases its models.
    napari may hand widgets a public-only proxy of the viewer; the session belongs
    to the real viewer behind it, so both widgets share one session.
    """
    viewer = real_viewer(viewer)
    key = id(viewer)
    session = _SESSIONS.get(key)
    if session is None:
        session = SGDCSession()
        _SESSIONS[key] = session
        weakref.finalize(viewer, _SESSIONS.pop, key, None)
    return session
