"""`automixer report`: the run at a glance, and DESIGN §3's invariants checked in SQL.

Runs every file of sql/checks/ against `<run>/automixer.duckdb` (each returns one row:
invariant, ok, detail), then writes `report/summary.md` (Table 1, the group weights, the
mixture per group, the invariants), `report/invariants.json`, and `report/index.html`: the
run on one self-contained page with its plots (report_html; docs/report.md), the plots also as
`report/*.png`. With an experiment directory (`--experiment`), the page shows its table and plot.
A failed invariant is reported and makes the step fail, after every file is written so a person
can read why.

Before that, the run must be complete and consistent: a mixture drawn (`mix` ran after the
last `regroup`), mixture/ and the database's mixture tables from the same run of `mix` (a
mix killed between the two is named as such), and drawn for the budget the config asks
for. A mixture the user allowed to fall short (`mix.underfill: allow`) is a valid run and
says so in every output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import RunDir, atomic_write_text
from automixer_ops.samplers import format_table1, read_selection
from automixer_ops.sqlrun import (check_files, format_weights, literal_paths, read_provenance, run_sql_checks,
                                  stale_inputs, weights_table)


def check_invariants(cfg: Config) -> list[dict]:
    import duckdb

    run = RunDir(cfg.run_dir)
    with duckdb.connect(str(run.db), read_only=True) as con:
        return run_sql_checks(con, check_files(), {"corpus_files": literal_paths(run.corpus_files())})


def mixture_info(cfg: Config) -> dict:
    """What `mix` recorded in the database, checked against mixture/ and the config."""
    import duckdb

    run = RunDir(cfg.run_dir)
    if not run.db.is_file():
        raise AutomixerError(f"{run.db}: not found; run `automixer regroup` and `automixer mix` first")
    with duckdb.connect(str(run.db), read_only=True) as con:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        if not {"mixture", "mixture_info"} <= tables:
            raise AutomixerError(f"{run.db}: no mixture drawn since the last `automixer regroup`; "
                                 "run `automixer mix` first")
        info = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM mixture_info").fetchall()}
        stale = stale_inputs(run, read_provenance(con))
    if stale:
        raise AutomixerError(f"{run.db}: built from another {stale} than the run has now; rerun "
                             "`automixer regroup` and `automixer mix`")
    weights_json = run.mixture / "weights.json"
    try:
        on_disk = json.loads(weights_json.read_text(encoding="utf-8")).get("mix_id")
    except FileNotFoundError:
        raise AutomixerError(f"{weights_json}: not found; run `automixer mix`") from None
    except json.JSONDecodeError:
        raise AutomixerError(f"{weights_json}: not valid JSON; rerun `automixer mix`") from None
    if on_disk != info["mix_id"]:
        raise AutomixerError(f"{run.mixture} and the mixture table of {run.db} come from different runs of "
                             "`automixer mix` (one was interrupted or the database was rebuilt); rerun "
                             "`automixer mix`")
    if info["token_budget"] != cfg.mix.token_budget:
        raise AutomixerError(f"{run.mixture}: drawn for mix.token_budget {info['token_budget']:,}, but the config "
                             f"asks for {cfg.mix.token_budget:,}; rerun `automixer mix`")
    return info


def report(cfg: Config, log: Callable[[str], None] = print,
           experiment: Path | None = None) -> tuple[Path, str]:
    import duckdb

    from automixer_ops.report_data import read_experiment
    from automixer_ops.report_html import write_html_report

    run = RunDir(cfg.run_dir)
    info = mixture_info(cfg)
    exp = read_experiment(experiment) if experiment is not None else None  # a wrong directory fails before writing
    checks = check_invariants(cfg)
    with duckdb.connect(str(run.db), read_only=True) as con:
        per_group = con.execute("""SELECT m.group_name, count(*), count(DISTINCT m.id), sum(m.n_tokens)::BIGINT,
                                          max(m."repeat") FROM mixture m JOIN weights w USING (group_name)
                                   GROUP BY m.group_name, w.step ORDER BY w.step""").fetchall()
    selection = read_selection(run)
    mix_lines = [f"{'group':<12}  {'draws':>8}  {'distinct':>8}  {'tokens':>12}  {'max repeat':>10}"]
    mix_lines += [f"{g:<12}  {n:>8,}  {d:>8,}  {t:>12,}  {r:>10}" for g, n, d, t, r in per_group]
    if info.get("underfilled"):
        mix_lines += ["", f"UNDERFILLED (mix.underfill: allow): {info['tokens']:,} of the {info['token_budget']:,} "
                          f"tokens asked for; the groups can give no more."]
    inv_lines = [f"- [{'x' if c['ok'] else ' '}] {c['invariant']}: {c['detail']}" for c in checks]
    text = "\n".join([
        f"# AutoMixer run `{cfg.run.id}`", "", f"Run directory: `{run.path}`  ", f"DuckDB: `{run.db}`", "",
        "## Checkpoint selection (Table 1)", "", "```", format_table1(selection), "```", "",
        "## Group weights", "", "```", format_weights(weights_table(run.db)), "```", "",
        f"## Mixture (budget {info['token_budget']:,} tokens, drawn {info['tokens']:,})", "", "```", *mix_lines,
        "```", "", "## Invariants (DESIGN §3, checked in SQL: sql/checks/)", "", *inv_lines, ""])
    out = run.report
    atomic_write_text(out / "summary.md", text)
    atomic_write_text(out / "invariants.json", json.dumps(checks, indent=2) + "\n")
    page = write_html_report(cfg, info, checks, selection, exp)
    failed = [c["invariant"] for c in checks if not c["ok"]]
    if failed:
        raise AutomixerError(f"{out / 'summary.md'}: invariant(s) failed: {'; '.join(failed)}")
    log(f"report: {out / 'summary.md'}, {page}")
    return out / "summary.md", text
