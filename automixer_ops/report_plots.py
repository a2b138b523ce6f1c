"""The report's plots, each rendered by matplotlib (Agg, no display) into PNG bytes.

matplotlib because it is already a dependency (the benchmark heatmap and the experiment plot use it), draws
static PNGs that embed in a self-contained page, and needs no browser or JavaScript. Each function takes the
plain numbers of report_data and returns the PNG; report_html writes the file and embeds the same bytes.
"""

from __future__ import annotations

import io

from automixer_ops.report_data import MixtureGroup, Overlap, ShardScoring, UtilityHistogram

DPI = 110


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buf = io.BytesIO()
    fig.tight_layout()
    # No metadata: the same numbers give the same bytes (matplotlib stamps its version and the Software tag).
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def utility_histogram(h: UtilityHistogram, group: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    width = (h.hi - h.lo) / len(h.counts) if h.hi > h.lo else 1.0
    lefts = [h.lo + i * width for i in range(len(h.counts))]
    ax.bar(lefts, h.counts, width=width, align="edge", color="C0", edgecolor="white", linewidth=0.3)
    ax.axvline(h.tau, color="C3", linewidth=1.5, label=f"τ = {h.tau:.4g} (kept: utility ≥ τ)")
    ax.axvspan(h.tau, h.hi if h.hi > h.tau else h.tau + width, color="C3", alpha=0.07)
    outside = f"\n({h.below:,} below and {h.above:,} above the drawn range)" if h.below or h.above else ""
    ax.set_title(f"sampler step {h.step} ({group}): utility of {h.n:,} documents{outside}", fontsize=9)
    ax.set_xlabel("utility (higher: lowers the sampler's validation loss more)")
    ax.set_ylabel("documents")
    ax.legend(fontsize=8, loc="upper right")
    return _png(fig)


def _thousands(axis) -> None:
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


def _source_colors(sources: list[str]) -> dict[str, tuple]:
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if len(sources) <= 10 else "tab20")
    return {s: cmap(i % cmap.N) for i, s in enumerate(sources)}


def composition(rows: dict[str, dict[str, int]], sources: list[str]) -> bytes:
    """One stacked bar per row (the corpus, each group, the mixture): its tokens' shares by source."""
    plt = _pyplot()
    colors = _source_colors(sources)
    names = list(rows)
    fig, ax = plt.subplots(figsize=(7.2, 0.9 + 0.42 * len(names)))
    for y, name in enumerate(names):
        total = sum(rows[name].values()) or 1
        left = 0.0
        for s in sources:
            share = rows[name].get(s, 0) / total
            ax.barh(y, share, left=left, color=colors[s], label=s if y == 0 else None, edgecolor="white",
                    linewidth=0.4)
            left += share
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the row's tokens")
    ax.set_title("tokens by source: the corpus, each group (its kept documents), the mixture", fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _png(fig)


def source_shares(corpus: dict[str, float], mixture: dict[str, float], sources: list[str]) -> bytes:
    """Per source: its share of the corpus' tokens beside its share of the mixture's."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.75 * len(sources) + 2), 3.2))
    x = range(len(sources))
    ax.bar([i - 0.2 for i in x], [100 * corpus.get(s, 0) for s in sources], width=0.4, color="0.65",
           label="corpus (natural share)")
    ax.bar([i + 0.2 for i in x], [100 * mixture.get(s, 0) for s in sources], width=0.4, color="C0", label="mixture")
    ax.set_xticks(list(x), sources, rotation=25, ha="right")
    ax.set_ylabel("% of tokens")
    ax.set_title("the mixture's source shares against the corpus'", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def mixture_tokens(groups: list[MixtureGroup]) -> bytes:
    """Per group: planned (weight x budget), allocated (after caps) and drawn tokens, drawn split by repeat pass."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(groups) + 2), 3.4))
    x = list(range(len(groups)))
    ax.bar([i - 0.27 for i in x], [g.planned for g in groups], width=0.27, color="0.75", label="planned (weight × budget)")
    ax.bar([i for i in x], [g.allocated or 0 for g in groups], width=0.27, color="0.45",
           label="allocated (after caps, redistributed)")
    passes = sorted({r for g in groups for r in g.by_repeat})
    bottom = [0] * len(groups)
    for r in passes:
        tokens = [g.by_repeat.get(r, (0, 0))[1] for g in groups]
        ax.bar([i + 0.27 for i in x], tokens, width=0.27, bottom=bottom, color=f"C{r % 10}",
               hatch=None if r == 0 else "//", label="drawn, first pass" if r == 0 else f"drawn, repeat {r}")
        bottom = [b + t for b, t in zip(bottom, tokens)]
    ax.set_xticks(x, [g.group for g in groups])
    ax.set_ylabel("tokens")
    ax.set_title("tokens per group: planned, allocated and drawn", fontsize=9)
    _thousands(ax.yaxis)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return _png(fig)


def overlap(o: Overlap) -> bytes:
    """Shared documents as a share of the smaller group (1 on the diagonal), annotated with the counts."""
    plt = _pyplot()
    import numpy as np

    k = len(o.groups)
    frac = np.zeros((k, k))
    for i in range(k):
        for j in range(k):
            smaller = min(o.shared_docs[i][i], o.shared_docs[j][j])
            frac[i, j] = o.shared_docs[i][j] / smaller if smaller else 0.0
    fig, ax = plt.subplots(figsize=(2.4 + 0.9 * k, 1.6 + 0.7 * k))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{o.shared_docs[i][j]:,}\n({frac[i, j]:.0%})", ha="center", va="center", fontsize=8,
                    color="white" if frac[i, j] > 0.6 else "black")
    ax.set_xticks(range(k), o.groups, rotation=25, ha="right")
    ax.set_yticks(range(k), o.groups)
    ax.set_title("documents in both groups (share of the smaller group)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig)


def loss_curve(log: list[dict], sampler_steps: list[int]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    ax.plot([r["step"] for r in log], [r["loss"] for r in log], color="C0", linewidth=1.2, label="training loss")
    for i, s in enumerate(sampler_steps):
        ax.axvline(s, color="C3", linestyle="--", linewidth=0.9, label="sampler checkpoint" if i == 0 else None)
    ax.set_xlabel("proxy training step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("the proxy's training loss", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def scoring_throughput(shards: list[ShardScoring]) -> bytes:
    """Tokens per second of each timed score part, one series per sampler."""
    plt = _pyplot()
    timed = [s for s in shards if s.tokens_per_s is not None]
    steps = sorted({s.step for s in timed})
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for c, step in enumerate(steps):
        mine = [s for s in timed if s.step == step]
        ax.plot(range(len(mine)), [s.tokens_per_s for s in mine], "o-", color=f"C{c % 10}", markersize=3,
                linewidth=0.8, label=f"sampler step {step}")
    ax.set_xlabel("shard (in name order)")
    ax.set_ylabel("tokens / s")
    _thousands(ax.yaxis)
    ax.set_ylim(bottom=0)
    ax.set_title("scoring throughput per shard", fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def stage_weights(stages: dict[str, dict[str, float]]) -> bytes:
    """TiKMiX: each group's weight per stage (for report_data.tikmix_stages, once TiKMiX writes stages)."""
    plt = _pyplot()
    names = list(stages)
    groups = sorted({g for w in stages.values() for g in w})
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for c, g in enumerate(groups):
        ax.plot(range(len(names)), [stages[s].get(g, 0.0) for s in names], "o-", color=f"C{c % 10}", label=g)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("weight")
    ax.set_title("TiKMiX: group weights per stage", fontsize=9)
    ax.legend(fontsize=7)
    return _png(fig)
