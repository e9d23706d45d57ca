"""report.html: one self-contained page (inline CSS and SVG, no scripts, no external resources) that shows what a
run changed: cost before → after, per-layer kept/removed channels, sensitivity curves, latency per engine.

Built only from report.json, plan.json and timings.json, so it says nothing those files do not.
"""

from __future__ import annotations

from html import escape
from typing import Any

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1100px;color:#1d2330;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
.muted{color:#667}.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0}
.card{border:1px solid #dde;border-radius:8px;padding:10px 14px;min-width:150px}
.card b{display:block;font-size:20px}table{border-collapse:collapse;width:100%}
td,th{padding:3px 8px;border-bottom:1px solid #eef;text-align:left;vertical-align:middle}
th{font-weight:600;background:#f6f7fb}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{display:flex;height:12px;min-width:240px;background:#eee;border-radius:3px;overflow:hidden}
.kept{background:#3b7ddd}.removed{background:repeating-linear-gradient(45deg,#e8694a,#e8694a 3px,#f3a08b 3px,
#f3a08b 6px)}.frozen{background:#b9bcc6}code{font-size:12px;background:#f3f4f8;padding:1px 4px;border-radius:3px}
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px -2px 12px;border-radius:2px}
.warnings{border-left:4px solid #e0a020;background:#fdf6e3;padding:6px 12px 6px 28px;margin:14px 0}
"""


def _bar(kept: int, removed: int, frozen: bool) -> str:
    total = max(kept + removed, 1)
    if frozen:
        return '<div class="bar"><div class="frozen" style="width:100%"></div></div>'
    k, r = 100.0 * kept / total, 100.0 * removed / total
    return (f'<div class="bar"><div class="kept" style="width:{k:.2f}%"></div>'
            f'<div class="removed" style="width:{r:.2f}%"></div></div>')


def _layers(plan_doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per producing layer: a group's producer parameters, a layer's weight and bias counted once."""
    rows = []
    for g in plan_doc.get("groups", []):
        producers = [m for m in g["members"] if m.get("role") == "producer"] or g["members"][:1]
        layers: dict[str, str] = {}
        for m in producers:
            layer = m["param"].rsplit(".", 1)[0] if m["param"].endswith((".weight", ".bias")) else m["param"]
            if layer not in layers or m["param"].endswith(".weight"):
                layers[layer] = m["param"]
        for param in layers.values():
            rows.append({"param": param, "group": g["id"], "channels": g["channels"],
                         "removed": len(g["removed"]), "prunable": g["prunable"], "reason": g.get("reason") or ""})
    return rows


def _layer_table(plan_doc: dict[str, Any], alignment: dict[str, Any]) -> str:
    rows = _layers(plan_doc)
    # when the plan moved convs off the CPU runtimes' channel blocks (passes/alignment.py), the groups whose kept
    # count left the largest block's multiples are what --round-to changes
    block = alignment.get("block", 0)

    def note(r: dict[str, Any]) -> str:
        if not r["prunable"]:
            return r["reason"]
        kept = r["channels"] - r["removed"]
        return f"not a multiple of {block} (CPU blocks)" if block and kept % block and \
            not r["channels"] % block else ""

    if not rows:
        return '<p class="muted">No parameter-carrying layers.</p>'
    out = ['<p class="legend"><span class="kept"></span>kept<span class="removed"></span>removed'
           '<span class="frozen"></span>frozen (not prunable)</p>',
           "<table><tr><th>layer (parameter)</th><th>group</th><th>channels</th><th>kept</th><th>removed</th>"
           "<th></th><th>note</th></tr>"]
    for r in rows:
        kept = r["channels"] - r["removed"]
        out.append(f"<tr><td><code>{escape(r['param'])}</code></td><td class=num>{r['group']}</td>"
                   f"<td class=num>{r['channels']}</td><td class=num>{kept}</td><td class=num>{r['removed']}</td>"
                   f"<td>{_bar(kept, r['removed'], not r['prunable'])}</td>"
                   f"<td class=muted>{escape(note(r))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


_PALETTE = ("#3b7ddd", "#e8694a", "#2ca58d", "#9b59b6", "#f1a208", "#34495e", "#d35400", "#16a085", "#c0392b",
            "#7f8c8d")


def _curves_svg(sensitivity: dict[str, Any]) -> str:
    curves = sensitivity.get("curves") or []
    if not curves:
        return ""
    chosen = sensitivity.get("chosen_ratios", {})
    w, h, left, bottom, top, right = 720, 320, 56, 36, 12, 170
    peak = max((max(c["damage"]) for c in curves if c["damage"]), default=1.0)
    peak = peak if peak > 0 else 1.0

    def xy(ratio: float, damage: float) -> tuple[float, float]:
        # a metric's damage can be negative (pruning a group lowered the loss): drawn on the axis
        return (left + ratio * (w - left - right), top + (1 - max(damage, 0.0) / peak) * (h - top - bottom))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" role="img" '
             'aria-label="sensitivity curves">',
             f'<line x1="{left}" y1="{h - bottom}" x2="{w - right}" y2="{h - bottom}" stroke="#889"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - bottom}" stroke="#889"/>']
    for t in range(0, 11, 2):
        x, _ = xy(t / 10, 0)
        parts.append(f'<text x="{x:.1f}" y="{h - bottom + 16}" font-size="11" text-anchor="middle">{t / 10:.1f}'
                     "</text>")
    for t in range(0, 5):
        _, y = xy(0, peak * t / 4)
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{peak * t / 4:.2g}'
                     "</text>")
    parts.append(f'<text x="{(left + w - right) / 2}" y="{h - 4}" font-size="12" text-anchor="middle">'
                 "ratio of the group's channels removed</text>")
    # the most damaging curves get colors and legend entries; the rest are drawn thin and grey
    ranked = sorted(curves, key=lambda c: -max(c["damage"] or [0]))
    for rank, c in enumerate(reversed(ranked)):
        highlighted = rank >= len(ranked) - len(_PALETTE)
        color = _PALETTE[len(ranked) - 1 - rank] if highlighted else "#c5c8d0"
        points = [(0.0, 0.0), *zip(c["ratios"], c["damage"], strict=True)]
        pts = " ".join("{:.1f},{:.1f}".format(*xy(r, d)) for r, d in points)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="{2 if highlighted else 1}" '
                     f'points="{pts}"><title>group {c["group"]}: {escape(", ".join(c["params"][:3]))}</title>'
                     "</polyline>")
        ratio = chosen.get(str(c["group"]))
        if highlighted and ratio:
            x, _ = xy(ratio, 0)
            parts.append(f'<circle cx="{x:.1f}" cy="{h - bottom}" r="3" fill="{color}"/>')
    for i, c in enumerate(ranked[: len(_PALETTE)]):
        y = top + 14 * i + 8
        label = escape(f"g{c['group']} " + (c["params"][0] if c["params"] else "")[:24])
        parts.append(f'<rect x="{w - right + 10}" y="{y - 8}" width="10" height="10" fill="{_PALETTE[i]}"/>'
                     f'<text x="{w - right + 24}" y="{y + 1}" font-size="11">{label}</text>')
    parts.append("</svg>")
    return ("<h2>Sensitivity</h2><p class=muted>Damage (" + escape(sensitivity.get("damage", "")) +
            ") when only one group is pruned, per group; dots: the ratio each of the most sensitive groups got. "
            f"{len(curves)} groups measured on " + escape(sensitivity.get("calibration", "")) + ".</p>"
            + "\n".join(parts))


def _latency(timings: dict[str, Any]) -> str:
    engines = timings.get("engines") or {}
    if not engines:
        return ('<h2>Latency</h2><p class="muted">Not measured in this run (pass <code>--measure-latency</code>).'
                "</p>")
    slowest = max(max(t["before"]["median_ms"], t["after"]["median_ms"]) for t in engines.values()) or 1.0
    rows = ["<table><tr><th>engine</th><th>before (ms)</th><th>after (ms)</th><th>speedup</th>"
            "<th>of FMA peak</th><th></th></tr>"]
    for name, t in sorted(engines.items()):
        b, a = t["before"]["median_ms"], t["after"]["median_ms"]
        used = t.get("fma_peak_fraction")
        of_peak = f"{used['before']:.2f} &rarr; {used['after']:.2f}" if used else "-"
        where = f"<br><span class=muted>on {escape(t['measured_on'])}</span>" if "measured_on" in t else ""
        rows.append(f"<tr><td>{escape(name)}{where}</td><td class=num>{b:.3f}</td><td class=num>{a:.3f}</td>"
                    f"<td class=num>{t['speedup']:.2f}x</td><td class=num>{of_peak}</td><td>"
                    f'<div class="bar" title="before"><div class="frozen" style="width:{100 * b / slowest:.1f}%">'
                    f'</div></div><div class="bar" title="after" style="margin-top:2px"><div class="kept" '
                    f'style="width:{100 * a / slowest:.1f}%"></div></div></td></tr>')
    peak = timings.get("fma_peak") or {}
    peak_note = (f" Of FMA peak: the MACs per second over this machine's measured float32 FMA peak "
                 f"({peak['gflops']:.0f} GFLOP/s, {peak['threads']} threads); near 1, only fewer MACs make it faster."
                 if "gflops" in peak else
                 f" FMA peak not measured: {escape(peak['error'])}." if "error" in peak else "")
    rows.append("</table><p class=muted>Median of timed runs in one process on this machine (or on the RPC device "
                "named) "
                f"(measured {escape(timings.get('created', ''))}); grey: before, blue: after.{peak_note}</p>")
    return "<h2>Latency</h2>" + "\n".join(rows)


def _targets(report: dict[str, Any]) -> str:
    targets = report.get("targets") or {}
    if not targets:
        return ""
    rows = ["<h2>Compiled targets</h2><table><tr><th>target</th><th>library</th><th>pipeline</th>"
            "<th>tuning</th><th>check vs ONNX Runtime</th></tr>"]
    for name, t in sorted(targets.items()):
        tuning = t.get("tuning")
        tuned = f"{tuning['trials_requested']} trials over {tuning['tasks']} tasks" if tuning else "default schedules"
        check = t.get("verification")
        checked = f"max rel. error {check['max_relative_error']:.1e}" if check else "-"
        rows.append(f"<tr><td>{escape(name)}</td><td><code>{escape(t['library'])}</code></td>"
                    f"<td>{escape(t['pipeline'])}</td><td>{escape(tuned)}</td>"
                    f"<td>{checked}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _warnings(warnings: list[str]) -> str:
    """What the CLI printed as warnings (unmatched --ignore/--override, convs off the CPU's channel blocks)."""
    if not warnings:
        return ""
    return '<ul class="warnings">' + "".join(f"<li>{escape(w)}</li>" for w in warnings) + "</ul>"


def render_report(report: dict[str, Any], plan_doc: dict[str, Any], timings: dict[str, Any]) -> str:
    c, p = report["cost"], report["pruning"]
    cards = [
        ("MACs", f"{c['before']['macs']:,} → {c['after']['macs']:,}", f"{c['macs_ratio'] or '-'}x fewer"),
        ("parameters", f"{c['before']['parameters']:,} → {c['after']['parameters']:,}",
         f"{c['parameters_ratio'] or '-'}x fewer"),
        ("channel groups", f"{p['groups']} found", f"{p['prunable']} prunable, {p['frozen']} frozen, "
                                                   f"{p['pruned_groups']} pruned"),
        ("channels removed", f"{p['channels_removed']:,}", f"of {p['channels_total']:,}"),
    ]
    if "verification" in report:
        v = report["verification"]
        cards.append(("verification", f"{v['max_relative_error']:.1e}", "max relative error vs "
                      + ("consumer-zeroed original" if "zeroed" in v["oracle"] else "original")))
    card_html = "".join(f'<div class="card">{escape(t)}<b>{escape(v)}</b><span class="muted">{escape(s)}</span>'
                        "</div>" for t, v, s in cards)
    frozen = "".join(f"<tr><td class=num>{n}</td><td>{escape(reason)}</td></tr>"
                     for reason, n in p["frozen_reasons"].items())
    body = [
        f"<h1>prune-compile report: {escape(report['model']['source'])}</h1>",
        f"<p class=muted>{escape(report['model']['kind'])} model, inputs "
        + escape(", ".join(f"{k} {v}" for k, v in report["input_shapes"].items()))
        + (escape(" (symbolic in the pruned model: " + ", ".join(
            f"{k}[{a}] {s}" for k, dims in report["symbolic_dims"].items() for a, s in dims.items()) + ")")
           if report.get("symbolic_dims") else "")
        + f"; pipeline <code>{escape(report.get('pipeline', ''))}</code>; policy {escape(str(p.get('policy')))}"
        + (f", MACs target {p['target_macs']}x" if p.get("target_macs") else
           f", ratio {p['ratio']}" if p.get("ratio") is not None else "") + "</p>",
        f'<div class="cards">{card_html}</div>',
        _warnings(p.get("warnings", [])),
        _latency(timings),
        _targets(report),
        "<h2>Channels per layer</h2>",
        _layer_table(plan_doc, p.get("channel_alignment", {})),
    ]
    if frozen:
        body += ["<h2>Why groups are frozen</h2><table><tr><th>groups</th><th>reason</th></tr>", frozen, "</table>"]
    if p.get("sensitivity"):
        body.append(_curves_svg(p["sensitivity"]))
    body.append('<p class="muted" style="margin-top:32px">Generated by prune-compile from report.json, plan.json '
                "and timings.json.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>prune-compile report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
