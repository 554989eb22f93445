"""ONNX export of backbone + quality head, checked against torch with onnxruntime.

The ONNX model takes `images` [batch, 3, 112, 112] float32 in the project layout
(RGB, (pixel − 127.5) / 127.5) with a dynamic batch dimension and returns
`quality` [batch] and, with `with_embedding=True`, `embedding` [batch, D].

Exporter: torch 2.13's default `torch.onnx.export(..., dynamo=True)` (torch.export +
onnxscript) handles the iResNets; it was checked here with dynamic batch and
onnxruntime parity ~1e-5. Should it fail on some model, the legacy TorchScript
exporter is tried next (logged). Weights are stored inside the one .onnx file
(`external_data=False`; fine below ONNX's 2 GB protobuf limit, iResNet-200 is ~0.3 GB).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.data.image_io import IMAGE_SIZE

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT_NAME = "images"


class ExportError(RuntimeError):
    """The model could not be exported, or the ONNX model disagrees with torch."""


class _QualityGraph(nn.Module):
    """What goes into the ONNX graph: images → quality (and the embedding)."""

    def __init__(self, model: nn.Module, with_embedding: bool):
        super().__init__()
        self.model = model
        self.with_embedding = with_embedding

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        embedding, quality = self.model(images)
        return (quality, embedding) if self.with_embedding else quality


@dataclass(frozen=True)
class ParityReport:
    """How far onnxruntime's outputs are from torch's on the same images."""

    max_abs_diff_quality: float
    max_abs_diff_embedding: float | None
    batch_sizes: tuple[int, ...]
    exporter: str

    def passed(self, tolerance: float) -> bool:
        diffs = [self.max_abs_diff_quality, self.max_abs_diff_embedding or 0.0]
        return all(d <= tolerance for d in diffs)


def output_names(with_embedding: bool) -> list[str]:
    """Names of the ONNX outputs, in order."""
    return ["quality", "embedding"] if with_embedding else ["quality"]


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    with_embedding: bool = False,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
) -> str:
    """Write `model` (a FIQAModel) to `path` as ONNX with a dynamic batch; returns the exporter used.

    exporter: "dynamo" (torch.export), "torchscript" (legacy) or "auto" (dynamo, then torchscript).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = _QualityGraph(model, with_embedding).eval()
    example = torch.zeros(2, 3, *IMAGE_SIZE)
    names = output_names(with_embedding)
    order = {"auto": ("dynamo", "torchscript"), "dynamo": ("dynamo",), "torchscript": ("torchscript",)}[
        exporter
    ]
    errors = []
    for kind in order:
        try:
            _export(graph, example, path, names, opset, kind)
            return kind
        except Exception as exc:  # exporters raise many types; we report them together
            log.warning("ONNX export with the %s exporter failed: %s", kind, exc)
            errors.append(f"{kind}: {type(exc).__name__}: {exc}")
    raise ExportError(f"{path}: ONNX export failed ({'; '.join(errors)})")


def _export(
    graph: nn.Module, example: torch.Tensor, path: Path, names: list[str], opset: int, kind: str
) -> None:
    # The dynamo exporter prints progress lines to stdout, logs that torchvision is absent and, through
    # onnxscript's optimizer, a line per rewrite pass at INFO; the legacy one warns that it is
    # deprecated and about the backbone's input-size check. None of it is actionable.
    quiet = {
        "torch.onnx._internal.exporter._registration": logging.ERROR,
        "onnxscript": logging.WARNING,
        "onnx_ir": logging.WARNING,
    }
    levels = {name: logging.getLogger(name).level for name in quiet}
    for name, level in quiet.items():
        logging.getLogger(name).setLevel(level)
    try:
        with contextlib.redirect_stdout(io.StringIO()), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            _run_exporter(graph, example, path, names, opset, kind)
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    graph.eval()  # the legacy exporter restores the module's mode afterwards; keep it in eval


def _run_exporter(
    graph: nn.Module, example: torch.Tensor, path: Path, names: list[str], opset: int, kind: str
) -> None:
    if kind == "dynamo":
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=names,
            opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    else:
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=names,
            opset_version=opset,
            dynamic_axes={name: {0: "batch"} for name in [INPUT_NAME, *names]},
        )


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b|, or inf when either side holds a NaN or an infinity (they never agree)."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def export_checked(
    model: nn.Module,
    path: str | Path,
    *,
    with_embedding: bool = False,
    tolerance: float = 1e-3,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    metadata: dict[str, str] | None = None,
) -> ParityReport:
    """Export to a temporary name, check onnxruntime against torch, publish at `path` only if it passed.

    `metadata`: key → text stored in the model's metadata_props (what onnxruntime's
    `get_modelmeta().custom_metadata_map` returns). A model with non-finite weights is refused
    before exporting; a failed check leaves nothing at `path` (an older file there stays as it was).
    """
    path = Path(path)
    bad = [name for name, tensor in model.state_dict().items() if not torch.isfinite(tensor.float()).all()]
    if bad:
        raise ExportError(f"the model holds NaN or infinite values ({', '.join(bad[:3])}…): nothing exported")
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        used = export_onnx(model, tmp, with_embedding=with_embedding, opset=opset, exporter=exporter)
        if metadata:
            add_metadata(tmp, metadata)
        report = check_parity(tmp, model, exporter=used)
        if not report.passed(tolerance):
            raise ExportError(
                f"{path}: onnxruntime disagrees with torch (max |diff| quality {report.max_abs_diff_quality:.3g}, "
                f"embedding {report.max_abs_diff_embedding}) above the tolerance {tolerance}: nothing written"
            )
        os.replace(tmp, path)
        return report
    finally:
        tmp.unlink(missing_ok=True)


def add_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Set metadata_props entries of the ONNX file at `path` (rewritten in place; replaces equal keys)."""
    import onnx

    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def check_parity(
    path: str | Path,
    model: nn.Module,
    *,
    batch_sizes: tuple[int, ...] = (1, 3),
    seed: int = 0,
    images: np.ndarray | None = None,
    exporter: str = "",
) -> ParityReport:
    """Run the ONNX file with onnxruntime and torch on the same images; max |difference| per output."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    with_embedding = "embedding" in names
    model = model.eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    batches = (
        [images]
        if images is not None
        else [rng.uniform(-1, 1, size=(n, 3, *IMAGE_SIZE)).astype(np.float32) for n in batch_sizes]
    )
    diff_quality, diff_embedding = 0.0, 0.0
    for batch in batches:
        outputs = dict(zip(names, session.run(names, {INPUT_NAME: batch}), strict=True))
        with torch.no_grad():
            embedding, quality = model(torch.from_numpy(batch).to(device))
        diff_quality = max(diff_quality, max_abs_diff(outputs["quality"], quality.cpu().numpy()))
        if with_embedding:
            diff_embedding = max(diff_embedding, max_abs_diff(outputs["embedding"], embedding.cpu().numpy()))
    return ParityReport(
        diff_quality, diff_embedding if with_embedding else None, tuple(len(b) for b in batches), exporter
    )
