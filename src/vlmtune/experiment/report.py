"""`report.html`: one self-contained page (no network needed to view it) for a grid.

- a sortable table of runs (click a column header);
- train and eval loss curves per run (from each run's metrics.json);
- one bar chart per metric with the 95% bootstrap intervals as error bars;
- the paired comparisons against each baseline.

Plots are drawn by matplotlib and embedded as base64 PNGs; the table sorts with a few lines of
inline JavaScript.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Optional

from ..io import atomic_write_text, read_json
from ..train.rundir import RunDir


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _loss_figure(runs: list[dict[str, Any]], histories: dict[str, dict[str, Any]]) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = False
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for i, r in enumerate(runs):
        h = histories.get(r["run"]) or {}
        color = f"C{i % 10}"
        train = h.get("train_loss_history") or []
        if train:
            ax.plot([p["step"] for p in train], [p["loss"] for p in train], color=color, label=f"{r['run']} train")
            drawn = True
        ev = h.get("eval_loss_history") or []
        if ev:
            ax.plot([p["step"] for p in ev], [p["eval_loss"] for p in ev], color=color, linestyle="--", marker="o", label=f"{r['run']} eval")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _metric_figure(name: str, runs: list[dict[str, Any]]) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(r["run"], r["metrics"][name]) for r in runs if isinstance(r.get("metrics", {}).get(name, {}).get("value"), (int, float))]
    if not rows:
        return None
    labels = [n for n, _ in rows]
    values = [e["value"] for _, e in rows]
    lo = [e["value"] - e["ci95"][0] if e.get("ci95") else 0 for _, e in rows]
    hi = [e["ci95"][1] - e["value"] if e.get("ci95") else 0 for _, e in rows]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 2), 3.4))
    ax.bar(range(len(rows)), values, yerr=[lo, hi], capsize=5, color=[f"C{i % 10}" for i in range(len(rows))])
    ax.set_xticks(range(len(rows)), labels, rotation=20, ha="right", fontsize=8)
    ax.set_title(f"{name} (95% bootstrap interval)")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const tbody = th.closest('table').tBodies[0];
  const asc = th.dataset.dir !== 'asc'; th.dataset.dir = asc ? 'asc' : 'desc';
  const key = tr => { const t = tr.children[col].dataset.v ?? tr.children[col].textContent; const n = parseFloat(t); return isNaN(n) ? t : n; };
  [...tbody.rows].sort((a, b) => { const x = key(a), y = key(b); return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); })
    .forEach(tr => tbody.appendChild(tr));
}));
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
th { background: #f0f0f0; cursor: pointer; } td:first-child, th:first-child { text-align: left; }
.failed { color: #b00; } img { max-width: 100%; } .small { color: #666; font-size: 0.85em; }
"""


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return html.escape(str(x))


def render(summary: dict[str, Any], histories: dict[str, dict[str, Any]]) -> str:
    runs = summary["runs"]
    done = [r for r in runs if r["status"] == "complete"]
    metrics = sorted({k for r in done for k, v in r.get("metrics", {}).items() if isinstance(v.get("value"), (int, float))})
    head = ["run", "status", "trainable params", "train s", "tokens/s", "final train loss", "final eval loss", *metrics]
    rows = []
    for r in runs:
        m = r.get("metrics", {})
        cells = [
            (r["run"], r["run"]), (r["status"], r["status"]),
            ((r.get("parameters") or {}).get("trainable"), None), (r.get("train_seconds"), None), (r.get("tokens_per_second"), None),
            (r.get("final_train_loss"), None), (r.get("final_eval_loss"), None),
            *[((m.get(k) or {}).get("value"), None) for k in metrics],
        ]
        tds = "".join(f'<td data-v="{html.escape(str(v if v is not None else ""))}">{_fmt(v) if t is None else html.escape(str(t))}</td>' for v, t in cells)
        cls = ' class="failed"' if r["status"] == "failed" else ""
        rows.append(f"<tr{cls} data-run=\"{html.escape(r['run'])}\">{tds}</tr>")
        if r["status"] == "failed":
            rows.append(f'<tr class="failed"><td colspan="{len(head)}">{html.escape(str(r.get("error")))}</td></tr>')
    table = f'<table class="sortable" id="runs"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in head)}</tr></thead><tbody>{"".join(rows)}</tbody></table>'

    parts = [f"<h1>{html.escape(summary['experiment_name'])}</h1>",
             f'<p class="small">{summary["n_runs"]} runs, {summary["n_failed"]} failed; intervals: {summary["bootstrap"]["resamples"]}-resample percentile bootstrap over samples (seed {summary["bootstrap"]["seed"]}).</p>',
             "<h2>Runs</h2>", table]
    loss = _loss_figure(done, histories)
    if loss:
        parts += ["<h2>Loss curves</h2>", f'<img alt="loss curves" src="{loss}">']
    if metrics:
        parts.append("<h2>Metrics</h2>")
        for k in metrics:
            fig = _metric_figure(k, done)
            if fig:
                best = summary.get("best", {}).get(k)
                note = f' <span class="small">best: {html.escape(best["run"])} ({_fmt(best["value"])})</span>' if best else ""
                parts += [f"<h3>{html.escape(k)}{note}</h3>", f'<img alt="{html.escape(k)}" src="{fig}">']
    if summary.get("paired_tests"):
        trs = "".join(
            f"<tr><td>{html.escape(t['run'])}</td><td>{html.escape(t['baseline'])}</td><td>{html.escape(t['metric'])}</td>"
            f"<td>{_fmt(t['difference'])}</td><td>[{_fmt(t['ci95'][0])}, {_fmt(t['ci95'][1])}]</td><td>{_fmt(t['p_value'], 3)}</td><td>{t['n']}</td></tr>"
            for t in summary["paired_tests"])
        parts += ["<h2>Paired comparisons (run − baseline)</h2>",
                  f'<table class="sortable" id="paired"><thead><tr><th>run</th><th>baseline</th><th>metric</th><th>difference</th><th>95% interval</th><th>p</th><th>n</th></tr></thead><tbody>{trs}</tbody></table>']
    body = "\n".join(parts)
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{html.escape(summary['experiment_name'])} — vlmtune report</title>"
            f"<style>{_CSS}</style></head><body>{body}<script>{_SORT_JS}</script></body></html>\n")


def write_report(output_dir: str | Path) -> Path:
    """report.html from `output_dir/ablation_summary.json` and the runs' metrics.json."""
    from ..errors import UserError

    out = Path(output_dir)
    summary_path = out / "ablation_summary.json"
    if not summary_path.is_file():
        raise UserError(str(out), "no ablation_summary.json here", "pass the output_dir of a `vlmtune run`")
    summary = read_json(summary_path)
    histories = {}
    for r in summary["runs"]:
        p = RunDir(r["run_dir"]).metrics
        if p.is_file():
            histories[r["run"]] = json.loads(p.read_text(encoding="utf-8"))
    return atomic_write_text(out / "report.html", render(summary, histories))
