"""The regrouping SQL on a hand-computed example (DESIGN §2), every table to the digit."""

from __future__ import annotations

import json
from fractions import Fraction as F

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from automixer_ops.cli import main
from automixer_ops.config import load_config
from automixer_ops.errors import AutomixerError
from automixer_ops.regroup import regroup

IDS = [f"d{i}" for i in range(10)]
TOKENS = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
U100 = [0.9, 0.8, 0.1, -0.2, 0.5, 0.3, -0.5, 0.0, 0.7, -0.1]
U300 = [0.2, -0.3, 0.6, 0.4, 0.1, 0.8, -0.6, 0.5, 0.0, 0.3]
# Samplers at steps 100 and 300: s~ = 1/3 and 1, so alpha = 0.25 and 0.75.


def make_run(tmp_path, scores=(U100, U300)):
    run = tmp_path / "runs" / "hand"
    (run / "corpus").mkdir(parents=True)
    pq.write_table(pa.table({"id": IDS, "source": ["s"] * 10, "text": [f"text {i}" for i in IDS],
                             "n_tokens": pa.array(TOKENS, pa.int64())}), run / "corpus" / "part-00000.parquet")
    for step, u in zip((100, 300), scores):
        (run / "scores" / f"step={step}").mkdir(parents=True)
        pq.write_table(pa.table({"id": IDS[:len(u)], "utility": u, "n_tokens": pa.array(TOKENS[:len(u)], pa.int64())}),
                       run / "scores" / f"step={step}" / "part-00000.parquet")
    (run / "selection.json").write_text(json.dumps({"tasks": {}, "samplers": [
        {"step": 100, "tasks": ["a"], "alpha": 0.25, "checkpoint": ""},
        {"step": 300, "tasks": ["b"], "alpha": 0.75, "checkpoint": ""}]}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"id": "hand", "root": "runs"}, "corpus": {"paths": ["x.jsonl"]},
                                      "regroup": {"keep_fraction": 0.5}}))
    return config, run


def test_hand_computed_tables(tmp_path):
    config, run = make_run(tmp_path)
    db = regroup(load_config(config), log=lambda _: None)
    con = duckdb.connect(str(db), read_only=True)
    # thresholds: medians (quantile_cont at 0.5 of 10 values: halfway between the 5th and 6th).
    #   u100 sorted: -0.5 -0.2 -0.1 0.0 [0.1 0.3] 0.5 0.7 0.8 0.9 -> tau = 0.2
    #   u300 sorted: -0.6 -0.3 0.0 0.1 [0.2 0.3] 0.4 0.5 0.6 0.8 -> tau = 0.25
    rows = con.execute("SELECT step, tau, n_scored FROM thresholds ORDER BY step").fetchall()
    assert [(s, n) for s, _, n in rows] == [(100, 10), (300, 10)]
    assert [t for _, t, _ in rows] == pytest.approx([0.2, 0.25], rel=1e-12)
    # groups: u >= tau.
    groups = con.execute("SELECT group_name, list(id ORDER BY id) FROM groups GROUP BY ALL ORDER BY 1").fetchall()
    assert groups == [("step-100", ["d0", "d1", "d4", "d5", "d8"]), ("step-300", ["d2", "d3", "d5", "d7", "d9"])]
    # joint_scores: J = 0.25 u100 + 0.75 u300; min J = -0.575 (d6), max J = 0.675 (d5), range 1.25.
    joint = [F(375, 1000), F(-25, 1000), F(475, 1000), F(25, 100), F(2, 10), F(675, 1000), F(-575, 1000),
             F(375, 1000), F(175, 1000), F(2, 10)]
    scaled = [F(76, 100), F(44, 100), F(84, 100), F(66, 100), F(62, 100), F(1), F(0), F(76, 100), F(6, 10),
              F(62, 100)]
    got = con.execute("SELECT id, joint_utility, scaled_utility FROM joint_scores ORDER BY id").fetchall()
    assert [r[0] for r in got] == IDS
    assert [r[1] for r in got] == pytest.approx([float(x) for x in joint], abs=1e-12)
    assert [r[2] for r in got] == pytest.approx([float(x) for x in scaled], abs=1e-12)
    # group_stats: rho = sum S*s / sum s.
    #   step-100: (0.76*10 + 0.44*20 + 0.62*50 + 1*60 + 0.6*90) / 230 = 161.4 / 230
    #   step-300: (0.84*30 + 0.66*40 + 1*60 + 0.76*80 + 0.62*100) / 310 = 234.4 / 310
    rho100, rho300 = F(1614, 2300), F(2344, 3100)
    stats = con.execute("SELECT group_name, n_docs, n_tokens, scaled_token_mass, influence_density "
                        "FROM group_stats ORDER BY step").fetchall()
    assert [(g, d, t) for g, d, t, _, _ in stats] == [("step-100", 5, 230), ("step-300", 5, 310)]
    assert [m for *_, m, _ in stats] == pytest.approx([161.4, 234.4], rel=1e-12)
    assert [r for *_, r in stats] == pytest.approx([float(rho100), float(rho300)], rel=1e-12)
    # weights: rho / sum rho = 0.481346... and 0.518654...
    w = con.execute("SELECT weight FROM weights ORDER BY step").fetchall()
    expected = [rho100 / (rho100 + rho300), rho300 / (rho100 + rho300)]
    assert [x for (x,) in w] == pytest.approx([float(x) for x in expected], rel=1e-12)
    assert float(expected[0]) == pytest.approx(0.481346, abs=1e-6)


