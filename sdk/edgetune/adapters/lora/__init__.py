"""LoRA: low-rank factors ``{module}.lora_A`` (rank, in) and ``{module}.lora_B`` (out, rank) on
chosen linear layers (``spec.py``, ``tensors.py``), how far they move the model (``change.py``),
their PEFT files (``peft.py``) and the kind the registry holds (``kind.py``)."""

from .change import UpdateChange, lora_change, lora_update_change
from .kind import LORA as KIND
from .spec import LoraSpec
from .tensors import (check_merged, concat_merged, init_lora, lora_shapes, module_names, pad_rank, rank_of,
                      split_rank, targets, truncate_rank)

__all__ = ["KIND", "LoraSpec", "UpdateChange", "check_merged", "concat_merged", "init_lora", "lora_change", "lora_shapes",
           "lora_update_change", "module_names", "pad_rank", "rank_of", "split_rank", "targets", "truncate_rank"]
