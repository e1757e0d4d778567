"""The ``napari-sgdc`` command line: a parser plus dispatch for ``predict``, ``train``, ``evaluate`` and ``tune``.

Examples::

    napari-sgdc predict --model dermoscopy --out results/ images/
    napari-sgdc train --data ../shared/data/ph2 --layout ph2 --out runs/ph2/model.safetensors --epochs 30
    napari-sgdc evaluate --model runs/ph2/model.safetensors --layout ph2 --data ../shared/data/ph2 --split test
    napari-sgdc evaluate --model nuclei --images imgs/ --masks masks/ --instances inst/ --csv scores.csv
    napari-sgdc export --model nuclei --format bioimageio --out nuclei.zip

Each subcommand has one parser function (``_add_*_parser``) and one thin handler
(``_run_*``) that turns the flags into a call of a library function:
`napari_sgdc.predict`, `napari_sgdc.train.train_from_config`, `napari_sgdc.evaluation`
and `napari_sgdc.train.tune_checkpoint`. Every command prints progress on stderr. Errors
about one input print one line naming the file; the other inputs still run and the exit
code is 1 at the end. Heavy modules (torch, the model) are imported inside the handlers
so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, Sequence

from .deprecation import REMOVED_IN
from .grid import DEFAULT_MARGIN, DEFAULT_TILE

__all__ = ["main", "build_parser"]

PROG = "napari-sgdc"
COMMANDS = ("predict", "train", "evaluate", "tune", "export")


def _error_line(message: Any) -> str:
    """One line of text (no newlines) for an error message."""
    return " ".join(str(message).split())


def _reporter(command: str):
    """A function that prints one error line of `command` on stderr without breaking a tqdm bar."""
    from tqdm import tqdm

    def report(message: Any) -> None:
        tqdm.write(f"{PROG} {command}: error: {_error_line(message)}", file=sys.stderr)

    return report


def _log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------- argument types


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return value


def _tolerance(text: str) -> float:
    """argparse type: a number of pixels >= 0 (not NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of pixels >= 0, got {text!r}") from None
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a number of pixels >= 0, got {text!r}")
    return value


def _parse_roi(text: str) -> tuple[int, int, int, int]:
    """argparse type: X,Y,W,H in level-0 pixels with W, H > 0."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise argparse.ArgumentTypeError(f"expected X,Y,W,H in level-0 pixels with W, H > 0, got {text!r}")
    return values


# --------------------------------------------------------------------------- parsers


class _Renamed(argparse.Action):
    """An old flag name: stores into the new flag's dest and says so on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"napari-sgdc: warning: {option_string} is deprecated and will be removed in napari-sgdc "
              f"{REMOVED_IN}; use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_inference_options(parser: argparse.ArgumentParser) -> None:
    from .device import DEVICES

    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where to run (default: auto = CUDA, then MPS, then CPU)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="mask probability threshold (default: the model's; 0.5 for models without one)")
    parser.add_argument("--tile", type=int, default=512,
                        help="tile size in pixels for large images (>= 64, rounded up to a multiple of 32), "
                             "0 = whole image at once (default: 512)")
    parser.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction (default: 0.25)")
    parser.add_argument("--split-level", type=float, default=None,
                        help="instance split level: seeds grow where the boundary (or separation map) is below "
                             "it (default: the model's, tuned on validation; 0.5 for models without one)")
    parser.add_argument("--boundary-threshold", type=float, dest="split_level", action=_Renamed,
                        help=argparse.SUPPRESS)  # the old name of --split-level
    parser.add_argument("--min-size", type=int, default=None,
                        help="smallest object kept, in pixels (default: the model's; 20 for models without one)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the 8 flips and 90-degree rotations (about 8x the time)")
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast: about 1.5x faster on GPUs and CPUs with native bf16 (AVX512-BF16, AMX), "
                             "probabilities within about 0.005; ignored elsewhere")
    _add_engine_option(parser)


def _add_engine_option(parser: argparse.ArgumentParser) -> None:
    from .engines import ENGINES

    parser.add_argument("--engine", default="auto", choices=ENGINES,
                        help="what runs the network (default: auto = the engine measured fastest on this CPU by "
                             "benchmarks/engines.py --save-auto, else torch; docs/performance.md)")


