"""SGDC aggregation: shift-and-sum (ours) against the unfold reference.

Forward + backward time and peak memory at dim 256, 128×128, k = 7, 4 heads, batch 1 and 4,
on the CPU (and CUDA when present). Prints a markdown table; copy it into docs/performance.md.

    python benchmarks/sgdc_op.py [--threads 2] [--repeats 3] [--device cpu|cuda|all]

CPU peak memory is measured in a fresh subprocess per case as the highest resident set size
(sampled every millisecond from /proc/self/statm) above the RSS just before the op; CUDA uses
torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import statistics
import subprocess
import sys
import time

import torch

from napari_sgdc.model.sgdc import dynamic_aggregate, unfold_aggregate_reference

OPS = {"shift_and_sum": dynamic_aggregate, "unfold": unfold_aggregate_reference}
DIM, SIZE, K, HEADS = 256, 128, 7, 4


def _inputs(batch: int, device: str):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, DIM, SIZE, SIZE, generator=generator).to(device).requires_grad_()
    kernel = torch.randn(batch, HEADS, K * K, SIZE, SIZE, generator=generator).softmax(2).to(device).requires_grad_()
    return x, kernel


class RssSampler:
    """Samples this process's resident set size in a thread; ``peak`` is the highest seen (bytes)."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _step(op, x, kernel):
    out = op(x, kernel, K)
    out.backward(torch.ones_like(out))
    return out


def measure(op_name: str, batch: int, device: str, repeats: int) -> dict:
    """Times forward+backward and measures the peak memory of one op (run in-process)."""
    op = OPS[op_name]
    x, kernel = _inputs(batch, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = RssSampler.rss()
    with RssSampler() as sampler:  # memory pass (the sampler thread would perturb timing)
        _step(op, x, kernel)
        x.grad = kernel.grad = None
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _step(op, x, kernel)
        sync()
        times.append(time.perf_counter() - start)
        x.grad = kernel.grad = None
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = sampler.peak - base
    return {"time_s": statistics.median(times), "peak_mb": max(peak, 0) / 2**20}


def _fresh_process(op_name: str, batch: int, device: str, repeats: int, threads: int) -> dict:
    """Runs `measure` in a new interpreter so each op's CPU peak RSS starts clean."""
    code = (f"import torch, json; torch.set_num_threads({threads}); import sys; sys.path.insert(0, {sys.path[0]!r});"
            f"from sgdc_op import measure; print(json.dumps(measure({op_name!r}, {batch}, {device!r}, {repeats})))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def max_difference(batch: int, device: str) -> float:
    x, kernel = _inputs(batch, device)
    with torch.no_grad():
        return float((dynamic_aggregate(x, kernel, K) - unfold_aggregate_reference(x, kernel, K)).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "all"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    from napari_sgdc.device import cpu_description

    print(f"# CPU: {cpu_description()}", flush=True)
    torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    print(f"SGDC aggregation, dim {DIM}, {SIZE}×{SIZE}, k={K}, {HEADS} heads, forward+backward, "
          f"torch {torch.__version__}, {args.threads} CPU threads\n")
    print("| device | batch | unfold time (s) | shift-and-sum time (s) | speed-up | unfold peak (MB) "
          "| shift-and-sum peak (MB) | memory ratio | max abs diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        for batch in args.batches:
            results = {name: _fresh_process(name, batch, device, args.repeats, args.threads) for name in OPS}
            ours, ref = results["shift_and_sum"], results["unfold"]
            print(f"| {device} | {batch} | {ref['time_s']:.3f} | {ours['time_s']:.3f} | "
                  f"{ref['time_s'] / ours['time_s']:.1f}× | {ref['peak_mb']:.0f} | {ours['peak_mb']:.0f} | "
                  f"{ref['peak_mb'] / max(ours['peak_mb'], 1e-9):.1f}× | {max_difference(batch, device):.1e} |")


if __name__ == "__main__":
    main()
