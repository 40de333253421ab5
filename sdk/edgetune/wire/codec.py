"""Messages <-> msgpack bytes, with every field type-checked on the way in.

One generic walker driven by the dataclasses' type hints, so the schema is written once (in
``specs.py`` and ``messages.py``) and a new field needs no converter. Decoding never trusts the sender: wrong
types, missing fields, bad tensors and failed ``__post_init__`` checks all become a
:class:`WireError` that names the field, which the receiver logs and counts.

Wire v2 (``SCHEMA_VERSION``): ``{"v": 2, "kind": KIND, "body": {...}, "data": <bin>}``, where
every tensor of the message lies in ``data`` and the body's tensor fields are indexes into it
(``packed.py``). ``data`` is the envelope's last entry, so the encoder writes the envelope and
joins the tensors after it, copying each once. Peers decode only v2; ``decode_message(...,
versions=(1, 2))`` reads wire v1 too (``{dtype, shape, data}`` per tensor), for files written
before v2 (a state dir's global versions).
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from enum import Enum
from contextvars import ContextVar
from functools import cache
from typing import Any

import msgpack
import numpy as np

from .errors import WireError
from .messages import KIND_OF, MESSAGE_KINDS, SCHEMA_VERSION
from .packed import Blob, Cursor, pack_tensors, unpack_tensors
from .quantize import QuantizedTensor
from .tensors import decode_tensor

#: Refuse maps/arrays larger than this while unpacking (a hostile payload cannot make us
#: allocate huge containers); tensors are single bin fields so this does not limit them.
_MAX_CONTAINER = 100_000
#: Payloads up to this size (one packet) are walked once without building anything first.
_PREFLIGHT_MAX = 1 << 20
#: bytes the envelope's reader takes at a time (the tensors after the head are viewed, not read)
_HEAD_READ = 1 << 16


#: wire versions each side reads from peers; older ones are refused with a reason naming the upgrade
PEER_VERSIONS = (SCHEMA_VERSION,)
#: what files written by earlier versions may hold
FILE_VERSIONS = (1, SCHEMA_VERSION)
#: the sdk release that brought each wire version (what a refusal tells the sender to upgrade to)
RELEASE_OF = {1: "0.1", 2: "0.2"}


def encode_message(message: Any) -> bytes:
    """``{"v": 2, "kind": ..., "body": {...}, "data": <the tensors>}`` packed with msgpack."""
    kind = KIND_OF.get(type(message))
    if kind is None:
        raise TypeError(f"{type(message).__name__} is not a wire message")
    blob = Blob()
    body = _to_wire(message, blob)
    envelope = {"v": SCHEMA_VERSION, "kind": kind, "body": body}
    if not blob.size:
        return msgpack.packb(envelope, use_bin_type=True)
    # the map's 4th entry, written by hand so the tensors are copied once: into the result
    head = msgpack.packb(envelope, use_bin_type=True)
    return b"".join([b"\x84", head[1:], _DATA_KEY, b"\xc6", blob.size.to_bytes(4, "big"), *blob.pieces])


_DATA_KEY = msgpack.packb("data")


def decode_message(payload: bytes | bytearray | memoryview, versions: tuple[int, ...] = PEER_VERSIONS) -> Any:
    """Parse and validate one message; raises :class:`WireError` saying what is wrong. A wire
    version not in ``versions`` is refused (``schema_version``) with what to upgrade."""
    try:
        if len(payload) <= _PREFLIGHT_MAX:
            _check_complete(payload)
        envelope, data = _unpack_envelope(payload)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise WireError("bad_msgpack", f"not a msgpack payload ({type(exc).__name__}: {exc})") from None
    if not {"v", "kind", "body"} <= set(envelope):
        raise WireError("bad_field", "envelope must be a map with 'v', 'kind' and 'body'")
    version = envelope["v"]
    # (type first: True and 1.0 compare equal to 1, but no peer of ours sends them)
    if type(version) is not int or version not in versions:
        raise WireError("schema_version", _version_refusal(version, versions))
    cls = MESSAGE_KINDS.get(envelope["kind"]) if isinstance(envelope["kind"], str) else None
    if cls is None:
        raise WireError("unknown_kind", f"unknown message kind {shown(envelope['kind'])}")
    if data is None:
        data = envelope.get("data", b"")
        if type(data) is not bytes:
            raise WireError("bad_field", "envelope: 'data' must be bytes")
    cursor = Cursor(data if type(data) is memoryview else memoryview(data)) if version >= 2 else None
    token = _DECODING.set(cursor)
    try:
        message = _from_wire(cls, envelope["body"], cls.__name__)
    finally:
        _DECODING.reset(token)
    if cursor is not None:
        cursor.finish()
    return message


def _unpack_envelope(payload: bytes | bytearray | memoryview) -> tuple[dict, memoryview | None]:
    """The envelope's map, and its ``data`` as a view of ``payload`` when it is the last entry
    as bin32 (as the encoder writes it: the tensors are then not copied on the way in). None:
    ``data`` is in the map, or there is none."""
    if len(payload) <= _HEAD_READ:  # (small: one copy of it costs less than a reader)
        envelope = msgpack.unpackb(payload, raw=False, strict_map_key=True, max_map_len=_MAX_CONTAINER,
                                   max_array_len=_MAX_CONTAINER)
        if not isinstance(envelope, dict):
            raise WireError("bad_field", "envelope must be a map with 'v', 'kind' and 'body'")
        return envelope, None
    view = memoryview(payload)
    if type(payload) is not bytes:  # (the head alone first: a reassembled bytearray is then not copied whole)
        try:
            return _envelope_in(view, view[:_HEAD_READ])
        except msgpack.OutOfData:
            pass
    return _envelope_in(view, view)


def _envelope_in(view: memoryview, fed: memoryview) -> tuple[dict, memoryview | None]:
    """``_unpack_envelope`` on ``fed``, the start of ``view`` (raises ``msgpack.OutOfData``
    if the envelope's fields other than ``data`` run past it)."""
    if fed is view and type(view.obj) is bytes:  # (a reader of bytes shares them: no copy)
        unpacker = msgpack.Unpacker(io.BytesIO(view.obj), read_size=_HEAD_READ, raw=False, strict_map_key=True,
                                    max_map_len=_MAX_CONTAINER, max_array_len=_MAX_CONTAINER)
    else:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=True, max_map_len=_MAX_CONTAINER,
                                    max_array_len=_MAX_CONTAINER, max_buffer_size=max(len(fed), 1))
        unpacker.feed(fed)
    try:
        entries = unpacker.read_map_header()
    except ValueError:  # (another type than a map; msgpack's other errors are bad_msgpack)
        raise WireError("bad_field", "envelope must be a map with 'v', 'kind' and 'body'") from None
    if entries > 16:
        raise WireError("bad_field", "envelope must be a map with 'v', 'kind' and 'body'")
    envelope, data = {}, None
    for index in range(entries):
        key = unpacker.unpack()
        position = unpacker.tell()
        if key == "data" and index == entries - 1 and view[position:position + 1] == b"\xc6":
            size = int.from_bytes(view[position + 1:position + 5], "big")
            end = position + 5 + size
            if end != len(view):
                raise WireError("bad_msgpack", f"the envelope's data claims {size} bytes; {len(view) - position - 5} follow")
            data = view[position + 5:end]
            return envelope, data
        if type(key) is not str:
            raise WireError("bad_field", "envelope keys must be strings")
        envelope[key] = unpacker.unpack()
    if unpacker.tell() != len(view):
        if len(fed) < len(view):
            raise msgpack.OutOfData  # (what is after the head is still to be read)
        raise WireError("bad_msgpack", f"{len(view) - unpacker.tell()} bytes after the envelope")
    return envelope, data