def _add_predict_parser(commands) -> None:
    predict = commands.add_parser(
        "predict", help="segment image files or folders",
        description="Segment images and write, for each input stem S: S_mask.png (uint8 0/255), S_prob.tif "
                    "(float32), S_boundary.tif (float32) and, for instance models, S_labels.tif (uint16; uint32 "
                    "when an image has more than 65,535 objects; a slide's labels/nuclei are uint32). "
                    "Each page of a multi-page TIFF is its own image: S_p0_mask.png, S_p1_mask.png and so on. "
                    "Existing files are never replaced unless --overwrite is given; inputs whose outputs would "
                    "collide (same stem) are refused up front.",
    )
    predict.add_argument("--model", required=True, help="built-in model name (e.g. dermoscopy, nuclei) or checkpoint path")
    predict.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    predict.add_argument("--overwrite", action="store_true", help="replace existing output files")
    predict.add_argument("--uncertainty", action="store_true",
                         help="also write S_uncertainty.tif, per-pixel uncertainty in [0, 1] (no extra cost)")
    _add_inference_options(predict)
    predict.add_argument("--mpp", type=float,
                         help="µm per pixel of the inputs, resampled to the model's scale (e.g. 0.5 for a 20x image "
                              "and the 40x nuclei model); for slides it overrides their metadata")
    slides = predict.add_argument_group(
        "whole slides", "Slide inputs (.svs .ndpi .mrxs .ome.tif, and tiled pyramidal .tif) are segmented tile by "
                        "tile into S.ome.zarr, with the object table S_objects.csv and QuPath GeoJSON "
                        "S_objects.geojson (docs/wholeslide.md).")
    slides.add_argument("--roi", type=_parse_roi, metavar="X,Y,W,H",
                        help="segment only this box, in level-0 slide pixels")
    slides.add_argument("--slide-tile", type=int, default=DEFAULT_TILE,
                        help=f"slide tile core (and chunk) size in pixels, a multiple of 32 (default: {DEFAULT_TILE})")
    slides.add_argument("--margin", type=int, default=DEFAULT_MARGIN,
                        help=f"context around each slide tile, a multiple of 32 (default: {DEFAULT_MARGIN} = 16 µm "
                             "at 40x)")
    slides.add_argument("--workers", type=int, default=0,
                        help="run slide tiles on a local Dask cluster of N processes (needs distributed)")
    slides.add_argument("--scheduler", metavar="ADDRESS",
                        help="run slide tiles on an existing Dask cluster, e.g. tcp://10.0.0.5:8786")
    slides.add_argument("--resume", action="store_true",
                        help="continue an interrupted slide run into its store (same settings and model weights; "
                             "a finished store: nothing to do)")
    slides.add_argument("--tissue", choices=("auto", "none"), default="auto",
                        help="auto: skip tiles without tissue (colour or, on gray slides, darkness); none: run every "
                             "tile (default: auto)")
    slides.add_argument("--yes", action="store_true",
                        help="run a slide plan that looks absurd (over 10,000 tiles or 24 h, or a slide enlarged "
                             "over 4x) without asking")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", type=Path,
                         help="image files or folders of images (.jpg .png .tif .bmp), or slide files")


