"""Embeddings from an independent face recognition model, for cross-model evaluation (paper §4.1).

Two sources besides our own backbone:

* an **ONNX FR model** run with onnxruntime (`OnnxEmbedder`): input one float
  tensor [N, 3, H, W] in the project's layout ((pixel − 127.5) / 127.5, RGB — the
  convention of InsightFace's ArcFace ONNX models; `channel_order="bgr"` reverses
  the channels for models trained on BGR); output [N, D]: the one named, else the
  output called "embedding" when there is one (so `igfiqa export --with-embedding`
  files work as FR models), else the first. A fixed batch size in the model is
  honoured by running it in chunks (the last one zero-padded).
* **precomputed embeddings** in a `.npz` file (`EmbeddingTable`), with two arrays:

      keys        [N] str    image keys; for verification sets either "<set>/<key>"
                             (e.g. "lfw/00000042") or the bare manifest key
      embeddings  [N, D]     float, one row per key (normalisation not needed)

  Write one with `save_embeddings_npz(path, keys, embeddings)` or
  `np.savez(path, keys=np.array(keys), embeddings=matrix)`.

`load_matchers(options)` loads the matchers `EvalOptions` names, once per evaluation: each ONNX
model, or the `.npz` file, named by its file stem, and the model's own backbone ("own backbone")
when no other is given or `options.own_backbone` asks for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.evaluation.options import OWN_BACKBONE, EvalOptions
from pipeline.evaluation.verification import EmbeddingError


class EmbeddingTable:
    """Precomputed embeddings looked up by image key."""

    def __init__(self, keys: Sequence[str], embeddings: np.ndarray, *, source: str = "embeddings"):
        embeddings = np.asarray(embeddings)
        keys = [str(k) for k in keys]
        if embeddings.ndim != 2 or embeddings.shape[0] != len(keys):
            raise EmbeddingError(
                f"{source}: embeddings must be [N, D] with one row per key; got {embeddings.shape} for {len(keys)} keys"
            )
        if embeddings.shape[1] == 0:
            raise EmbeddingError(f"{source}: embeddings have dimension 0")
        bad = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
        if bad.size:
            raise EmbeddingError(f"{source}: embeddings of keys {[keys[i] for i in bad[:5]]} are not finite")
        index = {}
        for row, key in enumerate(keys):
            if key in index:
                raise EmbeddingError(f"{source}: key {key!r} appears more than once")
            index[key] = row
        self.source = source
        self.embeddings = embeddings.astype(np.float32, copy=False)
        self._index = index

    def __len__(self) -> int:
        return len(self._index)

    def lookup(self, keys: Sequence[str], *, prefix: str = "") -> np.ndarray:
        """Rows for `keys`, trying "<prefix>/<key>" first and then the bare key; error naming missing keys."""
        rows, missing = [], []
        for key in keys:
            row = self._index.get(f"{prefix}/{key}") if prefix else None
            if row is None:
                row = self._index.get(str(key))
            if row is None:
                missing.append(f"{prefix}/{key}" if prefix else str(key))
            rows.append(row)
        if missing:
            raise EmbeddingError(
                f"{self.source}: no embedding for {len(missing)} of {len(keys)} images, e.g. {missing[:5]}"
            )
        return self.embeddings[np.asarray(rows, dtype=np.int64)]


def load_embeddings_npz(path: str | Path) -> EmbeddingTable:
    """Read a `.npz` with arrays `keys` [N] and `embeddings` [N, D] (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such embeddings file")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [name for name in ("keys", "embeddings") if name not in data.files]
            if missing:
                raise EmbeddingError(
                    f"{path}: missing array(s) {', '.join(missing)} (found {', '.join(data.files) or 'none'}); "
                    "expected keys [N] and embeddings [N, D]"
                )
            keys, embeddings = data["keys"], data["embeddings"]
    except (OSError, ValueError) as exc:
        if isinstance(exc, EmbeddingError):
            raise
        raise EmbeddingError(f"{path}: not a readable .npz file ({exc})") from None
    return EmbeddingTable(keys.tolist(), embeddings, source=str(path))


def save_embeddings_npz(path: str | Path, keys: Sequence[str], embeddings: np.ndarray) -> Path:
    """Write embeddings in the format `load_embeddings_npz` reads."""
    path = Path(path)
    EmbeddingTable(keys, embeddings, source=str(path))  # same checks as on reading
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        path, keys=np.asarray([str(k) for k in keys]), embeddings=np.asarray(embeddings, dtype=np.float32)
    )
    return path


