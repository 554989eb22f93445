"""The IG-FIQA objective with two NCCL processes on ONE GPU, against one process: values and time.

NCCL normally refuses two ranks on the same device ("Duplicate GPU detected"); this script
tries, and reports either the comparison (losses, CR, variance table, weights: max |2-rank −
1-rank|) and the objective's time per step, or NCCL's refusal, as one JSON object on the last
line. On a machine without CUDA it says so. A lent GPU machine runs it from
benchmarks/gpu_check.sh.

    python3 benchmarks/nccl_objective.py [--steps 20] [--classes 10572] [--batch 256]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import LossConfig, VarianceConfig
from pipeline.method.objective import IGFIQAObjective
from pipeline.parallel.collectives import all_gather_no_grad

DIM = 512


def _inputs(args: argparse.Namespace) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {
            "fr": torch.randn(args.batch, DIM, generator=generator),
            "fr_y": torch.randint(0, args.classes, (args.batch,), generator=generator),
            "reg": torch.randn(args.batch, DIM, generator=generator),
            "reg_q": torch.rand(args.batch, generator=generator),
            "reg_y": torch.randint(0, args.classes, (args.batch,), generator=generator),
        }
        for _ in range(args.steps)
    ]


def _run(args: argparse.Namespace, rank: int, world: int) -> dict[str, Any]:
    device = torch.device("cuda", 0)
    objective = IGFIQAObjective(args.classes, DIM, LossConfig(), VarianceConfig(), seed=1).to(device).train()
    losses, crs, times = [], [], []
    for step in _inputs(args):
        part = {k: v.chunk(world)[rank].to(device) for k, v in step.items()}
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = objective(part["fr"], part["fr_y"], part["reg"], part["reg_q"], part["reg_y"], 0.95)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append([float(out.loss_arc.detach()), float(out.loss_ig.detach())])
        crs.append(all_gather_no_grad(out.cr).cpu())
    table = objective.variance.full_state(dst=None).cpu()
    return {
        "losses": losses,
        "cr": torch.stack(crs),
        "table": table,
        "seconds": sorted(times)[len(times) // 2],
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, folder: str) -> None:
    try:
        torch.cuda.set_device(0)
        dist.init_process_group(
            "nccl",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            device_id=torch.device(0),
        )
        result: dict[str, Any] = _run(args, rank, world)
        dist.destroy_process_group()
    except Exception as exc:  # NCCL's refusal is the finding, not a crash
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--classes", type=int, default=10572)
    parser.add_argument("--batch", type=int, default=256, help="global regression (and FR) batch")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "nccl_objective", "result": "no CUDA device on this machine"}))
        return
    single = _run(args, 0, 1)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        os.environ.setdefault("NCCL_DEBUG", "WARN")
        mp.spawn(_worker, args=(2, port, args, folder), nprocs=2, join=True)
        ranks = [torch.load(Path(folder) / f"rank{r}.pt", weights_only=False) for r in range(2)]
    errors = [r["error"] for r in ranks if "error" in r]
    result: dict[str, Any] = {"benchmark": "nccl_objective", "gpu": torch.cuda.get_device_name(0)}
    if errors:
        result.update({"two_ranks_on_one_gpu": "refused", "nccl_error": errors[0][:400]})
    else:
        two = ranks[0]
        result.update(
            {
                "two_ranks_on_one_gpu": "ran",
                "max_abs_diff_losses": float(
                    (torch.tensor(two["losses"]) - torch.tensor(single["losses"])).abs().max()
                ),
                "max_abs_diff_cr": float((two["cr"] - single["cr"]).abs().max()),
                "max_abs_diff_table": float((two["table"] - single["table"]).abs().max()),
                "objective_ms_1_rank": round(single["seconds"] * 1e3, 3),
                "objective_ms_2_ranks": round(two["seconds"] * 1e3, 3),
            }
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
