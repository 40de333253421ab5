"""The cost model's structure and the planner's optimality, checked by brute force."""

from __future__ import annotations

import itertools

import pytest

from edgetune.planning.costmodel import Arch, Calibration, Config, estimate_memory, estimate_step_seconds, step_gflop
from edgetune.planning.planner import PlanOptions, candidates, plan_fleet
from edgetune.wire import DeviceProfile

GiB = 2**30

# a small Llama-shaped model: 4 layers, hidden 256, MLP 768, 4 kv heads of 4, vocab 8000
H, I, KV, LAYERS, VOCAB = 256, 768, 128, 4, 8000
MODULES = {}
for layer in range(LAYERS):
    prefix = f"model.layers.{layer}"
    MODULES.update({
        f"{prefix}.self_attn.q_proj": (H, H), f"{prefix}.self_attn.k_proj": (KV, H),
        f"{prefix}.self_attn.v_proj": (KV, H), f"{prefix}.self_attn.o_proj": (H, H),
        f"{prefix}.mlp.gate_proj": (I, H), f"{prefix}.mlp.up_proj": (I, H), f"{prefix}.mlp.down_proj": (H, I),
    })
LINEAR = sum(a * b for a, b in MODULES.values())
ARCH = Arch(VOCAB, H, LAYERS, 4, LINEAR + VOCAB * H + 2 * H * LAYERS, MODULES)
CAL = Calibration(
    overhead_bytes=300e6, logits_copies=3.0,
    activation_scale={"float32": 1.2, "bfloat16": 1.2, "int8": 1.5, "nf4": 1.5},
    dequantized_fraction={"nf4": 0.8, "int8": 0.5, "bfloat16": 0.2},
    seconds_per_gflop={"float32": 0.05, "bfloat16": 0.2, "int8": 0.3, "nf4": 0.25},
    step_overhead_s=0.01, reference_gflops={"float32": 20.0, "bfloat16": 40.0},
)


def profile(name, memory_gib, gflops, quant=("nf4", "int8"), uplink=None):
    return DeviceProfile(name, int(memory_gib * GiB), {"float32": gflops}, 4, quant, uplink)


def test_memory_terms_scale_as_they_should():
    small = estimate_memory(ARCH, Config(8, "float32", 2, 128), CAL)
    double = estimate_memory(ARCH, Config(8, "float32", 4, 128), CAL)
    assert double.activations == pytest.approx(2 * small.activations)
    assert double.logits == pytest.approx(2 * small.logits)
    assert double.weights == small.weights and double.overhead == small.overhead
    ckpt = estimate_memory(ARCH, Config(8, "float32", 4, 128, gradient_checkpointing=True), CAL)
    assert ckpt.activations < double.activations / 2
    nf4 = estimate_memory(ARCH, Config(8, "nf4", 4, 128), CAL)
    assert nf4.weights < double.weights / 2 and nf4.dequantized > 0 == double.dequantized
    # rank 16 on q,v: 2 · 4 layers · 16 · (256 + 256 + 256 + 128) floats, ×4 (weights, grads, Adam)
    assert estimate_memory(ARCH, Config(16, "float32", 4, 128), CAL).adapter == 2 * 4 * 16 * (2 * 256 + 256 + 128) * 4 * 4 / 2


def test_step_time_follows_flops_and_device_speed():
    config = Config(8, "float32", 4, 128)
    slow = estimate_step_seconds(ARCH, config, profile("a", 8, 10.0), CAL)
    fast = estimate_step_seconds(ARCH, config, profile("b", 8, 40.0), CAL)
    assert slow == pytest.approx(4 * fast)  # (the fixed part of a step runs on the same, slower cores)
    assert step_gflop(ARCH, Config(8, "float32", 4, 128, True)) > 1.4 * step_gflop(ARCH, config)


def _brute_force(profiles, options):
    """Best total utility over every combination of candidates (or none) per device."""
    per_device = []
    for name, p in sorted(profiles.items()):
        found, _ = candidates(ARCH, p, options, CAL)
        per_device.append([None] + found)
    best = 0.0
    for combo in itertools.product(*per_device):
        chosen = [c for c in combo if c is not None]
        if options.uplink_budget_bytes is not None and sum(c.upload_bytes for c in chosen) > options.uplink_budget_bytes:
            continue
        best = max(best, sum(c.utility for c in chosen))
    return best


