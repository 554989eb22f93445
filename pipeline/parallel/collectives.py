"""Small collective helpers that also work with no process group (one process).

Every function takes an optional process group; when torch.distributed is not
initialised they behave as on a world of one (identity gathers, no-op reductions),
so the sharded classifier and the variance table run unchanged in a plain process.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup | None


def is_distributed(group: ProcessGroup = None) -> bool:
    """True when a process group is initialised (collectives will communicate)."""
    return dist.is_available() and dist.is_initialized()


def world_size(group: ProcessGroup = None) -> int:
    """Number of processes in `group` (1 with no process group)."""
    return dist.get_world_size(group) if is_distributed(group) else 1


def rank(group: ProcessGroup = None) -> int:
    """This process's rank within `group` (0 with no process group)."""
    return dist.get_rank(group) if is_distributed(group) else 0


def global_rank_of(group_rank: int, group: ProcessGroup = None) -> int:
    """The global rank of `group_rank` in `group` (what `dist.gather(dst=…)` expects)."""
    if group is None or not is_distributed(group):
        return group_rank
    return dist.get_global_rank(group, group_rank)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gradient over ranks and keeps this rank's rows.

    Hand-written because `torch.distributed.nn.functional.all_gather` is deprecated in
    torch 2.13 (a FutureWarning per call) and its replacement is private API. gloo has
    no reduce-scatter, so the backward all-reduces the [B_global, ...] gradient and
    slices it; NCCL uses reduce_scatter_tensor.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend(ctx.group) == "nccl":
            mine = grad.new_empty((ctx.rows, *grad.shape[1:]))
            dist.reduce_scatter_tensor(mine, grad, group=ctx.group)
            return mine, None
        total = grad.clone()
        dist.all_reduce(total, group=ctx.group)
        me = rank(ctx.group)
        return total[me * ctx.rows : (me + 1) * ctx.rows], None


def all_gather_with_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (rank order); gradients flow back to the owner.

    All ranks must pass the same shape. The backward sums, over ranks, the gradient of
    each rank's slice, so a local input receives d(Σ_r L_r)/d(input).
    """
    if world_size(group) == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor, group)


@torch.no_grad()
def all_gather_no_grad(tensor: torch.Tensor, group: ProcessGroup = None) -> torch.Tensor:
    """Concatenate every rank's `tensor` along dim 0 (rank order), without autograd."""
    if world_size(group) == 1:
        return tensor.detach()
    parts = [torch.empty_like(tensor) for _ in range(world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.cat(parts)


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX} if dist.is_available() else {}


@torch.no_grad()
def all_reduce_(
    tensor: torch.Tensor, op: Literal["sum", "max"] = "sum", group: ProcessGroup = None
) -> torch.Tensor:
    """Reduce `tensor` over ranks in place and return it (no-op on one process)."""
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:  # type: ignore[override]
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad * ctx.factor, None


def scale_grad(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by `factor` in the backward pass."""
    if factor == 1:
        return tensor
    return _ScaleGrad.apply(tensor, factor)
