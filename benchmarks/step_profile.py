"""Where the training step's time goes, lever by lever (the `perf` config switches), with torch.profiler.

For each variant (a set of `perf` values) the loop's own step (`pipeline.training.step.TrainStep`:
both halves' forwards, the objective, backward, clip, SGD) runs on one batch of random tensors on
one device: warm-up steps (compilation happens there; their seconds are reported), timed steps
(median → images/s), then profiled steps. The profile is summarised as ops (or, on CUDA, kernels)
per step, the share of self time per category and the share in memory-bound work (BatchNorm,
PReLU, elementwise adds and muls, copies and layout changes, the optimizer's updates, Inductor's
fused pointwise kernels) against convolutions and matmuls, and the top entries by time. On CUDA it
adds the backbone's FLOPs per step (FlopCounterMode), TFLOP/s and MFU against this card's measured
bf16 matmul peak, as benchmarks/train_step.py counts them.

Prints one JSON line per variant as it finishes (a time limit that stops the run keeps those) and
ONE JSON object with all of them as the last stdout line; logs go to stderr.

    .venv/bin/python benchmarks/step_profile.py --device cpu --backbone iresnet50 --fr-batch 4 \\
        --reg-batch 4 --variants nchw,channels_last,foreach
    python benchmarks/step_profile.py --device cuda --fr-batch 256 --reg-batch 256 --fp16 \\
        --variants nchw,channels_last,channels_last+fused,channels_last+fused+compile
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import shutil
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
from torch.profiler import ProfilerActivity, profile

from benchmarks.train_step import _git, matmul_peak_tflops, step_flops
from pipeline.config import TrainConfig, config_from_dict
from pipeline.training.schedules import StepValues
from pipeline.training.step import TrainStep

log = logging.getLogger("bench.step_profile")

# variant name → perf values. nchw with the SGD loop is what the step ran on CPU before the perf
# switches existed, nchw+foreach what it ran on CUDA (torch's own default there)
VARIANTS: dict[str, dict[str, Any]] = {
    "nchw": {"memory_format": "contiguous", "optimizer_impl": "loop", "compile": "none"},
    "nchw+foreach": {"memory_format": "contiguous", "optimizer_impl": "foreach", "compile": "none"},
    "channels_last": {"memory_format": "channels_last", "optimizer_impl": "loop", "compile": "none"},
    "channels_last+foreach": {
        "memory_format": "channels_last",
        "optimizer_impl": "foreach",
        "compile": "none",
    },
    "channels_last+fused": {"memory_format": "channels_last", "optimizer_impl": "fused", "compile": "none"},
    "channels_last+fused+compile": {
        "memory_format": "channels_last",
        "optimizer_impl": "fused",
        "compile": "backbone",
    },
    "nchw+compile": {"memory_format": "contiguous", "optimizer_impl": "foreach", "compile": "backbone"},
    "nchw+fused+compile": {"memory_format": "contiguous", "optimizer_impl": "fused", "compile": "backbone"},
}

# self-time categories, by op or kernel name (first match wins); MEMORY_BOUND are the ones that move
# bytes rather than do arithmetic at a 112-px ResNet's sizes
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("optimizer", ("sgd", "multi_tensor_apply", "_foreach_", "fused_sgd")),
    # Inductor's fused kernels before the rest: their names list the ops they fuse (batch_norm, ...)
    ("fused_pointwise", ("cpp_fused", "triton_poi", "triton_red", "triton_per")),
    # cuDNN's BatchNorm and layout kernels before the convolutions (their names say cudnn too)
    ("batchnorm", ("batch_norm", "batchnorm", "bn_fw", "bn_bw", "welford")),
    ("prelu", ("prelu",)),
    ("copy_layout", ("nchwtonhwc", "nhwctonchw", "transpose", "permute")),
    ("conv", ("conv", "mkldnn_convolution", "cudnn", "implicit_gemm", "xmma_fprop", "dgrad", "wgrad")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "gemm", "matmul", "cutlass", "sm90_", "sm80_")),
    ("compiled_region", ("compiledfunction", "compiled region", "inductor")),
    ("copy_layout", ("copy", "contiguous", "clone", "_to_copy", "aten::to", "aten::cat", "cat_")),
    (
        "elementwise",
        ("add", "mul", "sub", "div", "where", "fill", "zero", "neg", "exp", "log", "sqrt", "pow"),
    ),
    ("reduction", ("sum", "mean", "norm", "max", "min", "softmax", "reduce")),
]
MEMORY_BOUND = {
    "optimizer",
    "batchnorm",
    "prelu",
    "fused_pointwise",
    "copy_layout",
    "elementwise",
    "reduction",
}
COMPUTE_BOUND = {"conv", "matmul"}
_MARKERS = ("ProfilerStep", "Optimizer.", "## ")  # profiler and optimizer markers: no work of their own


def category(name: str) -> str:
    """The category of an op or kernel name (`other` when none matches)."""
    lowered = name.lower()
    for label, needles in CATEGORIES:
        if any(needle in lowered for needle in needles):
            return label
    return "other"


def variant_config(args: argparse.Namespace, perf: dict[str, Any]) -> TrainConfig:
    """protocol S's model and objective at this run's batch, device and perf values."""
    return config_from_dict(
        {
            "data": {"fr_batch": args.fr_batch, "reg_batch": args.reg_batch, "num_classes": args.classes},
            "model": {
                "backbone": args.backbone,
                "embedding_size": args.embedding,
                "fp16": args.fp16,
                "head_init": "uniform",
            },
            "run": {"device": args.device, "tracking_uri": "off"},
            "perf": perf,
        }
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _under_optimizer(event: Any) -> bool:
    """Whether a profiled op ran inside `Optimizer.step` (its SGD update, whatever its op names)."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step#"):
            return True
        parent = parent.cpu_parent
    return False


