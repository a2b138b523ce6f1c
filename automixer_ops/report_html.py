"""`report/index.html`: the run on one self-contained page, and its plots as `report/*.png`.

The page needs nothing but itself: every plot is embedded as a `data:image/png;base64,` URI (the same bytes
as the PNG written beside it), the CSS is inline, there is no script and no URL that leaves the run. Links
to the run's outputs are relative to report/ (`../automixer.duckdb`), so they work from file:// and from a
server that serves the runs root in the same layout. Tables are HTML tables whose numeric cells carry the
exact value in `data-value` (the visible text is rounded); the group weights are `<table id="weights">`,
one `<tr data-group>` per group, the weight in `<td class="weight" data-value="repr(float)">`.

Writing order: every PNG first, then index.html (atomically), then PNGs of an earlier report that this one
no longer has are removed. docs/report.md says what each section shows and how it is computed.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from automixer_ops import report_plots as plots
from automixer_ops.config import Config
from automixer_ops.report_data import ExperimentData, ReportData, collect
from automixer_ops.rundir import RunDir, atomic_write, atomic_write_text
from automixer_ops.samplers import Selection

INDEX = "index.html"
MAX_SHARD_ROWS = 300  # above this, the scoring section keeps its per-sampler table and plot only

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 0 1.2em 3em; color: #222; }
h1 { margin-top: 1em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
nav a { margin-right: .9em; } code { background: #f3f3f3; padding: 0 .25em; }
table { border-collapse: collapse; margin: .6em 0 1em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: .25em .55em; vertical-align: top; }
th { background: #f5f5f5; text-align: left; } td.num, td.weight { text-align: right; font-variant-numeric: tabular-nums; }
tr.fail td { background: #fde8e8; } .note { color: #555; font-size: 13px; max-width: 60em; }
figure { margin: .8em 0 1.2em; } figcaption { color: #555; font-size: 13px; max-width: 60em; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.bad { color: #b00020; font-weight: 600; } .ok { color: #1b6e20; font-weight: 600; }
"""


@dataclass
class Figure:
    id: str  # the <img> id, and report/<id>.png
    alt: str
    caption: str
    png: bytes

    @property
    def file(self) -> str:
        return f"{self.id}.png"


def write_html_report(cfg: Config, info: dict, checks: list[dict], selection: Selection,
                      experiment: ExperimentData | None = None) -> Path:
    """Collect the run's numbers, write the plots, then index.html; returns its path."""
    run = RunDir(cfg.run_dir)
    data = collect(cfg, info, checks, selection, experiment)
    figures = render_figures(data)
    for f in figures:
        atomic_write(run.report / f.file, lambda tmp, png=f.png: tmp.write_bytes(png))
    path = run.report / INDEX
    atomic_write_text(path, render_page(data, {f.id: f for f in figures}))
    current = {f.file for f in figures}
    for old in run.report.glob("*.png"):  # plots of an earlier report (a sampler or experiment gone since)
        if old.name not in current:
            old.unlink(missing_ok=True)
    return path


# ---------------------------------------------------------------- figures

