"""LoRA adapters as plain arrays: ``{module}.lora_A`` (rank, in) and ``{module}.lora_B`` (out, rank).

Pure numpy, no torch, so the aggregator can build, validate and merge adapters without a
framework, and any trainer (PyTorch, ONNX Runtime) gets the same bytes. This module is where the
rank contract lives: a device planned below the fleet's rank R trains the leading r components
(``split_rank``), at the same scale alpha / R (``LoraSpec.at_rank``); its delta is zero-padded
back to R where it is merged (``pad_rank``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from ..tensors import Shapes, as_float32, check_tensors
from .spec import LoraSpec


def targets(spec: LoraSpec, modules: Mapping[str, tuple[int, int]]) -> list[str]:
    """Module names that ``spec.target_modules`` selects, PEFT-style: a target matches a
    module whose name equals it or ends with ``"." + target``."""
    chosen = [
        name
        for name in modules
        if any(name == t or name.endswith("." + t) for t in spec.target_modules)
    ]
    if not chosen:
        raise ValueError(
            f"target modules {list(spec.target_modules)} match no linear layer of the model "
            f"(it has e.g. {sorted(modules)[:4]})"
        )
    return sorted(chosen)


def lora_shapes(spec: LoraSpec, modules: Mapping[str, tuple[int, int]]) -> Shapes:
    """Name -> shape of every adapter tensor for this spec on this model."""
    shapes: Shapes = {}
    for name in targets(spec, modules):
        out_features, in_features = modules[name]
        shapes[f"{name}.lora_A"] = (spec.rank, in_features)
        shapes[f"{name}.lora_B"] = (out_features, spec.rank)
    return shapes


def init_lora(spec: LoraSpec, modules: Mapping[str, tuple[int, int]], seed: int) -> dict[str, np.ndarray]:
    """The starting adapter of a fleet: A ~ U(±1/√in) (PEFT's Kaiming-uniform bound), B = 0,
    so the adapter starts as a no-op but has gradients. Seeded per tensor name, so it is the
    same on every platform and independent of dictionary order."""
    tensors = {}
    for name, shape in lora_shapes(spec, modules).items():
        if name.endswith(".lora_B"):
            tensors[name] = np.zeros(shape, np.float32)
        else:
            key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
            bound = 1.0 / np.sqrt(shape[1])
            rng = np.random.default_rng(key)
            tensors[name] = rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return tensors


def rank_of(tensors: Mapping[str, np.ndarray]) -> int:
    """The rank of an adapter (rows of its first ``lora_A``); 0 if it has none, or if that
    tensor is not a matrix (whatever sent it, its shapes are then refused)."""
    for name in sorted(tensors):
        if name.endswith(".lora_A"):
            shape = tensors[name].shape
            return int(shape[0]) if len(shape) == 2 else 0
    return 0


def truncate_rank(tensors: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """The leading ``rank`` components: rows of A, columns of B. A device planned at a lower
    rank than the fleet's starts from this part of the global adapter."""
    return {
        name: as_float32(t)[:rank] if name.endswith(".lora_A") else as_float32(t)[:, :rank]
        for name, t in tensors.items()
    }


def pad_rank(tensors: Mapping[str, np.ndarray], rank: int) -> dict[str, np.ndarray]:
    """Zero-pad an adapter (or a delta) to ``rank`` components: the missing components are
    unchanged by a delta, and contribute nothing to B·A."""
    padded = {}
    for name, t in tensors.items():
        t = as_float32(t)
        missing = rank - (t.shape[0] if name.endswith(".lora_A") else t.shape[1])
        if missing == 0:  # (np.pad copies, and costs ~50 µs a call: most deltas are full rank)
            padded[name] = t
        elif name.endswith(".lora_A"):
            padded[name] = np.pad(t, ((0, missing), (0, 0)))
        else:
            padded[name] = np.pad(t, ((0, 0), (0, missing)))
    return padded


def module_names(tensors: Mapping[str, np.ndarray]) -> list[str]:
    """The adapted modules of an adapter (``m`` of every ``m.lora_A``), sorted."""
    return sorted(name[: -len(".lora_A")] for name in tensors if name.endswith(".lora_A"))


def split_rank(tensors: Mapping[str, np.ndarray], rank: int, scale: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The leading ``rank`` components to train, and the rest as a frozen merged delta.

    A device planned below the fleet's rank trains the leading components of the global
    adapter; folding the remaining ones in as ``merged`` factors (scaled, so they need no
    alpha) keeps its model equal to the global model at the start of the round.
    """
    top = truncate_rank(tensors, rank)
    rest: dict[str, np.ndarray] = {}
    for module in module_names(tensors):
        A = as_float32(tensors[f"{module}.lora_A"])
        if A.shape[0] > rank:
            rest[f"{module}.merged_B"] = (as_float32(tensors[f"{module}.lora_B"])[:, rank:] * scale).astype(np.float32)
            rest[f"{module}.merged_A"] = A[rank:]
    return top, rest


def concat_merged(*parts: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Sum of merged deltas, by stacking their factors (exact)."""
    out: dict[str, np.ndarray] = {}
    for part in parts:
        for name, array in part.items():
            array = as_float32(array)
            if name not in out:
                out[name] = array
            else:
                out[name] = np.hstack([out[name], array]) if name.endswith(".merged_B") else np.vstack([out[name], array])
    return out


def check_merged(merged: Mapping[str, np.ndarray], modules: Mapping[str, tuple[int, int]]) -> str | None:
    """Why ``merged`` is not a frozen delta for these modules (None if it is)."""
    for name, array in merged.items():
        module, _, factor = name.rpartition(".")
        if factor not in ("merged_A", "merged_B") or module not in modules:
            return f"unexpected merged tensor {name!r}"
        other = merged.get(f"{module}.{'merged_B' if factor == 'merged_A' else 'merged_A'}")
        if other is None:
            return f"{name} has no partner factor"
        out_features, in_features = modules[module]
        if other.ndim != 2:
            return f"{name}'s partner is not a matrix"
        expected = (other.shape[1], in_features) if factor == "merged_A" else (out_features, other.shape[0])
        if array.ndim != 2 or tuple(array.shape) != expected:
            return f"{name} has shape {list(array.shape)}, expected {list(expected)}"
        if not np.isfinite(as_float32(array)).all():
            return f"{name} contains NaN or infinity"
    return None


def weight_deltas(spec: LoraSpec, tensors: Mapping[str, np.ndarray], merged: Mapping[str, np.ndarray],
                  modules: Mapping[str, tuple[int, int]]) -> dict[str, np.ndarray]:
    """Module -> the dense (out, in) float32 change to its weight,
    ``merged_B @ merged_A + (alpha / rank) · lora_B @ lora_A`` (exact); ValueError on a misfit."""
    problem = check_tensors(tensors, lora_shapes(spec, modules)) or check_merged(merged, modules)
    if problem:
        raise ValueError(problem)
    deltas: dict[str, np.ndarray] = {}
    for module in sorted({name.rsplit(".", 1)[0] for name in merged}):
        b, a = as_float32(merged[f"{module}.merged_B"]), as_float32(merged[f"{module}.merged_A"])
        if a.shape[0]:  # k = 0 changes nothing
            deltas[module] = b @ a
    scale = np.float32(spec.scale)
    for module in module_names(tensors):
        lora = scale * (as_float32(tensors[f"{module}.lora_B"]) @ as_float32(tensors[f"{module}.lora_A"]))
        deltas[module] = deltas[module] + lora if module in deltas else lora
    return {module: np.asarray(delta, dtype=np.float32) for module, delta in deltas.items()}
