"""scores -> regroup -> mix -> report on a real scored run: DESIGN §3's invariants checked in SQL."""

from __future__ import annotations

import json
import shutil

import duckdb
import pytest

from automixer_ops.cli import main
from automixer_ops.config import load_config


@pytest.fixture(scope="module")
def reported(scoring_run, tmp_path_factory):
    """The scored tiny run carried through regroup, mix and report with a 3,000-token budget."""
    from automixer_ops.influence.score import score

    cfg = load_config(scoring_run, ["run.id=rep"])
    shutil.copytree(load_config(scoring_run).run_dir, cfg.run_dir, symlinks=True,
                    ignore=shutil.ignore_patterns("scores"))
    score(cfg, log=lambda _: None)
    args = ["-c", str(scoring_run), "--set", "run.id=rep", "--set", "mix.token_budget=3000"]
    assert main(["regroup", *args]) == 0
    assert main(["mix", *args]) == 0
    return cfg, args


def test_report_checks_every_invariant_in_sql_and_writes_the_summary(reported, capsys):
    cfg, args = reported
    capsys.readouterr()
    assert main(["report", *args]) == 0
    out = capsys.readouterr().out
    checks = json.loads((cfg.run_dir / "report" / "invariants.json").read_text())
    assert [c["check"] for c in checks] == ["01_scores_exact_cover", "02_weights_sum_to_one", "03_mixture_budget",
                                            "04_mixture_draws"]
    assert all(c["ok"] for c in checks), checks
    assert checks[0]["detail"] == "108 documents x 2 samplers, each scored once"
    summary = (cfg.run_dir / "report" / "summary.md").read_text()
    assert summary in out + "\n" or summary.strip() == out.strip()
    for heading in ("Table 1", "Group weights", "Mixture (budget 3,000 tokens, drawn ", "Invariants"):
        assert heading in summary
    # The mixture is a table of the run's DuckDB file, next to the regrouping tables.
    with duckdb.connect(str(cfg.run_dir / "automixer.duckdb"), read_only=True) as con:
        tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
        total = con.execute("SELECT sum(n_tokens) FROM mixture").fetchone()[0]
    assert {"samplers", "thresholds", "groups", "joint_scores", "group_stats", "weights", "provenance", "mixture",
            "mixture_info"} <= tables
    assert abs(total - 3000) <= 64 * 100  # within one document (checked exactly by 03_mixture_budget)


def test_a_broken_invariant_fails_the_step_after_writing_the_report(reported, capsys):
    cfg, args = reported
    db = cfg.run_dir / "automixer.duckdb"
    saved = db.read_bytes()
    try:
        # The table edited after mixing: its draws no longer add up to the budget.
        with duckdb.connect(str(db)) as con:
            con.execute("UPDATE mixture SET n_tokens = 1")
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err
        assert "invariant(s) failed: mixture tokens within one document of the budget" in err
        checks = json.loads((cfg.run_dir / "report" / "invariants.json").read_text())
        assert [c["ok"] for c in checks] == [True, True, False, True]
        assert "- [ ] mixture tokens within one document" in (cfg.run_dir / "report" / "summary.md").read_text()
    finally:
        db.write_bytes(saved)


def test_reruns_reproduce_the_tables_and_the_mixture_byte_for_byte(reported):
    cfg, args = reported
    db = cfg.run_dir / "automixer.duckdb"

    def snapshot():
        with duckdb.connect(str(db), read_only=True) as con:
            tables = {t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
                      for t in ("thresholds", "groups", "joint_scores", "group_stats", "weights", "mixture")}
        parts = {p.name: p.read_bytes() for p in sorted((cfg.run_dir / "mixture").iterdir())}
        return tables, parts

    first = snapshot()
    assert main(["regroup", *args]) == 0 and main(["mix", *args]) == 0
    assert snapshot() == first
