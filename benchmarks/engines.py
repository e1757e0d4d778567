"""Inference engines on this CPU: latency, achieved GFLOP/s, fraction of peak and a roofline line.

For each engine (`napari_sgdc.engines`) × precision (fp32; bf16 where the engine and the CPU
support it: torch and compile through autocast, openvino through its precision hint, on a CPU
with AVX512-BF16 or AMX) it prints one markdown row: the 512² `segment()` latency (median of
``--runs``, one tile), the forward-only latency, the largest probability difference to eager
torch fp32, the achieved GFLOP/s (FLOPs of one forward counted by
``torch.utils.flop_counter.FlopCounterMode``: convolutions and matrix products; the SGDC
shift-and-sum aggregation and element-wise ops are not counted) and its fraction of the CPU's
peak, then a roofline line per engine. The peak and the memory bandwidth are derived and
printed first (how, in the lines themselves). Torch threads = the cores this process may use.

    python benchmarks/engines.py                          # the built-in nuclei model, 512², all engines
    python benchmarks/engines.py --model dermoscopy --runs 20
    python benchmarks/engines.py --save-auto              # also record the fastest engine per precision
                                                          # for engine="auto" on this CPU
    python benchmarks/engines.py --quick                  # tiny model, 128², torch + onnxruntime: seconds

Run it on an idle machine: the numbers move by far more than the differences between engines
when anything else uses the cores.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from resample import cpu_line  # noqa: E402  (the benchmarks' one CPU description)

from napari_sgdc import engines  # noqa: E402
from napari_sgdc.device import bf16_supported  # noqa: E402
from napari_sgdc.inference import segment  # noqa: E402


def cpu_flags() -> tuple[list[str], dict[str, str]]:
    """(/proc/cpuinfo flags, its first processor's fields)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [], {}
    block = text.split("\n\n")[0]
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())}
    return fields.get("flags", "").split(), fields


def clock_ghz(fields: dict[str, str]) -> tuple[float, str]:
    """The core clock and where it came from: lscpu's CPU max MHz, else BogoMIPS / 2, else cpu MHz."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    found = re.search(r"CPU max MHz:\s*([\d.]+)", out)
    if found:
        return float(found.group(1)) / 1000, "lscpu 'CPU max MHz'"
    bogo = re.search(r"BogoMIPS:\s*([\d.]+)", out) or re.search(r"([\d.]+)", fields.get("bogomips", ""))
    if bogo:
        return float(bogo.group(1)) / 2000, "BogoMIPS / 2 (no 'CPU max MHz' in lscpu: a VM; the base clock)"
    return float(fields.get("cpu MHz", 0) or 0) / 1000, "/proc/cpuinfo 'cpu MHz' (the current clock)"


def peak(cores: int, lanes: int | None, fma_units: int) -> tuple[float, list[str]]:
    """fp32 peak GFLOP/s = cores × clock × fp32 lanes × 2 (FMA) × FMA units, and how it was derived."""
    flags, fields = cpu_flags()
    ghz, source = clock_ghz(fields)
    notes = []
    if lanes is None:
        lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
        notes.append(f"lanes {lanes} from flags ({'avx512f' if lanes == 16 else 'avx2' if lanes == 8 else 'sse'})")
        if lanes == 16 and fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25":
            lanes = 8  # Zen 4 runs a 512-bit op as two halves on its 256-bit FMA pipes
            notes.append("AMD family 25 (Zen 4): AVX-512 on 256-bit FMA units, so 8 lanes per FMA")
    else:
        notes.append(f"lanes {lanes} (--lanes)")
    value = cores * ghz * lanes * 2 * fma_units
    notes.insert(0, f"fp32 peak = {cores} cores × {ghz:.2f} GHz ({source}) × {lanes} lanes × 2 (FMA) × "
                    f"{fma_units} FMA units = {value:.0f} GFLOP/s")
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        notes.append("bf16 rows use 2× that peak (AVX512-BF16 dot products: 2 products per fp32 lane; "
                     "AMX tiles are faster still and not modelled)")
    return value, notes


def bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth, STREAM-copy style: the best of `repeats` copies of a `megabytes` float32 array
    (bytes read + written per second)."""
    source = torch.ones(megabytes * 2**18)
    target = torch.empty_like(source)
    best = min(_seconds(lambda: target.copy_(source)) for _ in range(repeats))
    return 2 * source.numel() * 4 / best / 1e9


