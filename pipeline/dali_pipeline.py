"""The one DALI graph of training: decode, degrade the regression rows, flip, normalise.

A batch mixes FR rows and regression rows; what happens to each row is decided by
the per-sample inputs fed through `fn.external_source` (see `pipeline.augment_plan`):

    encoded bytes ─ decode ─┬─ if rescale: resize to (h, w), then back to size × size
                            ├─ if color:   color_twist(brightness, contrast, saturation)
                            ├─ if erase:   rectangle set to pixel value ERASE_FILL
                            └─ crop_mirror_normalize: mirror if flip, (x − 127.5) / 127.5, CHW float32

The three `if`s are DALI conditionals (`enable_conditionals=True`): a row whose flag is
off skips the operator entirely, so it is pixel-identical to decode + flip + normalise
(the FR rows have every flag off), and each degradation costs only for the ~p of rows
that get it. Erase comes last so the rectangle stays exactly at ERASE_FILL (pixel 0,
i.e. −1 after normalisation, as the paper sets the pixels to 0).

The device is chosen at build time: `device_id=None` gives a CPU-only pipeline
(decoder "cpu", CPU operators); an integer gives decoder "mixed" and GPU operators,
with the images delivered on that GPU. The graph is the same. Per-sample arguments,
predicates and pass-through outputs (rows, flip, flags) stay on the CPU either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from pipeline.augment_plan import AugmentParams

# Image tensor format shared by the loader, scoring, evaluation and export (docs/contracts.md).
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5
# Pixel value of an erased rectangle before normalisation: the paper "set its pixel values to 0" (§4.1).
ERASE_FILL = 0.0
# Outputs of the graph, in order (names used by the torch iterator).
OUTPUT_NAMES = ("images", "rows", "flip", "flags")


@dataclass(frozen=True)
class GraphBatch:
    """What the graph is fed for one batch: encoded images, their manifest rows and their augmentation."""

    encoded: Sequence[np.ndarray]  # uint8 views of the encoded bytes
    rows: np.ndarray  # int64 [n] manifest rows, passed through unchanged
    params: AugmentParams

    def as_inputs(self) -> tuple:
        """The external_source outputs, in the order the graph unpacks them."""
        p = self.params
        flags = np.ascontiguousarray(p.flags, dtype=bool)
        color = np.asarray(p.color, dtype=np.float32)
        return (
            list(self.encoded),
            np.ascontiguousarray(self.rows, dtype=np.int64),
            p.flip.astype(np.int32),
            flags,
            # predicates and scalar arguments fed one by one: slicing them inside the graph
            # would add one DALI operator per slice
            *(np.ascontiguousarray(flags[:, k]) for k in range(3)),
            np.ascontiguousarray(p.rescale_size, dtype=np.float32),
            np.ascontiguousarray(p.erase_anchor, dtype=np.float32),
            np.ascontiguousarray(p.erase_shape, dtype=np.float32),
            *(np.ascontiguousarray(color[:, k]) for k in range(3)),
        )


@pipeline_def(enable_conditionals=True)
def _training_graph(source: Callable[[], tuple], image_size: int, on_gpu: bool):
    (
        encoded,
        rows,
        flip,
        flags,
        do_rescale,
        do_erase,
        do_color,
        rescale_size,
        erase_anchor,
        erase_shape,
        brightness,
        contrast,
        saturation,
    ) = fn.external_source(source=source, num_outputs=13, batch=True)
    images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
    if do_rescale:
        images = fn.resize(fn.resize(images, size=rescale_size), size=[image_size, image_size])
    if do_color:
        # float out + saturating cast back: same pixels, and in DALI 2.4 on the CPU about a third
        # cheaper than color_twist's own uint8 output path (measured: benchmarks/dali_pipeline.py)
        twisted = fn.color_twist(
            images, brightness=brightness, contrast=contrast, saturation=saturation, dtype=types.FLOAT
        )
        images = fn.cast(twisted, dtype=types.UINT8)
    if do_erase:
        images = fn.erase(
            images, anchor=erase_anchor, shape=erase_shape, axis_names="HW", fill_value=ERASE_FILL
        )
    images = fn.crop_mirror_normalize(
        images,
        mirror=flip,
        mean=[PIXEL_MEAN] * 3,
        std=[PIXEL_STD] * 3,
        output_layout="CHW",
        dtype=types.FLOAT,
    )
    return images, rows, flip, flags


def run_graph(
    batch: GraphBatch, *, image_size: int, device_id: int | None = None, num_threads: int = 1
) -> dict[str, np.ndarray]:
    """Run the graph once on one hand-made batch (preview, tests); outputs as host numpy arrays."""
    fed = []

    def source() -> tuple:
        if fed:
            raise StopIteration
        fed.append(True)
        return batch.as_inputs()

    pipe = build_pipeline(
        source,
        batch_size=len(batch.rows),
        image_size=image_size,
        device_id=device_id,
        num_threads=num_threads,
        prefetch=1,
    )
    pipe.build()
    outputs = pipe.run()
    host = [out.as_cpu() if hasattr(out, "as_cpu") else out for out in outputs]
    return {name: out.as_array() for name, out in zip(OUTPUT_NAMES, host)}


def build_pipeline(
    source: Callable[[], tuple],
    *,
    batch_size: int,
    image_size: int,
    device_id: int | None,
    num_threads: int,
    prefetch: int,
) -> Pipeline:
    """The training graph fed by `source` (called once per batch, returns `GraphBatch.as_inputs()`,
    raises StopIteration at the end of an epoch); GPU variant when `device_id` is an int."""
    return _training_graph(
        source,
        image_size,
        device_id is not None,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,
    )
