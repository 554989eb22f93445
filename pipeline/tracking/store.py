"""MLflow tracking: one run per job, resumed by id after a requeue, logged from rank 0 only.

The default store is a sqlite file in the working directory (`sqlite:///…/mlflow.db`;
MLflow's `./mlruns` file store is deprecated). A tracking server
(`--tracking-uri http://host:5000` or `MLFLOW_TRACKING_URI`) works the same and is
what several jobs writing at the same time should use: sqlite serialises writers
with a file lock, which is fine for one job at a time on one machine but not on a
shared network file system.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_DB = "mlflow.db"
MAX_PARAM_LENGTH = 6000


def resolve_tracking_uri(configured: str = "", base_dir: str | Path | None = None) -> str:
    """`configured`, else $MLFLOW_TRACKING_URI, else an absolute sqlite file in `base_dir` (cwd)."""
    if configured:
        return configured
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "")
    if from_env:
        return from_env
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    database = (base / DEFAULT_DB).resolve()
    if not database.exists():
        log.warning(
            "MLflow: no tracking URI given, creating the default store %s "
            "(--tracking-uri or MLFLOW_TRACKING_URI to use another)",
            database,
        )
    return f"sqlite:///{database}"


def _artifact_root_for(uri: str) -> str | None:
    """For a local sqlite store keep artifacts beside the database (absolute: jobs run elsewhere)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def _retry(fn: Callable[[], T], what: str, attempts: int = 6) -> T:
    """Retry transient store errors (sqlite 'database is locked', a server restarting)."""
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            text = str(exc).lower()
            transient = any(
                word in text
                for word in ("locked", "busy", "timed out", "connection", "temporarily", "503", "502")
            )
            if not transient or attempt == attempts:
                raise
            log.warning("MLflow %s failed (%s), retry %d/%d", what, exc, attempt, attempts)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")  # pragma: no cover


def _bound_http_retries() -> None:
    """MLflow's HTTP client retries 7 times with backoff factor 2 (minutes against a dead server),
    and `_retry` retries on top of it: keep MLflow's own layer short unless the user set it."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


class RunTracker:
    """A thin, retrying wrapper around one MLflow run (MlflowClient, no global state)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        _bound_http_retries()

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._client = MlflowClient(tracking_uri=tracking_uri)

    @classmethod
    def start(
        cls,
        *,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str = "",
        tags: dict[str, str] | None = None,
    ) -> RunTracker:
        """Continue run `run_id` when given (a requeued or resumed job), else create a new run."""
        from mlflow.tracking import MlflowClient

        _bound_http_retries()
        client = MlflowClient(tracking_uri=tracking_uri)
        if run_id:
            run = _retry(lambda: client.get_run(run_id), "get_run")
            if run.info.status != "RUNNING":
                _retry(lambda: client.update_run(run_id, status="RUNNING"), "update_run")
            tracker = cls(tracking_uri, run_id)
        else:
            experiment_id = _retry(
                lambda: _get_or_create_experiment(client, experiment, tracking_uri), "experiment"
            )
            run = _retry(
                lambda: client.create_run(experiment_id, run_name=run_name, tags=tags or {}), "create_run"
            )
            tracker = cls(tracking_uri, run.info.run_id)
        if tags and run_id:
            tracker.set_tags(tags)
        return tracker

    def log_params(self, params: dict[str, Any]) -> None:
        """Log parameters once (MLflow params are immutable: re-logging the same value is fine)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        for chunk in _chunks(items, 100):
            _retry(lambda c=chunk: self._client.log_batch(self.run_id, params=c), "log_params")

    def set_tags(self, tags: dict[str, Any]) -> None:
        """Set (or overwrite) tags."""
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in sorted(tags.items())]
        _retry(lambda: self._client.log_batch(self.run_id, tags=items), "set_tags")

    def tags(self) -> dict[str, str]:
        """The run's tags as they are in the store now."""
        return dict(_retry(lambda: self._client.get_run(self.run_id), "get_run").data.tags)

    def metric_keys(self) -> list[str]:
        """Names of every metric the run has logged."""
        return list(_retry(lambda: self._client.get_run(self.run_id), "get_run").data.metrics)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Log scalar metrics at `step` in one batch (NaN/inf are logged as MLflow allows)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in sorted(metrics.items())]
        for chunk in _chunks(items, 500):
            _retry(lambda c=chunk: self._client.log_batch(self.run_id, metrics=c), "log_metrics")

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload one file (or a directory's files) under `artifact_path`."""
        path = Path(path)
        if path.is_dir():
            _retry(lambda: self._client.log_artifacts(self.run_id, str(path), artifact_path), "log_artifacts")
        else:
            _retry(lambda: self._client.log_artifact(self.run_id, str(path), artifact_path), "log_artifact")

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store a small text artifact (the resolved config, a table)."""
        _retry(lambda: self._client.log_text(self.run_id, text, artifact_file), "log_text")

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """[(step, value)] of one metric over the whole run (all attempts of a requeued job)."""
        history = _retry(lambda: self._client.get_metric_history(self.run_id, key), "get_metric_history")
        return [(m.step, m.value) for m in history]

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run FINISHED / FAILED / KILLED."""
        _retry(lambda: self._client.set_terminated(self.run_id, status=status), "set_terminated")

    def pause(self) -> None:
        """A preempted job: the run stays open (status RUNNING is restored on resume)."""
        _retry(lambda: self._client.set_terminated(self.run_id, status="KILLED"), "set_terminated")


def _get_or_create_experiment(client: Any, name: str, tracking_uri: str) -> str:
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_root_for(tracking_uri))
    except Exception:
        # another job created it between our two calls
        existing = client.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def start_stage_run(
    *, stage: str, params: dict[str, Any], tags: dict[str, str] | None = None, tracking_uri: str = ""
) -> RunTracker:
    """A run for a data_prep stage or an evaluation (experiment `igfiqa-<stage>`)."""
    uri = resolve_tracking_uri(tracking_uri)
    tracker = RunTracker.start(
        tracking_uri=uri, experiment=f"igfiqa-{stage}", run_name=stage, tags={"stage": stage, **(tags or {})}
    )
    tracker.log_params(params)
    return tracker


def close_runs_of_job(job_id: str, tracking_uri: str = "", status: str = "KILLED") -> list[str]:
    """Mark the still-RUNNING runs tagged `slurm_job_id=JOB_ID` as `status` (after a cancellation,
    a job that never started cannot close its own run); returns their ids."""
    from mlflow.tracking import MlflowClient

    _bound_http_retries()
    client = MlflowClient(tracking_uri=resolve_tracking_uri(tracking_uri))
    experiments = [e.experiment_id for e in _retry(client.search_experiments, "search_experiments")]
    if not experiments:
        return []
    query = f"tags.slurm_job_id = '{job_id}' and attributes.status = 'RUNNING'"
    runs = _retry(lambda: client.search_runs(experiments, filter_string=query), "search_runs")
    for run in runs:
        _retry(lambda r=run: client.set_terminated(r.info.run_id, status=status), "set_terminated")
    return [run.info.run_id for run in runs]