class OnnxEmbedder:
    """An ONNX face recognition model run with onnxruntime: images [N, 3, H, W] → embeddings [N, D]."""

    def __init__(
        self,
        path: str | Path,
        *,
        output: str | None = None,
        channel_order: str = "rgb",
        providers: Sequence[str] | None = None,
    ):
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX model")
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order {channel_order!r} must be 'rgb' or 'bgr'")
        try:
            self.session = ort.InferenceSession(
                str(self.path), providers=list(providers or ort.get_available_providers())
            )
        except Exception as exc:  # onnxruntime raises its own exception types for invalid models
            raise EmbeddingError(f"{self.path}: onnxruntime cannot load it ({exc})") from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise EmbeddingError(
                f"{self.path}: expected one image input, the model has {[i.name for i in inputs]}"
            )
        self.input = inputs[0]
        shape = self.input.shape
        if len(shape) != 4 or shape[1] not in (3, "3"):
            raise EmbeddingError(
                f"{self.path}: input {self.input.name} has shape {shape}, expected [N, 3, H, W]"
            )
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        self.image_size = tuple(s if isinstance(s, int) else None for s in shape[2:])
        names = [o.name for o in self.session.get_outputs()]
        if output is not None and output not in names:
            raise EmbeddingError(f"{self.path}: no output {output!r} (outputs: {names})")
        self.output = output or ("embedding" if "embedding" in names else names[0])
        self.channel_order = channel_order

    def embed(self, images: np.ndarray) -> np.ndarray:
        """Embeddings of images in the project layout [N, 3, H, W] float32."""
        images = np.asarray(images, dtype=np.float32)
        expected = self.image_size
        if any(e is not None and e != got for e, got in zip(expected, images.shape[2:], strict=True)):
            raise EmbeddingError(
                f"{self.path}: the model expects {expected[0]}×{expected[1]} images, got {images.shape[2]}×{images.shape[3]}"
            )
        if self.channel_order == "bgr":
            images = np.ascontiguousarray(images[:, ::-1])
        chunk = self.fixed_batch or max(1, len(images))
        outputs = []
        for start in range(0, len(images), chunk):
            part = images[start : start + chunk]
            pad = chunk - len(part) if self.fixed_batch else 0
            if pad:
                part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), np.float32)])
            (out,) = self.session.run([self.output], {self.input.name: part})
            outputs.append(np.asarray(out, dtype=np.float32).reshape(len(part), -1)[: len(part) - pad])
        return np.concatenate(outputs) if outputs else np.zeros((0, 0), np.float32)


@dataclass(frozen=True)
class Matcher:
    """Where one set of comparison embeddings comes from, and the name its results carry."""

    name: str
    source: OnnxEmbedder | EmbeddingTable | None  # None: the evaluated model's own backbone


def load_matchers(options: EvalOptions) -> list[Matcher]:
    """The matchers `options` name, in `options.matcher_names` order (see the module doc)."""
    matchers = [
        Matcher(path.stem, OnnxEmbedder(path, channel_order="bgr" if options.fr_bgr else "rgb"))
        for path in options.fr_models
    ]
    if options.fr_embeddings is not None:
        matchers.append(Matcher(options.fr_embeddings.stem, load_embeddings_npz(options.fr_embeddings)))
    if not matchers or options.own_backbone:
        matchers.append(Matcher(OWN_BACKBONE, None))
    return matchers
