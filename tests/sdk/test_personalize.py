"""Personalization on tiny models built in code: the ℓ2 pull toward the global adapter, the
interpolation between global and local adapters and the choice of α; and FedSGD against
centralized SGD on the union of the devices' batches."""

from __future__ import annotations

import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from edgetune.adapters.lora import init_lora  # noqa: E402
from edgetune.adapters.prompt import PROMPT  # noqa: E402
from edgetune.data import generate_device_texts, split_heldout  # noqa: E402
from edgetune.device import Device, DeviceConfig, hash_seed  # noqa: E402
from edgetune.models import load_model  # noqa: E402
from edgetune.personalize import PersonalizeSettings, choose_alpha, interpolate, personalize  # noqa: E402
from edgetune.trainers.penalty import l2_gradient, l2_penalty, prox_to_anchor  # noqa: E402
from edgetune.trainers.torch_lora import TorchLoraTrainer  # noqa: E402
from edgetune.trainers.torch_prompt import TorchPromptTrainer, embedding_rows  # noqa: E402
from edgetune.transport import open_transport  # noqa: E402
from edgetune.wire import GlobalAdapter, LoraSpec, PromptSpec, TrainSettings  # noqa: E402
from edgetune.workload import Workload  # noqa: E402
from edgetune_aggregator.daemon import Aggregator, AggregatorConfig  # noqa: E402
from edgetune_aggregator.store import StateStore  # noqa: E402
from edgetune_aggregator.strategies import ServerOptimizerConfig  # noqa: E402

LORA = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
PROMPT_SPEC = PromptSpec(num_virtual_tokens=4)


def batches(count: int, batch: int = 2, length: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (batch, length)) for _ in range(count)]


def lora_start(seed: int = 1) -> dict[str, np.ndarray]:
    tensors = init_lora(LORA, load_model("tiny-llama").manifest.modules, seed)
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0, 0.05, t.shape).astype(np.float32) if n.endswith("lora_B") else t for n, t in tensors.items()}


def prompt_start() -> dict[str, np.ndarray]:
    return {PROMPT: embedding_rows(load_model("tiny-llama").model, np.arange(10, 14))}


# --- the ℓ2 penalty ---------------------------------------------------------------------------


def test_the_penalty_gradient_is_lambda_times_the_distance():
    rng = np.random.default_rng(0)
    theta, anchor, lam = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), 0.7
    t = torch.tensor(theta, requires_grad=True)
    (0.5 * lam * ((t - torch.tensor(anchor)) ** 2).sum()).backward()  # autograd of λ/2·‖θ − θ_g‖²
    np.testing.assert_allclose(t.grad.numpy(), lam * (theta - anchor), rtol=1e-12)
    np.testing.assert_allclose(l2_gradient(theta, anchor, lam), lam * (theta - anchor), rtol=1e-6)
    eps = 1e-6  # and the value's finite differences agree with it
    bumped = theta.copy()
    bumped[1, 2] += eps
    numeric = (l2_penalty(bumped, anchor, lam) - l2_penalty(theta, anchor, lam)) / eps
    assert numeric == pytest.approx(lam * (theta - anchor)[1, 2], rel=1e-4)


def test_the_proximal_step_solves_the_penalised_sgd_step():
    """θ' = prox(θ − lr·g) satisfies g + λ(θ' − θ_g) + (θ' − θ)/lr = 0: it is the implicit SGD
    step on loss + λ/2·‖θ − θ_g‖²."""
    rng = np.random.default_rng(1)
    theta, anchor, g = (rng.normal(size=50).astype(np.float32) for _ in range(3))
    lr, lam = 0.1, 3.0
    stepped = theta - lr * g
    prox_to_anchor(stepped, anchor, lr, lam)
    np.testing.assert_allclose(g + lam * (stepped - anchor) + (stepped - theta) / lr, 0, atol=1e-5)


