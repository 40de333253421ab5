"""Fuzzing the wire decoder (v2): whatever bytes arrive, ``decode_message`` and ``decode_frame``
return a message or raise :class:`WireError`, and allocate no more than the payload justifies.

Payloads come from four generators: arbitrary bytes; byte-level mutations of valid messages;
structure-level mutations (unpack a valid message, swap values, keys, kinds, the packed tensors'
index and their data, re-pack); and floods of chunks into one :class:`Reassembler`. Every generator starts from
``SAMPLES``, valid messages of every kind. Examples are derandomized, so CI runs the same ones.
"""

from __future__ import annotations

import hashlib
import math
import sys
import tracemalloc

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgetune.wire.workers import MergeRequest, PartialMerge, WorkerReport, WorkerRound
from edgetune.wire import (
    Reassembler, WireError, chunk_payload, decode_frame, decode_message, encode_message, to_bfloat16,
)
from edgetune.wire.chunks import CHUNK_OVERHEAD
from edgetune.wire import (
    KIND_OF,
    MESSAGE_KINDS,
    SCHEMA_VERSION,
    AdapterInit,
    ArtifactData,
    ArtifactOffer,
    ArtifactRequest,
    Capabilities,
    Chunk,
    DevicePlan,
    DeviceProfile,
    ErrorReport,
    EvalMetrics,
    EvalReport,
    GlobalAdapter,
    Hello,
    ImportanceReport,
    LoraSpec,
    ModelManifest,
    PersonalizationReport,
    Presence,
    Progress,
    PromptSpec,
    Receipt,
    Refusal,
    Serving,
    ServingReport,
    RoundTask,
    Signed,
    TaskKind,
    TrainMetrics,
    TrainSettings,
    Update,
)
from edgetune.wire.packed import PACKED_DTYPES
from edgetune.wire.quantize import QuantizedTensor, quantize_tensors

_RNG = np.random.default_rng(0)
_MANIFEST = ModelManifest("tiny", "f" * 16, {"layers.0.q_proj": (8, 4), "layers.0.v_proj": (8, 4)}, 100, 8, 1, 2, 900)
_PROFILE = DeviceProfile("pi5", 4 << 30, {"float32": 20.0, "bfloat16": 12.5}, 4, ("bfloat16", "int8"), 9.5, "datasheet")
_LORA = LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
_PROMPT = PromptSpec(num_virtual_tokens=4, init="text", init_text="Answer:")
_FACTORS = {
    "layers.0.q_proj.lora_A": _RNG.standard_normal((2, 4)).astype(np.float32),
    "layers.0.q_proj.lora_B": _RNG.standard_normal((8, 2)).astype(np.float16),
    "layers.0.v_proj.lora_A": to_bfloat16(_RNG.standard_normal((2, 4)).astype(np.float32)),
    "layers.0.v_proj.lora_B": np.zeros((8, 2), np.float32),
}
_PROGRESS = Progress("dev-1", 3, 5, 10, 2.5)

