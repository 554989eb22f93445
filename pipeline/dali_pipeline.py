"""The one DALI graph of training: decode, degrade the regression rows, flip, normalise.

A batch mixes FR rows and regression rows; what happens to each row is decided by
the per-sample inputs fed through `fn.external_source` (see `pipeline.augment_plan`):

    encoded bytes ─ decode ─ if rescale: resize down to (h, w), back up to size × size   (uint8)
                           ─ if color:   gain·x + grey_gain·grey(x) + offset, clipped   (float32)
                                         if erase: rectangle set to ERASE_FILL
                                         crop_mirror_normalize (float in)
                             else:       if erase: rectangle set to ERASE_FILL         (uint8)
                                         crop_mirror_normalize (uint8 in)
                           ─ mirror if flip, (x − 127.5) / 127.5, CHW float32

The `if`s are DALI conditionals (`enable_conditionals=True`): a row whose flag is off
skips the operator entirely, so it is pixel-identical to decode + flip + normalise (the
FR rows have every flag off), and each degradation costs only for the ~p of rows that
get it. Erase comes last so the rectangle stays exactly at ERASE_FILL (pixel 0, i.e. −1
after normalisation, as the paper sets the pixels to 0).

Why the graph looks like this (DALI 2.4 CPU operators, measured with
benchmarks/dali_pipeline.py --profile on 112×112 faces): every DALI CPU path that turns
float pixels back into uint8 (fn.cast, color_twist/hsv with uint8 output, arithmetic
clamp) costs about as much as the JPEG decode itself, while uint8 → float and
brightness_contrast are cheap. So the color jitter is written as one affine map of the
pixel and its grey value (brightness, contrast and saturation folded into three
per-sample numbers, `color_coefficients`), the colored rows stay float to the end and
are normalised from float, and every other row stays uint8. The rescale shrinks with
nearest-neighbour sampling (RESCALE_DOWN_INTERP) and restores with linear
interpolation: DALI's antialiased shrink alone costs more than a third of the decode.

The device is chosen at build time: `device_id=None` gives a CPU-only pipeline
(decoder "cpu", CPU operators); an integer gives decoder "mixed" and GPU operators,
with the images delivered on that GPU. The graph is the same. Per-sample arguments,
predicates and pass-through outputs (rows, flip, flags) stay on the CPU either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from pipeline.augment_plan import AugmentParams

# Image tensor format shared by the loader, scoring, evaluation and export (docs/contracts.md).
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5
# Pixel value of an erased rectangle before normalisation: the paper "set its pixel values to 0" (§4.1).
ERASE_FILL = 0.0
# Contrast is stretched about this pixel value, as DALI's color_twist does.
CONTRAST_CENTER = 128.0
# Shrinking filter of the rescale degradation (restoring is linear). Nearest neighbour: DALI's
# antialiased CPU resize costs ~60 µs per image more; see the module docstring.
RESCALE_DOWN_INTERP = types.INTERP_NN
# Outputs of the graph, in order (names used by the torch iterator).
OUTPUT_NAMES = ("images", "rows", "flip", "flags")


def color_coefficients(color: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample (gain, grey_gain, offset) of the color jitter as one affine map of pixel x and its grey g.

    With brightness b, contrast c and saturation s (the columns of `color`) the jittered pixel is
    b · (c · (g + s · (x − g) − CONTRAST_CENTER) + CONTRAST_CENTER), DALI's color_twist order, i.e.
    gain · x + grey_gain · g + offset; the graph then clips it to [0, 255].
    """
    b, c, s = (np.asarray(color[:, k], dtype=np.float64) for k in range(3))
    gain = b * c * s
    grey_gain = b * c * (1.0 - s)
    offset = b * (1.0 - c) * CONTRAST_CENTER
    return tuple(np.ascontiguousarray(v, dtype=np.float32) for v in (gain, grey_gain, offset))


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
            *color_coefficients(p.color),
        )


def _normalise(images, flip):
    """Mirror where `flip`, (x − PIXEL_MEAN) / PIXEL_STD, HWC → CHW float32, in one operator."""
    return fn.crop_mirror_normalize(
        images,
        mirror=flip,
        mean=[PIXEL_MEAN] * 3,
        std=[PIXEL_STD] * 3,
        output_layout="CHW",
        dtype=types.FLOAT,
    )


def _grey_rgb(images):
    """Each pixel's BT.601 grey value in all three channels (uint8 HWC)."""
    grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
    return fn.color_space_conversion(grey, image_type=types.GRAY, output_type=types.RGB)


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
        color_gain,
        grey_gain,
        color_offset,
    ) = fn.external_source(source=source, num_outputs=13, batch=True)
    images = fn.decoders.image(encoded, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
    if do_rescale:
        small = fn.resize(images, size=rescale_size, interp_type=RESCALE_DOWN_INTERP)
        images = fn.resize(small, size=[image_size, image_size], interp_type=types.INTERP_LINEAR)
    if do_color:
        # uint8 → float is cheap (brightness_contrast does gain · x); float → uint8 is not, so these
        # rows stay float: jitter, clip with min/max (cheaper than dmath.clamp), erase, normalise
        scaled = fn.brightness_contrast(images, brightness=color_gain, dtype=types.FLOAT)
        grey = _grey_rgb(images)
        if on_gpu:
            grey_gain, color_offset = grey_gain.gpu(), color_offset.gpu()
        jittered = dmath.min(dmath.max(scaled + grey * grey_gain + color_offset, 0.0), 255.0)
        if do_erase:
            jittered = fn.erase(
                jittered, anchor=erase_anchor, shape=erase_shape, axis_names="HW", fill_value=ERASE_FILL
            )
        normalised = _normalise(jittered, flip)
    else:
        if do_erase:
            images = fn.erase(
                images, anchor=erase_anchor, shape=erase_shape, axis_names="HW", fill_value=int(ERASE_FILL)
            )
        normalised = _normalise(images, flip)
    return normalised, rows, flip, flags


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