def _add_train_parser(commands) -> None:
    from .config import INSTANCE_MAPS, TASKS
    from .data.datasets import LAYOUTS
    from .device import DEVICES
    from .model.registry import BLOCK_TYPES, ENCODERS

    train = commands.add_parser(
        "train", help="train a model on a dataset",
        description="Train an SGDC segmenter and save the best checkpoint (safetensors) at --out.",
    )
    train.add_argument("--data", required=True, type=Path, help="dataset folder")
    train.add_argument("--layout", required=True, choices=LAYOUTS, help="dataset layout")
    train.add_argument("--out", required=True, type=Path, help="checkpoint path (.safetensors)")
    train.add_argument("--config", type=Path, help="optional YAML with 'model:' and 'train:' sections "
                                                   "(ModelConfig/TrainConfig fields); flags override it")
    train.add_argument("--epochs", type=int, help="number of epochs (default: 30)")
    train.add_argument("--max-images", type=_count, help="train on the first N training images only (0 = all)")
    train.add_argument("--train-splits", default="train",
                       help="comma-separated splits to train on (default: train; e.g. train,val)")
    train.add_argument("--val-split", default="val", help="split used for validation, or 'none' (default: val)")
    train.add_argument("--also", nargs=2, action="append", default=[], metavar=("LAYOUT", "DIR"),
                       help="add the train split of another dataset (repeatable), e.g. --also monuseg data/monuseg")
    train.add_argument("--also-val", nargs=2, action="append", default=[], metavar=("LAYOUT", "DIR"),
                       help="add the val split of another dataset to validation (repeatable), "
                            "e.g. --also-val ph2 data/ph2")
    train.add_argument("--max-val-images", type=_count, help="validate on the first N validation images only")
    train.add_argument("--device", choices=DEVICES, help="where to train (default: auto)")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                       help="continue an interrupted run (from --out, or from CKPT)")
    train.add_argument("--encoder", choices=tuple(ENCODERS), help="encoder (default: efficientnet_lite0; mini = tiny test net)")
    train.add_argument("--no-pretrained", action="store_true", help="do not load ImageNet encoder weights")
    train.add_argument("--block", choices=tuple(BLOCK_TYPES), help="guided decoder block (default: sgdc)")
    train.add_argument("--no-edge-supervision", action="store_true", help="do not supervise the SGE edge output")
    train.add_argument("--task", choices=TASKS, help="semantic or instance (default: from the layout / masks)")
    train.add_argument("--instance-map", choices=INSTANCE_MAPS,
                       help="how an instance model splits touching objects (default: boundary)")
    train.add_argument("--seed", type=int, help="random seed (default: 0)")
    train.add_argument("--crop-size", type=int, help="training crop size, a multiple of 32 (default: 256)")
    train.add_argument("--batch-size", type=int, help="images per step (default: 8)")
    train.add_argument("--steps-per-epoch", type=int, help="fixed epoch length in steps (default: one pass)")
    train.add_argument("--lr", type=float, help="decoder learning rate (the encoder gets 0.3x)")
    train.add_argument("--amp", action="store_true",
                       help="bf16 autocast where the device runs bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX)")


def _add_evaluate_parser(commands) -> None:
    from .data.datasets import LAYOUTS, SPLITS

    evaluate = commands.add_parser(
        "evaluate", help="score a model against reference masks",
        description="Score a model: IoU, Dice, HD95 (pixels) and boundary F1, plus AJI and object F1 at IoU 0.5 "
                    "with instance labels (and, for models with nucleus types, F_d, F_c and PQ per type and mPQ, pooled), "
                    "printed as mean ± std; per-image values go to a CSV. Use either "
                    "--images/--masks[/--instances] folders (labels matched by file stem) or --layout/--data/--split.",
    )
    evaluate.add_argument("--model", required=True, help="built-in model name or checkpoint path")
    evaluate.add_argument("--images", type=Path, help="folder of images")
    evaluate.add_argument("--masks", type=Path, help="folder of reference masks (0/255 or labels; same stems)")
    evaluate.add_argument("--instances", type=Path, help="folder of reference instance maps (adds AJI and F1)")
    evaluate.add_argument("--layout", choices=LAYOUTS, help="dataset layout")
    evaluate.add_argument("--data", type=Path, help="dataset folder (with --layout)")
    evaluate.add_argument("--split", default="test", choices=SPLITS, help="split (with --layout; default: test)")
    evaluate.add_argument("--max-images", type=_count, help="evaluate the first N images only (0 = all)")
    evaluate.add_argument("--csv", type=Path, default=Path("evaluation.csv"),
                          help="per-image CSV (default: ./evaluation.csv); never replaced without --overwrite")
    evaluate.add_argument("--overwrite", action="store_true", help="replace the --csv file if it exists")
    evaluate.add_argument("--tolerance", type=_tolerance, default=2.0,
                          help="boundary F1 tolerance in pixels, >= 0 (default: 2)")
    _add_inference_options(evaluate)