def test_one_sgd_step_with_the_penalty_moves_by_the_penalised_amount():
    trainer = TorchPromptTrainer(load_model("tiny-llama"), PROMPT_SPEC)
    start = prompt_start()
    trainer.set_adapter(start)
    data = batches(1, seed=2)
    grad, _, _ = trainer.gradient(data)
    lr, lam = 0.5, 4.0
    trainer.train(iter(data), TrainSettings(local_steps=1, batch_size=2, seq_len=16, learning_rate=lr, optimizer="sgd",
                                            max_grad_norm=0.0), l2_to_global=lam)
    # at θ = θ_g the penalty's gradient is 0, and the implicit step divides by 1 + lr·λ
    expected = start[PROMPT] - lr * grad[PROMPT] / (1 + lr * lam)
    np.testing.assert_allclose(trainer.get_adapter()[PROMPT], expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["lora", "prompt"])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_an_infinite_penalty_keeps_the_global_adapter(kind, optimizer):
    trainer = (TorchLoraTrainer(load_model("tiny-llama"), LORA) if kind == "lora"
               else TorchPromptTrainer(load_model("tiny-llama"), PROMPT_SPEC))
    start = lora_start() if kind == "lora" else prompt_start()
    settings = TrainSettings(local_steps=5, batch_size=2, seq_len=16, learning_rate=1e-2, optimizer=optimizer)
    for lam, moved in ((0.0, True), (1e12, False)):
        trainer.set_adapter(start)
        trainer.train(iter(batches(5)), settings, l2_to_global=lam)
        after = trainer.get_adapter()
        drift = max(np.abs(after[n] - start[n]).max() for n in start)
        assert (drift > 1e-4) if moved else (drift < 1e-8), (lam, drift)


# --- interpolation and α ----------------------------------------------------------------------


def test_interpolation_endpoints_are_the_global_and_the_local_adapter():
    held = np.concatenate(batches(2, seed=7))
    # LoRA: the models at α = 0 and 1 are the global and the local one (weight-space interpolation)
    trainer = TorchLoraTrainer(load_model("tiny-llama"), LORA)
    global_tensors, local = lora_start(1), lora_start(2)
    rng = np.random.default_rng(3)
    merged = {"model.layers.0.self_attn.q_proj.merged_A": rng.normal(0, 0.1, (2, 64)).astype(np.float32),
              "model.layers.0.self_attn.q_proj.merged_B": rng.normal(0, 0.1, (64, 2)).astype(np.float32)}

    def logits(tensors, merged_delta):
        trainer.set_adapter(tensors)
        trainer.set_merged(merged_delta)
        with torch.no_grad():
            return trainer._logits(held).numpy()

    reference = {"global": logits(global_tensors, merged), "local": logits(local, merged)}
    for alpha, which in ((0.0, "global"), (1.0, "local")):
        np.testing.assert_allclose(logits(*interpolate(LORA, global_tensors, merged, local, alpha)), reference[which],
                                   rtol=1e-4, atol=1e-5)
    middle = logits(*interpolate(LORA, global_tensors, merged, local, 0.5))
    assert not np.allclose(middle, reference["global"], atol=1e-4) and not np.allclose(middle, reference["local"], atol=1e-4)
    # a prompt: the tensors themselves
    g, loc = prompt_start(), {PROMPT: prompt_start()[PROMPT] + 1.0}
    assert np.array_equal(interpolate(PROMPT_SPEC, g, {}, loc, 0.0)[0][PROMPT], g[PROMPT])
    assert np.array_equal(interpolate(PROMPT_SPEC, g, {}, loc, 1.0)[0][PROMPT], loc[PROMPT])
    np.testing.assert_allclose(interpolate(PROMPT_SPEC, g, {}, loc, 0.25)[0][PROMPT], g[PROMPT] + 0.25, rtol=1e-6)


def test_choose_alpha_takes_the_validation_best_and_the_smaller_on_ties():
    assert choose_alpha(lambda a: (a - 0.3) ** 2 + 5, [0, 0.1, 0.2, 0.3, 0.4, 1.0])[0] == 0.3
    best, seen = choose_alpha(lambda a: 2.0 if a >= 0.5 else 3.0, [0.0, 0.5, 1.0])
    assert best == 0.5 and seen == {0.0: 3.0, 0.5: 2.0, 1.0: 2.0}


@pytest.mark.parametrize("spec", [LORA, PROMPT_SPEC], ids=["lora", "prompt"])
def test_personalize_picks_the_alpha_that_is_best_on_the_validation_split(spec):
    texts = generate_device_texts(0, 60)
    train, heldout = split_heldout(texts, 0.2, seed=0)
    robust = generate_device_texts(1, 12)
    workload = Workload(load_model("tiny-llama"), train, heldout, robustness_texts=robust)
    tensors = lora_start() if spec is LORA else prompt_start()
    adapter = GlobalAdapter(3, 3, workload.manifest.fingerprint, spec, tensors)
    settings = PersonalizeSettings(learning_rate=2e-2, steps=6, batch_size=2, seq_len=32)
    personal, report = personalize(workload, adapter, settings, "dev-0")
    assert report.alpha == min(personal.validation, key=lambda a: (personal.validation[a], a))
    assert set(report.validation) == {f"{a:g}" for a in settings.alphas}
    assert report.global_robust_ppl is not None and report.personal_robust_ppl is not None
    # the endpoints of the search are the global and the local adapter on the same split
    trainer = workload.trainer(spec)
    _, val = workload.personal_split(32, settings.validation_fraction, settings.seed)
    trainer.set_adapter(tensors)
    trainer.set_merged({})
    assert personal.validation[0.0] == pytest.approx(trainer.perplexity(val[:16]), rel=1e-5)
    # a given α is used as is
    fixed, report = personalize(workload, adapter, PersonalizeSettings(learning_rate=2e-2, steps=6, batch_size=2,
                                                                       seq_len=32, alpha=0.0), "dev-0")
    assert report.alpha == 0.0 and not fixed.validation
    assert report.personal_ppl == pytest.approx(report.global_ppl, rel=1e-5)


