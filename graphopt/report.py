"""The run report: one JSON-able structure rendered as JSON, a self-contained HTML page, or rich tables.

The JSON keys are documented in the README ("Report format") and versioned by ``schema``; add keys, never
rename them. Rendering for the terminal builds rich objects here, but only ``cli.py`` prints them.
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from graphopt.stats import format_bytes, format_count

SCHEMA = "graphopt.report/1"


class Report:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @classmethod
    def new(cls, command: str) -> Report:
        from graphopt import __version__

        return cls({
            "schema": SCHEMA,
            "graphopt_version": __version__,
            "command": command,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "input": None,
            "output": None,
            "passes": [],
            "validation": None,
            "gates": [],
            "passed": True,
            "exit_code": 0,
            "message": None,
        })

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])

    def to_json(self) -> str:
        return json.dumps(self.data, indent=2, default=_json_default)

    def write_json(self, path: str | os.PathLike) -> None:
        _write_text_atomic(Path(path), self.to_json() + "\n")

    def write_html(self, path: str | os.PathLike) -> None:
        _write_text_atomic(Path(path), render_html(self.data))

    def write_markdown(self, path: str | os.PathLike) -> None:
        _write_text_atomic(Path(path), render_markdown(self.data))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- terminal (rich renderables, not printed here)

def rich_renderables(data: dict[str, Any]) -> list[Any]:
    from rich.table import Table

    out: list[Any] = []
    if data.get("passes"):
        t = Table(title="Passes", title_justify="left")
        for col in ("pass", "time", "nodes", "parameters", "weights", "FLOPs/sample"):
            t.add_column(col, justify="left" if col == "pass" else "right")
        first = data["passes"][0]["before"]
        t.add_row("(input)", "", str(first["nodes"]), format_count(first["parameters"]),
                  format_bytes(first["bytes"]), format_count(first["flops"]))
        for rec in data["passes"]:
            a = rec["after"]
            t.add_row(rec["name"], f"{rec['seconds']:.2f}s", str(a["nodes"]), format_count(a["parameters"]),
                      format_bytes(a["bytes"]), format_count(a["flops"]) + ("" if a.get("flops_exact", True) else "~"))
        out.append(t)
    v = data.get("validation")
    if v:
        t = Table(title="Validation", title_justify="left", show_header=False)
        t.add_column("figure")
        t.add_column("value", justify="right")
        ag = v.get("agreement")
        if ag:
            t.add_row("samples compared", str(ag["samples"]))
            t.add_row("max abs diff", f"{ag['max_abs_diff']:.3g}")
            t.add_row("mean cosine", f"{ag['mean_cosine']:.6f}")
            if ag.get("top1_agreement") is not None:
                t.add_row("top-1 agreement", f"{100 * ag['top1_agreement']:.2f}%")
            if ag.get("reference_accuracy") is not None:
                t.add_row("accuracy (input → output)",
                          f"{100 * ag['reference_accuracy']:.2f}% → {100 * ag['candidate_accuracy']:.2f}%")
        if v.get("size"):
            s = v["size"]
            t.add_row("size (input → output)",
                      f"{format_bytes(s['reference_bytes'])} → {format_bytes(s['candidate_bytes'])} "
                      f"({s['ratio']:.3f}×)")
        out.append(t)
        if v.get("latency"):
            lt = Table(title="Latency (ONNX Runtime, interleaved runs)", title_justify="left")
            for col in ("provider", "batch", "input p50", "input p90", "output p50", "output p90", "ratio"):
                lt.add_column(col, justify="right")
            for lat in v["latency"]:
                r, c = lat["reference_ms"], lat["candidate_ms"]
                lt.add_row(lat["provider"], str(lat["batch"]), f"{r['p50_ms']:.3f} ms", f"{r['p90_ms']:.3f} ms",
                           f"{c['p50_ms']:.3f} ms", f"{c['p90_ms']:.3f} ms", f"{lat['ratio']:.3f}×")
            out.append(lt)
    if data.get("gates"):
        gt = Table(title="Gates", title_justify="left")
        for col in ("gate", "limit", "value", "result"):
            gt.add_column(col)
        for g in data["gates"]:
            value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
            gt.add_row(g["name"], f"{g['limit']:g}", value,
                       "[green]pass[/green]" if g["passed"] else "[red]FAIL[/red]")
        out.append(gt)
    return out


# ---------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:980px;color:#1d2430}
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #dde;padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}td,th{border:1px solid #dde;padding:.25rem .6rem;text-align:right}
th{background:#f3f5f9}td:first-child,th:first-child{text-align:left}.ok{color:#137333;font-weight:600}.bad{color:#b3261e;font-weight:600}
.verdict{font-size:1.1rem;padding:.6rem 1rem;border-radius:6px;display:inline-block}
.verdict.ok{background:#e6f4ea}.verdict.bad{background:#fce8e6}code{background:#f3f5f9;padding:0 .2rem}
figure{margin:1rem 0}figcaption{font-size:.85rem;color:#555}
"""


