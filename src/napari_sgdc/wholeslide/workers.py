"""Where whole-slide tasks run: the slide and the model opened once per process, and the
two executors (in this process, or on a ``dask.distributed`` cluster).
"""

from __future__ import annotations

import threading
from pathlib import Path

from ..slide import Slide, open_slide
from .plan import SlidePlan

__all__ = ["LocalExecutor", "DaskExecutor", "model_config", "resolve_model", "weights_hash", "worker_slide"]

_SLIDES: dict[tuple, Slide] = {}
_SLIDES_LOCK = threading.Lock()


def worker_slide(plan: SlidePlan) -> Slide:
    """The slide, opened once per process."""
    key = (plan.slide_path, plan.backend, plan.slide_mpp)
    with _SLIDES_LOCK:
        if key not in _SLIDES:
            _SLIDES[key] = open_slide(plan.slide_path, backend=plan.backend, mpp=plan.slide_mpp)
        return _SLIDES[key]


_MODELS: dict[object, object] = {}


def model_config(model):
    """The config of a model object, or of a built-in name / checkpoint path (read from its
    metadata: the main process of a cluster run does not load the weights)."""
    if isinstance(model, (str, Path)):
        from ..checkpoints import read_model_config

        return read_model_config(model)
    return getattr(model, "config", None)


def resolve_model(model):
    """A model object from a model, a built-in name or a checkpoint path (loaded once per process)."""
    if isinstance(model, (str, Path)):
        key = str(model)
        if key not in _MODELS:
            from ..checkpoints import load_model

            _MODELS[key] = load_model(key, device="cpu")
        return _MODELS[key]
    return model


def weights_hash(model) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes, bytes): a fine-tuned copy differs, the
    same weights loaded from a name, a path or in memory do not."""
    from ..engines import weights_sha256

    return weights_sha256(resolve_model(model))


class LocalExecutor:
    """Runs tasks in this process (the default: no cluster): the tiles through the pipeline
    (`napari_sgdc.wholeslide.pipeline`: reading, the network and decoding overlap) or, with
    ``pipeline=False``, one after the other; the other tasks one after the other."""

    def __init__(self, model, pipeline: bool = True):
        self.model = model
        self.pipeline = pipeline

    def run_tiles(self, plan: SlidePlan, tiles: list, progress=None, cancel=None, stages=None) -> list:
        """Object counts of `tiles` ((i, j), not done yet), in order; ``progress(done)`` after each;
        `stages` (a `tiles.Stages`) collects the seconds per stage."""
        from .tiles import tile_task

        if self.pipeline:
            from .pipeline import run_pipeline

            return run_pipeline(plan, self.model, tiles, progress, cancel, stages)
        return self.run(tile_task, [(plan, i, j, stages) for i, j in tiles], progress, cancel, with_model=True)

    def run(self, function, items: list, progress=None, cancel=None, with_model=False) -> list:
        from ..inference import Cancelled

        results = []
        for done, item in enumerate(items, start=1):
            if cancel is not None and cancel.is_set():
                raise Cancelled("whole-slide segmentation cancelled")
            args = (self.model, *item[1:]) if with_model else item[1:]
            results.append(function(item[0], *args))
            if progress is not None:
                progress(done)
        return results


class DaskExecutor:
    """Runs tasks on a dask.distributed Client; the model is sent to every worker once."""

    def __init__(self, client, model, retries: int = 3):
        self.client = client
        self.retries = retries
        if isinstance(model, (str, Path)):
            self.model = str(model)  # each worker loads it once (resolve_model caches it)
        else:
            self.model = client.scatter(model, broadcast=True, hash=False)

    def run_tiles(self, plan: SlidePlan, tiles: list, progress=None, cancel=None, stages=None) -> list:
        """Object counts of `tiles`, in order, each tile a task on the cluster (`stages` is not filled:
        the stages run on the workers)."""
        from .tiles import tile_task

        return self.run(tile_task, [(plan, i, j) for i, j in tiles], progress, cancel, with_model=True)

    def run(self, function, items: list, progress=None, cancel=None, with_model=False) -> list:
        from distributed import as_completed

        from ..inference import Cancelled

        futures = []
        for item in items:
            args = (self.model, *item[1:]) if with_model else item[1:]
            futures.append(self.client.submit(function, item[0], *args, pure=False, retries=self.retries))
        index = {future.key: n for n, future in enumerate(futures)}
        results: list = [None] * len(futures)
        try:
            for done, future in enumerate(as_completed(futures), start=1):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("whole-slide segmentation cancelled")
                results[index[future.key]] = future.result()
                if progress is not None:
                    progress(done)
        except BaseException:
            self.client.cancel(futures)
            raise
        return results