def test_a_personal_adapter_serves_only_if_no_worse_than_the_served_global_version(tmp_path):
    """The personal adapter is checked against the version the device serves, on its own
    validation split: one fine-tuned on a corrupted copy of the device's text (every block one
    token repeated) and served whole (α = 1) is kept but not served; a sound one is served;
    rollback() returns to the fleet's promoted version."""
    from edgetune.adapters.digest import adapter_digest
    from edgetune.wire import Serving

    texts = generate_device_texts(0, 60)
    train, heldout = split_heldout(texts, 0.2, seed=0)
    workload = Workload(load_model("tiny-llama"), train, heldout)
    transport = open_transport("memory://personal-check", client_id="dev-0")
    device = Device(DeviceConfig("personal-check", "dev-0", state_dir=tmp_path), transport, workload)
    served = GlobalAdapter(3, 3, workload.manifest.fingerprint, LORA, lora_start())
    newer = GlobalAdapter(4, 4, workload.manifest.fingerprint, LORA, lora_start(seed=2))
    device.global_adapter = newer  # (rounds train on v4 while the fleet serves v3)
    device.promoted.notice(Serving(3, adapter_digest(served.tensors)))
    assert device.promoted.offer(served) == (True, "")

    honest = workload.batches_from

    def corrupted(blocks, batch_size, seed):
        for batch in honest(blocks, batch_size, seed):
            yield np.full_like(batch, batch[0, 0])

    workload.batches_from = corrupted
    wild = PersonalizeSettings(learning_rate=1e-1, steps=20, batch_size=2, seq_len=32, alpha=1.0)
    report = device.personalize(wild, report=False)
    workload.batches_from = honest
    assert report.global_version == 3  # (started from the served version, not the newest)
    personal = device.personal_adapter
    assert personal.validation_ppl > personal.global_validation_ppl and not personal.better_than_global
    assert device.serving == "global"
    spec, tensors, _ = device.serving_adapter()
    assert all(np.array_equal(tensors[n], served.tensors[n]) for n in served.tensors)

    sound = PersonalizeSettings(learning_rate=2e-2, steps=6, batch_size=2, seq_len=32)  # (α chosen: never worse)
    device.personalize(sound, report=False)
    assert device.personal_adapter.better_than_global and device.serving == "personal"
    assert device.serving_adapter()[1] is device.personal_adapter.tensors
    device.rollback()
    assert device.serving == "global"
    assert all(np.array_equal(device.serving_adapter()[1][n], served.tensors[n]) for n in served.tensors)


