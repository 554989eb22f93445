"""Shared pytest setup: markers that skip with a reason when a real part is absent."""

from __future__ import annotations

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
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
