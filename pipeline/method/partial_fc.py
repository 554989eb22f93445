"""Partial FC on one class shard: which rows a step uses, NNCCS over all rows, the SGD step of those rows.

`ParallelMarginClassifier` with `loss.partial_fc.sample_rate < 1` computes logits against a
sample of its shard's prototypes (the positives of the global batch that it owns plus random
negatives, `draw_rows`), as arcface_torch's partial_fc_v2 does. The sample is a fixed number
of rows (`sample_count`) chosen by `topk` of seeded random keys with the positives' keys
raised above every other: no shape depends on the data, so nothing waits for the device.

The update differs from partial_fc_v2 on purpose. partial_fc_v2 indexes the weight
parameter in the forward and lets the dense optimizer step the whole parameter, so the
gradient is a dense [C, D] tensor of zeros outside the sample, and every unsampled row still
decays its momentum, takes weight decay and moves by its old momentum. Here the sampled rows
are a separate leaf tensor, the weight parameter gets no gradient (so the ordinary SGD
skips it), and `sampled_sgd_step` applies torch's SGD formula (momentum, weight decay, no
dampening) to the sampled rows only: the weight and momentum of an unsampled row are exactly
what they were, no [C, D] gradient is ever built, and the momentum stays in the optimizer's
state where checkpoints (and the re-shard on resume) already find it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_NNCCS_CHUNK_ELEMENTS = 1 << 24  # [B, rows] cosines per chunk of the exact NNCCS (64 MiB in float32)


def sample_count(num_local: int, sample_rate: float, global_batch: int) -> int:
    """Rows one step uses in a shard of `num_local` classes.

    ceil(sample_rate × num_local), raised to the global batch size (the most positives a shard
    can own) so that every positive fits, and never more than the shard.
    """
    # rounded first: 0.3 × 20 is 6.000000000000001 in floats, and should give 6 rows, not 7
    wanted = math.ceil(round(sample_rate * num_local, 6))
    return min(num_local, max(wanted, global_batch))


def step_seed(seed: int, step: int, rank: int) -> int:
    """The generator seed of one rank's draw at one step (run seed, step, rank; non-negative)."""
    return ((seed * 1_000_003 + step) * 65_537 + rank) % (1 << 63)


def draw_rows(local_target: torch.Tensor, num_local: int, count: int, seed: int) -> torch.Tensor:
    """Sorted row indices (this shard's numbering) of one step's sample: every owned positive
    (`local_target` ≥ 0) and random negatives, `count` rows in all."""
    device = local_target.device
    generator = torch.Generator(device=device).manual_seed(seed)
    keys = torch.rand(num_local + 1, generator=generator, device=device)
    # a positive's key becomes 2, above every negative's; other shards' samples write the spare
    # last slot. Every write is the same value, so the fill is deterministic on CUDA too.
    slot = torch.where(local_target >= 0, local_target, num_local)
    keys.index_fill_(0, slot, 2.0)
    return keys[:num_local].topk(count).indices.sort().values


def positions_in(rows: torch.Tensor, local_target: torch.Tensor) -> torch.Tensor:
    """Each target's column among the sorted `rows`, −1 where another shard owns the class.

    A target this shard owns but the rows leave out is refused (on a GPU asynchronously).
    """
    owned = local_target >= 0
    pos = torch.searchsorted(rows, local_target.clamp_min(0)).clamp_max(rows.numel() - 1)
    present = rows[pos] == local_target
    ok = (present | ~owned).all()
    if rows.is_cuda:
        torch._assert_async(ok, "the sampled rows leave out a positive of the batch")
    elif not ok:
        raise ValueError("the sampled rows leave out a positive class of the batch")
    return torch.where(owned, pos, torch.full_like(pos, -1))


@torch.no_grad()
def max_other_cosine(
    unit_embeddings: torch.Tensor,
    weight: torch.Tensor,
    local_target: torch.Tensor,
    row_ids: torch.Tensor | None,
) -> torch.Tensor:
    """Per sample, the largest cosine to a row of `weight` that is not its own class (−inf if none).

    `row_ids` gives the shard row of each row of `weight` (None: `weight` is the whole shard,
    taken in chunks so that no [B, C_local] matrix is built). `unit_embeddings` are normalised.
    """
    batch = unit_embeddings.shape[0]
    best = unit_embeddings.new_full((batch,), -math.inf)
    chunk = max(1, _NNCCS_CHUNK_ELEMENTS // max(batch, 1))
    for start in range(0, weight.shape[0], chunk):
        rows = weight[start : start + chunk]
        cos = F.linear(unit_embeddings, F.normalize(rows.to(unit_embeddings.dtype), dim=1))
        if row_ids is None:  # the own class is at most one column of the chunk: overwrite it alone
            column = (local_target - start).clamp(0, rows.shape[0] - 1)[:, None]
            own = ((local_target >= start) & (local_target < start + rows.shape[0]))[:, None]
            cos.scatter_(1, column, torch.where(own, -math.inf, cos.gather(1, column)))
        else:
            cos.masked_fill_(row_ids[start : start + chunk][None, :] == local_target[:, None], -math.inf)
        best = torch.maximum(best, cos.amax(dim=1))
    # clamped once here rather than over every [B, rows] chunk (the same values: clamp is monotone);
    # −inf (no other class) stays −inf
    return torch.where(best > -math.inf, best.clamp(-1.0, 1.0), best)


@torch.no_grad()
def sampled_sgd_step(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor, row_grad: torch.Tensor
) -> None:
    """torch.optim.SGD's update for `param[rows]` alone, with the group's lr, momentum and weight decay.

    d = g + wd·w; buf = momentum·buf + d (buf starts at 0, which equals SGD's first-step
    buf = d); w −= lr·buf. Other rows and their momentum are left as they are.
    """
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise ValueError("the classifier's optimizer does not hold its weight")
    if group.get("dampening", 0) or group.get("nesterov", False) or group.get("maximize", False):
        raise ValueError("Partial FC's row update supports SGD without dampening, Nesterov or maximize")
    lr, momentum, decay = group["lr"], group.get("momentum", 0.0), group.get("weight_decay", 0.0)
    weight = param.index_select(0, rows)
    step = row_grad if decay == 0 else row_grad.add(weight, alpha=decay)
    if momentum:
        state = optimizer.state[param]
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = state["momentum_buffer"] = torch.zeros_like(param)
        step = buffer.index_select(0, rows).mul_(momentum).add_(step)
        # indexed assignment (index_put_), which deterministic mode allows on CUDA; index_copy_ it refuses
        buffer[rows] = step
    param[rows] = weight.add_(step, alpha=-lr)
