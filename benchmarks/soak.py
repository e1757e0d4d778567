"""Soak test: many `segment()` calls and fine-tune + undo cycles in one process; does memory grow?

What a long GUI session does, headless and on the CPU:

1. Load the built-in ``dermoscopy`` model and the shipped dermoscopy sample
   (`napari_sgdc.samples.read_sample`, 512×385 uint8 RGB).
2. Warm up: a few `segment()` calls and one fine-tune + undo (the first calls allocate
   caches that are kept for the life of the process; they are not a leak).
3. Run ``--segments`` `segment()` calls with ``--finetunes`` fine-tunes spread evenly between
   them. Each fine-tune is `napari_sgdc.train.finetune(model, [image], [mask], preset)` on
   the model's own mask of the sample, followed by an undo: the state_dict snapshot taken
   before is loaded back (``model.load_state_dict(snapshot)``, as the GUI's *Undo fine-tune*).
   The undo is checked to be bit-exact (state_dict values), and one extra `segment()` after
   every undo (not counted in ``--segments``) must equal the one after the first undo (no drift). Its largest difference from the
   segmentation before any fine-tune is reported too: `fit` leaves the weights in the
   channels-last memory format, which `load_state_dict` keeps, so the convolutions may
   round differently (about 1e-7) after the first fine-tune even though every value is equal.
4. Resident memory (VmRSS from ``/proc/self/status``; VmHWM for the peak) is recorded
   before the warm-up, at the start (after it), after every fine-tune + undo, and at the end.

Prints a markdown table and the growth from start to end in percent (target ≤ 5 %). The
load average (``/proc/loadavg``) before and after is printed too: other processes on the
machine slow the run down but do not change this process's memory.

Usage::

    python benchmarks/soak.py                                    # 500 segments, 20 fine-tunes, 2 threads
    python benchmarks/soak.py --segments 20 --finetunes 2        # a quick check
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

TARGET_GROWTH_PCT = 5.0


def memory_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB, from /proc/self/status."""
    values = {}
    with open("/proc/self/status") as stream:
        for line in stream:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024.0  # kB -> MiB
    return values["VmRSS"], values["VmHWM"]


