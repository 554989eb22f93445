"""What the reference matchers are: the spec file, read through the typed loader, and each
matcher's resolved training config.

A spec (default `configs/matchers/synthetic.yaml`) names the matchers' training data (a
synthetic set of its own generator seed), the verification sets their accuracy is measured on,
and the matchers, each a base training config with `--set`-style overrides and a seed:

    data:       {identities: 400, images_per_identity: 20, seed: 2000000}
    evaluation: {seed: 1000000, pairs: 2000}
    matchers:
      - {name: cosface-tiny, config: ../tiny_cpu.yaml, seed: 1, overrides: [optim.epochs=6]}

Unknown keys and wrong types are refused naming the file and the dotted key
(`matchers[0].overide: unknown key`); a matcher's config and overrides are loaded at once, so a
bad override is refused before anything is built. Config paths are relative to the spec file.

Every matcher trains face recognition only: `loss.mode fr` and `data.reg_batch 0` come before
its overrides (`MATCHER_SETTINGS`), so an override that asks for a quality loss is refused by the
config's own check. Its `recipe_id` is a content id of everything that decides its weights (the
resolved config without where files go, and the training data's fingerprint): a matcher whose
recipe changed is trained again, in a run directory of its own.

Why the data seed is disjoint: every synthetic identity is drawn from a generator seeded by (data
seed, stream, identity index) (`data_prep.synth`), so sets of two seeds share no identity. FIQA
models train on small seeds (the demo 0, the study's seeds) and are measured on sets of seed +
1,000,000 (`jobs.stages.efficacy.FRESH_SEED_OFFSET`); the matchers' seed 2,000,000 lies outside
both ranges, so a matcher never saw a face of a FIQA model's training or evaluation data. A
matcher trained on the evaluation identities would compare them better than any unseen face, and
one trained on the FIQA model's identities would share that model's failures; either would bias
the cross-model figures.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config_loader import ConfigError, from_mapping, load_yaml_mapping, shown

if TYPE_CHECKING:
    from pipeline.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = REPO / "configs" / "matchers" / "synthetic.yaml"
# what makes a training FR-only; before the matcher's own overrides, which may not undo them
MATCHER_SETTINGS = ("loss.mode=fr", "data.reg_batch=0")
# config keys that say where things go, not what is trained: left out of the recipe id
WHERE_KEYS = frozenset({"data.dataset", "run.dir", "run.tracking_uri", "run.experiment"})
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MIN_PAIRS = 20  # 10-fold accuracy needs at least 10 pairs; 20 keeps both classes in every fold


@dataclass(frozen=True)
class MatcherDataSpec:
    """The matchers' synthetic training set (`igfiqa prep synth` settings)."""

    identities: int = 400
    images_per_identity: int = 20
    low_variance_fraction: float = 0.15
    seed: int = 2_000_000


@dataclass(frozen=True)
class MatcherEvalSpec:
    """The verification sets (clean.bin, mixed.bin) of an unseen seed that measure each matcher."""

    seed: int = 1_000_000
    pairs: int = 2000
    identities: int = 400


