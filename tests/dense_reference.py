"""A dense, unsharded, loop-based reference of the IG-FIQA formulas, for the tests only.

Written independently of `pipeline/`: ArcFace through acos/cos, NNCCS by an explicit
loop over the other classes, the EMA one sample at a time, σ from torch.std.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def cosines(embeddings: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).T).clamp(-1.0, 1.0)


def margin_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    weight: torch.Tensor,
    *,
    margin: str = "arcface",
    scale: float = 64.0,
    arc_margin: float = 0.5,
    cos_margin: float = 0.35,
) -> torch.Tensor:
    """Mean softmax cross-entropy with the additive angular (or cosine) margin on the target."""
    cos = cosines(embeddings, weight)
    rows = torch.arange(len(labels))
    target = cos[rows, labels]
    if margin == "arcface":
        theta = torch.acos(target)
        shifted = torch.where(
            theta + arc_margin < math.pi,
            torch.cos(theta + arc_margin),
            target - arc_margin * math.sin(math.pi - arc_margin),
        )
    else:
        shifted = target - cos_margin
    one_hot = F.one_hot(labels, weight.shape[0]).bool()
    logits = torch.where(one_hot, shifted[:, None], cos) * scale
    return F.cross_entropy(logits, labels)


def ccs_nnccs(
    embeddings: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cosines(embeddings, weight).detach()
    ccs, nnccs = [], []
    for i, y in enumerate(labels.tolist()):
        ccs.append(cos[i, y])
        others = [cos[i, j] for j in range(weight.shape[0]) if j != y]
        nnccs.append(max(others))
    return torch.stack(ccs), torch.stack(nnccs)


def certainty_ratio(ccs: torch.Tensor, nnccs: torch.Tensor) -> torch.Tensor:
    return ccs / (nnccs + 1.0 + 1e-9)


def update_table(
    table: torch.Tensor, labels: torch.Tensor, ccs: torch.Tensor, alpha: float, fold: str
) -> torch.Tensor:
    table = table.clone()
    if fold == "sequential":
        for y, c in zip(labels.tolist(), ccs.tolist()):
            table[y] = alpha * table[y] + (1 - alpha) * (1 - c)
        return table
    for y in sorted(set(labels.tolist())):
        mean = (1 - ccs[labels == y]).mean()
        table[y] = alpha * table[y] + (1 - alpha) * mean
    return table


def weights(table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    mean, std = table.double().mean(), table.double().std(unbiased=False)
    if std == 0:
        return torch.ones(len(labels))
    z = (table.double()[labels] - mean) / std
    return (1 + z.clamp(-1, 0)).float()


def smooth_l1(d: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.where(d.abs() < beta, 0.5 * d * d / beta, d.abs() - 0.5 * beta)


def ig_loss(
    quality: torch.Tensor, cr: torch.Tensor, w: torch.Tensor, beta: float, reduction: str = "mean"
) -> torch.Tensor:
    total = (w * smooth_l1(cr - quality, beta)).sum()
    return total / len(quality) if reduction == "mean" else total


def objective_step(
    weight: torch.Tensor,
    table: torch.Tensor,
    fr_embeddings: torch.Tensor,
    fr_labels: torch.Tensor,
    reg_embeddings: torch.Tensor,
    reg_quality: torch.Tensor,
    reg_labels: torch.Tensor,
    progress: float,
    *,
    mode: str = "ig",
    update_from: str = "fr",
    order: str = "update_then_weigh",
    fold: str = "sequential",
    beta: float = 0.5,
    lam: float = 10.0,
    reduction: str = "mean",
) -> dict[str, torch.Tensor]:
    """One IG-FIQA step on the whole (global) batch, dense and unsharded."""
    loss_arc = margin_loss(fr_embeddings, fr_labels, weight)
    ccs, nnccs = ccs_nnccs(reg_embeddings, reg_labels, weight)
    cr = certainty_ratio(ccs, nnccs)
    alpha = 0.9 + 0.1 * progress
    if update_from == "fr":
        upd_labels, upd_ccs = fr_labels, ccs_nnccs(fr_embeddings, fr_labels, weight)[0]
    else:
        upd_labels, upd_ccs = reg_labels, ccs
    if order == "update_then_weigh":
        table = update_table(table, upd_labels, upd_ccs, alpha, fold)
        w = weights(table, reg_labels)
    else:
        w = weights(table, reg_labels)
        table = update_table(table, upd_labels, upd_ccs, alpha, fold)
    if mode == "cr":
        w = torch.ones_like(w)
    loss_ig = ig_loss(reg_quality, cr, w, beta, reduction)
    return {
        "loss_arc": loss_arc,
        "loss_ig": loss_ig,
        "total": loss_arc + lam * loss_ig,
        "cr": cr,
        "ccs": ccs,
        "nnccs": nnccs,
        "weights": w,
        "table": table,
    }
