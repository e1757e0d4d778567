"""Inference engines (`napari_sgdc.engines`): every engine that can run here agrees with eager
torch; an engine that cannot run is refused by name in one line, and ``auto`` falls back to torch.

Tolerance: probabilities (sigmoid of the logits, and the clamped HoVer maps) within 1e-3 of
eager torch in float32 (measured: about 1e-7 for onnxruntime and openvino, the rounding of
another summation order). ``compile`` (inductor) is checked on the tiny model only: compiling
the lite0 network takes minutes on a 2-core CPU (its agreement on the real model is printed by
benchmarks/engines.py, which compares every engine with torch before timing it).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from napari_sgdc import engines
from napari_sgdc.cli import build_parser
from napari_sgdc.engines import ENGINES, INT8, Engine, EngineFallback, get_engine, missing_reason
from napari_sgdc.inference import predict_maps, segment
from napari_sgdc.model import SGDCSegmenter, build_model, tiny_config

TOLERANCE = 1e-3
GRAPH_ENGINES = [name for name in ENGINES if name not in ("auto", "torch", INT8)]


@pytest.fixture(autouse=True)
def engine_cache(tmp_path, monkeypatch):
    """Exported graphs and the auto table go to a fresh folder per test."""
    monkeypatch.setenv(engines.CACHE_ENV, str(tmp_path / "engine-cache"))
    return tmp_path / "engine-cache"


class TypedSegmenter(SGDCSegmenter):
    """A segmenter with an extra output (``type``: (B, 3, H, W) logits), as the lead's type head."""

    def forward(self, x, return_gates=False):
        out = super().forward(x, return_gates=return_gates)
        out["type"] = torch.cat([out["mask"], out["edge"], out["mask"] - out["edge"]], dim=1)
        return out


def _tiny(kind: str = "hover") -> SGDCSegmenter:
    torch.manual_seed(0)
    config = tiny_config(task="instance", instance_map=kind)
    model = TypedSegmenter(config) if kind == "hover" else build_model(config)
    return model.eval()


def _probabilities(out: dict) -> dict:
    return {key: (value.clamp(-1, 1) if key == "hover" else torch.sigmoid(value)) for key, value in out.items()}


def _max_differences(engine: str, model, batch) -> dict[str, float]:
    with torch.inference_mode():
        reference = _probabilities(get_engine("torch")(model, batch, "cpu"))
        with warnings.catch_warnings():
            warnings.simplefilter("error", EngineFallback)  # a fallback would compare torch with torch
            ours = _probabilities(get_engine(engine)(model, batch, "cpu"))
    assert set(ours) == set(reference)
    return {key: float((ours[key].float() - reference[key].float()).abs().max()) for key in reference}


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
@pytest.mark.parametrize("kind", ["hover", "distance"])
def test_each_engine_agrees_with_torch_on_a_tiny_model_or_is_refused_in_one_line(engine, kind):
    model, batch = _tiny(kind), torch.rand(1, 3, 96, 128)
    reason = missing_reason(engine)
    if reason is not None:  # its package is missing here: refused by name, never skipped
        with pytest.raises(ValueError, match=engine) as error:
            get_engine(engine)
        assert "\n" not in str(error.value) and "pip install" in str(error.value)
        return
    differences = _max_differences(engine, model, batch)
    assert max(differences.values()) <= TOLERANCE, differences
    if kind == "hover":
        assert "type" in differences  # an output the engines do not know by name is carried through