#: Valid messages, one line each, at least one per kind in MESSAGE_KINDS: every mutation starts
#: from these. A new message kind needs a line here (test_every_kind_has_a_sample says which).
SAMPLES = [
    Hello("dev-1", "0.1.0", _MANIFEST, Capabilities(("torch", "ort"), ("lora", "prompt"), 1 << 20, 8), 40, _PROFILE),
    Hello("dev-2", "0.1.0", ModelManifest("tiny", "f" * 16, {})),
    Presence("dev-1", True),
    Update("dev-1", 3, 2, 40, _FACTORS, TrainMetrics(1.5, 1024, 2.0, 4.1, 4.5, 10, 20, 6.0, None)),
    Update("dev-1", 3, 2, 40, quantize_tensors({k: np.asarray(v, np.float32) for k, v in _FACTORS.items()
                                                if k.endswith("lora_A") and "q_proj" in k}, "int8")
           | {"layers.0.q_proj.lora_B": _FACTORS["layers.0.q_proj.lora_B"]}, TrainMetrics(1.5, 1, 2.0, 4.1, 4.5)),
    EvalReport("dev-1", 3, 2, 40, EvalMetrics(4.2, 1000, 5.0)),
    ImportanceReport("dev-1", 1, 40, {"layers.0.q_proj": 0.5, "layers.0.v_proj": 1e-3}, 1000, 1.5),
    AdapterInit("dev-1", 0, {"prompt_embeddings": np.ones((4, 8), np.float32)}),
    PersonalizationReport("dev-1", 2, 0.3, 5.0, 4.0, 4.2, 6.0, 6.5, None, {"0.3": 4.2}, {"optimizer": "adamw"}, 12.0),
    _PROGRESS,
    ErrorReport("dev-1", 3, "oom", "out of memory at rank 8"),
    RoundTask(3, TaskKind.TRAIN, 2, "f" * 16, _LORA, TrainSettings(local_steps=2, optimizer="sgd"), 60.0,
              {"dev-1": DevicePlan(2, "bfloat16", 2, 3, True)}, {"dev-9": "no plan fits"}, "run-1"),
    RoundTask(0, TaskKind.INITIALIZE, 0, "f" * 16, _PROMPT),
    GlobalAdapter(2, 3, "f" * 16, _LORA, _FACTORS, {"layers.0.q_proj.merged_A": np.ones((1, 4), np.float32)}),
    GlobalAdapter(1, 1, "f" * 16, _PROMPT, {"prompt_embeddings": np.ones((4, 8), np.float32)}),
    Chunk(hashlib.sha256(b"abc").hexdigest(), 1, 2, 3, b"c"),
    Signed("dev-1", "0123456789abcdef", b"n" * 16, encode_message(_PROGRESS), b"s" * 64),
    Receipt("dev-1", 3, b"n" * 16, False, "bad_signature"),
    Refusal("dev-1", "unsupported_precision", "the fleet sends deltas as int8; this device reads fp32", "edgetune"),
    Serving(7, "a" * 64, 9, "b" * 64, ("dev-1", "dev-2")),
    ServingReport("dev-1", 9, "b" * 64, True, previous=7, ppl=12.5, previous_ppl=12.9),
    WorkerRound(3, "run-1", {"3": 2, "2": 1}, _MANIFEST, _LORA, 1, 1000, 5.0, "clip"),
    WorkerReport("w0", Update("dev-1", 3, 2, 40, {}, TrainMetrics(1.5, 1, 2.0, 4.1, 4.5)), b"n" * 16, True, 1.25),
    MergeRequest(3, "svd", {"dev-1": "w0"}, {"dev-1": (1.0, 40.0)}, _FACTORS, {}, 2.0, 7),
    PartialMerge("w0", 3, {"s": np.ones(4, np.float32), "s~lo": np.zeros(4, np.float32)}, {"dev-1": 0.5}, (),
                 {"_count": 1.0}),
    Signed("aggregator", "0123456789abcdef", b"n" * 16, encode_message(_PROGRESS), b"s" * 64, 1 << 50),
    ArtifactOffer("ort", b'{"files": {"checkpoint": "ab"}}', {"checkpoint": 1000, "model.onnx": 5000}, 1 << 16),
    ArtifactRequest("dev-1", "ort", "checkpoint", 0, 1000),
    ArtifactData("checkpoint", 0, 1000, b"x" * 100),
]
ENCODED = [encode_message(m) for m in SAMPLES]


