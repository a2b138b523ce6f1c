"""An experiment's table and plot: `table.md` and `plot.png` from `results.parquet`.

`results.parquet` has one row per (method, seed, task, metric): columns method, kind, seed,
task, metric, value, stderr, n_docs. The table reads standalone (its header says what was
run, on what, and how to reproduce it) and has these blocks:

- **Accuracy** (points, x100): per task its headline metric (acc_norm where the task reports
  it, else acc: METRIC_PREFERENCE's order) and `avg`, the mean over tasks taken per seed and
  then over seeds; each cell is the mean over seeds ± its standard error over seeds.
- **Δ accuracy vs the baseline, paired by seed**: d_s = metric(method, s) − metric(baseline, s)
  for the seeds both have (for avg: the per-seed task averages); mean(d) ± std(d, ddof=1)/√n.
  Seeds share the target's initialisation and data order across methods, so pairing removes
  the seed-to-seed variance both methods share. A † marks |mean| > 2·stderr. Beside avg, the
  paper's improvement over uniform for the method's kind (PAPER_REFERENCE).
- **gold_ll** (mean per-token log-likelihood of the gold continuation, higher is better):
  the same two tables.
- Likelihood-only tasks (bits_per_byte / perplexity, lower is better), if any: the same.

`plot.png`: per method the avg Δ accuracy with ±1 paired stderr, and the avg Δ gold_ll, each
task's Δ as a small dot. Both files are rendered first, then renamed into place: an error
leaves the previous files (or none), never a partial one.
"""

from __future__ import annotations

import math
import os
import statistics
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import fsync_file
from automixer_ops.samplers import LOWER_IS_BETTER, METRIC_PREFERENCE, headline_metric

ACCURACY_METRICS = tuple(m for m in METRIC_PREFERENCE if m in ("acc_norm", "acc"))
LIKELIHOOD_METRICS = tuple(m for m in METRIC_PREFERENCE if m in LOWER_IS_BETTER)
CONTINUOUS_METRIC = "gold_ll"
COLUMNS = ("method", "kind", "seed", "task", "metric", "value", "stderr", "n_docs")
MARK = "†"

# The AutoMixer paper's improvement over uniform sampling, in accuracy points averaged over its 8 tasks
# (docs/DESIGN.md §5), by method kind. Table 2 (350M target, 350M proxy): AutoMixer +1.93, PPL sampling
# +0.66, n-gram (DSIR-style) +0.60. Table 3 (1.5B target): last checkpoint only +0.7, all 10 checkpoints
# +0.8, AutoMixer +1.22. Uniform is the reference (0). Kinds the paper does not run have no entry.
PAPER_REFERENCE: dict[str, tuple[tuple[float, str], ...]] = {
    "uniform": ((0.0, "reference"),),
    "automixer": ((1.93, "Table 2, 350M"), (1.22, "Table 3, 1.5B")),
    "ppl": ((0.66, "Table 2, 350M"),),
    "dsir": ((0.60, "Table 2, 350M"),),
    "last-ckpt": ((0.7, "Table 3, 1.5B"),),
    "all-ckpt": ((0.8, "Table 3, 1.5B"),),
}


# ---------------------------------------------------------------- statistics

def summarize(values: Mapping[int, float]) -> tuple[float, float | None, int]:
    """(mean, standard error of the mean, n) of the per-seed values; the stderr is None below two seeds and
    the mean NaN with none."""
    xs = [float(v) for v in values.values()]
    if not xs:
        return math.nan, None, 0
    mean = statistics.fmean(xs)
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None
    return mean, se, len(xs)


