"""Shared pytest setup: markers that skip with a reason when a real part is absent; the tiny
training dataset every training test reads, an empty MLflow store to copy and a tiny reference
matcher, each made once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (runs when one is lent)")
    for item in items:
        # the marker itself: item.keywords also holds the names of the folders above the test, so a
        # clone in a folder named gpu would skip every test
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip_gpu)


@pytest.fixture
def no_tf32() -> Iterator[None]:
    """Full float32 on CUDA for the test: cuDNN convolutions default to TF32 (10-bit mantissa),
    which puts GPU embeddings ~0.2 % from the CPU's (measured on an H200); comparisons with the
    CPU mean the same arithmetic."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def tiny_train_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/train_fixtures.py's tiny converted dataset (ROOT/train, its source in ROOT/synth),
    made once for the session: tests read it and write nowhere inside ROOT."""
    from tests.train_fixtures import tiny_dataset

    return tiny_dataset(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session")
def mlflow_store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite store, made once: `tests.train_fixtures.new_mlflow_store` copies it
    where a test's runs go. A store MLflow makes itself first runs MLflow's schema migrations
    (about 3 s of CPU and a hundred commits each time)."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def tiny_matcher_spec(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(spec, out): `tests.train_fixtures.tiny_matcher`, built once for the session; tests pass
    them to commands that reuse it (`--matchers-spec`, `--matchers-out`) and write nowhere inside."""
    pytest.importorskip("nvidia.dali")
    pytest.importorskip("onnxruntime")
    from tests.train_fixtures import tiny_matcher

    return tiny_matcher(tmp_path_factory.mktemp("tiny-matcher"))
