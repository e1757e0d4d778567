"""Inference engines: what runs the network's graph for `segment`, `predict_maps` and slides.

An `Engine` is called as ``engine(model, batch, device, amp)`` and returns what ``model(batch)``
returns: the dict of logits (``mask``, ``edge``, and ``distance``/``hover`` or any other tensor
output the model has; extra keys are carried through by name). Engines:

    torch             eager PyTorch through `napari_sgdc.device.forward` (the reference; bf16
                      autocast with ``amp`` where the device runs bf16 natively)
    compile           ``torch.compile`` (inductor; needs a C++ compiler on the CPU), same autocast
    onnxruntime       ONNX Runtime, CPU provider, float32
    openvino          OpenVINO, CPU, float32; bf16 with ``amp`` where the CPU runs it natively
    onnxruntime-int8  ONNX Runtime on a statically quantized (QDQ, per-channel) graph: only for
                      models on `INT8_ALLOWED`, after `quantize_model` calibrated them
    auto              the engine `auto_choice` names (a table measured on this CPU by
                      ``benchmarks/engines.py --save-auto``), else torch

The graph engines export the model once per weights (sha256) and input shape with
`napari_sgdc.modelzoo.network.export_onnx` into `cache_dir` (in memory: per model object and
weight version), run on the CPU only, and run the eager model for passes that need the gates.
An engine that fails on a model warns (`EngineFallback`) and runs torch instead; asking by name
for an engine whose package is missing is a one-line ValueError (``auto`` falls back silently).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .device import bf16_supported, forward

__all__ = ["ENGINES", "INT8", "INT8_ALLOWED", "Engine", "EngineFallback", "auto_choice", "available_engines",
           "cache_dir", "cpu_key", "dock_engines", "engine_name", "get_engine", "missing_reason", "quantize_model",
           "save_auto_choice", "weights_sha256"]

INT8 = "onnxruntime-int8"
ENGINES = ("auto", "torch", "onnxruntime", "openvino", "compile", INT8)
"""Engine names (``--engine``, the Segment dock's *engine* box, `segment(engine=)`)."""
PACKAGES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino"), INT8: ("onnx", "onnxruntime")}
"""The Python packages each graph engine imports (the ``engines`` extra)."""
INT8_ALLOWED: dict[str, str] = {
    # CoNSeP test (224): AJI 0.4926 fp32, 0.4930 int8 (docs/performance.md, "Inference engines")
    "nuclei": "f945ec45d61e6241ea8c3865cd5c2809d8d53fb0933442062f2f3418f9eb65d8",
    # PH² test (60): IoU 0.9076 fp32, 0.9054 int8
    "dermoscopy": "a725c2bb66fe8db0d9f5c554ab0af78e7a3a010d4b7ac668e3c025fae88bbb4b",
}
"""Model source -> weights sha256 of the models `INT8` is offered for: those whose int8 graph lost at
most 0.5 points (AJI for nuclei, IoU for dermoscopy) on their whole test split, measured by
``benchmarks/quantize.py`` (which prints the line to add). A retrained model has another sha256 and
is refused until it is measured again."""
CACHE_ENV = "NAPARI_SGDC_ENGINE_CACHE"
"""Environment variable naming the folder of exported graphs (default: the user cache dir)."""
AUTO_FILE = "auto.json"
INPUT = "input"


class EngineFallback(UserWarning):
    """Warned when an engine cannot run a model and torch runs it instead."""


def cache_dir() -> Path:
    """The folder of exported graphs and the measured `auto` table: ``$NAPARI_SGDC_ENGINE_CACHE``,
    else platformdirs' user cache dir for napari-sgdc (``engines/``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-sgdc")) / "engines"


def weights_sha256(model: torch.nn.Module) -> str:
    """sha256 of a model's state dict (names, dtypes, shapes, bytes): a fine-tuned copy differs,
    the same weights loaded from a name, a path or in memory do not."""
    digest = hashlib.sha256()
    state = model.state_dict() if hasattr(model, "state_dict") else {}
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer is modified in place (fine-tuning, load_state_dict)."""
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


def missing_reason(name: str) -> str | None:
    """Why engine `name` cannot run here (a missing package or compiler), or None when it can."""
    for package in PACKAGES.get(name, ()):
        if importlib.util.find_spec(package) is None:
            return f"needs the Python package {package!r} (pip install 'napari-sgdc[engines]')"
    if name == "compile" and not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")):
        return "torch.compile (inductor) needs a C++ compiler (g++) on the CPU, and none was found"
    return None


def available_engines() -> list[str]:
    """The engine names that can run here (``auto`` and ``torch`` always)."""
    return [name for name in ENGINES if missing_reason(name) is None]


def dock_engines() -> list[str]:
    """The Segment dock's choices: `available_engines`, int8 only once `INT8_ALLOWED` names a model."""
    return [name for name in available_engines() if name != INT8 or INT8_ALLOWED]


class Engine:
    """Eager PyTorch: `napari_sgdc.device.forward` (device, memory format, bf16 autocast).

    Subclasses run the same graph another way and return the same dict of tensors.
    """

    name = "torch"

    def __call__(self, model: torch.nn.Module, batch: torch.Tensor, device: torch.device | str, amp: bool = False,
                 **kwargs: Any) -> dict:
        return forward(model, batch, device, amp, **kwargs)

    def __repr__(self) -> str:
        return f"<engine {self.name}>"

    def _fallback(self, error: BaseException) -> None:
        line = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        warnings.warn(f"engine {self.name} failed ({type(error).__name__}: {line}); running torch instead",
                      EngineFallback, stacklevel=3)


class CompileEngine(Engine):
    """``torch.compile`` (inductor) of the model, one per model object; recompiles per input shape."""

    name = "compile"

    def __init__(self) -> None:
        self._compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __call__(self, model, batch, device, amp=False, **kwargs):
        if kwargs.get("return_gates"):
            return forward(model, batch, device, amp, **kwargs)
        with self._lock:
            compiled = self._compiled.get(model)
            if compiled is None:
                compiled = self._compiled[model] = torch.compile(model)
        if compiled is False:
            return forward(model, batch, device, amp, **kwargs)
        try:
            return forward(compiled, batch, device, amp, **kwargs)
        except Exception as error:  # noqa: BLE001 - inductor errors come in many types; torch runs instead
            self._compiled[model] = False
            self._fallback(error)
            return forward(model, batch, device, amp, **kwargs)


class _Logits(torch.nn.Module):
    """The model's tensor outputs as a tuple in `keys` order (what the ONNX graph returns)."""

    def __init__(self, model: torch.nn.Module, keys: list[str]):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(x)
        return tuple(out[key] for key in self.keys)


def export_logits(model: torch.nn.Module, shape: tuple[int, ...], path: Path, dynamic: bool = False) -> list[str]:
    """Writes the ONNX graph of `model`'s logits for input `shape` to `path` (atomically) through
    `napari_sgdc.modelzoo.network.export_onnx`; returns the output names."""
    from .device import eval_mode
    from .modelzoo.network import export_onnx

    example = torch.rand(*shape)
    with eval_mode(model), torch.no_grad():
        if next(model.parameters()).device.type != "cpu":
            raise ValueError("the graph engines export a model on the CPU; move the model with model.to('cpu')")
        keys = [key for key, value in model(example).items() if isinstance(value, torch.Tensor)]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        export_onnx(_Logits(model, keys).float(), example.float(), str(partial), INPUT, keys, dynamic=dynamic)
        os.replace(partial, path)
    return keys


class _GraphEngine(Engine):
    """An engine that runs an exported ONNX graph on the CPU, one compiled graph per (weights, shape)."""

    suffix = ""

    def __init__(self) -> None:
        self._runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def __call__(self, model, batch, device, amp=False, **kwargs):
        if kwargs.get("return_gates") or torch.device(device).type != "cpu":
            return forward(model, batch, device, amp, **kwargs)  # gates and other devices: the eager graph
        key = (_weights_version(model), tuple(batch.shape), bool(amp))
        with self._lock:
            runners = self._runners.setdefault(model, {})
            if key not in runners:
                try:
                    runners[key] = self._build(model, tuple(batch.shape), amp)
                except Exception as error:  # noqa: BLE001 - export and compile errors: torch runs instead
                    runners[key] = None
                    self._fallback(error)
            runner = runners[key]
        if runner is None:
            return forward(model, batch, device, amp, **kwargs)
        run, keys = runner
        values = run(batch.detach().to("cpu", torch.float32).contiguous().numpy())
        return {key: torch.from_numpy(np.asarray(value)) for key, value in zip(keys, values)}

    def graph_path(self, model: torch.nn.Module, shape: tuple[int, ...]) -> tuple[Path, list[str]]:
        """The cached float32 graph of `model` for `shape` (exported when missing) and its output names."""
        folder = cache_dir()
        path = folder / f"{weights_sha256(model)[:24]}_{'x'.join(map(str, shape))}.onnx"
        if path.exists() and path.with_suffix(".json").exists():
            return path, json.loads(path.with_suffix(".json").read_text())
        try:
            keys = export_logits(model, shape, path)
        except OSError:  # an unwritable cache: a private temporary folder for this process
            path = Path(tempfile.mkdtemp(prefix="napari-sgdc-engines-")) / path.name
            keys = export_logits(model, shape, path)
        path.with_suffix(".json").write_text(json.dumps(keys))
        return path, keys

    def _build(self, model, shape, amp) -> tuple[Callable, list[str]]:
        path, keys = self.graph_path(model, shape)
        return self._load(path, amp), keys

    def _load(self, path: Path, amp: bool) -> Callable:
        """A function from the (B, 3, H, W) float32 array to the list of output arrays."""
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only: not the optimiser's notes on unused initializers
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda array: session.run(None, {INPUT: array})


class OnnxRuntimeEngine(_GraphEngine):
    """ONNX Runtime, CPU execution provider, float32 (``amp`` is ignored)."""

    name = "onnxruntime"


class OpenVinoEngine(_GraphEngine):
    """OpenVINO on the CPU: float32, or bf16 with ``amp`` where the CPU runs bf16 natively."""

    name = "openvino"

    def _load(self, path: Path, amp: bool) -> Callable:
        import openvino as ov

        precision = "bf16" if amp and bf16_supported("cpu") else "f32"  # f32 explicitly: OpenVINO's CPU default
        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": precision,  # is bf16
                                                               "INFERENCE_NUM_THREADS": torch.get_num_threads()})
        request = compiled.create_infer_request()
        outputs = list(compiled.outputs)
        return lambda array: [np.array(request.infer({0: array})[port]) for port in outputs]


