"""The run report's figures (matplotlib, PNG), each a pure function of :class:`RunData`.

A figure with nothing to show (no perplexity was measured, no update was refused) is not drawn;
``draw_all`` returns what it drew, with a caption, in the order the page shows them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from .data import RunData

#: (file name, caption)
Figure = tuple[str, str]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _whole_numbers(*axes) -> None:
    """Rounds and versions are whole numbers: no ticks between them."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)


def _stacked(ax, labels: list[str], series: list[tuple[list[int], str, str | None]]) -> None:
    """Bars stacked per label: (values, legend label, colour or None) from the bottom up."""
    bottom = [0] * len(labels)
    for values, label, color in series:
        ax.bar(labels, values, bottom=bottom, label=label, color=color)
        bottom = [b + v for b, v in zip(bottom, values)]


def draw_all(run: RunData, out: Path) -> list[Figure]:
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for draw in (quality, participation, traffic, durations, refusals, timeline):
        figure = draw(run, out)
        if figure is not None:
            drawn.append(figure)
    return drawn


def quality(run: RunData, out: Path) -> Figure | None:
    """Training loss and held-out perplexity per round: the fleet's, each device's, robustness."""
    trains = run.train_rounds
    evals = [r for r in run.rounds if r["kind"] == "evaluate"]
    if not trains:
        return None
    plt = _pyplot()
    fig, (loss_ax, ppl_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for device in run.device_ids:
        xs, losses = [], []
        for r in trains:
            d = next((d for d in r["devices"] if d["device_id"] == device and d.get("train_loss") is not None), None)
            if d is not None:
                xs.append(r["round"])
                losses.append(d["train_loss"])
        if xs:
            loss_ax.plot(xs, losses, marker=".", label=device)
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("training loss per device")
    loss_ax.grid(alpha=0.3)
    if len(run.device_ids) <= 12:
        loss_ax.legend(fontsize=7)
    # perplexity of the global adapter each round started from (and the final evaluation)
    points = [(r["base_version"], r.get("global_ppl"), r.get("global_robust_ppl")) for r in trains + evals]
    shown = [(v, p, q) for v, p, q in points if p is not None]
    if shown:
        ppl_ax.plot([v for v, _, _ in shown], [p for _, p, _ in shown], marker="o", color="black",
                    label="fleet (sample-weighted)")
        robust = [(v, q) for v, _, q in shown if q is not None]
        if robust:
            ppl_ax.plot(*zip(*robust), marker="s", ls="--", color="gray", label="others' data (robustness)")
        for device in run.device_ids:
            series = [(r["base_version"], d["global_ppl"]) for r in trains + evals for d in r["devices"]
                      if d["device_id"] == device and d.get("global_ppl") is not None]
            if series:
                ppl_ax.plot(*zip(*series), lw=0.8, alpha=0.6, label=device if len(run.device_ids) <= 8 else None)
        ppl_ax.set_title("held-out perplexity of each global version")
        ppl_ax.legend(fontsize=7)
    else:
        ppl_ax.text(0.5, 0.5, "devices measured no perplexity\n(eval_blocks = 0)", ha="center", va="center")
        ppl_ax.set_title("held-out perplexity")
    ppl_ax.set_xlabel("global adapter version")
    ppl_ax.set_ylabel("perplexity")
    ppl_ax.grid(alpha=0.3)
    _whole_numbers(loss_ax, ppl_ax)
    _save(fig, out / "quality.png")
    return "quality.png", "Training loss per device and round; held-out perplexity of each global version (fleet, robustness, per device)."


def participation(run: RunData, out: Path) -> Figure | None:
    """Per round: devices that answered, were asked but missed, gave up, or were left out."""
    rounds = [r for r in run.rounds if r["kind"] != "finished"]
    if not rounds:
        return None
    plt = _pyplot()
    labels = [f"{r['round']}\n{r['kind']}" for r in rounds]
    answered = [len(r["devices"]) for r in rounds]
    declined = [len(set(r.get("declined", {})) - {d["device_id"] for d in r["devices"]}) for r in rounds]
    missed = [max(0, len(set(r.get("asked", [])) - {d["device_id"] for d in r["devices"]}) - n)
              for r, n in zip(rounds, declined)]
    excluded = [len(r.get("excluded", {})) for r in rounds]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rounds) + 3), 3.8))
    _stacked(ax, labels, [(answered, "answered", "tab:green"), (declined, "gave up (reported)", "tab:orange"),
                          (missed, "missed the deadline", "tab:red"), (excluded, "left out by plan", "tab:gray")])
    ax.set_ylabel("devices")
    ax.set_title("participation per round")
    ax.legend(fontsize=8)
    _save(fig, out / "participation.png")
    return "participation.png", "Who answered each round, who gave up or missed it, and who the plan left out (the reasons are in the tables below)."


