"""Messages <-> msgpack bytes, with every field type-checked on the way in.

One generic walker driven by the dataclasses' type hints, so the schema is written once (in
``schema.py``) and a new field needs no converter. Decoding never trusts the sender: wrong
types, missing fields, bad tensors and failed ``__post_init__`` checks all become a
:class:`WireError` that names the field, which the receiver logs and counts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from enum import Enum
from functools import cache
from typing import Any

import msgpack
import numpy as np

from .errors import WireError
from .schema import KIND_OF, MESSAGE_KINDS, SCHEMA_VERSION
from .tensors import decode_tensor, encode_tensor

#: Refuse maps/arrays larger than this while unpacking (a hostile payload cannot make us
#: allocate huge containers); tensors are single bin fields so this does not limit them.
_MAX_CONTAINER = 100_000


def encode_message(message: Any) -> bytes:
    """``{"v": SCHEMA_VERSION, "kind": ..., "body": {...}}`` packed with msgpack."""
    kind = KIND_OF.get(type(message))
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not a wire message")
    envelope = {"v": SCHEMA_VERSION, "kind": kind, "body": _to_wire(message)}
    return msgpack.packb(envelope, use_bin_type=True)


def decode_message(payload: bytes | bytearray | memoryview) -> Any:
    """Parse and validate one message; raises :class:`WireError` saying what is wrong."""
    try:
        envelope = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_map_len=_MAX_CONTAINER,
            max_array_len=_MAX_CONTAINER,
        )
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError("bad_msgpack", f"not a msgpack payload ({type(exc).__name__}: {exc})") from None
    if not isinstance(envelope, dict) or not {"v", "kind", "body"} <= set(envelope):
        raise WireError("bad_field", "envelope must be a map with 'v', 'kind' and 'body'")
    version = envelope["v"]
    if version != SCHEMA_VERSION:
        raise WireError(
            "schema_version", f"schema version {version!r}; this side speaks {SCHEMA_VERSION}"
        )
    cls = MESSAGE_KINDS.get(envelope["kind"]) if isinstance(envelope["kind"], str) else None
    if cls is None:
        raise WireError("unknown_kind", f"unknown message kind {envelope['kind']!r}")
    return _from_wire(cls, envelope["body"], cls.__name__)


# --- encoding -------------------------------------------------------------------------------


def _to_wire(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_wire(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, np.ndarray):
        return encode_tensor(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _to_wire(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v) for v in value]
    return value


# --- decoding -------------------------------------------------------------------------------


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_wire(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise WireError("bad_field", f"{path}: expected a map, got {type(data).__name__}")
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        where = f"{path}.{f.name}"
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise WireError("bad_field", f"{where}: missing")
    # Unknown keys come from newer peers: ignored by design (see schema module docstring).
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise WireError("bad_field", f"{path}: {exc}") from None


def _fail(where: str, expected: str, value: Any) -> typing.NoReturn:
    raise WireError("bad_field", f"{where}: expected {expected}, got {type(value).__name__}")


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _convert(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return _from_wire(tp, value, where)
    if tp is np.ndarray:
        return decode_tensor(value, where)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise WireError("bad_field", f"{where}: {value!r} is not one of {allowed}") from None
    if tp is bool:
        if not isinstance(value, bool):
            _fail(where, "a boolean", value)
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(where, "an integer", value)
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            _fail(where, "a number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(where, "a string", value)
        return value
    if tp is bytes:
        if not isinstance(value, (bytes, bytearray)):
            _fail(where, "bytes", value)
        return bytes(value)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(where, "a list", value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise WireError("bad_field", f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(t, v, f"{where}[{i}]") for i, (t, v) in enumerate(zip(args, value)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            _fail(where, "a map", value)
        return {
            _convert(key_type, k, f"{where} key"): _convert(value_type, v, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    raise TypeError(f"schema type {tp!r} at {where} has no wire conversion")  # programming error
