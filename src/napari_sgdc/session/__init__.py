"""The headless correction session: segment, correct, fine-tune, undo (no napari, no Qt).

* `CorrectionSession` (`core`): models, options, run settings, cached results, busy state,
  label conversion, edit counts and the fine-tune / undo steps;
* `ModelState`, `FinetuneRun` (`models`): a loaded model with its undo stack and provenance;
* `CachedResult`, `PlaneInput`, `merge_result` (`results`): results per image, post-processed once;
* `EditCount`, `count_edits` (`edits`): what the user changed;
* `TrainingList` (`training`): the training pairs, autosaved until trained.

Example::

    session = CorrectionSession()
    state = session.get_model("built-in: dermoscopy")
    run = state.begin_run([pair], override_preset(PRESETS["quick"], steps=50, learning_rate=1e-4,
                                                  freeze_encoder=True))
    history = session.run_finetune(run)
    session.keep_finetune(run, history)    # or state.drop_run(run)
    session.current_source = state.source
    session.undo()                         # the weights from before, bit for bit
"""

from napari_sgdc.session.core import NO_MODEL, Busy, CorrectionSession, Job, RunSettings, error_line
from napari_sgdc.session.edits import EditCount, count_edits
from napari_sgdc.session.models import (BUILTIN_PREFIX, MAX_UNDO, FinetuneRun, ModelState, builtin_name,
                                        display_name, load_state)
from napari_sgdc.session.results import CachedResult, PlaneInput, as_planes, merge_result, renumber_planes
from napari_sgdc.session.training import TrainingList

__all__ = [
    "BUILTIN_PREFIX", "MAX_UNDO", "NO_MODEL", "Busy", "CachedResult", "CorrectionSession", "EditCount",
    "FinetuneRun", "Job", "ModelState", "PlaneInput", "RunSettings", "TrainingList", "as_planes", "builtin_name",
    "count_edits", "display_name", "error_line", "load_state", "merge_result", "renumber_planes",
]
