"""``edgetune bench personalization``: the personalization–robustness trade-off, measured.

A fleet of devices with real non-IID text (one Debian ``fortunes`` category each) trains a
soft prompt (or LoRA) by FedAvg for a few rounds. Then every device personalizes the global
adapter under each setting of the sweep — learning rate × local steps × optimizer × λ
(``l2_to_global``) — and serves the interpolation (1 − α)·global + α·local for each α.
Every (setting, α) is one point: its **personalization** score (perplexity on the device's own
held-out text) and its **robustness** score (perplexity on the other devices' held-out text),
averaged over devices. The α chosen on each device's validation split (what ``personalize``
would serve) is recorded too.

Everything is the product's own code: ``Workload`` and the trainers, the aggregator's ``dense``
strategy for FedAvg, ``interpolate`` and ``choose_alpha``. Rounds run in process (no broker:
the trade-off does not depend on the transport) and devices one after another.

Output: ``personalization.json`` (every point), ``personalization.png`` (robustness vs
personalization, one point per setting) and a markdown section, which ``--docs`` writes into
``docs/benchmarks.md`` between ``<!-- personalization:begin -->`` and ``<!-- ...:end -->``.
The section's verdicts on the paper's findings are computed from the points, not written.

It is one of the few ``edgetune`` modules that import ``edgetune_aggregator``, on purpose: it runs
both sides in one process (``tests/test_layering.py`` lists them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger("edgetune.bench")

BEGIN, END = "<!-- personalization:begin -->", "<!-- personalization:end -->"


@dataclass(frozen=True)
class BenchConfig:
    model: str | None = None  # load_model ref (None: SmolLM2-135M-Instruct GGUF)
    adapter: str = "prompt"
    prompt_tokens: int = 20
    rank: int = 8
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    categories: tuple[str, ...] = ("computers", "science", "people")
    max_texts: int = 400  # per device, before the held-out split
    seq_len: int = 64
    batch_size: int = 4
    eval_blocks: int = 8
    # federation
    rounds: int = 3
    fed_steps: int = 15
    fed_lr: float = 3e-3
    # the sweep
    lrs: dict[str, tuple[float, ...]] = field(default_factory=lambda: {"adamw": (3e-4, 3e-3), "sgd": (3.0, 30.0)})
    steps: tuple[int, ...] = (8, 32)
    l2: tuple[float, ...] = (0.0, 10.0)
    alphas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    threads: int | None = None
    seed: int = 0


def _workloads(config: BenchConfig, texts: dict[str, list[str]]):
    from ..data import split_heldout
    from ..models import load_model
    from ..workload import Workload

    splits = {c: split_heldout(t[: config.max_texts], 0.15, seed=config.seed) for c, t in texts.items()}
    workloads = {}
    for category, (rest, heldout) in splits.items():
        others = [x for other, (_, h) in splits.items() if other != category for x in h]
        # as Workload.load does: validation records neither rounds nor personalization train on
        train, validation = split_heldout(rest, 0.1, seed=config.seed + 1)
        workloads[category] = Workload(load_model(config.model), train, heldout, config.threads, robustness_texts=others,
                                       validation_texts=validation)
        log.info("device %s: %d training texts, %d for validation, %d held out, %d of the others' held out",
                 category, len(train), len(validation), len(heldout), len(others))
    return workloads


def _spec(config: BenchConfig):
    return _spec_of(asdict(config))


def _spec_of(config: dict):
    """The adapter of a benchmark's settings (as ``asdict`` or the results file has them): each
    kind takes the options that are its fields."""
    from ..adapters.registry import spec_from_dict

    return spec_from_dict({"kind": config["adapter"], "num_virtual_tokens": config["prompt_tokens"], "init": "vocab",
                           "rank": config["rank"], "alpha": 2.0 * config["rank"], "target_modules": config["targets"]})


def _federate(config: BenchConfig, workloads, spec):
    """FedAvg rounds with the aggregator's own strategy; the global adapter after them."""
    from edgetune_aggregator.strategies import RoundStart, make_strategy

    from ..adapters.registry import adapter_kind
    from ..wire import GlobalAdapter, TrainSettings

    first = next(iter(workloads.values()))
    kind = adapter_kind(spec)
    tensors = kind.initial(spec, first.manifest, config.seed)
    if tensors is None:  # (a kind that starts from the base: this device's proposal)
        tensors = first.initial_adapter(spec, config.seed)
    strategy = make_strategy(kind.auto_strategy(mixed=False))
    settings = TrainSettings(local_steps=config.fed_steps, batch_size=config.batch_size, seq_len=config.seq_len,
                             learning_rate=config.fed_lr)
    for r in range(1, config.rounds + 1):
        merge = strategy.begin(RoundStart(dict(tensors), {}, kind.scale(spec), seed=r))
        for i, workload in enumerate(workloads.values()):
            trainer = workload.trainer(spec)
            trainer.set_adapter(tensors)
            trainer.train(workload.batches(settings, seed=config.seed + 100 * r + i), settings)
            trained = trainer.get_adapter()
            merge.add({n: trained[n] - tensors[n] for n in tensors}, workload.num_samples)
        tensors = strategy.finish(merge).tensors
        log.info("federated round %d of %d done", r, config.rounds)
    return GlobalAdapter(config.rounds, config.rounds, first.manifest.fingerprint, spec, tensors)


