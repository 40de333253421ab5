"""The one exception type for bytes that cannot be turned into a valid message."""


class WireError(ValueError):
    """A payload that is not a valid edgetune message.

    ``reason`` is a short, stable code (``bad_msgpack``, ``schema_version``, ``bad_field``,
    ``bad_tensor``, ``bad_chunk``, ``digest_mismatch``, ``unknown_kind``) used to count drops;
    the message text says what exactly was wrong, for the log line.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
