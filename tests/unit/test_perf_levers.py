"""The `perf` switches change how fast a step runs, not what it computes (pipeline/training/perf.py).

SGD as loop, foreach or fused gives the same weights; NHWC gives NCHW's within float rounding; a
`torch.compile`d backbone gives eager's forward, gradients and training step within float
rounding, and a compiled run interrupted and resumed ends bit-identical to one that was not.
Every compiled test uses one shape (tiny_config's iresnet_mini, 32-d, 8 + 8 images), so the
module compiles it once (Inductor's on-disk cache then serves the later ones).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config import ConfigError, TrainConfig, config_from_dict
from pipeline.method.backbones import build_backbone
from pipeline.method.model import regression_batch_norm
from pipeline.training.perf import resolve_channels_last, resolve_optimizer_impl
from pipeline.training.schedules import StepValues
from pipeline.training.step import TrainStep

CLASSES, EMBEDDING, HALF = 4, 32, 8
CPU = torch.device("cpu")
# Float32 rounding through train-mode BatchNorm: iresnet_mini's float32 eager gradients lie up to
# 3.4e-3 (relative L2 norm) from float64 eager ones on 8 images, so a reordered sum (NHWC, Inductor's
# fused kernels) may move a tensor that far; a lever that computed something else (another BN
# mode, a missed update) moves it by O(1). The absolute floor covers tensors whose true value is ~0
# (the bias of a BatchNorm followed by another BatchNorm gets rounding noise as its gradient).
REL, ABS = 2e-2, 1e-6


def _assert_close(got: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    error, size = (got.double() - expected.double()).norm(), expected.double().norm()
    assert error <= REL * size + ABS, f"{name}: |got - expected| = {error:.3g}, |expected| = {size:.3g}"


def _config(half: int = HALF, **perf: Any) -> TrainConfig:
    return config_from_dict(
        {
            "data": {"fr_batch": half, "reg_batch": half},
            "model": {"backbone": "iresnet_mini", "embedding_size": EMBEDDING, "head_init": "uniform"},
            "optim": {"lr": 0.05},
            "run": {"device": "cpu"},
            "perf": perf,
        }
    )


def _trained(config: TrainConfig, steps: int, device: torch.device = CPU) -> TrainStep:
    """A TrainStep of `config` (weights drawn from seed 0) after `steps` steps on fixed images."""
    torch.manual_seed(0)
    step = TrainStep(config, num_classes=CLASSES, device=device, world_size=1)
    step.train()
    data = torch.Generator().manual_seed(1)
    half = config.data.fr_batch
    for _ in range(steps):
        images = torch.randn(2 * half, 3, 112, 112, generator=data).to(device)
        labels = torch.randint(0, CLASSES, (2 * half,), generator=data).to(device)
        step(images[:half], labels[:half], images[half:], labels[half:], StepValues(lr=0.05, alpha=0.9))
    return step


def _state(step: TrainStep) -> dict[str, torch.Tensor]:
    """Every trained tensor: model weights and BN statistics, classifier, variance table, momenta."""
    state = {f"model.{k}": v for k, v in step.model.state_dict().items()}
    state |= {f"objective.{k}": v for k, v in step.objective.state_dict().items()}
    for name, optimizer in (("model", step.model_optimizer), ("classifier", step.classifier_optimizer)):
        for index, buffers in optimizer.state_dict()["state"].items():
            state[f"{name}.momentum.{index}"] = buffers["momentum_buffer"]
    return state


def _assert_states(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, exact: bool) -> None:
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        if exact:
            assert torch.equal(got[key], tensor), key
        else:
            _assert_close(got[key], tensor, key)


# --------------------------------------------------------------------------- the config


def test_the_defaults_and_a_bad_value() -> None:
    perf = TrainConfig().perf
    assert (perf.memory_format, perf.optimizer_impl, perf.compile) == ("auto", "auto", "none")
    with pytest.raises(ConfigError, match=r"perf\.compile"):
        config_from_dict({"perf": {"compile": "step"}})
    with pytest.raises(ConfigError, match=r"perf\.optimizer_impl"):
        config_from_dict({"perf": {"optimizer_impl": "adam"}})


def test_auto_is_fused_on_cuda_and_the_loop_on_cpu_and_fused_falls_back_with_a_reason() -> None:
    assert resolve_optimizer_impl("auto", CPU).impl == "loop"
    assert resolve_optimizer_impl("auto", torch.device("cuda", 0)).impl == "fused"
    assert resolve_optimizer_impl("foreach", CPU).impl == "foreach"
    fallback = resolve_optimizer_impl("fused", torch.device("meta"))
    assert fallback.impl == "foreach" and "no fused SGD on meta" in fallback.reason


def test_auto_memory_format_is_nhwc_on_cuda_and_the_backbones_own_on_cpu() -> None:
    tiny, mini = (build_backbone(name, embedding_size=EMBEDDING) for name in ("iresnet_tiny", "iresnet_mini"))
    assert resolve_channels_last("auto", torch.device("cuda", 0), mini)
    assert resolve_channels_last("auto", CPU, tiny) and not resolve_channels_last("auto", CPU, mini)
    assert resolve_channels_last("channels_last", CPU, mini) and not resolve_channels_last(
        "contiguous", CPU, tiny
    )


# --------------------------------------------------------------------------- the SGD kernels


def test_foreach_and_fused_sgd_train_the_same_weights_as_the_loop() -> None:
    expected = _trained(_config(2, optimizer_impl="loop"), steps=3)
    assert not expected.model_optimizer.param_groups[0]["foreach"]
    for impl in ("foreach", "fused"):
        step = _trained(_config(2, optimizer_impl=impl), steps=3)
        assert step.optimizer_choice.impl == impl  # this torch has both on CPU: no fallback
        assert step.model_optimizer.param_groups[0][impl] and step.classifier_optimizer.param_groups[0][impl]
        _assert_states(_state(step), _state(expected), exact=True)


# --------------------------------------------------------------------------- the memory layout


def test_channels_last_puts_every_conv_in_nhwc_and_trains_as_nchw() -> None:
    nhwc = _trained(_config(4, memory_format="channels_last"), 2)
    nchw = _trained(_config(4, memory_format="contiguous"), 2)
    convs = [m.weight for m in nhwc.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)
    plain = [m.weight for m in nchw.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous() for w in plain) and nchw.model.backbone.channels_last is False
    _assert_states(_state(nhwc), _state(nchw), exact=False)


@pytest.mark.gpu
def test_on_cuda_the_auto_switches_train_as_nchw_and_foreach_did(no_tf32: Any) -> None:
    """auto on CUDA (NHWC, fused SGD) against what the step ran there before (NCHW, torch's
    default foreach), in float32 with TF32 off."""
    cuda = torch.device("cuda", 0)
    new = _trained(_config(4), 2, cuda)
    old = _trained(_config(4, memory_format="contiguous", optimizer_impl="foreach"), 2, cuda)
    assert new.channels_last and new.optimizer_choice.impl == "fused" and not old.channels_last
    _assert_states(_state(new), _state(old), exact=False)


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
@pytest.mark.long  # Inductor compiles ~1.5 min on a cold cache; perf.compile is off by default
def test_the_compiled_backbone_gives_eager_outputs_and_gradients() -> None:
    """In train mode (the FR half) and eval mode (the regression half's BN on running statistics),
    each with a backward, as a step runs them: the same graphs the step tests then reuse."""
    torch.manual_seed(0)
    eager = build_backbone("iresnet_mini", embedding_size=EMBEDDING, dropout=0.0)  # NCHW, as auto on CPU
    compiled = copy.deepcopy(eager)
    compiled.compile()
    images = torch.randn(HALF, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    eager.train(), compiled.train()
    for train in (True, False):
        outputs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            with contextlib.nullcontext() if train else regression_batch_norm(model, "running"):
                outputs.append(model(images))
            outputs[-1].square().mean().backward()
        _assert_close(outputs[1], outputs[0], f"embeddings (train={train})")
        got = dict(compiled.named_parameters())
        for name, parameter in eager.named_parameters():
            if parameter.grad is not None:
                _assert_close(got[name].grad, parameter.grad, f"{name}.grad (train={train})")
    buffers = dict(compiled.named_buffers())
    for name, buffer in eager.named_buffers():  # BN running statistics: updated by the train forward
        _assert_close(buffers[name], buffer, name)


@pytest.mark.slow
@pytest.mark.long  # Inductor compiles ~1.5 min on a cold cache; perf.compile is off by default
def test_a_step_with_the_compiled_backbone_equals_the_eager_step() -> None:
    compiled, eager = _trained(_config(compile="backbone"), 2), _trained(_config(compile="none"), 2)
    _assert_states(_state(compiled), _state(eager), exact=False)


def _stop_at(step: int) -> Any:
    calls = {"n": 0}

    def poll() -> int:
        calls["n"] += 1
        return 1 if calls["n"] == step else 0

    return poll


@pytest.mark.slow
@pytest.mark.long  # Inductor compiles ~1.5 min on a cold cache; perf.compile is off by default
def test_a_compiled_run_interrupted_and_resumed_ends_as_the_uninterrupted_one(
    tiny_train_dataset: Path, tmp_path: Path
) -> None:
    pytest.importorskip("nvidia.dali")
    from pipeline.checkpoint import load_checkpoint
    from pipeline.parallel.env import DistEnv
    from pipeline.training.trainer import train
    from tests.train_fixtures import tiny_config

    def config(folder: str) -> TrainConfig:
        return tiny_config(
            tiny_train_dataset,
            tmp_path / folder,
            "off",
            optim={"max_steps": 4},
            # torch.use_deterministic_algorithms changes Inductor's cache key: off, the graphs the
            # tests above compiled serve this run too (CPU kernels are deterministic either way)
            run={"deterministic": False},
            perf={"compile": "backbone"},
        )

    whole = train(config("whole"), DistEnv.single())
    first = train(config("resumed"), DistEnv.single(), stop_requested=_stop_at(2))
    assert (first.status, first.global_step) == ("interrupted", 2)
    second = train(config("resumed"), DistEnv.single())
    assert (whole.status, second.status, second.global_step) == ("completed", "completed", 4)
    got, expected = load_checkpoint(second.checkpoint), load_checkpoint(whole.checkpoint)
    assert got["model"].keys() == expected["model"].keys()  # compiled in place: no _orig_mod. prefix
    for key, tensor in expected["model"].items():
        assert torch.equal(got["model"][key], tensor), key
    for key in ("classifier", "classifier_momentum", "variance"):
        assert torch.equal(got[key], expected[key]), key
    momenta = [expected["optimizer"]["state"][i]["momentum_buffer"] for i in expected["optimizer"]["state"]]
    for index, tensor in zip(expected["optimizer"]["state"], momenta):
        assert torch.equal(got["optimizer"]["state"][index]["momentum_buffer"], tensor)