# --- FedSGD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [LORA, PROMPT_SPEC], ids=["lora", "prompt"])
def test_fedsgd_equals_centralized_sgd_on_the_union_of_the_batches(spec, tmp_path):
    lr = 0.3
    train = TrainSettings(batch_size=2, grad_accum=2, seq_len=32, algorithm="fedsgd", seed=5)
    config = AggregatorConfig(model_from_first_hello=True, fleet="fedsgd", state_dir=tmp_path / "state", rounds=1, min_devices=3,
                              round_timeout_s=120, join_timeout_s=60, adapter=spec, train=train,
                              server_optimizer=ServerOptimizerConfig("fedavg", lr=lr), evaluate_final=False)
    assert config.strategy_name == ("fedit" if spec is LORA else "dense")
    url = "memory://fedsgd-" + spec.kind
    aggregator = Aggregator(config, open_transport(url, client_id="agg"))
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    workloads = []
    for i in range(3):
        texts = generate_device_texts(i, 40)
        tr, ho = split_heldout(texts, 0.25, seed=i)
        workloads.append(Workload(load_model("tiny-llama"), tr, ho, threads=1))
        device = Device(DeviceConfig("fedsgd", f"dev-{i}"), open_transport(url, client_id=f"dev-{i}"), workloads[-1])
        device.connect()
        device.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    store = StateStore(tmp_path / "state")
    v0, v1 = store.load_global(0), store.load_global(1)
    # centralized: the same global start, every device's batches of that round together, one SGD step
    task_seed = train.seed + store.rounds()[-1]["round"]
    union = []
    for i, workload in enumerate(workloads):
        settings = TrainSettings(batch_size=2, grad_accum=2, seq_len=32, seed=task_seed)
        stream = workload.batches(settings, seed=task_seed + hash_seed(f"dev-{i}"))
        union += [next(stream) for _ in range(2)]
    reference = (TorchLoraTrainer(load_model("tiny-llama"), spec) if spec is LORA
                 else TorchPromptTrainer(load_model("tiny-llama"), spec))
    reference.set_adapter(v0.tensors)
    grads, _, _ = reference.gradient(union)
    for name, start in v0.tensors.items():
        expected = start.astype(np.float64) - lr * grads[name]
        np.testing.assert_allclose(v1.tensors[name], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # (with B = 0 at the start, LoRA's A gets no gradient yet; B and the prompt do)
    assert max(np.abs(v1.tensors[n] - v0.tensors[n]).max() for n in v0.tensors) > 1e-4


def test_local_epochs_make_a_device_take_one_pass_over_its_data(tmp_path):
    """``local_epochs`` (sent in the task) makes a device take one pass over its own data,
    however many steps that is, here with the client's SGD."""
    train = TrainSettings(batch_size=2, seq_len=32, local_epochs=1, optimizer="sgd", learning_rate=0.5)
    config = AggregatorConfig(model_from_first_hello=True, fleet="epochs", state_dir=tmp_path / "state", rounds=1, min_devices=1,
                              round_timeout_s=120, join_timeout_s=60, adapter=PROMPT_SPEC, train=train,
                              evaluate_final=False)
    url = "memory://epochs"
    aggregator = Aggregator(config, open_transport(url, client_id="agg"))
    thread = threading.Thread(target=aggregator.serve, daemon=True)
    thread.start()
    texts = generate_device_texts(0, 30)
    tr, ho = split_heldout(texts, 0.2, seed=0)
    workload = Workload(load_model("tiny-llama"), tr, ho, threads=1)
    device = Device(DeviceConfig("epochs", "dev-0"), open_transport(url, client_id="dev-0"), workload)
    device.connect()
    device.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    (record,) = [r for r in StateStore(tmp_path / "state").rounds() if r["kind"] == "train"]
    blocks = workload.train_blocks(32)
    steps = -(-blocks // 2)
    assert blocks > 10 and record["devices"][0]["train_tokens"] == steps * 2 * 32


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gpt2"])
def test_a_prompt_adapter_loads_in_peft_with_the_trainers_logits(ref, tmp_path):
    """What the state dir (and ``Device.save_adapter``) writes for a soft prompt is a PEFT
    prompt-tuning adapter that reproduces the trainer's model."""
    import peft

    from edgetune.adapters.peft_format import write_peft_adapter

    trainer = TorchPromptTrainer(load_model(ref), PROMPT_SPEC)
    prompt = {PROMPT: np.random.default_rng(4).normal(0, 0.1, (4, 64)).astype(np.float32)}
    trainer.set_adapter(prompt)
    ids = batches(1, seed=11)[0]
    with torch.no_grad():
        ours = trainer._logits(ids).numpy()
    write_peft_adapter(tmp_path / "adapter", PROMPT_SPEC, prompt, ref)
    model = peft.PeftModel.from_pretrained(load_model(ref).model, str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = model(input_ids=torch.as_tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits
    np.testing.assert_allclose(theirs[:, PROMPT_SPEC.num_virtual_tokens:].numpy(), ours, rtol=1e-5, atol=1e-5)


def test_a_capped_robustness_set_samples_every_site_and_a_short_one_turns_the_score_off():
    loaded = load_model("tiny-llama")
    site_a = ["alpha beta gamma delta " * 8] * 10
    site_b = ["omega psi chi phi " * 8] * 10
    workload = Workload(loaded, ["some training text for the device"] * 12, ["held out text"] * 4,
                        robustness_texts=site_a + site_b)
    every = workload.robustness_blocks(32)
    capped = workload.robustness_blocks(32, limit=2)
    assert len(every) > 4 and len(capped) == 2
    text = [loaded.tokenizer.decode(block) for block in capped]
    assert "alpha" in text[0] and "omega" in text[1]  # the first and the last site, not two of the first
    short = Workload(loaded, ["some training text for the device"] * 12, ["held out text"] * 4, robustness_texts=["hi"])
    assert short.robustness_blocks(32).shape == (0, 32)  # with a warning, not an error