def traffic(run: RunData, out: Path) -> Figure | None:
    trains = run.train_rounds
    if not trains:
        return None
    plt = _pyplot()
    xs = [r["round"] for r in trains]
    up = [sum(d.get("bytes_sent", 0) for d in r["devices"]) / max(1, len(r["devices"])) / 1e6 for r in trains]
    down = [r.get("downlink_bytes", 0) / 1e6 for r in trains]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(xs, up, marker="o", label="up: a device's update (mean)")
    ax.plot(xs, down, marker="s", label="down: global adapter + task, per device")
    ax.set_xlabel("round")
    ax.set_ylabel("MB per device")
    ax.set_title("bytes per device and round")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _whole_numbers(ax)
    _save(fig, out / "traffic.png")
    return "traffic.png", "Bytes each device sent (its update, as the aggregator received it) and downloaded (the global adapter it trained on, and the task), per round."


def durations(run: RunData, out: Path) -> Figure | None:
    rounds = [r for r in run.rounds if r["kind"] != "finished"]
    if not rounds:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    colors = ["tab:red" if r["status"] == "failed" else "tab:blue" for r in rounds]
    ax.bar([f"{r['round']}" for r in rounds], [r["duration_s"] for r in rounds], color=colors)
    deadline = (run.simulation or {}).get("deadline_s")
    if deadline:
        ax.axhline(deadline, ls="--", color="gray", label=f"deadline {deadline:.0f} s")
        ax.legend(fontsize=8)
    ax.set_xlabel("round (red: failed)")
    ax.set_ylabel("seconds" + (" (simulated)" if run.simulation else ""))
    ax.set_title("round duration")
    _save(fig, out / "durations.png")
    return "durations.png", "How long each round was open: until every asked device answered, or the deadline."


def refusals(run: RunData, out: Path) -> Figure | None:
    totals = Counter()
    for r in run.rounds:
        totals.update(r.get("dropped", {}))
    if not totals:
        return None
    plt = _pyplot()
    reasons = sorted(totals)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(run.rounds) + 3), 3.6))
    _stacked(ax, [str(r["round"]) for r in run.rounds],
             [([r.get("dropped", {}).get(reason, 0) for r in run.rounds], reason, None) for reason in reasons])
    ax.set_xlabel("round")
    ax.set_ylabel("messages")
    ax.set_title("refused messages by reason")
    ax.legend(fontsize=7)
    _save(fig, out / "refusals.png")
    return "refusals.png", "Messages the aggregator refused in each round, by reason (docs/security.md lists them)."


def timeline(run: RunData, out: Path) -> Figure | None:
    """A simulation's devices over simulated time: compute blocks and uploads, round by round."""
    sim = run.simulation
    if not sim or not sim.get("devices"):
        return None
    plt = _pyplot()
    devices = sorted(sim["devices"])
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(devices) + 1.8))
    for row, device in enumerate(devices):
        info = sim["devices"][device]
        ax.broken_barh([(b["start"], max(b["seconds"], 1e-3)) for b in info["compute"]], (row - 0.35, 0.7),
                       color="tab:blue", label="compute" if row == 0 else None)
        sends = [(s["start"], max(s["arrives"] - s["start"], 1e-3)) for s in info["sent"] if s["topic"] == "update"]
        ax.broken_barh(sends, (row - 0.35, 0.7), color="tab:orange", label="upload" if row == 0 else None)
    epoch = sim.get("epoch", min((r["started_at"] for r in run.rounds), default=0.0))
    for r in run.rounds:
        ax.axvline(r["started_at"] - epoch + r["duration_s"], color="gray", lw=0.6, ls=":")
    ax.set_yticks(range(len(devices)), [f"{d} ({sim['devices'][d]['class']})" for d in devices], fontsize=7)
    ax.set_xlabel("simulated time (s); dotted: a round closes")
    ax.set_title("what each simulated device did when")
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, out / "timeline.png")
    return "timeline.png", "Each simulated device's compute (blue) and update uploads (orange) in simulated time; a round closes at each dotted line."
