"""The paper's claim under an identical budget: SGDC vs pooling vs static, and no SGE supervision.

Each (variant, seed) is trained with ``napari-sgdc train`` and scored with
``napari-sgdc evaluate`` on the dataset's scoring sets (the test split; for ISIC 2018,
which has no test split, its val split and PH² test), in-process, one run at a time.
Finished runs are kept (``OUT/<dataset>/<variant>-s<seed>/scores.json``) and skipped on a
rerun, so the script resumes after an interruption; an interrupted training resumes
from its last saved epoch. Prints a markdown table of mean ± std over seeds (each
seed's value is its mean over the scoring images).

    python benchmarks/ablation.py --dataset ph2 --seeds 0 1 2
    python benchmarks/ablation.py --dataset consep --seeds 0 1 2
    python benchmarks/ablation.py --dataset isic2018 --seeds 0 1 2 --variants sgdc pooling static
    python benchmarks/ablation.py --dataset nuclei --seeds 0 --variants sgdc sgdc-distance sgdc-hover
    python benchmarks/ablation.py --dataset nuclei --seeds 0 --variants sgdc-hover --tta

``--tta`` also scores every set with test-time augmentation (8 flips and rotations), as
``<set>-tta``; it is added to finished runs without training them again. ``--tta consep-test``
does so for the named sets only.

Instance models are tuned by ``napari-sgdc train`` itself (threshold, marker level and
smallest-object size on the validation images). ``--retune`` brings finished instance runs
trained before that existed up to date: it tunes their checkpoint with ``napari-sgdc tune``
on the same validation split and scores every set again (the earlier means are kept in
``scores.json`` under ``before_tuning``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time
from pathlib import Path

import torch

from napari_sgdc.cli import main as cli
from napari_sgdc.checkpoints import read_metadata
from napari_sgdc.train import state_path_for

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"sgdc": ["--block", "sgdc"], "pooling": ["--block", "pooling"], "static": ["--block", "static"],
            "sgdc-no-edge": ["--block", "sgdc", "--no-edge-supervision"],
            # instance representations (CoNSeP; ModelConfig.instance_map), all on the sgdc block
            "sgdc-distance": ["--block", "sgdc", "--instance-map", "distance"],
            "sgdc-hover": ["--block", "sgdc", "--instance-map", "hover"]}
DATA = ROOT.parent / "shared" / "data"
# dataset → (layout of --data, default --data folder, extra train arguments)
DATASETS = {
    "ph2": ("ph2", DATA / "ph2", ["--val-split", "none"]),
    "consep": ("consep", DATA / "consep", ["--val-split", "none"]),
    "isic2018": ("ph2", DATA / "isic2018", ["--val-split", "none"]),  # isic2018 has the ph2 folder layout
    # issue 10: CoNSeP + GBM40 (partly annotated), checkpoint picked by AJI on CoNSeP parents 19-20;
    # MoNuSeg (other organs and hospitals) is left out of training and scored as out-of-domain data
    "nuclei": ("consep", DATA / "consep", ["--val-split", "val", "--also", "gbm40", str(DATA / "gbm40")]),
}
NUCLEI_KEYS = ["iou", "dice", "hd95", "aji", "object_f1", "pq"]
KEYS = {"ph2": ["iou", "dice", "hd95"], "consep": NUCLEI_KEYS, "isic2018": ["iou", "dice", "hd95"],
        "nuclei": NUCLEI_KEYS}
# scoring sets: (name, layout, dataset folder, split); None = the --data folder
SCORING = {"ph2": [("test", "ph2", None, "test")], "consep": [("test", "consep", None, "test")],
           "isic2018": [("isic-val", "ph2", None, "val"), ("ph2-test", "ph2", DATA / "ph2", "test")],
           "nuclei": [("consep-test", "consep", None, "test"), ("monuseg-ood", "monuseg", DATA / "monuseg", "train")]}


def _score(checkpoint: Path, layout: str, data: Path, split: str, table: Path, keys: list[str],
           tta: bool = False) -> dict:
    """Mean scores of one checkpoint over one split (per-image rows written to `table`, replacing it:
    a re-tuned or re-scored run rewrites its tables)."""
    code = cli(["evaluate", "--model", str(checkpoint), "--layout", layout, "--data", str(data), "--split", split,
                "--csv", str(table), "--overwrite", "--device", "cpu", *(["--tta"] if tta else [])])
    if code != 0:
        raise RuntimeError(f"evaluating {checkpoint} on {data} {split} failed ({code})")
    with open(table) as stream:
        rows = list(csv.DictReader(stream))
    return {**{key: statistics.fmean(float(row[key]) for row in rows) for key in keys}, "n": len(rows)}


def _retune(dataset: str, data: Path, checkpoint: Path, folder: Path, scores: dict) -> bool:
    """Tunes an instance checkpoint trained before `train` tuned them, and scores it again."""
    if KEYS[dataset] != NUCLEI_KEYS or "postprocess_tuning" in (read_metadata(checkpoint).get("metrics") or {}):
        return False
    layout, _, train_args = DATASETS[dataset]
    val_split = train_args[train_args.index("--val-split") + 1] if "--val-split" in train_args else "none"
    if val_split == "none":
        return False
    tuned = folder / "model.tuned.safetensors"
    if cli(["tune", "--model", str(checkpoint), "--data", str(data), "--layout", layout, "--split", val_split,
            "--out", str(tuned), "--overwrite", "--device", "cpu"]) != 0:
        raise RuntimeError(f"tuning {checkpoint} failed")
    os.replace(tuned, checkpoint)
    before = {name: scores.pop(name) for name in list(scores) if name != "train_s" and name != "before_tuning"}
    scores["before_tuning"] = before
    for name, score_layout, score_data, split in SCORING[dataset]:
        scores[name] = _score(checkpoint, score_layout, data if score_data is None else score_data, split,
                              folder / f"{name}.csv", KEYS[dataset])
    return True


def run_one(dataset: str, data: Path, variant: str, seed: int, out: Path, tta: list[str] | None = None,
            retune: bool = False) -> dict:
    """Trains and evaluates one variant/seed; returns {scoring set: mean scores} plus ``train_s``.

    `tta`: the scoring sets to score with test-time augmentation too (None: none).
    """
    folder = out / dataset / f"{variant}-s{seed}"
    scores_path = folder / "scores.json"
    checkpoint = folder / "model.safetensors"
    if scores_path.is_file():
        scores = json.loads(scores_path.read_text())
        if retune and _retune(dataset, data, checkpoint, folder, scores):
            scores_path.write_text(json.dumps(scores, indent=1))
        if tta is not None:
            _add_tta_scores(dataset, data, checkpoint, folder, scores, tta)
            scores_path.write_text(json.dumps(scores, indent=1))
        return scores
    resume = ["--resume"] if state_path_for(checkpoint).is_file() else []
    start = time.perf_counter()
    layout, _, train_args = DATASETS[dataset]
    code = cli(["train", "--config", str(ROOT / "configs" / f"ablation_{dataset}.yaml"), "--data", str(data),
                "--layout", layout, "--out", str(checkpoint), "--seed", str(seed), "--device", "cpu",
                *train_args, *VARIANTS[variant], *resume])
    if code != 0:
        raise RuntimeError(f"training {variant} seed {seed} failed ({code})")
    train_s = time.perf_counter() - start
    scores: dict = {"train_s": train_s}
    for name, score_layout, score_data, split in SCORING[dataset]:
        scores[name] = _score(checkpoint, score_layout, data if score_data is None else score_data, split,
                              folder / f"{name}.csv", KEYS[dataset])
    if tta is not None:
        _add_tta_scores(dataset, data, checkpoint, folder, scores, tta)
    scores_path.write_text(json.dumps(scores, indent=1))
    return scores


def _add_tta_scores(dataset: str, data: Path, checkpoint: Path, folder: Path, scores: dict,
                    names: list[str]) -> None:
    """Adds ``<set>-tta`` means to `scores` for the scoring sets in `names` (all when empty) that lack them."""
    for name, score_layout, score_data, split in SCORING[dataset]:
        if f"{name}-tta" not in scores and (not names or name in names):
            scores[f"{name}-tta"] = _score(checkpoint, score_layout, data if score_data is None else score_data,
                                           split, folder / f"{name}-tta.csv", KEYS[dataset], tta=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(KEYS), default="ph2")
    parser.add_argument("--data", type=Path, help="dataset folder (default: ../shared/data/<dataset>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS)[:4], choices=list(VARIANTS),
                        help="default: the four block variants")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tta", nargs="*", metavar="SET",
                        help="also score with test-time augmentation (<set>-tta): the named scoring sets, all without names")
    parser.add_argument("--retune", action="store_true",
                        help="tune finished instance runs that predate tuning, and score them again")
    args = parser.parse_args()
    from napari_sgdc.device import cpu_description

    print(f"# CPU: {cpu_description()}", flush=True)
    torch.set_num_threads(args.threads)
    data = args.data or DATASETS[args.dataset][1]
    keys = KEYS[args.dataset]
    sets = [name for name, *_ in SCORING[args.dataset]]
    unknown = sorted(set(args.tta or []) - set(sets))
    if unknown:
        parser.error(f"--tta: no scoring set {unknown} for {args.dataset} (sets: {', '.join(sets)})")
    results = {variant: [run_one(args.dataset, data, variant, seed, args.out, args.tta, args.retune)
                         for seed in args.seeds]
               for variant in args.variants}
    tta_sets = [] if args.tta is None else [name for name in sets if not args.tta or name in args.tta]
    for name in sets + [f"{name}-tta" for name in tta_sets]:
        print(f"\n{args.dataset} → {name}, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
              f"mean ± std over seeds\n")
        print("| variant | " + " | ".join(keys) + " | train time per run (s) |")
        print("|---" * (len(keys) + 2) + "|")
        for variant, runs in results.items():
            cells = []
            for key in keys:
                values = [_scores_of(run, name).get(key, float("nan")) for run in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                cells.append(f"{statistics.fmean(values):.4f} ± {spread:.4f}")
            train_s = statistics.fmean(run["train_s"] for run in runs)
            print(f"| {variant} | " + " | ".join(cells) + f" | {train_s:.0f} |")
    if keys == NUCLEI_KEYS:
        _print_tuning(args.out / args.dataset, args.variants, args.seeds)


def _print_tuning(folder: Path, variants: list[str], seeds: list[int]) -> None:
    """Per run: the post-processing `train` tuned on validation, and the validation AJI."""
    print("\nper run: tuned threshold / marker level / min size, validation AJI (tuned), epoch kept\n")
    print("| variant | seed | threshold | level | min size | val AJI | epoch |")
    print("|---|---|---|---|---|---|---|")
    for variant in variants:
        for seed in seeds:
            metrics = read_metadata(folder / f"{variant}-s{seed}" / "model.safetensors").get("metrics") or {}
            tuning = metrics.get("postprocess_tuning") or {}
            print(f"| {variant} | {seed} | {tuning.get('threshold')} | {tuning.get('boundary_threshold')} | "
                  f"{tuning.get('min_size')} | {tuning.get('aji', float('nan')):.4f} | {metrics.get('epoch')} |")


def _scores_of(run: dict, name: str) -> dict:
    """One scoring set's means; runs saved before scoring sets were named hold the test means flat."""
    return run[name] if name in run else run


if __name__ == "__main__":
    main()
