"""How a model is evaluated: one frozen object, built once by the command and passed down.

`igfiqa eval | erc | score`, the demo's stages, the efficacy measurement, validation during
training and the experiments each build one `EvalOptions` and hand it to every layer below
(`jobs.evaluation`, `pipeline.evaluation.evaluate`, `.scoring`, `.efficacy`), so a default is
written once, here. The primary protocol (docs/evaluation.md) is one forward pass per image for
the quality and independent FR models (`fr_models`, each a matcher with its own rows, or
`fr_embeddings`) for the comparisons; the own backbone (`own_backbone`, or when no FR model is
given) and `flip` (`pipeline.evaluation.mirror`) are labelled secondary variants.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError
from pipeline.evaluation.all_pairs import DEFAULT_NONMATED_SAMPLE_CAP
from pipeline.evaluation.quality_metrics import DEFAULT_DISCARD_LIMIT

NAN_POLICIES = ("error", "lowest")
OWN_BACKBONE = "own backbone"  # the matcher name of the model's own embeddings


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
    fr_models: tuple[Path, ...] = ()
    """ONNX face recognition models for the comparisons, each a matcher named by its file stem with
    its own result rows (empty: `fr_embeddings`, else the own backbone)."""
    fr_bgr: bool = False
    """The ONNX FR models expect BGR channel order."""
    fr_embeddings: Path | None = None
    """`.npz` of precomputed comparison embeddings (`pipeline.evaluation.embeddings`)."""
    own_backbone: bool = False
    """Beside `fr_models` / `fr_embeddings`, also the model's own backbone as a matcher (secondary rows)."""
    nonmated_sample_cap: int = DEFAULT_NONMATED_SAMPLE_CAP
    """All-vs-all sets: at most about this many non-mated pairs, a hashed sample when there are more
    (0: all of them; `pipeline.evaluation.all_pairs`)."""
    nonmated_sample_seed: int = 0
    """Seed of that sample."""
    ground_truth: Path | None = None
    """Identity-labelled sets: a table of degradation strength per image (path, key or record →
    strength) for the oracle quality −strength; without it, the set's own ground_truth.parquet if any."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if isinstance(self.fr_models, str | Path):
            object.__setattr__(self, "fr_models", (self.fr_models,))
        object.__setattr__(self, "fr_models", tuple(Path(p) for p in self.fr_models or ()))
        if self.fmrs is not None:
            object.__setattr__(self, "fmrs", tuple(float(f) for f in self.fmrs))
        if self.batch_size < 1:
            raise ConfigError(f"evaluation batch size {self.batch_size} must be at least 1")
        if self.permutations < 1:
            raise ConfigError(f"{self.permutations} random permutations: need at least 1")
        if self.nan_policy not in NAN_POLICIES:
            raise ConfigError(f"NaN quality policy {self.nan_policy!r}: use one of {', '.join(NAN_POLICIES)}")
        if self.fr_models and self.fr_embeddings is not None:
            raise ConfigError("give either ONNX FR models or precomputed embeddings, not both")
        if self.nonmated_sample_cap < 0:
            raise ConfigError(
                f"non-mated sample cap {self.nonmated_sample_cap} must be at least 0 (0: no cap)"
            )
        stems = [p.stem for p in self.fr_models]
        clashes = sorted({str(p) for p in self.fr_models if stems.count(p.stem) > 1})
        if clashes:
            raise ConfigError(
                f"FR models {', '.join(clashes)} share a file stem, the name of a matcher: rename one"
            )

    @property
    def matcher(self) -> str:
        """Where the comparison embeddings come from: "onnx", "npz" or "own backbone"."""
        if self.fr_models:
            return "onnx"
        return "npz" if self.fr_embeddings is not None else OWN_BACKBONE

    @property
    def matcher_names(self) -> tuple[str, ...]:
        """The matchers, in result order: the ONNX models' stems or the `.npz` file's stem, then the own
        backbone when asked for (alone when nothing else is given)."""
        external = [p.stem for p in self.fr_models]
        if self.fr_embeddings is not None:
            external.append(self.fr_embeddings.stem)
        if not external or self.own_backbone:
            external.append(OWN_BACKBONE)
        return tuple(external)
