"""The training config as `igfiqa train` and `igfiqa submit` launch it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import TrainConfig


def load_launch_config(path: Path, overrides: Sequence[str], tracking_uri: str = "") -> TrainConfig:
    """Load the config with overrides; paths made absolute and the tracking URI pinned.

    Jobs run in other directories than the one the command ran in, so relative paths and a
    default `sqlite:///./mlflow.db` are resolved here, once. `tracking_uri` wins over the config's.
    """
    from pipeline.config import load_config, replace_section
    from pipeline.tracking.store import resolve_tracking_uri

    config = load_config(path, list(overrides))
    return replace_section(
        config,
        data={"dataset": str(Path(config.data.dataset).resolve())},
        run={
            "dir": str(Path(config.run.dir).resolve()),
            "tracking_uri": resolve_tracking_uri(tracking_uri or config.run.tracking_uri),
        },
    )
