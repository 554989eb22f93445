"""The classifier stages of benchmarks/scale.py, the part that runs in their child processes.

Imported by scale.py as a sibling module (the script's folder is on sys.path in the parent
and in every child); `benchmarks.partial_fc` comes from the code under test (--code).
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("bench.scale")

MS1M_CLASSES, GLINT360K_CLASSES, WEBFACE42M_CLASSES = 85_742, 360_232, 2_000_000
CLASS_SIZES = (MS1M_CLASSES, GLINT360K_CLASSES, WEBFACE42M_CLASSES)
CLASSIFIER_BATCH, CLASSIFIER_THREADS = 128, 2
HEADROOM_GIB = 2.0


def meminfo_kb(field: str, path: str = "/proc/meminfo") -> int:
    """A kB figure of /proc/meminfo (or of a /proc/PID/status given as `path`)."""
    with open(path) as info:
        for line in info:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in {path}")


def available_gib() -> float:
    """What a classifier child may allocate: the memory available now less HEADROOM_GIB."""
    return meminfo_kb("MemAvailable") / 2**20 - HEADROOM_GIB


def _cap_address_space(budget_gib: float) -> None:
    """Cap this process's address space at its size now plus `budget_gib` (RLIMIT_AS, as `ulimit -v`)."""
    import resource

    limit = meminfo_kb("VmSize", f"/proc/{os.getpid()}/status") * 1024 + int(budget_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))


def classifier_steps(
    classes: int, dim: int, rate: float, nnccs: str, steps: int, budget_gib: float
) -> dict[str, Any]:
    """In the child: median seconds of the objective's step at C, D, sample rate and NNCCS mode.

    The address space is capped at its size now plus `budget_gib` (RLIMIT_AS): an allocation
    beyond it raises here, and the stage reports fit=False with the error.
    """
    import statistics

    import torch

    from benchmarks.partial_fc import build_step, step_inputs, timed_step
    from pipeline.config import PartialFCConfig

    torch.set_num_threads(CLASSIFIER_THREADS)
    _cap_address_space(budget_gib)
    figures: dict[str, Any] = {
        "dim": dim,
        "sample_rate": rate,
        "nnccs": nnccs,
        "budget_gib": round(budget_gib, 1),
    }
    generator = torch.Generator().manual_seed(0)
    times = []
    try:
        objective, opt = build_step(classes, dim, PartialFCConfig(sample_rate=rate, nnccs=nnccs))  # type: ignore[arg-type]
        for step in range(steps + 1):  # step 0 warms up (allocations, the momentum buffer)
            seconds = timed_step(objective, opt, step_inputs(classes, dim, CLASSIFIER_BATCH, generator), step)
            if step:
                times.append(seconds)
            log.info("C = %d, D = %d, rate %g: step %d %.2f s", classes, dim, rate, step, seconds)
    except (RuntimeError, MemoryError) as error:  # torch's "can't allocate memory" under the cap
        return {**figures, "seconds": None, "fit": False, "error": str(error).splitlines()[0][:240]}
    return {
        **figures,
        "seconds": statistics.median(times),
        "fit": True,
        "step_s": [round(t, 3) for t in times],
    }


def classifier_side_by_side(classes: int, steps: int, budget_gib: float) -> dict[str, Any]:
    """In the child: rate 1, 0.1 exact and 0.1 sampled at D = 128 alternating step by step (capped)."""
    import torch

    from benchmarks.partial_fc import step_modes, step_time

    torch.set_num_threads(CLASSIFIER_THREADS)
    _cap_address_space(budget_gib)
    timed = step_time(classes, 128, CLASSIFIER_BATCH, steps, modes=step_modes((0.1,)))
    keep = ("median_s", "speedup_vs_rate_1", "step_s", "steps")
    return {"budget_gib": round(budget_gib, 1), **{k: timed[k] for k in keep}}


def classifier_ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per Partial FC stage at D = 128 and C: median step seconds at rate 1 over its own, where both ran."""
    full = results.get("classifier_d128_rate1", {})
    ratios: dict[str, dict[str, float]] = {}
    for name in ("classifier_d128_rate0.1", "classifier_d128_rate0.1_sampled"):
        for size, r in results.get(name, {}).items():
            if r["seconds"] and size in full and full[size]["seconds"]:
                ratios.setdefault(name, {})[size] = round(full[size]["seconds"] / r["seconds"], 2)
    for size, r in results.get("classifier_d128_side_by_side", {}).items():
        for mode, speedup in r["speedup_vs_rate_1"].items():
            if mode != "rate_1.0":
                ratios.setdefault(f"side_by_side_{mode}", {})[size] = speedup
    return ratios