FLEET = {
    "pi": profile("pi", 1.0, 8.0, quant=()),
    "gateway": profile("gateway", 0.6, 4.0),
    "nuc": profile("nuc", 12, 40.0, uplink=20.0),
    "tiny": profile("tiny", 0.2, 2.0),
}
OPTIONS = PlanOptions(deadline_s=60, ranks=(2, 8), batch_sizes=(1, 4), quantizations=("float32", "nf4"),
                      checkpointing=(False,), max_local_steps=20)


def test_enumeration_is_optimal_and_respects_constraints():
    plan = plan_fleet(FLEET, ARCH, OPTIONS, CAL)
    assert plan.method == "enumeration"
    assert plan.utility == pytest.approx(_brute_force(FLEET, OPTIONS))
    for name, choice in plan.chosen.items():
        p = FLEET[name]
        assert estimate_memory(ARCH, choice.config, CAL).total <= OPTIONS.memory_margin * p.memory_bytes
        upload_s = choice.upload_bytes * 8 / (p.uplink_mbps * 1e6) if p.uplink_mbps else 0
        assert choice.local_steps * choice.step_s + upload_s <= OPTIONS.time_margin * OPTIONS.deadline_s
        if "nf4" not in p.quantization:
            assert choice.config.quantization == "float32"
    assert "tiny" in plan.excluded and "MiB" in plan.excluded["tiny"]


@pytest.mark.parametrize("budget_mb", [0.05, 0.2, 0.5])
def test_milp_with_uplink_budget_matches_brute_force(budget_mb):
    options = PlanOptions(**{**OPTIONS.__dict__, "uplink_budget_bytes": budget_mb * 1e6})
    plan = plan_fleet(FLEET, ARCH, options, CAL)
    assert plan.method == "milp"
    assert plan.utility == pytest.approx(_brute_force(FLEET, options), rel=1e-9)
    assert sum(c.upload_bytes for c in plan.chosen.values()) <= budget_mb * 1e6


def test_a_device_too_slow_for_the_deadline_is_excluded_with_a_reason():
    options = PlanOptions(deadline_s=0.01, ranks=(8,), batch_sizes=(1,), checkpointing=(False,))
    plan = plan_fleet({"slow": profile("slow", 8, 0.5)}, ARCH, options, CAL)
    assert not plan.chosen and "deadline" in plan.excluded["slow"]


def test_more_memory_never_plans_less_training():
    options = PlanOptions(deadline_s=120)
    totals = [plan_fleet({"d": profile("d", m, 10.0)}, ARCH, options, CAL).tokens for m in (0.5, 1, 2, 4, 8)]
    assert totals == sorted(totals) and totals[-1] > totals[0]


def test_the_weakest_plan_is_the_best_single_configuration_every_device_runs():
    """Brute force over the configurations feasible on every device: the same one for all,
    with the steps the slowest can take, and the most tokens among those."""
    from edgetune.planning.planner import plan_weakest

    profiles = {"small": profile("small", 0.45, 5.0), "mid": profile("mid", 2, 20.0), "big": profile("big", 8, 80.0)}
    options = PlanOptions(deadline_s=120, ranks=(2, 4, 8), batch_sizes=(1, 2, 4, 8), quantizations=("float32",))
    plan = plan_weakest(profiles, ARCH, options, CAL)
    configs = {c.config for c in plan.chosen.values()}
    steps = {c.local_steps for c in plan.chosen.values()}
    assert len(configs) == 1 and len(steps) == 1 and set(plan.chosen) == set(profiles)
    (config,), (chosen_steps,) = configs, steps
    per_device = {d: {c.config: c for c in candidates(ARCH, p, options, CAL)[0]} for d, p in profiles.items()}
    shared = set.intersection(*(set(found) for found in per_device.values()))
    best = max(min(found[c].local_steps for found in per_device.values()) * c.batch_size * (c.rank / 8) ** 0.1
               for c in shared)
    assert chosen_steps * config.batch_size * (config.rank / 8) ** 0.1 == pytest.approx(best)
    assert chosen_steps == min(per_device[d][config].local_steps for d in profiles)
    # the weakest caps everyone: the big device trains far less than the planner would give it
    auto = plan_fleet(profiles, ARCH, options, CAL)
    assert auto.chosen["big"].tokens > 2 * plan.chosen["big"].tokens


