"""Devices: choosing one, finding a model's, and running a model in eval mode safely."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Turns a device name into a `torch.device`.

    Args:
        name: ``auto`` (CUDA, then MPS, then CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.

    Raises:
        ValueError: for an unknown name or a device this machine does not have.
    """
    if isinstance(name, torch.device):
        return name
    name = str(name).lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device auto or cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but Apple MPS is not available; use --device auto or cpu")
    return torch.device(name)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for an empty model."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Runs the block with every submodule in eval mode, then restores each one's own mode.

    ``model.train(was_training)`` would switch every submodule back to train mode and so
    undo a frozen encoder or frozen BatchNorm layers; this restores them one by one.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def bf16_supported(device: torch.device | str) -> bool:
    """Whether `device` runs bfloat16 natively: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX (where oneDNN has bf16 kernels; elsewhere bf16 is emulated and slow)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast when enabled and `device` runs bf16 natively (`bf16_supported`); a no-op
    otherwise, so ``amp`` is a speed option that never makes a run fail or slower."""
    if not enabled or not bf16_supported(device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def memory_format(device: torch.device | str) -> torch.memory_format:
    """The memory format the network runs in on `device`: channels_last on CPU and CUDA
    (it roughly halves the CPU forward time of the convolutions), contiguous elsewhere (MPS)."""
    return torch.channels_last if torch.device(device).type in ("cpu", "cuda") else torch.contiguous_format


def forward(model: torch.nn.Module, batch: torch.Tensor, device: torch.device | str, amp: bool = False,
            **kwargs) -> dict:
    """The one way a batch goes through the network (inference, validation, training and the
    benchmarks): on `device`, in its `memory_format`, under `autocast` when `amp`.

    Args:
        model: the network (already on `device`; the caller sets eval or train mode and grad).
        batch: (B, 3, H, W) float input, H and W multiples of the model's ``size_multiple``.
        device: where the model runs. amp: bf16 autocast where the device runs it natively.
        **kwargs: passed to the model (``return_gates``).

    Returns:
        The model's output dict.
    """
    device = torch.device(device)
    batch = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format(device))
    with autocast(device, amp):
        return model(batch, **kwargs)



SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""The /proc/cpuinfo flags that decide how fast the network runs on a CPU."""


def cpu_description() -> str:
    """The CPU the way every benchmark prints it: its model, its vector flags (/proc/cpuinfo) and
    what torch actually uses on it — ATen's vector capability, oneDNN's ISA cap where
    ``ONEDNN_MAX_CPU_ISA`` sets one, and whether bf16 runs natively. Capping the ISA
    (``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``) runs an AVX2-only CPU's code paths on
    an AVX-512 machine; the line then says so."""
    import os
    import platform
    from pathlib import Path

    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine() or "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = " ".join(flag for flag in SIMD_FLAGS if flag in flags) or "none of " + "/".join(SIMD_FLAGS)
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "?"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    runs = f"torch {capability}" + (f", oneDNN capped at {cap}" if cap else "")
    runs += f", bf16 {'native' if bf16_supported('cpu') else 'not native'}"
    return f"{model}; {os.cpu_count()} cpus; flags: {wanted}; runs: {runs}"