class Int8Engine(_GraphEngine):
    """ONNX Runtime on the int8 graph `quantize_model` wrote (dynamic shapes: one graph per weights)."""

    name = INT8

    def __init__(self, graph: str | Path | None = None) -> None:
        super().__init__()
        self.graph = Path(graph) if graph is not None else None

    def graph_path(self, model, shape):
        path = self.graph or int8_path(model)
        if not path.exists():
            raise FileNotFoundError(f"no int8 graph at {path}: calibrate it first (napari_sgdc.engines.quantize_model)")
        return path, json.loads(path.with_suffix(".json").read_text())


def int8_path(model: torch.nn.Module) -> Path:
    """Where `quantize_model` writes `model`'s int8 graph by default (by weights sha256)."""
    return cache_dir() / f"{weights_sha256(model)[:24]}_int8.onnx"


def quantize_model(model: torch.nn.Module, patches: list[np.ndarray], out: str | Path | None = None,
                   per_channel: bool = True) -> Path:
    """ONNX Runtime static int8 quantization of `model` (QDQ format, per-channel weights),
    calibrated on `patches`.

    Args:
        model: an `SGDCSegmenter` on the CPU.
        patches: (H, W, 3) float32 RGB in [0, 1], H and W multiples of 32 (training patches).
        out: the int8 .onnx to write (default `int8_path`); its output names go beside it (.json).

    Returns:
        The path of the int8 graph (dynamic batch and size), for ``Int8Engine(path)``.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if not patches:
        raise ValueError("quantize_model needs at least one calibration patch")
    out = Path(out) if out is not None else int8_path(model)
    shape = (1, 3, *patches[0].shape[:2])
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        keys = export_logits(model, shape, fp32, dynamic=True)
        feeds = iter([{INPUT: np.ascontiguousarray(p.transpose(2, 0, 1)[None], np.float32)} for p in patches])

        class Reader(CalibrationDataReader):
            def get_next(self):
                return next(feeds, None)

        out.parent.mkdir(parents=True, exist_ok=True)
        quantize_static(str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
    out.with_suffix(".json").write_text(json.dumps(keys))
    return out


def cpu_key() -> str:
    """The CPU as the `auto` table knows it: `napari_sgdc.device.cpu_description` (model, vector
    flags, and the ISA torch runs with, so a capped ISA gets its own entry)."""
    from napari_sgdc.device import cpu_description

    return cpu_description()


def _auto_table() -> dict:
    try:
        return json.loads((cache_dir() / AUTO_FILE).read_text())
    except (OSError, ValueError):
        return {}


def save_auto_choice(precision: str, engine: str, evidence: str) -> Path:
    """Records the engine measured fastest on this CPU for `precision` (``fp32`` or ``bf16``), with
    the measurement behind it (`evidence`), in the `auto` table (written by benchmarks/engines.py)."""
    if engine not in ENGINES[1:] or precision not in ("fp32", "bf16"):
        raise ValueError(f"cannot record engine {engine!r} for precision {precision!r}")
    table = _auto_table()
    table.setdefault(cpu_key(), {})[precision] = {"engine": engine, "evidence": evidence}
    path = cache_dir() / AUTO_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1))
    return path


def auto_choice(device: torch.device | str, amp: bool = False) -> str:
    """What ``auto`` runs: torch on any device but the CPU; on the CPU the engine the measured table
    names for this CPU and precision (bf16 when `amp` and the CPU runs it natively) if it can run
    here and is not int8; else torch (the reference; bf16 autocast where native)."""
    if torch.device(device).type != "cpu":
        return "torch"
    precision = "bf16" if amp and bf16_supported("cpu") else "fp32"
    entry = _auto_table().get(cpu_key(), {}).get(precision, {})
    name = entry.get("engine", "torch") if isinstance(entry, dict) else "torch"
    return name if name in ENGINES[1:-1] and missing_reason(name) is None else "torch"


_ENGINES: dict[str, Engine] = {}
_CLASSES = {"torch": Engine, "compile": CompileEngine, "onnxruntime": OnnxRuntimeEngine, "openvino": OpenVinoEngine,
            INT8: Int8Engine}


def get_engine(engine: str | Engine | None = "auto", model: torch.nn.Module | None = None,
               device: torch.device | str = "cpu", amp: bool = False) -> Engine:
    """The `Engine` for a name (one shared instance per name, so compiled graphs are reused), or
    `engine` itself when it is one. None is ``torch``.

    Raises:
        ValueError: an unknown name; a named engine that cannot run here (one line saying why);
            ``onnxruntime-int8`` for a model not on `INT8_ALLOWED`.
    """
    if isinstance(engine, Engine):
        return engine
    name = engine_name(engine, amp, device)
    if name == INT8:
        _check_int8(model)
    if name not in _ENGINES:
        _ENGINES[name] = _CLASSES[name]()
    return _ENGINES[name]


def engine_name(engine: str | Engine | None, amp: bool = False, device: torch.device | str = "cpu") -> str:
    """The name of the engine `engine` stands for (``auto`` resolved with `auto_choice`), checked as
    `get_engine` checks it (the int8 allow-list is checked where the model runs); for whole-slide plans."""
    if isinstance(engine, Engine):
        return engine.name
    name = "torch" if engine is None else str(engine).lower()
    if name not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    name = auto_choice(device, amp) if name == "auto" else name
    reason = missing_reason(name)
    if reason is not None:
        raise ValueError(f"engine {name!r} cannot run here: {reason}; use --engine auto or torch")
    return name


def _check_int8(model: torch.nn.Module | None) -> None:
    """Refuses `INT8` for a model whose weights are not on `INT8_ALLOWED`."""
    digest = weights_sha256(model) if model is not None else None
    if digest is None or digest not in INT8_ALLOWED.values():
        allowed = ", ".join(INT8_ALLOWED) or "none yet"
        raise ValueError(f"engine {INT8!r} is offered only for models measured to lose at most 0.5 points "
                         f"(benchmarks/quantize.py); allowed: {allowed}; this model is not one of them")
