"""What goes on the wire: specs and settings (``specs``), messages (``messages``), topics
(``topics``), the table of topic kinds (``kinds``) and of task kinds (``tasks``), msgpack encoding (``codec``), tensors as
``{dtype, shape, data}`` (``tensors``) and chunking of large payloads (``chunks``). Import from
here: the split into modules is for readers, not for callers."""

from .chunks import DEFAULT_MAX_PACKET, Reassembler, chunk_payload, decode_frame, split_payload
from .codec import FILE_VERSIONS, PEER_VERSIONS, decode_message, encode_message
from .errors import WireError
from .kinds import *  # noqa: F401,F403
from .kinds import __all__ as _kinds
from .messages import *  # noqa: F401,F403
from .messages import __all__ as _messages
from .names import check_name, check_positive
from .specs import *  # noqa: F401,F403
from .specs import __all__ as _specs
from .tensors import BFloat16Array, decode_tensor, encode_tensor, to_bfloat16
from .tasks import TASK_OF_RESULT, TASKS, TaskSpec
from .topics import *  # noqa: F401,F403
from .topics import __all__ as _topics

__all__ = [
    "DEFAULT_MAX_PACKET", "Reassembler", "chunk_payload", "decode_frame", "split_payload",
    "decode_message", "encode_message", "FILE_VERSIONS", "PEER_VERSIONS", "WireError", "check_name", "check_positive",
    "BFloat16Array", "decode_tensor", "encode_tensor", "to_bfloat16", "TASKS", "TASK_OF_RESULT", "TaskSpec",
    *_specs, *_messages, *_topics, *_kinds,
]
