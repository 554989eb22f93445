"""What the second node costs a collective: gloo all-reduce on 2 nodes x 1 task vs 1 node x 2 tasks.

Submits two jobs to the local two-node cluster (`make slurm-up NODES=2`, profile
slurm/clusters/local-2node.yaml): world size 2 across the bridge (igfiqa-n1 <-> igfiqa-n2 over
veth + bridge) and world size 2 on one node (loopback). Each task times `--repeats` all-reduces
of a small tensor (latency) and of the gradient size of the tiny test model (iresnet_mini,
embedding 32: what DDP reduces every step), after a warm-up; the medians of rank 0 are reported.
Both "nodes" share this machine's cores, so this isolates what the network path adds.

Prints ONE JSON object as the last stdout line.

    .venv/bin/python benchmarks/multinode_allreduce.py [--repeats 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from jobs.cluster import load_profile, make_executor

PROFILE = Path(__file__).resolve().parents[1] / "slurm" / "clusters" / "local-2node.yaml"


def _gradient_numel() -> int:
    from pipeline.config import ModelConfig
    from pipeline.method.model import build_model

    model = build_model(ModelConfig(backbone="iresnet_mini", embedding_size=32))
    return sum(p.numel() for p in model.parameters())


def time_all_reduces(repeats: int, sizes: dict[str, int]) -> dict[str, Any]:
    """Runs in every task: join gloo through submitit's environment, time all-reduces per size."""
    import socket

    import submitit
    import torch
    import torch.distributed as dist

    env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    dist.init_process_group("gloo", rank=env.rank, world_size=env.world_size)
    medians = {}
    try:
        for name, numel in sizes.items():
            tensor = torch.ones(numel)
            for _ in range(10):
                dist.all_reduce(tensor)
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                dist.all_reduce(tensor)
                times.append(time.perf_counter() - start)
            medians[name] = statistics.median(times)
    finally:
        dist.destroy_process_group()
    return {"rank": env.rank, "host": socket.gethostname(), "median_s": medians}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    sizes = {"small_4B": 1, "gradients": _gradient_numel()}
    profile = load_profile(PROFILE)
    report: dict[str, Any] = {"gradient_floats": sizes["gradients"], "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as folder:
        for label, nodes, tasks in (("2_nodes_x_1_task", 2, 1), ("1_node_x_2_tasks", 1, 2)):
            placed = dataclasses.replace(profile, tasks_per_node=tasks)
            executor = make_executor(
                placed, Path(folder) / label, nodes=nodes, job_name=label, timeout_min=10
            )
            results = executor.submit(time_all_reduces, args.repeats, sizes).results()
            rank0 = next(r for r in results if r["rank"] == 0)
            report[label] = {
                "hosts": sorted({r["host"] for r in results}),
                **{f"{k}_us": round(v * 1e6, 1) for k, v in rank0["median_s"].items()},
            }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
