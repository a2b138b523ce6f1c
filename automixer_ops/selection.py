"""`automixer select`: the checkpoint where each task peaks, and the samplers (DESIGN §2).

Metric per task (`select.metric`): 'auto' takes acc_norm where the task reports it, else acc; a
likelihood-only custom task has bits_per_byte (and perplexity where finite), where lower is
better. 'acc' or 'acc_norm' put that metric first; 'gold_ll' (the gold continuation's mean
per-token log-likelihood, continuous and less noisy) is required of every task. Best checkpoint =
the best value over steps, ties to the earliest step. The k <= m distinct best steps become the
samplers, each with its task set and blending factor α_j = s̃_j / Σ s̃_i, s̃_j = s_j / max_i s_i.
The progression ratio (best step / last step) per task is the paper's Table 1; each choice also
says whether its best value is separated from the last step's by more than noise_z combined
standard errors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import RunDir, atomic_write_text
from automixer_ops.samplers import LOWER_IS_BETTER, Sampler, Selection, TaskChoice, metric_preference


def select_samplers(rows: Iterable[dict], metric: str = "auto", noise_z: float = 1.0) -> Selection:
    """rows: dicts with step, task, metric, value and (optionally) stderr (the benchmark table)."""
    table: dict[str, dict[str, dict[int, tuple[float, float | None]]]] = {}
    for r in rows:
        table.setdefault(r["task"], {}).setdefault(r["metric"], {})[int(r["step"])] = \
            (float(r["value"]), _stderr(r.get("stderr")))
    if not table:
        raise AutomixerError("the benchmark table is empty")
    preference = metric_preference(metric)
    choices = {}
    for task, metrics in sorted(table.items()):
        chosen = next((m for m in preference if m in metrics), None)
        if chosen is None:
            hint = ("; the benchmark table predates gold_ll: rerun `automixer evaluate`" if metric == "gold_ll" else "")
            raise AutomixerError(f"task {task!r} reports none of {', '.join(preference)} "
                                 f"(has {', '.join(sorted(metrics))}){hint}")
        by_step = metrics[chosen]
        sign = -1.0 if chosen in LOWER_IS_BETTER else 1.0
        # max of (value, -step): the best value, and among equals the earliest step
        best = max(by_step, key=lambda s: (sign * by_step[s][0], -s))
        last = max(by_step)
        (best_value, best_se), (last_value, last_se) = by_step[best], by_step[last]
        choices[task] = TaskChoice(task, chosen, best, best_value, last, last_value, best / last if last else 1.0,
                                   best_stderr=best_se, last_stderr=last_se,
                                   separated=_separated(best, last, best_value, last_value, best_se, last_se,
                                                        noise_z))
    steps = sorted({c.best_step for c in choices.values()})
    top = max(steps)
    scaled = {s: (s / top if top else 1.0) for s in steps}
    total = sum(scaled.values())
    samplers = [Sampler(step=s, tasks=sorted(t for t, c in choices.items() if c.best_step == s),
                        alpha=scaled[s] / total) for s in steps]
    return Selection(choices, samplers, metric=metric, noise_z=noise_z)


def _stderr(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _separated(best: int, last: int, best_value: float, last_value: float, best_se: float | None,
               last_se: float | None, noise_z: float) -> bool | None:
    """Whether the best value differs from the last step's by more than noise_z combined standard errors."""
    if best == last or best_se is None or last_se is None:
        return None
    return abs(best_value - last_value) > noise_z * math.sqrt(best_se ** 2 + last_se ** 2)


def select(run_dir: Path, metric: str = "auto", noise_z: float = 1.0) -> Selection:
    import pyarrow.parquet as pq

    run = RunDir(run_dir)
    bench = run.benchmark
    if not bench.is_file():
        raise AutomixerError(f"{bench}: not found; run `automixer evaluate` first")
    rows = pq.read_table(bench).to_pylist()
    selection = select_samplers(rows, metric=metric, noise_z=noise_z)
    for s in selection.samplers:
        s.checkpoint = str(run.checkpoint(s.step))
    selection.check(str(run.selection))
    atomic_write_text(run.selection, selection.to_json())
    plot_heatmap(rows, selection, run.heatmap)
    return selection


def plot_heatmap(rows: list[dict], selection: Selection, out: Path) -> None:
    """Tasks × checkpoint steps, colored per task (min..max of its row), best step boxed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted(selection.tasks)
    steps = sorted({int(r["step"]) for r in rows})
    values = np.full((len(tasks), len(steps)), np.nan)
    for r in rows:
        if r["task"] in selection.tasks and r["metric"] == selection.tasks[r["task"]].metric:
            values[tasks.index(r["task"]), steps.index(int(r["step"]))] = r["value"]
    shade = np.zeros_like(values)
    for i, t in enumerate(tasks):
        row = values[i]
        lo, hi = np.nanmin(row), np.nanmax(row)
        shade[i] = (row - lo) / (hi - lo) if hi > lo else 0.5
        if selection.tasks[t].metric in LOWER_IS_BETTER:
            shade[i] = 1 - shade[i]
    fig, ax = plt.subplots(figsize=(3.5 + 0.8 * len(steps), 1.2 + 0.5 * len(tasks)))
    ax.imshow(shade, cmap="viridis", aspect="auto", vmin=0, vmax=1)
    for i, t in enumerate(tasks):
        for j, s in enumerate(steps):
            if not np.isnan(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=8,
                        color="black" if shade[i, j] > 0.5 else "white")
        j = steps.index(selection.tasks[t].best_step)
        ax.add_patch(plt.Rectangle((j - 0.45, i - 0.42), 0.9, 0.84, fill=False, edgecolor="red", linewidth=2))
    ax.set_xticks(range(len(steps)), [str(s) for s in steps])
    ax.set_yticks(range(len(tasks)), [f"{t} ({selection.tasks[t].metric})" for t in tasks])
    ax.set_xlabel("checkpoint step")
    ax.set_title("metric by checkpoint (color: scaled per task; red box: best step)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