def fuzz(examples: int) -> settings:
    """Reproducible: the same examples every run (derandomized, no example database)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the memory bound -------------------------------------------------------------------------
#
# Decoding costs memory linear in the payload, never in what the payload *claims* (a tensor
# shape, a chunk count, a transfer size). The bound has two linear terms, measured with tracemalloc:
#   * 8 bytes per payload byte: a bin value becomes a bytes object (1x), a str up to 4x when one
#     astral character makes CPython store all of it as UCS-4 (a 1 MiB kind with an emoji costs
#     5x); the rest is slack for short-lived copies. Tensors are zero-copy views of the bytes.
#   * 128 bytes per msgpack value: each one becomes a Python object, and a 1-byte value can become
#     a big one. Measured (test_container_heavy_payloads_stay_within_budget): an empty map costs
#     72 B, an empty list 64 B, {"": {}} 85 B a value, an ExtType 80 B, the int -32 40 B. So "8x the
#     payload" is not a bound msgpack can keep: 64 KiB of b"\x80" (empty maps) costs 72x.
# Plus 64 KiB fixed: the 40 KiB parse stack of the codec's first pass, exceptions, numpy's array
# headers (decoding a sample costs at most 24 KiB).
PER_BYTE, PER_VALUE, FIXED = 8, 128, 64 << 10


class _Pairs(list):
    """A map as its (key, value) pairs: counting must not merge duplicate keys (or str and
    bin keys of the same bytes), which the decoder holds at least for a moment."""


def _values(payload: bytes) -> int:
    """How many msgpack values ``payload`` holds; for bytes msgpack cannot parse, the most it
    could have built before failing: one per byte."""
    try:
        tree = msgpack.unpackb(payload, raw=True, strict_map_key=False, object_pairs_hook=_Pairs)
    except Exception:  # (any of msgpack's errors)
        return len(payload)
    count, stack = 0, [tree]
    while stack:
        value = stack.pop()
        count += 1
        if type(value) is _Pairs:
            stack.extend(item for pair in value for item in pair)
        elif type(value) is list:
            stack.extend(value)
    return count


def budget(payload: bytes) -> int:
    return PER_BYTE * len(payload) + PER_VALUE * _values(payload) + FIXED


#: Stack frames the decoder may use: about what it has under a daemon's MQTT callback with
#: Python's default limit (1000). Hypothesis raises the limit while a test runs, which hid a
#: RecursionError (repr() of a 1,000-deep list) from the fuzzing; counting from the caller's
#: depth keeps a failure the same when hypothesis replays it from elsewhere.
HEADROOM = 950


def _depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def _peak(decode, *args):
    """``(result, peak bytes allocated)`` of ``decode(*args)``; the result is None on WireError.
    Any other exception escapes: that is the bug the fuzzing looks for."""
    raised = sys.getrecursionlimit()
    sys.setrecursionlimit(_depth() + HEADROOM)
    tracemalloc.start()
    try:
        try:
            result = decode(*args)
        except WireError:
            result = None
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        sys.setrecursionlimit(raised)


def check_decode(payload: bytes):
    """Decode under a memory budget; a message that decodes must also re-encode to itself."""
    limit = budget(payload)
    message, peak = _peak(decode_message, payload)
    assert peak <= limit, f"decoding {len(payload)} bytes allocated {peak} bytes (budget {limit})"
    if message is not None:
        assert type(message) in KIND_OF
        again = encode_message(message)
        assert encode_message(decode_message(again)) == again
    return message


# --- the samples ------------------------------------------------------------------------------


def test_every_kind_has_a_sample():
    missing = sorted(set(MESSAGE_KINDS) - {KIND_OF[type(m)] for m in SAMPLES})
    assert not missing, f"SAMPLES in {__name__} has no message of kind(s) {', '.join(missing)}: add one line each"


def _quantized(message) -> bool:
    return any(isinstance(t, QuantizedTensor) for value in vars(message).values() if isinstance(value, dict)
               for t in value.values())


@pytest.mark.parametrize("index", range(len(SAMPLES)), ids=lambda i: KIND_OF[type(SAMPLES[i])])
def test_samples_are_valid_and_round_trip(index):
    assert check_decode(ENCODED[index]) is not None
    if not _quantized(SAMPLES[index]):  # (an int8 tensor decodes to float32: its re-encoding differs)
        assert encode_message(decode_message(ENCODED[index])) == ENCODED[index]


# --- (a) arbitrary bytes ----------------------------------------------------------------------


@fuzz(1000)
@given(st.binary(max_size=512))
@example(b"\xc1")
@example(b"\x91" * 1023 + b"\xc0")  # as deep as msgpack nests
@example(b"\xdc\x20\x02")  # found: 3 bytes claiming 8,194 elements allocated 64 KiB for them
def test_arbitrary_bytes(payload):
    check_decode(payload)


# --- (b) byte-level mutations -----------------------------------------------------------------

#: bytes that mean something to msgpack: nil, never-used, containers and headers of 32-bit lengths
_INTERESTING = [0x00, 0x7F, 0x80, 0x90, 0xA0, 0xC0, 0xC1, 0xC4, 0xC6, 0xC9, 0xCF, 0xD3, 0xDB, 0xDD, 0xDF, 0xFF]


#: (strategies are built once: building them inside the composites below cost more time than
#: decoding what they generate)
_INDEX = st.integers(0, 1 << 16)
_OPS = st.integers(1, 4)
_BYTE_OPS = st.sampled_from(["flip", "truncate", "extend", "splice", "overwrite", "insert", "interesting"])
_PATCH = st.binary(min_size=1, max_size=16)


def _pick(draw, items: list):
    """One of ``items`` (a list built while drawing, so no sampled_from for it)."""
    return items[draw(_INDEX) % len(items)]


@st.composite
def byte_mutations(draw, pool: list[bytes] = ENCODED) -> bytes:
    data = bytearray(_pick(draw, pool))
    for _ in range(draw(_OPS)):
        at = draw(_INDEX) % (len(data) + 1)
        op = draw(_BYTE_OPS)
        if op == "flip" and data:
            data[at % len(data)] ^= 1 << draw(_INDEX) % 8
        elif op == "truncate":
            del data[at:]
        elif op == "extend":
            data += draw(_PATCH) * (1 + draw(_INDEX) % 4)
        elif op == "splice":
            other = _pick(draw, pool)
            data = data[:at] + other[draw(_INDEX) % (len(other) + 1):]
        elif op == "overwrite":
            patch = draw(_PATCH)
            data[at:at + len(patch)] = patch
        elif op == "insert":
            data[at:at] = draw(_PATCH)
        elif data:
            data[at % len(data)] = _pick(draw, _INTERESTING)
    return bytes(data)


@fuzz(1200)
@given(byte_mutations())
def test_byte_mutations(payload):
    check_decode(payload)


# --- (c) structure-level mutations ------------------------------------------------------------

_EDGE_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**40, 2**63 - 1, -2**63, 2**64 - 1]
_WORDS = ["", "lora", "prompt", "train", "float32", "bfloat16", "kind", "v", "body", "dev-1", "a/b", "+", "#",
          "x" * 5000, "\x00" * 300, "😀" * 300, "\U000e0000"]
_KEYS = st.one_of(st.text(max_size=8), st.sampled_from(_WORDS[:10]), st.binary(max_size=4))
#: a list nested this deep travels as this ExtType until ``_pack`` splices it in: as Python lists
#: it would make hypothesis' own repr() of the example hit the recursion limit
_NESTED_CODE = 99
_NESTED = st.one_of(st.integers(1, 1024), st.integers(990, 1023)).map(
    lambda depth: msgpack.ExtType(_NESTED_CODE, depth.to_bytes(2, "big")))
_ATOMS = st.one_of(
    st.sampled_from([None, True, False, *_EDGE_INTS, math.nan, math.inf, -math.inf, -0.0, 1e308, *_WORDS, b"\0" * 40]),
    st.integers(-2**63, 2**64 - 1),
    st.floats(),
    st.text(max_size=24),
    st.binary(max_size=32),
    st.builds(msgpack.ExtType, st.integers(0, _NESTED_CODE - 1), st.binary(max_size=8)),
    _NESTED,
)
#: one level of containers is enough: deep trees come from _NESTED and from replacing subtrees
#: (st.recursive made generation, not decoding, most of this file's run time)
VALUES = st.one_of(_ATOMS, st.lists(_ATOMS, max_size=3), st.dictionaries(_KEYS, _ATOMS, max_size=3))


def _pack(tree) -> bytes:
    packed = msgpack.packb(tree, use_bin_type=True)
    at = packed.find(b"\xd5\x63")  # fixext 2 of code 99: a _NESTED marker
    while at >= 0:
        depth = int.from_bytes(packed[at + 2:at + 4], "big")
        nested = b"\x91" * (depth - 1) + b"\x90"
        packed = packed[:at] + nested + packed[at + 4:]
        at = packed.find(b"\xd5\x63", at + len(nested))
    return packed


def _slots(tree, slots):
    """Every (container, key) pair in the tree, depth first."""
    items = tree.items() if type(tree) is dict else enumerate(tree) if type(tree) is list else ()
    for key, value in items:
        slots.append((tree, key))
        _slots(value, slots)
    return slots


def _indexes(tree, found):
    """The packed tensors' indexes in a body: [names, dtypes, shapes, offsets, blocks]."""
    if type(tree) is dict:
        for value in tree.values():
            if type(value) is list and len(value) == 5 and all(type(c) is list for c in value) and value[0]:
                found.append(value)
            else:
                _indexes(value, found)
    return found


