"""Backbone registry: `build_backbone(name, embedding_size=…, dropout=…)`.

A backbone maps images [N, 3, 112, 112] (see docs/contracts.md) to embeddings
[N, embedding_size]. Families register their constructors with `@register_backbone`;
the registry is filled by importing the family modules at the bottom of this file.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

BackboneFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, BackboneFactory] = {}


def register_backbone(name: str) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator: make `factory(embedding_size=…, dropout=…)` buildable by `name`."""

    def decorate(factory: BackboneFactory) -> BackboneFactory:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def available_backbones() -> list[str]:
    """Names accepted by `build_backbone`, sorted."""
    return sorted(_REGISTRY)


def build_backbone(name: str, *, embedding_size: int = 512, dropout: float = 0.0) -> nn.Module:
    """A freshly initialised backbone by registry name (e.g. "iresnet50", "iresnet_mini")."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backbone {name!r} (model.backbone); known: {', '.join(available_backbones())}"
        ) from None
    return factory(embedding_size=embedding_size, dropout=dropout)


# Importing a family module registers its backbones.
from pipeline.method.backbones import iresnet as _iresnet  # noqa: E402, F401
