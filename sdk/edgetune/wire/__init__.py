"""What goes on the wire: the schema (``schema``), msgpack encoding (``codec``), tensors as
``{dtype, shape, data}`` (``tensors``) and chunking of large payloads (``chunks``)."""

from .chunks import DEFAULT_MAX_PACKET, Reassembler, chunk_payload, decode_frame, split_payload
from .codec import decode_message, encode_message
from .errors import WireError
from .schema import *  # noqa: F401,F403  (the schema is the public vocabulary)
from .schema import SCHEMA_VERSION, Topics
from .tensors import BFloat16Array, decode_tensor, encode_tensor, to_bfloat16

__all__ = [
    "DEFAULT_MAX_PACKET", "Reassembler", "chunk_payload", "decode_frame", "split_payload",
    "decode_message", "encode_message", "WireError", "SCHEMA_VERSION", "Topics",
    "BFloat16Array", "decode_tensor", "encode_tensor", "to_bfloat16",
]
