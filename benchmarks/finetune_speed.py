"""Where the time of a fine-tune goes: the `quick` preset on two corrected 1000² H&E images.

The GUI's correct-and-retrain loop, timed stage by stage: the built-in ``nuclei`` model,
MoNuSeg ``TCGA-21-5784`` and ``TCGA-21-5786`` at full size (1000×1000, 40×, the model's
own scale), their reference instances as the user's corrections and the model's own
labels as ``predictions=`` (what the Fine-tune dock passes), then::

    finetune(model, images, labels, finetune_config(model, "quick"), predictions=predictions)

Prints the CPU model and its vector flags, torch's thread count, whether bf16 autocast runs
natively, the 1-minute load average, the total wall time and a per-stage table (wall
seconds, share of the fine-tune, process CPU seconds, calls):

* preparing pairs and edit maps: checks, instance ids, the working grid, edited pixels,
  loss-weight maps and the crop to the edits (`_prepare_pairs`, `_focus_on_edits`);
* model snapshot: the copy of the weights a failed or cancelled run is rolled back to;
* fit setup: moving the model to channels_last, the L2-SP anchor copy, building AdamW;
* precomputed targets (when the dataset computes them once, see `SegmentationDataset`);
* data: one item per patch (scale-crop, flips, colour/stain jitter: ``augment``; boundary,
  HoVer and type targets: ``targets``) and batching (the DataLoader's collate);
* forward, loss, backward, gradient clipping, optimizer (AdamW step), L2-SP penalty, and the
  rest of the step (``zero_grad``, the LR scheduler, the step's bookkeeping);
* the rest (end of `fit`, restoring modes and flags).

Validation and early stopping: the presets have none (``val_every=0``).

Usage::

    python benchmarks/finetune_speed.py                      # 2 threads, the quick preset
    python benchmarks/finetune_speed.py --set amp=false      # a preset field overridden
    python benchmarks/finetune_speed.py --also amp=false     # then the same fine-tune in float32
    python benchmarks/finetune_speed.py --profile /tmp/ft.prof --json /tmp/ft.json

The stage timers wrap library functions by name (no change to the library); the numbers
are the same run's, so the total is the fine-tune's own wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune import MONUSEG_WITH_INSTANCES, load, load_average, predict  # noqa: E402
from resample import cpu_line  # noqa: E402  (the benchmarks' one CPU description)

DEFAULT_IMAGES = ("TCGA-21-5784-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1")
TARGET_S = 15.0  # issue 24: quick fine-tune of two 1000² H&E images on the 2-core CPU, idle


class Timers:
    """Wall and process-CPU seconds per stage; nested stages are subtracted from their parent."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list] = []  # [name, wall start, cpu start, child wall, child cpu]

    @contextlib.contextmanager
    def stage(self, name: str):
        frame = [name, time.perf_counter(), time.process_time(), 0.0, 0.0]
        self._stack.append(frame)
        try:
            yield
        finally:
            self._stack.pop()
            wall, cpu = time.perf_counter() - frame[1], time.process_time() - frame[2]
            self.wall[name] += wall - frame[3]
            self.cpu[name] += cpu - frame[4]
            self.calls[name] += 1
            if self._stack:
                self._stack[-1][3] += wall
                self._stack[-1][4] += cpu

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            with self.stage(name):
                return function(*args, **kwargs)
        timed.__wrapped__ = function
        return timed


