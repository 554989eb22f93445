"""The torch-facing training loader: per step and per rank, a clean FR half and a degraded regression half.

With `data.batch_mode: single` (CR-FIQA's published training) there is one batch, the FR half, and
its images are degraded at `data.augment`'s rates; the regression half is empty (`reg_batch` 0).

    layout = BatchLayout.of(config.data, world, num_images, rank)   # pipeline.config
    loader = TrainLoader(config.data, layout, device="cuda:0")
    for epoch in range(start_epoch, epochs):
        loader.set_epoch(epoch, start_step=step_in_epoch if epoch == start_epoch else 0)
        for batch in loader:          # StepBatch, batch.step counts from start_step
            batch.fr.images, batch.fr.labels          # ArcFace
            batch.reg.images, batch.reg.labels        # CR / IG regression
            batch.reg.flags                           # [n, 3] bool: rescale, erase, color

Order and augmentation are pure functions of (data.seed, epoch, step) (see
`pipeline.data.sampler` and `pipeline.data.augment_plan`), fed to the DALI graph of
`pipeline.data.dali_graph` through `fn.external_source`; the tensors come out of DALI's
PyTorch plugin (`DALIGenericIterator`). The two halves are different images of the
same global step; concatenating the halves of ranks 0..W−1 gives the global batch
of a 1-rank run, and `set_epoch(e, k)` continues exactly where an uninterrupted
epoch e would be at step k.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from data_prep.errors import DataError
from pipeline.config import BatchLayout, ConfigError, DataConfig
from pipeline.data.augment_plan import step_params
from pipeline.data.dali_graph import OUTPUT_NAMES, GraphBatch, build_pipeline
from pipeline.data.image_store import ImageStore
from pipeline.data.sampler import EpochSampler


@dataclass(frozen=True)
class Half:
    """One half of a step on one rank. Images and labels live on the loader's device; the
    augmentation record (flags, flipped) stays on the host, where it was decided."""

    images: torch.Tensor  # float32 [n, 3, H, W], (pixel − 127.5) / 127.5
    labels: torch.Tensor  # int64 [n], class ids from the manifest
    keys: list[str]  # manifest keys, in row order
    flags: torch.Tensor  # bool [n, 3] on the CPU: rescale, erase, color received (all False in the FR
    # half unless data.batch_mode is single)
    flipped: torch.Tensor  # bool [n] on the CPU: mirrored horizontally

    def __len__(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class StepBatch:
    """What one rank trains on at one step."""

    epoch: int
    step: int
    fr: Half  # clean: decode + optional flip + normalise (degraded too with data.batch_mode single)
    reg: Half  # flip, then rescale / erase / color each with its probability


class _StepFeeder:
    """The external_source callback: returns the graph inputs of successive steps of the current plan."""

    def __init__(self, loader: TrainLoader) -> None:
        self._loader = loader
        self.epoch = 0
        self.next_step = 0

    def start(self, epoch: int, step: int) -> None:
        self.epoch, self.next_step = epoch, step

    def __call__(self) -> tuple:
        if self.next_step >= self._loader.steps_per_epoch:
            raise StopIteration
        batch = self._loader.graph_batch(self.epoch, self.next_step)
        self.next_step += 1
        return batch.as_inputs()


def dali_device_id(device: torch.device) -> int | None:
    """DALI's `device_id` for tensors on `device`: None builds CPU-only pipelines."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        raise ConfigError(f"device {device}: the DALI loader runs on 'cpu' or 'cuda[:N]'")
    return device.index if device.index is not None else torch.cuda.current_device()


