"""Partial FC on 2 gloo processes equals 1 process over the same sample, and resumes on 1 process.

Each rank draws its own sample of its class shard (seeded by step and rank); the 1-process
reference is given the union of the two ranks' samples (`forward(rows=...)`), so the two
runs use the same classes. Compared after every step: the loss, CCS and NNCCS (both modes),
the embedding gradients, the sampled rows' gradients, and after the run the unsharded
classifier and momentum (rows outside every sample keep the initial momentum). Then the
2-process state is loaded on 1 process (resume at another world size) and one more step
there equals the uninterrupted 1-process run.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.method.margin_classifier import ParallelMarginClassifier
from pipeline.parallel.collectives import all_gather_no_grad, rank, world_size

NUM_CLASSES, DIM, BATCH, STEPS, RATE = 40, 8, 4, 3, 0.3  # shards of 20 rows, 6 sampled in each
MODES = ("exact", "sampled")


def _spec() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    steps = [
        {
            "fr_x": torch.randn(BATCH, DIM, generator=g),
            "fr_y": torch.tensor([3, 30, 3, 22]),  # positives on both shards, one repeated
            "reg_x": torch.randn(BATCH, DIM, generator=g),
            "reg_y": torch.tensor([30, 5, 39, 3]),
        }
        for _ in range(STEPS + 1)
    ]
    initial = {
        "classifier": torch.randn(NUM_CLASSES, DIM, generator=g) * 0.1,
        "classifier_momentum": torch.randn(NUM_CLASSES, DIM, generator=g) * 0.01,
    }
    return {"steps": steps, "initial": initial}


def _classifier(spec: dict[str, Any], nnccs: str) -> tuple[ParallelMarginClassifier, torch.optim.SGD]:
    clf = ParallelMarginClassifier(NUM_CLASSES, DIM, seed=3, sample_rate=RATE, nnccs=nnccs)  # type: ignore[arg-type]
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    clf.load_full_state(spec["initial"], opt)
    return clf, opt


def _one_step(
    clf: ParallelMarginClassifier, opt: torch.optim.SGD, step: dict[str, Any], index: int, rows: Any = None
) -> dict[str, Any]:
    """One step on this process's share of the global batch; the record holds global values."""
    size, me = world_size(), rank()
    n = BATCH // size
    mine = slice(me * n, (me + 1) * n)
    emb = step["fr_x"][mine].clone().requires_grad_(True)
    out = clf(emb, step["fr_y"][mine], step=index, rows=rows)
    stats = clf.similarity_stats(step["reg_x"][mine], step["reg_y"][mine])
    opt.zero_grad()
    out.loss.backward()
    global_rows = clf.sampled_rows + clf.class_start
    record = {
        "loss": out.loss.detach().clone(),
        "fr_ccs": out.ccs,
        "ccs": stats.ccs,
        "nnccs": stats.nnccs,
        "emb_grad": all_gather_no_grad(emb.grad),
        # rows and their gradients by global class id (the union of the ranks' samples)
        "rows": all_gather_no_grad(global_rows),
        "row_grads": all_gather_no_grad(clf.sampled_grad).clone(),
    }
    opt.step()
    clf.step_sampled_rows(opt)
    return record


def _worker(rank_: int, world: int, port: int, spec_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_, world_size=world)
    try:
        spec = torch.load(spec_path, weights_only=False)
        results = {}
        for mode in MODES:
            clf, opt = _classifier(spec, mode)
            steps = [_one_step(clf, opt, spec["steps"][i], i) for i in range(STEPS)]
            results[mode] = {"steps": steps, "final": clf.full_state(opt, dst=None)}
        torch.save(results, Path(out_dir) / f"rank{rank_}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def test_two_processes_with_partial_fc_equal_one_over_the_same_sample(tmp_path: Path) -> None:
    spec = _spec()
    spec_path = tmp_path / "spec.pt"
    torch.save(spec, spec_path)
    mp.spawn(_worker, args=(2, _free_port(), str(spec_path), str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert not dist.is_initialized()

    for mode in MODES:
        clf, opt = _classifier(spec, mode)
        sampled_ever = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        for index in range(STEPS):
            got = two[0][mode]["steps"][index]
            rows = got["rows"]
            # each rank drew ceil(0.3 × 20) = 6 rows of its shard, all its positives among them
            assert rows.numel() == 12 and set(spec["steps"][index]["fr_y"].tolist()) <= set(rows.tolist())
            assert torch.equal(rows, rows.sort().values)
            sampled_ever[rows] = True
            want = _one_step(clf, opt, spec["steps"][index], index, rows=rows)
            assert torch.equal(want["rows"], rows)
            for r in range(2):
                for key in ("loss", "fr_ccs", "ccs", "nnccs", "emb_grad", "row_grads"):
                    _close(
                        two[r][mode]["steps"][index][key], want[key], f"{mode} rank {r} step {index} {key}"
                    )
        # the ranks drew different samples at different steps (seeded by step and rank)
        steps_rows = [two[0][mode]["steps"][i]["rows"] for i in range(STEPS)]
        assert not all(torch.equal(steps_rows[0], other) for other in steps_rows[1:])
        final = clf.full_state(opt, dst=None)
        for r in range(2):
            for key in ("classifier", "classifier_momentum"):
                _close(two[r][mode]["final"][key], final[key], f"{mode} rank {r} final {key}")
        # rows outside every sample: weight and momentum exactly as loaded
        never = ~sampled_ever
        assert never.any()
        for key in ("classifier", "classifier_momentum"):
            assert torch.equal(two[0][mode]["final"][key][never], spec["initial"][key][never])

        # resume the 2-process state on 1 process: one more step equals the uninterrupted run
        resumed, resumed_opt = _classifier({"initial": two[0][mode]["final"]}, mode)
        rows = torch.arange(0, NUM_CLASSES, 3)
        rows = torch.unique(torch.cat([rows, spec["steps"][STEPS]["fr_y"]]))
        a = _one_step(resumed, resumed_opt, spec["steps"][STEPS], STEPS, rows=rows)
        b = _one_step(clf, opt, spec["steps"][STEPS], STEPS, rows=rows)
        for key in ("loss", "nnccs", "emb_grad", "row_grads"):
            _close(a[key], b[key], f"{mode} resumed {key}")
        after_a, after_b = resumed.full_state(resumed_opt, dst=None), clf.full_state(opt, dst=None)
        for key in ("classifier", "classifier_momentum"):
            _close(after_a[key], after_b[key], f"{mode} resumed final {key}")