def envelope_kind(payload: bytes | bytearray | memoryview) -> str | None:
    """The message kind an encoded payload says it is (reading its head only), or None if that
    cannot be read: what the network thread needs to tell a chunk from a whole message."""
    try:
        envelope, _ = _unpack_envelope(payload)
    except Exception:  # (whoever decodes it says what is wrong)
        return None
    kind = envelope.get("kind")
    return kind if isinstance(kind, str) else None


def _version_refusal(version: Any, versions: tuple[int, ...]) -> str:
    """Why a message of another wire version is refused, and what to upgrade."""
    speaks = "/".join(f"v{v}" for v in versions)
    if type(version) is int and 0 < version < min(versions):
        return (f"wire v{version} (edgetune {RELEASE_OF.get(version, '< 0.2')}); this side speaks {speaks}: "
                f"upgrade the sender to edgetune ≥ {RELEASE_OF[max(versions)]}")
    if type(version) is int and version > max(versions):
        return f"wire v{version}; this side speaks {speaks}: upgrade this side's edgetune"
    return f"wire version {shown(version)}; this side speaks {speaks}"


#: the buffer of the v2 message being decoded (None: a v1 message, tensors as maps)
_DECODING: ContextVar[Cursor | None] = ContextVar("edgetune_wire_decoding", default=None)