def run(config: BenchConfig, texts: dict[str, list[str]]) -> dict:
    """Every point of the sweep (see the module docstring)."""
    from ..personalize import choose_alpha, interpolate
    from ..wire import TrainSettings

    started = time.perf_counter()
    spec = _spec(config)
    workloads = _workloads(config, texts)
    adapter = _federate(config, workloads, spec)
    fed_seconds = time.perf_counter() - started

    def scores(trainer, workload) -> tuple[float, float]:
        own = workload.heldout_blocks(config.seq_len)[: config.eval_blocks]
        robust = workload.robustness_blocks(config.seq_len, config.eval_blocks)
        return trainer.perplexity(own), trainer.perplexity(robust)

    global_scores = {}
    for category, workload in workloads.items():
        trainer = workload.trainer(spec)
        trainer.set_adapter(adapter.tensors)
        trainer.set_merged({})
        global_scores[category] = scores(trainer, workload)
    settings_grid = [(opt, lr, steps, lam) for opt, lrs in config.lrs.items() for lr in lrs
                     for steps in config.steps for lam in config.l2]
    points, chosen = [], []
    for (opt, lr, steps, lam), (category, workload) in itertools.product(settings_grid, workloads.items()):
        trainer = workload.trainer(spec)
        trainer.set_adapter(adapter.tensors)
        trainer.set_merged({})
        train_blocks, val_blocks = workload.personal_split(config.seq_len, 0.15, config.seed)
        settings = TrainSettings(local_steps=steps, batch_size=config.batch_size, seq_len=config.seq_len,
                                 learning_rate=lr, optimizer=opt, seed=config.seed)
        t0 = time.perf_counter()
        trainer.train(workload.batches_from(train_blocks, config.batch_size, config.seed), settings, l2_to_global=lam)
        train_s = time.perf_counter() - t0
        local = trainer.get_adapter()
        by_alpha = {}
        for alpha in config.alphas:
            tensors, merged = interpolate(spec, adapter.tensors, {}, local, alpha)
            trainer.set_adapter(tensors)
            trainer.set_merged(merged)
            by_alpha[alpha] = scores(trainer, workload)
            points.append({"optimizer": opt, "lr": lr, "steps": steps, "l2": lam, "alpha": alpha, "device": category,
                           "own_ppl": by_alpha[alpha][0], "others_ppl": by_alpha[alpha][1], "train_s": train_s})

        def validation(alpha: float) -> float:
            tensors, merged = interpolate(spec, adapter.tensors, {}, local, alpha)
            trainer.set_adapter(tensors)
            trainer.set_merged(merged)
            return trainer.perplexity(val_blocks[: config.eval_blocks])

        best, _ = choose_alpha(validation, config.alphas)
        chosen.append({"optimizer": opt, "lr": lr, "steps": steps, "l2": lam, "device": category, "alpha": best,
                       "own_ppl": by_alpha[best][0], "others_ppl": by_alpha[best][1]})
        log.info("%s %s lr=%g steps=%d λ=%g: own %.2f -> %.2f, others' %.2f -> %.2f (α=1); validation picks α=%g",
                 category, opt, lr, steps, lam, global_scores[category][0], by_alpha[1.0][0] if 1.0 in by_alpha else
                 float("nan"), global_scores[category][1], by_alpha[1.0][1] if 1.0 in by_alpha else float("nan"), best)
    return {
        "config": asdict(config),
        "model": next(iter(workloads.values())).manifest.name,
        "trainable_parameters": int(sum(t.size for t in adapter.tensors.values())),
        "global": {c: {"own_ppl": s[0], "others_ppl": s[1]} for c, s in global_scores.items()},
        "points": points,
        "chosen": chosen,
        "federation_seconds": fed_seconds,
        "seconds": time.perf_counter() - started,
        "machine": f"{platform.machine()}, {_cores()} cores, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
    }


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --- summarising ------------------------------------------------------------------------------