def _svg_bars(title: str, labels: list[str], series: list[tuple[str, list[float], str]], unit: str) -> str:
    """A grouped horizontal bar chart as inline SVG (no scripts, no external assets)."""
    if not labels:
        return ""
    bar_h, gap, left, width = 16, 10, 190, 520
    n_series = len(series)
    group_h = n_series * bar_h + gap
    height = len(labels) * group_h + 40
    vmax = max((v for _, vals, _ in series for v in vals if v is not None), default=1.0) or 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 120}" height="{height}" '
             f'role="img" aria-label="{html.escape(title)}">']
    for i, label in enumerate(labels):
        y0 = 10 + i * group_h
        parts.append(f'<text x="{left - 8}" y="{y0 + n_series * bar_h / 2 + 4}" text-anchor="end" '
                     f'font-size="12">{html.escape(label)}</text>')
        for j, (_, vals, color) in enumerate(series):
            v = vals[i]
            if v is None:
                continue
            w = max(1.0, width * v / vmax)
            y = y0 + j * bar_h
            parts.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h - 2}" fill="{color}"/>')
            parts.append(f'<text x="{left + w + 4:.1f}" y="{y + bar_h - 5}" font-size="11">{v:.4g} {unit}</text>')
    ly = height - 14
    for j, (name, _, color) in enumerate(series):
        parts.append(f'<rect x="{left + j * 150}" y="{ly - 9}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{left + j * 150 + 14}" y="{ly}" font-size="11">{html.escape(name)}</text>')
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}<figcaption>{html.escape(title)}</figcaption></figure>"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _details_html(details: dict[str, Any]) -> str:
    out = []
    for key, value in details.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            headers = list(value[0].keys())
            rows = [[html.escape(_fmt(r.get(h))) for h in headers] for r in value]
            out.append(f"<h4>{html.escape(key)}</h4>" + _table(headers, rows))
        elif isinstance(value, dict) and value and all(isinstance(v, list) for v in value.values()):
            out.append(_curve_svg(key, value))
        else:
            out.append(f"<p><b>{html.escape(key)}</b>: {html.escape(_fmt(value))}</p>")
    return "".join(out)


def _curve_svg(title: str, curves: dict[str, list[float]]) -> str:
    """A line chart (e.g. a training curve) as inline SVG."""
    width, height, pad = 520, 180, 30
    colors = ["#3366cc", "#dc3912", "#109618", "#ff9900"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 2 * pad}" height="{height + 2 * pad}">']
    for k, (name, ys) in enumerate(curves.items()):
        ys = [y for y in ys if y is not None]
        if len(ys) < 1:
            continue
        lo, hi = min(ys), max(ys)
        span = (hi - lo) or 1.0
        pts = " ".join(f"{pad + width * i / max(1, len(ys) - 1):.1f},{pad + height - height * (y - lo) / span:.1f}"
                       for i, y in enumerate(ys))
        parts.append(f'<polyline fill="none" stroke="{colors[k % 4]}" stroke-width="2" points="{pts}"/>')
        parts.append(f'<text x="{pad + 5}" y="{pad - 8 + 0 * k}" dx="{k * 160}" font-size="11" '
                     f'fill="{colors[k % 4]}">{html.escape(name)} ({lo:.4g}..{hi:.4g})</text>')
    parts.append("</svg>")
    return f"<figure>{''.join(parts)}<figcaption>{html.escape(title)}</figcaption></figure>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, default=_json_default)
    return "" if v is None else str(v)


