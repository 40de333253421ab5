"""Importance scoring of weight matrices (trainers/importance.py) and the choice of which ones
get adapters (planning/layout.py), on the tiny models built in code."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from edgetune.planning.layout import (
    GPT2_KINDS,
    LLAMA_KINDS,
    adapter_cost,
    candidate_modules,
    combine_scores,
    fixed_layout_budget,
    select_layout,
)
from edgetune.wire import ImportanceSettings

torch = pytest.importorskip("torch")

from edgetune.models import load_model  # noqa: E402
from edgetune.trainers.importance import score_matrices  # noqa: E402

from helpers.lora import batches, blocks  # noqa: E402

KINDS = {"tiny-llama": LLAMA_KINDS, "tiny-gpt2": GPT2_KINDS}
# unequal betas: a swapped pair, or Ū taken against the previous Ī, moves scores by ≫ 1 %
SETTINGS = ImportanceSettings(batches=3, beta1=0.6, beta2=0.9)


def token_batches(n: int, seed: int = 0) -> list[np.ndarray]:
    return list(itertools.islice(batches(blocks(), batch_size=4, seed=seed), n))  # n × (4, 32)


def loaded_with_candidates(ref: str):
    loaded = load_model(ref)
    return loaded, candidate_modules(loaded.manifest.modules, KINDS[ref])


def reference_scores(model, names, data, beta1, beta2) -> dict[str, float]:
    """The same smoothing written out plainly: full gradients of every candidate at once, in
    float64, Ū against the freshly updated Ī (AdaLoRA eq. 9)."""
    weights = [model.get_submodule(n).weight for n in names]
    avg = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    unc = [torch.zeros(w.shape, dtype=torch.float64) for w in weights]
    for w in weights:
        w.requires_grad_(True)
    try:
        for batch in data:
            ids = torch.from_numpy(batch)
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            mask = torch.ones_like(ids)
            loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=ids, use_cache=False).loss
            grads = torch.autograd.grad(loss, weights)
            for k, (w, g) in enumerate(zip(weights, grads, strict=True)):
                sens = (w.detach().double() * g.double()).abs()
                avg[k] = beta1 * avg[k] + (1 - beta1) * sens
                unc[k] = beta2 * unc[k] + (1 - beta2) * (sens - avg[k]).abs()
    finally:
        for w in weights:
            w.requires_grad_(False)
    return {n: float((a * u).sum()) for n, a, u in zip(names, avg, unc, strict=True)}


# --- scoring ------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["tiny-llama", "tiny-gpt2"])
def test_hooked_scores_match_a_full_gradient_reference(ref):
    loaded, names = loaded_with_candidates(ref)
    data = token_batches(3)
    expected = reference_scores(loaded.model, names, data, SETTINGS.beta1, SETTINGS.beta2)
    result = score_matrices(loaded.model, names, iter(data), SETTINGS)
    assert sorted(result.scores) == names
    assert result.batches == 3 and result.tokens == 3 * 4 * 32
    for name in names:
        assert expected[name] > 0
        assert result.scores[name] == pytest.approx(expected[name], rel=1e-2, abs=0), name
    # two bfloat16 states per candidate weight: 4 bytes a parameter
    assert result.state_bytes == 4 * sum(out * inp for out, inp in (loaded.manifest.modules[n] for n in names))


def test_model_is_left_exactly_as_it_was():
    loaded, names = loaded_with_candidates("tiny-llama")
    model = loaded.model
    model.train()
    model.get_submodule("model.layers.1").eval()  # mixed modes come back as they were
    model.get_submodule("model.norm").weight.requires_grad_(True)  # a caller's own flag
    sentinel = torch.full_like(model.get_submodule(names[0]).weight, 7.0)
    model.get_submodule(names[0]).weight.grad = sentinel
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}

    score_matrices(model, names, iter(token_batches(2)), SETTINGS)

    layer1 = set(model.get_submodule("model.layers.1").modules())
    assert all(m.training == (m not in layer1) for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.get_submodule(names[0]).weight.grad is sentinel
    assert all(p.grad is None for n, p in model.named_parameters() if n != f"{names[0]}.weight")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_state_is_restored_when_scoring_fails():
    loaded, names = loaded_with_candidates("tiny-llama")
    model = loaded.model
    calls = []

    def failing(m, ids):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device ran out of memory")
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    with pytest.raises(RuntimeError, match="out of memory"):
        score_matrices(model, names, iter(token_batches(3)), SETTINGS, forward=failing)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())

    def nan_loss(m, ids):
        return m(input_ids=ids, labels=ids, use_cache=False).loss * float("nan")

    with pytest.raises(ValueError, match="loss of calibration batch 1"):
        score_matrices(model, names, iter(token_batches(1)), SETTINGS, forward=nan_loss)
    assert not any(p.requires_grad for p in model.parameters())


def test_only_candidates_get_gradients_and_one_gradient_lives_at_a_time():
    loaded, names = loaded_with_candidates("tiny-llama")
    model = loaded.model
    candidates = [model.get_submodule(n).weight for n in names]
    alive: list[int] = []

    def watch(param):  # registered before score_matrices' hook, so it runs first
        alive.append(sum(w.grad is not None for w in candidates))

    def checked_forward(m, ids):
        trainable = {id(p) for p in m.parameters() if p.requires_grad}
        assert trainable == {id(w) for w in candidates}  # not the embeddings, norms or lm_head
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    for w in candidates:
        w.requires_grad_(True)  # hooks need it; score_matrices must hand it back so
    handles = [w.register_post_accumulate_grad_hook(watch) for w in candidates]
    try:
        score_matrices(model, names, iter(token_batches(2)), SETTINGS, forward=checked_forward)
    finally:
        for h in handles:
            h.remove()
    assert alive == [1] * (2 * len(names))  # each hook saw only its own gradient
    assert all(w.requires_grad for w in candidates)
    assert model.get_submodule("model.embed_tokens").weight.grad is None


def test_a_bfloat16_base_scores_like_float32():
    loaded, names = loaded_with_candidates("tiny-llama")
    data = token_batches(2)
    full = score_matrices(loaded.model, names, iter(data), SETTINGS).scores
    loaded.model.to(torch.bfloat16)
    half = score_matrices(loaded.model, names, iter(data), SETTINGS).scores
    assert all(p.dtype == torch.bfloat16 for p in loaded.model.parameters())
    assert all(math.isfinite(v) and v > 0 for v in half.values())
    for name in names:
        assert half[name] == pytest.approx(full[name], rel=2e-2, abs=0), name


def test_tiny_sensitivities_do_not_underflow():
    """A well-trained base has far smaller gradients than a random one; scaling the loss by
    1e-6 scales Ī and Ū by 1e-6 each, so every score by exactly 1e-12. float16 states would
    flush most of these sensitivities to zero; bfloat16 keeps float32's exponent range."""
    loaded, names = loaded_with_candidates("tiny-llama")
    data = token_batches(2)
    normal = score_matrices(loaded.model, names, iter(data), SETTINGS).scores
    def small(m, ids):
        return m(input_ids=ids, labels=ids, use_cache=False).loss * 1e-6

    scaled = score_matrices(loaded.model, names, iter(data), SETTINGS, forward=small).scores
    for name in names:
        assert scaled[name] == pytest.approx(normal[name] * 1e-12, rel=2e-2, abs=0), name