def settings_table(results: dict) -> list[dict]:
    """One row per (setting, α): personalization and robustness averaged over devices, with
    their change against the global adapter (ratio of geometric means of perplexity)."""
    glob = results["global"]
    g_own = _geo([v["own_ppl"] for v in glob.values()])
    g_others = _geo([v["others_ppl"] for v in glob.values()])
    rows: dict[tuple, list[dict]] = {}
    for p in results["points"]:
        rows.setdefault((p["optimizer"], p["lr"], p["steps"], p["l2"], p["alpha"]), []).append(p)
    table = []
    for (opt, lr, steps, lam, alpha), ps in rows.items():
        own, others = _geo([p["own_ppl"] for p in ps]), _geo([p["others_ppl"] for p in ps])
        table.append({"optimizer": opt, "lr": lr, "steps": steps, "l2": lam, "alpha": alpha, "own_ppl": own,
                      "others_ppl": others, "own_gain": 1 - own / g_own, "others_loss": others / g_others - 1})
    return table


def _geo(values) -> float:
    return float(math.exp(np.mean(np.log(values))))


def findings(results: dict) -> list[str]:
    """The paper's qualitative findings, each checked against these numbers. Comparisons use
    medians over settings: a few diverging settings (too large a learning rate) would otherwise
    decide every average."""
    table = settings_table(results)
    full = [r for r in table if r["alpha"] == 1.0]
    improving = [r for r in full if r["own_gain"] > 0]  # settings where fine-tuning helped the device at all
    out = []

    def med(rows, key):
        return float(np.median([r[key] for r in rows])) if rows else float("nan")

    gain, loss = med(improving, "own_gain"), med(improving, "others_loss")
    out.append(f"**Local fine-tuning trades robustness for personalization** — "
               f"{'holds' if improving and loss > 0 else 'does not hold'} here: in the {len(improving)} of {len(full)} "
               f"settings where fine-tuning (α = 1) lowered the device's own perplexity (median {gain:.1%}), the other "
               f"sites' perplexity changed by a median {loss:+.1%}; "
               f"{sum(r['others_loss'] > 0 for r in improving)} of them made it worse.")
    for opt, lrs in results["config"]["lrs"].items():
        steps = results["config"]["steps"]
        small = [r for r in full if r["optimizer"] == opt and r["lr"] == min(lrs) and r["steps"] == max(steps)]
        large = [r for r in full if r["optimizer"] == opt and r["lr"] == max(lrs) and r["steps"] == min(steps)]
        if small and large:
            holds = med(small, "others_loss") < med(large, "others_loss")
            out.append(f"**Small learning rate, many steps is more robust** ({opt}: lr {min(lrs):g} × {max(steps)} steps "
                       f"vs lr {max(lrs):g} × {min(steps)}, α = 1) — {'holds' if holds else 'does not hold'}: robustness "
                       f"change {med(small, 'others_loss'):+.1%} vs {med(large, 'others_loss'):+.1%}, personalization "
                       f"gain {med(small, 'own_gain'):+.1%} vs {med(large, 'own_gain'):+.1%}.")
    # Adam vs SGD: the best trade-off each reaches (own gain minus others' loss; α = 0 is the
    # global adapter for every setting, so it says nothing about the optimizer)
    by_opt = {opt: max((r["own_gain"] - r["others_loss"] for r in table if r["optimizer"] == opt and r["alpha"] > 0),
                       default=float("nan"))
              for opt in results["config"]["lrs"]}
    if len(by_opt) == 2 and "adamw" in by_opt:
        other = next(o for o in by_opt if o != "adamw")
        out.append(f"**Adam on the client beats SGD** — {'holds' if by_opt['adamw'] > by_opt[other] else 'does not hold'}: "
                   f"the best setting's personalization gain minus robustness loss is {by_opt['adamw']:+.1%} with AdamW "
                   f"vs {by_opt[other]:+.1%} with {other.upper()}.")
    lams = sorted(results["config"]["l2"])
    if len(lams) >= 2:
        pairs = []
        for r in full:
            if r["l2"] == lams[-1]:
                base = [q for q in full if q["l2"] == lams[0] and
                        (q["optimizer"], q["lr"], q["steps"]) == (r["optimizer"], r["lr"], r["steps"])]
                if base:
                    pairs.append((r, base[0]))
        protected = sum(r["others_loss"] < q["others_loss"] for r, q in pairs)
        out.append(f"**The ℓ2 pull toward the global adapter protects robustness** (λ = {lams[-1]:g} vs {lams[0]:g}, "
                   f"same optimizer, lr and steps, α = 1) — {'holds' if protected > len(pairs) / 2 else 'does not hold'}: "
                   f"the robustness loss is smaller with it in {protected} of {len(pairs)} settings (median "
                   f"{med([r for r, _ in pairs], 'others_loss'):+.1%} vs {med([q for _, q in pairs], 'others_loss'):+.1%}); "
                   f"the personalization gain is {med([r for r, _ in pairs], 'own_gain'):+.1%} vs "
                   f"{med([q for _, q in pairs], 'own_gain'):+.1%}.")
    keys = {(r["optimizer"], r["lr"], r["steps"], r["l2"]) for r in improving}
    half = {(r["optimizer"], r["lr"], r["steps"], r["l2"]): r for r in table if r["alpha"] == 0.5}
    both = [(half[k], r) for k in keys for r in improving if (r["optimizer"], r["lr"], r["steps"], r["l2"]) == k
            and k in half]
    if both:
        kept = float(np.median([h["own_gain"] / f["own_gain"] for h, f in both]))
        worse = [(h, f) for h, f in both if f["others_loss"] > 0]
        spared = float(np.median([1 - h["others_loss"] / f["others_loss"] for h, f in worse])) if worse else float("nan")
        holds = kept > 0.5 and (not worse or spared > 0.5)
        out.append(f"**Interpolating global and local keeps most of the gain at a fraction of the loss** — "
                   f"{'holds' if holds else 'does not hold'}: over the settings where fine-tuning helped, α = 0.5 keeps a "
                   f"median {kept:.0%} of the α = 1 personalization gain"
                   + (f" and avoids {spared:.0%} of its robustness loss (where there was one)." if worse else "."))
    chosen = results["chosen"]
    if chosen:
        out.append(f"**α chosen on each device's validation split** (over every setting): mean α "
                   f"{np.mean([c['alpha'] for c in chosen]):.2f}; own perplexity {_geo([c['own_ppl'] for c in chosen]):.2f}, "
                   f"others' {_geo([c['others_ppl'] for c in chosen]):.2f} (global adapter: "
                   f"{_geo([v['own_ppl'] for v in results['global'].values()]):.2f} and "
                   f"{_geo([v['others_ppl'] for v in results['global'].values()]):.2f}).")
    return out


