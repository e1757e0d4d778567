"""Tests of the widgets' shared session state (plain Python, no viewer needed)."""

from __future__ import annotations

import numpy as np

from napari_sgdc.session import Busy, CachedResult, CorrectionSession, Job
from napari_sgdc.postprocess import PostprocessOptions, postprocess


def test_busy_refuses_a_second_job_until_released():
    busy = Busy()
    assert busy.idle and not busy and str(busy) == "idle"
    assert busy.acquire(Job.SEGMENT, "lesion")
    assert not busy.acquire(Job.FINETUNE) and busy.job is Job.SEGMENT and str(busy) == "segmenting lesion"
    busy.release(Job.FINETUNE)  # not the running job: nothing changes
    assert busy.job is Job.SEGMENT
    busy.release(Job.SEGMENT)
    assert busy.idle and busy.acquire(Job.FINETUNE) and str(busy) == "fine-tuning"


def test_session_holds_one_postprocess_options_and_separate_run_settings():
    session = CorrectionSession()
    assert session.options == PostprocessOptions() and session.busy.idle
    assert (session.settings.device, session.settings.planes) == ("auto", "all")


def test_cache_postprocesses_all_segmented_planes_at_once():
    rng = np.random.default_rng(0)
    probability = rng.random((3, 24, 24)).astype(np.float32)
    boundary = rng.random((3, 24, 24)).astype(np.float32)
    cache = CachedResult(probability=probability, boundary=boundary, segmented=np.array([True, False, True]),
                         lead_shape=(3,), instances=True, written_mask=np.zeros((3, 24, 24), np.int32),
                         model_source="m")
    options = PostprocessOptions(0.4, 0.6, 2)
    labels = cache.postprocessed(options)
    _, expected = postprocess(probability[[0, 2]], boundary[[0, 2]], options, instances=True)
    assert labels.dtype == np.int32 and not labels[1].any()
    np.testing.assert_array_equal(labels[[0, 2]], expected)
    ids_0, ids_2 = (set(np.unique(labels[i]).tolist()) - {0} for i in (0, 2))
    assert ids_0 and ids_2 and not ids_0 & ids_2
