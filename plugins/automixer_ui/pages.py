"""The app's own small HTML pages: the runs index and the page a DAG run shows before its report exists.

Every value is escaped; links are relative to the app's mount point (`base`), so the pages work
under any `[api] base_url`. No script, no external resource.
"""

from __future__ import annotations

from html import escape
from urllib.parse import quote

from automixer_ui.runs import OUTPUTS, RunInfo

STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:left}
th{background:#f4f4f4}.muted{color:#777}code{background:#f4f4f4;padding:0 .2rem}"""


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>{body}</body></html>")


def file_url(base: str, run: RunInfo, rel: str) -> str:
    return f"{base}/runs/{quote(run.name)}/{quote(rel)}"


def output_links(base: str, run: RunInfo) -> str:
    links = [f"<a href=\"{escape(file_url(base, run, rel))}\">{escape(label)}</a>"
             for label, rel in OUTPUTS.items() if run.outputs[label]]
    return " · ".join(links) or "<span class=\"muted\">nothing yet</span>"


def runs_index(base: str, root_label: str, runs: list[RunInfo]) -> str:
    rows = "".join(
        f"<tr data-run=\"{escape(r.name)}\"><td><a href=\"{escape(base)}/runs/{escape(quote(r.name))}/\">"
        f"{escape(r.name)}</a></td><td>{escape(r.report_state)}</td><td>{escape(r.mixture_state)}</td>"
        f"<td>{output_links(base, r)}</td></tr>" for r in runs)
    if not runs:
        return page("AutoMixer runs", f"<p>No run directories under <code>{escape(root_label)}</code> yet.</p>")
    return page("AutoMixer runs", f"<p class=\"muted\">Runs root: <code>{escape(root_label)}</code></p>"
                "<table id=\"runs\"><tr><th>run</th><th>report</th><th>mixture</th><th>outputs</th></tr>"
                f"{rows}</table>")


def run_page(base: str, run: RunInfo) -> str:
    return page(f"AutoMixer run {run.name}",
                f"<p>Report: {escape(run.report_state)}; mixture: {escape(run.mixture_state)}.</p>"
                f"<p id=\"outputs\">{output_links(base, run)}</p><p><a href=\"{escape(base)}/\">All runs</a></p>")


def no_report(base: str, dag_id: str, run_id: str, state: str, reason: str, run: RunInfo | None) -> str:
    """What the DAG run's report tab shows when there is no report to open: why, and what exists so far."""
    body = (f"<p id=\"no-report\">No report for DAG run <code>{escape(run_id)}</code> of <code>{escape(dag_id)}"
            f"</code> (state: <b>{escape(state)}</b>): {escape(reason)}</p>")
    if run is not None:
        body += f"<p>Run directory <code>{escape(run.name)}</code>: {output_links(base, run)}</p>"
    body += f"<p><a href=\"{escape(base)}/\">All AutoMixer runs</a></p>"
    return page("AutoMixer report", body)
