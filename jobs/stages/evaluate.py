"""The evaluation stage: the final checkpoint on the folder's verification sets, an MLflow child run.

`<label>-eval.json` in the eval directory records which checkpoint and FMRs were evaluated, so
a later call with the same checkpoint reuses the report.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from jobs.stages.train import TrainOutcome
from jobs.stages.work import StageRecord, WorkFolder, marker_name, read_json_object, write_json_atomically

METHOD_NAME = "IG-FIQA"


@dataclass
class EvalSummary:
    """Where the evaluation's table and plots are, and its MLflow run."""

    table_md: Path
    pngs: list[Path]
    mlflow_run_id: str


def evaluate_stage(
    paths: WorkFolder, trained: TrainOutcome, fmrs: list[float] | None, record: StageRecord, *, label: str
) -> EvalSummary:
    """Evaluate the final checkpoint on the verification sets and log it as a child MLflow run."""
    from jobs.evaluation import evaluate_checkpoint_file, log_evaluation

    marker = paths.eval / marker_name(label, "eval")
    recorded = read_json_object(marker)
    table_md = paths.eval / "table.md"
    if (
        recorded is not None
        and recorded.get("checkpoint") == trained.checkpoint
        and recorded.get("global_step") == trained.global_step
        and recorded.get("fmr") == fmrs
        and table_md.is_file()
    ):
        record.reused, record.note = True, f"checkpoint of step {trained.global_step} already evaluated"
        pngs = [Path(p) for p in recorded.get("pngs", []) if Path(p).is_file()]
        return EvalSummary(table_md, pngs, str(recorded.get("mlflow_run_id", "")))

    from pipeline.evaluation.options import EvalOptions

    options = EvalOptions(fmrs=fmrs)  # `igfiqa eval`'s defaults: own backbone, one forward pass
    evaluated = evaluate_checkpoint_file(
        Path(trained.checkpoint), paths.val, paths.eval, options, name=METHOD_NAME
    )
    # the same MLflow record as `igfiqa eval CHECKPOINT --data VAL` makes
    run_id = log_evaluation(evaluated) or ""
    pngs = list(evaluated.outcome.files.pngs)
    write_json_atomically(
        marker,
        {
            "checkpoint": trained.checkpoint,
            "global_step": trained.global_step,
            "fmr": fmrs,
            "mlflow_run_id": run_id,
            "pngs": [str(p) for p in pngs],
        },
    )
    record.note = f"{len(evaluated.outcome.sets)} verification sets, MLflow run {run_id}"
    return EvalSummary(evaluated.outcome.files.table_md, pngs, run_id)