def _add_tune_parser(commands) -> None:
    from .data.datasets import LAYOUTS, SPLITS
    from .device import DEVICES

    tune = commands.add_parser(
        "tune", help="tune an instance model's post-processing defaults on validation images",
        description="Search the mask threshold, separation level and smallest-object size (30 px or more) with "
                    "the best mean AJI and PQ together, (AJI + PQ) / 2, on validation images, and write a copy of the checkpoint that carries them as its "
                    "defaults (segment, predict, the sliders and whole slides use them). The input checkpoint is "
                    "never changed. `train` does this itself at the end for instance models.",
    )
    tune.add_argument("--model", required=True, help="checkpoint path of an instance model")
    tune.add_argument("--data", required=True, type=Path, help="dataset folder")
    tune.add_argument("--layout", required=True, choices=LAYOUTS, help="dataset layout")
    tune.add_argument("--split", default="val", choices=SPLITS, help="split to tune on (default: val)")
    tune.add_argument("--also-val", nargs=2, action="append", default=[], metavar=("LAYOUT", "DIR"),
                      help="add the val split of another dataset (repeatable)")
    tune.add_argument("--max-images", type=_count, help="tune on the first N images only (0 = all)")
    tune.add_argument("--out", required=True, type=Path, help="where to write the tuned checkpoint (.safetensors)")
    tune.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    tune.add_argument("--device", default="auto", choices=DEVICES, help="where to run (default: auto)")


def _add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="write a model as a BioImage Model Zoo (bioimage.io) package",
        description="Write a built-in model, a checkpoint (a fine-tuned one too) or a package as a bioimage.io "
                    "model package (.zip): TorchScript, ONNX and PyTorch weights, test tensors, README and cover. "
                    "Needs the export extra (pip install 'napari-sgdc[export]').",
    )
    export.add_argument("--model", required=True, help="built-in model name or checkpoint path")
    export.add_argument("--format", default="bioimageio", choices=("bioimageio",), help="package format")
    export.add_argument("--out", required=True, type=Path, help="the package to write (.zip)")
    export.add_argument("--name", help="the package's name (default: from --model)")
    export.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of all commands."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment dermoscopy and H&E nuclei images with a Structure-Guided Dynamic Convolution network.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{" + ",".join(COMMANDS) + "}")
    commands.required = True
    for add in (_add_predict_parser, _add_train_parser, _add_evaluate_parser, _add_tune_parser, _add_export_parser):
        add(commands)
    return parser


# --------------------------------------------------------------------------- handlers


def _postprocess_options(args, config=None):
    """The one `PostprocessOptions` of a predict or evaluate run (validated): the flags,
    and the model's defaults (`config`) where a flag is not given."""
    from .postprocess import PostprocessOptions

    return PostprocessOptions.for_model(config, threshold=args.threshold, split_level=args.split_level,
                                        min_size=args.min_size)


def _resume_command() -> str:
    """This predict command as typed, with --resume instead of --overwrite (the line after an interrupt)."""
    import shlex

    words = [word for word in sys.argv[1:] if word != "--overwrite"]
    if "--resume" not in words:
        words.insert(words.index("predict") + 1 if "predict" in words else 0, "--resume")
    return shlex.join([PROG, *words])


