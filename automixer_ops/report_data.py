"""What the HTML report shows, read from the run as plain numbers (formatting is report_html's job).

Every number comes from a file the run already has: the tables of automixer.duckdb, the corpus and
score Parquet files (read through DuckDB, which only reads the columns a query names), the mixture's
weights.json, proxy/train_log.jsonl and eval/benchmark.parquet. Nothing is scored, evaluated or
regrouped again, so the report stays a few seconds at the end of every DAG run. What a run may lack
(no proxy log for linked checkpoints, no benchmark table for a hand-written selection, score files
without timings) is None or empty, and the page says so instead of failing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from automixer_ops.config import Config
from automixer_ops.rundir import RunDir, parquet_metadata
from automixer_ops.samplers import Selection
from automixer_ops.sqlrun import literal_paths

HISTOGRAM_BINS = 40
HISTOGRAM_QUANTILES = (0.005, 0.995)  # the x range of a utility histogram: heavy tails would squash the rest
SHARD_SECONDS_KEY = "seconds"  # score part metadata: seconds spent scoring the shard (written by score, if it does)
SOURCE = "coalesce(source, '(no source)')"  # a hand-written corpus may leave it null
SHARD_TOKENS_KEY = "scored_tokens"  # score part metadata: tokens the scorer read (documents cut to max_seq_len)


@dataclass
class SamplerInfo:
    step: int
    group: str
    alpha: float
    tasks: list[str]
    tau: float
    n_scored: int
    n_kept: int
    n_above: int
    n_at: int


@dataclass
class WeightRow:
    """One row of the DuckDB `weights` table, the weight exactly as stored."""
    group: str
    step: int
    n_docs: int
    n_tokens: int
    influence_density: float
    weight: float


@dataclass
class UtilityHistogram:
    """A sampler's utilities over the corpus: bins over [lo, hi] (the 0.5th..99.5th percentile, widened to
    hold tau), and the documents outside that range counted apart."""
    step: int
    tau: float
    n: int
    minimum: float
    maximum: float
    mean: float
    median: float
    lo: float
    hi: float
    counts: list[int]
    below: int
    above: int


@dataclass
class MixtureGroup:
    group: str
    weight: float
    planned: float  # weight x token budget: the share before caps and redistribution
    allocated: float | None  # weights.json: after caps and redistribution (what mix aimed at)
    tokens: int  # drawn: the mixture table's tokens of the group, repeats included
    draws: int
    distinct: int
    capacity: int | None
    cap: int | None
    by_repeat: dict[int, tuple[int, int]]  # repeat pass -> (draws, tokens); 0 is the first pass


@dataclass
class Overlap:
    """How much the groups share: shared[i][j] documents (and tokens) in both group i and group j (the
    diagonal: the group's size), and how many documents sit in exactly k groups."""
    groups: list[str]
    shared_docs: list[list[int]]
    shared_tokens: list[list[int]]
    membership: dict[int, int]


@dataclass
class ShardScoring:
    step: int
    shard: str
    docs: int
    tokens: int  # the documents' full token counts (n_tokens)
    seconds: float | None  # None: the score part does not record its scoring time
    scored_tokens: int | None

    @property
    def tokens_per_s(self) -> float | None:
        if not self.seconds:
            return None
        return (self.scored_tokens if self.scored_tokens is not None else self.tokens) / self.seconds


@dataclass
class ExperimentData:
    """An experiment's results, as the blocks experiment_table computes from results.parquet."""
    directory: Path
    name: str
    baseline: str
    methods: list[str]
    kinds: dict[str, str]
    blocks: list  # experiment_table.Block
    plot_png: bytes | None


@dataclass
class ReportData:
    run_id: str
    run_path: Path
    info: dict  # mixture_info
    checks: list[dict]
    selection: Selection
    samplers: list[SamplerInfo]
    weights: list[WeightRow]
    benchmark: list[dict] | None
    histograms: list[UtilityHistogram]
    corpus_sources: dict[str, int]  # source -> tokens
    group_sources: dict[str, dict[str, int]]  # group -> source -> tokens (the group's documents)
    mixture_sources: dict[str, int]  # source -> tokens drawn (repeats included)
    mixture: list[MixtureGroup]
    overlap: Overlap
    train_log: list[dict] | None
    shards: list[ShardScoring]
    outputs: list[tuple[str, int]]  # (path relative to report/, size in bytes)
    experiment: ExperimentData | None = None
    tikmix_stages: dict[str, dict[str, float]] | None = field(default=None)


def collect(cfg: Config, info: dict, checks: list[dict], selection: Selection,
            experiment: ExperimentData | None = None) -> ReportData:
    import duckdb

    run = RunDir(cfg.run_dir)
    corpus = literal_paths(run.corpus_files())
    with duckdb.connect(str(run.db), read_only=True) as con:
        con.execute("SET enable_progress_bar = false")
        samplers = read_samplers(con, selection)
        weights = [WeightRow(*r) for r in con.execute(
            "SELECT group_name, step, n_docs, n_tokens, influence_density, weight FROM weights ORDER BY step").fetchall()]
        histograms = [utility_histogram(con, run, s.step, s.tau) for s in samplers]
        corpus_sources = dict(con.execute(f"SELECT {SOURCE}, sum(n_tokens)::BIGINT FROM read_parquet($c) "
                                          "GROUP BY ALL ORDER BY ALL", {"c": corpus}).fetchall())
        group_sources: dict[str, dict[str, int]] = {w.group: {} for w in weights}
        for g, src, n in con.execute(f"""SELECT g.group_name, {SOURCE}, sum(c.n_tokens)::BIGINT
                                        FROM groups g JOIN read_parquet($c) c USING (id) GROUP BY ALL ORDER BY ALL""",
                                     {"c": corpus}).fetchall():
            group_sources.setdefault(g, {})[src] = n
        mixture_sources = dict(con.execute(f"""SELECT {SOURCE}, sum(m.n_tokens)::BIGINT FROM mixture m
                                              JOIN read_parquet($c) c USING (id) GROUP BY ALL ORDER BY ALL""",
                                           {"c": corpus}).fetchall())
        mixture = mixture_groups(con, run, weights, info)
        overlap = group_overlap(con)
    return ReportData(
        run_id=cfg.run.id, run_path=run.path, info=info, checks=checks, selection=selection, samplers=samplers,
        weights=weights, benchmark=read_benchmark(run), histograms=histograms, corpus_sources=corpus_sources,
        group_sources=group_sources, mixture_sources=mixture_sources, mixture=mixture, overlap=overlap,
        train_log=read_train_log(run), shards=shard_scoring(run, [s.step for s in samplers]),
        outputs=outputs(run), experiment=experiment, tikmix_stages=tikmix_stages(run))


def read_samplers(con, selection: Selection) -> list[SamplerInfo]:
    """The samplers as regroup used them (DuckDB samplers + thresholds), with their tasks from selection.json."""
    tasks = {s.step: s.tasks for s in selection.samplers}
    rows = con.execute("""SELECT sm.step, sm.group_name, sm.alpha, t.tau, t.n_scored, t.n_kept, t.n_above, t.n_at
                          FROM samplers sm JOIN thresholds t USING (step) ORDER BY sm.step""").fetchall()
    return [SamplerInfo(step, group, alpha, tasks.get(step, []), tau, *counts)
            for step, group, alpha, tau, *counts in rows]


def utility_histogram(con, run: RunDir, step: int, tau: float) -> UtilityHistogram:
    """The binning runs in DuckDB: a corpus of millions of documents never comes into Python."""
    files = literal_paths(run.score_parts([step]))
    src = "(SELECT CAST(utility AS DOUBLE) AS u FROM read_parquet($f, hive_partitioning = false))"
    n, mn, mx, mean, median, qlo, qhi = con.execute(
        f"SELECT count(*), min(u), max(u), avg(u), median(u), quantile_cont(u, $qlo), quantile_cont(u, $qhi) "
        f"FROM {src}", {"f": files, "qlo": HISTOGRAM_QUANTILES[0], "qhi": HISTOGRAM_QUANTILES[1]}).fetchone()
    lo, hi = min(qlo, tau), max(qhi, tau)
    width = (hi - lo) / HISTOGRAM_BINS if hi > lo else 1.0
    counts, below, above = [0] * HISTOGRAM_BINS, 0, 0
    rows = con.execute(f"""SELECT CASE WHEN u < $lo THEN -1 WHEN u > $hi THEN {HISTOGRAM_BINS}
                                       ELSE least(floor((u - $lo) / $w), {HISTOGRAM_BINS - 1}) END::BIGINT AS b,
                                  count(*) FROM {src} GROUP BY b""",
                       {"f": files, "lo": lo, "hi": hi, "w": width}).fetchall()
    for b, c in rows:
        if b < 0:
            below = c
        elif b >= HISTOGRAM_BINS:
            above = c
        else:
            counts[b] = c
    return UtilityHistogram(step, tau, n, mn, mx, mean, median, lo, hi, counts, below, above)


def mixture_groups(con, run: RunDir, weights: list[WeightRow], info: dict) -> list[MixtureGroup]:
    """Planned (weight x budget), allocated (weights.json, after caps) and drawn (the mixture table) per group."""
    drawn = {g: (n, d, t) for g, n, d, t in con.execute(
        "SELECT group_name, count(*), count(DISTINCT id), sum(n_tokens)::BIGINT FROM mixture GROUP BY ALL").fetchall()}
    by_repeat: dict[str, dict[int, tuple[int, int]]] = {}
    for g, r, n, t in con.execute('SELECT group_name, "repeat", count(*), sum(n_tokens)::BIGINT FROM mixture '
                                  "GROUP BY ALL ORDER BY ALL").fetchall():
        by_repeat.setdefault(g, {})[r] = (n, t)
    recorded = json.loads((run.mixture / "weights.json").read_text(encoding="utf-8")).get("groups", {})
    out = []
    for w in weights:
        n, d, t = drawn.get(w.group, (0, 0, 0))
        g = recorded.get(w.group, {})
        out.append(MixtureGroup(w.group, w.weight, w.weight * info["token_budget"], g.get("allocated_tokens"), t, n,
                                d, g.get("capacity"), g.get("cap"), by_repeat.get(w.group, {})))
    return out


def group_overlap(con) -> Overlap:
    """From joint_scores' groups_mask (bit 2^slot per group holding the document): one scan, then per
    distinct mask, which is cheaper than joining the groups table with itself."""
    slots = con.execute("SELECT group_name, bit FROM samplers ORDER BY step").fetchall()
    groups = [g for g, _ in slots]
    docs = [[0] * len(groups) for _ in groups]
    tokens = [[0] * len(groups) for _ in groups]
    membership: dict[int, int] = {}
    for mask, n, t in con.execute("SELECT groups_mask, count(*), sum(n_tokens)::BIGINT FROM joint_scores "
                                  "WHERE groups_mask <> 0 GROUP BY ALL").fetchall():
        inside = [i for i, (_, bit) in enumerate(slots) if mask & bit]
        membership[len(inside)] = membership.get(len(inside), 0) + n
        for i in inside:
            for j in inside:
                docs[i][j] += n
                tokens[i][j] += t
    return Overlap(groups, docs, tokens, dict(sorted(membership.items())))


def read_benchmark(run: RunDir) -> list[dict] | None:
    if not run.benchmark.is_file():
        return None
    import pyarrow.parquet as pq

    return pq.read_table(run.benchmark).to_pylist()  # checkpoints x tasks x metrics: a few hundred rows


def read_train_log(run: RunDir) -> list[dict] | None:
    """The proxy's logged steps (step, loss, lr, tokens_per_s); None when the run trained no proxy."""
    path = run.proxy / "train_log.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run: the rest of the log still reads
            continue
        if isinstance(row, dict) and "step" in row and "loss" in row:
            rows.append(row)
    return rows or None


def shard_scoring(run: RunDir, steps: list[int]) -> list[ShardScoring]:
    """Documents and tokens per score part (DuckDB), and its scoring time where the part's metadata records it."""
    import duckdb

    out = []
    with duckdb.connect() as con:
        for step in steps:
            parts = run.score_parts([step])
            if not parts:
                continue
            counts = {Path(f).name: (n, t) for f, n, t in con.execute(
                "SELECT filename, count(*), sum(n_tokens)::BIGINT FROM read_parquet($f, filename = true, "
                "hive_partitioning = false) GROUP BY filename", {"f": literal_paths(parts)}).fetchall()}
            for p in parts:
                meta = parquet_metadata(p)
                n, t = counts.get(p.name, (0, 0))
                out.append(ShardScoring(step, p.name, n, t, _number(meta.get(SHARD_SECONDS_KEY), float),
                                        _number(meta.get(SHARD_TOKENS_KEY), int)))
    return out


def _number(text: str | None, kind):
    try:
        return kind(text) if text is not None else None
    except ValueError:
        return None


def outputs(run: RunDir) -> list[tuple[str, int]]:
    """The run's outputs that exist, as paths relative to report/ (so the links work from file:// and from a
    server that serves the runs root in the same layout), with their sizes."""
    report = run.report
    candidates = [run.db, run.mixture / "weights.json", run.mixture / "blend.txt",
                  *sorted(run.mixture.glob("part-*.parquet")), report / "summary.md", report / "invariants.json",
                  run.selection, run.benchmark, run.proxy / "train_log.jsonl", run.config]
    found = []
    for p in candidates:
        if p.is_file():
            rel = p.name if p.parent == report else "../" + p.relative_to(run.path).as_posix()
            found.append((rel, p.stat().st_size))
    return found


def tikmix_stages(run: RunDir) -> dict[str, dict[str, float]] | None:
    """TiKMiX's weights ({label: {group: weight}}) from every tikmix.duckdb under <run>/tikmix/ (the static
    mixtures' `tikmix_weights` versions, then each dynamic run's stages in order); None when the run has none."""
    import duckdb

    out: dict[str, dict[str, float]] = {}
    for db in sorted((run.path / "tikmix").rglob("tikmix.duckdb")):
        try:
            with duckdb.connect(str(db), read_only=True) as con:
                rows = con.execute("SELECT version, stage, group_name, weight FROM tikmix_weights "
                                   "ORDER BY version LIKE 'dynamic-%', stage, version, group_name").fetchall()
        except duckdb.Error:  # no such table yet (only Group Influence recorded), or being written
            continue
        for version, stage, group, weight in rows:
            label = version.replace(f"-stage-{stage}", f" · stage {stage}") if version.startswith("dynamic-") else version
            out.setdefault(label, {})[group] = float(weight)
    return out or None


def read_experiment(directory: Path) -> ExperimentData:
    """An experiment directory's results.parquet (required), experiment.json (its baseline and method order)
    and plot.png (embedded when present)."""
    from automixer_ops.errors import AutomixerError
    from automixer_ops.experiment_table import read_results, render_table

    directory = Path(directory)
    spec = directory / "experiment.json"
    if not spec.is_file():
        raise AutomixerError(f"--experiment {directory}: no experiment.json; give the directory "
                             "`automixer experiment` wrote (e.g. experiments/demo)")
    try:
        meta = json.loads(spec.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise AutomixerError(f"{spec}: not valid JSON ({e.msg} at line {e.lineno})") from None
    rows = read_results(directory / "results.parquet")
    methods = [m["name"] for m in meta.get("methods", []) if isinstance(m, dict) and "name" in m]
    kinds = {m["name"]: m.get("kind", "") for m in meta.get("methods", []) if isinstance(m, dict) and "name" in m}
    for r in rows:  # methods with results that the file does not list, in the results' order
        if r["method"] not in methods:
            methods.append(r["method"])
            kinds.setdefault(r["method"], r.get("kind") or "")
    baseline = meta.get("baseline") or methods[0]
    _, blocks = render_table(rows, baseline, {"methods": [(m, kinds.get(m)) for m in methods]})
    plot = directory / "plot.png"
    return ExperimentData(directory.resolve(), str(meta.get("name") or directory.name), baseline, methods, kinds,
                          blocks, plot.read_bytes() if plot.is_file() else None)