def render_figures(d: ReportData) -> list[Figure]:
    groups = {s.step: s.group for s in d.samplers}
    out = []
    if d.benchmark:
        out.append(Figure("benchmark-heatmap", "Benchmark heatmap: each task's metric at each proxy checkpoint, "
                          "the selected best step boxed", "Each task's headline metric at every checkpoint "
                          "(colour scaled per task; red box: the best step select chose).",
                          _heatmap_png(d.benchmark, d.selection)))
    for h in d.histograms:
        out.append(Figure(f"utility-step-{h.step}", f"Histogram of sampler step {h.step}'s document utilities with "
                          f"the threshold tau {h.tau:.4g} marked",
                          f"Sampler step {h.step}: utilities of the scored documents; documents at or above τ "
                          "(red line) form its group. The x range is the 0.5th..99.5th percentile (widened to "
                          "hold τ); documents outside it are counted in the title.",
                          plots.utility_histogram(h, groups.get(h.step, ""))))
    sources = sorted(d.corpus_sources)
    rows = {"corpus": d.corpus_sources, **d.group_sources, "mixture": d.mixture_sources}
    out.append(Figure("composition", "Stacked bars: tokens by source for the corpus, each group and the mixture",
                      "Each row's tokens split by corpus source.", plots.composition(rows, sources)))
    out.append(Figure("source-shares", "Bars: each source's share of the mixture's tokens beside its share of "
                      "the corpus' tokens", "Per source: the corpus' natural share against the mixture's.",
                      plots.source_shares(_shares(d.corpus_sources), _shares(d.mixture_sources), sources)))
    out.append(Figure("mixture-tokens", "Bars per group: planned, allocated and drawn tokens, drawn split by "
                      "repeat pass", "Planned = weight × budget; allocated = after caps and redistribution "
                      "(weights.json); drawn = the mixture table, split by repeat pass.",
                      plots.mixture_tokens(d.mixture)))
    if len(d.overlap.groups) > 1:
        out.append(Figure("group-overlap", "Matrix of documents shared by each pair of groups",
                          "Documents in both groups; the shade is the share of the smaller group.",
                          plots.overlap(d.overlap)))
    if d.train_log:
        out.append(Figure("proxy-loss", "Line plot of the proxy's training loss by step, sampler checkpoints marked",
                          "The proxy's logged training loss (proxy/train_log.jsonl); dashed: the samplers' "
                          "checkpoints.", plots.loss_curve(d.train_log, [s.step for s in d.samplers])))
    if any(s.tokens_per_s is not None for s in d.shards):
        out.append(Figure("scoring-throughput", "Scoring throughput in tokens per second for each shard",
                          "Tokens per second of each score part whose metadata records its scoring time.",
                          plots.scoring_throughput(d.shards)))
    if d.experiment and d.experiment.plot_png:
        out.append(Figure("experiment-plot", f"Experiment {d.experiment.name}: each method's average change "
                          f"against {d.experiment.baseline}, per-task changes as dots",
                          f"The experiment's plot.png ({d.experiment.directory}).", d.experiment.plot_png))
    if d.tikmix_stages:
        out.append(Figure("tikmix-stages", "Line plot of each group's TiKMiX weight per stage",
                          "TiKMiX: the group weights of each stage.", plots.stage_weights(d.tikmix_stages)))
    return out


def _heatmap_png(rows: list[dict], selection: Selection) -> bytes:
    """The heatmap select draws (selection.plot_heatmap), rendered from the benchmark table the report reads."""
    import tempfile

    from automixer_ops.selection import plot_heatmap

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "heatmap.png"
        plot_heatmap(rows, selection, out)
        return out.read_bytes()


def _shares(tokens: dict[str, int]) -> dict[str, float]:
    total = sum(tokens.values())
    return {k: v / total if total else 0.0 for k, v in tokens.items()}


# ---------------------------------------------------------------- HTML pieces

def esc(text) -> str:
    return html.escape(str(text), quote=True)


def cell(text, value=None, cls: str | None = None) -> str:
    """A <td>; a number's exact value in data-value (repr of the float, or the int) beside its rounded text."""
    attrs = f' class="{esc(cls)}"' if cls else ""
    if value is not None:
        exact = repr(float(value)) if isinstance(value, float) else str(int(value))
        attrs += f' data-value="{esc(exact)}"'
    return f"<td{attrs}>{esc(text)}</td>"


def num(value, text: str) -> str:
    return cell(text, value, "num")