def plot(results: dict, path: Path) -> Path:
    """Robustness vs personalization, one point per (setting, α): the whole sweep (log axes),
    and beside it the region around the global adapter, where the useful settings are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = settings_table(results)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), dpi=110)
    markers = {"adamw": "o", "sgd": "s"}
    lams = sorted(results["config"]["l2"])
    g_own = _geo([v["own_ppl"] for v in results["global"].values()])
    g_others = _geo([v["others_ppl"] for v in results["global"].values()])
    chosen = results["chosen"]
    for ax, zoom in zip(axes, (False, True)):
        for row in table:
            outlined = len(lams) > 1 and row["l2"] == lams[-1]
            ax.scatter(row["own_ppl"], row["others_ppl"], marker=markers.get(row["optimizer"], "^"),
                       c=[plt.cm.viridis(row["alpha"])], edgecolors="black" if outlined else "none",
                       s=28 + 30 * outlined, alpha=0.85)
        ax.scatter([g_own], [g_others], marker="*", s=260, c="red", zorder=5, label="global adapter (after FedAvg)")
        if chosen:
            ax.scatter([_geo([c["own_ppl"] for c in chosen])], [_geo([c["others_ppl"] for c in chosen])], marker="X",
                       s=150, c="orange", edgecolors="black", zorder=5, label="α chosen on validation (mean)")
        if zoom:
            ax.set_xlim(g_own * 0.88, g_own * 1.08)
            ax.set_ylim(g_others * 0.92, g_others * 1.12)
            ax.set_title("around the global adapter", fontsize=10)
        else:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title("every setting (log axes)", fontsize=10)
        ax.set_xlabel("personalization: ppl, own held-out text (lower: better)", fontsize=9)
        ax.set_ylabel("robustness: ppl, other devices' text (lower: better)", fontsize=9)
    for opt, marker in markers.items():
        axes[0].scatter([], [], marker=marker, c="gray", label=opt)
    if len(lams) > 1:
        axes[0].scatter([], [], marker="o", c="white", edgecolors="black", label=f"λ = {lams[-1]:g} (outlined)")
    axes[0].legend(fontsize=8, loc="upper left")
    fig.colorbar(plt.cm.ScalarMappable(cmap=plt.cm.viridis, norm=plt.Normalize(0, 1)), ax=axes,
                 label="α (0: global, 1: local)")
    fig.suptitle(f"Personalization vs robustness: {results['model']}, {results['config']['adapter']}, "
                 f"{len(results['global'])} devices (geometric means over devices)", fontsize=11)
    fig.subplots_adjust(left=0.06, right=0.86, bottom=0.12, wspace=0.25)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _described(config: dict) -> str:
    """The benchmark's adapter for people (as its kind describes itself)."""
    from ..adapters.registry import adapter_kind

    spec = _spec_of(config)
    return adapter_kind(spec).describe(spec)