class TrainLoader:
    """Batches of one rank: `steps_per_epoch` steps per epoch, each a `StepBatch`."""

    def __init__(
        self, data: DataConfig, layout: BatchLayout | None = None, *, device: str | torch.device = "cpu"
    ) -> None:
        """`layout`: this rank's share of the global batches (None: one process reads them all)."""
        self.data = data
        self.store = ImageStore(data.dataset, rows=np.zeros(0, np.int64))  # checks every row, holds none yet
        height, width = self.store.image_size
        if (height, width) != (data.image_size, data.image_size):
            raise ConfigError(
                f"data.image_size {data.image_size} but the images of {data.dataset} are {height}×{width}"
            )
        if data.num_classes and data.num_classes != self.store.num_classes:
            raise ConfigError(
                f"data.num_classes {data.num_classes} disagrees with {data.dataset} ({self.store.num_classes} classes)"
            )
        self.layout = layout if layout is not None else BatchLayout.of(data, 1, len(self.store))
        if self.layout != BatchLayout.of(data, self.layout.world_size, len(self.store), self.layout.rank):
            raise ValueError(f"{self.layout} is not a layout of {data.dataset} ({len(self.store)} images)")
        self.sampler = EpochSampler(self.layout, seed=data.seed)
        self.device = torch.device(device)
        self._device_id = dali_device_id(self.device)
        self._positions = self.sampler.rank_positions()
        self._feeder = _StepFeeder(self)
        self._iterator: DALIGenericIterator | None = None
        self._state = "unbuilt"  # unbuilt | fresh (built, nothing scheduled) | running | exhausted
        self.epoch, self.start_step = 0, 0
        self._held_epoch: int | None = None

    # ------------------------------------------------------------------ plan

    @property
    def steps_per_epoch(self) -> int:
        """Steps of every epoch, the same on every rank (the last partial global step is dropped)."""
        return self.layout.steps_per_epoch

    @property
    def num_classes(self) -> int:
        return self.store.num_classes

    def __len__(self) -> int:
        """Batches the next iteration yields: from `start_step` to the end of the epoch."""
        return self.steps_per_epoch - self.start_step

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Make the next iteration yield steps `start_step`.. of `epoch` (the resume point of a checkpoint)."""
        if epoch < 0:
            raise ValueError(f"epoch {epoch} must be >= 0")
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} is outside [0, {self.steps_per_epoch}]")
        self.epoch, self.start_step = int(epoch), int(start_step)

    def graph_batch(self, epoch: int, step: int) -> GraphBatch:
        """This rank's graph inputs for (epoch, step): FR rows first, then regression rows."""
        self._hold_epoch(epoch)
        rows = self.sampler.rank_rows(epoch, step)
        params = step_params(
            self.data.augment,
            self.data.image_size,
            seed=self.data.seed,
            epoch=epoch,
            step=step,
            layout=self.layout,
            degrade_fr=self.data.batch_mode == "single",
        ).take(self._positions)
        all_rows = np.concatenate([rows.fr, rows.reg])
        return GraphBatch(encoded=self.store.encoded(all_rows), rows=all_rows, params=params)

    def _hold_epoch(self, epoch: int) -> None:
        """Hold the manifest rows of this rank's share of `epoch` (and only those) in the store."""
        if self._held_epoch != epoch:
            self.store.hold(self.sampler.rank_plan(epoch).ravel())
            self._held_epoch = epoch

    # ------------------------------------------------------------------ DALI

    def _build(self) -> None:
        pipe = build_pipeline(
            self._feeder,
            batch_size=self.layout.rank_batch,
            image_size=self.data.image_size,
            device_id=self._device_id,
            num_threads=self.data.num_threads,
            prefetch=self.data.prefetch,
        )
        # No size: an epoch ends when the feeder raises StopIteration. No first batch at
        # construction: the feeder's plan is set just before the first run is scheduled.
        self._iterator = DALIGenericIterator([pipe], list(OUTPUT_NAMES), prepare_first_batch=False)
        self._state = "fresh"

    def _position_pipeline(self) -> DALIGenericIterator:
        """A pipeline whose next output is (self.epoch, self.start_step)."""
        if self._state == "running":
            # interrupted mid-epoch: outputs of the old plan are already queued, so start over
            self.close()
        if self._state == "unbuilt":
            self._build()
        self._feeder.start(self.epoch, self.start_step)
        assert self._iterator is not None
        if self._state == "exhausted":
            self._iterator.reset()  # schedules the first runs with the plan just set
        self._state = "running"
        return self._iterator

    def __iter__(self) -> Iterator[StepBatch]:
        epoch, start = self.epoch, self.start_step
        if start >= self.steps_per_epoch:
            return
        iterator = self._position_pipeline()
        for step in range(start, self.steps_per_epoch):
            try:
                (outputs,) = next(iterator)
            except RuntimeError as exc:  # DALI's errors name an operator, not the sample
                self.close()
                failure = self._decode_failure(epoch, step)
                if failure is None:
                    raise
                raise failure from exc
            yield self._to_batch(epoch, step, outputs)
        try:
            next(iterator)
        except StopIteration:
            self._state = "exhausted"
        else:  # pragma: no cover - the feeder ends exactly after the last step
            raise RuntimeError("DALI produced more batches than steps in the epoch")

    def _decode_failure(self, epoch: int, step: int) -> DataError | None:
        """The DataError naming the shard and key of an image DALI could not decode at (epoch, step).

        DALI reports a failure at the step whose batch holds the image ("nvImageCodec failure",
        no sample index); the steps it may have prefetched are searched too. Each image of those
        batches is decoded with Pillow and checked against the dataset's size; None when all
        pass (then the error was not about an image and is raised as it is).
        """
        for candidate in range(step, min(step + 1 + self.data.prefetch, self.steps_per_epoch)):
            for row in self.graph_batch(epoch, candidate).rows.tolist():
                problem = self.store.image_problem(row)
                if problem is not None:
                    tar, which = self.store.where(row)
                    return DataError(
                        f"{which} cannot be decoded ({problem}); DALI stopped training at epoch {epoch} "
                        f"step {step}. Check every image with `igfiqa prep inspect {self.data.dataset} "
                        "--verify-decode`, then convert the source again (--skip-bad leaves such images out)",
                        path=tar,
                    )
        return None

    def _to_batch(self, epoch: int, step: int, outputs: dict[str, torch.Tensor]) -> StepBatch:
        rows = outputs["rows"].numpy()  # pass-through outputs stay on the CPU
        expected = self.sampler.rank_rows(epoch, step)
        if not np.array_equal(rows, np.concatenate([expected.fr, expected.reg])):
            raise RuntimeError(f"DALI output of epoch {epoch} step {step} holds other samples than planned")
        images = outputs["images"]
        if images.device != self.device:
            images = images.to(self.device, non_blocking=True)
        labels = torch.from_numpy(self.store.labels_of(rows)).to(self.device, non_blocking=True)
        # host-side records: copying them to a GPU would cost two synchronous transfers per step
        flags = outputs["flags"].to(torch.bool)
        flipped = outputs["flip"].bool()
        keys = self.store.keys_of(rows)
        n = self.layout.fr_per_rank

        def half(part: slice) -> Half:
            return Half(
                images=images[part],
                labels=labels[part],
                keys=keys[part],
                flags=flags[part],
                flipped=flipped[part],
            )

        return StepBatch(epoch=epoch, step=step, fr=half(slice(0, n)), reg=half(slice(n, None)))

    def close(self) -> None:
        """Release the DALI pipeline (it is rebuilt on the next iteration)."""
        self._iterator = None  # the pipeline and its queued outputs go with it
        self._state = "unbuilt"