def _check_complete(payload: bytes | bytearray | memoryview) -> None:
    """Raise if ``payload`` claims more than it holds, without building any object.

    ``unpackb`` allocates an array's list (up to 10,000 slots, 80 KB) when it reads the array's
    header, before its elements: 5 KB of nested headers with no elements cost 76 MiB and 0.1 s.
    ``skip()`` walks the same structure in C and allocates nothing, so such a payload fails
    here for the price of one copy. Above one packet the walk is skipped: a second copy of a
    large adapter would cost more, and 1,024 levels of headers (msgpack's limit) can then claim
    at most 80 bytes a byte.
    """
    unpacker = msgpack.Unpacker(
        max_buffer_size=len(payload) or 1, max_map_len=_MAX_CONTAINER, max_array_len=_MAX_CONTAINER
    )
    unpacker.feed(payload)
    unpacker.skip()


# --- encoding -------------------------------------------------------------------------------


def _to_wire(value: Any, blob: Blob) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_wire(getattr(value, f.name), blob) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        if value and isinstance(next(iter(value.values())), (np.ndarray, QuantizedTensor)):
            return pack_tensors(value, blob)  # (a dict of tensors: an index into the message's data)
        return {k: _to_wire(v, blob) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_wire(v, blob) for v in value]
    if isinstance(value, np.ndarray):
        raise TypeError("a tensor goes on the wire in a dict of tensors (packed), not on its own")
    return value


# --- decoding -------------------------------------------------------------------------------


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_wire(cls: type, data: Any, path: str) -> Any:
    return _converter(cls)(data, path)


def path_text(where: Any) -> str:
    """Field paths are built lazily, ``(parent, key)`` tuples formatted only for an error:
    formatting one per tensor costs more than decoding it."""
    if type(where) is tuple:
        return f"{path_text(where[0])}[{shown(where[1])}]"
    return where


def shown(value: Any, limit: int = 40) -> str:
    """``repr`` of a received value for an error message, kept short.

    A hostile value can be megabytes long (a log line several times the payload's size) or
    nested a thousand levels deep, where ``repr`` itself raises RecursionError, not WireError.
    """
    if type(value) in (str, bytes):
        text = repr(value[:limit])
        return text if len(value) <= limit else f"{text}… ({len(value)} long)"
    if isinstance(value, (list, tuple, dict)):  # (msgpack's ExtType is a tuple too)
        return f"<{type(value).__name__} of length {len(value)}>"
    return repr(value)  # numbers, None, Timestamp: short


def _fail(where: Any, expected: str, value: Any) -> typing.NoReturn:
    raise WireError("bad_field", f"{path_text(where)}: expected {expected}, got {type(value).__name__}")


Converter = typing.Callable[[Any, str], Any]


@cache
def _converter(tp: Any) -> Converter:
    """Build, once per schema type, the function that checks and converts a wire value.

    Compiling the type walk keeps per-tensor cost down: an adapter has hundreds of tensors.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = [t for t in typing.get_args(tp) if t is not type(None)]
        convert_inner = _converter(options[0]) if len(options) == 1 else _tagged_union(tuple(options))
        if type(None) not in typing.get_args(tp):
            return convert_inner
        return lambda v, where: None if v is None else convert_inner(v, where)
    if dataclasses.is_dataclass(tp):
        return _dataclass_converter(tp)
    if isinstance(tp, type) and issubclass(tp, Enum):
        # A lookup, not ``tp(v)``: Enum's own error repr()s the whole value, which may be
        # megabytes long or nested past the recursion limit; the type check keeps True from
        # matching 1 and unhashable values from reaching the dict.
        members = {m.value: m for m in tp}
        value_types = {type(m.value) for m in tp}

        def enum(v: Any, where: str) -> Any:
            member = members.get(v) if type(v) in value_types else None
            if member is None:
                allowed = ", ".join(repr(m.value) for m in tp)
                raise WireError("bad_field", f"{path_text(where)}: {shown(v)} is not one of {allowed}")
            return member
        return enum
    if tp in _SCALARS:
        check, expected = _SCALARS[tp]

        def scalar(v: Any, where: str) -> Any:
            if not check(v):
                _fail(where, expected, v)
            return float(v) if tp is float else bytes(v) if tp is bytes else v
        return scalar
    if origin is tuple:
        return _tuple_converter(typing.get_args(tp))
    if origin is dict and typing.get_args(tp)[1] is np.ndarray:
        return _tensors
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        convert_key, convert_value = _converter(key_type), _converter(value_type)

        def mapping(v: Any, where: str) -> dict:
            if type(v) is not dict:
                _fail(where, "a map", v)
            return {convert_key(k, (where, "key")): convert_value(x, (where, k)) for k, x in v.items()}
        return mapping
    raise TypeError(f"schema type {tp!r} has no wire conversion")  # programming error


def _tensors(v: Any, where: Any) -> dict[str, np.ndarray]:
    """A dict of tensors: an index into the message's data (v2), or a map of tensor maps (v1)."""
    cursor = _DECODING.get()
    if cursor is not None:
        return unpack_tensors(v, cursor, where)
    if type(v) is not dict:
        _fail(where, "a map", v)
    return {_str_key(k, where): decode_tensor(x, (where, k)) for k, x in v.items()}