def test_the_uniform_plan_drops_only_those_it_does_not_fit_in_memory():
    from edgetune.planning.planner import plan_uniform

    profiles = {"tiny": profile("tiny", 0.3, 1.0), "slow": profile("slow", 8, 0.5), "big": profile("big", 8, 80.0)}
    options = PlanOptions(deadline_s=60)
    config = Config(8, "float32", 4, 128)
    plan = plan_uniform(profiles, ARCH, options, config, 10, CAL)
    assert set(plan.chosen) == {"slow", "big"}  # slow does not make the deadline, but is not dropped for it
    assert all(c.config == config and c.local_steps == 10 for c in plan.chosen.values())
    assert "needs" in plan.excluded["tiny"] and "may use" in plan.excluded["tiny"]


def test_evaluation_and_the_download_come_out_of_a_devices_time():
    slow = {"d": profile("d", 8, 10.0, uplink=1.0)}
    base = PlanOptions(deadline_s=120, max_local_steps=1000)
    plain = plan_fleet(slow, ARCH, base, CAL).chosen["d"]
    busy = plan_fleet(slow, ARCH, PlanOptions(deadline_s=120, max_local_steps=1000, eval_tokens=4096,
                                              download_bytes=2e6), CAL).chosen["d"]
    assert busy.local_steps < plain.local_steps


def test_a_device_quantizes_its_update_only_where_its_uplink_costs_it_training():
    """With every precision allowed, a device on a slow uplink sends int8 (its upload time is
    training time), one on a fast link float32 (quantizing would buy nothing); a budget the
    float32 updates overflow is met by quantizing rather than by leaving devices out."""
    options = PlanOptions(deadline_s=60, ranks=(8,), batch_sizes=(4,), quantizations=("float32",),
                          checkpointing=(False,), max_local_steps=50, precisions=("fp32", "fp16", "int8"))
    slow, fast = profile("slow", 4, 10.0, uplink=0.05), profile("fast", 4, 10.0, uplink=1000.0)
    plan = plan_fleet({"slow": slow, "fast": fast}, ARCH, options, CAL)
    assert plan.chosen["slow"].config.delta_precision == "int8"
    assert plan.chosen["fast"].config.delta_precision == "fp32"
    assert plan.plans()["slow"].delta_precision == "int8"
    only_fp32 = plan_fleet({"slow": slow}, ARCH, PlanOptions(**{**options.__dict__, "precisions": ("fp32",)}), CAL)
    assert plan.chosen["slow"].local_steps > only_fp32.chosen["slow"].local_steps
    assert plan.chosen["slow"].upload_bytes < 0.27 * only_fp32.chosen["slow"].upload_bytes

    fp32_bytes = plan.chosen["fast"].upload_bytes
    budget = PlanOptions(**{**options.__dict__, "uplink_budget_bytes": 1.2 * fp32_bytes})
    twins = {"a": fast, "b": fast}
    budgeted = plan_fleet(twins, ARCH, budget, CAL)
    assert set(budgeted.chosen) == {"a", "b"} and sum(c.upload_bytes for c in budgeted.chosen.values()) <= 1.2 * fp32_bytes
    assert budgeted.utility == pytest.approx(_brute_force(twins, budget), rel=1e-9)


def test_a_device_is_planned_only_precisions_it_writes():
    from edgetune.planning.planner import for_capabilities
    from edgetune.wire import Capabilities

    options = PlanOptions(deadline_s=60, precisions=("fp32", "fp16", "int8"))
    assert for_capabilities(options, Capabilities(precisions=("fp32", "fp16"))).precisions == ("fp32", "fp16")
    assert for_capabilities(options, Capabilities(precisions=())).precisions == ("fp32",)
    assert for_capabilities(options, Capabilities()) is options
