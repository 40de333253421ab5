"""The one interface of an adapter kind: everything the device, the trainers, the planner, the
aggregator and the state dir ask of "a LoRA" or "a soft prompt".

A kind is a package (``edgetune.adapters.lora``, ``edgetune.adapters.prompt``) with its spec
(the dataclass that travels in tasks), its tensor layout, how a fleet starts, how a device
trains below the fleet's rank, how two adapters are interpolated, how a change is measured,
and the PEFT files it writes. One instance per kind is registered in ``registry.py``; code
elsewhere asks ``adapter_kind(spec)`` instead of testing which kind it holds.

Defaults here are those of a dense adapter with no rank (what a soft prompt is): a kind
overrides what differs. Pure numpy, and no import of the wire: ``edgetune.wire`` builds its
``AdapterSpec`` union from the registered specs (docs/architecture.md, "adding an adapter kind").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np

from .tensors import Shapes, Tensors, as_float32, dense_change, dense_norm

if TYPE_CHECKING:  # (the wire imports this package: no import back at run time)
    from ..wire import ModelManifest

__all__ = ["AdapterKind", "BaseEmbeddings", "TrainingStart"]


class BaseEmbeddings(Protocol):
    """What a device's base offers a kind that starts from it (a soft prompt's first vectors
    are rows of the token embedding matrix, which only devices hold)."""

    vocab_size: int

    def rows(self, ids: np.ndarray) -> np.ndarray: ...

    def std(self) -> float: ...

    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class TrainingStart:
    """What a trainer is set to at the start of a round: the spec it builds (at the device's
    rank), the trainable tensors, and the frozen merged delta that keeps its model equal to the
    global model (``GlobalAdapter.merged``)."""

    spec: Any
    tensors: dict[str, np.ndarray]
    merged: dict[str, np.ndarray]


class AdapterKind(ABC):
    #: the kind's name on the wire (a spec's ``kind`` field, ``Capabilities.adapters``)
    name: ClassVar[str]
    #: its spec dataclass (frozen, with a ``kind`` field defaulting to ``name``)
    spec_class: ClassVar[type]
    #: trainer classes by backend ("torch", "ort"), as "module:Class", imported when first used
    #: (``edgetune.trainers.trainer_class``)
    trainers: ClassVar[Mapping[str, str]] = {}
    #: its start needs the base's weights, which only devices hold: a fleet of this kind begins
    #: with an initialization round (``TaskKind.INITIALIZE``) and ``initial_from_base``
    initialized_on_devices: ClassVar[bool] = False
    #: the planner's cost model knows it (rank, base precision, batch; docs/planner.md)
    plannable: ClassVar[bool] = False
    #: it sits on weight matrices an importance layout chooses (a calibration round)
    has_layout: ClassVar[bool] = False
    #: the aggregator's merge strategies that can merge it (``edgetune_aggregator.strategies``)
    strategies: ClassVar[tuple[str, ...]] = ("dense",)
    #: it changes the base's weights (``weight_deltas``), so it can be merged into them
    #: (``edgetune export --merged``)
    changes_weights: ClassVar[bool] = False
    #: how the guard's messages name what ``global_change`` measures
    change_measure: ClassVar[str] = "(Frobenius)"

    # --- layout --------------------------------------------------------------------------

    @abstractmethod
    def shapes(self, spec: Any, model: ModelManifest, rank: int | None = None) -> Shapes:
        """Name -> shape of every tensor of an adapter of ``spec`` on ``model`` (at ``rank``
        for a low-rank kind; others ignore it). Raises ValueError when the model cannot hold it."""

    def update_shapes(self, spec: Any, model: ModelManifest, delta: Tensors) -> Shapes:
        """The layout a device's update must have: the fleet's, or a low-rank kind's at the
        rank the update has (within the fleet's). Raises ValueError saying why not."""
        return self.shapes(spec, model)

    def rank(self, spec: Any) -> int | None:
        """The fleet's rank (None: the kind has none)."""
        return None

    def scale(self, spec: Any) -> float:
        """What the trainable tensors are multiplied by where they act (LoRA: alpha / rank)."""
        return 1.0

    def describe(self, spec: Any, model: ModelManifest | None = None) -> str:
        """For people: what an adapter of ``spec`` is (on ``model``, where it matters)."""
        return f"a {self.name} adapter"

    def plan_note(self, spec: Any, model: ModelManifest, rank: int) -> str:
        """What a device's plan means for this kind, appended to its log line ("" for nothing)."""
        return ""

    def auto_strategy(self, mixed: bool) -> str:
        """The merge strategy ``--strategy auto`` picks (``mixed``: devices train different ranks)."""
        return "dense"

    # --- a fleet's start -------------------------------------------------------------------

    def initial(self, spec: Any, model: ModelManifest, seed: int) -> dict[str, np.ndarray] | None:
        """The fleet's starting adapter, the same on every platform for the same seed; None
        for a kind that starts on devices (``initialized_on_devices``)."""
        return None

    def initial_from_base(self, spec: Any, base: BaseEmbeddings, seed: int) -> dict[str, np.ndarray]:
        """A device's proposal for the starting adapter, from its base (an initialization round)."""
        raise ValueError(f"a {self.name} adapter does not start from the base's weights")

    # --- a round on a device ---------------------------------------------------------------

    def training_start(self, spec: Any, tensors: Tensors, merged: Tensors, rank: int | None) -> TrainingStart:
        """How a device trains the global adapter at its planned ``rank``: whole, by default."""
        start = {name: np.array(as_float32(t), dtype=np.float32) for name, t in tensors.items()}
        return TrainingStart(spec, start, dict(merged))

    def interpolate(self, spec: Any, global_tensors: Tensors, global_merged: Tensors, local_tensors: Tensors,
                    alpha: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(tensors, merged)`` of the model ``(1 − α)·global + α·local`` (personalization).
        A dense adapter is linear in its parameters: the tensors' own interpolation is exact."""
        tensors = {name: ((1.0 - alpha) * np.asarray(as_float32(g), np.float64)
                          + alpha * np.asarray(as_float32(local_tensors[name]), np.float64)).astype(np.float32)
                   for name, g in global_tensors.items()}
        return tensors, {}

    # --- measuring changes (the aggregator's guard) ----------------------------------------

    def change_meter(self, start: Tensors, scale: float) -> Callable[[Tensors], float]:
        """How far one device's delta moves the model on its own, for the deltas of a round
        that started from ``start`` (here the norm of the delta; a kind may prepare per round)."""
        return dense_norm

    def global_change(self, parent: tuple[Tensors, Tensors], candidate: tuple[Tensors, Tensors],
                      scale: float) -> float:
        """How far a candidate global ``(tensors, merged)`` moves the model from its parent."""
        return dense_change(parent[0], candidate[0])

    def weight_deltas(self, spec: Any, tensors: Tensors, merged: Tensors,
                      modules: Mapping[str, tuple[int, int]]) -> dict[str, np.ndarray] | None:
        """Module -> the dense change the adapter makes to that weight; None for a kind that
        changes no weight (``changes_weights``)."""
        return None

    # --- files -----------------------------------------------------------------------------

    @abstractmethod
    def write_peft(self, directory: Path, spec: Any, tensors: Tensors, base_model: str,
                   merged: Tensors | None) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (atomically) so that
        ``peft.PeftModel.from_pretrained(base, directory)`` loads this adapter."""

    def spec_from_dict(self, raw: Mapping[str, Any]) -> Any:
        """The spec from its fields as saved in JSON (lists for tuples); keys it does not
        have (another kind's, a newer version's) are ignored."""
        import dataclasses
        import typing

        hints = typing.get_type_hints(self.spec_class)
        values = {}
        for field in dataclasses.fields(self.spec_class):
            if field.name in raw:
                value = raw[field.name]
                if typing.get_origin(hints[field.name]) is tuple and isinstance(value, list):
                    value = tuple(value)
                values[field.name] = value
        return self.spec_class(**values)
