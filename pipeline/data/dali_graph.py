"""The one DALI graph of training: decode, degrade the regression rows, flip, normalise.

A batch mixes FR rows and regression rows; what happens to each row is decided by
the per-sample inputs fed through `fn.external_source` (see `pipeline.data.augment_plan`):

    encoded bytes ─ decode ─┬─ if rescale: shrink to (h, w) (nearest), back to size × size (linear)
                            ├─ if color:   b·(c·(grey + s·(x − grey) − 128) + 128), clipped to uint8
                            ├─ if erase:   rectangle set to pixel value ERASE_FILL
                            └─ crop_mirror_normalize: mirror if flip, (x − 127.5) / 127.5, CHW float32

The three `if`s are DALI conditionals (`enable_conditionals=True`): a row whose flag is
off skips the operator entirely, so it is pixel-identical to decode + flip + normalise
(the FR rows have every flag off), and each degradation costs only for the ~p of rows
that get it. Erase comes last so the rectangle stays exactly at ERASE_FILL (pixel 0,
i.e. −1 after normalisation, as the paper sets the pixels to 0).

Pixels stay uint8 between the conditionals and no float is turned back into an integer
(the dear step on the CPU); why each operator was chosen, with the measurements:
docs/dali-graph.md.

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
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline

from pipeline.data.augment_plan import AugmentParams

# Image tensor format shared by the loader, scoring, evaluation and export (docs/contracts.md).
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5
# Pixel value of an erased rectangle before normalisation: the paper "set its pixel values to 0" (§4.1).
ERASE_FILL = 0.0
# Contrast is stretched about this pixel value, as DALI's color_twist does.
CONTRAST_CENTER = 128.0
# brightness_contrast's brightness_shift is a fraction of the output type's largest value;
# the color terms are int16 (see the module docstring).
COLOR_TERM_TYPE = types.INT16
COLOR_TERM_MAX = float(np.iinfo(np.int16).max)
# Shrinking filter of the rescale degradation (restoring is linear); see the module docstring.
RESCALE_DOWN_INTERP = types.INTERP_NN
# Outputs of the graph, in order (names used by the torch iterator).
OUTPUT_NAMES = ("images", "rows", "flip", "flags")
DECODE_OUTPUT_NAMES = ("images", "rows")  # of the decode-only graph (build_decode_pipeline)


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
            *color_gains(p.color),
        )


def color_gains(color: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-sample (pixel_gain, grey_gain, offset shift) of the color map from [n, 3] factors (b, c, s).

    b·(c·(grey + s·(x − grey) − C) + C) = b·c·s·x + b·c·(1 − s)·grey + b·C·(1 − c), C = CONTRAST_CENTER;
    the offset is given as brightness_contrast's brightness_shift, a fraction of COLOR_TERM_MAX.
    """
    b, c, s = (np.asarray(color, dtype=np.float64)[:, k] for k in range(3))
    gains = (b * c * s, b * c * (1.0 - s), b * CONTRAST_CENTER * (1.0 - c) / COLOR_TERM_MAX)
    return tuple(np.ascontiguousarray(g, dtype=np.float32) for g in gains)


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
        pixel_gain,
        grey_gain,
        color_shift,
    ) = fn.external_source(source=source, num_outputs=13, batch=True)
    images = _decode(encoded, on_gpu)
    if do_rescale:
        small = fn.resize(images, size=rescale_size, interp_type=RESCALE_DOWN_INTERP)
        images = fn.resize(small, size=[image_size, image_size], interp_type=types.INTERP_LINEAR)
    if do_color:
        # pixel_gain·x + (grey_gain·grey + offset) as two rounded int16 terms; the cast clips to [0, 255]
        pixel_term = fn.brightness_contrast(images, brightness=pixel_gain, dtype=COLOR_TERM_TYPE)
        grey_term = fn.brightness_contrast(
            _grey_rgb(images), brightness=grey_gain, brightness_shift=color_shift, dtype=COLOR_TERM_TYPE
        )
        images = fn.cast(pixel_term + grey_term, dtype=types.UINT8)
    if do_erase:
        images = fn.erase(
            images, anchor=erase_anchor, shape=erase_shape, axis_names="HW", fill_value=int(ERASE_FILL)
        )
    return _normalise(images, flip), rows, flip, flags


def _decode(encoded: DataNode, on_gpu: bool) -> DataNode:
    """JPEG → RGB uint8 HWC: libjpeg-turbo on the CPU, nvJPEG (the hardware decoder where there is
    one) on the GPU. nvJPEG's default chroma upsampling is not libjpeg-turbo's "fancy" one: on an
    H200 the same JPEGs decoded 1.6-2.4 grey levels apart on average and up to 117 at colour edges,
    so the GPU would train on other pixels than the CPU, PIL (evaluation) and the paper's loaders
    see; `jpeg_fancy_upsampling` makes nvJPEG upsample as they do."""
    if on_gpu:
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB, jpeg_fancy_upsampling=True)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


@pipeline_def
def _decode_graph(source: Callable[[], tuple], on_gpu: bool):
    """Decode and normalise only: what the FR half sees without a flip (scoring, curation)."""
    encoded, rows = fn.external_source(source=source, num_outputs=2, batch=True)
    images = _decode(encoded, on_gpu)
    return _normalise(images, 0), rows


def build_decode_pipeline(
    source: Callable[[], tuple],
    *,
    batch_size: int,
    device_id: int | None,
    num_threads: int,
    prefetch: int,
) -> Pipeline:
    """The decode-only graph fed by `source` (called once per batch, returns `(encoded, rows)`: a
    list of uint8 arrays and int64 manifest rows, at most `batch_size` of them; raises StopIteration
    at the end). Outputs `DECODE_OUTPUT_NAMES`. Built like the training graph: the device chosen
    by `device_id` (None: CPU decoder and operators; an int: "mixed" decoder, images on that GPU)."""
    return _decode_graph(
        source,
        device_id is not None,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,  # as build_pipeline: outputs reach torch without a copy
    )


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
        # The dynamic executor gives every batch its own memory, so DALI's PyTorch plugin hands
        # the outputs to torch through DLPack without a copy; the classic executor reuses its
        # buffers, making the plugin copy every output (measured: the whole graph then takes about
        # 160 instead of 128 µs per image).
        exec_dynamic=True,
    )