def _str_key(k: Any, where: Any) -> str:
    if type(k) is not str:
        _fail((where, "key"), "a string", k)
    return k


_SCALARS: dict[type, tuple[typing.Callable[[Any], bool], str]] = {
    bool: (lambda v: type(v) is bool, "a boolean"),
    int: (lambda v: type(v) is int, "an integer"),
    float: (lambda v: type(v) in (int, float), "a number"),
    str: (lambda v: type(v) is str, "a string"),
    bytes: (lambda v: type(v) in (bytes, bytearray), "bytes"),
}


def _tagged_union(options: tuple[type, ...]) -> Converter:
    """A union of dataclasses told apart by their ``kind`` field (e.g. ``LoraSpec | PromptSpec``).
    A map without ``kind`` is the first option: older peers sent only that one."""
    by_kind = {}
    for cls in options:
        default = {f.name: f.default for f in dataclasses.fields(cls)}.get("kind", dataclasses.MISSING)
        if not dataclasses.is_dataclass(cls) or not isinstance(default, str):
            raise TypeError(f"union member {cls!r} needs a str field 'kind' with a default")  # programming error
        by_kind[default] = _converter(cls)
    first = next(iter(by_kind))

    def tagged(v: Any, where: Any) -> Any:
        if type(v) is not dict:
            _fail(where, "a map", v)
        kind = v.get("kind", first)
        convert = by_kind.get(kind) if isinstance(kind, str) else None
        if convert is None:
            raise WireError("bad_field", f"{path_text(where)}.kind: {shown(kind)} is not one of {', '.join(by_kind)}")
        return convert(v, where)
    return tagged


def _tuple_converter(args: tuple) -> Converter:
    if len(args) == 2 and args[1] is Ellipsis:
        item = _converter(args[0])

        def variadic(v: Any, where: str) -> tuple:
            if type(v) not in (list, tuple):
                _fail(where, "a list", v)
            return tuple(item(x, (where, i)) for i, x in enumerate(v))
        return variadic
    items = [_converter(t) for t in args]

    def fixed(v: Any, where: str) -> tuple:
        if type(v) not in (list, tuple):
            _fail(where, "a list", v)
        if len(v) != len(items):
            raise WireError("bad_field", f"{path_text(where)}: expected {len(items)} items, got {len(v)}")
        return tuple(c(x, (where, i)) for i, (c, x) in enumerate(zip(items, v)))
    return fixed


def _dataclass_converter(cls: type) -> Converter:
    hints = _hints(cls)
    fields = [
        (
            f.name,
            _converter(hints[f.name]),
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
    ]

    def build(data: Any, path: str) -> Any:
        if type(data) is not dict:
            raise WireError("bad_field", f"{path_text(path)}: expected a map, got {type(data).__name__}")
        kwargs = {}
        for name, convert, required in fields:
            if name in data:
                kwargs[name] = convert(data[name], f"{path_text(path)}.{name}")
            elif required:
                raise WireError("bad_field", f"{path_text(path)}.{name}: missing")
        # Unknown keys come from newer peers: ignored by design (see the schema docstring).
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise WireError("bad_field", f"{path_text(path)}: {exc}") from None
    return build
