"""The registry of adapter kinds: the one place that lists them.

Everything that depends on which kind a fleet trains asks ``adapter_kind(spec)`` (or the name)
and calls the kind's methods (``kind.py``); nothing else tests for a kind. The wire's
``AdapterSpec`` is the union of the registered specs, told apart by their ``kind`` field.

Adding a kind is a package beside ``lora/`` and ``prompt/`` whose ``__init__`` exports ``KIND``
(an ``AdapterKind``), and its name in ``_PACKAGES`` below (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import typing
from collections.abc import Mapping
from typing import Any

from .kind import AdapterKind
from .tensors import Shapes

__all__ = ["KINDS", "SPEC_CLASSES", "adapter_kind", "adapter_shapes", "spec_from_dict", "spec_union"]

#: the kinds' packages, in the order the wire's union lists them (the first is what a spec
#: without a ``kind`` field means: older peers knew only LoRA)
_PACKAGES = ("lora", "prompt")

KINDS: dict[str, AdapterKind] = {}
for _package in _PACKAGES:
    _kind = importlib.import_module(f"{__package__}.{_package}").KIND
    KINDS[_kind.name] = _kind
#: every registered spec dataclass
SPEC_CLASSES: tuple[type, ...] = tuple(kind.spec_class for kind in KINDS.values())


def adapter_kind(spec_or_name: Any) -> AdapterKind:
    """The kind of a spec (or called ``name``); ValueError naming the known kinds otherwise."""
    name = spec_or_name if isinstance(spec_or_name, str) else getattr(spec_or_name, "kind", None)
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ValueError(f"unknown adapter kind {name!r}: edgetune knows {', '.join(KINDS)}")
    return kind


def adapter_shapes(spec: Any, model: Any, rank: int | None = None) -> Shapes:
    """Name -> shape of every tensor of an adapter of ``spec`` on ``model`` (a low-rank kind's
    at ``rank``, if given)."""
    return adapter_kind(spec).shapes(spec, model, rank)


def spec_from_dict(raw: Mapping[str, Any]) -> Any:
    """A spec from its saved fields (``state.json``, ``rounds.json``); no ``kind``: the first
    registered kind (LoRA), as files from before other kinds existed."""
    return adapter_kind(raw.get("kind", _PACKAGES[0])).spec_from_dict(raw)


def spec_union() -> Any:
    """``LoraSpec | PromptSpec | …``: the wire's ``AdapterSpec``."""
    return typing.Union[SPEC_CLASSES]  # noqa: UP007 (a tuple of classes built at run time)