def profile_rows(prof: Any, device: torch.device) -> list[tuple[str, str, float]]:
    """(name, category, seconds) of each profiled op's self CPU time (CPU) or each CUDA kernel's
    duration (every device event, each once; the op that launched it, found by correlation id,
    says whether the optimizer did); anything the optimizer ran is `optimizer`, whatever its name."""
    events = list(prof.events())
    cpu = torch.autograd.DeviceType.CPU
    launched_by = {event.id: event for event in events if event.device_type == cpu}
    rows = []
    for event in events:
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            parent = launched_by.get(getattr(event, "linked_correlation_id", 0))
            label = "optimizer" if parent is not None and _under_optimizer(parent) else category(event.name)
            rows.append((event.name, label, (event.time_range.end - event.time_range.start) / 1e6))
        elif event.device_type == cpu and not event.name.startswith(_MARKERS):
            label = "optimizer" if _under_optimizer(event) else category(event.name)
            rows.append((event.name, label, event.self_cpu_time_total / 1e6))
    return [row for row in rows if row[2] > 0]


def summarise(prof: Any, steps: int, device: torch.device, top: int) -> dict[str, Any]:
    """Per-step op (or kernel) counts, time shares by category, the memory-bound share and the top
    entries: on CUDA the device's kernels, on CPU the host's ATen ops (self time, no double count)."""
    rows = profile_rows(prof, device)
    total = sum(seconds for _, _, seconds in rows) or 1.0
    shares: dict[str, float] = defaultdict(float)
    by_name: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for name, label, seconds in rows:
        shares[label] += seconds / total
        by_name[name][0] += 1
        by_name[name][1] += seconds
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])
    return {
        "timed_by": "CUDA kernels, device time" if device.type == "cuda" else "ATen ops, self CPU time",
        "entries_per_step": round(len(rows) / steps, 1),
        "distinct_entries": len(by_name),
        "profiled_s_per_step": round(total / steps, 4),
        "share": {label: round(value, 4) for label, value in sorted(shares.items(), key=lambda kv: -kv[1])},
        "memory_bound_share": round(sum(v for k, v in shares.items() if k in MEMORY_BOUND), 4),
        "compute_bound_share": round(sum(v for k, v in shares.items() if k in COMPUTE_BOUND), 4),
        "top": [
            [name[:90], round(count / steps, 1), round(seconds / steps * 1e3, 3), round(seconds / total, 4)]
            for name, (count, seconds) in ranked[:top]
        ],
    }


