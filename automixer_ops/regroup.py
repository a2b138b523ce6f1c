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
from automixer_ops.rundir import RunDir, parquet_metadata
from automixer_ops.selection import Selection
from automixer_ops.sqlrun import DB_NAME, build_database, check_files, run_sql_checks


def regroup(cfg: Config, log: Callable[[str], None] = print) -> Path:
    run = RunDir(cfg.run_dir)
    sel_path = run.path / "selection.json"
    if not sel_path.is_file():
        raise AutomixerError(f"{sel_path}: not found; run `automixer select` first")
    selection = Selection.from_json(sel_path.read_text())
    steps = [s.step for s in selection.samplers]
    for step in steps:
        out = run.path / "scores" / f"step={step}"
        parts = sorted(out.glob("part-*.parquet"))
        if not parts:
            raise AutomixerError(f"{out}: no score shards for sampler step {step}; run `automixer score` first")
        _check_parts_of_one_fit(out, parts, step)
    params = {"scores_glob": str(run.path / "scores" / "step=*" / "part-*.parquet"),
              "keep_fraction": cfg.regroup.keep_fraction,
              "sampler_steps": steps, "sampler_alphas": [s.alpha for s in selection.samplers]}
    corpus_glob = str(run.corpus / "part-*.parquet")

    def checks(con) -> None:
        # DESIGN §3 before publishing: scores cover the corpus once per sampler, all finite, weights sum to 1.
        for c in run_sql_checks(con, check_files("0[123]_"), {"corpus_glob": corpus_glob}):
            if not c["ok"]:
                raise AutomixerError(f"regroup: {c['invariant']} does not hold: {c['detail']}")

    db = run.path / DB_NAME
    build_database(db, params, checks, cfg.regroup.memory_limit)
    log(f"regrouped {len(steps)} sampler(s) with keep_fraction {cfg.regroup.keep_fraction} into {db}")
    return db


def _check_parts_of_one_fit(out: Path, parts: list[Path], step: int) -> None:
    """Where `automixer score` made the fit (fit.json), every part must carry that fit's fingerprint: a part
    left by an earlier fit (a shard job that ran on while the fit was redone) has the right ids and would pass
    the coverage checks. Scores without a fit.json (made elsewhere) are taken as they are."""
    import json

    if not (out / "fit.json").is_file():
        return
    fit = json.loads((out / "fit.json").read_text())["fingerprint"]
    stale = [p.name for p in parts if parquet_metadata(p).get("fit") != fit]
    if stale:
        raise AutomixerError(f"{out}: {len(stale)} score shard(s) not made with the sampler's current fit "
                             f"(fit.json), e.g. {stale[0]}; rerun `automixer score --step {step}`")


def weights_table(db: Path) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT group_name, n_docs, n_tokens, influence_density, weight FROM weights "
                           "ORDER BY step").fetchall()


def format_weights(rows: list[tuple]) -> str:
    lines = [f"{'group':<12}  {'docs':>8}  {'tokens':>12}  {'density':>8}  {'weight':>7}"]
    lines += [f"{g:<12}  {d:>8,}  {t:>12,}  {rho:>8.4f}  {w:>7.4f}" for g, d, t, rho, w in rows]
    return "\n".join(lines)
