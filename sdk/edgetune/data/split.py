"""From records to training batches: held-out split, packing into blocks, batch sampling.

Tokenization happens elsewhere (it needs the model's tokenizer); everything here works on plain
lists and numpy arrays so it is testable without torch and reproducible for a seed.
"""

from __future__ import annotations

import numpy as np

from edgetune.data.files import DataError

__all__ = ["HELDOUT_FRACTION", "VALIDATION_FRACTION", "BlockSampler", "pack_blocks", "split_heldout"]

#: a device's records held out to evaluate on (never trained on)
HELDOUT_FRACTION = 0.1
#: of its training records (with at least 10), those set aside for personalization to choose α on
VALIDATION_FRACTION = 0.1


def split_heldout(
    records: list[str],
    fraction: float = 0.1,
    seed: int = 0,
    min_heldout: int = 1,
) -> tuple[list[str], list[str]]:
    """A deterministic shuffled split into ``(train, heldout)``.

    ``heldout`` gets ``round(fraction * n)`` records, at least ``min_heldout`` and at most
    ``n - 1`` so training always has data. Each part keeps the original record order, so the
    packed blocks (and any diff of them) do not depend on the shuffle.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if min_heldout < 1:
        raise ValueError(f"min_heldout must be >= 1, got {min_heldout}")
    n = len(records)
    if n < min_heldout + 1:
        raise DataError(f"only {n} record(s): need at least {min_heldout + 1} to hold out "
                        f"{min_heldout} for evaluation and train on the rest; add more data")
    n_heldout = min(max(min_heldout, round(fraction * n)), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    heldout_idx = np.sort(order[:n_heldout])
    train_idx = np.sort(order[n_heldout:])
    return [records[i] for i in train_idx], [records[i] for i in heldout_idx]


def pack_blocks(token_ids: list[list[int]], seq_len: int, eos_id: int | None) -> np.ndarray:
    """Concatenate tokenized documents and cut them into full blocks of ``seq_len`` tokens.

    With ``eos_id`` every document is followed by it, so the model learns where entries end and
    does not read one entry as the continuation of the previous. The tail that does not fill a
    block is dropped: padding would waste compute and need an attention mask. Empty documents
    are skipped. Returns int64 of shape (n_blocks, seq_len).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    eos = [] if eos_id is None else [eos_id]
    parts = [np.asarray(list(doc) + eos, dtype=np.int64) for doc in token_ids if len(doc)]
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)  # (total,)
    n_blocks = stream.size // seq_len
    if n_blocks == 0:
        raise DataError(f"the data is too small: {stream.size} tokens in all, fewer than one "
                        f"block of seq_len={seq_len}; add more records or lower seq_len")
    return stream[: n_blocks * seq_len].reshape(n_blocks, seq_len)  # (N, T)


class BlockSampler:
    """Batches of blocks, each block seen once per epoch in a fresh shuffled order.

    The order of epoch ``e`` is a pure function of ``(seed, e)``, so the whole state is
    ``(epoch, position)``: cheap to save with a checkpoint and resume exactly.
    """

    def __init__(self, blocks: np.ndarray, seed: int = 0, epoch: int = 0, position: int = 0):
        if blocks.ndim != 2 or blocks.shape[0] == 0:
            raise ValueError(f"blocks must have shape (n_blocks, seq_len) with n_blocks >= 1, "
                             f"got {blocks.shape}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.blocks = blocks  # (N, T)
        self.seed = seed
        self._order: np.ndarray | None = None  # permutation of the current epoch, (N,)
        self.restore(epoch, position)

    def __len__(self) -> int:
        """Blocks per epoch."""
        return self.blocks.shape[0]

    @property
    def state(self) -> tuple[int, int]:
        """``(epoch, position)``: how far the sampler has come; pass back to ``restore``."""
        return self.epoch, self.position

    def restore(self, epoch: int, position: int) -> None:
        if epoch < 0 or not 0 <= position < len(self):
            raise ValueError(f"state must have epoch >= 0 and 0 <= position < {len(self)}, "
                             f"got ({epoch}, {position})")
        self.epoch, self.position = epoch, position
        self._order = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The block indices in the order epoch ``epoch`` visits them, shape (N,)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self))

    def next_batch(self, batch_size: int) -> np.ndarray:
        """The next ``batch_size`` blocks, shape (B, T); a batch may span two epochs."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        picked = []
        while len(picked) < batch_size:
            if self._order is None:
                self._order = self.epoch_order(self.epoch)
            take = min(batch_size - len(picked), len(self) - self.position)
            picked.extend(self._order[self.position : self.position + take].tolist())
            self.position += take
            if self.position == len(self):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
        return self.blocks[picked]  # (B, T)
