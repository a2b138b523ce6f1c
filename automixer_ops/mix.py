"""`automixer mix`: draw a training set of T tokens whose group proportions are the weights.

DESIGN §2, "Mixing under a token budget":
1. capacity: what each group can give, its tokens × (1 + max_repeats) or up to its cap, is
   known before drawing; a budget above the total is an error with the numbers, unless
   `mix.underfill: allow` (then everything is drawn and every output says it falls short);
2. allocate: group g gets w_g·T tokens; a group whose capacity is below that stops there,
   and the remainder is shared among the other groups in proportion to their weights;
3. draw: within a group, documents in descending joint score J (ties by id), repeating
   from the top (repeat = 1, 2, ...) up to max_repeats. Per-group rounding is carried to
   the next group, and a final top-up gives any budget left to groups that can still take
   a document, so the total is within one document of T.

The draw runs in DuckDB, held to `regroup.memory_limit` and spilling past it: each group's
draw order is a table of (position, cumulative tokens), sorted only as far down as a draw
can reach (budget + one document, or the cap), a group's draw is a count of occurrences
found by binary search on it, and the mixture is streamed from SQL to Parquet in bounded
batches. Python holds a few numbers per group, never the rows or their text.
The same document may appear in several groups (the paper keeps these repeats).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError
from automixer_ops.mixture_io import BATCH_ROWS, write_parts_from_sql
from automixer_ops.progress import duckdb_percent, heartbeat, watch_duckdb
from automixer_ops.rundir import (RunDir, atomic_write_text, clean_stale_staging, fingerprint, publish,
                                  staged_directory)
from automixer_ops.sqlrun import connect, literal_paths, read_provenance, stale_inputs

EPS = 1e-6  # float round-off in a carried quota must not draw one document too many


class DrawOrder(Protocol):
    """A group's documents in draw order (descending J, ties by id)."""

    docs: int  # m
    tokens: int  # N, the tokens of one pass

    def prefix(self, p: int) -> int:
        """Tokens of the first p documents, 0 <= p <= m."""


@dataclass
class ListOrder:
    """A draw order held in a list of token counts (small groups, tests)."""

    lengths: list[int]

    def __post_init__(self):
        self._prefix = [0]
        for n in self.lengths:
            self._prefix.append(self._prefix[-1] + n)
        self.docs, self.tokens = len(self.lengths), self._prefix[-1]

    def prefix(self, p: int) -> int:
        return self._prefix[p]


class TableOrder:
    """A draw order read from the temporary DuckDB table draw_order(group_name, pos, cum_before).

    The table may hold only the first `held` documents of the group (mix sorts no more than a draw can
    reach): past them, prefix() answers a stand-in that keeps growing from the tokens held, which is above
    every bound the draw asks about (see _needed_tokens), so the binary searches land inside what is held."""

    def __init__(self, con, group: str, docs: int, tokens: int, held: int, held_tokens: int):
        self.con, self.group, self.docs, self.tokens, self.held = con, group, docs, tokens, held
        self._cache: dict[int, int] = {0: 0, docs: tokens, held: held_tokens}

    def prefix(self, p: int) -> int:
        if p > self.held:  # monotone, above what is held, never past the group's tokens
            return min(self.tokens, self._cache[self.held] + (p - self.held))
        if p not in self._cache:
            (self._cache[p],) = self.con.execute(
                "SELECT cum_before FROM draw_order WHERE group_name = ? AND pos = ?", [self.group, p]).fetchone()
        return self._cache[p]