def table(id_: str, header: list[str], rows: list[list[str]], row_attrs: list[dict] | None = None) -> str:
    head = "".join(f'<th scope="col">{esc(h)}</th>' for h in header)
    body = []
    for i, r in enumerate(rows):
        attrs = "".join(f' {k}="{esc(v)}"' for k, v in (row_attrs[i] if row_attrs else {}).items())
        body.append(f"<tr{attrs}>{''.join(r)}</tr>")
    return f'<table id="{esc(id_)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def figure(f: Figure | None) -> str:
    if f is None:
        return ""
    data = base64.b64encode(f.png).decode("ascii")
    return (f'<figure><img id="{esc(f.id)}" alt="{esc(f.alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(f.caption)} <code>{esc(f.file)}</code></figcaption></figure>")


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(id_: str, title: str, *parts: str) -> str:
    return f'<section id="{esc(id_)}"><h2>{esc(title)}</h2>{"".join(parts)}</section>'


def _int(n) -> str:
    return f"{int(n):,}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ---------------------------------------------------------------- the page

SECTIONS = (("outputs", "Outputs"), ("invariants", "Invariants"), ("selection", "Checkpoint selection"),
            ("group-weights", "Group weights"), ("utilities", "Utilities and τ"),
            ("composition-by-source", "Composition by source"), ("mixture", "Mixture: planned vs drawn"),
            ("overlap", "Group overlap"), ("proxy", "Proxy training"), ("scoring", "Scoring per shard"),
            ("experiment", "Experiment"), ("tikmix", "TiKMiX stages"))


def render_page(d: ReportData, figs: dict[str, Figure]) -> str:
    parts = [outputs_section(d), invariants_section(d), selection_section(d, figs), weights_section(d),
             utilities_section(d, figs), composition_section(d, figs), mixture_section(d, figs),
             overlap_section(d, figs), proxy_section(d, figs), scoring_section(d, figs)]
    if d.experiment:
        parts.append(experiment_section(d.experiment, figs))
    if d.tikmix_stages:
        parts.append(tikmix_section(d.tikmix_stages, figs))
    present = [(i, t) for i, t in SECTIONS if f'<section id="{i}">' in "".join(parts)]
    nav = "<nav>" + "".join(f'<a href="#{i}">{esc(t)}</a>' for i, t in present) + "</nav>"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>AutoMixer run {esc(d.run_id)}</title><style>{CSS}</style></head><body>"
            + header(d) + nav + "".join(parts) + "</body></html>\n")


def header(d: ReportData) -> str:
    failed = [c for c in d.checks if not c["ok"]]
    status = (f'<span class="bad">{len(failed)} of {len(d.checks)} invariants FAILED</span>' if failed
              else f'<span class="ok">all {len(d.checks)} invariants hold</span>')
    info = d.info
    under = (' <span class="bad">UNDERFILLED (mix.underfill: allow): the groups can give no more</span>'
             if info.get("underfilled") else "")
    return (f"<h1>AutoMixer run <code>{esc(d.run_id)}</code></h1>"
            f"<p>Run directory <code>{esc(d.run_path)}</code>. {status}. "
            f"Mixture: {_int(info['tokens'])} tokens drawn for a budget of {_int(info['token_budget'])} "
            f"({_int(info.get('documents', 0))} draws) from {len(d.weights)} group(s) of "
            f"{len(d.samplers)} sampler(s).{under}</p>")


def outputs_section(d: ReportData) -> str:
    items = "".join(f'<li><a href="{esc(quote(rel))}">{esc(rel)}</a> <span class="note">({_size(n)})</span></li>'
                    for rel, n in d.outputs)
    return section("outputs", "Outputs", note("What this run produced, linked relative to this page (the mixture "
                                              "parts are what a trainer reads; blend.txt is the Megatron-LM blend)."),
                   f"<ul>{items}</ul>")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def invariants_section(d: ReportData) -> str:
    rows = [[cell(c["check"]), cell(c["invariant"]), cell("ok" if c["ok"] else "FAILED", cls="ok" if c["ok"] else "bad"),
             cell(c["detail"])] for c in d.checks]
    attrs = [{"data-check": c["check"], **({} if c["ok"] else {"class": "fail"})} for c in d.checks]
    return section("invariants", "Invariants", note("DESIGN §3's invariants, each a query of sql/checks/ run on "
                                                    "automixer.duckdb (also in invariants.json)."),
                   table("invariants-table", ["check", "invariant", "holds", "detail"], rows, attrs))


