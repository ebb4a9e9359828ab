"""Write an evaluation report as report.json, report.md and report.html (same numbers).

Per test set: a before/after table (rows = metrics, columns = models, the first model
is "before", a last column gives the change from the first to the last model), then a
few examples side by side. Then the generation settings and the timings.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from tunelab.io import atomic_write_text, write_json

_SKIP = {"lang", "bleu_tokenizer", "bertscore_model", "bleu"}  # descriptive strings; bleu = bleu4


def _rows(results: dict[str, dict[str, Any]]) -> list[str]:
    """Metric keys in first-seen order, without descriptive strings."""
    keys: list[str] = []
    for values in results.values():
        for key, value in values.items():
            if key in _SKIP or key in keys:
                continue
            if isinstance(value, (int, float)) or (isinstance(value, str) and value.startswith("unavailable")) \
                    or value is None:
                keys.append(key)
    return keys


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return "—" if value is None else str(value)


def _delta(first: Any, last: Any) -> str:
    if isinstance(first, int) and isinstance(last, int):
        return ""  # counts (rows, tokens): a change is not a result
    if isinstance(first, (int, float)) and isinstance(last, (int, float)) and not isinstance(first, bool):
        return f"{last - first:+.4f}"
    return ""


def table(report: dict[str, Any], test_name: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the before/after table of one test set."""
    results = report["results"][test_name]
    models = list(results)
    header = ["metric", *models] + (["Δ (last − first)"] if len(models) > 1 else [])
    rows = []
    for key in _rows(results):
        values = [results[m].get(key) for m in models]
        row = [key, *map(_fmt, values)]
        if len(models) > 1:
            row.append(_delta(values[0], values[-1]))
        rows.append(row)
    return header, rows


def _md_cell(text: str, limit: int = 0) -> str:
    text = str(text)
    if limit and len(text) > limit:
        text = text[:limit] + "…"
    return text.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown."""
    names = list(report["models"])
    lines = ["# Evaluation report", ""]
    for i, name in enumerate(names):
        role = "before" if i == 0 and len(names) > 1 else "after" if i == len(names) - 1 and len(names) > 1 else ""
        lines.append(f"- `{name}`: {report['models'][name]}" + (f" ({role})" if role else ""))
    for test_name, info in report["test_sets"].items():
        lines += ["", f"## {test_name} ({info['rows']} rows, {info['spec']})", ""]
        header, rows = table(report, test_name)
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        verdict = _pairwise_text(report, test_name)
        if verdict:
            lines += ["", verdict]
        for n, example in enumerate(report.get("examples", {}).get(test_name, []), 1):
            lines += ["", f"### Example {n}", "", f"**Prompt:** {_md_cell(example['prompt'], 500)}", "",
                      f"**Reference:** {_md_cell(example['reference'], 500)}", ""]
            lines += [f"- **{m}:** {_md_cell(text, 500)}" for m, text in example["predictions"].items()]
    lines += ["", "## Settings", "", "```", _settings_text(report), "```", "", "## Timings", ""]
    lines += _timing_lines(report)
    return "\n".join(lines) + "\n"


def _pairwise_text(report: dict[str, Any], test_name: str) -> str:
    """One line on the judge's pairwise verdict for a test set, if there is one."""
    judge = report.get("judge") or {}
    pair = judge.get("pairwise", {}).get(test_name)
    if not pair:
        return ""
    rate = pair["win_rate_a"]
    return (f"Judge `{judge['model']}`, pairwise in both orders: {pair['a']} wins {pair['wins_a']}, "
            f"{pair['b']} wins {pair['wins_b']}, ties {pair['ties']} (win rate of {pair['a']}: "
            f"{_fmt(rate)}; orders disagreed on {pair['inconsistent']}, unparsed {pair['judge_unparsed']}).")


def _settings_text(report: dict[str, Any]) -> str:
    from tunelab.io import dumps

    return dumps({**report["settings"], "metrics": report["metrics"]})


def _timing_lines(report: dict[str, Any]) -> list[str]:
    lines = ["| model | load s | test set | generate s | tokens | tokens/s |", "|---|---|---|---|---|---|"]
    for model, timing in report["timings"].items():
        if not isinstance(timing, dict):
            continue
        for test_name, t in timing.items():
            if isinstance(t, dict):
                lines.append(f"| {model} | {timing['load_s']} | {test_name} | {t['generate_s']} | "
                             f"{t['completion_tokens']} | {t['tokens_per_s']} |")
    lines.append("")
    lines.append(f"Total: {report['timings'].get('total_s')} s")
    return lines


def to_html(report: dict[str, Any]) -> str:
    """The report as one self-contained HTML page."""
    esc = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>tunelab evaluation</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}.ex{white-space:pre-wrap;text-align:left}</style>",
             "</head><body><h1>Evaluation report</h1><ul>"]
    parts += [f"<li><code>{esc(n)}</code>: {esc(str(spec))}</li>" for n, spec in report["models"].items()]
    parts.append("</ul>")
    for test_name, info in report["test_sets"].items():
        parts.append(f"<h2>{esc(test_name)} ({info['rows']} rows, {esc(str(info['spec']))})</h2><table>")
        header, rows = table(report, test_name)
        parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
        if _pairwise_text(report, test_name):
            parts.append(f"<p>{esc(_pairwise_text(report, test_name))}</p>")
        examples = report.get("examples", {}).get(test_name, [])
        if examples:
            models = list(examples[0]["predictions"])
            parts.append("<h3>Examples</h3><table><tr><th>prompt</th><th>reference</th>"
                         + "".join(f"<th>{esc(m)}</th>" for m in models) + "</tr>")
            for ex in examples:
                cells = [ex["prompt"][:500], ex["reference"][:500]] + [ex["predictions"][m][:500] for m in models]
                parts.append("<tr>" + "".join(f"<td class='ex'>{esc(c)}</td>" for c in cells) + "</tr>")
            parts.append("</table>")
    parts.append(f"<h2>Settings</h2><pre>{esc(_settings_text(report))}</pre><h2>Timings</h2>")
    parts.append(f"<pre>{esc(chr(10).join(_timing_lines(report)))}</pre></body></html>")
    return "\n".join(parts) + "\n"


def write_reports(report: dict[str, Any], out: str | Path) -> list[Path]:
    """Write report.json, report.md and report.html into ``out``."""
    out = Path(out)
    return [write_json(out / "report.json", report),
            atomic_write_text(out / "report.md", to_markdown(report)),
            atomic_write_text(out / "report.html", to_html(report))]