def test_a_planted_signal_shows_in_the_ranking():
    loaded, names = loaded_with_candidates("tiny-llama")
    data = token_batches(2)
    before = score_matrices(loaded.model, names, iter(data), SETTINGS).scores
    with torch.no_grad():
        # layer 0's attention output is cut: nothing in that block can change the loss
        loaded.model.get_submodule("model.layers.0.self_attn.o_proj").weight.zero_()
        loaded.model.get_submodule("model.layers.1.mlp.down_proj").weight.mul_(10.0)
    after = score_matrices(loaded.model, names, iter(data), SETTINGS).scores
    for kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert before[f"model.layers.0.self_attn.{kind}"] > 0
        assert after[f"model.layers.0.self_attn.{kind}"] == 0.0
    layer1_attention = [n for n in names if n.startswith("model.layers.1.self_attn")]
    layer1_mlp = [n for n in names if n.startswith("model.layers.1.mlp")]
    assert max(before[n] for n in layer1_mlp) < max(before[n] for n in layer1_attention)
    assert min(after[n] for n in layer1_mlp) > max(after[n] for n in layer1_attention)


def test_scoring_rejects_what_it_cannot_score():
    loaded, names = loaded_with_candidates("tiny-llama")
    model = loaded.model
    data = token_batches(1)
    cases = {
        "no module": ["model.layers.9.self_attn.q_proj"],
        "not a linear layer": ["model.norm"],
        "twice": [names[0], names[0]],
        "no modules": [],
    }
    for match, modules in cases.items():
        with pytest.raises(ValueError, match=match):
            score_matrices(model, modules, iter(data), SETTINGS)
    with pytest.raises(ValueError, match="batch iterator was empty"):
        score_matrices(model, names, iter([]), SETTINGS)
    # a quantized layer's weight is integer storage (as bitsandbytes' int8 layers keep it)
    layer = model.get_submodule(names[0])
    layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="needs a float base"):
        score_matrices(model, names, iter(data), SETTINGS)
    assert not any(p.requires_grad for p in model.parameters())