def _ask(question: str) -> bool:
    """Asks on the terminal whether to go on (absurd slide plans)."""
    try:
        return input(f"{question}. Run it anyway? [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def _run_predict(args) -> int:
    from tqdm import tqdm

    from .checkpoints import load_model
    from .predict import cancel_on_signals, check_outputs, collect_inputs, predict_files, predict_slides

    report = _reporter("predict")
    _postprocess_options(args)  # bad flags fail before any work
    files, slides, failures = collect_inputs(args.inputs, report)
    if not files and not slides:
        report("no input images")
        return 1
    model = load_model(args.model, device=args.device)
    options = _postprocess_options(args, model.config)
    if slides and files:  # an image and a slide of one stem would both write S_objects.csv: refused before any work
        check_outputs(files, args.out, instances=model.config.is_instance, uncertainty=args.uncertainty,
                      overwrite=args.overwrite, types=model.config.has_types, slides=slides)
    if slides:
        cancel = threading.Event()
        with cancel_on_signals(cancel, _log):
            failures += predict_slides(model, slides, args.out, options, model_source=args.model, roi=args.roi,
                                       mpp=args.mpp, tile=args.slide_tile, margin=args.margin, workers=args.workers,
                                       scheduler=args.scheduler, resume=args.resume, overwrite=args.overwrite,
                                       amp=args.amp, tta=args.tta, uncertainty=args.uncertainty, on_error=report,
                                       tissue=args.tissue, yes=args.yes, confirm=_ask if sys.stdin.isatty() else None,
                                       cancel=cancel, resume_command=_resume_command(), engine=args.engine)
        if cancel.is_set():
            return 130
        if not files:
            return 1 if failures else 0
    with tqdm(total=len(files), desc="predict", unit="image", file=sys.stderr) as bar:
        def on_progress(done: int, total: int, status: str) -> None:
            bar.total, bar.n = total, done  # a multi-page TIFF counts one image per page
            bar.set_postfix_str(status)

        summary = predict_files(model, files, args.out, options, overwrite=args.overwrite, tile=args.tile,
                                overlap=args.overlap, tta=args.tta, mpp=args.mpp, amp=args.amp,
                                uncertainty=args.uncertainty, progress=on_progress, on_error=report,
                                engine=args.engine)
    print(f"wrote results for {summary.done} of {summary.total} image(s) to {args.out}", file=sys.stderr)
    return 1 if failures or summary.failures else 0


def _train_overrides(args) -> tuple[dict, dict]:
    """The (ModelConfig, TrainConfig) fields the flags set."""
    model = {"encoder": args.encoder, "block": args.block, "instance_map": args.instance_map}
    model = {key: value for key, value in model.items() if value}
    model.update({key: False for key, flag in (("edge_supervision", args.no_edge_supervision),
                                                ("pretrained", args.no_pretrained)) if flag})
    train = {"epochs": args.epochs, "seed": args.seed, "crop_size": args.crop_size, "batch_size": args.batch_size,
             "steps_per_epoch": args.steps_per_epoch, "device": args.device}
    train = {key: value for key, value in train.items() if value is not None}
    if args.lr is not None:
        train.update(lr_decoder=args.lr, lr_encoder=args.lr * 0.3)
    if args.amp:
        train["amp"] = True
    return model, train


class _TrainProgress:
    """The train command's stderr: a step bar, epoch lines, and whether progress is saved."""

    def __init__(self, saved: bool) -> None:
        self.saved, self.bar = saved, None

    def __call__(self, event: dict) -> None:
        from tqdm import tqdm

        kind = event["kind"]
        if kind == "start":
            print(f"training {event['encoder']}/{event['block']} ({event['task']}) on {event['n_train']} image(s)"
                  f", validating on {event['n_val']}", file=sys.stderr)
            self.bar = tqdm(total=None, desc="train", unit="step", file=sys.stderr)
        elif kind == "init":
            _log(f"started from the weights of {event['source']}; new layers: {len(event['fresh'])} tensors")
        elif kind in ("step", "epoch") and self.bar is not None and self.bar.total != event["total_steps"]:
            self.bar.total = event["total_steps"]
        if kind == "step":
            self.bar.n = event["step"]
            self.bar.set_postfix(loss=f"{event['loss']:.4f}")
            self.bar.refresh()
        elif kind == "epoch":
            self.saved = True  # fit saved the state before the epoch event
            parts = [f"{key} {value:.4f}" for key, value in sorted((event.get("metrics") or {}).items())
                     if isinstance(value, (int, float))]
            _log(f"epoch {event['epoch'] + 1}/{event.get('epochs', '?')}: " + ", ".join(parts))
        elif kind == "trained":
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _run_train(args) -> int:
    import signal

    from .train import state_path_for, train_from_config, tuning_summary

    model_overrides, train_overrides = _train_overrides(args)
    state_file = state_path_for(args.out if args.resume in (None, True) else Path(args.resume))
    progress = _TrainProgress(saved=args.resume is not None and state_file.is_file())
    cancel, handler, result = threading.Event(), None, None

    def on_interrupt(signum, frame) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        cancel.set()
        _log("interrupt: stopping after this step and saving (Ctrl-C again to stop at once)")

    def on_event(event: dict) -> None:
        progress(event)
        if event["kind"] == "trained":
            history = event["history"]
            best = "" if history.best_metric is None else f" (best {history.select_metric} {history.best_metric:.4f})"
            print(f"saved {args.out}{best} after {history.steps} step(s) in {history.elapsed_s:.1f} s", file=sys.stderr)
        elif event["kind"] == "tuned":
            print(f"tuned post-processing of {args.out}: {tuning_summary(event['tuning'])}", file=sys.stderr)

    try:
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGINT, on_interrupt)
        result = train_from_config(
            args.config, args.data, args.layout, args.out, model_overrides=model_overrides,
            train_overrides=train_overrides, train_splits=args.train_splits.split(","), val_split=args.val_split,
            also=args.also, also_val=args.also_val, max_images=args.max_images, max_val_images=args.max_val_images,
            task=args.task, resume=args.resume, events=on_event, cancel=cancel,
            provenance={"command": "napari-sgdc train"})
    except KeyboardInterrupt:
        result = None
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
        progress.close()
    if result is None or result.cancelled:
        history = None if result is None else result.history
        where = "" if history is None else f" at step {history.steps}/{history.total_steps}"
        if progress.saved or (history is not None and history.steps > 0):
            print(f"interrupted{where}; progress is saved in {state_file}; continue with the same command "
                  f"plus --resume", file=sys.stderr)
        else:
            print(f"interrupted{where}: nothing was saved (no training step completed)", file=sys.stderr)
        return 130
    return 0


