"""Token data shared by the trainer tests: a repeated maintenance sentence, byte-tokenized."""

import numpy as np

from edgetune.models import ByteTokenizer

TEXT = "the pump on line 3 vibrates at 12.5 mm/s; replace bearing B-7 before the next shift. " * 8


def blocks(seq_len: int = 32) -> np.ndarray:
    ids = np.array(ByteTokenizer().encode(TEXT), dtype=np.int64)
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)  # (N, T)


def batches(data: np.ndarray, batch_size: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    while True:
        yield data[rng.choice(len(data), batch_size, replace=False)]  # (B, T)
