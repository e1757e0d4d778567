"""The paper's claim under an identical budget: SGDC vs pooling vs static, and no SGE supervision.

Each (variant, seed) is trained with ``napari-sgdc train`` and scored with
``napari-sgdc evaluate`` on the dataset's test split, in-process, one run at a time.
Finished runs are kept (``OUT/<dataset>/<variant>-s<seed>/scores.json``) and skipped on a
rerun, so the script resumes after an interruption. Prints a markdown table of
mean ± std over seeds (each seed's value is its mean over the test images).

    python benchmarks/ablation.py --dataset ph2 --seeds 0 1 2
    python benchmarks/ablation.py --dataset consep --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import torch

from napari_sgdc.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"sgdc": ["--block", "sgdc"], "pooling": ["--block", "pooling"], "static": ["--block", "static"],
            "sgdc-no-edge": ["--block", "sgdc", "--no-edge-supervision"]}
LAYOUT_ARGS = {"ph2": ["--val-split", "none"], "consep": ["--val-split", "none"]}
KEYS = {"ph2": ["iou", "dice", "hd95"], "consep": ["iou", "dice", "hd95", "aji", "object_f1"]}


def run_one(dataset: str, data: Path, variant: str, seed: int, out: Path) -> dict:
    """Trains and evaluates one variant/seed; returns the mean scores over the test split."""
    folder = out / dataset / f"{variant}-s{seed}"
    scores_path = folder / "scores.json"
    if scores_path.is_file():
        return json.loads(scores_path.read_text())
    checkpoint = folder / "model.safetensors"
    start = time.perf_counter()
    code = cli(["train", "--config", str(ROOT / "configs" / f"ablation_{dataset}.yaml"), "--data", str(data),
                "--layout", dataset, "--out", str(checkpoint), "--seed", str(seed), "--device", "cpu",
                *LAYOUT_ARGS[dataset], *VARIANTS[variant]])
    if code != 0:
        raise RuntimeError(f"training {variant} seed {seed} failed ({code})")
    train_s = time.perf_counter() - start
    table = folder / "test.csv"
    code = cli(["evaluate", "--model", str(checkpoint), "--layout", dataset, "--data", str(data), "--split", "test",
                "--csv", str(table), "--device", "cpu"])
    if code != 0:
        raise RuntimeError(f"evaluating {variant} seed {seed} failed ({code})")
    with open(table) as stream:
        rows = list(csv.DictReader(stream))
    scores = {key: statistics.fmean(float(row[key]) for row in rows) for key in KEYS[dataset]}
    scores.update(train_s=train_s, n_test=len(rows))
    scores_path.write_text(json.dumps(scores, indent=1))
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(KEYS), default="ph2")
    parser.add_argument("--data", type=Path, help="dataset folder (default: ../shared/data/<dataset>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "ablation")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = args.data or ROOT.parent / "shared" / "data" / args.dataset
    results = {variant: [run_one(args.dataset, data, variant, seed, args.out) for seed in args.seeds]
               for variant in args.variants}
    keys = KEYS[args.dataset]
    print(f"\n{args.dataset} test split, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}), "
          f"mean ± std over seeds\n")
    print("| variant | " + " | ".join(keys) + " | train time per run (s) |")
    print("|---" * (len(keys) + 2) + "|")
    for variant, runs in results.items():
        cells = []
        for key in keys:
            values = [run[key] for run in runs]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.fmean(values):.4f} ± {spread:.4f}")
        train_s = statistics.fmean(run["train_s"] for run in runs)
        print(f"| {variant} | " + " | ".join(cells) + f" | {train_s:.0f} |")


if __name__ == "__main__":
    main()
