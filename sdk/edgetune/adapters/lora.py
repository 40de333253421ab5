"""LoRA adapters as plain arrays: ``{module}.lora_A`` (rank, in) and ``{module}.lora_B`` (out, rank).

Pure numpy, no torch, so the aggregator can build, validate and merge adapters without a
framework, and any trainer (PyTorch, ONNX Runtime) gets the same bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

from ..wire import LoraSpec

Shapes = dict[str, tuple[int, ...]]


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


def check_tensors(tensors: Mapping[str, np.ndarray], shapes: Shapes) -> str | None:
    """Why ``tensors`` is not an adapter of ``shapes`` (None if it is): same names, same
    shapes, finite float values."""
    problem = tensor_problem(tensors, shapes)
    return problem[1] if problem else None


def tensor_problem(tensors: Mapping[str, np.ndarray], shapes: Shapes,
                   dtypes: tuple[str, ...] | None = None) -> tuple[str, str] | None:
    """``(reason, detail)`` of what keeps ``tensors`` from being an adapter of ``shapes``, or
    None. Reasons: ``wrong_shape`` (names or shapes), ``bad_dtype`` (not a float, or not one
    of ``dtypes``), ``not_finite``; the cheap checks run on every tensor before any value is read."""
    missing, extra = shapes.keys() - tensors.keys(), tensors.keys() - shapes.keys()
    if missing or extra:
        parts = [f"missing {sorted(missing)[:3]}"] * bool(missing) + [f"unexpected {sorted(extra)[:3]}"] * bool(extra)
        return "wrong_shape", "; ".join(parts)
    for name, array in tensors.items():
        if tuple(array.shape) != tuple(shapes[name]):
            return "wrong_shape", f"{name} has shape {list(array.shape)}, expected {list(shapes[name])}"
        dtype = "bfloat16" if type(array).__name__ == "BFloat16Array" else str(array.dtype)
        if dtypes is not None and dtype not in dtypes:
            return "bad_dtype", f"{name} has dtype {dtype}, expected one of {', '.join(dtypes)}"
        if dtype != "bfloat16" and array.dtype.kind != "f":
            return "bad_dtype", f"{name} has dtype {array.dtype}, expected a float type"
    for name, array in tensors.items():
        if not np.isfinite(as_float32(array)).all():
            return "not_finite", f"{name} contains NaN or infinity"
    return None


def as_float32(array: np.ndarray) -> np.ndarray:
    to_float32 = getattr(array, "to_float32", None)
    return to_float32() if to_float32 else np.asarray(array, dtype=np.float32)


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
