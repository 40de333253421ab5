"""Soft prompts: one tensor, ``prompt_embeddings`` (num_virtual_tokens, hidden), put before every
input (``spec.py``, ``tensors.py``), its PEFT files (``peft.py``) and the kind the registry
holds (``kind.py``)."""

from .kind import PROMPT_KIND as KIND
from .spec import PROMPT_INITS, PromptSpec
from .tensors import PROMPT, chunked_std, init_token_ids, prompt_from_embeddings, prompt_shapes

__all__ = ["KIND", "PROMPT", "PROMPT_INITS", "PromptSpec", "chunked_std", "init_token_ids", "prompt_from_embeddings",
           "prompt_shapes"]
