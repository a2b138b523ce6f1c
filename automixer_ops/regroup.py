"""`automixer regroup`: scores -> thresholds, groups, joint scores, group stats, weights.

The SQL in automixer_ops/sql/ does the work (DESIGN §2, the paper's Appendix B); this
module binds its parameters (the selected samplers' score files, keep_fraction, the
samplers' steps and α from selection.json), holds the pipeline to DESIGN §3's invariants
before anything is published, and records what the tables were built from (table
`provenance`), so that `mix` can refuse a database of another corpus or selection.

Order: samplers; the input check (every corpus id has exactly one finite score per sampler,
with the corpus's n_tokens); the tables; the output checks (each cut keeps exactly k, Σρ > 0,
weights sum to 1). A failed check names the sampler, the ids and the numbers, and the
previous automixer.duckdb stays as it was.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Callable

from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError
from automixer_ops.progress import duckdb_percent, heartbeat, watch_duckdb
from automixer_ops.rundir import RunDir, parquet_metadata
from automixer_ops.samplers import Selection, read_selection, selection_fingerprint
from automixer_ops.sqlrun import (build_database, check_files, literal_paths, query_file, record_provenance,
                                  run_sql_checks, run_sql_files, sql_files)

SCORE_COLUMNS = {"id": "string", "utility": "number", "n_tokens": "integer"}
MAX_SAMPLERS = 64
MAX_POSITIONAL_TIES = 10_000  # ties at a cut, per sampler, found by position in the positional join
QUANTILE_SCALE = 18  # decimal digits of the bound quantile: exact index for corpora up to 10^18 documents


def regroup(cfg: Config, log: Callable[[str], None] = print) -> Path:
    run = RunDir(cfg.run_dir)
    selection = read_selection(run)
    if len(selection.samplers) > MAX_SAMPLERS:
        raise AutomixerError(f"{run.selection}: {len(selection.samplers)} samplers; regroup handles at most "
                             f"{MAX_SAMPLERS} (one bit each in joint_units.groups_mask)")
    score_files = selected_score_files(run, selection)
    steps = [s.step for s in selection.samplers]
    corpus_files = run.corpus_files()
    n_docs = sum(_num_rows(p) for p in corpus_files)
    keep_k, keep_q = keep_count(cfg.regroup.keep_fraction, n_docs)
    joined: dict[str, str] = {}
    params = {"score_files": literal_paths(score_files), "corpus_files": literal_paths(corpus_files),
              "n_corpus_files": len(corpus_files),
              "sampler_steps": steps,
              "sampler_alphas": [s.alpha for s in selection.samplers],
              "keep_k": keep_k, "keep_quantile": keep_q}

    def build(con) -> None:
        watch_duckdb(con)
        beat.percent = duckdb_percent(con)

        def run_files(selected) -> None:  # one file at a time, so the heartbeat names the one running
            for f in selected:
                beat.doing(f.name)
                run_sql_files(con, [f], params)

        files = sql_files(variants={cfg.regroup.joint})
        run_files([f for f in files if f.name[:3] <= "02_"])  # samplers, score_stats
        beat.doing("checking the scores against the corpus")
        _require(con, check_files("01_"), params)  # the inputs, before any table is built from them
        beat.doing("tau of each sampler (queries/kth_largest.sql)")
        params["kth_largest"] = [_kth_largest(con, run, step, params) for step in steps]
        run_files([f for f in files if "02_" < f.name[:3] < "05_"])
        beat.doing("checking the score files' order (queries/corpus_position_checksum.sql)")
        joined["by"] = "position" if _aligned(con, run, steps, params) else "id"
        if joined["by"] == "position":  # the same table, without hashing ids (see positional_joint_units)
            beat.doing("joint_units by position")
            con.execute(*positional_joint_units(cfg.regroup.joint, run, steps, con))
        else:
            run_files([f for f in files if f.name[:3] == "05_"])
        run_files([f for f in files if f.name[:3] > "05_"])
        beat.doing("checking the tables")
        _check_thresholds(con, keep_k)
        _check_densities(con)
        _require(con, check_files("02_"), params)
        record_provenance(con, {"corpus": run.corpus_fingerprint(), "selection": selection_fingerprint(run),
                                "scores": run.scores_fingerprint(steps), "keep_fraction": cfg.regroup.keep_fraction,
                                "joint": cfg.regroup.joint, "documents": n_docs, "kept_per_sampler": keep_k,
                                "joined_by": joined["by"]})
        beat.percent = None  # the connection closes once the database is written
        beat.doing(f"writing {run.db.name}")

    db = run.db
    with heartbeat("regroup", "opening the database") as beat:  # DuckDB's calls are long and say nothing
        build_database(db, build, cfg.regroup.memory_limit)
    log(f"regrouped {len(selection.samplers)} sampler(s) of {n_docs:,} documents, keeping {keep_k:,} each "
        f"(keep_fraction {cfg.regroup.keep_fraction}, joint: {cfg.regroup.joint}; scores joined by {joined['by']}) "
        f"into {db}")
    return db


def keep_count(keep_fraction: float, n: int) -> tuple[int, Decimal]:
    """k = ceil(keep_fraction * n) in exact arithmetic (0.3 * 10 keeps 3, not 4), and the discrete quantile
    q whose value is the k-th largest: any q in ((n-k)/n, (n-k+1)/n] is; this one is (n-k+1)/n rounded down
    to QUANTILE_SCALE digits."""
    if n < 1:
        raise AutomixerError("regroup: the corpus has no documents")
    k = max(1, math.ceil(Fraction(repr(keep_fraction)) * n))
    q = Decimal((n - k + 1) * 10 ** QUANTILE_SCALE // n).scaleb(-QUANTILE_SCALE)
    return k, q


def selected_score_files(run: RunDir, selection: Selection) -> list[Path]:
    """Exactly the score parts of the selected samplers: each directory must have parts, every part the
    columns regroup reads (a corrupt file or a utility held as text is named here, not in a DuckDB
    traceback), and all from the sampler's current fit. Other directories under scores/ are not read."""
    files = []
    for s in selection.samplers:
        out = run.sampler_scores(s.step)
        parts = run.score_parts([s.step])
        if not parts:
            raise AutomixerError(f"{out}: no score shards for sampler step {s.step}; run `automixer score` first")
        for p in parts:
            _check_score_schema(p)
        _check_parts_of_one_fit(out, parts, s.step)
        files += parts
    return files


