"""Test helpers for evaluation, scoring and export: a small checkpoint, face-like images, verification sets.

The verification set writer follows docs/contracts.md with the standard library's
`tarfile`, independently of data_prep's own shard writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import xxhash
from PIL import Image

from data_prep.dataset import FORMAT_VERSION as DATASET_FORMAT_VERSION
from pipeline.checkpoint import FORMAT_VERSION
from pipeline.config import config_from_dict, config_to_dict
from pipeline.method.model import build_model

# a randomly drawn quality head, as a trained model has (the default zero head scores every image 0)
SMALL_MODEL = {"backbone": "iresnet_mini", "embedding_size": 32, "head_init": "uniform"}


def make_checkpoint(
    path: Path, *, seed: int = 0, run_id: str = "", global_step: int = 7
) -> tuple[Path, torch.nn.Module]:
    """A checkpoint in the contract's format holding a small random FIQAModel; returns (path, model in eval mode)."""
    torch.manual_seed(seed)
    config = config_from_dict({"model": SMALL_MODEL, "run": {"name": "tiny"}})
    model = build_model(config.model).eval()
    # non-trivial BatchNorm statistics, as a trained model has
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    classes, dim = 4, config.model.embedding_size
    state = {
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(config),
        "model": model.state_dict(),
        "classifier": torch.zeros(classes, dim),
        "variance": torch.ones(classes),
        "optimizer": {},
        "scheduler": {},
        "epoch": 0,
        "step_in_epoch": global_step,
        "global_step": global_step,
        "rng": {},
        "mlflow_run_id": run_id,
        "code_version": "test",
        "world_size": 1,
    }
    torch.save(state, path)
    return path, model


def face_image(seed: int, size: int = 112, blur: int = 0) -> Image.Image:
    """A deterministic RGB test image (smooth blobs + noise); `blur` > 0 makes a degraded version."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.zeros((size, size, 3))
    for _ in range(6):
        cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.25)
        image += rng.uniform(0.2, 1.0, 3) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2)[..., None] / r**2)
    image = image / image.max() * 200 + rng.normal(0, 12, image.shape)
    pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    if blur:
        pil = pil.resize((size // (blur + 1), size // (blur + 1))).resize((size, size))
    return pil


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_verification_set(root: Path, name: str, images: dict[str, bytes], pairs: pd.DataFrame) -> Path:
    """DIR/<name>/ with shards/shard-00000.tar (+ .idx), manifest.parquet, pairs.parquet, dataset.json."""
    folder = root / name
    shards = folder / "shards"
    shards.mkdir(parents=True)
    tar_path = shards / "shard-00000.tar"
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for index, (key, data) in enumerate(images.items()):
            for suffix, payload in ((".jpg", data), (".cls", str(index).encode())):
                info = tarfile.TarInfo(key + suffix)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(tar_path) as tar:  # member data offsets, as the reader sees them
        offsets = {m.name[: -len(".jpg")]: m.offset_data for m in tar.getmembers() if m.name.endswith(".jpg")}
    rows = [
        {
            "key": key,
            "index": index,
            "sha256": hashlib.sha256(data).hexdigest(),
            "nbytes": len(data),
            "shard": 0,
            "offset": offsets[key],
        }
        for index, (key, data) in enumerate(images.items())
    ]
    (shards / "shard-00000.idx").write_text("")  # a DALI index; evaluation does not read it
    pd.DataFrame(rows).astype({"shard": "int32"}).to_parquet(folder / "manifest.parquet", index=False)
    pairs[["left", "right", "issame"]].to_parquet(folder / "pairs.parquet", index=False)
    info = {
        "format_version": DATASET_FORMAT_VERSION,
        "kind": "verification",
        "num_images": len(images),
        "num_classes": len(images),
        "image_size": [112, 112],
        "seed": 0,
        "samples_per_shard": len(images),
        "shards": [
            {
                "tar": "shards/shard-00000.tar",
                "index": "shards/shard-00000.idx",
                "count": len(images),
                "xxh128": xxhash.xxh3_128(tar_path.read_bytes()).hexdigest(),
            }
        ],
        "source": [{"name": f"{name}.bin", "size": 0, "xxh128": ""}],
        "created_by": "tests/eval_fixtures.py",
    }
    (folder / "dataset.json").write_text(json.dumps(info))
    return folder


def make_verification_set(root: Path, name: str, num_pairs: int = 20, seed: int = 0) -> Path:
    """Pairs of images (2 per pair, consecutive keys as in .bin files); even pairs mated (a blurred copy)."""
    images: dict[str, bytes] = {}
    rows = []
    for pair in range(num_pairs):
        left, right = f"{2 * pair:05d}", f"{2 * pair + 1:05d}"
        mated = pair % 2 == 0
        base = face_image(seed * 10_000 + pair)
        images[left] = jpeg_bytes(base)
        other = (
            face_image(seed * 10_000 + pair, blur=pair % 4)
            if mated
            else face_image(seed * 10_000 + 5000 + pair)
        )
        images[right] = jpeg_bytes(other)
        rows.append({"left": left, "right": right, "issame": mated})
    return write_verification_set(root, name, images, pd.DataFrame(rows))


def make_identity_set(
    root: Path, identities: int = 12, per_identity: int = 4, seed: int = 0
) -> tuple[Path, Path]:
    """An identity-labelled set converted by `igfiqa prep convert`'s code from an InsightFace RecordIO:
    identity c's images are one face degraded at level 0…3 (cycling; blur of that many steps and
    Gaussian noise of σ = 20·level), so that about half the mated pairs fail, most of them the
    degraded ones. Returns (converted dataset folder, ground_truth.parquet keyed by record:
    strength = level / 3, as `prep synth` writes its own)."""
    from data_prep.convert import convert
    from data_prep.synth import write_insightface_recordio

    source = root / "idset-source"
    source.mkdir(parents=True)
    images, rows = [], []
    record = 1  # RecordIO images are records 1..N in identity order
    for identity in range(identities):
        faces = []
        for number in range(per_identity):
            level = (number + identity) % 4
            pixels = np.asarray(face_image(seed * 1000 + identity, blur=level), dtype=np.float64)
            pixels += np.random.default_rng([seed, record]).normal(0, 20 * level, pixels.shape)
            faces.append(jpeg_bytes(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))))
            rows.append({"record": record, "identity": identity, "strength": level / 3})
            record += 1
        images.append(faces)
    write_insightface_recordio(source, images, image_size=112)
    truth = source / "ground_truth.parquet"
    pd.DataFrame(rows).to_parquet(truth, index=False)
    out = root / "idsets" / "idset"
    convert(source, out, samples_per_shard=17, seed=seed, progress=False)
    return out, truth