@pytest.mark.parametrize("engine", [name for name in GRAPH_ENGINES if name != "compile"])
def test_each_engine_agrees_with_torch_on_the_nuclei_model_through_segment(engine):
    from napari_sgdc.checkpoints import load_model
    from napari_sgdc.samples import read_sample

    model = load_model("nuclei", device="cpu")
    image = np.ascontiguousarray(read_sample("nuclei")[:256, :256])  # (256, 256, 3) uint8
    if missing_reason(engine) is not None:
        with pytest.raises(ValueError, match="cannot run here"):
            segment(model, image, tile=256, engine=engine)
        return
    with torch.inference_mode():
        differences = _max_differences(engine, model, torch.rand(1, 3, 256, 256))
    assert max(differences.values()) <= TOLERANCE, differences
    reference = segment(model, image, tile=256, engine="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineFallback)
        ours = segment(model, image, tile=256, engine=engine)
    assert np.abs(ours.probability - reference.probability).max() <= TOLERANCE
    assert np.abs(ours.separation - reference.separation).max() <= 10 * TOLERANCE  # a gradient of the HoVer maps
    prob, separation = predict_maps(model, image, engine=engine)
    assert np.abs(prob - reference.probability).max() <= TOLERANCE


def test_a_missing_package_refuses_the_engine_by_name_and_auto_falls_back_to_torch(monkeypatch):
    monkeypatch.setitem(engines.PACKAGES, "onnxruntime", ("onnx", "no_such_package_for_the_test"))
    with pytest.raises(ValueError, match="engine 'onnxruntime' cannot run here: needs the Python package") as error:
        get_engine("onnxruntime")
    assert "\n" not in str(error.value)
    engines.save_auto_choice("fp32", "onnxruntime", "test")  # measured fastest, but now missing
    assert engines.auto_choice("cpu") == "torch"
    assert type(get_engine("auto")) is Engine
    assert "onnxruntime" not in engines.dock_engines()


def test_auto_runs_what_the_measured_table_names_for_this_cpu():
    assert engines.auto_choice("cpu") == "torch"  # nothing measured: the reference
    engines.save_auto_choice("fp32", "onnxruntime", "forward 1.0 s vs torch 1.2 s")
    assert engines.auto_choice("cpu") == ("onnxruntime" if missing_reason("onnxruntime") is None else "torch")
    assert engines.auto_choice("cuda") == "torch"
    with pytest.raises(ValueError, match="cannot record"):
        engines.save_auto_choice("fp16", "torch", "")


def test_unknown_engine_is_one_line():
    with pytest.raises(ValueError, match="unknown engine 'tensorrt'; choose one of auto, torch"):
        get_engine("tensorrt")


def test_an_engine_that_fails_warns_and_torch_runs_instead(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("exporter broke\nsecond line")

    monkeypatch.setattr(engines, "export_logits", broken)
    model, batch = _tiny(), torch.rand(1, 3, 64, 64)
    engine = engines.OnnxRuntimeEngine()
    with torch.inference_mode():
        reference = get_engine("torch")(model, batch, "cpu")
        with pytest.warns(EngineFallback, match=r"engine onnxruntime failed \(RuntimeError: exporter broke\); running torch instead"):
            out = engine(model, batch, "cpu")
    assert all(torch.equal(out[key], reference[key]) for key in reference)


def test_a_graph_engine_follows_weights_changed_in_place():
    model, batch = _tiny("distance"), torch.rand(1, 3, 64, 64)
    engine = engines.OnnxRuntimeEngine()
    with torch.inference_mode():
        before = engine(model, batch, "cpu")["mask"]
    with torch.no_grad():
        model.mask_head.bias.add_(1.0)
    with torch.inference_mode():
        after, reference = engine(model, batch, "cpu")["mask"], model(batch)["mask"]
    assert not torch.allclose(before, after)
    assert (after - reference).abs().max() <= TOLERANCE


def test_gates_and_other_devices_run_the_eager_graph():
    model, batch = _tiny("distance"), torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        out = get_engine("onnxruntime")(model, batch, "cpu", return_gates=True)
    assert out["gates"]


def test_int8_is_refused_for_a_model_not_on_the_allow_list():
    from napari_sgdc.checkpoints import load_model

    # the allow-list names the shipped weights measured by benchmarks/quantize.py: a retrained model drops off
    for source, digest in engines.INT8_ALLOWED.items():
        assert engines.weights_sha256(load_model(source, device="cpu")) == digest, source
    with pytest.raises(ValueError, match="offered only for models measured to lose at most 0.5 points") as error:
        get_engine(INT8, _tiny())
    assert "\n" not in str(error.value)


def test_quantize_model_writes_an_int8_graph_that_runs(tmp_path):
    model = _tiny("distance")
    rng = np.random.default_rng(0)
    patches = [rng.random((64, 64, 3), dtype=np.float32) for _ in range(3)]
    path = engines.quantize_model(model, patches, tmp_path / "int8.onnx")
    engine = engines.Int8Engine(path)
    batch = torch.rand(1, 3, 96, 64)  # another size than the calibration patches: the graph is dynamic
    with torch.inference_mode():
        with warnings.catch_warnings():
            warnings.simplefilter("error", EngineFallback)
            out = engine(model, batch, "cpu")
        reference = model(batch)
    assert {key: value.shape for key, value in out.items()} == {key: reference[key].shape for key in out}
    assert float((torch.sigmoid(out["mask"]) - torch.sigmoid(reference["mask"])).abs().mean()) < 0.1
    with pytest.raises(ValueError, match="at least one calibration patch"):
        engines.quantize_model(model, [], tmp_path / "none.onnx")


def test_the_cli_takes_an_engine_for_predict_and_evaluate():
    parser = build_parser()
    assert parser.parse_args(["predict", "--model", "nuclei", "--out", "o", "x.png"]).engine == "auto"
    args = parser.parse_args(["predict", "--model", "nuclei", "--out", "o", "--engine", "onnxruntime", "x.png"])
    assert args.engine == "onnxruntime"
    assert parser.parse_args(["evaluate", "--model", "nuclei", "--engine", "torch"]).engine == "torch"
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "--model", "nuclei", "--out", "o", "--engine", "tensorrt", "x.png"])


def test_a_slide_plan_records_the_engine_outside_the_resume_signature():
    from dataclasses import replace

    from napari_sgdc.wholeslide.plan import SlidePlan

    plan = SlidePlan(slide_path="s.tif", backend="tifffile", slide_mpp=0.25, level=0, level_downsample=1.0,
                     factor=1.0, working_mpp=0.25, height=512, width=512, tile=256, margin=32, store="s.ome.zarr",
                     threshold=0.5, split_level=0.5, min_size=10, instances=True, roi=(0, 0, 512, 512))
    other = replace(plan, engine="onnxruntime")
    assert plan.engine == "torch" and other.signature() == plan.signature()
    assert engines.engine_name("auto") == "torch" and engines.engine_name(engines.OnnxRuntimeEngine()) == "onnxruntime"
