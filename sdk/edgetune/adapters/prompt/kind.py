"""The soft prompt as an adapter kind (``AdapterKind``): one dense tensor put before every
input, started on devices from their base's token embeddings, merged by plain averaging
(exact: a prompt is linear in its parameters). Everything rank-related keeps the defaults."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..kind import AdapterKind, BaseEmbeddings
from ..tensors import Shapes, Tensors
from .peft import write_prompt_peft
from .spec import PromptSpec
from .tensors import prompt_from_embeddings, prompt_shapes


class PromptKind(AdapterKind):
    name = "prompt"
    spec_class = PromptSpec
    trainers = {"torch": "edgetune.trainers.torch_prompt:TorchPromptTrainer",
                "ort": "edgetune.trainers.ort_prompt:OrtPromptTrainer"}
    initialized_on_devices = True

    def shapes(self, spec: PromptSpec, model, rank: int | None = None) -> Shapes:
        return prompt_shapes(spec, model)

    def describe(self, spec: PromptSpec, model=None) -> str:
        return f"a soft prompt of {spec.num_virtual_tokens} virtual tokens"

    def initial_from_base(self, spec: PromptSpec, base: BaseEmbeddings, seed: int) -> dict[str, np.ndarray]:
        return prompt_from_embeddings(spec, base.rows, base.encode, base.vocab_size, seed, std=base.std)

    def write_peft(self, directory: Path, spec: PromptSpec, tensors: Tensors, base_model: str,
                   merged: Mapping[str, np.ndarray] | None) -> None:
        write_prompt_peft(directory, spec, tensors, base_model)


PROMPT_KIND = PromptKind()
