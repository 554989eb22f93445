"""The training step's speed switches (`perf` in the config): memory layout, SGD kernel, compilation.

None of them changes what a step computes, only how: the model's weights and the checkpoint's
state dict keep their names, dtypes and values up to float rounding. `TrainStep` applies them
in this order: `apply_channels_last` before DDP wraps the model (DDP's gradient buckets then
take the gradients' NHWC strides), `compile_backbone` after it, `build_sgd` for each optimizer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import OptimConfig, PerfConfig

log = logging.getLogger(__name__)

OPTIMIZER_IMPLS = ("loop", "foreach", "fused")


def resolve_channels_last(memory_format: str, device: torch.device, model: nn.Module) -> bool:
    """`perf.memory_format` on `device` as a yes/no: auto → NHWC on CUDA, and on CPU the layout
    the backbone's builder chose (its `channels_last` attribute; NCHW when it has none)."""
    if memory_format == "auto":
        if device.type == "cuda":
            return True
        backbone = getattr(model, "backbone", model)
        return bool(getattr(backbone, "channels_last", False))
    if memory_format not in ("channels_last", "contiguous"):
        raise ValueError(
            f"perf.memory_format: unknown {memory_format!r}, use auto, channels_last or contiguous"
        )
    return memory_format == "channels_last"


def apply_channels_last(model: nn.Module, channels_last: bool) -> None:
    """Every conv weight (and each backbone's input) in NHWC when `channels_last`, else NCHW.

    A backbone with a `channels_last` attribute (iResNet) also converts its input images, so the
    whole forward runs in one layout; 2-D tensors (Linear, BatchNorm) have no layout to change.
    """
    for module in model.modules():
        if hasattr(module, "channels_last"):
            module.channels_last = channels_last
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass(frozen=True)
class OptimizerChoice:
    """Which SGD implementation runs (`impl`) and why (`reason`, for the log and benchmarks)."""

    impl: str  # loop | foreach | fused
    reason: str


def resolve_optimizer_impl(wanted: str, device: torch.device) -> OptimizerChoice:
    """`perf.optimizer_impl` on `device`: auto → fused on CUDA, loop elsewhere; fused where this
    torch has no fused SGD for the device falls back to foreach, saying so."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if wanted == "auto":
        if device.type == "cuda":
            wanted, why = "fused", "auto on CUDA"
        else:
            return OptimizerChoice("loop", f"auto on {device.type}: the per-parameter loop")
    else:
        why = "perf.optimizer_impl"
    if wanted not in OPTIMIZER_IMPLS:
        raise ValueError(f"perf.optimizer_impl: unknown {wanted!r}, use auto, {', '.join(OPTIMIZER_IMPLS)}")
    if wanted == "fused" and device.type not in _get_fused_kernels_supported_devices():
        return OptimizerChoice(
            "foreach", f"{why}: fused, but torch {torch.__version__} has no fused SGD on {device.type}"
        )
    return OptimizerChoice(wanted, why)


def build_sgd(
    groups: list[dict[str, object]] | list[nn.Parameter],
    optim: OptimConfig,
    choice: OptimizerChoice,
) -> torch.optim.SGD:
    """torch.optim.SGD with the config's momentum and weight decay, run as `choice` says."""
    return torch.optim.SGD(
        groups,
        lr=optim.lr,
        momentum=optim.momentum,
        weight_decay=optim.weight_decay,
        foreach=choice.impl == "foreach",
        fused=choice.impl == "fused",
    )


def compile_backbone(model: nn.Module, perf: PerfConfig) -> None:
    """`torch.compile` the model's backbone in place when `perf.compile` is backbone.

    In place (`nn.Module.compile`): the module and its parameter names stay as they are, so
    checkpoints, DDP and the optimizers see the same model; the first forward in each BatchNorm
    mode (the FR half in train mode, the regression half as `model.reg_bn` says) compiles once.
    """
    if perf.compile == "none":
        return
    if perf.compile != "backbone":
        raise ValueError(f"perf.compile: unknown {perf.compile!r}, use none or backbone")
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError(f"perf.compile backbone: {type(model).__name__} has no backbone to compile")
    backbone.compile()
    log.info("perf.compile: the backbone is compiled with torch.compile (first steps compile it)")
