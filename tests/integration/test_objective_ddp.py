"""THE invariant: 1 process and 2 gloo processes give the same step, to float tolerance.

Same data, seed and global batch (the 2-process global batch is rank 0's local half,
then rank 1's). Compared after every step of a short SGD run: ArcFace loss, CCS,
NNCCS, CR labels, the variance table, weights, IG loss, total, the DDP-averaged
gradients of the model, the classifier gradients by class, and at the end the
unsharded classifier, its momentum and the table. The model is called as the trainer calls it,
`net(fr, reg)` (one DDP forward; separate backbone forwards in one config, joint in the other). The initial state is saved on one
process and loaded on two (re-sharding), with a class count (7) that 2 does not divide.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.config import LossConfig, VarianceConfig
from pipeline.method.model import FIQAModel
from pipeline.method.objective import IGFIQAObjective
from pipeline.parallel.collectives import all_gather_no_grad, rank, world_size
from pipeline.parallel.sharding import gather_class_rows
from pipeline.training.schedules import alpha_at

NUM_CLASSES, DIM, IN_FEATURES, STEPS = 7, 16, 24, 3
CONFIGS = {
    "paper_defaults": (LossConfig(), VarianceConfig(), "separate"),
    "switches_flipped": (
        LossConfig(margin="cosface", ig_reduction="sum", smooth_l1_beta=1.0),
        VarianceConfig(update_from="reg", fold="mean", order="weigh_then_update"),
        "joint",
    ),
}


def _spec() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    steps = []
    for _ in range(STEPS):
        steps.append(
            {
                "fr_x": torch.randn(8, IN_FEATURES, generator=g),
                # class 3 on both ranks and several times on one: exercises the global-order fold
                "fr_y": torch.tensor([3, 0, 3, 1, 3, 5, 6, 3]),
                "reg_x": torch.randn(8, IN_FEATURES, generator=g),
                "reg_y": torch.tensor([2, 3, 4, 3, 6, 3, 0, 1]),
            }
        )
    model = _tiny_model()
    initial = {
        "classifier": torch.randn(NUM_CLASSES, DIM, generator=g) * 0.1,
        "classifier_momentum": torch.randn(NUM_CLASSES, DIM, generator=g) * 0.01,
        "variance": 0.9 + 0.1 * torch.rand(NUM_CLASSES, generator=g),
    }
    return {"steps": steps, "model": model.state_dict(), "initial": initial}


def _tiny_model(forward: str = "separate") -> FIQAModel:
    torch.manual_seed(1)
    backbone = nn.Sequential(nn.Linear(IN_FEATURES, 32), nn.PReLU(32), nn.Linear(32, DIM))
    return FIQAModel(backbone, DIM, forward_mode=forward)  # type: ignore[arg-type]


def _run(spec: dict[str, Any], loss_cfg: LossConfig, var_cfg: VarianceConfig, forward: str) -> dict[str, Any]:
    """A short training run on this process's share of every global batch."""
    size, me = world_size(), rank()
    model = _tiny_model(forward)
    model.load_state_dict(spec["model"])
    net: nn.Module = DistributedDataParallel(model) if size > 1 else model
    objective = IGFIQAObjective(NUM_CLASSES, DIM, loss_cfg, var_cfg, seed=3).train()
    record: dict[str, Any] = {"init_classifier": objective.classifier.full_state(dst=None)["classifier"]}
    model_opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    clf_opt = torch.optim.SGD(objective.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    objective.load_full_state(spec["initial"], clf_opt)

    record["steps"] = []
    for index, step in enumerate(spec["steps"]):
        n_fr, n_reg = len(step["fr_y"]) // size, len(step["reg_y"]) // size
        fr_x, fr_y = step["fr_x"][me * n_fr : (me + 1) * n_fr], step["fr_y"][me * n_fr : (me + 1) * n_fr]
        reg_x, reg_y = (
            step["reg_x"][me * n_reg : (me + 1) * n_reg],
            step["reg_y"][me * n_reg : (me + 1) * n_reg],
        )
        emb, quality = net(fr_x, reg_x)  # as the trainer calls it: one DDP forward of both halves
        model_opt.zero_grad()
        clf_opt.zero_grad()
        out = objective(
            emb[:n_fr],
            fr_y,
            emb[n_fr:],
            quality[n_fr:],
            reg_y,
            alpha=alpha_at(index / STEPS, VarianceConfig()),
        )
        out.total.backward()
        record["steps"].append(
            {
                **{k: getattr(out, k).detach().clone() for k in ("loss_arc", "loss_ig", "total")},
                **{
                    k: all_gather_no_grad(getattr(out, k))
                    for k in ("cr", "ccs", "nnccs", "weights", "fr_ccs")
                },
                "table": objective.variance.full_state(dst=None),
                # what this rank holds: its class range only (a full copy means sharding is off)
                "held_classifier_rows": objective.classifier.weight.detach().clone(),
                "held_table": objective.variance.values.detach().clone(),
                # μ_v and σ_v as the weights use them (collective: every rank calls it)
                "variance_stats": torch.stack(
                    objective.variance.weights(torch.arange(NUM_CLASSES))[1:]
                ).float(),
                "model_grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "classifier_grad": gather_class_rows(objective.classifier.weight.grad, NUM_CLASSES, dst=None),
            }
        )
        model_opt.step()
        clf_opt.step()
    final = objective.full_state(clf_opt, dst=0)
    record["final"] = final if me == 0 else None
    record["final_model"] = {k: v.clone() for k, v in model.state_dict().items()}
    return record


def _worker(rank_: int, world: int, port: int, spec_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_, world_size=world)
    try:
        spec = torch.load(spec_path, weights_only=False)
        results = {name: _run(spec, *cfgs) for name, cfgs in CONFIGS.items()}
        torch.save(results, Path(out_dir) / f"rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _close(actual: Any, expected: Any, what: str) -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), what
        for key in expected:
            _close(actual[key], expected[key], f"{what}.{key}")
        return
    # Float tolerance relative to the tensor's scale (gradients reach ~1e2 with s = 64 and a
    # summed loss; sums run in another order on two ranks), plus 2e-5 absolute because σ_v
    # in the z-score amplifies float32 rounding of the table.
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(
        actual, expected, rtol=1e-4, atol=2e-5 + 2e-6 * scale, msg=lambda m: f"{what}: {m}"
    )


def _global(step: dict[str, Any]) -> dict[str, Any]:
    """A step's record without what each rank holds for itself (its shards)."""
    return {k: v for k, v in step.items() if not k.startswith("held_")}


def test_one_process_and_two_gloo_processes_agree(tmp_path: Path) -> None:
    spec = _spec()
    spec_path = tmp_path / "spec.pt"
    torch.save(spec, spec_path)
    mp.spawn(_worker, args=(2, _free_port(), str(spec_path), str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    assert not dist.is_initialized()
    for name, cfgs in CONFIGS.items():
        one = _run(spec, *cfgs)
        # prototypes drawn at init do not depend on the world size
        torch.testing.assert_close(two[0][name]["init_classifier"], one["init_classifier"], rtol=0, atol=0)
        for r in range(2):
            got = two[r][name]
            for index, (step_two, step_one) in enumerate(zip(got["steps"], one["steps"])):
                _close(_global(step_two), _global(step_one), f"{name} rank {r} step {index}")
            _close(got["final_model"], one["final_model"], f"{name} rank {r} final model")
        _close(two[0][name]["final"], one["final"], f"{name} final sharded state")
        assert set(one["final"]) == {"classifier", "classifier_momentum", "variance"}
        assert two[1][name]["final"] is None
        # Sharding is on: each rank holds only its class range (7 classes: rows 0-3 and 4-6) of the
        # classifier and the table, and together the shards are the 1-process state of that step.
        for index, step_one in enumerate(one["steps"]):
            held = [two[r][name]["steps"][index] for r in range(2)]
            assert [h["held_classifier_rows"].shape[0] for h in held] == [4, 3]
            assert [h["held_table"].shape[0] for h in held] == [4, 3]
            _close(
                torch.cat([h["held_table"] for h in held]), step_one["table"], f"{name} step {index} shards"
            )
            # μ_v and σ_v come from the all-reduce over both shards: every rank has the 1-process
            # (whole-table) figures, which differ from what either shard alone would give
            for h in held:
                _close(h["variance_stats"], step_one["variance_stats"], f"{name} step {index} mu/sigma")
            table = step_one["table"].double()
            for shard in (table[:4], table[4:]):
                assert (
                    abs(float(shard.mean()) - float(table.mean())) > 1e-6
                    or abs(float(shard.std(unbiased=False)) - float(table.std(unbiased=False))) > 1e-6
                )
        # the run did something: weights below 1 appeared and the table moved
        weights = torch.cat([s["weights"] for s in one["steps"]])
        assert (weights < 1).any()
        assert not torch.allclose(one["final"]["variance"], spec["initial"]["variance"])