def selection_section(d: ReportData, figs: dict[str, Figure]) -> str:
    sel = d.selection
    parts = [figure(figs.get("benchmark-heatmap"))] if "benchmark-heatmap" in figs else [
        note("No eval/benchmark.parquet in this run: no heatmap (the selection was not made by `automixer select`).")]
    rows, attrs = [], []
    for task, c in sel.tasks.items():
        flag = {True: "separated", False: "within noise", None: "-"}[c.separated]
        rows.append([cell(task), cell(c.metric), num(c.best_step, str(c.best_step)),
                     num(c.best_value, f"{c.best_value:.4f}"), _stderr(c.best_stderr),
                     num(c.last_step, str(c.last_step)), num(c.last_value, f"{c.last_value:.4f}"),
                     _stderr(c.last_stderr), num(c.progression, f"{c.progression:.2f}"), cell(flag)])
        attrs.append({"data-task": task})
    if rows:
        parts += [f"<h3>Table 1 analogue (metric: {esc(sel.metric)})</h3>",
                  table("table1", ["task", "metric", "best step", "best value", "± stderr", "last step", "last value",
                                   "± stderr", "best step / last step (ratio of steps)", "best vs last"], rows, attrs),
                  note(f"best step / last step is a ratio of checkpoint steps (the paper's progression), not of metric "
                       f"values. best vs last: 'within noise' when |best − last| ≤ {sel.noise_z:g} × "
                       "√(se_best² + se_last²) (select.noise_z), 'separated' when more; '-': the best is the last "
                       "step, or no stderr.")]
    else:
        parts.append(note("selection.json lists no tasks (a hand-written selection): no Table 1."))
    srows = [[num(s.step, str(s.step)), cell(s.group), num(s.alpha, f"{s.alpha:.4f}"), cell(", ".join(s.tasks))]
             for s in d.samplers]
    parts += ["<h3>Samplers and α</h3>",
              table("samplers", ["checkpoint step", "group", "α", "tasks"], srows,
                    [{"data-step": str(s.step)} for s in d.samplers]),
              note("α_j = s̃_j / Σ s̃_i with s̃_j = step_j / max step (DESIGN §2): later checkpoints weigh more in the "
                   "joint score.")]
    return section("selection", "Checkpoint selection", *parts)


def _stderr(se: float | None) -> str:
    return num(se, f"{se:.4f}") if se is not None else cell("-", cls="num")


def weights_section(d: ReportData) -> str:
    alpha = {s.step: s.alpha for s in d.samplers}
    rows = [[cell(w.group), num(w.step, str(w.step)), num(alpha.get(w.step, math.nan), f"{alpha.get(w.step, math.nan):.4f}"),
             num(w.n_docs, _int(w.n_docs)), num(w.n_tokens, _int(w.n_tokens)),
             num(w.influence_density, f"{w.influence_density:.4f}"), cell(f"{w.weight:.4f}", float(w.weight), "weight")]
            for w in d.weights]
    return section("group-weights", "Group weights",
                   table("weights", ["group", "sampler step", "α", "documents", "tokens", "influence density ρ",
                                     "weight"], rows, [{"data-group": w.group} for w in d.weights]),
                   note("From the DuckDB weights table: ρ_g = Σ S(x)·s_x / Σ s_x over the group's documents "
                        "(S: the min-max scaled joint score, s_x: tokens), w_g = ρ_g / Σ ρ."))


def utilities_section(d: ReportData, figs: dict[str, Figure]) -> str:
    rows = [[num(h.step, str(h.step)), num(h.n, _int(h.n)), num(h.minimum, f"{h.minimum:.4g}"),
             num(h.median, f"{h.median:.4g}"), num(h.mean, f"{h.mean:.4g}"), num(h.maximum, f"{h.maximum:.4g}"),
             num(h.tau, f"{h.tau:.4g}"), num(s.n_kept, _int(s.n_kept)), num(s.n_above, _int(s.n_above)),
             num(s.n_at, _int(s.n_at))] for h, s in zip(d.histograms, d.samplers)]
    parts = [table("utility", ["sampler step", "documents", "min", "median", "mean", "max", "τ", "kept",
                               "above τ", "at τ"], rows, [{"data-step": str(h.step)} for h in d.histograms]),
             note("Utility = −influence: positive lowers the sampler's validation loss. τ is the utility of the last "
                  "document kept (regroup.keep_fraction of the corpus, ties by id).")]
    parts += [figure(figs.get(f"utility-step-{h.step}")) for h in d.histograms]
    return section("utilities", "Utilities and τ", *parts)