# --- layout -------------------------------------------------------------------------------


def test_candidate_modules_of_the_tiny_models():
    llama = load_model("tiny-llama").manifest.modules
    gpt2 = load_model("tiny-gpt2").manifest.modules
    names = candidate_modules(llama, LLAMA_KINDS)
    assert len(names) == 2 * 7 and names == sorted(names)
    assert candidate_modules(llama, ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    # c_proj is both attention's and the MLP's output projection
    assert candidate_modules(gpt2, ["c_proj"]) == [
        "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj",
    ]
    with pytest.raises(ValueError, match="no layer"):
        candidate_modules(llama, ["c_attn"])
    with pytest.raises(TypeError, match="string"):
        candidate_modules(llama, "q_proj")


def test_adapter_cost_and_the_fixed_budget():
    llama = load_model("tiny-llama").manifest.modules  # q (64, 64), v (32, 64) per layer
    assert adapter_cost(llama, ["model.layers.0.self_attn.q_proj"], 4) == 4 * 128
    assert adapter_cost(llama, ["model.layers.0.self_attn.v_proj"], 4) == 4 * 96
    assert fixed_layout_budget(llama, rank=4) == 2 * (4 * 128 + 4 * 96)
    gpt2 = load_model("tiny-gpt2").manifest.modules  # c_attn (192, 64)
    assert fixed_layout_budget(gpt2, ["c_attn"], rank=8) == 2 * 8 * 256
    with pytest.raises(ValueError, match="unknown modules"):
        adapter_cost(llama, ["lm_head"], 4)
    with pytest.raises(ValueError, match="rank"):
        adapter_cost(llama, [], 0)


def test_combine_scores_normalises_each_device_then_weights_by_samples():
    combined = combine_scores([({"a": 2.0, "b": 2.0}, 1.0), ({"a": 1e-6, "c": 3e-6}, 3.0)])
    # device 1: a .5, b .5; device 2: a .25, c .75; weights 1 : 3
    assert combined == pytest.approx({"a": (0.5 + 3 * 0.25) / 4, "b": 0.5 / 4, "c": 3 * 0.75 / 4})
    assert math.fsum(combined.values()) == pytest.approx(1.0)
    # a device without signal changes nothing, however many samples it has
    reports = [({"a": 2.0, "b": 2.0}, 1.0), ({"a": 1e-6, "c": 3e-6}, 3.0)]
    assert combine_scores([*reports, ({"a": 0.0}, 100.0)]) == pytest.approx(combined)
    assert combine_scores([({"a": 0.0, "b": 0.0}, 5.0)]) == {"a": 0.0, "b": 0.0}
    for bad in (float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="finite and ≥ 0"):
            combine_scores([({"a": 1.0, "b": bad}, 1.0)])
    with pytest.raises(ValueError, match="weight"):
        combine_scores([({"a": 1.0}, 0.0)])
    with pytest.raises(ValueError, match="no importance reports"):
        combine_scores([])


def brute_force(scores, costs, budget) -> float:
    names = list(scores)
    best = 0.0
    for k in range(1, len(names) + 1):
        for subset in itertools.combinations(names, k):
            if sum(costs[n] for n in subset) <= budget:
                best = max(best, math.fsum(scores[n] for n in subset))
    return best


def test_select_layout_is_within_half_of_optimal_and_optimal_for_equal_costs():
    rng = random.Random(5)
    ratios = []
    for trial in range(300):
        n = rng.randint(1, 9)
        equal = trial % 3 == 0
        modules = {f"m{i}": (16, 16) if equal else (rng.randint(1, 40), rng.randint(1, 40)) for i in range(n)}
        scores = {m: rng.choice([0.0, rng.random(), rng.random() ** 4]) for m in modules}
        if not any(scores.values()):
            continue
        costs = {m: adapter_cost(modules, [m], 2) for m in modules}
        budget = rng.randint(min(costs.values()), sum(costs.values()))
        if all(costs[m] > budget for m in modules if scores[m] > 0):
            continue
        layout = select_layout(scores, modules, 2, budget)
        value = math.fsum(scores[m] for m in layout.modules)
        optimum = brute_force(scores, costs, budget)
        assert layout.cost == sum(costs[m] for m in layout.modules) <= budget
        assert layout.modules == tuple(sorted(layout.modules))
        assert layout.score_covered == pytest.approx(value / math.fsum(scores.values()))
        assert value >= 0.5 * optimum - 1e-12
        if equal:
            assert value == pytest.approx(optimum)
        ratios.append(value / optimum)
    assert len(ratios) > 150 and min(ratios) < 1  # the instances were not all easy


def test_select_layout_keeps_the_single_best_matrix_when_greedy_would_not():
    modules = {"small": (1, 1), "big": (5, 5)}  # rank 1: costs 2 and 10
    layout = select_layout({"small": 0.2, "big": 0.9}, modules, rank=1, budget=10)
    assert layout.modules == ("big",) and layout.cost == 10
    assert layout.score_covered == pytest.approx(0.9 / 1.1)


def test_select_layout_is_deterministic_and_skips_zero_scores():
    modules = {f"layer.{i}.q_proj": (8, 8) for i in range(6)}
    scores = {name: 1.0 for name in modules} | {"layer.5.q_proj": 0.0}
    shuffled = dict(reversed(list(scores.items())))
    budget = 3 * adapter_cost(modules, ["layer.0.q_proj"], 4)
    first = select_layout(scores, modules, 4, budget)
    assert first == select_layout(shuffled, modules, 4, budget)
    assert first.modules == ("layer.0.q_proj", "layer.1.q_proj", "layer.2.q_proj")  # ties by name
    wide = select_layout(scores, modules, 4, 100 * budget)
    assert "layer.5.q_proj" not in wide.modules and wide.score_covered == 1.0


def test_select_layout_errors_say_what_is_wrong():
    modules = {"a": (8, 8), "b": (4, 4)}
    with pytest.raises(ValueError, match="fits no scored matrix: the cheapest costs 32"):
        select_layout({"a": 1.0, "b": 1.0}, modules, rank=4, budget=31)
    with pytest.raises(ValueError, match="every score is 0"):
        select_layout({"a": 0.0, "b": 0.0}, modules, rank=4, budget=1000)
    with pytest.raises(ValueError, match="finite"):
        select_layout({"a": float("nan")}, modules, rank=4, budget=1000)
    with pytest.raises(ValueError, match="unknown modules"):
        select_layout({"c": 1.0}, modules, rank=4, budget=1000)


def test_tiny_llama_end_to_end_layout_fits_the_fixed_budget():
    loaded, names = loaded_with_candidates("tiny-llama")
    result = score_matrices(loaded.model, names, iter(token_batches(2)), SETTINGS)
    combined = combine_scores([(result.scores, 10.0)])
    budget = fixed_layout_budget(loaded.manifest.modules, rank=4)
    layout = select_layout(combined, loaded.manifest.modules, 4, budget)
    fixed = candidate_modules(loaded.manifest.modules, ["q_proj", "v_proj"])
    assert layout.cost <= budget
    assert layout.score_covered >= math.fsum(combined[n] for n in fixed)  # never worse than q,v by its own measure
