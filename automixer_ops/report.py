"""`automixer report`: the run at a glance, and DESIGN §3's invariants checked in SQL.

Runs every file of sql/checks/ against `<run>/automixer.duckdb` (each returns one row:
invariant, ok, detail), then writes `report/summary.md` (Table 1, the group weights, the
mixture per group, the invariants) and `report/invariants.json`. A failed invariant is
reported and makes the step fail, after the report is written so a person can read why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import RunDir, atomic_write_text
from automixer_ops.sqlrun import DB_NAME, check_files, run_sql_checks


def check_invariants(cfg: Config) -> list[dict]:
    import duckdb

    run = RunDir(cfg.run_dir)
    db = run.path / DB_NAME
    if not db.is_file():
        raise AutomixerError(f"{db}: not found; run `automixer regroup` and `automixer mix` first")
    params = {"corpus_glob": str(run.corpus / "part-*.parquet"), "token_budget": cfg.mix.token_budget,
              "max_repeats": cfg.mix.max_repeats}
    with duckdb.connect(str(db), read_only=True) as con:
        return run_sql_checks(con, check_files(), params)


def report(cfg: Config, log: Callable[[str], None] = print) -> tuple[Path, str]:
    import duckdb

    from automixer_ops.regroup import format_weights, weights_table
    from automixer_ops.selection import Selection, format_table1

    run = RunDir(cfg.run_dir)
    checks = check_invariants(cfg)
    db = run.path / DB_NAME
    with duckdb.connect(str(db), read_only=True) as con:
        per_group = con.execute("""SELECT m.group_name, count(*), count(DISTINCT m.id), sum(m.n_tokens)::BIGINT,
                                          max(m."repeat") FROM mixture m JOIN weights w USING (group_name)
                                   GROUP BY m.group_name, w.step ORDER BY w.step""").fetchall()
    selection = Selection.from_json((run.path / "selection.json").read_text())
    mix_lines = [f"{'group':<12}  {'draws':>8}  {'distinct':>8}  {'tokens':>12}  {'max repeat':>10}"]
    mix_lines += [f"{g:<12}  {n:>8,}  {d:>8,}  {t:>12,}  {r:>10}" for g, n, d, t, r in per_group]
    inv_lines = [f"- [{'x' if c['ok'] else ' '}] {c['invariant']}: {c['detail']}" for c in checks]
    text = "\n".join([
        f"# AutoMixer run `{cfg.run.id}`", "", f"Run directory: `{run.path}`  ", f"DuckDB: `{db}`", "",
        "## Checkpoint selection (Table 1)", "", "```", format_table1(selection), "```", "",
        "## Group weights", "", "```", format_weights(weights_table(db)), "```", "",
        f"## Mixture (budget {cfg.mix.token_budget:,} tokens)", "", "```", *mix_lines, "```", "",
        "## Invariants (DESIGN §3, checked in SQL: sql/checks/)", "", *inv_lines, ""])
    out = run.path / "report"
    atomic_write_text(out / "summary.md", text)
    atomic_write_text(out / "invariants.json", json.dumps(checks, indent=2) + "\n")
    failed = [c["invariant"] for c in checks if not c["ok"]]
    if failed:
        raise AutomixerError(f"{out / 'summary.md'}: invariant(s) failed: {'; '.join(failed)}")
    log(f"report: {out / 'summary.md'}")
    return out / "summary.md", text