def load_average() -> str:
    with open("/proc/loadavg") as stream:
        return " ".join(stream.read().split()[:3])


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An exact copy of the weights and buffers (as the GUI's ModelState.snapshot)."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def same_state(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segments", type=int, default=500, help="segment() calls after the warm-up (default: 500)")
    parser.add_argument("--finetunes", type=int, default=20, help="fine-tune + undo cycles (default: 20)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--model", default="dermoscopy", help="built-in model or checkpoint (default: dermoscopy)")
    parser.add_argument("--preset", default="quick", help="fine-tuning preset (default: quick)")
    parser.add_argument("--warmup", type=int, default=3, help="segment() calls in the warm-up (default: 3)")
    parser.add_argument("--json", type=Path, help="also write the measurements as JSON")
    args = parser.parse_args(argv)
    from napari_sgdc.device import cpu_description

    print(f"# CPU: {cpu_description()}", flush=True)
    if args.segments < 1 or args.finetunes < 0 or args.threads < 1 or args.warmup < 0:
        parser.error("--segments and --threads must be >= 1, --finetunes and --warmup >= 0")

    from napari_sgdc import load_model, segment
    from napari_sgdc.samples import read_sample
    from napari_sgdc.train import finetune

    torch.set_num_threads(args.threads)
    load_before = load_average()
    started = time.perf_counter()
    rows: list[dict] = []

    def record(label: str, segments: int, finetunes: int) -> None:
        rss, peak = memory_mb()
        rows.append({"point": label, "segments": segments, "finetunes": finetunes, "rss_mb": rss,
                     "peak_mb": peak, "elapsed_s": time.perf_counter() - started})
        print(f"{label:<22} segments {segments:>4} finetunes {finetunes:>3} RSS {rss:8.1f} MiB "
              f"peak {peak:8.1f} MiB  {rows[-1]['elapsed_s']:7.1f} s", file=sys.stderr, flush=True)

    model = load_model(args.model, device="cpu")
    image = read_sample("dermoscopy")
    record("before warm-up", 0, 0)

    reference = segment(model, image)
    mask = reference.mask.copy()  # the model's own mask stands in for the user's correction
    if not mask.any():
        mask[mask.shape[0] // 4: 3 * mask.shape[0] // 4, mask.shape[1] // 4: 3 * mask.shape[1] // 4] = True
    for _ in range(max(0, args.warmup - 1)):
        segment(model, image)
    undo_exact, after_undo_same, finetune_times, segment_times = True, True, [], []
    after_undo: list[np.ndarray] = []  # the probability after the first undo
    max_diff = 0.0  # largest |probability after an undo - probability before any fine-tune|

    def finetune_and_undo() -> None:
        nonlocal undo_exact, after_undo_same, max_diff
        saved = snapshot(model)
        tick = time.perf_counter()
        finetune(model, [image], [mask], args.preset)
        finetune_times.append(time.perf_counter() - tick)
        model.load_state_dict(saved, strict=True)  # the GUI's "Undo fine-tune"
        undo_exact &= same_state(model, saved)
        del saved
        probability = segment(model, image).probability
        max_diff = max(max_diff, float(np.abs(probability - reference.probability).max()))
        if not after_undo:
            after_undo.append(probability)
        after_undo_same &= bool(np.array_equal(probability, after_undo[0]))

    if args.finetunes:
        finetune_and_undo()  # warm-up fine-tune: the optimiser and autograd allocate their caches once
    gc.collect()
    record("start (after warm-up)", 0, 0)
    start_rss = rows[-1]["rss_mb"]

    # fine-tunes spread evenly: the k-th (0-based) runs after segment call round((k + 1) * S / (M + 1))
    schedule = Counter(round((k + 1) * args.segments / (args.finetunes + 1)) for k in range(args.finetunes))
    finetunes_done = 0
    for index in range(args.segments + 1):
        if index:
            tick = time.perf_counter()
            segment(model, image)
            segment_times.append(time.perf_counter() - tick)
        for _ in range(schedule[index]):
            finetune_and_undo()
            finetunes_done += 1
            record(f"fine-tune {finetunes_done}", index, finetunes_done)
    gc.collect()
    record("end", args.segments, finetunes_done)
    load_after = load_average()

    end_rss = rows[-1]["rss_mb"]
    growth = 100.0 * (end_rss - start_rss) / start_rss
    met = growth <= TARGET_GROWTH_PCT
    print(f"\n`python benchmarks/soak.py --segments {args.segments} --finetunes {args.finetunes} "
          f"--threads {args.threads}` — {datetime.date.today().isoformat()}, torch {torch.__version__}, "
          f"{platform.machine()}, model `{args.model}`, sample {image.shape[1]}×{image.shape[0]}, "
          f"preset `{args.preset}`\n")
    print("| point | segment calls | fine-tunes + undo | RSS (MiB) | vs start | peak RSS (MiB) | elapsed (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        change = "" if row["point"] == "before warm-up" else f"{100.0 * (row['rss_mb'] - start_rss) / start_rss:+.1f} %"
        print(f"| {row['point']} | {row['segments']} | {row['finetunes']} | {row['rss_mb']:.1f} | {change} | "
              f"{row['peak_mb']:.1f} | {row['elapsed_s']:.0f} |")
    median_segment = float(np.median(segment_times)) if segment_times else float("nan")
    median_finetune = float(np.median(finetune_times)) if finetune_times else float("nan")
    print(f"\n- RSS growth from start to end: **{growth:+.2f} %** ({start_rss:.1f} → {end_rss:.1f} MiB); "
          f"target ≤ {TARGET_GROWTH_PCT:g} %: {'met' if met else 'NOT met'}.")
    print(f"- Undo bit-exact every time: {'yes' if undo_exact else 'NO'}; segmentation after every undo "
          f"identical to the one after the first undo: {'yes' if after_undo_same else 'NO'}; largest difference "
          f"from the segmentation before any fine-tune: {max_diff:.1e}.")
    print(f"- Median segment() {median_segment:.3f} s, median fine-tune {median_finetune:.1f} s "
          f"({len(finetune_times)} incl. the warm-up one), total {rows[-1]['elapsed_s']:.0f} s.")
    print(f"- Load average (1, 5, 15 min) before: {load_before}; after: {load_after} "
          f"(2-core machine; {args.threads} torch threads).")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "growth_pct": growth, "target_met": met,
                                         "undo_exact": undo_exact, "after_undo_same": after_undo_same,
                                         "max_diff_vs_before_finetune": max_diff,
                                         "load_before": load_before, "load_after": load_after,
                                         "median_segment_s": median_segment, "median_finetune_s": median_finetune},
                                        indent=2))
    return 0 if met and undo_exact and after_undo_same else 1


if __name__ == "__main__":
    sys.exit(main())
