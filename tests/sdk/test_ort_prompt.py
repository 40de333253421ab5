"""Soft prompts on the ONNX Runtime backend against the PyTorch (PEFT prompt tuning) trainer,
on tiny Llama and GPT-2 models built in code: ``build-ort --prompt-tokens`` artifacts, training
parity step by step (AdamW and SGD, FedProx, the personalization penalty), FedSGD gradients,
the starting prompt, and refusal of mismatched artifacts."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnxruntime.training")

from edgetune.adapters.prompt import PROMPT  # noqa: E402
from edgetune.models import load_model  # noqa: E402
from edgetune.ort.artifacts import ArtifactError  # noqa: E402
from edgetune.ort.build import build_artifacts  # noqa: E402
from edgetune.trainers.ort_lora import OrtLoraTrainer  # noqa: E402
from edgetune.trainers.ort_prompt import OrtPromptTrainer  # noqa: E402
from edgetune.trainers.torch_prompt import TorchPromptTrainer, embedding_rows  # noqa: E402
from edgetune.wire import LoraSpec, PromptSpec, TrainSettings  # noqa: E402
from edgetune.workload import OrtWorkload, Workload  # noqa: E402

SPEC = PromptSpec(num_virtual_tokens=5)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2"])
def prompt_artifacts(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort") / request.param
    manifest = build_artifacts(request.param, out, prompt_tokens=SPEC.num_virtual_tokens)
    assert manifest.adapter.kind == "prompt" and manifest.trainable_size == 5 * 64
    return request.param, out


def start_prompt(ref: str) -> dict[str, np.ndarray]:
    loaded = load_model(ref)
    return {PROMPT: embedding_rows(loaded.model, np.arange(3, 3 + SPEC.num_virtual_tokens))}


def batches(count: int, batch: int = 2, length: int = 20, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (batch, length)) for _ in range(count)]


def both(ref: str, folder):
    return {"torch": TorchPromptTrainer(load_model(ref), SPEC), "ort": OrtPromptTrainer(folder, SPEC)}


@pytest.mark.parametrize("settings, l2", [
    (TrainSettings(local_steps=20, batch_size=2, seq_len=20, learning_rate=1e-2, weight_decay=0.01), 0.0),
    (TrainSettings(local_steps=10, batch_size=2, grad_accum=2, seq_len=20, learning_rate=0.5, optimizer="sgd",
                   proximal_mu=0.3), 0.0),
    (TrainSettings(local_steps=10, batch_size=2, seq_len=20, learning_rate=1e-2), 5.0),
])
def test_prompt_training_matches_pytorch_at_every_step(prompt_artifacts, settings, l2):
    ref, folder = prompt_artifacts
    start = start_prompt(ref)
    data = batches(settings.local_steps * settings.grad_accum)
    results = {}
    for name, trainer in both(ref, folder).items():
        trainer.set_adapter(start)
        losses: list[float] = []
        trainer.train(iter(data), settings, on_step=lambda s, t, loss: losses.append(loss), l2_to_global=l2)
        results[name] = (np.array(losses), trainer.get_adapter()[PROMPT] - start[PROMPT])
    np.testing.assert_allclose(results["ort"][0], results["torch"][0], rtol=1e-3)
    torch_delta, ort_delta = results["torch"][1], results["ort"][1]
    assert np.abs(torch_delta).max() > 0
    assert np.abs(ort_delta - torch_delta).max() <= 1e-3 * np.abs(torch_delta).max()


def test_perplexity_gradient_and_dynamic_shapes_match_pytorch(prompt_artifacts):
    ref, folder = prompt_artifacts
    start = start_prompt(ref)
    trainers = both(ref, folder)
    for trainer in trainers.values():
        trainer.set_adapter(start)
    for batch, length in ((1, 6), (3, 33)):
        held = batches(1, batch, length, seed=length)[0]
        np.testing.assert_allclose(trainers["ort"].perplexity(held), trainers["torch"].perplexity(held), rtol=1e-4)
    micro = batches(2, seed=4)
    (g_torch, loss_torch, n_torch), (g_ort, loss_ort, n_ort) = (trainers[k].gradient(micro) for k in ("torch", "ort"))
    assert n_torch == n_ort == 2 * 2 * 20
    np.testing.assert_allclose(loss_ort, loss_torch, rtol=1e-5)
    np.testing.assert_allclose(g_ort[PROMPT], g_torch[PROMPT], rtol=1e-3, atol=1e-3 * np.abs(g_torch[PROMPT]).max())


def test_the_starting_prompt_is_read_from_the_checkpoint(prompt_artifacts):
    """A torch-free device computes the same starting prompt as a torch device."""
    ref, folder = prompt_artifacts
    texts = ["some words to train on, and more of them"] * 20
    torch_side = Workload(load_model(ref), texts, texts[:2])
    ort_side = OrtWorkload.load(texts, trainer="ort", artifacts=folder)
    assert isinstance(ort_side, OrtWorkload) and ort_side.adapters == ("prompt",)
    for spec in (PromptSpec(5, "vocab"), PromptSpec(5, "random"), PromptSpec(5, "text", "Reply:")):
        np.testing.assert_array_equal(ort_side.initial_adapter(spec, seed=3)[PROMPT], torch_side.initial_adapter(spec, 3)[PROMPT])


def test_mismatched_prompt_artifacts_are_refused(prompt_artifacts):
    ref, folder = prompt_artifacts
    with pytest.raises(ArtifactError, match="--prompt-tokens 7"):
        OrtPromptTrainer(folder, PromptSpec(7))
    with pytest.raises(ArtifactError, match="artifacts train a soft prompt of 5 virtual tokens"):
        OrtLoraTrainer(folder, LoraSpec(4, 8.0, ("q_proj",) if ref == "tiny-llama" else ("c_attn",)))
