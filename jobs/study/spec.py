"""What a study is: the spec file, read through the typed loader, and the runs it makes.

A study trains every arm (a base training config with `--set` overrides) with every seed on the
same training data, measures each final model by the primary protocol (docs/evaluation.md) and
compares the arms seed by seed. A spec (`configs/study/small_cpu.yaml`, `protocol_s.yaml`):

    name: small-cpu                       # the MLflow experiment igfiqa-study-<name>
    out: ../../work/study-small           # where everything goes (relative to the spec file)
    config: ../tiny_cpu.yaml              # the base training config of every arm
    overrides: [data.num_threads=1]       # before each arm's own
    training_data: {synthetic: {identities: 200, images_per_identity: 40, seed: 0}}  # or {dataset: PATH}
    seeds: [0, 1, 2]
    arms: {"CR(S-)": [loss.mode=cr, ...], "IG(S)": []}
    arm_seeds: {"CR-FIQA(S) single": [0, 1]}   # an arm trained with fewer seeds (default: seeds)
    evaluation: {identity_sets: [...], verification: {...}, data: [...], fmrs: [0.001, 0.0001], ...}
    matchers: {spec: ../matchers/synthetic.yaml, out: ../../work/matchers, use: [cosface-tiny]}  # or onnx: [...]
    endpoint: {metric: edc_ratio, fmr: 0.001}
    hypotheses: [{name: H1, arm: "IG(S-)", baseline: "CR(S-)", endpoint: edc_ratio}]
    bootstrap: {draws: 10000, seed: 0}
    launch: {cluster: ../../slurm/clusters/local.yaml, single_process: true}

Unknown keys and wrong types are refused naming the file and the dotted key; every run's training
config is loaded once, so a bad override is refused before anything runs. Paths are relative to
the spec file; the data and ONNX files a spec names need to exist only where the study runs
(`check_inputs`, before anything is made), so a cluster's spec can be read anywhere. A seed fixes initialisation and data order for every arm (`run.seed = data.seed =
seed`), so the arms of one seed are paired.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.config_loader import ConfigError, from_mapping, load_yaml_mapping, shown

if TYPE_CHECKING:
    from pipeline.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]
ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9()+._-]{0,39}$")  # names run folders and MLflow runs
SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# lower is better for every endpoint but the verification accuracy
QUALITY_ENDPOINTS = ("edc_ratio", "erc_ratio", "edc_pauc")  # how well quality ranks images for a matcher
ENDPOINTS = (*QUALITY_ENDPOINTS, "fr_fnmr", "fr_accuracy")  # and the FR accuracy of the model itself
HIGHER_IS_BETTER = frozenset({"fr_accuracy"})


@dataclass(frozen=True)
class SyntheticTrainingData:
    """The synthetic training set (`igfiqa prep synth` settings), made once under OUT."""

    identities: int = 200
    images_per_identity: int = 40
    low_variance_fraction: float = 0.15
    seed: int = 0


@dataclass(frozen=True)
class TrainingData:
    """Either a synthetic set made by the study (`synthetic`), or a converted dataset (`dataset`)."""

    synthetic: SyntheticTrainingData | None = None
    dataset: str = ""  # a folder written by `igfiqa prep convert` (relative to the spec file)


@dataclass(frozen=True)
class IdentitySetSpec:
    """A synthetic identity-labelled evaluation set (`prep synth --identity-set`): all-vs-all."""

    name: str
    identities: int = 300
    images_per_identity: int = 10
    seed: int = 1_000_000


@dataclass(frozen=True)
class VerificationSpec:
    """Synthetic clean.bin / mixed.bin pair lists of an unseen seed: 10-fold FR accuracy (0 pairs: none)."""

    seed: int = 1_000_000
    pairs: int = 0
    identities: int = 400


@dataclass(frozen=True)
class EvaluationSpec:
    """The sets every final model is measured on, and how (the primary protocol's settings)."""

    identity_sets: tuple[IdentitySetSpec, ...] = ()
    verification: VerificationSpec = field(default_factory=VerificationSpec)
    data: tuple[str, ...] = ()  # folders of converted sets (`prep bins` / `prep convert`), spec-relative
    ground_truth: str = ""  # strength table for the oracle of `data`'s identity sets ("" = their own)
    fmrs: tuple[float, ...] = (1e-3, 1e-4)
    discard_limit: float = 0.2
    nonmated_cap: int = 10_000_000
    nonmated_seed: int = 0
    batch_size: int = 64
    device: str = "auto"


@dataclass(frozen=True)
class MatchersSpec:
    """The matchers: reference matchers built from a matchers spec (`use` of them, all when empty),
    or the user's ONNX files (`onnx`)."""

    spec: str = ""  # a matchers spec (`igfiqa matchers build`), relative to the study spec
    out: str = ""  # where they are built (default: OUT/matchers)
    use: tuple[str, ...] = ()
    onnx: tuple[str, ...] = ()
    bgr: bool = False  # the ONNX files expect BGR


@dataclass(frozen=True)
class EndpointSpec:
    """The primary endpoint: `metric` at `fmr`, per evaluation set and matcher."""

    metric: str = "edc_ratio"
    fmr: float = 1e-3


@dataclass(frozen=True)
class Hypothesis:
    """A paired comparison: `arm` − `baseline` on `endpoint` (default: the primary one), seed by seed."""

    name: str
    arm: str
    baseline: str
    endpoint: str = ""


@dataclass(frozen=True)
class BootstrapSpec:
    """The paired bootstrap of the mean difference: resamples of the seeds, and their generator seed."""

    draws: int = 10_000
    seed: int = 0


@dataclass(frozen=True)
class LaunchSpec:
    """Where runs train: a SLURM cluster profile (`igfiqa study run` without --local), one process per
    run (`single_process`) or the profile's nodes × tasks per run (GPUs: one task per GPU)."""

    cluster: str = ""
    single_process: bool = True
    task_cpus: int = 1  # per single-process task
    measure_ground_truth: bool = True  # synthetic training data: the failure-case measures too


@dataclass(frozen=True)
class StudySpec:
    """A study spec file (see the module docstring)."""

    name: str
    config: str
    arms: dict[str, tuple[str, ...]]
    seeds: tuple[int, ...]
    out: str = ""  # default: work/study-<name> below the current directory
    overrides: tuple[str, ...] = ()
    training_data: TrainingData = field(default_factory=TrainingData)
    arm_seeds: dict[str, tuple[int, ...]] = field(default_factory=dict)
    evaluation: EvaluationSpec = field(default_factory=EvaluationSpec)
    matchers: MatchersSpec = field(default_factory=MatchersSpec)
    endpoint: EndpointSpec = field(default_factory=EndpointSpec)
    hypotheses: tuple[Hypothesis, ...] = ()
    bootstrap: BootstrapSpec = field(default_factory=BootstrapSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    source: str = field(default="", metadata={"config_key": False})  # the file it was read from

    @property
    def experiment(self) -> str:
        """The MLflow experiment of every run of the study."""
        return f"igfiqa-study-{self.name}"

    def seeds_of(self, arm: str) -> tuple[int, ...]:
        return self.arm_seeds.get(arm, self.seeds)

    def runs(self) -> list[StudyRun]:
        """Every arm with each of its seeds, seed-major (all arms of the first seed, then the next):
        the order runs are started in, so a study stopped early lacks whole last seeds."""
        runs = []
        for seed in self.seeds:
            for arm, overrides in self.arms.items():
                if seed in self.seeds_of(arm):
                    runs.append(StudyRun(arm, seed, overrides))
        return runs

    def run(self, name: str) -> StudyRun:
        """The run named `name` (`<arm>-s<seed>`); ConfigError naming the study's runs otherwise."""
        for run in self.runs():
            if run.name == name:
                return run
        raise ConfigError(f"{self.source}: no run {name!r} in the study")


@dataclass(frozen=True)
class StudyRun:
    """One training of the study: an arm with one seed."""

    arm: str
    seed: int
    overrides: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.arm}-s{self.seed}"


# --------------------------------------------------------------------------- reading and checking


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _resolved(path: str, base: Path) -> str:
    """`path` relative to the spec's folder, made absolute ("" stays "")."""
    return str((base / path).resolve()) if path else ""


def _resolve_paths(spec: StudySpec, base: Path) -> StudySpec:
    e, m, d = spec.evaluation, spec.matchers, spec.training_data
    return replace(
        spec,
        config=_resolved(spec.config, base),
        out=_resolved(spec.out, base) if spec.out else str(Path(f"work/study-{spec.name}").resolve()),
        training_data=replace(d, dataset=_resolved(d.dataset, base)),
        evaluation=replace(
            e, data=tuple(_resolved(p, base) for p in e.data), ground_truth=_resolved(e.ground_truth, base)
        ),
        matchers=replace(
            m,
            spec=_resolved(m.spec, base),
            out=_resolved(m.out, base),
            onnx=tuple(_resolved(p, base) for p in m.onnx),
        ),
        launch=replace(spec.launch, cluster=_resolved(spec.launch.cluster, base)),
    )


def _check_ranges(spec: StudySpec) -> None:
    _check(
        bool(SET_NAME.match(spec.name)), f"name: {shown(spec.name)} must be letters, digits, '.', '_', '-'"
    )
    _check(Path(spec.config).is_file(), f"config: {spec.config} does not exist")
    _check(bool(spec.arms), "arms: the study names no arm")
    _check(bool(spec.seeds), "seeds: the study names no seed")
    _check(len(set(spec.seeds)) == len(spec.seeds), f"seeds: {list(spec.seeds)} lists a seed twice")
    _check(all(s >= 0 for s in spec.seeds), "seeds: every seed must be >= 0")
    for arm in spec.arms:
        _check(
            bool(ARM_NAME.match(arm)),
            f"arms.{arm}: an arm name is 1-40 letters, digits or ()+._- (it names folders and runs)",
        )
    for arm, seeds in spec.arm_seeds.items():
        _check(arm in spec.arms, f"arm_seeds.{arm}: no such arm (arms: {', '.join(spec.arms)})")
        unknown = [s for s in seeds if s not in spec.seeds]
        _check(not unknown, f"arm_seeds.{arm}: seeds {unknown} are not among the study's seeds")
        _check(bool(seeds), f"arm_seeds.{arm}: no seed")
    data = spec.training_data
    _check(
        (data.synthetic is None) != (not data.dataset),
        "training_data: give either synthetic (a set the study makes) or dataset (a converted folder)",
    )
    if data.synthetic is not None:
        s = data.synthetic
        _check(s.identities >= 2, "training_data.synthetic.identities must be >= 2")
        _check(s.images_per_identity >= 2, "training_data.synthetic.images_per_identity must be >= 2")
        _check(0 <= s.low_variance_fraction <= 1, "training_data.synthetic.low_variance_fraction: in [0, 1]")
    e = spec.evaluation
    names = [s.name for s in e.identity_sets] + (["clean", "mixed"] if e.verification.pairs else [])
    _check(bool(names or e.data), "evaluation: no set (identity_sets, verification.pairs or data)")
    _check(len(set(names)) == len(names), f"evaluation: set names {names} repeat")
    for i, iset in enumerate(e.identity_sets):
        _check(bool(SET_NAME.match(iset.name)), f"evaluation.identity_sets[{i}].name: {shown(iset.name)}")
        _check(iset.identities >= 2, f"evaluation.identity_sets[{i}].identities must be >= 2")
        _check(
            iset.images_per_identity >= 2, f"evaluation.identity_sets[{i}].images_per_identity must be >= 2"
        )
        _check(
            data.synthetic is None or iset.seed != data.synthetic.seed,
            f"evaluation.identity_sets[{i}].seed: {iset.seed} is the training data's seed; use an unseen one",
        )
    _check(e.verification.pairs >= 0, "evaluation.verification.pairs must be >= 0")
    _check(bool(e.fmrs) and all(0 < f < 1 for f in e.fmrs), "evaluation.fmrs: each in (0, 1)")
    _check(0 < e.discard_limit < 1, "evaluation.discard_limit must lie in (0, 1)")
    _check(e.nonmated_cap >= 0, "evaluation.nonmated_cap must be >= 0 (0: all)")
    m = spec.matchers
    _check(bool(m.spec) != bool(m.onnx), "matchers: give either spec (reference matchers) or onnx (files)")
    _check(not m.spec or Path(m.spec).is_file(), f"matchers.spec: {m.spec} does not exist")
    stems = [Path(p).stem for p in m.onnx]
    _check(len(set(stems)) == len(stems), f"matchers.onnx: file stems {stems} repeat (they name matchers)")
    _check(
        spec.endpoint.metric in ENDPOINTS,
        f"endpoint.metric: {shown(spec.endpoint.metric)} is not one of {ENDPOINTS}",
    )
    _check(spec.endpoint.fmr in e.fmrs, f"endpoint.fmr: {spec.endpoint.fmr:g} is not among evaluation.fmrs")
    for i, h in enumerate(spec.hypotheses):
        for key in ("arm", "baseline"):
            value = getattr(h, key)
            _check(
                value in spec.arms,
                f"hypotheses[{i}].{key}: no arm {shown(value)} (arms: {', '.join(spec.arms)})",
            )
        _check(h.arm != h.baseline, f"hypotheses[{i}]: an arm compared with itself")
        _check(not h.endpoint or h.endpoint in ENDPOINTS, f"hypotheses[{i}].endpoint: not one of {ENDPOINTS}")
    _check(spec.bootstrap.draws >= 100, "bootstrap.draws must be >= 100")
    _check(spec.launch.task_cpus >= 1, "launch.task_cpus must be >= 1")
    _check(
        not spec.launch.cluster or Path(spec.launch.cluster).is_file(),
        f"launch.cluster: {spec.launch.cluster} does not exist",
    )


def load_study_spec(path: str | Path) -> StudySpec:
    """Read and check a study spec; every run's training config is loaded once to check its overrides.

    ConfigError "SPEC: KEY: what is wrong" for a bad file, key, type, range or override.
    """
    path = Path(path).resolve()
    raw = load_yaml_mapping(path, what="study spec")
    try:
        spec = from_mapping(StudySpec, raw)
        spec = replace(_resolve_paths(spec, path.parent), source=str(path))
        _check_ranges(spec)
        where = path.parent  # placeholders: nothing is written while checking
        for run in spec.runs():
            try:
                run_config(spec, run, train=where, run_dir=where, tracking_uri=f"sqlite:///{where}/x.db")
            except ConfigError as exc:
                raise ConfigError(f"arms.{run.arm}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return spec


def run_config(
    spec: StudySpec, run: StudyRun, *, train: Path, run_dir: Path, tracking_uri: str
) -> TrainConfig:
    """The run's training config: the base config, the study's training data, folder, MLflow store and
    seed (initialisation and data order), then the study's overrides, then the arm's."""
    from jobs.launch import load_launch_config

    placed = [
        f"data.dataset={train}",
        f"run.dir={run_dir}",
        f"run.tracking_uri={tracking_uri}",
        f"run.name=study-{run.name}",
        f"run.experiment={spec.experiment}",
        f"run.seed={run.seed}",
        f"data.seed={run.seed}",
    ]
    return load_launch_config(Path(spec.config), [*placed, *spec.overrides, *run.overrides])


def endpoint_of(spec: StudySpec, hypothesis: Hypothesis) -> str:
    """The hypothesis's endpoint: its own, else the study's primary one."""
    return hypothesis.endpoint or spec.endpoint.metric


def check_inputs(spec: StudySpec) -> None:
    """ConfigError naming the spec and key of an input file or folder that is not there."""
    missing = []
    if spec.training_data.dataset and not (Path(spec.training_data.dataset) / "dataset.json").is_file():
        missing.append(f"training_data.dataset: {spec.training_data.dataset} holds no converted dataset")
    missing += [f"evaluation.data: {p} is not a folder" for p in spec.evaluation.data if not Path(p).is_dir()]
    if spec.evaluation.ground_truth and not Path(spec.evaluation.ground_truth).is_file():
        missing.append(f"evaluation.ground_truth: {spec.evaluation.ground_truth} does not exist")
    missing += [f"matchers.onnx: {p} does not exist" for p in spec.matchers.onnx if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"{spec.source}: " + "; ".join(missing))