def test_cli_prints_weights_and_rerun_is_identical(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "step-100" in out and "0.4813" in out and str(run / "automixer.duckdb") in out
    first = duckdb.connect(str(run / "automixer.duckdb"), read_only=True).execute(
        "FROM weights ORDER BY step").fetchall()
    assert main(["regroup", "-c", str(config), "--set", "regroup.keep_fraction=0.3"]) == 0
    assert main(["regroup", "-c", str(config)]) == 0
    again = duckdb.connect(str(run / "automixer.duckdb"), read_only=True).execute(
        "FROM weights ORDER BY step").fetchall()
    assert again == first
    assert not list(run.glob(".automixer.duckdb.tmp*"))


def test_missing_or_partial_scores_are_refused_and_keep_the_old_database(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    before = (run / "automixer.duckdb").read_bytes()
    pq.write_table(pa.table({"id": IDS[:9], "utility": U300[:9], "n_tokens": pa.array(TOKENS[:9], pa.int64())}),
                   run / "scores" / "step=300" / "part-00000.parquet")
    assert main(["regroup", "-c", str(config)]) == 2
    assert "step 300: 9 scores for 10 documents (9 distinct ids, 9 known to the corpus)" in \
        capsys.readouterr().err
    assert (run / "automixer.duckdb").read_bytes() == before
    # Counts that add up but do not cover: d9 missing, d0 twice; then an id the corpus does not have.
    for ids, detail in ((IDS[:9] + ["d0"], "10 scores for 10 documents (9 distinct ids, 10 known"),
                        (IDS[:9] + ["stray"], "10 scores for 10 documents (10 distinct ids, 9 known")):
        pq.write_table(pa.table({"id": ids, "utility": U300, "n_tokens": pa.array(TOKENS, pa.int64())}),
                       run / "scores" / "step=300" / "part-00000.parquet")
        assert main(["regroup", "-c", str(config)]) == 2
        assert detail in capsys.readouterr().err
    for p in (run / "scores" / "step=300").glob("*"):
        p.unlink()
    with pytest.raises(AutomixerError, match="scores/step=300: no score shards"):
        regroup(load_config(config), log=lambda _: None)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(-10, 10), st.floats(-10, 10), st.integers(1, 500)), min_size=1, max_size=30),
       st.floats(0.05, 1.0))
def test_weights_sum_to_one_on_random_scores(docs, keep_fraction):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        ids = [f"x{i}" for i in range(len(docs))]
        run = Path(d) / "runs" / "r"
        (run / "corpus").mkdir(parents=True)
        pq.write_table(pa.table({"id": ids, "source": ["s"] * len(ids), "text": ids,
                                 "n_tokens": pa.array([n for *_, n in docs], pa.int64())}),
                       run / "corpus" / "part-00000.parquet")
        for k, step in enumerate((100, 300)):
            (run / "scores" / f"step={step}").mkdir(parents=True)
            pq.write_table(pa.table({"id": ids, "utility": pa.array([doc[k] for doc in docs], pa.float32()),
                                     "n_tokens": pa.array([n for *_, n in docs], pa.int64())}),
                           run / "scores" / f"step={step}" / "part-00000.parquet")
        (run / "selection.json").write_text(json.dumps({"tasks": {}, "samplers": [
            {"step": 100, "tasks": ["a"], "alpha": 0.25, "checkpoint": ""},
            {"step": 300, "tasks": ["b"], "alpha": 0.75, "checkpoint": ""}]}))
        config = Path(d) / "c.yaml"
        config.write_text(yaml.safe_dump({"run": {"id": "r", "root": "runs"}, "corpus": {"paths": ["x"]},
                                          "regroup": {"keep_fraction": keep_fraction}}))
        db = regroup(load_config(config), log=lambda _: None)
        con = duckdb.connect(str(db), read_only=True)
        weights = [w for (w,) in con.execute("SELECT weight FROM weights").fetchall()]
        assert sum(weights) == pytest.approx(1.0) and all(w >= 0 for w in weights)
        # every group keeps at least keep_fraction of the samples (ties at tau keep more)
        for (n,) in con.execute("SELECT n_docs FROM group_stats").fetchall():
            assert n >= keep_fraction * len(docs) - 1
        scaled = [s for (s,) in con.execute("SELECT scaled_utility FROM joint_scores").fetchall()]
        assert min(scaled) >= 0 and max(scaled) <= 1


def test_bad_memory_limit_is_named(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config), "--set", "regroup.memory_limit=lots"]) == 2
    assert "regroup.memory_limit: DuckDB refused 'lots'" in capsys.readouterr().err
    assert not (run / "automixer.duckdb").exists()