@contextlib.contextmanager
def patched(pairs):
    """Sets (object, attribute, value) for the block, restoring the old values after."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in pairs]
    try:
        for owner, name, value in pairs:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def instrument(timers: Timers):
    """The (owner, attribute, timed replacement) of every stage the library exposes."""
    import importlib

    import torch

    datasets = importlib.import_module("napari_sgdc.data.datasets")
    finetune_module = importlib.import_module("napari_sgdc.train.finetune")  # the modules, not the functions
    fit_module = importlib.import_module("napari_sgdc.train.fit")

    targets = []

    def add(owner, name, stage):
        if hasattr(owner, name):
            targets.append((owner, name, timers.wrap(stage, getattr(owner, name))))

    for name in ("_check_predictions", "_check_tables", "_prepare_pairs", "_check_mpps", "_to_working_size",
                 "_focus_on_edits", "converted_types", "SegmentationDataset"):
        add(finetune_module, name, "pairs + edit maps")
    add(datasets, "precomputed_targets", "targets precomputed once")  # after issue 24
    add(datasets, "augment_pair", "data: augment")
    for name in ("boundary_target", "instance_map_target", "_type_target", "crop_targets"):
        add(datasets, name, "data: targets")
    add(fit_module, "forward", "forward")
    add(fit_module, "total_loss", "loss")
    add(fit_module, "_l2sp_penalty", "L2-SP penalty")
    add(fit_module, "_add_l2sp_gradient", "L2-SP penalty")
    add(torch.Tensor, "backward", "backward")
    add(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
    add(torch.optim.AdamW, "step", "optimizer (AdamW step)")
    add(fit_module, "_train_step", "step: rest (zero_grad, scheduler)")

    snapshot = finetune_module._restore_on_failure

    @contextlib.contextmanager
    def timed_snapshot(model):
        with timers.stage("model snapshot (rollback copy)"):
            manager = snapshot(model)
            rollback = manager.__enter__()
        try:
            yield rollback
        except BaseException:
            if not manager.__exit__(*sys.exc_info()):
                raise
        else:
            manager.__exit__(None, None, None)

    targets.append((finetune_module, "_restore_on_failure", timed_snapshot))

    original_fit = fit_module.fit

    def timed_fit(*args, **kwargs):
        timers.fit_started = time.perf_counter()
        timers.fit_cpu = time.process_time()
        return original_fit(*args, **kwargs)

    targets.append((finetune_module, "fit", timed_fit))

    original_run_epoch = fit_module._run_epoch

    def timed_run_epoch(*args, **kwargs):
        if not hasattr(timers, "setup_wall"):  # fit start → the first epoch: setup
            timers.setup_wall = time.perf_counter() - timers.fit_started
            timers.setup_cpu = time.process_time() - timers.fit_cpu
        return original_run_epoch(*args, **kwargs)

    targets.append((fit_module, "_run_epoch", timed_run_epoch))

    original_loader = fit_module.DataLoader

    class TimedLoader:
        def __init__(self, *args, **kwargs):
            self.loader = original_loader(*args, **kwargs)

        def __iter__(self):
            iterator = iter(self.loader)
            while True:
                with timers.stage("data: batching (collate)"):
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        return
                yield batch

    targets.append((fit_module, "DataLoader", TimedLoader))
    return targets


def override(cfg, settings: list[str]):
    """`cfg` with ``field=value`` settings (ints, floats, true/false)."""
    values = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        current = getattr(cfg, name)
        if isinstance(current, bool):
            values[name] = text.lower() in ("1", "true", "yes", "on")
        else:
            values[name] = type(current)(text)
    return dataclasses.replace(cfg, **values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="nuclei")
    parser.add_argument("--preset", default="quick")
    parser.add_argument("--images", default=",".join(DEFAULT_IMAGES), help="comma-separated MoNuSeg image names")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the preset (e.g. amp=false); repeatable")
    parser.add_argument("--also", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                        help="one more fine-tune, from the same start, with these fields changed as well (e.g. "
                             "amp=false: the same run in float32, back to back); repeatable")
    parser.add_argument("--repeats", type=int, default=1, help="fine-tunes from the same start (tables of each)")
    parser.add_argument("--profile", default=None, help="also write a cProfile of the (last) fine-tune here")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    args = parser.parse_args(argv)

    import torch

    from napari_sgdc.checkpoints import load_model
    from napari_sgdc.device import bf16_supported
    from napari_sgdc.train import finetune
    from napari_sgdc.train.finetune import finetune_config

    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    wanted = args.images.split(",")
    samples = {s.name: s for s in load("monuseg", "train", "instance") if s.name in MONUSEG_WITH_INSTANCES}
    missing = [name for name in wanted if name not in samples]
    if missing:
        print(f"error: no MoNuSeg instance map for {', '.join(missing)}", file=sys.stderr)
        return 2
    images = [samples[name].image for name in wanted]
    labels = [samples[name].mask for name in wanted]  # the reference instances: the user's corrections
    predictions = [predict(model, image) for image in images]  # what the labels layer started from
    cfg = override(finetune_config(model, args.preset), args.set)
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    print(f"# CPU: {cpu_line()}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 native: "
          f"{'yes' if bf16_supported('cpu') else 'no'}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
    print(f"# {args.model} on {', '.join(f'{n} {i.shape[0]}x{i.shape[1]}' for n, i in zip(wanted, images))}; "
          f"preset {args.preset}: {cfg.max_steps} steps, batch {cfg.batch_size}, crop {cfg.crop_size}, "
          f"amp {cfg.amp}, l2sp {cfg.l2sp:g}, freeze_encoder {cfg.freeze_encoder}"
          + (f"; overrides {', '.join(args.set)}" if args.set else ""))

    plans = [(args.set, cfg)] * args.repeats + [
        (args.set + also.split(","), override(cfg, also.split(","))) for also in args.also]
    runs = []
    for repeat, (settings, cfg) in enumerate(plans):
        model.load_state_dict(state)
        timers = Timers()
        profiler = None
        if args.profile and repeat == len(plans) - 1:
            import cProfile
            profiler = cProfile.Profile()
        load_before = load_average()
        with patched(instrument(timers)):
            if profiler:
                profiler.enable()
            started, cpu_started = time.perf_counter(), time.process_time()
            history = finetune(model, images, labels, cfg, predictions=predictions)
            total, total_cpu = time.perf_counter() - started, time.process_time() - cpu_started
            if profiler:
                profiler.disable()
                profiler.dump_stats(args.profile)
        load_after = load_average()
        stages = dict(timers.wall)
        cpu = dict(timers.cpu)
        # fit setup: fit's start → its first epoch, less what the stages inside it took
        setup = getattr(timers, "setup_wall", 0.0)
        stages["fit setup (channels_last, L2-SP anchor, AdamW)"] = setup
        cpu["fit setup (channels_last, L2-SP anchor, AdamW)"] = getattr(timers, "setup_cpu", 0.0)
        stages["rest (end of fit, restoring modes)"] = total - sum(stages.values())
        cpu["rest (end of fit, restoring modes)"] = total_cpu - sum(cpu.values())
        runs.append({"overrides": settings, "amp": cfg.amp, "total_s": total, "total_cpu_s": total_cpu, "steps": history.steps,
                     "loss_first": history.losses[0], "loss_last": history.losses[-1],
                     "load": [load_before, load_after], "stages": stages, "cpu": cpu,
                     "calls": dict(timers.calls)})
        order = ["pairs + edit maps", "model snapshot (rollback copy)",
                 "fit setup (channels_last, L2-SP anchor, AdamW)", "targets precomputed once", "data: augment",
                 "data: targets", "data: batching (collate)", "forward", "loss", "backward", "gradient clipping",
                 "optimizer (AdamW step)", "L2-SP penalty", "step: rest (zero_grad, scheduler)",
                 "rest (end of fit, restoring modes)"]
        print(f"\nrun {repeat + 1} ({', '.join(settings) or 'the preset'}; bf16 autocast "
              f"{'on' if cfg.amp and bf16_supported('cpu') else 'off'}): {history.steps} steps, **{total:.2f} s** wall ({total_cpu:.1f} s CPU), "
              f"load {load_before:.2f} → {load_after:.2f}, loss {history.losses[0]:.4f} → {history.losses[-1]:.4f}, "
              f"target ≤ {TARGET_S:.0f} s idle: {'met' if total <= TARGET_S else 'missed'}\n")
        print("| stage | wall (s) | share | CPU (s) | calls |")
        print("|---|---|---|---|---|")
        for name in order + sorted(set(stages) - set(order)):
            if name in stages and (stages[name] > 0.0005 or timers.calls.get(name)):
                print(f"| {name} | {stages[name]:.2f} | {100 * stages[name] / total:.1f} % | {cpu[name]:.2f} | "
                      f"{timers.calls.get(name, '')} |")
        print(f"| **total** | **{total:.2f}** | 100 % | {total_cpu:.2f} | |")
    model.load_state_dict(state)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "images": wanted, "preset": args.preset, "overrides": args.set,
            "config": dataclasses.asdict(plans[0][1]), "threads": args.threads, "cpu": cpu_line(),
            "torch": torch.__version__, "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