def _run_evaluate(args) -> int:
    from tqdm import tqdm

    from . import evaluation
    from .checkpoints import load_model

    report = _reporter("evaluate")
    _postprocess_options(args)  # bad flags fail before any work
    evaluation.check_csv_target(args.csv, args.overwrite)  # an existing CSV is refused before any work
    if args.layout:
        if args.data is None:
            raise ValueError("--layout needs --data DIR")
        items = evaluation.layout_items(args.data, args.layout, args.split, args.max_images)
    elif args.images is None:
        raise ValueError("give --images DIR with --masks DIR (and optionally --instances DIR), or --layout and --data")
    else:
        items = evaluation.folder_items(args.images, args.masks, args.instances, args.max_images)
    model = load_model(args.model, device=args.device)
    with tqdm(total=len(items), desc="evaluate", unit="image", file=sys.stderr) as bar:
        scores = evaluation.evaluate(model, items, _postprocess_options(args, model.config), tile=args.tile,
                                     overlap=args.overlap, tta=args.tta, amp=args.amp, tolerance=args.tolerance,
                                     on_error=report, progress=lambda done, total: bar.update(1), engine=args.engine)
    if not scores.rows:
        report("no image could be evaluated")
        return 1
    evaluation.write_csv(scores.rows, args.csv, scores.keys, overwrite=args.overwrite)
    print(f"{len(scores.rows)} image(s), model {args.model}")
    print("\n".join(evaluation.summary_lines(scores, args.tolerance)))
    print(f"per-image values: {args.csv}", file=sys.stderr)
    return 1 if scores.failures else 0


def _run_tune(args) -> int:
    from .train import tune_checkpoint, tuning_summary

    found = tune_checkpoint(args.model, args.out, args.data, args.layout, split=args.split, also_val=args.also_val,
                            max_images=args.max_images, device=args.device, overwrite=args.overwrite)
    print(f"{args.out}: {tuning_summary(found)}", file=sys.stderr)
    return 0


def _run_export(args) -> int:
    from .modelzoo import export

    written = export(args.model, args.out, format=args.format, name=args.name, overwrite=args.overwrite)
    print(f"{written}: bioimage.io package of {args.model} written and validated", file=sys.stderr)
    return 0


def summarize(rows: list[dict], keys: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Deprecated alias of `napari_sgdc.evaluation.summarize` (kept for one release)."""
    from .evaluation import summarize as summarize_rows

    warnings.warn("napari_sgdc.cli.summarize moved to napari_sgdc.evaluation.summarize", DeprecationWarning,
                  stacklevel=2)
    return summarize_rows(rows, keys)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        the exit code: 0 on success, 1 when any input failed or a fatal error occurred
        (``argparse`` exits with 2 on usage errors, 130 after Ctrl-C during training).
    """
    args = build_parser().parse_args(argv)
    runners = {"predict": _run_predict, "train": _run_train, "evaluate": _run_evaluate, "tune": _run_tune,
               "export": _run_export}
    try:
        return runners[args.command](args)
    except (ValueError, FileNotFoundError, OSError, ImportError) as error:
        print(f"{PROG} {args.command}: error: {_error_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