def render_html(data: dict[str, Any]) -> str:
    e = html.escape
    ok = data.get("passed", True)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>graphopt report</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>graphopt report</h1><p><code>{e(data.get('command') or '')}</code><br>"
             f"graphopt {e(str(data.get('graphopt_version')))} · {e(str(data.get('created')))}</p>",
             f"<p class='verdict {'ok' if ok else 'bad'}'>{'PASSED' if ok else 'FAILED'} "
             f"(exit code {data.get('exit_code')})" + (f" — {e(data['message'])}" if data.get("message") else "")
             + "</p>"]
    inp, outp = data.get("input") or {}, data.get("output") or {}
    parts.append(f"<p>Input: <code>{e(str(inp.get('path')))}</code> · Output: <code>{e(str(outp.get('path')))}</code>"
                 + ("" if outp.get("written", True) else " (not written)") + "</p>")
    passes = data.get("passes") or []
    if passes:
        rows = [["(input)", "", passes[0]["before"]["nodes"], format_count(passes[0]["before"]["parameters"]),
                 format_bytes(passes[0]["before"]["bytes"]), format_count(passes[0]["before"]["flops"])]]
        for rec in passes:
            a = rec["after"]
            rows.append([e(rec["name"]), f"{rec['seconds']:.2f} s", a["nodes"], format_count(a["parameters"]),
                         format_bytes(a["bytes"]), format_count(a["flops"])])
        parts.append("<h2>Passes</h2>" + _table(["pass", "time", "nodes", "parameters", "weights", "FLOPs/sample"], rows))
        labels = ["(input)"] + [r["name"] for r in passes]
        sizes = [passes[0]["before"]["bytes"] / 2**20] + [r["after"]["bytes"] / 2**20 for r in passes]
        flops = [passes[0]["before"]["flops"]] + [r["after"]["flops"] for r in passes]
        parts.append(_svg_bars("Weight size after each stage", labels, [("weights", sizes, "#3366cc")], "MiB"))
        if all(f is not None for f in flops):
            parts.append(_svg_bars("FLOPs per sample after each stage", labels,
                                   [("FLOPs", [f / 1e6 for f in flops], "#109618")], "MFLOP"))
        for rec in passes:
            if rec.get("details") or rec.get("check"):
                parts.append(f"<h3>{e(rec['name'])}</h3>")
                parts.append(f"<p>Options: <code>{e(json.dumps(rec.get('options'), default=_json_default))}</code></p>")
                if rec.get("check"):
                    parts.append(_details_html({"numeric check": rec["check"]}))
                parts.append(_details_html(rec.get("details") or {}))
    v = data.get("validation")
    if v:
        parts.append("<h2>Validation</h2>")
        ag = v.get("agreement")
        rows = []
        if ag:
            rows += [["samples compared", ag["samples"]], ["max abs diff", f"{ag['max_abs_diff']:.3g}"],
                     ["mean cosine", f"{ag['mean_cosine']:.6f}"]]
            if ag.get("top1_agreement") is not None:
                rows.append(["top-1 agreement", f"{100 * ag['top1_agreement']:.2f}%"])
            if ag.get("reference_accuracy") is not None:
                rows.append(["accuracy input → output",
                             f"{100 * ag['reference_accuracy']:.2f}% → {100 * ag['candidate_accuracy']:.2f}%"])
        if v.get("size"):
            s = v["size"]
            rows.append(["size input → output", f"{format_bytes(s['reference_bytes'])} → "
                         f"{format_bytes(s['candidate_bytes'])} ({s['ratio']:.3f}×)"])
        parts.append(_table(["figure", "value"], rows))
        if ag and ag.get("reference_accuracy") is not None:
            parts.append(_svg_bars("Accuracy", ["input", "output"], [("accuracy", [
                100 * ag["reference_accuracy"], 100 * ag["candidate_accuracy"]], "#ff9900")], "%"))
        if v.get("latency"):
            lat = v["latency"]
            parts.append(_table(["provider", "batch", "input p50 ms", "input p90 ms", "output p50 ms",
                                 "output p90 ms", "ratio"],
                                [[x["provider"], x["batch"], f"{x['reference_ms']['p50_ms']:.3f}",
                                  f"{x['reference_ms']['p90_ms']:.3f}", f"{x['candidate_ms']['p50_ms']:.3f}",
                                  f"{x['candidate_ms']['p90_ms']:.3f}", f"{x['ratio']:.3f}×"] for x in lat]))
            parts.append(_svg_bars("Latency p50 (ms), interleaved runs in ONNX Runtime",
                                   [f"{x['provider']} b{x['batch']}" for x in lat],
                                   [("input", [x["reference_ms"]["p50_ms"] for x in lat], "#999999"),
                                    ("output", [x["candidate_ms"]["p50_ms"] for x in lat], "#3366cc")], "ms"))
    if data.get("gates"):
        rows = [[e(g["name"]), f"{g['limit']:g}", "n/a" if g["value"] is None else f"{g['value']:.3f}",
                 "<span class='ok'>pass</span>" if g["passed"] else "<span class='bad'>FAIL</span>"]
                for g in data["gates"]]
        parts.append("<h2>Gates</h2>" + _table(["gate", "limit", "value", "result"], rows))
    parts.append("</body></html>\n")
    return "".join(parts)