def composition_section(d: ReportData, figs: dict[str, Figure]) -> str:
    sources = sorted(d.corpus_sources)
    named = {"corpus": d.corpus_sources, **d.group_sources, "mixture": d.mixture_sources}
    rows, attrs = [], []
    for name, tokens in named.items():
        total = sum(tokens.values())
        rows.append([cell(name), num(total, _int(total))]
                    + [num(tokens.get(s, 0), _pct(tokens.get(s, 0) / total) if total else "-") for s in sources])
        attrs.append({"data-row": name})
    corpus, mixture = _shares(d.corpus_sources), _shares(d.mixture_sources)
    srows = [[cell(s), num(d.corpus_sources.get(s, 0), _int(d.corpus_sources.get(s, 0))),
              num(corpus.get(s, 0.0), _pct(corpus.get(s, 0.0))),
              num(d.mixture_sources.get(s, 0), _int(d.mixture_sources.get(s, 0))),
              num(mixture.get(s, 0.0), _pct(mixture.get(s, 0.0))),
              num(mixture.get(s, 0.0) / corpus[s], f"{mixture.get(s, 0.0) / corpus[s]:.2f}×") if corpus.get(s)
              else cell("-", cls="num")] for s in sources]
    return section("composition-by-source", "Composition by source",
                   note("Tokens of each group's documents (its kept set, before mixing) and of the mixture's draws "
                        "(repeats included) by the corpus' source column. Cells show the share of the row; "
                        "data-value holds the tokens."),
                   table("composition-table", ["", "tokens", *sources], rows, attrs), figure(figs.get("composition")),
                   table("source-shares-table", ["source", "corpus tokens", "corpus share", "mixture tokens",
                                           "mixture share", "mixture / corpus"], srows,
                         [{"data-source": s} for s in sources]),
                   figure(figs.get("source-shares")))


def mixture_section(d: ReportData, figs: dict[str, Figure]) -> str:
    rows = [[cell(g.group), num(g.weight, f"{g.weight:.4f}"), num(g.planned, f"{g.planned:,.0f}"),
             num(g.allocated, f"{g.allocated:,.0f}") if g.allocated is not None else cell("-", cls="num"),
             num(g.tokens, _int(g.tokens)), num(g.draws, _int(g.draws)), num(g.distinct, _int(g.distinct)),
             num(max(g.by_repeat, default=0), str(max(g.by_repeat, default=0))),
             num(g.capacity, _int(g.capacity)) if g.capacity is not None else cell("-", cls="num"),
             num(g.cap, _int(g.cap)) if g.cap is not None else cell("none")] for g in d.mixture]
    rrows, rattrs = [], []
    for g in d.mixture:
        for r, (n, t) in sorted(g.by_repeat.items()):
            rrows.append([cell(g.group), num(r, str(r)), num(n, _int(n)), num(t, _int(t))])
            rattrs.append({"data-group": g.group, "data-repeat": str(r)})
    info = d.info
    return section("mixture", "Mixture: planned vs drawn",
                   note(f"Budget {_int(info['token_budget'])} tokens, drawn {_int(info['tokens'])} in "
                        f"{_int(info.get('documents', 0))} draws (mix.max_repeats {info.get('max_repeats', '-')}, "
                        f"seed {info.get('seed', '-')}). Planned = weight × budget; allocated = after caps and "
                        "redistribution (mixture/weights.json); drawn = the DuckDB mixture table."),
                   table("mixture-groups", ["group", "weight", "planned tokens", "allocated tokens", "drawn tokens",
                                            "draws", "distinct documents", "max repeat", "capacity", "cap"], rows,
                         [{"data-group": g.group} for g in d.mixture]),
                   figure(figs.get("mixture-tokens")),
                   "<h3>Repeats</h3>",
                   table("repeats", ["group", "pass (0 = first)", "draws", "tokens"], rrows, rattrs),
                   note("A group that runs out before its quota draws again from its top, up to mix.max_repeats "
                        "passes; pass r > 0 rows are those repeats."))


