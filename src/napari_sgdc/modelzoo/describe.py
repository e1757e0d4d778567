"""What a bioimage.io package says about a napari-sgdc model: the description (RDF) and its README.

Only plain data here (dicts and text, no torch, no bioimage.io library); `package.py` writes
the files and validates the result with ``bioimageio.spec``.
"""

from __future__ import annotations

import json
from typing import Any

from .. import __version__
from ..config import ModelConfig
from .network import output_specs

__all__ = ["FORMAT_VERSION", "INPUT_ID", "PAPER", "DATASETS", "describe", "readme", "datasets_of", "provenance_of"]

FORMAT_VERSION = "0.5.4"
INPUT_ID = "image"
HALO = 16  # pixels per side a tiling consumer should drop from each output tile
PAPER = {"text": "Shi, Zhu & Swamy. Structure-Guided Dynamic Convolution (SGDC). "
                 "MIDL 2026. arXiv 2602.23496", "url": "https://arxiv.org/abs/2602.23496"}

# name found in a checkpoint's provenance → citation and licence of that training dataset
DATASETS: dict[str, dict[str, str]] = {
    "consep": {"text": "Graham et al. HoVer-Net: simultaneous segmentation and classification of nuclei in "
                       "multi-tissue histology images. Medical Image Analysis 58, 2019 (CoNSeP)",
               "doi": "10.1016/j.media.2019.101563", "licence": "CoNSeP: research use (no licence stated)"},
    "monuseg": {"text": "Kumar et al. A dataset and a technique for generalized nuclear segmentation for "
                        "computational pathology. IEEE TMI 36(7), 2017 (MoNuSeg)",
                "doi": "10.1109/TMI.2017.2677499", "licence": "MoNuSeg: CC BY-NC-SA 4.0"},
    "gbm40": {"text": "Kong et al. Robust cell segmentation for histological images of glioblastoma. ISBI 2016 "
                      "(GBM40)", "doi": "10.1109/ISBI.2016.7493443",
              "licence": "GBM40: none stated; research use only"},
    "isic2018": {"text": "Codella et al. Skin lesion analysis toward melanoma detection 2018: a challenge hosted "
                         "by the ISIC. arXiv 1902.03368 (ISIC 2018)", "url": "https://arxiv.org/abs/1902.03368",
                 "licence": "ISIC 2018: CC BY-NC 4.0"},
    "ph2": {"text": "Mendonça et al. PH² - a dermoscopic image database for research and benchmarking. "
                    "IEEE EMBC 2013 (PH²)", "doi": "10.1109/EMBC.2013.6610779",
            "licence": "PH²: free for research and educational use"},
}


def provenance_of(metadata: dict) -> dict[str, Any]:
    """Base model, training pairs and steps of a fine-tuned checkpoint (empty for others)."""
    prov = metadata.get("provenance") or {}
    if not isinstance(prov, dict) or "base_model" not in prov:
        return {}
    runs = [run for run in prov.get("finetune_runs") or [] if isinstance(run, dict)]
    pairs = sum(int(run.get("planes") or 0) for run in runs) or prov.get("corrected_images")
    return {"base_model": str(prov.get("base_model")), "training_pairs": pairs,
            "corrected_images": prov.get("corrected_images"), "steps": prov.get("finetune_steps"),
            "finetuned_with": prov.get("finetuned_with")}


def datasets_of(metadata: dict) -> list[str]:
    """The training datasets named in a checkpoint's provenance (its base model's too)."""
    text = json.dumps(metadata.get("provenance") or {}).lower()
    return [name for name in DATASETS if name in text or (name == "isic2018" and "isic" in text)]


def _citations(datasets: list[str]) -> list[dict[str, str]]:
    return [PAPER] + [{k: v for k, v in DATASETS[name].items() if k != "licence"} for name in datasets]


def _space_axes(cfg: ModelConfig, size: dict) -> list[dict[str, Any]]:
    axes = []
    for axis in ("y", "x"):
        entry: dict[str, Any] = {"type": "space", "id": axis, "size": size}
        if cfg.mpp > 0:
            entry.update(scale=cfg.mpp, unit="micrometer")
        axes.append(entry)
    return axes


def _outputs(cfg: ModelConfig, files: dict[str, str]) -> list[dict[str, Any]]:
    outputs = []
    for spec in output_specs(cfg):
        axes = [{"type": "batch"}, {"type": "channel", "channel_names": spec["channels"]}]
        for axis in _space_axes(cfg, {"tensor_id": INPUT_ID, "axis_id": "y"}):
            axis["size"] = {"tensor_id": INPUT_ID, "axis_id": axis["id"]}
            axis["halo"] = HALO
            axes.append(axis)
        outputs.append({"id": spec["id"], "description": spec["description"], "axes": axes,
                        "test_tensor": {"source": files[f"test_{spec['id']}"]},
                        "data": {"type": "float32", "range": list(spec["range"])}})
    return outputs


def decoding(cfg: ModelConfig) -> dict[str, Any]:
    """How napari-sgdc turns the outputs into a mask and instances (`napari_sgdc.postprocess`)."""
    return {"threshold": cfg.threshold, "split_level": cfg.split_level, "min_size": cfg.min_size,
            "instance_map": cfg.instance_map if cfg.is_instance else None, "task": cfg.task,
            "single_object": cfg.single_object, "resize_long_side": cfg.resize_long_side, "mpp": cfg.mpp or None,
            "function": "napari_sgdc.postprocess(maps, PostprocessOptions.for_model(config))"}