#: shapes that lie about the data: far too big, negative, too many axes, not ints
_SHAPES = [[2**40], [2**20, 2**20], [2**31], [2**31 - 1] * 8, [0] + [2**31 - 1] * 7, [-1], [-2**63], [2**64 - 1],
           [1] * 9, [], [0], [True], [1.0], ["1"], None, 3, [[2]]]


_DTYPE_NAMES = st.sampled_from([*PACKED_DTYPES, "float64", "complex64", "<f4", "float32 ", "FLOAT32"]) | VALUES
_TENSOR_SHAPES = st.sampled_from(_SHAPES) | st.lists(st.integers(-2, 2**31 + 1), max_size=9)
_STRUCTURE_OPS = st.sampled_from(["replace", "replace", "delete", "add", "kind", "version", "tensor"])
_NEW_KEYS = _KEYS | st.sampled_from(["kind", "delta", "shape"])
_KINDS = st.sampled_from(sorted(MESSAGE_KINDS)) | VALUES
_VERSIONS = st.sampled_from([SCHEMA_VERSION + 1, 0, -1, True, 1.0, "1", None]) | VALUES


def _mutate_tensors(draw, envelope: dict, index: list) -> None:
    """Lie in the index (a dtype, a shape, an offset, a block, a name, a column) or in the data."""
    row = draw(_INDEX) % len(index[0])
    what = _pick(draw, ["dtype", "shape", "offset", "block", "name", "column", "data"])
    if what == "dtype":
        index[1][row] = draw(_DTYPE_NAMES)
    elif what == "shape":
        index[2][row] = draw(_TENSOR_SHAPES)
    elif what == "offset":
        index[3][row] = _pick(draw, [index[3][row] + 1, index[3][row] - 8, 0, -1, 2**63 - 1, 1.0, None])
    elif what == "block":
        index[4][row] = _pick(draw, [0, 1, -1, 2**17, 128, True, "128", 2**63 - 1])
    elif what == "name":
        index[0][row] = _pick(draw, [index[0][0], "", 7, None, "x" * 5000])
    elif what == "column":
        _pick(draw, index).pop() if draw(_INDEX) % 2 else index.pop()
    else:
        data = envelope.get("data", b"")
        envelope["data"] = _pick(draw, [b"", data[:-1], data + b"\0" * 8, data * 2, data[:len(data) // 2],
                                        data.decode("latin-1"), None])


@st.composite
def structure_mutations(draw) -> bytes:
    envelope = msgpack.unpackb(_pick(draw, ENCODED), raw=False)
    for _ in range(draw(_OPS) % 3 + 1):
        op = draw(_STRUCTURE_OPS)
        slots = _slots(envelope, [])
        if op == "replace" and slots:
            container, key = _pick(draw, slots)
            container[key] = draw(VALUES)
        elif op == "delete":
            container, key = _pick(draw, [(c, k) for c, k in slots if type(c) is dict] or [(envelope, "v")])
            container.pop(key, None)
        elif op == "add":
            _pick(draw, [envelope] + [c[k] for c, k in slots if type(c[k]) is dict])[draw(_NEW_KEYS)] = draw(VALUES)
        elif op == "kind":  # a valid body under another kind's name
            envelope["kind"] = draw(_KINDS)
        elif op == "version":
            envelope["v"] = draw(_VERSIONS)
        else:
            indexes = _indexes(envelope.get("body"), [])
            if indexes:
                _mutate_tensors(draw, envelope, _pick(draw, indexes))
    return _pack(envelope)


def _envelope(kind: str, body) -> bytes:
    return msgpack.packb({"v": SCHEMA_VERSION, "kind": kind, "body": body}, use_bin_type=True)


def _body(kind: str) -> dict:
    """The (unpacked) body of the first sample of ``kind``."""
    return msgpack.unpackb(next(p for p, m in zip(ENCODED, SAMPLES) if KIND_OF[type(m)] == kind))["body"]


def _with_raw(kind: str, field: str, raw: bytes) -> bytes:
    """A sample of ``kind`` with ``body[field]`` replaced by raw msgpack bytes."""
    return _envelope(kind, {**_body(kind), field: "MARKER!"}).replace(b"\xa7MARKER!", raw, 1)


_DEEP = b"\x91" * 1020 + b"\x90"  # nested near msgpack's limit (1024), past repr()'s (1000)


@fuzz(1200)
@given(structure_mutations())
# Regressions: each of these raised RecursionError from a repr() in an error message.
@example(b"\x83\xa1v\x01\xa4kind" + _DEEP + b"\xa4body\x80")
@example(b"\x83\xa1v" + _DEEP + b"\xa4kind\xa4task\xa4body\x80")
@example(_with_raw("task", "kind", _DEEP))  # an enum
@example(_with_raw("task", "adapter", b"\x81\xa4kind" + _DEEP))  # a tagged union's tag
@example(_with_raw("global", "tensors", b"\x81\xa1t\x83\xa5dtype" + _DEEP + b"\xa5shape\x90\xa4data\xc4\x00"))
def test_structure_mutations(payload):
    check_decode(payload)


@pytest.mark.parametrize("version", [True, 1.0, "1", [1]])
def test_version_must_be_the_integer(version):
    """Regression: ``True`` and ``1.0`` compare equal to 1 and were accepted."""
    with pytest.raises(WireError) as info:
        decode_message(msgpack.packb({"v": version, "kind": "presence", "body": _body("presence")}))
    assert info.value.reason == "schema_version"


@pytest.mark.parametrize("payload", [
    _envelope("\x00" * (1 << 20), {}),
    _with_raw("task", "kind", msgpack.packb("train" * 100_000)),
    _with_raw("task", "plans", msgpack.packb({"\x00" * 100_000: {"rank": 0}})),
    _with_raw("global", "tensors", msgpack.packb({"t": {"dtype": b"\0" * 100_000, "shape": [], "data": b""}})),
], ids=["kind", "enum", "map key", "dtype"])
def test_quoted_values_are_cut_short(payload):
    """Regression: the codec quoted received values whole (a 1 MiB kind: a 4 MiB log line)."""
    with pytest.raises(WireError) as info:
        decode_message(payload)
    assert len(str(info.value)) < 300, str(info.value)[:300]


# --- what the payload claims costs nothing ----------------------------------------------------


@pytest.mark.parametrize("shape, data", [
    ([2**40], b"\0" * 8), ([2**20, 2**20], b""), ([2**31 - 1] * 8, b"\0" * 8), ([0] + [2**31 - 1] * 7, b""),
])
def test_shape_claims_allocate_nothing(shape, data):
    for kind, block in (("float32", 0), ("int8", 1)):
        body = {**_body("global"), "tensors": [["t"], [kind], [shape], [0], [block]], "merged": {}}
        payload = msgpack.packb({"v": SCHEMA_VERSION, "kind": "global", "body": body, "data": data}, use_bin_type=True)
        message, peak = _peak(decode_message, payload)
        assert message is None and peak < 64 << 10


_CLAIMS = b"\xdd\x00\x01\x86\xa0" * 1000  # 1,000 nested arrays, each claiming 100,000 elements


@pytest.mark.parametrize("payload", [_CLAIMS, _with_raw("presence", "device_id", b"\xdc\xff\xff" * 1000)],
                         ids=["envelope", "field"])
def test_claimed_elements_allocate_nothing(payload):
    """Regression: msgpack allocates an array's list when it reads the header, before the
    elements (up to 80 KB each): these 5 KB allocated 76 MiB and took 0.1 s."""
    message, peak = _peak(decode_message, payload)
    assert message is None and peak < 64 << 10


def test_claims_in_a_payload_over_a_packet_cost_less_than_80_bytes_a_byte():
    """Above one packet the codec skips its first pass (it would copy a large adapter); nesting
    is at most 1,024 deep, so the headers can claim at most 1,024 x 80 KB."""
    payload = _CLAIMS + msgpack.packb(b"\0" * (1 << 20))  # (one value: its bytes are copied once)
    message, peak = _peak(decode_message, payload)
    assert message is None and peak <= 80 * len(payload)


def test_a_large_tensor_costs_no_copy():
    """The packed data is the envelope's last entry: the arrays are views of the payload itself
    (the envelope's reader takes 64 KiB at a time, and stops before the data)."""
    payload = encode_message(Update("dev-1", 1, 0, 1, {"w": np.ones(1 << 20, np.float32)}, TrainMetrics(1, 1, 1, 1, 1)))
    message, peak = _peak(decode_message, payload)
    assert message is not None and np.shares_memory(message.delta["w"], np.frombuffer(payload, np.uint8))
    assert peak <= 2 * FIXED + (64 << 10), peak


_MANY = 65_535


def _array(element: bytes) -> bytes:
    return b"\xdc" + _MANY.to_bytes(2, "big") + element * _MANY


@pytest.mark.parametrize("payload", [
    _with_raw("presence", "device_id", _array(b"\x80")),  # {}
    _with_raw("presence", "device_id", _array(b"\x90")),  # []
    _with_raw("presence", "device_id", _array(b"\x81\xa0\x80")),  # {"": {}}
    _with_raw("presence", "device_id", _array(b"\xe0")),  # -32: not one of CPython's cached ints
    _with_raw("presence", "device_id", _array(b"\xd4\x05\x00")),  # ExtType(5, b"\0")
    _with_raw("presence", "device_id", _array(b"\xd6\xff\x00\x00\x00\x00")),  # Timestamp
    msgpack.packb({"v": 1, "kind": [{}] * _MANY, "body": {}}),  # quoted in the error
    _envelope("hello", {**_body("hello"), "capabilities": {"backends": ["a"] * _MANY}}),  # converted, valid
    _envelope("hello", {**_body("hello"), "model": {"name": "m", "fingerprint": "f",
                                                    "modules": {f"l{i}": [1, 1] for i in range(10_000)}}}),
], ids=["maps", "lists", "map of map", "ints", "ext", "timestamps", "kind", "tuple", "manifest"])
def test_container_heavy_payloads_stay_within_budget(payload):
    """Where PER_VALUE comes from: payloads that are almost all 1-3 byte values."""
    check_decode(payload)


# --- (d) chunk floods into one reassembler ----------------------------------------------------

_SENDERS = ["dev-1", "dev-2", "dev-3", "mallory"]
_BIG = Update("dev-1", 3, 2, 40, {"w": np.arange(2000, dtype=np.float32)}, TrainMetrics(1.5, 1, 1, 1, 1))
#: samples as the chunks they travel in, with the smallest packet split_payload allows (only
#: _BIG needs more than one)
CHUNKED = [chunk_payload(p, max_packet=2 * CHUNK_OVERHEAD + 1) for p in [encode_message(_BIG), *ENCODED]]
_FRAMES = [frame for frames in CHUNKED for frame in frames]
_TRANSFERS = sorted({decode_message(frames[0]).transfer for frames in CHUNKED}) + ["", "0" * 64, "x" * 300]


@st.composite
def forged_chunks(draw) -> bytes:
    """Chunks with any claims: most are refused, some held."""
    count = draw(st.sampled_from([1, 2, 3, 2**31, 2**63 - 1, 0, -1]) | st.integers(-2, 20))
    index = draw(st.sampled_from([0, 1, count - 1, count, -1]) | st.integers(-2, 20))
    size = draw(st.sampled_from([0, 1, 3, 1024, 1 << 20, 2**31, 2**63 - 1, -1, -2**63]) | st.integers(-5, 10_000))
    transfer = draw(st.sampled_from(_TRANSFERS) | st.text(max_size=70))
    # (as raw msgpack: Chunk() itself refuses ids that are not SHA-256 digests, the decoder must too)
    return _envelope("chunk", {"transfer": transfer, "index": index, "count": count, "size": size,
                               "data": draw(st.binary(max_size=3000))})


@st.composite
def partial_chunks(draw) -> bytes:
    """Plausible pieces of transfers that never finish: what fills (and evicts from) the reassembler."""
    data = draw(st.binary(max_size=3000))
    size = len(data) + draw(st.integers(1, 60_000))
    count = draw(st.integers(2, -(-size // CHUNK_OVERHEAD) + 1))
    transfer = draw(st.sampled_from(_TRANSFERS) | st.binary(min_size=2, max_size=2).map(lambda b: b.hex() * 16))
    return _envelope("chunk", {"transfer": transfer, "index": draw(st.integers(0, count - 1)), "count": count,
                               "size": size, "data": data})


@st.composite
def whole_transfers(draw) -> bytes:
    """Any payload as one complete chunk, so the reassembled payload is decoded too."""
    payload = draw(st.binary(max_size=2000) | st.sampled_from(ENCODED) | byte_mutations())
    return encode_message(Chunk(hashlib.sha256(payload).hexdigest(), 0, 1, len(payload), payload))


#: what one sender sends in a row: one frame, or every chunk of a real transfer in any order
_BURST = st.one_of(
    st.one_of(
        st.sampled_from(_FRAMES),  # a piece of a real transfer, from anyone
        forged_chunks(),
        partial_chunks(),
        partial_chunks(),
        whole_transfers(),
        byte_mutations(_FRAMES),
        st.sampled_from(ENCODED),  # not a chunk at all
    ).map(lambda frame: [frame]),
    st.permutations(CHUNKED[0]),
)


@fuzz(300)
@given(st.lists(st.tuples(st.sampled_from(_SENDERS), _BURST), min_size=1, max_size=30))
def test_chunk_floods(bursts):
    reassembler = Reassembler(max_pending_bytes=16 << 10, max_transfer_bytes=64 << 10, max_pending_per_sender=3,
                              remember=8)
    # A frame that completes a transfer decodes the joined payload, at most what the reassembler
    # held plus this frame: its budget is that of a payload that size made of 1-byte values.
    held = (PER_BYTE + PER_VALUE) * reassembler.max_pending_bytes
    for sender, frames in bursts:
        for frame in frames:
            limit = budget(frame) + held + (PER_BYTE + PER_VALUE) * len(frame)
            message, peak = _peak(decode_frame, reassembler, sender, frame)
            assert peak <= limit, f"a {len(frame)}-byte frame allocated {peak} bytes (budget {limit})"
            assert message is None or type(message) in KIND_OF and type(message) is not Chunk
            assert 0 <= reassembler.pending_bytes <= reassembler.max_pending_bytes


# --- found by fuzzing in the schema (now specs.py/messages.py) and chunks.py, fixed there --------------------------------


def test_a_long_device_id_costs_no_more_than_its_bytes():
    check_decode(_envelope("presence", {"device_id": "\x00" * (1 << 20) + "😀", "online": True}))


def test_transfer_ids_are_sha256_digests_so_pending_ids_cannot_pin_memory():
    chunk = Chunk("0" * 64, 0, 2, 10, b"")
    body = msgpack.unpackb(encode_message(chunk))["body"]
    body["transfer"] = "00000000" + "x" * (64 << 10)
    with pytest.raises(WireError, match="64 hex digits"):
        decode_message(_envelope("chunk", body))


def test_evicting_one_senders_oldest_transfer_does_not_scan_every_sender():
    reassembler = Reassembler()
    for s in range(2000):
        for j in range(5):  # the fifth evicts the sender's oldest
            reassembler.feed(f"s{s}", Chunk(f"{s:032x}{j:032x}", 0, 2, 2000, b"x" * 1000))
    assert len(reassembler._pending) == 2000 * 4 and reassembler.evicted == 2000


def test_nan_and_infinite_settings_are_refused():
    body = msgpack.unpackb(encode_message(RoundTask(1, TaskKind.TRAIN, 0, "abc")))["body"]
    for path, value in ((("train", "learning_rate"), float("nan")), (("adapter", "alpha"), float("inf")),
                        (("deadline_s",), float("nan"))):
        changed = msgpack.unpackb(msgpack.packb(body))
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(WireError):
            decode_message(_envelope("task", changed))
