"""scores -> regroup -> mix -> report on a real scored run: DESIGN §3's invariants checked in SQL, and the HTML
page's numbers against the run's tables (tests/test_report_html.py holds the hand-made cases)."""

from __future__ import annotations

import json
import shutil

import duckdb
import pytest

from test_report_html import check_contract, value

from automixer_ops.cli import main
from automixer_ops.config import load_config


@pytest.fixture(scope="module")
def reported(scoring_run, trained, tmp_path_factory):
    """The scored tiny run carried through regroup, mix and report with a 3,000-token budget. Like a run that
    trained and evaluated its proxy, it has the training log of its checkpoints and a benchmark table, from
    which `select` makes the samplers (piqa peaks at step 10, arc_easy at 30: steps 10 and 30, alpha 1/4, 3/4)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from automixer_ops.influence.score import score

    cfg = load_config(scoring_run, ["run.id=rep"])
    shutil.copytree(load_config(scoring_run).run_dir, cfg.run_dir, symlinks=True,
                    ignore=shutil.ignore_patterns("scores"))
    (cfg.run_dir / "proxy").mkdir(exist_ok=True)
    shutil.copy(trained[1] / "proxy" / "train_log.jsonl", cfg.run_dir / "proxy" / "train_log.jsonl")
    bench = [(10, "piqa", 0.60), (30, "piqa", 0.50), (10, "arc_easy", 0.30), (30, "arc_easy", 0.40)]
    (cfg.run_dir / "eval").mkdir()
    pq.write_table(pa.table({"step": pa.array([b[0] for b in bench], pa.int64()), "task": [b[1] for b in bench],
                             "metric": ["acc_norm"] * 4, "value": [b[2] for b in bench], "stderr": [0.05] * 4,
                             "n_docs": pa.array([8] * 4, pa.int64())}), cfg.run_dir / "eval" / "benchmark.parquet")
    args = ["-c", str(scoring_run), "--set", "run.id=rep", "--set", "mix.token_budget=3000"]
    assert main(["select", *args]) == 0
    score(cfg, log=lambda _: None)
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


def test_the_html_page_shows_the_real_runs_tables(reported):
    import numpy as np
    import pyarrow.parquet as pq

    from automixer_ops.report import mixture_info
    from automixer_ops.report_data import collect
    from automixer_ops.rundir import RunDir
    from automixer_ops.samplers import read_selection

    cfg, args = reported
    assert main(["report", *args]) == 0
    run = cfg.run_dir
    page = check_contract(run)
    images = {i["id"] for i in page.images}
    assert {"benchmark-heatmap", "utility-step-10", "utility-step-30", "composition", "source-shares",
            "mixture-tokens", "group-overlap", "proxy-loss"} <= images

    # Table 1 from selection.json, its ratio column labelled as a ratio of steps.
    selection = json.loads((run / "selection.json").read_text())
    assert "best step / last step (ratio of steps)" in page.headers["table1"]
    t1 = page.rows("table1", "data-task")
    assert sorted(t1) == sorted(selection["tasks"])
    for task, c in selection["tasks"].items():
        cells = dict(zip(page.headers["table1"], t1[task]))
        assert [value(cells[k]) for k in ("best step", "best value", "last step", "last value")] == \
            [c["best_step"], c["best_value"], c["last_step"], c["last_value"]]
        assert value(cells["best step / last step (ratio of steps)"]) == c["best_step"] / c["last_step"]
    samplers = page.rows("samplers", "data-step")
    assert {k: value(v[2]) for k, v in samplers.items()} == {str(s["step"]): s["alpha"] for s in selection["samplers"]}
    assert {k: v[3][1] for k, v in samplers.items()} == {"10": "piqa", "30": "arc_easy"}

    with duckdb.connect(str(run / "automixer.duckdb"), read_only=True) as con:
        weights = con.execute("SELECT group_name, weight FROM weights").fetchall()
        pairs = con.execute("SELECT a.group_name, b.group_name, count(*) FROM groups a JOIN groups b USING (id) "
                            "GROUP BY ALL").fetchall()
        thresholds = {s: (tau, n) for s, tau, n in con.execute("SELECT step, tau, n_scored FROM thresholds").fetchall()}
        corpus = [str(p) for p in sorted((run / "corpus").glob("part-*.parquet"))]
        composition = con.execute("SELECT g.group_name, c.source, sum(c.n_tokens) FROM groups g "
                                  "JOIN read_parquet($c) c USING (id) GROUP BY ALL", {"c": corpus}).fetchall()
    rows = page.rows("weights", "data-group")
    assert {g: [c for c in rows[g] if c[0].get("class") == "weight"][0][0]["data-value"] for g in rows} == \
        {g: repr(float(w)) for g, w in weights}
    docs = page.rows("overlap-docs", "data-group")
    groups = page.headers["overlap-docs"][1:]
    assert {(a, b): n for a, b, n in pairs} == {(a, groups[j]): value(docs[a][j + 1])
                                                for a in groups for j in range(len(groups))}
    comp = page.rows("composition-table", "data-row")
    header = page.headers["composition-table"]
    assert {(g, s): n for g, s, n in composition} == {(g, header[i]): value(c) for g in groups
                                                      for i, c in enumerate(comp[g]) if i >= 2 and value(c)}

    # Each sampler's histogram counts every scored document once, binned as numpy bins the same utilities.
    budgeted = load_config(args[1], ["run.id=rep", "mix.token_budget=3000"])
    data = collect(budgeted, mixture_info(budgeted), [], read_selection(RunDir(run)))
    for h in data.histograms:
        tau, n = thresholds[h.step]
        assert (h.tau, h.n, sum(h.counts) + h.below + h.above) == (tau, n, n)
        u = pq.read_table(sorted((run / "scores" / f"step={h.step}").glob("part-*.parquet"))).column("utility")
        u = u.to_numpy().astype(np.float64)
        inside = u[(u >= h.lo) & (u <= h.hi)]
        width = (h.hi - h.lo) / len(h.counts)
        bins = np.minimum(np.floor((inside - h.lo) / width), len(h.counts) - 1).astype(int)
        assert h.counts == np.bincount(bins, minlength=len(h.counts)).tolist()
        assert (h.below, h.above) == (int((u < h.lo).sum()), int((u > h.hi).sum()))

    # Scoring: one row per score part, its documents as the part holds them.
    shards = {(a["data-step"], a["data-shard"]): cells for a, cells in page.tables["scoring-shards"]}
    for step in (10, 30):
        for part in sorted((run / "scores" / f"step={step}").glob("part-*.parquet")):
            assert value(shards[(str(step), part.name)][2]) == pq.ParquetFile(part).metadata.num_rows
    log = (run / "proxy" / "train_log.jsonl").read_text().splitlines()
    assert f"{len(log)} logged steps" in (run / "report" / "index.html").read_text(encoding="utf-8")


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
        page = check_contract(cfg.run_dir)  # the page too, with the failed check marked
        assert page.rows("invariants-table", "data-check")["03_mixture_budget"][2][1] == "FAILED"
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
