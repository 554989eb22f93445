"""How a model is evaluated: one frozen object, built once by the command and passed down.

`igfiqa eval | erc | score`, the demo's stages, the efficacy measurement, validation during
training and the experiments each build one `EvalOptions` and hand it to every layer below
(`jobs.evaluation`, `pipeline.evaluation.evaluate`, `.scoring`, `.efficacy`), so a default is
written once, here. The primary protocol is one forward pass per image with the own backbone or
an independent FR model (`fr_model`, `fr_embeddings`) for the comparisons; `flip` is the labelled
secondary variant (`pipeline.evaluation.mirror`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.evaluation.quality_metrics import DEFAULT_DISCARD_LIMIT

NAN_POLICIES = ("error", "lowest")


@dataclass(frozen=True)
class EvalOptions:
    """Everything an evaluation needs besides the model and the data (see the module docstring)."""

    flip: bool = False
    """Also run each image's mirror image: embeddings summed, quality averaged (`mirror.with_mirror`)."""
    batch_size: int = 64
    """Images per forward pass."""
    device: str = "auto"
    """Where the model runs: auto, cpu, cuda or cuda:N (`pipeline.parallel.env.resolve_device`)."""
    fmrs: tuple[float, ...] | None = None
    """Target FMRs of the thresholds; None: the paper's 1e-3 and 1e-4 where the pairs resolve them,
    else the smallest FMR they resolve (`quality_metrics.resolvable_fmrs`)."""
    discard_limit: float = DEFAULT_DISCARD_LIMIT
    """EDC partial AUC from 0 up to this discarded fraction."""
    crfiqa_refit: bool = False
    """Also the published CR-FIQA script's ERC AUC (threshold refit at every reject fraction)."""
    nan_policy: str = "error"
    """A NaN quality score: "error" stops, "lowest" ranks it below every other score."""
    permutations: int = 20
    """Random permutations of the quality scores behind the efficacy's EDC ratio (its reference)."""
    fr_model: Path | None = None
    """ONNX face recognition model for the comparisons (None: own backbone or `fr_embeddings`)."""
    fr_bgr: bool = False
    """The ONNX FR model expects BGR channel order."""
    fr_embeddings: Path | None = None
    """`.npz` of precomputed comparison embeddings (`pipeline.evaluation.embeddings`)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if self.fmrs is not None:
            object.__setattr__(self, "fmrs", tuple(float(f) for f in self.fmrs))
        if self.batch_size < 1:
            raise ConfigError(f"evaluation batch size {self.batch_size} must be at least 1")
        if self.permutations < 1:
            raise ConfigError(f"{self.permutations} random permutations: need at least 1")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"NaN quality policy {self.nan_policy!r}: use one of {', '.join(NAN_POLICIES)}")
        if self.fr_model is not None and self.fr_embeddings is not None:
            raise ConfigError("give either an ONNX FR model or precomputed embeddings, not both")

    @property
    def matcher(self) -> str:
        """Where the comparison embeddings come from: "onnx", "npz" or "own backbone"."""
        if self.fr_model is not None:
            return "onnx"
        return "npz" if self.fr_embeddings is not None else "own backbone"
