"""`automixer mix`: draw a training set of T tokens whose group proportions are the weights.

DESIGN §2, "Mixing under a token budget":
1. allocate: group g gets w_g·T tokens; a group whose capacity (its cap, or its tokens ×
   (1 + max_repeats)) is below that stops there, and the remainder is shared among the
   other groups in proportion to their weights, until nothing is left or all are full;
2. draw: within a group, documents in descending joint score J (ties by id), repeating
   from the top (repeat = 1, 2, ...) up to max_repeats. Per-group rounding is carried to
   the next group, and a final top-up gives any budget left to groups that can still take
   a document, so the total is within one document of T unless every group is full.
The same document may appear in several groups (the paper keeps these repeats).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import RunDir, atomic_write_text, clean_stale_staging, publish, staged_directory
from automixer_ops.sqlrun import DB_NAME


@dataclass
class Group:
    name: str
    weight: float
    docs: list[tuple[str, int]]  # (id, n_tokens) in draw order: descending J, ties by id
    cap: int | None = None  # max tokens; None: no cap
    max_repeats: int = 0
    drawn: list[tuple[str, int]] = field(default_factory=list)  # (id, repeat) in draw order
    used: int = 0

    @property
    def capacity(self) -> float:
        full = sum(n for _, n in self.docs) * (1 + self.max_repeats)
        return full if self.cap is None else min(self.cap, full)

    def next_doc(self) -> tuple[str, int, int] | None:
        """(id, n_tokens, repeat) of the next draw, or None when the group can take no more."""
        if not self.docs:
            return None
        repeat, pos = divmod(len(self.drawn), len(self.docs))
        if repeat > self.max_repeats:
            return None
        doc_id, n = self.docs[pos]
        if self.cap is not None and self.used + n > self.cap:
            return None
        return doc_id, n, repeat

    def take(self) -> int:
        doc_id, n, repeat = self.next_doc()  # type: ignore[misc]
        self.drawn.append((doc_id, repeat))
        self.used += n
        return n


def allocate(groups: list[Group], budget: float) -> dict[str, float]:
    """Water-filling: weights' shares of the budget, capped at capacity, remainder shared again."""
    alloc = {g.name: 0.0 for g in groups}
    active = [g for g in groups if g.weight > 0 and g.capacity > 0]
    remaining = float(budget)
    while remaining > 1e-9 and active:
        total_w = sum(g.weight for g in active)
        share = {g.name: remaining * g.weight / total_w for g in active}
        full = [g for g in active if alloc[g.name] + share[g.name] >= g.capacity]
        if not full:
            for g in active:
                alloc[g.name] += share[g.name]
            break
        for g in full:
            remaining -= g.capacity - alloc[g.name]
            alloc[g.name] = g.capacity
        active = [g for g in active if g not in full]
    return alloc


def draw(groups: list[Group], budget: int) -> dict[str, float]:
    """Fill each group to its allocation (carrying rounding on), then top up; returns the allocation."""
    alloc = allocate(groups, budget)
    carry = 0.0
    for g in groups:
        target = alloc[g.name] + carry
        # the tolerance keeps float round-off in the carried sum from drawing one document too many
        while g.used < target - 1e-6 and g.next_doc() is not None:
            g.take()
        carry = target - g.used
    total = sum(g.used for g in groups)
    for g in groups:  # budget left by rounding or caps goes to whoever can still take it
        while total < budget and g.next_doc() is not None:
            total += g.take()
    return alloc


def load_groups(db: Path, cfg: Config) -> list[Group]:
    import duckdb

    caps = {c.group: c.max_tokens for c in cfg.mix.caps}
    with duckdb.connect(str(db), read_only=True) as con:
        weights = con.execute("SELECT group_name, weight FROM weights ORDER BY step").fetchall()
        unknown = set(caps) - {name for name, _ in weights}
        if unknown:
            raise AutomixerError(f"mix.caps: unknown group(s) {sorted(unknown)}; groups are "
                                 f"{[name for name, _ in weights]}")
        groups = []
        for name, weight in weights:
            docs = con.execute("""SELECT g.id, g.n_tokens FROM groups g JOIN joint_scores j USING (id)
                                  WHERE g.group_name = ? ORDER BY j.joint_utility DESC, g.id""", [name]).fetchall()
            groups.append(Group(name, weight, [(i, int(n)) for i, n in docs], caps.get(name), cfg.mix.max_repeats))
    return groups


