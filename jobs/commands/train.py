"""`igfiqa train` (here, N local processes) and `igfiqa submit` (SLURM through submitit).

Argument parsing and printing; launching is `jobs.launch`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAIN_HELP = """\
Train an IG-FIQA model on this machine: one process (default) or N local processes
(gloo on CPU, NCCL on GPUs). Resumes by itself from RUN_DIR/checkpoints/last.ckpt.

examples:
  igfiqa train configs/tiny_cpu.yaml --set data.dataset=work/train
  igfiqa train configs/tiny_cpu.yaml --nproc 2 --set data.dataset=work/train --set optim.max_steps=10 --set run.dir=runs/try
  igfiqa train configs/protocol_s.yaml --set data.dataset=/data/casia-shards --set optim.lr=0.05
"""

SUBMIT_HELP = """\
Validate a training config, then submit it to SLURM as one task per GPU
(nodes × tasks_per_node from the cluster profile). The job checkpoints on
preemption/timeout signals and periodically, and requeues itself; every attempt
logs into the same MLflow run, which is created now and printed.

examples:
  igfiqa submit configs/tiny_cpu.yaml --cluster slurm/clusters/local.yaml --set data.dataset=work/train --wait
  igfiqa submit configs/protocol_l.yaml --cluster slurm/clusters/example-multinode-gpu.yaml --nodes 4
  igfiqa submit configs/tiny_cpu.yaml --cluster slurm/clusters/local-2node.yaml --tasks-per-node 2
"""


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="YAML config (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, repeatable, e.g. --set optim.lr=0.05 --set data.fr_batch=256",
    )
    parser.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///./mlflow.db)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `submit`."""
    p = sub.add_parser(
        "train",
        help="train here (1 or N local processes)",
        description=TRAIN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument("--nproc", type=int, default=1, help="local processes (default 1)")
    p.set_defaults(func=run_train)

    s = sub.add_parser(
        "submit",
        help="submit a training job to SLURM",
        description=SUBMIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(s)
    s.add_argument(
        "--cluster", required=True, type=Path, help="cluster profile, e.g. slurm/clusters/local.yaml"
    )
    s.add_argument("--nodes", type=int, default=None, help="override the profile's node count")
    s.add_argument(
        "--tasks-per-node",
        type=int,
        default=None,
        help="override the profile's tasks per node (CPU profiles; GPU profiles run one task per GPU)",
    )
    s.add_argument("--wait", action="store_true", help="follow the job's log and return its exit status")
    s.set_defaults(func=run_submit)


def run_train(args: argparse.Namespace) -> int:
    """Handler of `igfiqa train`."""
    from jobs.launch import launch_local, load_launch_config

    config = load_launch_config(args.config, args.overrides, args.tracking_uri)
    result = launch_local(config, nproc=args.nproc)
    print(f"{result['status']} at step {result['global_step']}: checkpoint {result['checkpoint']}")
    if result["status"] == "interrupted":
        print("run the same command again to resume from that checkpoint (same MLflow run)")
    print(f"MLflow run {result['mlflow_run_id']} in {config.run.tracking_uri}")
    return 0 if result["status"] == "completed" else 1


def run_submit(args: argparse.Namespace) -> int:
    """Handler of `igfiqa submit`."""
    from jobs.cluster import load_profile
    from jobs.launch import follow_job, load_launch_config, submit_training

    config = load_launch_config(args.config, args.overrides, args.tracking_uri)
    profile = load_profile(args.cluster)
    submission = submit_training(config, profile, nodes=args.nodes, tasks_per_node=args.tasks_per_node)
    print(f"submitted job {submission.job_id} ({submission.world_size} tasks on {submission.nodes} node(s))")
    print(f"  stdout: {submission.stdout}")
    print(f"  stderr: {submission.stderr}")
    print(f"  run dir: {config.run.dir}")
    print(f"  MLflow run {submission.mlflow_run_id} at {config.run.tracking_uri}")
    print(f"  follow: igfiqa jobs logs {submission.job_id} --folder {submission.folder}")
    if not args.wait:
        return 0
    state = follow_job(submission, out=sys.stdout, poll_s=2.0)
    print(f"job {submission.job_id}: {state}")
    return 0 if state == "COMPLETED" else 1