def describe(cfg: ModelConfig, metadata: dict, files: dict[str, str], *, name: str, torch_version: str,
             opset: int) -> dict[str, Any]:
    """The package's description (bioimage.io model format 0.5) as plain data.

    Args:
        files: package file names by role (``weights_pt``, ``weights_torchscript``,
            ``weights_onnx``, ``environment``, ``readme``, ``cover``, ``test_<tensor id>``).
    """
    datasets = datasets_of(metadata)
    version = torch_version.split("+")[0]
    kind = "instance segmentation" if cfg.is_instance else "semantic segmentation"
    state_dict = {"source": files["weights_pt"], "pytorch_version": version,
                  "architecture": {"callable": "ExportedSGDC", "import_from": "napari_sgdc.modelzoo.network",
                                   "kwargs": dict(cfg.to_dict(), pretrained=False)},
                  "dependencies": {"source": files["environment"]}}
    return {
        "type": "model", "format_version": FORMAT_VERSION, "name": name,
        "description": f"SGDC {kind} network ({cfg.encoder} encoder) exported by napari-sgdc {__version__}",
        "authors": [{"name": "napari-sgdc developers"}],
        "cite": _citations(datasets), "license": "BSD-3-Clause",
        "documentation": files["readme"], "covers": [files["cover"]],
        "tags": ["napari-sgdc", "sgdc", "segmentation", "pytorch",
                 "nuclei" if cfg.is_instance else "semantic-segmentation", "2d"],
        "inputs": [{
            "id": INPUT_ID, "description": "RGB image, 0..255 (8-bit values as float32)",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ["R", "G", "B"]},
                     *_space_axes(cfg, {"min": 64, "step": 32})],
            "test_tensor": {"source": files[f"test_{INPUT_ID}"]},
            "data": {"type": "float32", "range": [0.0, 255.0]},
            "preprocessing": [{"id": "scale_linear", "kwargs": {"gain": 1.0 / 255.0, "offset": 0.0}}],
        }],
        "outputs": _outputs(cfg, files),
        "weights": {
            "pytorch_state_dict": state_dict,
            "torchscript": {"source": files["weights_torchscript"], "pytorch_version": version,
                            "parent": "pytorch_state_dict"},
            "onnx": {"source": files["weights_onnx"], "opset_version": opset, "parent": "pytorch_state_dict"},
        },
        "config": {"napari_sgdc": {
            "package_version": __version__, "model_config": cfg.to_dict(), "decoding": decoding(cfg),
            "train_config": metadata.get("train_config"), "metrics": metadata.get("metrics") or {},
            "provenance": metadata.get("provenance") or {}, "finetuned": provenance_of(metadata),
            "training_data": [{"name": d, "licence": DATASETS[d]["licence"]} for d in datasets]}},
    }


def _table(rows: list[tuple[str, str]]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows)])


def readme(rdf: dict[str, Any]) -> str:
    """The package's documentation (README.md), from its description."""
    own = rdf["config"]["napari_sgdc"]
    cfg, dec, tuned = own["model_config"], own["decoding"], own["finetuned"]
    scale = (f"{cfg['mpp']:g} µm/px: resample other magnifications to it" if cfg["mpp"]
             else "not fixed" + (f"; napari-sgdc resizes images so their long side is {cfg['resize_long_side']} px"
                                 if cfg["resize_long_side"] else ""))
    outputs = "\n".join(f"- `{o['id']}` ({', '.join(o['axes'][1]['channel_names'])}; range {o['data']['range']}): "
                        f"{o['description']}" for o in rdf["outputs"])
    data = "\n".join(f"- {d['name']}: {d['licence']}" for d in own["training_data"]) or "- not recorded"
    cites = "\n".join(f"- {c['text']} ({c.get('doi') or c.get('url')})" for c in rdf["cite"])
    lines = [f"# {rdf['name']}", "", rdf["description"] + ".", "",
             _table([("input", "RGB, 0..255 as float32, (batch, channel, y, x); y and x multiples of 32, at least 64"),
                     ("preprocessing", "scaled to [0, 1] (gain 1/255); the network normalises internally"),
                     ("scale", scale), ("task", cfg["task"]), ("classes", ", ".join(cfg["class_names"])),
                     ("tiling", f"any tile size that is a multiple of 32; drop {HALO} px per side (halo)")]),
             "", "## Outputs", "", outputs, "", "## From outputs to objects", "",
             f"napari-sgdc decodes the maps with `napari_sgdc.postprocess`: mask = probability ≥ {dec['threshold']:g}"
             + (f"; seeds = mask where the separation map ≤ split level {dec['split_level']:g} "
                f"({dec['instance_map']} representation), then a watershed on the separation map inside the mask; "
                f"objects under {dec['min_size']} px are dropped" if cfg["task"] == "instance" else
                ("; the largest region is kept with its holes filled" if dec["single_object"] else "")) + ".",
             "These settings are stored under `config.napari_sgdc.decoding`. Without napari-sgdc, use the maps "
             "directly (for instance threshold `probability`, or split touching objects with `boundary`).", "",
             "Load this package back into napari-sgdc with `load_model(\"<package>.zip\")`, "
             "`napari-sgdc predict --model <package>.zip`, or *Load checkpoint…* in the Segment dock.", ""]
    if tuned:
        lines += ["## Fine-tuning provenance", "", _table([(k.replace("_", " "), str(v)) for k, v in tuned.items()]),
                  ""]
    lines += ["## Validation", "", "napari-sgdc made the test tensors with this model and checks, when it exports, "
              "that `bioimageio.spec` accepts the package; its tests run the test input through the TorchScript "
              "and ONNX weights and compare with the test outputs (maximum absolute difference ≤ 1e-4).", "",
              "## Training data and licences", "", data, "", "## Cite", "", cites, "",
              f"Weights: {', '.join(rdf['weights'])}. Licence of the code and weights: {rdf['license']}; "
              "the training data keep their own terms (above).", ""]
    return "\n".join(lines)