def markdown(results: dict, png: str) -> str:
    c = results["config"]
    table = sorted(settings_table(results), key=lambda r: (r["optimizer"], r["lr"], r["steps"], r["l2"], r["alpha"]))
    lines = [
        BEGIN,
        "## Personalization vs robustness (issue 6)",
        "",
        f"`edgetune bench personalization` on {results['date']} ({results['machine']}): {results['model']}, "
        f"{_described(c)} "
        f"({results['trainable_parameters']:,} parameters), {len(results['global'])} devices with one `fortunes` "
        f"category each ({', '.join(results['global'])}), batch {c['batch_size']} × {c['seq_len']} tokens. "
        f"{c['rounds']} FedAvg rounds of {c['fed_steps']} AdamW steps (lr {c['fed_lr']:g}) make the global adapter; then "
        f"each device personalizes it under every setting and serves (1 − α)·global + α·local. Personalization: "
        f"perplexity on the device's own held-out text; robustness: on the other devices' held-out text (geometric "
        f"means over devices; changes relative to the global adapter). Run time {results['seconds'] / 60:.0f} min.",
        "",
        f"![personalization vs robustness]({png})",
        "",
        "What the paper (Profit) found, checked here:",
        "",
        *[f"- {f}" for f in findings(results)],
        "",
        "| optimizer | lr | steps | λ | α | own ppl | others' ppl | own gain | others' loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    g_own = _geo([v["own_ppl"] for v in results["global"].values()])
    g_others = _geo([v["others_ppl"] for v in results["global"].values()])
    lines.append(f"| global adapter | | | | | {g_own:.2f} | {g_others:.2f} | | |")
    for r in table:
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['steps']} | {r['l2']:g} | {r['alpha']:g} | {r['own_ppl']:.2f} "
                     f"| {r['others_ppl']:.2f} | {r['own_gain']:+.1%} | {r['others_loss']:+.1%} |")
    lines += ["", "Raw points (per device): `benchmarks/results/personalization.json`. Reproduce the published run "
              "with `.venv/bin/python benchmarks/personalization.py` (about an hour on 2 cores).", END]
    return "\n".join(lines) + "\n"