def _seconds(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def forward_costs(model, batch) -> tuple[float, float]:
    """(FLOPs of one forward: convolutions and matrix products, bytes its leaf modules read and write:
    inputs, outputs and parameters once each)."""
    from torch.utils.flop_counter import FlopCounterMode

    moved = [0]

    def hook(module, inputs, output):
        tensors = [t for t in (*inputs, *(output.values() if isinstance(output, dict) else
                                          output if isinstance(output, (tuple, list)) else [output]))
                   if isinstance(t, torch.Tensor)]
        moved[0] += sum(t.numel() * t.element_size() for t in tensors)
        moved[0] += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    counter = FlopCounterMode(display=False)
    try:
        with torch.inference_mode(), counter:
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return float(counter.get_total_flops()), float(moved[0])


def median_seconds(call, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    return statistics.median(_seconds(call) for _ in range(runs))


def measure(model, name: str, amp: bool, size: int, runs: int, warmup: int, reference: dict) -> dict:
    """One row: latencies, the largest difference to `reference` (torch fp32 probabilities), fallbacks seen."""
    engine = engines.get_engine(name, model, "cpu", amp)
    batch = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    image = (batch[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", engines.EngineFallback)
        with torch.inference_mode():
            first = _seconds(lambda: engine(model, batch, "cpu", amp))  # export / compile included
            out = engine(model, batch, "cpu", amp)
            difference = max(float((torch.sigmoid(out[k].float()) - reference[k]).abs().max())
                             for k in reference if k != "hover")
            forward_s = median_seconds(lambda: engine(model, batch, "cpu", amp), runs, warmup)
        segment_s = median_seconds(lambda: segment(model, image, tile=size, amp=amp, engine=engine), runs, warmup)
    fell_back = any(issubclass(w.category, engines.EngineFallback) for w in caught)
    return {"engine": name, "precision": "bf16" if amp else "fp32", "first_s": first, "forward_s": forward_s,
            "segment_s": segment_s, "difference": difference, "fell_back": fell_back}


def load(model_name: str, quick: bool):
    from napari_sgdc.checkpoints import load_model
    from napari_sgdc.model import build_model, tiny_config

    if quick or model_name == "tiny":
        torch.manual_seed(0)
        return build_model(tiny_config(task="instance", instance_map="hover")).eval(), "tiny (random)"
    return load_model(model_name, device="cpu").eval(), model_name


def report(rows: list[dict], flops: float, moved: float, fp32_peak: float, bf16_factor: float,
           bandwidth: float) -> list[str]:
    lines = ["| engine | precision | segment 512² median (s) | forward median (s) | first call (s) | max prob diff "
             "vs torch fp32 | GFLOP/s | % of peak |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        achieved = flops / row["forward_s"] / 1e9
        top = fp32_peak * (bf16_factor if row["precision"] == "bf16" else 1)
        note = " (fell back to torch)" if row["fell_back"] else ""
        lines.append(f"| {row['engine']}{note} | {row['precision']} | {row['segment_s']:.3f} | {row['forward_s']:.3f} "
                     f"| {row['first_s']:.1f} | {row['difference']:.1e} | {achieved:.1f} | {100 * achieved / top:.1f} |")
    intensity = flops / moved
    lines.append("")
    for row in rows:
        top = fp32_peak * (bf16_factor if row["precision"] == "bf16" else 1)
        bound = min(top, intensity * bandwidth)
        achieved = flops / row["forward_s"] / 1e9
        kind = "memory" if intensity * bandwidth < top else "compute"
        lines.append(f"roofline {row['engine']} {row['precision']}: intensity {intensity:.1f} FLOP/byte × "
                     f"{bandwidth:.1f} GB/s = {intensity * bandwidth:.0f} GFLOP/s, peak {top:.0f} → bound "
                     f"{bound:.0f} GFLOP/s ({kind}-bound); achieved {achieved:.1f} = {100 * achieved / bound:.1f} % "
                     f"of the bound")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="nuclei", help="built-in name, checkpoint path, or 'tiny'")
    parser.add_argument("--engines", nargs="+", help="default: every engine that can run here (no int8)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core (default 2)")
    parser.add_argument("--lanes", type=int, help="fp32 lanes per FMA (default: from the CPU flags)")
    parser.add_argument("--save-auto", action="store_true", help="record the fastest engine per precision "
                        "(agreeing within 1e-3 in fp32, 1e-2 in bf16) as engine='auto''s choice on this CPU")
    parser.add_argument("--quick", action="store_true", help="tiny model, 128², 2 runs, torch and onnxruntime")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.runs, args.warmup = 128, 2, 1
        args.engines = args.engines or [e for e in ("torch", "onnxruntime") if engines.missing_reason(e) is None]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    model, label = load(args.model, args.quick)
    names = args.engines or [e for e in engines.available_engines() if e not in ("auto", engines.INT8)]
    fp32_peak, notes = peak(cores, args.lanes, args.fma_units)
    flags = cpu_flags()[0]
    bf16_factor = 2.0 if ("avx512_bf16" in flags or "amx_bf16" in flags) else 1.0
    bandwidth = bandwidth_gbs(64 if args.quick else 256)
    print(f"# CPU: {cpu_line()}; AMX: {'yes' if 'amx_tile' in flags else 'no'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; model {label}; input {args.size}²; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for note in notes:
        print(f"# {note}")
    batch = torch.rand(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    flops, moved = forward_costs(model, batch)
    print(f"# one forward: {flops / 1e9:.2f} GFLOP (convolutions + matrix products), {moved / 1e6:.0f} MB moved by "
          f"its layers; memory bandwidth (copy) {bandwidth:.1f} GB/s")
    with torch.inference_mode():
        reference = {k: torch.sigmoid(v.float()) for k, v in model(batch).items()
                     if isinstance(v, torch.Tensor) and k != "hover"}  # probabilities
    rows = []
    for name in names:
        for amp in (False, True):
            if amp and not (bf16_supported("cpu") and name in ("torch", "compile", "openvino")):
                continue
            rows.append(measure(model, name, amp, args.size, args.runs, args.warmup, reference))
    print("\n".join(report(rows, flops, moved, fp32_peak, bf16_factor, bandwidth)))
    if args.save_auto:
        save(rows)


def save(rows: list[dict]) -> None:
    for precision, tolerance in (("fp32", 1e-3), ("bf16", 1e-2)):
        fair = [r for r in rows if r["precision"] == precision and r["difference"] <= tolerance and not r["fell_back"]]
        if fair:
            best = min(fair, key=lambda r: r["forward_s"])
            evidence = ", ".join(f"{r['engine']} {r['forward_s']:.3f} s" for r in fair)
            path = engines.save_auto_choice(precision, best["engine"], f"forward medians: {evidence}")
            print(f"# auto ({precision}) on this CPU: {best['engine']} (written to {path})")


if __name__ == "__main__":
    main()