def paired_delta(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[float, float | None, int]:
    """a − b paired by seed, over the seeds both have: (mean of d_s, std(d, ddof=1)/√n, n).

    The stderr is None with one common seed; with none the mean is NaN (n = 0)."""
    common = sorted(set(a) & set(b))
    return summarize({s: float(a[s]) - float(b[s]) for s in common})


def significant(mean: float, se: float | None) -> bool:
    return se is not None and not math.isnan(mean) and abs(mean) > 2 * se


# ---------------------------------------------------------------- reading results

def read_results(path: Path) -> list[dict]:
    """results.parquet as rows, checked: the columns, one value per (method, seed, task, metric)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise AutomixerError(f"{path}: results not found; run the experiment's units first")
    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 (pyarrow raises several types for a damaged file)
        raise AutomixerError(f"{path}: cannot read: {e}") from None
    missing = [c for c in COLUMNS if c not in table.column_names and c not in ("stderr", "n_docs", "kind")]
    if missing:
        raise AutomixerError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")
    rows = table.to_pylist()
    seen: set[tuple] = set()
    for r in rows:
        key = (r["method"], int(r["seed"]), r["task"], r["metric"])
        if key in seen:
            raise AutomixerError(f"{path}: more than one value for method {key[0]!r}, seed {key[1]}, "
                                 f"task {key[2]!r}, metric {key[3]!r}")
        seen.add(key)
    return rows


@dataclass
class Block:
    """One metric per task for every method: values[method][task][seed]; avg[method][seed] is the mean over
    the block's tasks of the seeds that have every task."""
    title: str
    tasks: dict[str, str]  # task -> metric
    scale: float
    digits: int
    lower_is_better: bool
    values: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    avg: dict[str, dict[int, float]] = field(default_factory=dict)
    incomplete: dict[str, list[int]] = field(default_factory=dict)  # method -> seeds left out of avg


def _build_block(rows: list[dict], methods: list[str], title: str, tasks: dict[str, str], scale: float,
                 digits: int, lower_is_better: bool) -> Block:
    block = Block(title, tasks, scale, digits, lower_is_better)
    for m in methods:
        block.values[m] = {t: {} for t in tasks}
    for r in rows:
        t, m = r["task"], r["method"]
        v = r["value"]
        if t in tasks and r["metric"] == tasks[t] and m in block.values and v is not None and not math.isnan(v):
            block.values[m][t][int(r["seed"])] = float(v) * scale
    for m in methods:
        per_task = block.values[m]
        seeds = sorted(set().union(*(set(v) for v in per_task.values()))) if per_task else []
        complete = [s for s in seeds if all(s in per_task[t] for t in tasks)]
        block.avg[m] = {s: statistics.fmean(per_task[t][s] for t in tasks) for s in complete}
        left_out = [s for s in seeds if s not in complete]
        if left_out:
            block.incomplete[m] = left_out
    return block


def headline_metrics(rows: Iterable[dict]) -> dict[str, str]:
    """task -> the first metric of METRIC_PREFERENCE it reports (acc_norm, acc, bits_per_byte, perplexity)."""
    reported: dict[str, set[str]] = {}
    for r in rows:
        reported.setdefault(r["task"], set()).add(r["metric"])
    return {task: metric for task in sorted(reported) if (metric := headline_metric(reported[task])) is not None}


def _method_order(rows: list[dict], meta: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Methods in meta["methods"]'s order, then any others in the order results show them; their kinds."""
    kinds: dict[str, str] = {}
    order: list[str] = []
    for entry in meta.get("methods") or ():
        if isinstance(entry, Mapping):
            name, kind = entry["name"], entry.get("kind")
        elif hasattr(entry, "name"):
            name, kind = entry.name, getattr(entry, "kind", None)
        else:
            name, kind = entry[0], entry[1] if len(entry) > 1 else None
        if name not in order:
            order.append(str(name))
        if kind:
            kinds[str(name)] = str(kind)
    for r in rows:
        if r["method"] not in order:
            order.append(r["method"])
        if r.get("kind") and r["method"] not in kinds:
            kinds[r["method"]] = r["kind"]
    return order, kinds


# ---------------------------------------------------------------- formatting

def _num(x: float, digits: int, sign: bool = False) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _cell(mean: float, se: float | None, n: int, digits: int, sign: bool = False, mark: bool = False) -> str:
    if n == 0:
        return "n/a"
    text = f"{_num(mean, digits, sign)} ± {_num(se, digits) if se is not None else 'n/a'}"
    return f"{text} {MARK}" if mark and significant(mean, se) else text


def paper_reference(kind: str | None) -> str:
    refs = PAPER_REFERENCE.get(kind or "")
    if not refs:
        return ""
    return "; ".join(f"{v:+.2f} ({src})" if v else f"0 ({src})" for v, src in refs)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    align = ["---"] * min(2, len(header)) + ["---:"] * max(0, len(header) - 2)  # method, kind: text
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _task_header(block: Block) -> list[str]:
    return [f"{t} ({m})" for t, m in block.tasks.items()] + ["avg"]


def _absolute_table(block: Block, methods: list[str], kinds: dict[str, str]) -> list[str]:
    rows = []
    for m in methods:
        cells = [_cell(*summarize(block.values[m][t]), block.digits) for t in block.tasks]
        mean, se, n = summarize(block.avg[m])
        rows.append([f"{m}", kinds.get(m, ""), str(n)] + cells + [_cell(mean, se, n, block.digits)])
    return _md_table(["method", "kind", "seeds"] + _task_header(block), rows)


def _delta_table(block: Block, methods: list[str], kinds: dict[str, str], baseline: str,
                 paper: bool) -> list[str]:
    rows = []
    for m in methods:
        if m == baseline:
            cells = ["(baseline)"] * (len(block.tasks) + 1)
            n = len(block.avg[m])
        else:
            cells = [_cell(*paired_delta(block.values[m][t], block.values[baseline][t]), block.digits,
                           sign=True, mark=True) for t in block.tasks]
            mean, se, n = paired_delta(block.avg[m], block.avg[baseline])
            cells.append(_cell(mean, se, n, block.digits, sign=True, mark=True))
        row = [m, kinds.get(m, ""), str(n)] + cells
        if paper:
            row.append(paper_reference(kinds.get(m)))
        rows.append(row)
    header = ["method", "kind", "paired seeds"] + _task_header(block) + (["paper (avg, vs uniform)"] if paper else [])
    return _md_table(header, rows)


def _block_notes(block: Block) -> list[str]:
    notes = []
    for m, seeds in block.incomplete.items():
        notes.append(f"- {m}: seed(s) {', '.join(map(str, seeds))} lack a task of this block and are left out of avg.")
    return notes


def _format_seconds(s: float) -> str:
    s = float(s)
    h, rem = divmod(round(s), 3600)
    mnt, sec = divmod(rem, 60)
    return f"{s:.0f} s ({h}h{mnt:02d}m{sec:02d}s)" if h else f"{s:.0f} s ({mnt}m{sec:02d}s)"


def _header(meta: Mapping[str, Any], methods: list[str], kinds: dict[str, str], baseline: str,
            rows: list[dict]) -> list[str]:
    name = meta.get("name") or meta.get("experiment") or "experiment"
    lines = [f"# Experiment `{name}`", ""]
    lines.append(f"- methods: {', '.join(f'{m} ({kinds[m]})' if m in kinds else m for m in methods)}; "
                 f"baseline: {baseline}")
    if meta.get("base"):
        lines.append(f"- base run config: `{meta['base']}` (corpus, proxy, tasks and their test documents)")
    seeds = meta.get("seeds")
    if seeds is None:
        seeds = sorted({int(r["seed"]) for r in rows})
    lines.append(f"- seeds: {', '.join(map(str, seeds))} (seed s: every method's target starts from the same "
                 "initialisation; a baseline's random draw and every mixture's order follow s, while a pipeline "
                 "method's documents are chosen deterministically, so its spread over seeds leaves out draw noise)")
    if meta.get("token_budget") is not None:
        lines.append(f"- token budget: {int(meta['token_budget']):,} tokens per mixture (the target reads them once)")
    target = meta.get("target")
    if target:
        if isinstance(target, Mapping):
            preset = target.get("preset")
            rest = ", ".join(f"{k}={v}" for k, v in target.items() if k != "preset")
            lines.append(f"- target: {preset or ''}{' (' + rest + ')' if rest else ''}")
        else:
            lines.append(f"- target: {target}")
    n_docs = meta.get("n_docs")
    if not n_docs:
        n_docs = {}
        for r in rows:
            if r.get("n_docs") is not None:
                n_docs[r["task"]] = max(int(r["n_docs"]), n_docs.get(r["task"], 0))
    if n_docs:
        lines.append("- test documents per task: " + ", ".join(f"{t} {n}" for t, n in sorted(n_docs.items())))
    if meta.get("command"):
        lines.append(f"- reproduce: `{meta['command']}`")
    wall = meta.get("wall_time", meta.get("wall_s"))
    if wall is not None:
        lines.append(f"- wall time: {_format_seconds(wall)} (prepare and every unit)")
    have: dict[str, set[int]] = {}
    for r in rows:
        have.setdefault(r["method"], set()).add(int(r["seed"]))
    missing = [(m, [s for s in seeds if s not in have.get(m, set())]) for m in methods]
    missing = [(m, s) for m, s in missing if s]
    if missing:
        lines.append("- **missing results** (n/a or fewer seeds below): " + "; ".join(
            f"{m} seed(s) {', '.join(map(str, s))}" for m, s in missing))
    lines += ["", ("**How to read it.** Each cell is the mean over seeds ± the standard error of that mean over "
              "seeds (std with ddof=1 / √n; n/a with one seed). `avg` is the mean over the block's tasks per "
              "seed, then over seeds. Δ is a method minus the baseline, paired by seed: d_s = method(s) − "
              f"baseline(s) for the seeds both have, reported as mean(d) ± std(d, ddof=1)/√n. {MARK} marks "
              "|Δ| > 2 × that stderr (a rough screen: with 3 seeds a two-sided 95% t-test needs about "
              "4.3 × stderr). `paper` is the AutoMixer paper's average improvement over uniform for the "
              "method's kind (docs/DESIGN.md §5), comparable when the baseline is uniform and the scale "
              "is the paper's."), ""]
    return lines


def render_table(rows: list[dict], baseline: str, meta: Mapping[str, Any]) -> tuple[str, list[Block]]:
    """table.md's text and the blocks it shows (accuracy first, then gold_ll, then likelihood-only tasks)."""
    if not rows:
        raise AutomixerError("results.parquet has no rows: no unit has finished")
    methods, kinds = _method_order(rows, meta)
    present = {r["method"] for r in rows}
    if baseline not in present:
        raise AutomixerError(f"baseline {baseline!r} has no results (methods with results: "
                             f"{', '.join(m for m in methods if m in present)}); run its units or pick another "
                             "baseline")
    headline = headline_metrics(rows)
    blocks = []
    accuracy = {t: m for t, m in headline.items() if m in ACCURACY_METRICS}
    if accuracy:
        blocks.append(_build_block(rows, methods, "accuracy", accuracy, 100.0, 2, False))
    gold = sorted({r["task"] for r in rows if r["metric"] == CONTINUOUS_METRIC})
    if gold:
        blocks.append(_build_block(rows, methods, CONTINUOUS_METRIC, {t: CONTINUOUS_METRIC for t in gold},
                                   1.0, 4, False))
    for metric in LIKELIHOOD_METRICS:
        tasks = {t: m for t, m in headline.items() if m == metric}
        if tasks:
            blocks.append(_build_block(rows, methods, metric, tasks, 1.0, 4, True))
    if not blocks:
        raise AutomixerError(f"results.parquet reports none of {', '.join(METRIC_PREFERENCE + (CONTINUOUS_METRIC,))}")

    lines = _header(meta, methods, kinds, baseline, rows)
    for block in blocks:
        if block.title == "accuracy":
            what = ("Accuracy (points = acc × 100; acc_norm where the task reports it, else acc; higher is "
                    "better)")
        elif block.title == CONTINUOUS_METRIC:
            what = ("gold_ll (mean per-token log-likelihood of the gold continuation, nats; higher is "
                    "better)")
        else:
            what = f"Likelihood-only tasks: {block.title} (lower is better: a negative Δ is an improvement)"
        lines += [f"## {what}", ""]
        lines += _absolute_table(block, methods, kinds)
        lines += ["", f"### Δ {block.title} vs {baseline} (paired by seed)", ""]
        lines += _delta_table(block, methods, kinds, baseline, paper=block.title == "accuracy")
        notes = _block_notes(block)
        lines += ([""] + notes if notes else []) + [""]
    lines += list(meta.get("appendix") or ())  # what the methods chose and drew (the runner's markdown)
    return "\n".join(lines), blocks


# ---------------------------------------------------------------- plot

def _once():
    """label(text): the text the first time, then None (one legend entry per kind of mark)."""
    seen: set[str] = set()

    def label(text: str) -> str | None:
        if text in seen:
            return None
        seen.add(text)
        return text

    return label


def _render_plot(blocks: list[Block], methods: list[str], kinds: dict[str, str], baseline: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [b for b in blocks if b.title in ("accuracy", CONTINUOUS_METRIC)] or blocks[:1]
    others = [m for m in methods if m != baseline]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.5, 1.2 * len(others) + 2.5) * len(panels), 4.2),
                             squeeze=False)
    for ax, block in zip(axes[0], panels, strict=True):
        label = _once()

        k = len(block.tasks)
        for i, m in enumerate(others):
            mean, se, n = paired_delta(block.avg[m], block.avg[baseline])
            if n:
                ax.errorbar([i], [mean], yerr=None if se is None else [[se], [se]], fmt="o", color="C0",
                            capsize=5, markersize=7, zorder=3, label=label("avg Δ ± 1 paired stderr"))
            for j, t in enumerate(block.tasks):
                d, _, nt = paired_delta(block.values[m][t], block.values[baseline][t])
                if nt:
                    x = i + (j - (k - 1) / 2) * (0.5 / k)
                    ax.plot([x], [d], ".", color="0.55", markersize=4, zorder=2, label=label("per-task Δ"))
            refs = PAPER_REFERENCE.get(kinds.get(m, ""), ())
            if block.title == "accuracy" and refs and m != baseline:
                ax.plot([i + 0.3], [refs[0][0]], "D", mfc="none", color="C3", markersize=6,
                        label=label("paper (vs uniform)"))
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(others)), others, rotation=20, ha="right")
        ax.set_xlim(-0.6, max(len(others) - 0.4, 0.6))
        unit = {"accuracy": "points", CONTINUOUS_METRIC: "nats/token"}.get(block.title, block.title)
        ax.set_ylabel(f"Δ {block.title} vs {baseline} ({unit})")
        better = "lower is better" if block.lower_is_better else "higher is better"
        ax.set_title(f"Δ {block.title}, paired by seed ({better})", fontsize=10)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120, format="png")
    finally:
        plt.close(fig)