def _check_score_schema(path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise AutomixerError(f"{path}: not a readable Parquet file ({e}); rerun `automixer score`") from None
    kinds = {"string": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t),
             "number": lambda t: pa.types.is_floating(t) or pa.types.is_integer(t),
             "integer": pa.types.is_integer}
    for name, kind in SCORE_COLUMNS.items():
        if name not in schema.names:
            raise AutomixerError(f"{path}: no column {name!r} (a score file has {', '.join(SCORE_COLUMNS)})")
        if not kinds[kind](schema.field(name).type):
            raise AutomixerError(f"{path}: column {name!r} is {schema.field(name).type}, expected {kind}")


def _check_parts_of_one_fit(out: Path, parts: list[Path], step: int) -> None:
    """Where `automixer score` made the fit (fit.json), every part must carry that fit's fingerprint: a part
    left by an earlier fit (a shard job that ran on while the fit was redone) has the right ids and would pass
    the coverage checks. Scores without a fit.json (made elsewhere) are taken as they are."""
    if not (out / "fit.json").is_file():
        return
    try:
        fit = json.loads((out / "fit.json").read_text())["fingerprint"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise AutomixerError(f"{out / 'fit.json'}: unreadable or without 'fingerprint'; rerun "
                             f"`automixer score --step {step} --force`") from None
    stale = [p.name for p in parts if parquet_metadata(p).get("fit") != fit]
    if stale:
        raise AutomixerError(f"{out}: {len(stale)} score shard(s) not made with the sampler's current fit "
                             f"(fit.json), e.g. {stale[0]}; rerun `automixer score --step {step}`")


def _kth_largest(con, run: RunDir, step: int, params: dict) -> float:
    """tau of one sampler: an exact quantile of its own files only (one sampler's values in memory at a time)."""
    return query_file(con, "queries/kth_largest.sql",
                      {**params, "step_files": literal_paths(run.score_parts([step]))})[0][0]


def _aligned(con, run: RunDir, steps: list[int], params: dict) -> bool:
    """Whether every sampler's score parts list the corpus's ids in the corpus's own shards and order (as
    `automixer score` writes them): the same part names, and the same hashes of (id, n_tokens) mixed with
    their (file, row) as the corpus. Then joint_units is a positional scan of the files; else an aggregation
    by id, the same table."""
    names = [p.name for p in run.corpus_shards()]
    if any([p.name for p in run.score_parts([step])] != names for step in steps):
        return False
    (corpus,) = query_file(con, "queries/corpus_position_checksum.sql", params)[0]
    if any(checksum != corpus for (checksum,) in con.execute("SELECT position_checksum FROM score_stats").fetchall()):
        return False
    (ties,) = con.execute("SELECT max(n_kept - n_above) FROM thresholds").fetchone()
    return ties <= MAX_POSITIONAL_TIES  # their places are bound as a list per sampler


def positional_joint_units(joint: str, run: RunDir, steps: list[int], con) -> tuple[str, dict]:
    """joint_units by a positional scan of the corpus and each sampler's score files (aligned: _aligned).

    No hash table of ids: each row of the corpus meets its utilities in the samplers' files at the same place.
    The statement has one column and one term per sampler, so it is written here for the run's samplers (the
    structure only: every value is bound). It computes what 05_joint_units.<joint>.sql does, in the same
    integer units, so both give the same bits; the ties kept at tau_j are found by their place."""
    cut = {step: (tau, bit, factor) for step, tau, bit, factor in con.execute(
        "SELECT t.step, t.tau, sm.bit, sm.alpha / s.unit FROM thresholds t JOIN samplers sm USING (step), "
        "(FROM scale_unit) s").fetchall()}
    ties = dict(con.execute("SELECT step, list(pos) FROM tie_keeps GROUP BY step").fetchall())
    params: dict = {"corpus_files": literal_paths(run.corpus_files())}
    scans, terms, units, masks = [], [], [], []
    for j, step in enumerate(steps):
        tau, bit, factor = cut[step]
        params.update({f"files_{j}": literal_paths(run.score_parts([step])), f"tau_{j}": tau, f"bit_{j}": bit,
                       f"factor_{j}": factor, f"ties_{j}": ties.get(step, [])})
        scans.append(f"POSITIONAL JOIN (SELECT CAST(utility AS DOUBLE) AS u FROM read_parquet($files_{j})) s{j}")
        terms.append(f"CASE WHEN s{j}.u > $tau_{j} THEN true WHEN s{j}.u = $tau_{j} "
                     f"THEN list_contains(CAST($ties_{j} AS BIGINT[]), CAST(c.file_index AS BIGINT) * 4294967296 "
                     f"+ CAST(c.file_row_number AS BIGINT)) ELSE false END AS k{j}, "
                     f"CAST(s{j}.u * $factor_{j} AS BIGINT) AS t{j}")
        units.append(f"t{j}" if joint == "all" else f"CASE WHEN k{j} THEN t{j} ELSE 0 END")
        masks.append(f"CASE WHEN k{j} THEN CAST($bit_{j} AS UBIGINT) ELSE CAST(0 AS UBIGINT) END")
    where = "" if joint == "all" else "WHERE " + " OR ".join(f"k{j}" for j in range(len(steps)))
    sql = f"""CREATE OR REPLACE TABLE joint_units AS
SELECT id, {" + ".join(units)} AS units, n_tokens, {" | ".join(masks)} AS groups_mask
FROM (
    SELECT c.id, CAST(c.n_tokens AS BIGINT) AS n_tokens, {", ".join(terms)}
    FROM read_parquet($corpus_files) c
    {" ".join(scans)}
) {where}"""
    return sql, params


def _num_rows(path: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise AutomixerError(f"{path}: not a readable Parquet file ({e}); rerun `automixer prepare --force`") from None


def _require(con, files: list[Path], params: dict) -> None:
    for c in run_sql_checks(con, files, params):
        if c["ok"]:
            continue
        detail = c["detail"]
        if c["check"].startswith("01_"):  # name the ids
            rows = query_file(con, "diagnose/scores_vs_corpus.sql", params)
            detail = "; ".join(f"step {step}: {n:,} {kind} (e.g. {', '.join(map(str, ex))})"
                               for step, kind, n, ex in rows) or detail
        raise AutomixerError(f"regroup: {c['invariant']} does not hold: {detail}")


def _check_thresholds(con, keep_k: int) -> None:
    """Each group holds exactly k documents, and tau is the k-th largest utility (the quantile's contract)."""
    for step, n_kept, n_above, n_at, n_group in con.execute(
            "SELECT t.step, t.n_kept, t.n_above, t.n_at, count(g.id) FROM thresholds t "
            "LEFT JOIN groups g USING (step) GROUP BY ALL ORDER BY t.step").fetchall():
        if not (n_above < keep_k <= n_above + n_at) or n_group != keep_k:
            raise AutomixerError(f"regroup: sampler step {step}: the cut keeps {n_group:,} documents, not "
                                 f"{keep_k:,} ({n_above:,} above tau, {n_at:,} at it); please report this")


def _check_densities(con) -> None:
    rows = con.execute("SELECT group_name, influence_density FROM group_stats ORDER BY step").fetchall()
    total = sum(rho for _, rho in rows if rho is not None)
    if not rows or any(rho is None or not math.isfinite(rho) for _, rho in rows) or total <= 0:
        shown = ", ".join(f"{g} {rho!r}" for g, rho in rows)
        raise AutomixerError(f"regroup: the group densities sum to {total!r} (must be > 0 to make weights): "
                             f"{shown}. With regroup.joint: all, every kept document can sit at the corpus' "
                             "minimum joint score; try joint: kept or a larger keep_fraction")
