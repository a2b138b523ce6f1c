"""`automixer regroup`: scores -> thresholds, groups, joint scores, group stats, weights.

The SQL in automixer_ops/sql/ does the work (DESIGN §2, the paper's Appendix B); this
module binds its parameters (score files, keep_fraction, the samplers' steps and α from
selection.json), checks the inputs and outputs against DESIGN §3's invariants, and
publishes `<run>/automixer.duckdb`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import RunDir
from automixer_ops.selection import Selection
from automixer_ops.sqlrun import DB_NAME, build_database


def regroup(cfg: Config, log: Callable[[str], None] = print) -> Path:
    run = RunDir(cfg.run_dir)
    sel_path = run.path / "selection.json"
    if not sel_path.is_file():
        raise AutomixerError(f"{sel_path}: not found; run `automixer select` first")
    selection = Selection.from_json(sel_path.read_text())
    steps = [s.step for s in selection.samplers]
    for step in steps:
        if not list((run.path / "scores" / f"step={step}").glob("part-*.parquet")):
            raise AutomixerError(f"{run.path}/scores/step={step}: no score shards for sampler step {step}; "
                                 "run `automixer score` first")
    params = {"scores_glob": str(run.path / "scores" / "step=*" / "part-*.parquet"),
              "keep_fraction": cfg.regroup.keep_fraction,
              "sampler_steps": steps, "sampler_alphas": [s.alpha for s in selection.samplers]}
    corpus_glob = str(run.corpus / "part-*.parquet")

    def checks(con) -> None:
        # DESIGN §3: every corpus id has exactly one score per sampler ...
        bad = con.execute(
            """WITH corpus AS (SELECT id FROM read_parquet($corpus)),
                    per_id AS (SELECT step, id, count(*) AS n FROM scores GROUP BY step, id)
               SELECT sm.step, c.id, coalesce(p.n, 0) AS n
               FROM samplers sm CROSS JOIN corpus c
               LEFT JOIN per_id p ON p.step = sm.step AND p.id = c.id
               WHERE coalesce(p.n, 0) != 1
               UNION ALL
               SELECT step, id, n FROM per_id WHERE id NOT IN (SELECT id FROM corpus)
               ORDER BY 1, 2 LIMIT 3""", {"corpus": corpus_glob}).fetchall()
        if bad:
            detail = "; ".join(f"step {s} id {i!r}: {n} score(s)" for s, i, n in bad)
            raise AutomixerError(f"scores do not cover the corpus exactly once per sampler, e.g. {detail}")
        nan = con.execute("SELECT count(*) FROM scores WHERE NOT isfinite(utility)").fetchone()[0]
        if nan:
            raise AutomixerError(f"{nan} score(s) are NaN or infinite")
        # ... and the weights sum to 1.
        total = con.execute("SELECT sum(weight) FROM weights").fetchone()[0]
        if total is None or abs(total - 1) > 1e-9:
            raise AutomixerError(f"weights sum to {total}, not 1 (every group has zero influence density?)")

    db = run.path / DB_NAME
    build_database(db, params, checks, cfg.regroup.memory_limit)
    log(f"regrouped {len(steps)} sampler(s) with keep_fraction {cfg.regroup.keep_fraction} into {db}")
    return db


def weights_table(db: Path) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT group_name, n_docs, n_tokens, influence_density, weight FROM weights "
                           "ORDER BY step").fetchall()


def format_weights(rows: list[tuple]) -> str:
    lines = [f"{'group':<12}  {'docs':>8}  {'tokens':>12}  {'density':>8}  {'weight':>7}"]
    lines += [f"{g:<12}  {d:>8,}  {t:>12,}  {rho:>8.4f}  {w:>7.4f}" for g, d, t, rho, w in rows]
    return "\n".join(lines)