# ---------------------------------------------------------------- writing

def write_table(results: Path, out_dir: Path, baseline: str, meta: dict) -> tuple[Path, Path]:
    """table.md and plot.png from results.parquet; returns their paths (written atomically).

    meta (every key optional): name, methods [(name, kind)] (the rows' order), seeds, token_budget, target
    (preset or a mapping of its settings), base (the run config), n_docs {task: n} (else the results'
    n_docs), command (that reproduces it), wall_time or wall_s (seconds), appendix (markdown lines put last).

    Both are rendered into temporary files beside their final names and renamed into place only once both
    are complete: a failure leaves the previous table and plot (or none), and no temporary file."""
    rows = read_results(Path(results))
    text, blocks = render_table(rows, baseline, meta)
    methods, kinds = _method_order(rows, meta)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table, plot = out_dir / "table.md", out_dir / "plot.png"
    tag = uuid.uuid4().hex[:8]
    tmp_table, tmp_plot = out_dir / f".table.md.{tag}.tmp", out_dir / f".plot.png.{tag}.tmp"
    try:
        tmp_table.write_text(text, encoding="utf-8")
        _render_plot(blocks, methods, kinds, baseline, tmp_plot)
        fsync_file(tmp_table)
        fsync_file(tmp_plot)
        os.replace(tmp_plot, plot)
        os.replace(tmp_table, table)
    finally:
        tmp_table.unlink(missing_ok=True)
        tmp_plot.unlink(missing_ok=True)
    return table, plot