def overlap_section(d: ReportData, figs: dict[str, Figure]) -> str:
    o = d.overlap
    rows = []
    for i, g in enumerate(o.groups):
        rows.append([cell(g)] + [num(o.shared_docs[i][j], _int(o.shared_docs[i][j])) for j in range(len(o.groups))])
    pairs, pattrs = [], []
    for i in range(len(o.groups)):
        for j in range(i + 1, len(o.groups)):
            both = o.shared_docs[i][j]
            union = o.shared_docs[i][i] + o.shared_docs[j][j] - both
            jac = both / union if union else 0.0
            pairs.append([cell(o.groups[i]), cell(o.groups[j]), num(both, _int(both)),
                          num(o.shared_tokens[i][j], _int(o.shared_tokens[i][j])), num(jac, f"{jac:.3f}")])
            pattrs.append({"data-pair": f"{o.groups[i]}|{o.groups[j]}"})
    mrows = [[num(k, str(k)), num(n, _int(n))] for k, n in o.membership.items()]
    return section("overlap", "Group overlap",
                   note("Documents in both groups of each pair (the diagonal: the group's size), from joint_scores' "
                        "groups_mask. A document may sit in several groups and the mixture may draw it once per group."),
                   table("overlap-docs", ["", *o.groups], rows, [{"data-group": g} for g in o.groups]),
                   table("overlap-pairs", ["group", "group", "shared documents", "shared tokens", "Jaccard"], pairs,
                         pattrs),
                   table("membership", ["in how many groups", "documents"], mrows,
                         [{"data-k": str(k)} for k in o.membership]),
                   figure(figs.get("group-overlap")))


def proxy_section(d: ReportData, figs: dict[str, Figure]) -> str:
    if not d.train_log:
        return section("proxy", "Proxy training", note("No proxy/train_log.jsonl in this run (checkpoints linked, "
                                                       "not trained here): no loss curve."))
    last = d.train_log[-1]
    return section("proxy", "Proxy training", figure(figs.get("proxy-loss")),
                   note(f"{len(d.train_log)} logged steps; the last, step {last['step']}: loss {last['loss']:.4f}."))


