"""The bytes the three sharded stages write (conversion, curation filter, curation scoring), pinned.

`stage_outputs` converts a small synthetic source (one record made bad, so `--skip-bad`'s
dropped list is written too), filters it with a hand-made quality file, and scores the
converted set with a small model whose quality head is zero: every score is exactly 0.0, so
the bytes do not hang on the CPU's floating-point kernels (the curated set is not scored: its
dataset.json, and so its fingerprint, holds absolute paths). Every file of the three output
folders, bookkeeping included, is hashed with the work folder's path and the source's mtime
replaced by fixed text (in parquet files also inside the base64 copy of their Arrow schema).

GOLDEN holds the digests of a version of the stages known to be right; any change of what the
stages write, resumable state included, shows here. The bytes also depend on the libraries
that encode the source images (Pillow), draw them (numpy), write parquet (pyarrow) and
initialise the model (torch): GOLDEN_VERSIONS names the versions the digests were recorded
with, and under others the test skips saying so (record new digests by printing
`stage_outputs(tmp)` with code known to be right).
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

VERSIONED = ("numpy", "PIL", "pyarrow", "torch")
ROOT_LENGTH = 240


def library_versions() -> dict[str, str]:
    import importlib

    return {name: importlib.import_module(name).__version__ for name in VERSIONED}


def _zero_head_checkpoint(path: Path) -> Path:
    import torch

    from pipeline.checkpoint import FORMAT_VERSION
    from pipeline.config import config_from_dict, config_to_dict
    from pipeline.method.model import build_model

    torch.manual_seed(0)
    config = config_from_dict(
        {"model": {"backbone": "iresnet_mini", "embedding_size": 32}, "run": {"name": "t"}}
    )
    model = build_model(config.model).eval()
    state = {
        "format_version": FORMAT_VERSION,
        "config": config_to_dict(config),
        "model": model.state_dict(),
        "classifier": torch.zeros(4, 32),
        "variance": torch.ones(4),
        "optimizer": {},
        "scheduler": {},
        "epoch": 0,
        "step_in_epoch": 3,
        "global_step": 3,
        "rng": {},
        "mlflow_run_id": "run-0",
        "code_version": "test",
        "world_size": 1,
    }
    torch.save(state, path)
    return path


def _hand_made_quality(path: Path, dataset: Path) -> Path:
    from data_prep.dataset import dataset_fingerprint
    from data_prep.manifest import read_manifest
    from data_prep.quality_file import QualitySource, write_quality_file

    manifest = read_manifest(dataset)
    quality = np.random.default_rng(4).normal(size=len(manifest)).astype(np.float32)
    table = pd.DataFrame({"key": manifest["key"], "record": manifest["record"], "label": manifest["label"]})
    table["quality"] = quality
    source = QualitySource(
        dataset_fingerprint=dataset_fingerprint(dataset),
        model_fingerprint="0123456789abcdef",
        num_images=len(manifest),
        checkpoint="/runs/x/last.ckpt",
        train_run_id="abc",
        global_step=5,
    )
    write_quality_file(path, table, source)
    return path


def _digests(folder: Path, replace: dict[bytes, bytes]) -> dict[str, str]:
    import pyarrow.parquet as pq

    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".parquet":  # its Arrow schema (with the metadata's paths) is stored base64'd
                blob = (pq.read_metadata(path).metadata or {}).get(b"ARROW:schema")
                data = data.replace(blob, base64.b64decode(blob)) if blob else data
            for old, new in replace.items():
                data = data.replace(old, new)
            digests[path.relative_to(folder).as_posix()] = hashlib.sha256(data).hexdigest()
    return digests


def stage_outputs(root: Path) -> dict[str, dict[str, str]]:
    """Convert, filter and score a small source under ROOT; the sha256 of every file each wrote.

    The work happens in a folder of ROOT whose path is always ROOT_LENGTH characters long, since
    parquet metadata stores the length of the paths it holds."""
    root = Path(root).resolve()
    root = root / ("r" * (ROOT_LENGTH - len(str(root)) - 1))
    root.mkdir()
    from data_prep.convert import convert
    from data_prep.curate import Rule, curate
    from data_prep.synth import synthesize
    from pipeline.curation.scoring import score_dataset

    synthesize(root / "synth", identities=8, images_per_identity=6, verification_pairs=2, seed=3)
    rec = root / "synth" / "train.rec"
    data = bytearray(rec.read_bytes())
    jpeg = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]
    data[jpeg[5] : jpeg[5] + 3] = b"\0\0\0"  # one image record that is not an image: dropped
    rec.write_bytes(bytes(data))
    convert(root / "synth", root / "train", samples_per_shard=10, skip_bad=True, progress=False)
    quality = _hand_made_quality(root / "q.parquet", root / "train")
    curate(
        root / "train",
        quality,
        root / "curated",
        Rule.parse("lowest:0.25", min_per_identity=2),
        progress=False,
    )
    checkpoint = _zero_head_checkpoint(root / "model.ckpt")
    score_dataset(checkpoint, root / "train", root / "scores", device="cpu", batch_size=8, progress=False)
    mtime = json.loads((root / "train" / ".prep" / "plan.json").read_text())["rec_mtime_ns"]
    replace = {str(root).encode(): b"<ROOT>", str(mtime).encode(): b"<MTIME>"}
    return {name: _digests(root / name, replace) for name in ("train", "curated", "scores")}


GOLDEN_VERSIONS: dict[str, str] = {
    "numpy": "2.4.6",
    "PIL": "13.0.0",
    "pyarrow": "25.0.1",
    "torch": "2.13.0+cpu",
}
GOLDEN: dict[str, dict[str, str]] = {
    "train": {
        ".prep/dropped.parquet": "17d63b6fc9cb1d794d170ca002ac4170993bce711d8bee8dfe8569ab5d1a606b",
        ".prep/lock": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ".prep/plan.json": "aaeed6f5935f1d8412f4158535f3b93b8bc204e23a7d220f7948e11a2169a59a",
        ".prep/plan.parquet": "a4c07ad1085d8d28a53e50f61c6a0da5478fc101f8d07b03f4123d62f60446d3",
        ".prep/shard-00000.json": "68d64494512eb3f6f6acf14a29f98c5dafe4281d6bcde18ec6fde520e872ecd7",
        ".prep/shard-00000.parquet": "0e140604b68ce82077e6a7c6fa07fdf3b05af5c65dfd6949cbb695d65522807e",
        ".prep/shard-00001.json": "d30c492fe8b8661f23a7f3b19e788ad788f875f70f96158bb091e7460d29e9c3",
        ".prep/shard-00001.parquet": "a47fb589b73892f60403e87842633abe96eefa707a9846114ba427b1751a776c",
        ".prep/shard-00002.json": "fd9ea545a9041395b87021dc77cd0e77fc751deb5551cc7e42bd009283af2003",
        ".prep/shard-00002.parquet": "8e90546af449a6619ffc85eabc7d21577840169d446df0ed7b2e99258ce14c12",
        ".prep/shard-00003.json": "be23751b46754094a7f9b2a5a0aa3913529dc3caed02ffd49a613bf63c08af11",
        ".prep/shard-00003.parquet": "6e2522227ad0aff95a9508132fc1849723e3af5629bae2b80853ee0cc2b25d9f",
        ".prep/shard-00004.json": "06068e2b68e27c8388e926fb245b6ac54b00ed4e50fc3297bcc39d122f2cde68",
        ".prep/shard-00004.parquet": "7621a86dd66e9e2dc45e63fd22d0aac408f68dd398804f0e5cc3b1de71481566",
        "classes.parquet": "e5d3f09bd0618b2e44865316cff22ee1fa101bd11546a0d05a3b1a929d438585",
        "dataset.json": "157b70975edf4ee012bdb443447308e6f8eb41b96246e2f6d1cec3a30decee05",
        "dropped.parquet": "17d63b6fc9cb1d794d170ca002ac4170993bce711d8bee8dfe8569ab5d1a606b",
        "manifest.parquet": "f3dfd222e4e0f60128824db7293d45f15837893440ea9158575ccf39de410ad3",
        "shards/shard-00000.idx": "2c7d22ce0be3de5dfd41954f8d02eca40af57a91e95b55e7ed991d9729aa8e1c",
        "shards/shard-00000.tar": "0e5bd47c925f76310d2b3dcf036038990af046e2d0d1fe312623d84f74ddd5ff",
        "shards/shard-00001.idx": "92af027cae5cc5bccc495d416114c4d623d4dfb891503db8084be5ea33f4c24f",
        "shards/shard-00001.tar": "032cebc1b9dc390669dd83f10b73353979d8e490d0d245acd737942284bd2361",
        "shards/shard-00002.idx": "ab2196794c6e674735b8bdb481ecec23a5cc9838341dc596a0792722481ff1e0",
        "shards/shard-00002.tar": "cc1f27fe4687bf0960e6f04bcf035f7a10c9649b8bd4090a79e804e815a92b6e",
        "shards/shard-00003.idx": "4db13ddba5ce6936e317920d69231bb4998c3289c1f6f7974025a09b50fcf3c1",
        "shards/shard-00003.tar": "7378838f730abb6a8ae07b81a6d031a2c3c13360fd03b68c58b27e6b6a52b3cf",
        "shards/shard-00004.idx": "c5da47b04e99cf9f8783bcc90e63fd815db667b260b83da60f507e71cd53ae6b",
        "shards/shard-00004.tar": "4a4722aab6be4610232f1efddcd9ac55ec76bbe9db923d900432ca2fab584aa4",
    },
    "curated": {
        ".prep/curate.json": "eb7b0a205d54bec9b22ef62932ae820e19645b2a42873873b90542c9493289a6",
        ".prep/lock": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ".prep/shard-00000.json": "a7ffff1141e1214ff0d9a90d446e749d7cd3bae2a173f343d0c30d28e6942b5b",
        ".prep/shard-00000.parquet": "57365bae4db692186f17538998b867281c4ad409989288d8f13425fbe03d9525",
        ".prep/shard-00001.json": "16043eedf11ba98e966685b765ebd9380f9f2b6a7b624c221842048b5ca2743e",
        ".prep/shard-00001.parquet": "33f10ee767a3bd7cc51d4103246240cf4919eb380e50ca1512d1cea05fe0d531",
        ".prep/shard-00002.json": "49acca339437226b45bb4cfa571db729af0dd3a74d094ca20278107197e0a13b",
        ".prep/shard-00002.parquet": "a748092bb482da7975204c2128120ffe3b59539ba427bb9a327ef48fca4f6e6c",
        ".prep/shard-00003.json": "586f7f0f58d1a84525ff54cf646717262adeb1fd93cbc62d64e9a9fb74cb9c0a",
        ".prep/shard-00003.parquet": "04952270efa6d3c60a63e29befbb571d8341bb074eb25f6962e3ac6d6fba6153",
        "class_map.parquet": "f23c8106d98fdb6cecd52ce5a8e9679c1f7f096e70f720081020c671200f33c3",
        "classes.parquet": "f1721dc7525f091ea56203d9186aa60b177198f78c74ccfc43eebc3726cf816e",
        "dataset.json": "c002d6c806884291bf3bc1c6132c6736f6eb7ec9144f2f4c59ac3c8421f8ec4f",
        "dropped.parquet": "17d63b6fc9cb1d794d170ca002ac4170993bce711d8bee8dfe8569ab5d1a606b",
        "manifest.parquet": "6a365f13022056d6b6046c2022d883f0dc5f9696817215cfbac36d471f4c3df2",
        "removed.parquet": "50141b63e396f14c9aa085137689fb5ad9f90569339974764644c6ac6b0720b3",
        "shards/shard-00000.idx": "8e8590bf7bf50994f86de92ac41748765fa9dc8bf8605785f7af8bb451ef8678",
        "shards/shard-00000.tar": "5f3696e44d8e6fca7952b05ef38044702db53f41305eb13692583b4ccc856189",
        "shards/shard-00001.idx": "23fde61b34189ad9d308b99b0267b23e61ce252f7d4cfc821302589ae0f06031",
        "shards/shard-00001.tar": "063297b53dfdfb2f0c22bc552b206886f4f39d6983dd5e9a234682541f33f1ef",
        "shards/shard-00002.idx": "0be3dc4331893dcb04ae7b29e7042fa4caa906f60dbe6f091e0eb4c56e1d3744",
        "shards/shard-00002.tar": "53cc2b6bb0feb49d066279bc1a544325aaf89bf42ecaf482426b9db5b7dda9f9",
        "shards/shard-00003.idx": "b36a28967aa89edaabe3eefa38174c9aa8e7da601f9c81023b03b15fb982f736",
        "shards/shard-00003.tar": "322f8c8bcb5a6cc3f08c772092b3be02d4077b7fdcca16a28cd0bcbe3c0e1ca8",
    },
    "scores": {
        ".prep/lock": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        ".score/part-00000.parquet": "123d846bcbdfc7416efe94b86d86b348eeb5485a5214a14fa8a17115b82cd117",
        ".score/part-00001.parquet": "5615d3845ff34301a75b01684cccba7a929504dba34e70fd245ab90827132f40",
        ".score/part-00002.parquet": "347f850b76d8b99daab03b4a14ba827e05be0574888c9417d7b3ad08c6b705ce",
        ".score/part-00003.parquet": "5970e9246ed92e36f8afcfdb45b0d6e4efcaf62c10801fb2e7c127efd1567662",
        ".score/part-00004.parquet": "843478ce2a5c54c3e4efe08dcc9b51acd828510fbc5427d873970df6665de509",
        ".score/plan.json": "d52d59273c92505310c2ee86d1adcc94c544e3074686fcd1410572d3ba4252cb",
        "quality.parquet": "d456d719af5f92b418dbe4ec40fd124c77a50f7bea8044af06f9ab234e488834",
    },
}


@pytest.mark.slow
def test_the_stages_write_the_recorded_bytes(tmp_path: Path) -> None:
    if library_versions() != GOLDEN_VERSIONS:
        pytest.skip(f"digests recorded with {GOLDEN_VERSIONS}; this environment has {library_versions()}")
    outputs = stage_outputs(tmp_path)
    for stage, golden in GOLDEN.items():
        assert sorted(outputs[stage]) == sorted(golden), stage
        differ = [name for name in golden if outputs[stage][name] != golden[name]]
        assert not differ, f"{stage}: other bytes in {differ}"