def backbone_flops(args: argparse.Namespace, device: torch.device, images: torch.Tensor) -> int:
    """FLOPs of one step's backbone + head forward and backward, counted once on an eager model (the
    same for every variant; counting through a compiled backbone would compile it again)."""
    if "flops" not in _FLOPS:
        eager = TrainStep(variant_config(args, VARIANTS["nchw"]), args.classes, device, world_size=1)
        eager.train()
        _FLOPS["flops"] = step_flops(eager, images)
    return _FLOPS["flops"]


_FLOPS: dict[str, int] = {}


def run_variant(args: argparse.Namespace, name: str, peak: float | None) -> dict[str, Any]:
    """Warm up, time and profile one variant's step; the figures as a dict."""
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    perf = VARIANTS[name]
    torch.manual_seed(0)
    step = TrainStep(variant_config(args, perf), args.classes, device, world_size=1)
    step.train()
    fr, batch = args.fr_batch, args.fr_batch + args.reg_batch
    images = torch.rand(batch, 3, 112, 112, device=device) * 2 - 1
    labels = torch.randint(0, args.classes, (batch,), device=device)
    values = StepValues(lr=0.1, alpha=0.9)

    def one() -> float:
        _sync(device)
        start = time.perf_counter()
        step(images[:fr], labels[:fr], images[fr:], labels[fr:], values)
        _sync(device)
        return time.perf_counter() - start

    warmup_s = sum(one() for _ in range(args.warmup))
    times = [one() for _ in range(args.steps)]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_steps):
            one()
    seconds = statistics.median(times)
    result: dict[str, Any] = {
        "variant": name,
        "perf": perf,
        "optimizer": step.optimizer_choice.impl,
        "optimizer_reason": step.optimizer_choice.reason,
        "warmup_s": round(warmup_s, 2),
        "step_s": round(seconds, 4),
        "img_per_s": round(batch / seconds, 2),
        "profile": summarise(prof, args.profile_steps, device, args.top),
    }
    if device.type == "cuda":
        flops = backbone_flops(args, device, images)
        achieved = flops * result["img_per_s"] / batch / 1e12
        result.update({"backbone_flops_per_step": flops, "tflops": round(achieved, 1)})
        if peak:
            result["mfu"] = round(achieved / peak, 4)
    if args.trace_dir is not None:
        args.trace_dir.mkdir(parents=True, exist_ok=True)
        raw = args.trace_dir / f"{name}.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as source, gzip.open(f"{raw}.gz", "wb") as target:
            shutil.copyfileobj(source, target)
        raw.unlink()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--backbone", default="iresnet50")
    parser.add_argument("--embedding", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10572, help="classifier classes (CASIA-WebFace's)")
    parser.add_argument("--fr-batch", type=int, default=4)
    parser.add_argument("--reg-batch", type=int, default=4)
    parser.add_argument("--fp16", action="store_true", help="bf16 autocast (CUDA only, as model.fp16)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (compilation is here)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    parser.add_argument("--profile-steps", type=int, default=1)
    parser.add_argument("--top", type=int, default=8, help="top entries by time in each summary")
    parser.add_argument(
        "--variants",
        default="nchw,channels_last,channels_last+foreach",
        help=f"comma-separated, of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--trace-dir", type=Path, default=None, help="write NAME.json.gz Chrome traces here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    names = [name for name in args.variants.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    # Inductor's CPU kernels as named profiler entries (cpp_fused_...), not one opaque compiled region
    torch._inductor.config.cpp.enable_kernel_profile = True
    peak = matmul_peak_tflops(torch.device("cuda", 0)) if args.device == "cuda" else None
    results = []
    for name in names:
        log.info("variant %s: %s", name, VARIANTS[name])
        try:
            result = run_variant(args, name, peak)
        except Exception as exc:  # one lever failing (e.g. no compiler for Inductor) leaves the others
            result = {"variant": name, "perf": VARIANTS[name], "error": f"{type(exc).__name__}: {exc}"[:500]}
        if args.device == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()
        print(json.dumps(result), flush=True)
        results.append(result)
    summary = {
        "bench": "step_profile",
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "backbone": args.backbone,
        "batch": [args.fr_batch, args.reg_batch],
        "autocast": "bf16" if args.fp16 and args.device == "cuda" else "none",
        "matmul_peak_tflops": round(peak, 1) if peak else None,
        "variants": results,
        "git": _git(),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
