"""The network a bioimage.io package runs: `SGDCSegmenter` with plain tensor outputs.

`ExportedSGDC` is the architecture callable of the package's ``pytorch_state_dict`` weights
(``import_from: napari_sgdc.modelzoo.network``); the TorchScript and ONNX weights are traces
of it. It has the segmenter's parameters under the same names, so its state_dict is a
napari-sgdc state_dict. Input: (B, 3, H, W) RGB in [0, 1], H and W multiples of 32 (the
package's preprocessing scales 0..255 to that). Outputs, in order (`output_specs`):
probabilities of the mask classes, the SGE boundary probability, and for instance models
the separation head (``distance`` in [0, 1] or ``hover`` x, y offsets in [-1, 1]).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..model import SGDCSegmenter

__all__ = ["ExportedSGDC", "export_onnx", "output_specs"]

OPSET = 17
"""The ONNX opset of every export (the package's weights and `napari_sgdc.engines`)."""


def output_specs(cfg: ModelConfig) -> list[dict[str, Any]]:
    """The package's outputs for `cfg`, in the network's order: id, channel names, value
    range and what the channels mean."""
    specs = [
        {"id": "probability", "channels": list(cfg.class_names), "range": (0.0, 1.0),
         "description": f"probability of each mask class (sigmoid); mask = probability ≥ {cfg.threshold:g}"},
        {"id": "boundary", "channels": ["boundary"], "range": (0.0, 1.0),
         "description": "SGE boundary probability: object borders and contacts between touching objects"},
    ]
    if cfg.instance_channels and cfg.instance_map == "distance":
        specs.append({"id": "distance", "channels": ["distance"], "range": (0.0, 1.0),
                      "description": "distance to the object's border, 1 at its centre; separation map = 1 − distance"})
    elif cfg.instance_channels:
        specs.append({"id": "hover", "channels": ["hover_x", "hover_y"], "range": (-1.0, 1.0),
                      "description": "HoVer-Net x, y offsets to the object's centre; separation map = their "
                                     "gradient energy"})
    return specs


class ExportedSGDC(SGDCSegmenter):
    """An `SGDCSegmenter` built from `ModelConfig` fields, returning a tuple of maps."""

    def __init__(self, **model_config: Any):
        super().__init__(ModelConfig.from_dict(dict(model_config, pretrained=False)))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        out = super().forward(x)
        maps = [torch.sigmoid(out["mask"]), torch.sigmoid(out["edge"])]
        if "distance" in out:
            maps.append(torch.sigmoid(out["distance"]))
        if "hover" in out:
            maps.append(out["hover"].clamp(-1.0, 1.0))
        return tuple(maps)


def export_onnx(network: torch.nn.Module, example: Tensor, path: str, input_name: str, output_names: list[str],
                dynamic: bool = True) -> None:
    """The one ONNX export of the network (the package's ONNX weights, and the graph the
    `napari_sgdc.engines` ONNX Runtime and OpenVINO engines run).

    Args:
        network: a module returning a tuple of (B, C, H, W) tensors (`ExportedSGDC`, or the
            engines' logit wrapper), in eval mode on the CPU in float32.
        example: a (B, 3, H, W) input, H and W multiples of 32. path: the .onnx file to write.
        input_name, output_names: the graph's tensor names (one per output, in order).
        dynamic: batch, y and x as dynamic axes; False fixes them to `example`'s shape.
    """
    axes = None
    if dynamic:
        axes = {input_name: {0: "batch", 2: "y", 3: "x"}, **{n: {0: "batch", 2: "y", 3: "x"} for n in output_names}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about the size checks, which hold for multiples of 32
        torch.onnx.export(network, (example,), str(path), input_names=[input_name], output_names=list(output_names),
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