def write_docs(section: str, docs: Path) -> None:
    """Replace this benchmark's marked section of ``docs`` (append it if absent), atomically."""
    from .sections import replace_section

    replace_section(docs, section, BEGIN, END)


# --- command line -------------------------------------------------------------------------------


def add_parser(commands) -> argparse.ArgumentParser:
    bench = commands.add_parser("bench", help="benchmarks to run on this machine")
    which = bench.add_subparsers(dest="bench", required=True)
    p = which.add_parser("personalization", help="the personalization–robustness trade-off on real non-IID text "
                         "(Debian fortunes, one category per device)")
    p.add_argument("--model", help="as for 'device run' (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--adapter", choices=["prompt", "lora"], default="prompt")
    p.add_argument("--prompt-tokens", type=int, default=20)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank (--adapter lora)")
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA modules (--adapter lora; c_attn on GPT-2)")
    p.add_argument("--categories", default="computers,science,people", help="fortunes categories, one per device")
    p.add_argument("--fortunes", type=Path, default=None, help="the fortunes folder (default /usr/share/games/fortunes)")
    p.add_argument("--max-texts", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--fed-steps", type=int, default=15)
    p.add_argument("--fed-lr", type=float, default=3e-3)
    p.add_argument("--adamw-lrs", default="3e-4,3e-3")
    p.add_argument("--sgd-lrs", default="3,30", help="SGD learning rates (empty: sweep AdamW only)")
    p.add_argument("--steps", default="8,32")
    p.add_argument("--l2", default="0,10", help="l2_to_global values")
    p.add_argument("--alphas", default="0,0.25,0.5,0.75,1")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for the JSON, PNG and markdown")
    p.add_argument("--docs", type=Path, help="also write the section into this markdown file (docs/benchmarks.md)")
    p.add_argument("--png-link", help="how the markdown links the PNG (default: its path relative to --docs)")
    return p


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x.strip())


def main(args: argparse.Namespace) -> int:
    import os

    from ..data.fortunes import FORTUNES, load_category

    lrs = {"adamw": _floats(args.adamw_lrs)}
    if _floats(args.sgd_lrs):
        lrs["sgd"] = _floats(args.sgd_lrs)
    config = BenchConfig(model=args.model, adapter=args.adapter, prompt_tokens=args.prompt_tokens, rank=args.rank,
                         targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
                         categories=tuple(c.strip() for c in args.categories.split(",") if c.strip()),
                         max_texts=args.max_texts, seq_len=args.seq_len, batch_size=args.batch_size,
                         eval_blocks=args.eval_blocks, rounds=args.rounds, fed_steps=args.fed_steps, fed_lr=args.fed_lr,
                         lrs=lrs, steps=tuple(int(s) for s in _floats(args.steps)), l2=_floats(args.l2),
                         alphas=_floats(args.alphas), threads=args.threads)
    if len(config.categories) < 2:
        raise ValueError("the benchmark needs at least two categories (devices): robustness is measured on the others'")
    texts = {c: load_category(c, args.fortunes or FORTUNES) for c in config.categories}
    results = run(config, texts)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "personalization.json").write_text(json.dumps(results, indent=1) + "\n")
    png = plot(results, out / "personalization.png")
    link = args.png_link or (os.path.relpath(png, args.docs.parent) if args.docs else png.name)
    section = markdown(results, link)
    (out / "personalization.md").write_text(section)
    if args.docs:
        write_docs(section, args.docs)
    print(section)
    return 0
