"""Which quality head does a fixed backbone allow? Least-squares heads on its embeddings, compared.

    .venv/bin/python -m experiments.head_fit CHECKPOINT --train work/demo/train --seed 1001 [--work work/efficacy]

Training runs of one recipe differ by ~0.07 in the EDC ratio, as much as most recipe changes, so
comparing heads by training each is noise. This takes one trained checkpoint and holds its
backbone fixed: it embeds the training images, computes their CR labels with the checkpoint's own
classifier centres (CR-FIQA: cos to the own centre / (largest cos to another centre + 1 + eps)),
fits a ridge-regularised least-squares head to them for each input (the embedding e, its norm
||e||, both), and scores the fresh sets of `--seed` (`experiments/efficacy.py`'s) with every head
beside the trained one: Spearman's rho against the known degradation strength, the EDC ratio
against random permutations of the same scores, and the oracle's ratio.

The last printed line is the JSON object of every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from data_prep.dataset import load_dataset_info
from data_prep.manifest import read_manifest
from data_prep.shard_reader import ShardReader
from pipeline.checkpoint import load_checkpoint
from pipeline.data.image_io import decode_image
from pipeline.evaluation.efficacy import DEFAULT_PAIRS, edc_ratios, make_fresh_sets, strength_by_key
from pipeline.evaluation.evaluate import evaluate_set, load_verification_set
from pipeline.evaluation.options import EvalOptions
from pipeline.method.losses import certainty_ratio
from pipeline.method.model import inference_model_from_state

HEAD_INPUTS = ("e", "norm", "e+norm")
BATCH = 256


def embed(model: torch.nn.Module, tar_paths: list[Path], rows: pd.DataFrame) -> torch.Tensor:
    """Embeddings of the manifest `rows` (key, shard, offset, nbytes), in their order."""
    out = []
    with ShardReader(tar_paths) as reader, torch.inference_mode():
        for start in range(0, len(rows), BATCH):
            batch = rows.iloc[start : start + BATCH]
            pixels = np.stack(
                [
                    decode_image(
                        reader.read(int(r.shard), int(r.offset), int(r.nbytes)).tobytes(), source=str(r.key)
                    ).tensor
                    for r in batch.itertuples()
                ]
            )
            out.append(model(torch.from_numpy(pixels))[0])
    return torch.cat(out)


def cr_labels(embeddings: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> np.ndarray:
    """CR-FIQA's certainty ratio of each embedding against the classifier centres."""
    cos = torch.nn.functional.normalize(embeddings, dim=1) @ torch.nn.functional.normalize(centres, dim=1).T
    rows = torch.arange(len(labels))
    own = cos[rows, labels].clone()
    cos[rows, labels] = float("-inf")  # the largest cosine over the *other* centres, as in training
    return certainty_ratio(own, cos.max(dim=1).values).double().numpy()


def head_features(embeddings: torch.Tensor, head_input: str) -> np.ndarray:
    """The head's input columns: e, ||e|| or both."""
    norm = embeddings.norm(dim=1, keepdim=True)
    columns = {"e": embeddings, "norm": norm, "e+norm": torch.cat([embeddings, norm], dim=1)}[head_input]
    return columns.double().numpy()


def fit_head(
    train: np.ndarray, target: np.ndarray, ridge: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, weights incl. bias) of a ridge least-squares head on standardised columns."""
    mean, std = train.mean(0), train.std(0) + 1e-9
    design = np.c_[(train - mean) / std, np.ones(len(train))]
    weights = np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ target)
    return mean, std, weights


def main(argv: list[str] | None = None) -> int:
    """Command line: the trained head and least-squares heads of one backbone on one seed's sets."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="a training checkpoint (.ckpt)")
    parser.add_argument(
        "--train", type=Path, required=True, help="the converted training set it was trained on"
    )
    parser.add_argument("--seed", type=int, required=True, help="seed of the fresh verification sets")
    parser.add_argument("--work", type=Path, default=Path("work/efficacy"), help="where the sets go")
    parser.add_argument("--pairs", type=int, default=DEFAULT_PAIRS)
    parser.add_argument("--ridge", type=float, default=1.0, help="L2 penalty on the standardised weights")
    args = parser.parse_args(argv)

    state = load_checkpoint(args.checkpoint)
    model, _ = inference_model_from_state(state)
    manifest = read_manifest(args.train)
    train_embeddings = embed(model, load_dataset_info(args.train).tar_paths, manifest)
    target = cr_labels(
        train_embeddings, torch.as_tensor(manifest["label"].to_numpy()), state["classifier"].float()
    )

    sets = make_fresh_sets(args.work, args.seed, pairs=args.pairs)
    mixed = load_verification_set(sets.val / "mixed")
    trained = evaluate_set(model, mixed, EvalOptions(device="cpu", progress=False), method="model")
    keys = trained.scores["image"].astype(str)
    fresh_embeddings = embed(
        model, mixed.info.tar_paths, mixed.manifest.set_index("key").loc[keys].reset_index()
    )
    strength = strength_by_key(sets.val / "mixed", sets.synth / "mixed_ground_truth.parquet").reindex(keys)

    heads = {"trained": trained.scores["model"].to_numpy(np.float64)}
    for head_input in HEAD_INPUTS:
        mean, std, weights = fit_head(head_features(train_embeddings, head_input), target, args.ridge)
        columns = (head_features(fresh_embeddings, head_input) - mean) / std
        heads[head_input] = np.c_[columns, np.ones(len(columns))] @ weights
    figures = {}
    for name, quality in heads.items():
        scores = pd.Series(quality, index=keys.to_numpy())
        ratios = edc_ratios(trained.pairs, scores, strength, seed=args.seed)
        rho = float(spearmanr(quality, strength.to_numpy()).statistic)
        figures[name] = {
            "spearman": rho,
            "edc_ratio": ratios["edc_ratio"],
            "oracle_ratio": ratios["oracle_ratio"],
        }
        print(
            f"{name:8s} Spearman {rho:+.3f}  EDC ratio {ratios['edc_ratio']:.3f}  oracle {ratios['oracle_ratio']:.3f}"
        )
    print(json.dumps({"seed": args.seed, "checkpoint": str(args.checkpoint), "heads": figures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
