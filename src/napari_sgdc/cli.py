"""The ``napari-sgdc`` command line: ``predict``, ``train`` and ``evaluate``.

Examples::

    napari-sgdc predict --model dermoscopy --out results/ images/
    napari-sgdc train --data ../shared/data/ph2 --layout ph2 --out runs/ph2/model.safetensors --epochs 30
    napari-sgdc evaluate --model runs/ph2/model.safetensors --layout ph2 --data ../shared/data/ph2 --split test
    napari-sgdc evaluate --model nuclei --images imgs/ --masks masks/ --instances inst/ --csv scores.csv

Every command prints progress on stderr. Errors about one input print one line naming
the file; the other inputs still run and the exit code is 1 at the end. Heavy modules
(torch, the model) are imported inside the commands so that ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main", "build_parser"]

PROG = "napari-sgdc"


def _error_line(message: Any) -> str:
    """One line of text (no newlines) for an error message."""
    return " ".join(str(message).split())


def _report(command: str, message: Any) -> None:
    """Prints one error line on stderr without breaking a tqdm bar."""
    from tqdm import tqdm

    tqdm.write(f"{PROG} {command}: error: {_error_line(message)}", file=sys.stderr)


# --------------------------------------------------------------------------- parser


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
    parser.add_argument("--boundary-threshold", type=float, default=None,
                        help="separation level that splits instances: seeds grow where the boundary (or "
                             "separation map) is below it (default: the model's, tuned on validation; 0.5 "
                             "for models without one)")
    parser.add_argument("--min-size", type=int, default=None,
                        help="smallest object kept, in pixels (default: the model's; 20 for models without one)")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the 8 flips and 90-degree rotations (about 8x the time)")
    parser.add_argument("--amp", action="store_true",
                        help="bf16 autocast: about 1.5x faster on GPUs and CPUs with native bf16 (AVX512-BF16, AMX), "
                             "probabilities within about 0.005; ignored elsewhere")


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of all commands."""
    from .config import INSTANCE_MAPS, TASKS
    from .data.datasets import LAYOUTS, SPLITS
    from .device import DEVICES
    from .model.registry import BLOCK_TYPES, ENCODERS

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Segment dermoscopy and H&E nuclei images with a Structure-Guided Dynamic Convolution network.",
    )
    commands = parser.add_subparsers(dest="command", metavar="{predict,train,evaluate}")
    commands.required = True

    predict = commands.add_parser(
        "predict", help="segment image files or folders",
        description="Segment images and write, for each input stem S: S_mask.png (uint8 0/255), S_prob.tif "
                    "(float32), S_boundary.tif (float32) and, for instance models, S_labels.tif (uint8/16/32). "
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
                         help="µm per pixel of the inputs: images are resampled to the model's scale (e.g. 0.5 for "
                              "a 20x image and the 40x nuclei model); slides use it when their metadata has none")
    slides = predict.add_argument_group(
        "whole slides", "Slide inputs (.svs .ndpi .mrxs .ome.tif, and tiled pyramidal .tif) are segmented tile by "
                        "tile into S.ome.zarr, with the object table S_objects.csv and QuPath GeoJSON "
                        "S_objects.geojson (docs/wholeslide.md).")
    slides.add_argument("--roi", type=_parse_roi, metavar="X,Y,W,H",
                        help="segment only this box, in level-0 slide pixels")
    slides.add_argument("--slide-tile", type=int, default=1024,
                        help="slide tile core (and chunk) size in pixels, a multiple of 32 (default: 1024)")
    slides.add_argument("--margin", type=int, default=64,
                        help="context around each slide tile, a multiple of 32 (default: 64 = 16 µm at 40x)")
    slides.add_argument("--workers", type=int, default=0,
                        help="run slide tiles on a local Dask cluster of N processes (needs distributed)")
    slides.add_argument("--scheduler", metavar="ADDRESS",
                        help="run slide tiles on an existing Dask cluster, e.g. tcp://10.0.0.5:8786")
    slides.add_argument("--resume", action="store_true", help="continue an interrupted slide run into its store")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", type=Path,
                         help="image files or folders of images (.jpg .png .tif .bmp), or slide files")

    train = commands.add_parser(
        "train", help="train a model on a dataset",
        description="Train an SGDC segmenter and save the best checkpoint (safetensors) at --out.",
    )
    train.add_argument("--data", required=True, type=Path, help="dataset folder")
    train.add_argument("--layout", required=True, choices=LAYOUTS,
                       help="dataset layout")
    train.add_argument("--out", required=True, type=Path, help="checkpoint path (.safetensors)")
    train.add_argument("--config", type=Path, help="optional YAML with 'model:' and 'train:' sections "
                                                   "(ModelConfig/TrainConfig fields); flags override it")
    train.add_argument("--epochs", type=int, help="number of epochs (default: 30)")
    train.add_argument("--max-images", type=_count, help="train on the first N training images only (0 = all)")
    train.add_argument("--train-splits", default="train",
                       help="comma-separated splits to train on (default: train; e.g. train,val)")
    train.add_argument("--val-split", default="val",
                       help="split used for validation, or 'none' (default: val)")
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

    evaluate = commands.add_parser(
        "evaluate", help="score a model against reference masks",
        description="Score a model: IoU, Dice, HD95 (pixels) and boundary F1, plus AJI and object F1 at IoU 0.5 "
                    "with instance labels, printed as mean ± std; per-image values go to a CSV. Use either "
                    "--images/--masks[/--instances] folders (labels matched by file stem) or --layout/--data/--split.",
    )
    evaluate.add_argument("--model", required=True, help="built-in model name or checkpoint path")
    evaluate.add_argument("--images", type=Path, help="folder of images")
    evaluate.add_argument("--masks", type=Path, help="folder of reference masks (0/255 or labels; same stems)")
    evaluate.add_argument("--instances", type=Path, help="folder of reference instance maps (adds AJI and F1)")
    evaluate.add_argument("--layout", choices=LAYOUTS, help="dataset layout")
    evaluate.add_argument("--data", type=Path, help="dataset folder (with --layout)")
    evaluate.add_argument("--split", default="test", choices=SPLITS,
                          help="split (with --layout; default: test)")
    evaluate.add_argument("--max-images", type=_count, help="evaluate the first N images only (0 = all)")
    evaluate.add_argument("--csv", type=Path, default=Path("evaluation.csv"),
                          help="per-image CSV (default: ./evaluation.csv)")
    evaluate.add_argument("--tolerance", type=_tolerance, default=2.0,
                          help="boundary F1 tolerance in pixels, >= 0 (default: 2)")
    _add_inference_options(evaluate)

    tune = commands.add_parser(
        "tune", help="tune an instance model's post-processing defaults on validation images",
        description="Search the mask threshold, separation level and smallest-object size with the best mean "
                    "AJI on validation images, and write a copy of the checkpoint that carries them as its "
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
    return parser


# --------------------------------------------------------------------------- helpers


def _parse_roi(text: str) -> tuple[int, int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or values[2] <= 0 or values[3] <= 0:
        raise argparse.ArgumentTypeError(f"expected X,Y,W,H in level-0 pixels with W, H > 0, got {text!r}")
    return values


def _load_model(name: str, device: str):
    from .io import load_model

    return load_model(name, device=device)


def _postprocess_options(args, config=None):
    """The one `PostprocessOptions` of a predict or evaluate run (validated): the flags,
    and the model's defaults (`config`) where a flag is not given."""
    from .postprocess import PostprocessOptions

    return PostprocessOptions.for_model(config, threshold=args.threshold, boundary_threshold=args.boundary_threshold,
                                        min_size=args.min_size)


def _expand_inputs(inputs: Sequence[Path], command: str) -> tuple[list[Path], int]:
    """Files from files and folders; returns (files, number of bad paths reported)."""
    from .imageio import IMAGE_SUFFIXES
    from .slide import OPENSLIDE_SUFFIXES

    files, bad = [], 0
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + OPENSLIDE_SUFFIXES)
            if not found:
                _report(command, f"{path}: folder holds no images ({' '.join(IMAGE_SUFFIXES)})")
                bad += 1
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            _report(command, f"{path}: no such file or folder")
            bad += 1
    return files, bad


def _segment_file(model, path: Path, options, args, progress=None):
    from .imageio import read_image
    from .inference import segment

    image = read_image(path)
    try:
        return segment(model, image, options, tile=args.tile or None, overlap=args.overlap, tta=args.tta,
                       uncertainty=args.uncertainty, progress=progress, stack=False, mpp=args.mpp, amp=args.amp)
    except ValueError as error:
        raise ValueError(f"unsupported image (shape {image.shape}, dtype {image.dtype}): {error}") from None


# --------------------------------------------------------------------------- predict


def _planned_outputs(files: list[Path], out_dir: Path, instances: bool, uncertainty: bool, overwrite: bool) -> None:
    """Refuses, before any work, inputs whose outputs collide or would replace existing files."""
    from .imageio import result_paths

    owners: dict[Path, Path] = {}
    for path in files:
        for target in result_paths(out_dir, path.stem, instances=instances, uncertainty=uncertainty):
            if target in owners:
                raise ValueError(f"{owners[target]} and {path} would both write {target.name}: "
                                 "rename one or predict them into different --out folders")
            owners[target] = path
            if not overwrite and target.exists():
                raise ValueError(f"{target} already exists; not replaced (use --overwrite, or another --out)")


def _run_predict(args) -> int:
    from tqdm import tqdm

    from .imageio import write_result

    options = _postprocess_options(args)
    files, failures = _expand_inputs(args.inputs, "predict")
    unique: dict[Path, Path] = {}
    for path in files:
        unique.setdefault(path.resolve(), path)  # a file named twice runs once
    files = list(unique.values())
    if not files:
        _report("predict", "no input images")
        return 1
    from .slide import is_slide

    slides = [path for path in files if is_slide(path)]
    files = [path for path in files if path not in slides]
    model = _load_model(args.model, args.device)
    options = _postprocess_options(args, model.config)
    if slides:
        failures += _predict_slides(args, slides, model, options)
        if not files:
            return 1 if failures else 0
    _planned_outputs(files, args.out, model.config.is_instance, args.uncertainty, args.overwrite)
    from .inference import check_mpp

    check_mpp(args.mpp, model.config)  # before any work: one line for a model without a scale
    args.out.mkdir(parents=True, exist_ok=True)
    done = 0
    with tqdm(total=len(files), desc="predict", unit="image", file=sys.stderr) as bar:
        for path in files:
            bar.set_postfix_str(path.name)

            def on_tile(tiles_done, tiles_total):
                bar.set_postfix_str(f"{path.name} tile {tiles_done}/{tiles_total}")

            try:
                result = _segment_file(model, path, options, args, progress=on_tile)
                write_result(result, args.out, path.stem, overwrite=args.overwrite)
                done += 1
            except (ValueError, OSError) as error:
                _report("predict", f"{path}: {error}")
                failures += 1
            bar.update(1)
    print(f"wrote results for {done} of {len(files)} image(s) to {args.out}", file=sys.stderr)
    return 1 if failures else 0


def _slide_stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _dask_client(args):
    """A dask.distributed Client for --scheduler or --workers, or None (single process)."""
    if not args.scheduler and args.workers <= 1:
        return None, None
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ValueError("--workers/--scheduler need dask.distributed: pip install 'napari-sgdc[cluster]'") from None
    if args.scheduler:
        return Client(args.scheduler), None
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


def _predict_slides(args, slides: list[Path], model, options) -> int:
    """The slide branch of predict: S.ome.zarr, S_objects.csv and S_objects.geojson per slide."""
    import os

    from tqdm import tqdm

    from .slide import open_slide
    from .wholeslide import export_objects, segment_slide

    failures = 0
    args.out.mkdir(parents=True, exist_ok=True)
    client = cluster = None
    try:
        if args.scheduler or args.workers > 1:
            client, cluster = _dask_client(args)
        threads = max(1, (os.cpu_count() or 1) // args.workers) if cluster is not None else 0
        for path in slides:
            stem = _slide_stem(path)
            store = args.out / f"{stem}.ome.zarr"
            table, geojson = args.out / f"{stem}_objects.csv", args.out / f"{stem}_objects.geojson"
            try:
                if not (args.overwrite or args.resume):
                    for target in (store, table, geojson):
                        if target.exists():
                            raise ValueError(f"{target} already exists; not replaced (use --overwrite or --resume)")
                with open_slide(path, mpp=args.mpp) as slide, \
                        tqdm(total=0, desc=path.name, unit="tile", file=sys.stderr) as bar:
                    def on_tile(done, total):
                        bar.total = total
                        bar.n = done
                        bar.refresh()

                    # on a cluster each worker loads the model itself, once
                    spec = _model_spec(args.model) if client is not None else model
                    result = segment_slide(spec, slide, store, roi=args.roi, mpp=args.mpp, tile=args.slide_tile,
                                           margin=args.margin, options=options, progress=on_tile,
                                           resume=args.resume, overwrite=args.overwrite, client=client,
                                           threads=threads, amp=args.amp)
                count = export_objects(store, table, geojson, overwrite=True)
                print(f"{path}: {count} objects, {result.tiles_run} of {result.tiles_total} tiles with tissue, "
                      f"{result.seconds:.1f} s -> {store}", file=sys.stderr)
            except (ValueError, OSError) as error:
                _report("predict", error if str(path) in str(error) else f"{path}: {error}")
                failures += 1
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    return failures


def _model_spec(name: str) -> str:
    from .io import builtin_models

    return name if name in builtin_models() else str(Path(name).expanduser().resolve())


# --------------------------------------------------------------------------- train


def _load_yaml_config(path: Path | None) -> tuple[dict, dict]:
    if path is None:
        return {}, {}
    import yaml

    with open(path) as stream:
        content = yaml.safe_load(stream) or {}
    if not isinstance(content, dict) or set(content) - {"model", "train"}:
        raise ValueError(f"{path}: a config YAML holds only 'model:' and 'train:' sections")
    return dict(content.get("model") or {}), dict(content.get("train") or {})


def _model_config(args, model_values: dict, task: str, layout: str):
    from .config import ModelConfig
    from .model import tiny_config

    values = dict(model_values)
    if args.encoder:
        values["encoder"] = args.encoder
    if args.block:
        values["block"] = args.block
    if args.instance_map:
        values["instance_map"] = args.instance_map
    if args.no_edge_supervision:
        values["edge_supervision"] = False
    if args.no_pretrained:
        values["pretrained"] = False
    values["task"] = task
    values.setdefault("class_names", ("lesion",) if layout == "ph2" else ("nucleus",) if task == "instance"
                      else ("foreground",))
    if values.get("encoder") == "mini":
        return tiny_config(**values)
    return ModelConfig.from_dict(values)


def _train_config(args, train_values: dict, layout: str):
    """The run's `TrainConfig` from the YAML values and the flags, checked (one-line errors)."""
    from .config import TrainConfig
    from .train import check_train_config

    values = dict(train_values)
    overrides = {"epochs": args.epochs, "seed": args.seed, "crop_size": args.crop_size,
                 "batch_size": args.batch_size, "steps_per_epoch": args.steps_per_epoch, "device": args.device}
    values.update({key: value for key, value in overrides.items() if value is not None})
    if args.lr is not None:
        values["lr_decoder"] = args.lr
        values["lr_encoder"] = args.lr * 0.3
    if args.amp:
        values["amp"] = True
    values.setdefault("stain_jitter", layout in ("consep", "monuseg", "monuseg-instances"))
    values.setdefault("select_metric", "auto")  # AJI for instance models, IoU otherwise
    config = TrainConfig.from_dict(values)
    check_train_config(config)
    return config


def _run_train(args) -> int:
    import signal

    from tqdm import tqdm

    from . import train
    from .data import SegmentationDataset, load_samples, resize_samples
    from .model import build_model

    model_values, train_values = _load_yaml_config(args.config)
    train_cfg = _train_config(args, train_values, args.layout)  # bad settings fail before any data is read
    resume = None
    if args.resume is not None:
        resume = args.out if args.resume is True else Path(args.resume)
    state_file = train.state_path_for(resume if resume is not None else args.out)
    cancel, progress = threading.Event(), {"saved": resume is not None and state_file.is_file()}
    history, bar, handler = None, None, None

    def on_event(event: dict) -> None:
        if bar.total != event["total_steps"]:
            bar.total = event["total_steps"]
        if event["kind"] == "step":
            bar.n = event["step"]
            bar.set_postfix(loss=f"{event['loss']:.4f}")
            bar.refresh()
        else:
            progress["saved"] = True  # fit saved the state before the epoch event
            parts = [f"{key} {value:.4f}" for key, value in sorted((event.get("metrics") or {}).items())
                     if isinstance(value, (int, float))]
            tqdm.write(f"epoch {event['epoch'] + 1}/{event.get('epochs', '?')}: " + ", ".join(parts), file=sys.stderr)

    def on_interrupt(signum, frame) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        cancel.set()
        tqdm.write("interrupt: stopping after this step and saving (Ctrl-C again to stop at once)", file=sys.stderr)

    try:
        train_samples = []
        for split in filter(None, (part.strip() for part in args.train_splits.split(","))):
            train_samples += load_samples(args.data, args.layout, split, task=args.task)
        train_samples = train_samples[: args.max_images] if args.max_images else train_samples
        if not train_samples:
            raise ValueError(f"no training images found in {args.data} (layout {args.layout})")
        task = args.task or ("instance" if train_samples[0].is_instance else "semantic")
        for layout, folder in args.also:
            train_samples += load_samples(folder, layout, "train", task=task)
        val_samples = []
        if args.val_split != "none":
            val_samples = load_samples(args.data, args.layout, args.val_split, max_images=args.max_val_images,
                                       task=task)
        for layout, folder in args.also_val:
            val_samples += load_samples(folder, layout, "val", max_images=args.max_val_images, task=task)
        model_cfg = _model_config(args, model_values, task, args.layout)
        train_samples = resize_samples(train_samples, model_cfg.resize_long_side)
        val_samples = resize_samples(val_samples, model_cfg.resize_long_side)
        train_data = SegmentationDataset(train_samples, crop_size=train_cfg.crop_size, augment=True,
                                         boundary_width=train_cfg.boundary_width,
                                         stain_jitter=train_cfg.stain_jitter, task=task, seed=train_cfg.seed,
                                         aspect_jitter=train_cfg.aspect_jitter, artifacts=train_cfg.artifacts,
                                         instance_map=model_cfg.instance_map)
        val_data = None
        if val_samples:
            val_data = SegmentationDataset(val_samples, crop_size=None, augment=False,
                                           boundary_width=train_cfg.boundary_width, task=task,
                                           instance_map=model_cfg.instance_map)
        train.seed_everything(train_cfg.seed)  # before build_model, so --seed also fixes the initial weights
        model = build_model(model_cfg)
        print(f"training {model_cfg.encoder}/{model_cfg.block} ({task}) on {len(train_samples)} image(s)"
              f", validating on {len(val_samples)}", file=sys.stderr)
        provenance = {"command": "napari-sgdc train", "data": str(args.data), "layout": args.layout,
                      "train_splits": args.train_splits, "also": [list(pair) for pair in args.also],
                      "also_val": [list(pair) for pair in args.also_val],
                      "max_images": args.max_images, "n_train": len(train_samples), "n_val": len(val_samples)}
        bar = tqdm(total=None, desc="train", unit="step", file=sys.stderr)
        if threading.current_thread() is threading.main_thread():
            handler = signal.signal(signal.SIGINT, on_interrupt)
        history = train.fit(model, train_data, val_data, train_cfg, callbacks=[on_event], cancel=cancel,
                            out=args.out, resume=resume, provenance=provenance)
    except KeyboardInterrupt:
        history = None
    finally:
        if handler is not None:
            signal.signal(signal.SIGINT, handler)
        if bar is not None:
            bar.close()
    if history is None or history.cancelled:
        where = "" if history is None else f" at step {history.steps}/{history.total_steps}"
        if progress["saved"] or (history is not None and history.steps > 0):
            print(f"interrupted{where}; progress is saved in {state_file}; continue with the same command "
                  f"plus --resume", file=sys.stderr)
        else:
            print(f"interrupted{where}: nothing was saved (no training step completed)", file=sys.stderr)
        return 130
    best = "" if history.best_metric is None else f" (best {history.select_metric} {history.best_metric:.4f})"
    print(f"saved {args.out}{best} after {history.steps} step(s) in {history.elapsed_s:.1f} s", file=sys.stderr)
    if val_data is not None and model.config.is_instance and args.out.is_file():
        found = _tune_checkpoint(args.out, args.out, val_data, train_cfg.device)
        print(f"tuned post-processing of {args.out}: {_tuning_line(found)}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- evaluate


def _evaluation_items(args):
    """Yields (name, image loader, semantic mask loader, instance loader or None, error or None)."""
    from .data import load_samples
    from .data.datasets import find_label_file
    from .imageio import read_image, read_mask

    if args.layout:
        if args.data is None:
            raise ValueError("--layout needs --data DIR")
        samples = load_samples(args.data, args.layout, args.split, max_images=args.max_images)
        if not samples:
            raise ValueError(f"no images in split {args.split!r} of {args.data} (layout {args.layout})")
        for sample in samples:
            instances = sample.mask if sample.is_instance else None
            yield sample.name, (lambda s=sample: s.image), (lambda s=sample: s.mask > 0), \
                (None if instances is None else (lambda i=instances: i)), None
        return
    if args.images is None or (args.masks is None and args.instances is None):
        raise ValueError("give --images DIR with --masks DIR (and optionally --instances DIR), or --layout and --data")
    files, _ = _expand_inputs([args.images], "evaluate")
    if args.max_images:
        files = files[:args.max_images]
    if not files:
        raise ValueError(f"no images in {args.images}")
    for path in files:
        mask_path = find_label_file([args.masks], path.stem) if args.masks else None
        instance_path = find_label_file([args.instances], path.stem) if args.instances else None
        if args.masks and mask_path is None:
            yield path.name, None, None, None, f"{path}: no mask with stem {path.stem!r} in {args.masks}"
            continue
        if args.instances and instance_path is None:
            yield path.name, None, None, None, f"{path}: no instance map with stem {path.stem!r} in {args.instances}"
            continue
        image_loader = (lambda p=path: read_image(p))
        if mask_path is not None:
            mask_loader = (lambda p=mask_path: read_mask(p, instance=False))
        else:
            mask_loader = (lambda p=instance_path: read_mask(p, instance=True) > 0)
        instance_loader = None if instance_path is None else (lambda p=instance_path: read_mask(p, instance=True))
        yield path.name, image_loader, mask_loader, instance_loader, None


def summarize(rows: list[dict], keys: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Mean and (population) standard deviation of each key over rows, ignoring NaN."""
    import numpy as np

    summary = {}
    for key in keys:
        values = np.array([row[key] for row in rows if key in row], dtype=float)
        values = values[np.isfinite(values)]
        summary[key] = (float(values.mean()), float(values.std())) if values.size else (math.nan, math.nan)
    return summary


def _run_evaluate(args) -> int:
    import numpy as np
    from tqdm import tqdm

    from . import metrics
    from .inference import segment
    from .postprocess import postprocess

    options = _postprocess_options(args)  # bad flags fail before any work
    items = list(_evaluation_items(args))
    model = _load_model(args.model, args.device)
    options = _postprocess_options(args, model.config)
    rows, failures = [], 0
    pooled = np.zeros(3, np.int64)  # intersection, predicted and reference foreground pixels over all images
    with tqdm(items, desc="evaluate", unit="image", file=sys.stderr) as bar:
        for name, load_image, load_mask, load_instances, problem in bar:
            if problem is not None:
                _report("evaluate", problem)
                failures += 1
                continue
            try:
                image = load_image()
                target = load_mask()
                target_instances = load_instances() if load_instances is not None else None
                result = segment(model, image, options, tile=args.tile or None, overlap=args.overlap, tta=args.tta,
                                 stack=False, amp=args.amp)
                if result.mask.shape != target.shape:
                    raise ValueError(f"mask shape {target.shape} differs from image shape {result.mask.shape}")
                row = {"image": name, **metrics.semantic_scores(result.mask, target, args.tolerance)}
                reference = np.asarray(target) > 0
                pooled += [np.count_nonzero(result.mask & reference), np.count_nonzero(result.mask),
                           np.count_nonzero(reference)]
                if target_instances is not None:
                    labels = result.labels
                    if labels is None:  # a semantic model scored against instances: split its mask
                        labels = postprocess(result.probability, result.boundary, options, instances=True)[1]
                    row.update(metrics.instance_scores(labels, target_instances))
                rows.append(row)
            except (ValueError, OSError) as error:
                _report("evaluate", f"{name}: {error}")
                failures += 1
    if not rows:
        _report("evaluate", "no image could be evaluated")
        return 1
    keys = ["iou", "dice", "hd95", "boundary_f1"]
    if any("aji" in row for row in rows):
        keys += ["aji", "object_f1", "pq"]
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["image", *keys], restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6g}" if isinstance(value, float) else value) for key, value in row.items()})
    labels = {"iou": "IoU", "dice": "Dice", "hd95": "HD95 (px)", "boundary_f1": f"Boundary F1 (tol {args.tolerance:g} px)",
              "aji": "AJI", "object_f1": "Object F1 (IoU>0.5)", "pq": "PQ (panoptic quality)"}
    print(f"{len(rows)} image(s), model {args.model}")
    for key, (mean, std) in summarize(rows, keys).items():
        print(f"{labels[key]:<28} {mean:.4f} ± {std:.4f}")
    intersection, predicted, reference_total = (int(value) for value in pooled)
    union = predicted + reference_total - intersection
    print(f"{'Pooled IoU / Dice':<28} {intersection / max(union, 1):.4f} / "
          f"{2 * intersection / max(predicted + reference_total, 1):.4f}  (pixels summed over all images)")
    print(f"per-image values: {args.csv}", file=sys.stderr)
    return 1 if failures else 0


# --------------------------------------------------------------------------- tune


def _validation_data(samples, config):
    """Whole-image validation items of `samples` for a model of `config` (as training validates)."""
    from .data import SegmentationDataset, resize_samples

    samples = resize_samples(samples, config.resize_long_side)
    return SegmentationDataset(samples, crop_size=None, augment=False, task=config.task,
                               instance_map=config.instance_map)


def _tune_checkpoint(source: Path, out: Path, dataset, device: str) -> dict:
    """Tunes the post-processing defaults of checkpoint `source` on `dataset` and writes the
    checkpoint with them (metadata kept, the search recorded in its metrics) to `out`."""
    from .io import load_checkpoint, read_metadata, save_checkpoint
    from .train import tune_postprocess

    model, _ = load_checkpoint(source, device=device)
    found = tune_postprocess(model, dataset, device=device)
    for name in ("threshold", "boundary_threshold", "min_size"):
        setattr(model.config, name, found[name])
    metadata = read_metadata(source)
    metrics = {**(metadata.get("metrics") or {}), "postprocess_tuning": {**found, "n_images": len(dataset)}}
    save_checkpoint(out, model.to("cpu"), train_config=metadata.get("train_config"), metrics=metrics,
                    provenance=metadata.get("provenance"))
    return found


def _tuning_line(found: dict) -> str:
    return (f"threshold {found['threshold']:g}, boundary threshold {found['boundary_threshold']:g}, min size "
            f"{found['min_size']} px: validation AJI {found['aji']:.4f} (was {found['aji_default']:.4f}), "
            f"object F1 {found['object_f1']:.4f}, PQ {found['pq']:.4f}")


def _run_tune(args) -> int:
    from .data import load_samples
    from .io import read_metadata

    config = read_metadata(args.model).get("model_config") or {}
    if config.get("task") != "instance":
        raise ValueError(f"{args.model}: tune needs an instance model (this one is {config.get('task')!r})")
    if args.out.exists() and not args.overwrite:
        raise ValueError(f"{args.out} exists; not replaced (give --overwrite)")
    if args.out.resolve() == Path(args.model).resolve():
        raise ValueError("--out must differ from --model: the input checkpoint is never changed")
    samples = load_samples(args.data, args.layout, args.split, max_images=args.max_images, task="instance")
    for layout, folder in args.also_val:
        samples += load_samples(folder, layout, "val", max_images=args.max_images, task="instance")
    if not samples:
        raise ValueError(f"no images in split {args.split!r} of {args.data} (layout {args.layout})")
    from .config import ModelConfig

    found = _tune_checkpoint(Path(args.model), args.out, _validation_data(samples, ModelConfig.from_dict(config)),
                             args.device)
    print(f"{args.out}: {_tuning_line(found)}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line.

    Args:
        argv: arguments without the program name (None: ``sys.argv[1:]``).

    Returns:
        the exit code: 0 on success, 1 when any input failed or a fatal error occurred
        (``argparse`` exits with 2 on usage errors, 130 after Ctrl-C during training).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    runners = {"predict": _run_predict, "train": _run_train, "evaluate": _run_evaluate, "tune": _run_tune}
    try:
        return runners[args.command](args)
    except (ValueError, FileNotFoundError, OSError) as error:
        print(f"{PROG} {args.command}: error: {_error_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
