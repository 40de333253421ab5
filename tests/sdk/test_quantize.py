"""Storing the frozen base in bfloat16, int8 or nf4 under the PyTorch LoRA trainer.

tiny-llama's linear layers (64×64, 32×64, 128×64, 64×128) all hold a multiple of 64 weights,
so nf4's blocks of 64 tile them exactly, as they do SmolLM2's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from edgetune.adapters.lora import init_lora  # noqa: E402
from edgetune.models import load_model  # noqa: E402
from edgetune.trainers.quantize import MODES, quantization_of, quantize_base, weight_bytes  # noqa: E402
from edgetune.trainers.torch_lora import TorchLoraTrainer  # noqa: E402
from edgetune.wire import LoraSpec, TrainSettings  # noqa: E402

from helpers.lora import batches, blocks  # noqa: E402

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
STEPS = TrainSettings(local_steps=3, learning_rate=1e-2, seed=1)


def trainer_for(mode: str, **kwargs) -> TorchLoraTrainer:
    loaded = load_model("tiny-llama")
    trainer = TorchLoraTrainer(loaded, SPEC, quantization=mode, **kwargs)
    tensors = init_lora(SPEC, loaded.manifest.modules, seed=3)
    trainer.set_adapter({k: v + np.float32(0.02) for k, v in tensors.items()})  # B ≠ 0: gradients reach A
    return trainer


def frozen_state(trainer: TorchLoraTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_each_mode_trains_lora_only(mode, gradient_checkpointing):
    trainer = trainer_for(mode, gradient_checkpointing=gradient_checkpointing)
    assert {p.dtype for p in trainer._params} == {torch.float32}  # LoRA stays float32 on any base
    base, start = frozen_state(trainer), trainer.get_adapter()
    result = trainer.train(batches(blocks()), STEPS)
    assert np.isfinite(result.final_loss) and result.steps == 3
    after = trainer.get_adapter()
    assert all(not np.array_equal(start[k], after[k]) for k in start)  # every factor, A and B
    for name, value in frozen_state(trainer).items():
        assert torch.equal(value, base[name]), name
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


def test_quantized_layers_are_the_bitsandbytes_ones_peft_expects():
    trainer = trainer_for("nf4")
    q_proj = trainer.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__module__ == "peft.tuners.lora.bnb"  # not a plain LoRA Linear around it
    assert isinstance(q_proj.get_base_layer(), bnb.nn.Linear4bit)
    assert q_proj.get_base_layer().weight.quant_type == "nf4"
    assert isinstance(trainer.model.base_model.model.lm_head, torch.nn.Linear)
    assert trainer.model.base_model.model.lm_head.weight.dtype == torch.float32


def test_weight_bytes_shrink_with_precision():
    sizes = {}
    for mode in MODES:
        model = load_model("tiny-llama").model
        sizes[mode] = weight_bytes(quantize_base(model, mode))
    params = sum(p.numel() for p in load_model("tiny-llama").model.parameters())
    assert sizes["float32"] == 4 * params + 4 * 8  # + the rotary inv_freq buffer (head dim 16 / 2)
    assert sizes["nf4"] < sizes["int8"] < sizes["bfloat16"] < sizes["float32"]
    # the linear layers hold 73,728 of tiny-llama's 90,688 parameters (the rest: embeddings
    # tied to lm_head, norms), in 1,024 output rows
    linear, rows = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3), 2 * (64 + 32 + 32 + 64 + 128 + 128 + 64)
    assert sizes["float32"] - sizes["bfloat16"] == 2 * linear
    assert sizes["float32"] - sizes["int8"] == 3 * linear - 4 * rows  # 1 byte each + a float32 scale per row
    # ½ byte each + a uint8 absmax per 64, plus per layer ~1 KB of code books that SmolLM2's
    # 7.5 M-weight layers do not notice
    assert sizes["float32"] - sizes["nf4"] > 3.2 * linear


def lora_gradients(trainer: TorchLoraTrainer, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    trainer.model.train()
    trainer.model.zero_grad()
    trainer.model(input_ids=ids, labels=ids).loss.backward()
    trainer.model.eval()
    return {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}


def test_nf4_adapter_round_trip_and_evaluation_leaves_gradients_intact():
    trainer = trainer_for("nf4")
    tensors = {k: v + np.float32(0.25) for k, v in init_lora(SPEC, trainer.loaded.manifest.modules, seed=5).items()}
    trainer.set_adapter(tensors)
    got = trainer.get_adapter()
    for name, array in tensors.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], array)
    data = blocks()
    ids = torch.from_numpy(data[:2])
    before = lora_gradients(trainer, ids)
    assert np.isfinite(trainer.perplexity(data))
    # on AVX512-BF16 CPUs bitsandbytes would repack the 4-bit weights for inference here, and
    # backward through them would then drop the gradient to every earlier layer, silently
    after = lora_gradients(trainer, ids)
    for name, grad in before.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert after[name] is not None, f"{name} got no gradient after evaluation"
        torch.testing.assert_close(after[name], grad, rtol=1e-5, atol=1e-7)


def test_quantized_bases_stay_close_to_float32():
    data = blocks()
    reference = trainer_for("float32").perplexity(data)
    for mode, tolerance in (("bfloat16", 0.01), ("int8", 0.02), ("nf4", 0.05)):
        assert trainer_for(mode).perplexity(data) == pytest.approx(reference, rel=tolerance), mode


def test_gpt2_conv1d_layers_become_equivalent_linear_layers():
    loaded, reference = load_model("tiny-gpt2"), load_model("tiny-gpt2")
    ids = torch.from_numpy(blocks()[:2])
    quantize_base(loaded.model, "bfloat16")
    assert isinstance(loaded.model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.model(input_ids=ids).logits, reference.model(input_ids=ids).logits, atol=0.05, rtol=0
        )
    trainer = TorchLoraTrainer(loaded, LoraSpec(rank=4, target_modules=("c_attn",)), quantization="bfloat16")
    assert trainer.get_adapter()["transformer.h.0.attn.c_attn.lora_A"].shape == (4, 64)
    assert np.isfinite(trainer.train(batches(blocks()), STEPS).final_loss)


def test_unknown_mode_names_the_allowed_ones():
    with pytest.raises(ValueError, match="float32, bfloat16, int8, nf4"):
        quantize_base(load_model("tiny-llama").model, "int4")
    loaded = load_model("tiny-llama")
    with pytest.raises(ValueError, match="fp16"):
        TorchLoraTrainer(loaded, SPEC, quantization="fp16")
    assert quantization_of(loaded.model) == "float32"  # nothing was changed


def test_quantization_is_one_way_and_survives_unload(caplog):
    loaded = load_model("tiny-llama")
    trainer = TorchLoraTrainer(loaded, SPEC, quantization="int8", gradient_checkpointing=True)
    with caplog.at_level(logging.WARNING):
        trainer.unload()
    assert "int8" in caplog.text and "load the model again" in caplog.text
    assert quantization_of(loaded.model) == "int8" and not loaded.model.is_gradient_checkpointing
    assert quantize_base(loaded.model, "int8") is loaded.model  # the same mode again: nothing to do
    with pytest.raises(ValueError, match="load the base again"):
        TorchLoraTrainer(loaded, SPEC, quantization="nf4")
    with pytest.raises(ValueError, match="already quantized to int8"):
        TorchLoraTrainer(loaded, SPEC)  # float32 is a request too, not a default to ignore
    TorchLoraTrainer(loaded, LoraSpec(rank=2, target_modules=("v_proj",)), quantization="int8")


def test_quantizing_a_wrapped_model_is_refused():
    trainer = TorchLoraTrainer(load_model("tiny-llama"), SPEC)
    with pytest.raises(ValueError, match="before wrapping"):
        quantize_base(trainer.loaded.model, "nf4")


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(RuntimeError, match="pip install bitsandbytes"):
        quantize_base(load_model("tiny-llama").model, "nf4")


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_quantizing_releases_the_memory_mapped_checkpoint(tmp_path):
    # from_pretrained maps the safetensors file and makes every weight a view into it, so the
    # float32 embeddings alone would keep all the float32 weights mapped (and resident once read)
    from transformers import AutoModelForCausalLM

    load_model("tiny-llama").model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, local_files_only=True)
    checkpoint = str(tmp_path / "model.safetensors")
    assert checkpoint in Path("/proc/self/maps").read_text()
    quantize_base(model, "nf4")
    assert checkpoint not in Path("/proc/self/maps").read_text()