def scoring_section(d: ReportData, figs: dict[str, Figure]) -> str:
    per_sampler, prow = [], []
    for step in dict.fromkeys(s.step for s in d.shards):
        mine = [s for s in d.shards if s.step == step]
        timed = [s for s in mine if s.seconds is not None]
        rates = sorted(s.tokens_per_s for s in timed if s.tokens_per_s is not None)
        seconds = sum(s.seconds for s in timed)
        prow.append([num(step, str(step)), num(len(mine), _int(len(mine))), num(sum(s.docs for s in mine),
                     _int(sum(s.docs for s in mine))), num(sum(s.tokens for s in mine), _int(sum(s.tokens for s in mine))),
                     num(len(timed), _int(len(timed))),
                     num(seconds, f"{seconds:,.1f}") if timed else cell("not recorded", cls="num"),
                     num(rates[len(rates) // 2], f"{rates[len(rates) // 2]:,.0f}") if rates else cell("-", cls="num")])
        per_sampler.append(step)
    n_timed = sum(s.seconds is not None for s in d.shards)
    parts = [note(f"{n_timed} of {len(d.shards)} score parts record their scoring time (metadata key 'seconds'); "
                  "tokens/s uses the tokens the scorer read ('scored_tokens') where recorded, else the documents' "
                  "full token counts." if n_timed else
                  "These score parts do not record their scoring time, so no throughput is shown (file times would "
                  "mislead: shards are scored in parallel). Documents and tokens per part are below."),
             table("scoring-samplers", ["sampler step", "score parts", "documents", "tokens", "timed parts",
                                        "seconds (timed parts)", "median tokens / s"], prow,
                   [{"data-step": str(s)} for s in per_sampler])]
    if "scoring-throughput" in figs:
        parts.append(figure(figs["scoring-throughput"]))
    if len(d.shards) > MAX_SHARD_ROWS:
        parts.append(note(f"{len(d.shards):,} score parts: the per-part table is left out above "
                          f"{MAX_SHARD_ROWS} rows (the plot shows every timed part)."))
        return section("scoring", "Scoring per shard", *parts)
    rows, attrs = [], []
    for s in d.shards:
        rate = s.tokens_per_s
        rows.append([num(s.step, str(s.step)), cell(s.shard), num(s.docs, _int(s.docs)), num(s.tokens, _int(s.tokens)),
                     num(s.seconds, f"{s.seconds:.1f}") if s.seconds is not None else cell("not recorded", cls="num"),
                     num(rate, f"{rate:,.0f}") if rate is not None else cell("-", cls="num")])
        attrs.append({"data-step": str(s.step), "data-shard": s.shard})
    parts.append(table("scoring-shards", ["sampler step", "shard", "documents", "tokens", "seconds", "tokens / s"],
                       rows, attrs))
    return section("scoring", "Scoring per shard", *parts)


# ---------------------------------------------------------------- experiment

def experiment_section(e: ExperimentData, figs: dict[str, Figure]) -> str:
    from automixer_ops.experiment_table import paired_delta, paper_reference, summarize

    parts = [note(f"Experiment {e.name} ({e.directory}): target models trained on each method's mixture, evaluated "
                  f"on the held-out test documents; built from its results.parquet. Each cell: the mean over seeds ± "
                  f"its standard error; Δ: method − {e.baseline} paired by seed, † where |Δ| > 2 stderr.")]
    if "experiment-plot" in figs:
        parts.append(figure(figs["experiment-plot"]))
    for block in e.blocks:
        slug = block.title.replace("_", "-")
        header = ["method", "kind", "seeds", *(f"{t} ({m})" for t, m in block.tasks.items()), "avg"]
        rows = []
        for m in e.methods:
            cells = [_exp_cell(*summarize(block.values[m][t]), block.digits) for t in block.tasks]
            cells.append(_exp_cell(*summarize(block.avg[m]), block.digits))
            rows.append([cell(m), cell(e.kinds.get(m, "")), num(len(block.avg[m]), str(len(block.avg[m]))), *cells])
        parts += [f"<h3>{esc(EXPERIMENT_TITLES.get(block.title, block.title + ' (lower is better)'))}</h3>",
                  table(f"experiment-{slug}", header, rows, [{"data-method": m} for m in e.methods])]
        drows = []
        for m in e.methods:
            if m == e.baseline:
                n = len(block.avg[m])
                cells = [cell("(baseline)")] * (len(block.tasks) + 1)
            else:
                cells = [_exp_cell(*paired_delta(block.values[m][t], block.values[e.baseline][t]), block.digits,
                                   sign=True) for t in block.tasks]
                mean, se, n = paired_delta(block.avg[m], block.avg[e.baseline])
                cells.append(_exp_cell(mean, se, n, block.digits, sign=True))
            extra = [cell(paper_reference(e.kinds.get(m)))] if block.title == "accuracy" else []
            drows.append([cell(m), cell(e.kinds.get(m, "")), num(n, str(n)), *cells, *extra])
        parts += [f"<h4>Δ {esc(block.title)} vs {esc(e.baseline)} (paired by seed)</h4>",
                  table(f"experiment-{slug}-delta", ["method", "kind", "paired seeds",
                                                     *(f"{t} ({m})" for t, m in block.tasks.items()), "avg",
                                                     *(["paper (avg, vs uniform)"] if block.title == "accuracy"
                                                       else [])],
                        drows, [{"data-method": m} for m in e.methods])]
    return section("experiment", f"Experiment {e.name}", *parts)


EXPERIMENT_TITLES = {
    "accuracy": "Accuracy (points = acc × 100; acc_norm where the task reports it, else acc; higher is better)",
    "gold_ll": "gold_ll (mean per-token log-likelihood of the gold continuation, nats; higher is better)"}


def _exp_cell(mean: float, se: float | None, n: int, digits: int, sign: bool = False) -> str:
    """As experiment_table writes a cell in table.md: 'mean ± se' ('n/a' without), '+' on deltas, † past 2 se."""
    from automixer_ops.experiment_table import MARK, significant

    if n == 0 or math.isnan(mean):
        return cell("n/a", cls="num")
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    text += f" ± {se:.{digits}f}" if se is not None else " ± n/a"
    if sign and significant(mean, se):
        text += f" {MARK}"
    return num(mean, text)


# ---------------------------------------------------------------- TiKMiX (hook: report_data.tikmix_stages)

def tikmix_section(stages: dict[str, dict[str, float]], figs: dict[str, Figure]) -> str:
    groups = sorted({g for w in stages.values() for g in w})
    rows = [[cell(s)] + [num(w.get(g, 0.0), f"{w.get(g, 0.0):.4f}") for g in groups] for s, w in stages.items()]
    return section("tikmix", "TiKMiX stages", table("tikmix-weights", ["stage", *groups], rows,
                                                    [{"data-stage": s} for s in stages]),
                   figure(figs.get("tikmix-stages")))