@dataclass(frozen=True)
class MatcherRecipe:
    """One matcher: a base training config (path relative to the spec), overrides, a seed."""

    name: str
    config: str
    seed: int = 0  # run.seed and data.seed: initialisation and data order
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class MatchersSpec:
    """A spec file: the matchers, their training data and their evaluation sets."""

    matchers: tuple[MatcherRecipe, ...]
    data: MatcherDataSpec = field(default_factory=MatcherDataSpec)
    evaluation: MatcherEvalSpec = field(default_factory=MatcherEvalSpec)
    experiment: str = "igfiqa-matchers"  # the MLflow experiment of the matchers' training runs

    def names(self) -> list[str]:
        return [m.name for m in self.matchers]

    def select(self, only: list[str] | tuple[str, ...] | None) -> list[MatcherRecipe]:
        """The matchers named in `only` (all when None), in spec order; an unknown name is an error."""
        if not only:
            return list(self.matchers)
        unknown = [name for name in only if name not in self.names()]
        if unknown:
            raise ConfigError(
                f"--only {unknown[0]}: no such matcher in the spec (it has {', '.join(self.names())})"
            )
        return [m for m in self.matchers if m.name in only]


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_ranges(spec: MatchersSpec) -> None:
    d, e = spec.data, spec.evaluation
    _check(d.identities >= 2, f"data.identities: {d.identities} must be >= 2")
    _check(d.images_per_identity >= 2, f"data.images_per_identity: {d.images_per_identity} must be >= 2")
    _check(0.0 <= d.low_variance_fraction <= 1.0, "data.low_variance_fraction must lie in [0, 1]")
    _check(d.seed >= 0 and e.seed >= 0, "data.seed and evaluation.seed must be >= 0")
    _check(
        e.seed != d.seed,
        f"evaluation.seed: {e.seed} is the training data's seed; the sets must be of an unseen seed",
    )
    _check(e.pairs >= MIN_PAIRS, f"evaluation.pairs: {e.pairs} must be >= {MIN_PAIRS}")
    _check(e.identities >= 2, f"evaluation.identities: {e.identities} must be >= 2")
    _check(bool(spec.matchers), "matchers: the spec names no matcher")
    seen: set[str] = set()
    for i, recipe in enumerate(spec.matchers):
        _check(
            bool(NAME_PATTERN.match(recipe.name)),
            f"matchers[{i}].name: {shown(recipe.name)} must be 1-64 letters, digits, '.', '_' or '-' "
            "(it names files)",
        )
        _check(recipe.name not in seen, f"matchers[{i}].name: {recipe.name!r} appears twice")
        seen.add(recipe.name)
        _check(recipe.seed >= 0, f"matchers[{i}].seed: {recipe.seed} must be >= 0")
        _check(Path(recipe.config).is_file(), f"matchers[{i}].config: {recipe.config} does not exist")


def load_matchers_spec(path: str | Path = DEFAULT_SPEC) -> MatchersSpec:
    """Read and check a spec; every matcher's training config is loaded once to check its overrides.

    ConfigError "SPEC: KEY: what is wrong" for a bad file, key, type, range or override.
    """
    path = Path(path)
    raw = load_yaml_mapping(path, what="matchers spec")
    try:
        spec = from_mapping(MatchersSpec, raw)
        resolved = tuple(replace(m, config=str((path.parent / m.config).resolve())) for m in spec.matchers)
        spec = replace(spec, matchers=resolved)
        _check_ranges(spec)
        for i, recipe in enumerate(spec.matchers):
            try:
                where = path.parent  # placeholders: nothing is written while checking
                matcher_config(
                    spec, recipe, train=where, run_dir=where, tracking_uri=f"sqlite:///{where}/x.db"
                )
            except ConfigError as exc:
                raise ConfigError(f"matchers[{i}] ({recipe.name}): {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return spec


# --------------------------------------------------------------------------- a matcher's training


def matcher_config(
    spec: MatchersSpec, recipe: MatcherRecipe, *, train: Path, run_dir: Path, tracking_uri: str
) -> TrainConfig:
    """The matcher's training config: its base config, FR-only (`MATCHER_SETTINGS`), the training
    set `train`, its seed, then its overrides; paths absolute as for any launch."""
    from jobs.launch import load_launch_config

    placed = [
        *MATCHER_SETTINGS,
        f"data.dataset={train}",
        f"run.dir={run_dir}",
        f"run.tracking_uri={tracking_uri}",
        f"run.name=matcher-{recipe.name}",
        f"run.experiment={spec.experiment}",
        f"run.seed={recipe.seed}",
        f"data.seed={recipe.seed}",
    ]
    return load_launch_config(Path(recipe.config), [*placed, *recipe.overrides])


def recipe_id(config: TrainConfig, data_fingerprint: str) -> str:
    """A short content id of what decides a matcher's weights: the training data's fingerprint and
    every config value that differs from its default, `WHERE_KEYS` aside (16 hex of a SHA-256).

    Values at their defaults are left out, so a config key that a later version of the code adds
    (at a default that keeps today's behaviour) does not retrain every matcher.
    """
    from pipeline.config import TrainConfig, flatten_config

    defaults = flatten_config(TrainConfig())
    recipe = {
        k: v
        for k, v in flatten_config(config).items()
        if k not in WHERE_KEYS and (k not in defaults or v != defaults[k])
    }
    text = json.dumps({"config": recipe, "data": data_fingerprint}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
