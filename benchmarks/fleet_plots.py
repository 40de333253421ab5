"""Plots and the Markdown section of the FedPipe benchmark (``benchmarks/fleet.py``), made from
its results file alone, so ``--stage report`` redraws them without training anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LABELS = {
    "automatic": "(a) edgetune automatic",
    "weakest": "(b) one configuration for the weakest",
    "uniform": "(c) uniform r=8, misfits dropped",
    "centralized": "(d) centralized on the union",
    "local": "(e) local only",
}
COLORS = {"automatic": "tab:blue", "weakest": "tab:orange", "uniform": "tab:red", "centralized": "tab:green",
          "local": "tab:purple"}


def _runs(results: dict, arm: str) -> list[dict]:
    return [r for k, r in sorted(results["runs"].items()) if k.startswith(f"{arm}/")]


def plot_all(results: dict, images: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. everyone's held-out perplexity against simulated time, per arm (mean and range over seeds)
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for arm in ("automatic", "weakest", "uniform"):
        runs = _runs(results, arm)
        if not runs:
            continue
        n = min(len(r["points"]) for r in runs)
        t = np.mean([[p["time_s"] for p in r["points"][:n]] for r in runs], axis=0)
        y = np.array([[p["everyone"] for p in r["points"][:n]] for r in runs])
        ax.plot(t, y.mean(0), marker="o", ms=3, color=COLORS[arm], label=LABELS[arm])
        if len(runs) > 1:
            ax.fill_between(t, y.min(0), y.max(0), color=COLORS[arm], alpha=0.15)
    auto = _runs(results, "automatic")
    central = _runs(results, "centralized")
    if central and auto:
        n = min(len(r["points"]) for r in central)
        t = np.mean([[p["time_s"] for p in r["points"]] for r in auto], axis=0)[:n]
        y = np.array([[p["everyone"] for p in r["points"][:n]] for r in central])
        ax.plot(t, y.mean(0), ls="--", color=COLORS["centralized"], label=LABELS["centralized"] + " (at (a)'s round times)")
    local = _runs(results, "local")
    if local:
        final = np.mean([np.mean([d["points"][-1]["everyone"] for d in r["devices"].values()]) for r in local])
        ax.axhline(final, ls=":", color=COLORS["local"], label=LABELS["local"] + ", final, mean over devices")
    ax.set_xlabel("simulated wall-clock (s)")
    ax.set_ylabel("perplexity on everyone's held-out text")
    fleet = results.get("fleet", {})
    model = "SmolLM2-135M" if fleet.get("model", "default") == "default" else fleet.get("model")
    ax.set_title(f"{model} on a mixed fleet of {len(fleet.get('devices', {}))} devices")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(images / "fleet-curves.png", dpi=110)
    plt.close(fig)

    # 2. per device, final perplexity on its own held-out text
    devices = sorted(results.get("fleet", {}).get("devices", {}))
    if devices and auto:
        fig, ax = plt.subplots(figsize=(9, 4.2))
        arms = [a for a in ("automatic", "weakest", "uniform", "centralized") if _runs(results, a)]
        width = 0.8 / (len(arms) + (1 if local else 0))
        x = np.arange(len(devices))
        for i, arm in enumerate(arms):
            values = [np.mean([r["points"][-1]["devices"][d] for r in _runs(results, arm)]) for d in devices]
            ax.bar(x + i * width, values, width, color=COLORS[arm], label=LABELS[arm])
        if local:
            values = [np.mean([r["devices"][d]["points"][-1]["devices"][d] for r in local]) for d in devices]
            ax.bar(x + len(arms) * width, values, width, color=COLORS["local"], label=LABELS["local"] + " (own adapter)")
        ax.set_xticks(x + 0.4 - width / 2, devices, rotation=20, fontsize=8)
        ax.set_ylabel("final perplexity on its own held-out text")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(images / "fleet-devices.png", dpi=110)
        plt.close(fig)

    # 3. the sweep: perplexity per round, and each device's download per round
    sweep = {k.split("/")[1]: r for k, r in sorted(results["runs"].items()) if k.startswith("sweep/")}
    if sweep:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, run in sweep.items():
            left.plot([p["version"] for p in run["points"]], [p["everyone"] for p in run["points"]], marker=".", label=name)
            trains = [r for r in run["rounds"] if r["kind"] == "train"]
            right.plot(range(1, len(trains) + 1), [r["downlink_bytes_per_device"] / 1e6 for r in trains], marker=".",
                       label=name)
        left.set_xlabel("global version (train rounds)")
        left.set_ylabel("perplexity on everyone's held-out text")
        right.set_xlabel("train round")
        right.set_ylabel("download per device (MB)")
        left.legend(fontsize=7)
        left.grid(alpha=0.3)
        right.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(images / "fleet-sweep.png", dpi=110)
        plt.close(fig)


def markdown(results: dict, heads: dict, spread, coverage: str = "", earlier: dict | None = None,
             defaults: dict | None = None) -> str:
    fleet = results.get("fleet", {})
    m = results.get("machine", {})
    lines = ["<!-- fleet:begin -->", "## The FedPipe benchmark: automatic vs one setting for all (issue 14)", "",
             f"`python benchmarks/fleet.py` (results in `benchmarks/results/fleet.json`; fleet "
             f"`{fleet.get('file', 'profiles/fleets/fedpipe-8.yaml')}`). Run on {m.get('date', '?')}, "
             f"{m.get('cpus', '?')} CPUs, Python {m.get('python', '?')}.", "",
             f"{len(fleet.get('devices', {}))} devices, {fleet.get('rounds')} rounds of {fleet.get('deadline_s'):.0f} s "
             f"(simulated), {_model(fleet)}, each device one Debian `fortunes` category (10 % held out). Every global "
             f"version is scored on {fleet.get('eval_blocks')} held-out blocks of 128 tokens of every device; "
             "\"everyone's\" is the perplexity over all of them together. Times are simulated: each device's "
             "measured compute scaled to its class's speed, plus its traffic over its link "
             "(`docs/simulation.md`).", ""]
    if coverage:
        lines += [coverage, ""]
    lines += ["| device | class | data | training records |", "|---|---|---|---:|"]
    for device, info in sorted(fleet.get("devices", {}).items()):
        lines.append(f"| {device} | {info['class']} | {info['data']} | {info['train_samples']:,} |")
    auto = _runs(results, "automatic")
    if auto:
        first = next((r for r in auto[0]["rounds"] if r["kind"] == "train"), None)
        if first:
            lines += ["", "The plan of (a), round 1 (seed " + str(auto[0]["seed"]) + "):", "",
                      "| device | rank | base | batch | steps | predicted peak | predicted step |",
                      "|---|---:|---|---:|---:|---:|---:|"]
            for device, p in sorted(first["plans"].items()):
                peak = p.get("predicted_peak_bytes")
                step = p.get("predicted_step_s")
                lines.append(f"| {device} | {p['rank']} | {p['quantization']} | {p['batch_size']} | {p['local_steps']} | "
                             f"{peak / 2**20:,.0f} MiB | {step:.2f} s |" if peak else
                             f"| {device} | {p['rank']} | {p['quantization']} | {p['batch_size']} | {p['local_steps']} | | |")
            for device, why in sorted(first["excluded"].items()):
                lines.append(f"| {device} | excluded: {why} | | | | | |")
    rows = list(heads.get("per_seed", {}).values())
    if rows:
        def col(name):
            return [r.get(name) for r in rows]

        speed_b = col("speedup_vs_b")
        a_d = col("a_over_d")
        lines += ["", f"### Headlines (mean and range over {len(rows)} seed(s))", ""]
        lines.append(f"- **Time for (a) to reach (b)'s final perplexity: {spread(speed_b, '{:.1f}')}× faster** "
                     f"(target ≥ 2×: {_verdict(speed_b, lambda v: v >= 2)}). (b) ends at "
                     f"{spread(col('b_final'))} after {spread(col('b_time_s'), '{:.0f}')} s; (a) gets there after "
                     f"{spread(col('a_time_to_b_s'), '{:.0f}')} s.")
        if any(v is not None for v in col("speedup_vs_c")):
            lines.append(f"- Against (c): {spread(col('speedup_vs_c'), '{:.1f}')}× faster to (c)'s final "
                         f"{spread(col('c_final'))}.")
        lines.append(f"- **Final perplexity of (a) relative to (d): {spread(a_d, '{:.3f}')}** (target ≤ 1.05: "
                     f"{_verdict(a_d, lambda v: v <= 1.05)}); (a) {spread(col('a_final'))}, (d) {spread(col('d_final'))}.")
        if any(v is not None for v in col("e_everyone_mean")):
            lines.append(f"- **(a) against (e) on everyone's data: {spread(col('a_over_e_everyone'), '{:.3f}')}** "
                         f"((e) {spread(col('e_everyone_mean'))} averaged over devices); on each device's own data "
                         f"{spread(col('a_over_e_own'), '{:.3f}')} ((a) {spread(col('a_own_mean'))}, (e) "
                         f"{spread(col('e_own_mean'))}).")
    before = list((earlier or {}).get("per_seed", {}).values())
    if before:
        def was(name):
            return [r.get(name) for r in before]

        lines.append(f"- With FedAvg on the server instead (every federated arm as first run, before FedAvgM became "
                     f"the default; same (d) and (e), {len(before)} seed(s)): (a) ends at {spread(was('a_final'))}, "
                     f"reaches (b)'s final perplexity {spread(was('speedup_vs_b'), '{:.1f}')}× faster, "
                     f"(a)/(d) {spread(was('a_over_d'), '{:.3f}')}, (a)/(e) on everyone's data "
                     f"{spread(was('a_over_e_everyone'), '{:.3f}')}.")
    lines += ["", "![perplexity against simulated time](images/fleet-curves.png)", "",
              "| arm | final ppl, everyone's | simulated time | devices answering per train round | tokens per round |",
              "|---|---:|---:|---:|---:|"]
    for arm in ("automatic", "weakest", "uniform", "centralized"):
        runs = _runs(results, arm)
        if not runs:
            continue
        finals = [r["points"][-1]["everyone"] for r in runs]
        if arm == "centralized":
            lines.append(f"| {LABELS[arm]} | {spread(finals)} | | | {runs[0]['tokens_per_round']:,} |")
            continue
        trains = [t for r in runs for t in r["rounds"] if t["kind"] == "train"]
        answering = np.mean([len(t["answered"]) for t in trains])
        tokens = np.mean([t["tokens"] for t in trains])
        lines.append(f"| {LABELS[arm]} | {spread(finals)} | {spread([r['points'][-1]['time_s'] for r in runs], '{:.0f}')} s | "
                     f"{answering:.1f} of {len(fleet.get('devices', {}))} | {tokens:,.0f} |")
    local = _runs(results, "local")
    if local:
        everyone = [np.mean([d["points"][-1]["everyone"] for d in r["devices"].values()]) for r in local]
        lines.append(f"| {LABELS['local']} (mean over devices) | {spread(everyone)} | | 1 each | |")
    if auto:
        lines += ["", "![final perplexity per device](images/fleet-devices.png)", "",
                  "Missed rounds and exclusions (all seeds): " + _missed(results)]
    sweep = {k.split("/")[1]: r for k, r in sorted(results["runs"].items()) if k.startswith("sweep/")}
    if sweep:
        fedit = sweep.get("fedit+fedavg")
        fedit_down = max(r["downlink_bytes_per_device"] for r in fedit["rounds"] if r["kind"] == "train") if fedit else None
        best = min(r["points"][-1]["everyone"] for r in sweep.values())
        lines += ["", f"### Strategies and server optimizers inside (a) (seed {next(iter(sweep.values()))['seed']})", "",
                  "| strategy + server optimizer | final ppl | ÷ best | most download per device and round | ÷ fedit | "
                  "largest truncation error |", "|---|---:|---:|---:|---:|---:|"]
        for name, run in sorted(sweep.items(), key=lambda kv: kv[1]["points"][-1]["everyone"]):
            final = run["points"][-1]["everyone"]
            down = max(r["downlink_bytes_per_device"] for r in run["rounds"] if r["kind"] == "train")
            errors = [r["truncation_error"] for r in run["rounds"] if r.get("truncation_error") is not None]
            lines.append(f"| {name} | {final:.2f} | {final / best:.3f} | {down / 1e6:.2f} MB | "
                         f"{down / fedit_down:.2f}× |" if fedit_down else f"| {name} | {final:.2f} | {final / best:.3f} | "
                         f"{down / 1e6:.2f} MB | |")
            lines[-1] += f" {max(errors):.3f} |" if errors else " |"
        winner = results.get("winner")
        best_name = min(sweep, key=lambda n: sweep[n]["points"][-1]["everyone"])
        if winner:
            ran = f"{winner['strategy']}+{winner['server_optimizer']}"
            why = ("the best of the sweep" if ran == best_name else
                   f"the best of the sweep when the arms ran; {best_name} has since done better")
            lines.append(f"\nThe arms ran (a) with **{winner['strategy']} + {winner['server_optimizer']}**, {why}; "
                         "(b) and (c) with fedit and the same server optimizer.")
        if defaults and defaults.get("agree") is not None:
            d = defaults["default"]
            said = (f"`--strategy auto` → {d['strategy']} for a planned fleet, server optimizer {d['name']} "
                    f"(lr {d['lr']:g}" + (f", β {d['momentum']:g})" if d["name"] != "fedavg" else ")"))
            lines.append(f"The daemon's defaults ({said}) {'are' if defaults['agree'] else '**are not**'} "
                         f"the sweep's best{'.' if defaults['agree'] else ': change them, or say why not.'}")
        lines += ["", "![the sweep](images/fleet-sweep.png)"]
    ablation = [r for k, r in sorted(results["runs"].items()) if k.startswith("ablation/fixed-layout/")]
    server = ""
    if not ablation:  # only the one made with FedAvg on the server: compare it with (a) as run then
        prefix = "fedavg-server/"
        ablation = [r for k, r in sorted(results["runs"].items()) if k.startswith(prefix + "ablation/fixed-layout/")]
        auto = [r for k, r in sorted(results["runs"].items()) if k.startswith(prefix + "automatic/")]
        server = ", both with FedAvg on the server"
    if ablation and auto:
        same = next((r for r in auto if r["seed"] == ablation[0]["seed"]), None)
        if same is not None:
            fixed, chosen = ablation[0]["points"][-1]["everyone"], same["points"][-1]["everyone"]
            lines += ["", f"**The layout.** (a) with the fixed q,v layout instead of the importance layout "
                      f"(seed {ablation[0]['seed']}, no calibration round{server}): final perplexity {fixed:.2f} against "
                      f"{chosen:.2f} ({chosen / fixed:.3f}×), after {ablation[0]['points'][-1]['time_s']:.0f} s "
                      f"against {same['points'][-1]['time_s']:.0f} s."]
    lines.append("<!-- fleet:end -->")
    return "\n".join(lines) + "\n"


def _model(fleet: dict) -> str:
    return "SmolLM2-135M-Instruct" if fleet.get("model", "default") == "default" else f"`{fleet.get('model')}`"


def _verdict(values, ok) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "not measured"
    held = sum(1 for v in values if ok(v))
    return "**met**" if held == len(values) else f"**missed** ({held} of {len(values)} seeds)"


def _missed(results: dict) -> str:
    parts = []
    for arm in ("automatic", "weakest", "uniform"):
        if not _runs(results, arm):
            continue
        missed, excluded = {}, {}
        for run in _runs(results, arm):
            for r in run["rounds"]:
                if r["kind"] != "train":
                    continue
                for d in r["missed"]:
                    missed[d] = missed.get(d, 0) + 1
                for d in r["excluded"]:
                    excluded[d] = excluded.get(d, 0) + 1
        text = ", ".join(f"{d} missed {n}" for d, n in sorted(missed.items())) or "no round missed"
        if excluded:
            text += "; sat out: " + ", ".join(f"{d} {n}×" for d, n in sorted(excluded.items()))
        parts.append(f"{LABELS[arm]}: {text}")
    return "; ".join(parts) + "."