def mix(cfg: Config, log: Callable[[str], None] = print) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = RunDir(cfg.run_dir)
    db = run.path / DB_NAME
    if not db.is_file():
        raise AutomixerError(f"{db}: not found; run `automixer regroup` first")
    groups = load_groups(db, cfg)
    alloc = draw(groups, cfg.mix.token_budget)
    occurrences = [(g.name, i, doc_id, rep) for g in groups for i, (doc_id, rep) in enumerate(g.drawn)]
    # Shuffle once with the run's seed so a trainer reading the parts in order sees a mixture.
    random.Random(cfg.run.seed).shuffle(occurrences)
    total = sum(g.used for g in groups)

    import duckdb

    clean_stale_staging(run.path)
    with staged_directory(run.path) as stage:
        out = stage / "mixture"
        out.mkdir()
        occ = pa.table({"ordinal": list(range(len(occurrences))), "group": [o[0] for o in occurrences],
                        "id": [o[2] for o in occurrences], "repeat": pa.array([o[3] for o in occurrences], pa.int32())})
        con = duckdb.connect()
        try:
            con.register("occ", occ)
            table = con.sql("""SELECT o.id, o."group", o."repeat", c.text FROM occ o
                               JOIN read_parquet(?) c USING (id) ORDER BY o.ordinal""",
                            params=[str(run.corpus / "part-*.parquet")]).to_arrow_table()
        finally:
            con.close()
        rows = cfg.mix.docs_per_part
        for k, start in enumerate(range(0, max(table.num_rows, 1), rows)):
            pq.write_table(table.slice(start, rows), out / f"part-{k:05d}.parquet", compression="zstd")
        summary = {"token_budget": cfg.mix.token_budget, "tokens": total, "documents": len(occurrences),
                   "seed": cfg.run.seed, "max_repeats": cfg.mix.max_repeats,
                   "groups": {g.name: {"weight": g.weight, "allocated_tokens": alloc[g.name], "tokens": g.used,
                                       "documents": len(g.drawn),
                                       "max_repeat": max((r for _, r in g.drawn), default=0),
                                       "cap": g.cap, "share": g.used / total if total else 0.0}
                              for g in groups}}
        atomic_write_text(out / "weights.json", json.dumps(summary, indent=2) + "\n")
        # Megatron-LM --data-path style: "<weight> <prefix>" pairs, one prefix per group, as
        # tools/preprocess_data.py --output-prefix <group> names its output.
        blend = " ".join(f"{g.used / total:.6f} {g.name}_text_document" for g in groups if total and g.used)
        atomic_write_text(out / "blend.txt", blend + "\n")
        publish(out, run.path / "mixture")
    record_mixture(db, run.path / "mixture", run.corpus)
    log(f"mixture: {len(occurrences):,} documents, {total:,} tokens (budget {cfg.mix.token_budget:,})")
    return run.path / "mixture"


def record_mixture(db: Path, mixture: Path, corpus: Path) -> None:
    """The drawn occurrences as table `mixture` of automixer.duckdb (no text), for SQL inspection."""
    import duckdb

    with duckdb.connect(str(db)) as con:
        con.execute("""CREATE OR REPLACE TABLE mixture AS
                       SELECT m.id, m."group" AS group_name, m."repeat", c.n_tokens
                       FROM read_parquet($mixture) m JOIN read_parquet($corpus) c USING (id)
                       ORDER BY group_name, m."repeat", m.id""",
                    {"mixture": str(mixture / "part-*.parquet"), "corpus": str(corpus / "part-*.parquet")})