# ---------------------------------------------------------------- Markdown

def render_markdown(data: dict[str, Any]) -> str:
    """The report as Markdown tables (for pull requests and CI summaries)."""
    ok = data.get("passed", True)
    lines = [f"# graphopt report: {'PASSED' if ok else 'FAILED'} (exit code {data.get('exit_code')})", "",
             f"`{data.get('command')}` · graphopt {data.get('graphopt_version')} · {data.get('created')}", ""]
    if data.get("message"):
        lines += [f"**{data['message']}**", ""]
    passes = data.get("passes") or []
    if passes:
        lines += ["| pass | time | nodes | parameters | weights | FLOPs/sample |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
        b = passes[0]["before"]
        lines.append(f"| (input) | | {b['nodes']} | {format_count(b['parameters'])} | {format_bytes(b['bytes'])} | "
                     f"{format_count(b['flops'])} |")
        for rec in passes:
            a = rec["after"]
            lines.append(f"| {rec['name']} | {rec['seconds']:.2f} s | {a['nodes']} | {format_count(a['parameters'])} | "
                         f"{format_bytes(a['bytes'])} | {format_count(a['flops'])} |")
        lines.append("")
    v = data.get("validation")
    if v:
        ag = v.get("agreement") or {}
        lines += ["| figure | value |", "| --- | ---: |", f"| samples compared | {ag.get('samples')} |",
                  f"| max abs diff | {ag.get('max_abs_diff', 0):.3g} |", f"| mean cosine | {ag.get('mean_cosine', 0):.6f} |"]
        if ag.get("top1_agreement") is not None:
            lines.append(f"| top-1 agreement | {100 * ag['top1_agreement']:.2f}% |")
        if ag.get("reference_accuracy") is not None:
            lines.append(f"| accuracy input → output | {100 * ag['reference_accuracy']:.2f}% → "
                         f"{100 * ag['candidate_accuracy']:.2f}% |")
        if v.get("size"):
            lines.append(f"| size ratio | {v['size']['ratio']:.3f}× |")
        lines.append("")
        if v.get("latency"):
            lines += ["| provider | batch | input p50 ms | output p50 ms | ratio |", "| --- | ---: | ---: | ---: | ---: |"]
            for x in v["latency"]:
                lines.append(f"| {x['provider']} | {x['batch']} | {x['reference_ms']['p50_ms']:.3f} | "
                             f"{x['candidate_ms']['p50_ms']:.3f} | {x['ratio']:.3f}× |")
            lines.append("")
    if data.get("gates"):
        lines += ["| gate | limit | value | result |", "| --- | ---: | ---: | --- |"]
        for g in data["gates"]:
            value = "n/a" if g["value"] is None else f"{g['value']:.3f}"
            lines.append(f"| {g['name']} | {g['limit']:g} | {value} | {'pass' if g['passed'] else 'FAIL'} |")
    return "\n".join(lines).rstrip() + "\n"
