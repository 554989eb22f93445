"""Which images each rank reads at each step: a reproducible order per epoch, cut into global steps.

Per epoch the `num_samples` manifest rows are permuted by a generator seeded with
(seed, epoch). Global step `s` takes the next `fr_batch + reg_batch` rows of that
permutation: the first `fr_batch` form the global FR half, the rest the global
regression half. Rank `r` of `world_size` takes the r-th contiguous slice of each
half, so concatenating the ranks' slices (rank 0 first) gives back the global batch
whatever the world size: 1 rank and 2 ranks train on the same global batches. The
remainder of the permutation that does not fill a whole global step is dropped, so
every rank makes the same number of steps. Everything is a pure function of
(seed, epoch, step): resuming at step k needs no state but those three numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Distinct stream tags keep the order and the augmentation draws independent of each other.
ORDER_STREAM = 0
AUGMENT_STREAM = 1


def stream_rng(seed: int, stream: int, *counters: int) -> np.random.Generator:
    """A generator determined by (seed, stream, *counters) alone; all must be >= 0."""
    words = (seed, stream, *counters)
    if any(int(w) < 0 for w in words):
        raise ValueError(f"seed and counters must be >= 0, got {words}")
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


@dataclass(frozen=True)
class StepRows:
    """Manifest rows of one step: the FR half and the regression half (never overlapping)."""

    fr: np.ndarray  # int64 [n_fr]
    reg: np.ndarray  # int64 [n_reg]


class EpochSampler:
    """Per-epoch order of the samples and each rank's share of every global step."""

    def __init__(
        self,
        num_samples: int,
        fr_batch: int,
        reg_batch: int,
        *,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        if fr_batch <= 0 or reg_batch <= 0:
            raise ValueError(f"fr_batch {fr_batch} and reg_batch {reg_batch} must be positive")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if fr_batch % world_size or reg_batch % world_size:
            raise ValueError(
                f"fr_batch {fr_batch} and reg_batch {reg_batch} must divide by world_size {world_size}"
            )
        if seed < 0:
            raise ValueError(f"seed {seed} must be >= 0")
        self.num_samples = int(num_samples)
        self.fr_batch, self.reg_batch = int(fr_batch), int(reg_batch)
        self.world_size, self.rank, self.seed = int(world_size), int(rank), int(seed)
        self.global_batch = self.fr_batch + self.reg_batch
        self.steps_per_epoch = self.num_samples // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.num_samples} samples cannot fill one step of {self.fr_batch} + {self.reg_batch} images"
            )
        self._cached: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of all manifest rows used in `epoch` (int64 [num_samples])."""
        if self._cached is None or self._cached[0] != epoch:
            perm = stream_rng(self.seed, ORDER_STREAM, epoch).permutation(self.num_samples).astype(np.int64)
            self._cached = (epoch, perm)
        return self._cached[1]

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} is outside [0, {self.steps_per_epoch})")

    def global_rows(self, epoch: int, step: int) -> StepRows:
        """Rows of the whole global step (all ranks together)."""
        self._check_step(step)
        start = step * self.global_batch
        chunk = self.order(epoch)[start : start + self.global_batch]
        return StepRows(fr=chunk[: self.fr_batch], reg=chunk[self.fr_batch :])

    def rank_positions(self) -> np.ndarray:
        """Positions inside the global step (FR rows first) that belong to this rank, FR slice then reg slice."""
        fr_n, reg_n = self.fr_batch // self.world_size, self.reg_batch // self.world_size
        fr = np.arange(self.rank * fr_n, (self.rank + 1) * fr_n)
        reg = self.fr_batch + np.arange(self.rank * reg_n, (self.rank + 1) * reg_n)
        return np.concatenate([fr, reg]).astype(np.int64)

    def rank_rows(self, epoch: int, step: int) -> StepRows:
        """This rank's rows of a step."""
        rows = self.global_rows(epoch, step)
        fr_n, reg_n = self.fr_batch // self.world_size, self.reg_batch // self.world_size
        return StepRows(
            fr=rows.fr[self.rank * fr_n : (self.rank + 1) * fr_n],
            reg=rows.reg[self.rank * reg_n : (self.rank + 1) * reg_n],
        )
