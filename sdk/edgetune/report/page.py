"""The run report: one offline HTML page (no scripts, no remote anything) beside its PNGs.

``edgetune report STATE_DIR --out DIR`` writes ``DIR/index.html``; the demo and the simulator
write one at the end of their runs. Every value on the page comes from the state dir, escaped:
device ids, reasons and notes were sent by devices and are shown as text, never as markup.
"""

from __future__ import annotations

import html
from collections import Counter
from pathlib import Path

from ..adapters.registry import adapter_kind, spec_from_dict
from ..atomic import atomic_write_bytes
from .data import RunData, load_run
from .plots import draw_all

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; } .muted { color: #777; }
"""


def write_report(state_dir: str | Path, out: str | Path) -> Path:
    """Draw the figures and write ``out/index.html``; returns its path."""
    run = load_run(state_dir)
    out = Path(out)
    figures = draw_all(run, out)
    page = render(run, figures)
    atomic_write_bytes(out / "index.html", page.encode("utf-8"))
    (out / "index.html").chmod(0o644)  # (a page for people: readable like its images)
    return out / "index.html"


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _table(header: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td class=\"n\">{_e(c)}</td>" if i in numeric else f"<td>{_e(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def render(run: RunData, figures: list[tuple[str, str]]) -> str:
    trains = run.train_rounds
    final = next((r for r in reversed(run.rounds) if r.get("global_ppl") is not None), None)
    parts = [f"<h1>edgetune run report: fleet {_e(run.fleet or '?')}</h1>",
             f"<p>{len(run.rounds)} rounds ({len(trains)} train), {len(run.device_ids)} devices, global adapter "
             f"v{_e(run.global_version)}, strategy {_e(run.strategy or '?')}, adapter {_e(_adapter(run.adapter))}"
             + (f"; final held-out perplexity {final['global_ppl']:.2f} (global v{_e(final['base_version'])})" if final else "")
             + (", simulated" if run.simulation else "") + f". State dir: <code>{_e(run.state_dir)}</code>.</p>"]
    parts.append("<h2>Devices and their plans</h2>" + _devices(run))
    for name, caption in figures:
        parts.append(f"<figure><img src=\"{_e(name)}\" alt=\"{_e(caption)}\"><figcaption>{_e(caption)}</figcaption></figure>")
        if name == "participation.png":
            parts.append(_participation(run))
        if name == "refusals.png":
            parts.append(_refusals(run))
    parts.append("<h2>Rounds</h2>" + _rounds(run))
    served = _serving(run)
    if served:
        parts.append("<h2>What the fleet served</h2><p class=\"muted\">the validation gate's verdicts and the "
                     "staged rollout's steps (docs/operations.md)</p>" + served)
    body = "\n".join(parts)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>edgetune report: "
            f"{_e(run.fleet)}</title><style>{_STYLE}</style></head><body>\n{body}\n</body></html>\n")


def _adapter(adapter: dict) -> str:
    if not adapter:
        return "?"
    try:
        spec = spec_from_dict(adapter)
    except (TypeError, ValueError) as exc:  # (a state dir of a kind or version this SDK does not know)
        return f"{adapter.get('kind', '?')} adapter ({exc})"
    return adapter_kind(spec).describe(spec)


def _devices(run: RunData) -> str:
    """Each device's profile and the plan of each train round it was in (once per change)."""
    rows = []
    for device in run.device_ids:
        profile = run.profiles.get(device)
        what = (f"{profile['name']}: {profile['memory_bytes'] / 2**30:.1f} GiB, "
                + ", ".join(f"{k} {v:g} GFLOP/s" for k, v in profile["gflops"].items())
                + (f", uplink {profile['uplink_mbps']:g} Mbit/s" if profile.get("uplink_mbps") else "")
                if profile else "no profile (uniform settings)")
        plans, last = [], None
        for r in run.rounds:
            if r["kind"] not in ("train", "calibrate"):
                continue  # (what a train round plans is what matters; an evaluation only scores)
            plan = r.get("plans", {}).get(device)
            why = r.get("excluded", {}).get(device)
            text = (f"rank {plan['rank']}, {plan['quantization']}, batch {plan['batch_size']}, {plan['local_steps']} steps"
                    + (", checkpointing" if plan.get("gradient_checkpointing") else "")
                    + (f" (predicted {plan['predicted_peak_bytes'] / 2**20:,.0f} MiB, {plan['predicted_step_s']:.2f} s/step)"
                       if plan.get("predicted_peak_bytes") else "")) if plan else (f"left out: {why}" if why else None)
            if text and text != last:
                plans.append(f"from round {r['round']}: {text}")
                last = text
        rows.append([device, what, "; ".join(plans) or "the fleet's uniform settings"])
    return _table(["device", "profile", "plan"], rows)


def _participation(run: RunData) -> str:
    rows = []
    for r in run.rounds:
        answered = {d["device_id"] for d in r["devices"]}
        declined = r.get("declined", {})
        missed = sorted(set(r.get("asked", [])) - answered - set(declined))
        reasons = [f"{d}: {why}" for d, why in sorted(r.get("excluded", {}).items())]
        reasons += [f"{d} gave up: {why}" for d, why in sorted(declined.items())]
        busy = r.get("busy", {})
        reasons += [f"{d} {why}" for d, why in sorted(busy.items())]
        reasons += [f"{d} missed the deadline" + (" (paused by its training policy)" if d in busy else "")
                    for d in missed]
        rows.append([r["round"], r["kind"], r["status"], len(answered), len(r.get("asked", [])), "; ".join(reasons) or "—"])
    return _table(["round", "kind", "status", "answered", "asked", "left out, gave up, missed (why)"], rows, {0, 3, 4})


def _refusals(run: RunData) -> str:
    totals = Counter()
    for r in run.rounds:
        totals.update(r.get("dropped", {}))
    return _table(["reason", "messages"], [[reason, n] for reason, n in totals.most_common()], {1})


def _rounds(run: RunData) -> str:
    rows = []
    for r in run.rounds:
        up = sum(d.get("bytes_sent", 0) for d in r["devices"])
        rows.append([r["round"], r["kind"], r["status"], r.get("new_version") if r.get("new_version") is not None else "",
                     f"{r['duration_s']:.1f} s", len(r["devices"]), _mb(up), _mb(r.get("downlink_bytes", 0)),
                     f"{r['global_ppl']:.2f}" if r.get("global_ppl") is not None else "",
                     f"{r['truncation_error']:.3g}" if r.get("truncation_error") else "", r.get("note", "")])
    return _table(["round", "kind", "status", "new version", "duration", "results", "up (all)", "down (each)",
                   "ppl of its base", "truncation", "note"], rows, {0, 3, 4, 5, 6, 7, 8, 9})


def _serving(run: RunData) -> str:
    """The gate's verdicts and the rollout's steps, round by round ("" if there were none)."""
    rows = []
    for r in run.rounds:
        gate = r.get("gate")
        if gate:
            verdict = {True: "passed", False: "refused", None: "not judged"}[gate.get("passed")]
            rows.append([r["round"], f"gate: {verdict}", f"v{gate.get('candidate')}", gate.get("reason", "")])
        for step in r.get("rollout", []):
            who = f" (canaries: {', '.join(step['canaries'])})" if step.get("canaries") else ""
            rows.append([r["round"], step.get("step", ""), f"v{step.get('version')}", f"{step.get('why', '')}{who}"])
    return _table(["round", "step", "version", "why"], rows, {0}) if rows else ""


__all__ = ["render", "write_report"]