@dataclass
class Group:
    """A group's share of the draw: occurrence k is document k % m of pass k // m (repeat = k // m)."""

    name: str
    weight: float
    order: DrawOrder
    cap: int | None = None  # max tokens; None: no cap
    max_repeats: int = 0
    taken: int = 0  # occurrences drawn so far: always a prefix of the occurrence sequence

    @property
    def limit(self) -> int:
        return self.order.docs * (1 + self.max_repeats)

    def cum(self, k: int) -> int:
        """Tokens of the first k occurrences."""
        m = self.order.docs
        return (k // m) * self.order.tokens + self.order.prefix(k % m) if m else 0

    @property
    def used(self) -> int:
        return self.cum(self.taken)

    def _first(self, pred: Callable[[int], bool]) -> int:
        """The smallest k in [0, limit] with pred(k), pred monotone (false, then true); limit + 1 if none."""
        lo, hi = 0, self.limit + 1
        while lo < hi:
            mid = (lo + hi) // 2
            if pred(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo

    def _cap_count(self) -> int:
        """The most occurrences whose tokens stay within the cap (all of them without one)."""
        if self.cap is None:
            return self.limit
        return self._first(lambda k: self.cum(k) > self.cap) - 1

    @property
    def capacity(self) -> int:
        """The tokens this group can give: every pass, or up to its cap (whole documents)."""
        return self.cum(self._cap_count())

    def fill_below(self, bound: float) -> int:
        """Take occurrences while the tokens before the next one are below `bound` (and it fits the cap and
        max_repeats): the doc-by-doc loop `while used < bound: take()`, as one binary search."""
        reach = min(self._first(lambda k: self.cum(k) >= bound), self.limit, self._cap_count())
        self.taken = max(self.taken, reach)
        return self.used


def allocate(groups: list[Group], budget: float) -> dict[str, float]:
    """Water-filling: weights' shares of the budget, capped at capacity, remainder shared again."""
    alloc = {g.name: 0.0 for g in groups}
    capacity = {g.name: g.capacity for g in groups}
    active = [g for g in groups if g.weight > 0 and capacity[g.name] > 0]
    remaining = float(budget)
    while remaining > 1e-9 and active:
        total_w = sum(g.weight for g in active)
        share = {g.name: remaining * g.weight / total_w for g in active}
        full = [g for g in active if alloc[g.name] + share[g.name] >= capacity[g.name]]
        if not full:
            for g in active:
                alloc[g.name] += share[g.name]
            break
        for g in full:
            remaining -= capacity[g.name] - alloc[g.name]
            alloc[g.name] = capacity[g.name]
        active = [g for g in active if g not in full]
    return alloc


def draw(groups: list[Group], budget: int) -> dict[str, float]:
    """Fill each group to its allocation (carrying rounding on), then top up; returns the allocation.
    Groups of weight 0 get nothing."""
    alloc = allocate(groups, budget)
    weighted = [g for g in groups if g.weight > 0]
    carry = 0.0
    for g in weighted:
        target = alloc[g.name] + carry
        g.fill_below(target - EPS)
        carry = target - g.used
    for g in weighted:  # budget left by rounding or caps goes to whoever can still take it
        total = sum(x.used for x in weighted)
        if total < budget:
            g.fill_below(g.used + (budget - total))
    return alloc


def capacity_error(groups: list[Group], budget: int, cfg: Config) -> str:
    per_group = "; ".join(f"{g.name} {g.capacity:,}" + (f" (its cap {g.cap:,})" if g.cap is not None else
                                                         f" ({g.order.tokens:,} tokens x {1 + g.max_repeats} passes)")
                          for g in groups if g.weight > 0)
    total = sum(g.capacity for g in groups if g.weight > 0)
    return (f"mix.token_budget: {budget:,} tokens is more than the groups can give: {total:,} with "
            f"mix.max_repeats {cfg.mix.max_repeats} ({per_group}); lower the budget, raise max_repeats or the "
            "caps, or set mix.underfill: allow to draw what there is")


def mix(cfg: Config, log: Callable[[str], None] = print) -> Path:
    run = RunDir(cfg.run_dir)
    db = run.db
    if not db.is_file():
        raise AutomixerError(f"{db}: not found; run `automixer regroup` first")
    caps = {c.group: c.max_tokens for c in cfg.mix.caps}
    budget = cfg.mix.token_budget
    clean_stale_staging(run.path)
    spill = run.path / ".duckdb_tmp"
    con = connect(db, cfg.regroup.memory_limit, spill)
    try:
        watch_duckdb(con)
        # DuckDB's calls (the sort of the draw order, the parts' join with the corpus) are long and say nothing.
        with heartbeat("mix", "checking the database", percent=duckdb_percent(con)) as beat:
            provenance = _check_provenance(con, run)
            beat.doing("sorting each group's draw order")
            groups = _load_groups(con, caps, cfg.mix.max_repeats, budget)
            capacity = sum(g.capacity for g in groups if g.weight > 0)
            if budget > capacity and cfg.mix.underfill == "error":
                raise AutomixerError(capacity_error(groups, budget, cfg))
            beat.doing("drawing")
            alloc = draw(groups, budget)
            total = sum(g.used for g in groups)
            underfilled = total < budget
            mix_id = fingerprint({"regroup": provenance, "budget": budget, "max_repeats": cfg.mix.max_repeats,
                                  "caps": sorted(caps.items()), "seed": cfg.run.seed, "underfill": cfg.mix.underfill})
            summary = {"mix_id": mix_id, "token_budget": budget, "tokens": total, "capacity": capacity,
                       "underfilled": underfilled, "documents": sum(g.taken for g in groups),
                       "seed": cfg.run.seed, "max_repeats": cfg.mix.max_repeats,
                       "groups": {g.name: {"weight": g.weight, "allocated_tokens": alloc[g.name], "tokens": g.used,
                                           "documents": g.taken, "capacity": g.capacity,
                                           "max_repeat": (g.taken - 1) // g.order.docs if g.taken else 0,
                                           "cap": g.cap, "share": g.used / total if total else 0.0}
                                  for g in groups}}
            if underfilled:
                summary["note"] = (f"underfilled: the groups give {total:,} of the {budget:,} tokens asked for "
                                   "(mix.underfill: allow)")
            beat.doing("recording the mixture table")
            _record_mixture(con, groups, cfg.run.seed, summary)
            with staged_directory(run.path) as stage:
                out = stage / "mixture"
                out.mkdir()
                beat.doing("writing the mixture's parts")
                _write_parts(con, run, out, cfg.mix.docs_per_part)
                atomic_write_text(out / "weights.json", json.dumps(summary, indent=2) + "\n")
                # Megatron-LM --data-path style: "<weight> <prefix>" pairs, one prefix per group, as
                # tools/preprocess_data.py --output-prefix <group> names its output.
                blend = " ".join(f"{g.used / total:.6f} {g.name}_text_document" for g in groups if total and g.used)
                atomic_write_text(out / "blend.txt", blend + "\n")
                con.execute("COMMIT")  # the mixture tables, now that the parts are written
                publish(out, run.mixture)
    finally:
        con.close()
        shutil.rmtree(spill, ignore_errors=True)
    log(f"mixture: {summary['documents']:,} documents, {total:,} tokens (budget {budget:,}"
        + (f"; UNDERFILLED: the groups can give {capacity:,}" if underfilled else "") + f") -> {run.mixture}")
    return run.mixture


def _check_provenance(con, run: RunDir) -> str:
    """The database must be built from this run's corpus, selection and score files: mixing one built from
    others would silently lose or misplace documents."""
    got = read_provenance(con)
    stale = stale_inputs(run, got)
    if stale:
        raise AutomixerError(f"{run.db}: built from another {stale} than the run has now; "
                             "rerun `automixer regroup` first")
    return fingerprint(got)


def _load_groups(con, caps: dict[str, int], max_repeats: int, budget: int) -> list[Group]:
    import duckdb

    weights = con.execute("SELECT group_name, weight, n_docs, n_tokens FROM weights ORDER BY step").fetchall()
    unknown = set(caps) - {name for name, *_ in weights}
    if unknown:
        raise AutomixerError(f"mix.caps: unknown group(s) {sorted(unknown)}; groups are "
                             f"{[name for name, *_ in weights]}")
    (longest,) = con.execute("SELECT coalesce(max(n_tokens), 0) FROM joint_scores").fetchone()
    con.execute("BEGIN TRANSACTION")
    try:
        # How far down its order each group can be drawn: the J from which on its documents are sorted.
        con.execute("CREATE OR REPLACE TEMP TABLE draw_floor (group_name VARCHAR, min_joint DOUBLE)")
        for name, _, docs, tokens in weights:
            need = _needed_tokens(int(tokens), caps.get(name), max_repeats, budget, int(longest))
            con.execute("INSERT INTO draw_floor VALUES (?, ?)", [name, _floor(con, name, int(docs), int(tokens), need)])
        # Each group's documents in draw order, with the tokens before each: the one sort of the step.
        con.execute("""CREATE OR REPLACE TEMP TABLE draw_order AS
                       SELECT g.group_name, row_number() OVER w - 1 AS pos, g.id, g.n_tokens,
                              CAST(sum(g.n_tokens) OVER w - g.n_tokens AS BIGINT) AS cum_before
                       FROM groups g JOIN draw_floor f USING (group_name)
                       WHERE f.min_joint IS NULL OR g.joint_utility >= f.min_joint
                       WINDOW w AS (PARTITION BY g.group_name ORDER BY g.joint_utility DESC, g.id
                                    ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
                       ORDER BY g.group_name, pos""")
        held = {name: (n, t) for name, n, t in con.execute(
            "SELECT group_name, count(*), CAST(coalesce(sum(n_tokens), 0) AS BIGINT) FROM draw_order GROUP BY ALL"
        ).fetchall()}
    except duckdb.Error as e:
        raise AutomixerError(f"mix: drawing order: {e}") from None
    return [Group(name, weight, TableOrder(con, name, int(docs), int(tokens), *held.get(name, (0, 0))),
                  caps.get(name), max_repeats)
            for name, weight, docs, tokens in weights]


def _needed_tokens(tokens: int, cap: int | None, max_repeats: int, budget: int, longest: int) -> int:
    """How many of a group's tokens, from the top of its order, the draw and its capacity can depend on.

    No group draws more than the whole mixture, and the mixture stops within one document of the budget
    (or at what the groups can give, below it); a cap below one pass is found within its first `cap`
    tokens, and one above it within the pass it ends in. Past that, the order does not matter."""
    need = budget + longest
    if cap is not None and cap < tokens * (1 + max_repeats):
        need = max(need, cap % tokens if tokens else 0)
    return need


def _floor(con, group: str, docs: int, tokens: int, need: int) -> float | None:
    """The joint score from which on the group's documents hold more than `need` tokens (None: all of them).
    Exact quantiles of J, widened until enough: usually one try, as J and length are not tied."""
    if need >= tokens:
        return None
    share = min(1.0, 2.0 * (need + 1) / tokens)
    while share < 1.0:
        (floor,) = con.execute("SELECT quantile_disc(joint_utility, ?) FROM groups WHERE group_name = ?",
                               [1.0 - share, group]).fetchone()
        (held,) = con.execute("SELECT sum(n_tokens) FROM groups WHERE group_name = ? AND joint_utility >= ?",
                              [group, floor]).fetchone()
        if held > need:
            return floor
        share *= 2
    return None


def _record_mixture(con, groups: list[Group], seed: int, summary: dict) -> None:
    """Tables `mixture` (one row per drawn occurrence, in the shuffled order of the parts) and `mixture_info`
    (the summary of weights.json), in the open transaction."""
    con.execute("CREATE OR REPLACE TEMP TABLE draw_counts (group_name VARCHAR, docs BIGINT, taken BIGINT)")
    con.executemany("INSERT INTO draw_counts VALUES (?, ?, ?)",
                    [(g.name, g.order.docs, g.taken) for g in groups if g.taken])
    # Shuffled once with the run's seed so a trainer reading the parts in order sees a mixture.
    con.execute("""CREATE OR REPLACE TABLE mixture AS
                   WITH drawn AS (
                       SELECT d.group_name, d.id, d.n_tokens, CAST(r.pass AS INTEGER) AS "repeat",
                              r.pass * c.docs + d.pos AS k
                       FROM draw_order d JOIN draw_counts c USING (group_name),
                            range(CAST(ceil(c.taken / c.docs) AS BIGINT)) r(pass)
                       WHERE r.pass * c.docs + d.pos < c.taken)
                   SELECT row_number() OVER (ORDER BY hash(group_name, k, $seed), group_name, k) - 1 AS ordinal,
                          id, group_name, "repeat", n_tokens
                   FROM drawn ORDER BY ordinal""", {"seed": seed})
    info = {k: v for k, v in summary.items() if k != "groups"}
    con.execute("CREATE OR REPLACE TABLE mixture_info AS SELECT unnest($k) AS key, unnest($v) AS value",
                {"k": list(info), "v": [json.dumps(v) for v in info.values()]})


def _write_parts(con, run: RunDir, out: Path, docs_per_part: int) -> None:
    """mixture/part-*.parquet: (id, group, repeat, text) in the table's order, docs_per_part rows a file,
    streamed from DuckDB in batches (the text never sits whole in Python)."""
    write_parts_from_sql(con, """SELECT m.id, m.group_name AS "group", m."repeat", c.text
                                 FROM mixture m JOIN read_parquet($corpus) c USING (id)
                                 ORDER BY m.ordinal""",
                         {"corpus": literal_paths(run.corpus_files())}, out, docs_per_part, BATCH_ROWS)
