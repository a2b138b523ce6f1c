"""The regrouping SQL (DESIGN §2, the paper's Appendix B) on hand-computed examples, every table to the
digit, against a reference in plain Python on random scores, and the checks that hold the pipeline."""

from __future__ import annotations

import json
import math
import tempfile
from fractions import Fraction as F
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from automixer_ops.cli import main
from automixer_ops.config import load_config
from automixer_ops.errors import AutomixerError
from automixer_ops.regroup import keep_count, regroup

IDS = [f"d{i}" for i in range(10)]
TOKENS = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
U100 = [0.9, 0.8, 0.1, -0.2, 0.5, 0.3, -0.5, 0.0, 0.7, -0.1]
U300 = [0.2, -0.3, 0.6, 0.4, 0.1, 0.8, -0.6, 0.5, 0.0, 0.3]
# Samplers at steps 100 and 300: s~ = 1/3 and 1, so alpha = 0.25 and 0.75.
SAMPLERS = [{"step": 100, "tasks": ["a"], "alpha": 0.25, "checkpoint": ""},
            {"step": 300, "tasks": ["b"], "alpha": 0.75, "checkpoint": ""}]


def write_scores(run: Path, step: int, ids, utilities, tokens, utility_type=pa.float64()) -> None:
    (run / "scores" / f"step={step}").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "utility": pa.array(utilities, utility_type),
                             "n_tokens": pa.array(tokens, pa.int64())}),
                   run / "scores" / f"step={step}" / "part-00000.parquet")


def make_run(tmp_path, scores=(U100, U300), root="runs", ids=IDS, tokens=TOKENS, samplers=SAMPLERS,
             regroup_settings=None):
    run = tmp_path / root / "hand"
    (run / "corpus").mkdir(parents=True)
    pq.write_table(pa.table({"id": ids, "source": ["s"] * len(ids), "text": [f"text {i}" for i in ids],
                             "n_tokens": pa.array(tokens, pa.int64())}), run / "corpus" / "part-00000.parquet")
    for s, u in zip(samplers, scores):
        write_scores(run, s["step"], ids[:len(u)], u, tokens[:len(u)])
    (run / "selection.json").write_text(json.dumps({"tasks": {}, "samplers": samplers}))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"id": "hand", "root": root}, "corpus": {"paths": ["x.jsonl"]},
                                      "regroup": {"keep_fraction": 0.5, **(regroup_settings or {})}}))
    return config, run


def tables(db: Path) -> dict:
    with duckdb.connect(str(db), read_only=True) as con:
        return {
            "thresholds": con.execute("SELECT step, tau, n_scored, n_kept, n_above, n_at FROM thresholds "
                                      "ORDER BY step").fetchall(),
            "groups": con.execute("SELECT group_name, list(id ORDER BY id) FROM groups GROUP BY ALL "
                                  "ORDER BY 1").fetchall(),
            "joint": con.execute("SELECT id, joint_utility, scaled_utility FROM joint_scores ORDER BY id").fetchall(),
            "stats": con.execute("SELECT group_name, n_docs, n_tokens, scaled_token_mass, influence_density "
                                 "FROM group_stats ORDER BY step").fetchall(),
            "weights": [w for (w,) in con.execute("SELECT weight FROM weights ORDER BY step").fetchall()],
        }


def test_hand_computed_tables_appendix_b(tmp_path):
    config, run = make_run(tmp_path)
    got = tables(regroup(load_config(config), log=lambda _: None))
    # keep_fraction 0.5 of 10: the top 5 by utility (ties by id); tau = the 5th largest.
    #   u100 descending: d0 .9, d1 .8, d8 .7, d4 .5, d5 .3 | d2 .1, ... -> tau 0.3, 4 above it, 1 at it
    #   u300 descending: d5 .8, d2 .6, d7 .5, d3 .4, d9 .3 | d0 .2, ... -> tau 0.3
    assert got["thresholds"] == [(100, 0.3, 10, 5, 4, 1), (300, 0.3, 10, 5, 4, 1)]
    assert got["groups"] == [("step-100", ["d0", "d1", "d4", "d5", "d8"]), ("step-300", ["d2", "d3", "d5", "d7", "d9"])]
    # total_influence over the filtered tables only: A = every document but d6.
    #   J = 0.25 u100 [x in F100] + 0.75 u300 [x in F300]:
    #   d0 .225, d1 .2, d2 .45, d3 .3, d4 .125, d5 .25*.3 + .75*.8 = .675, d7 .375, d8 .175, d9 .225
    #   min_A = .125 (d4), max_A = .675 (d5): S = (J - .125) / .55
    joint = {"d0": F(225, 1000), "d1": F(2, 10), "d2": F(45, 100), "d3": F(3, 10), "d4": F(125, 1000),
             "d5": F(675, 1000), "d7": F(375, 1000), "d8": F(175, 1000), "d9": F(225, 1000)}
    scaled = {i: (j - F(125, 1000)) / F(55, 100) for i, j in joint.items()}
    assert [r[0] for r in got["joint"]] == sorted(joint)
    assert [r[1] for r in got["joint"]] == pytest.approx([float(joint[i]) for i in sorted(joint)], abs=1e-12)
    assert [r[2] for r in got["joint"]] == pytest.approx([float(scaled[i]) for i in sorted(joint)], abs=1e-12)
    assert scaled["d5"] == 1 and scaled["d4"] == 0 and scaled["d0"] == F(2, 11)
    # rho = sum S*s / sum s:
    #   step-100: (2/11*10 + 3/22*20 + 0*50 + 1*60 + 1/11*90) / 230 = (800/11) / 230 = 80/253
    #   step-300: (13/22*30 + 7/22*40 + 1*60 + 5/11*80 + 2/11*100) / 310 = 145 / 310 = 29/62
    rho100, rho300 = F(80, 253), F(29, 62)
    assert rho100 == sum(scaled[i] * TOKENS[int(i[1:])] for i in ("d0", "d1", "d4", "d5", "d8")) / 230
    assert [(g, d, t) for g, d, t, _, _ in got["stats"]] == [("step-100", 5, 230), ("step-300", 5, 310)]
    assert [m for *_, m, _ in got["stats"]] == pytest.approx([800 / 11, 145], rel=1e-12)
    assert [r for *_, r in got["stats"]] == pytest.approx([float(rho100), float(rho300)], rel=1e-12)
    expected = [rho100 / (rho100 + rho300), rho300 / (rho100 + rho300)]
    assert got["weights"] == pytest.approx([float(x) for x in expected], rel=1e-12)
    assert float(expected[0]) == pytest.approx(0.403350, abs=1e-6)


def test_hand_computed_tables_main_text_form(tmp_path):
    config, run = make_run(tmp_path, regroup_settings={"joint": "all"})
    got = tables(regroup(load_config(config), log=lambda _: None))
    assert got["groups"] == [("step-100", ["d0", "d1", "d4", "d5", "d8"]), ("step-300", ["d2", "d3", "d5", "d7", "d9"])]
    # J = 0.25 u100 + 0.75 u300 over every sampler and document; min J = -0.575 (d6), max J = 0.675 (d5).
    joint = [F(375, 1000), F(-25, 1000), F(475, 1000), F(25, 100), F(2, 10), F(675, 1000), F(-575, 1000),
             F(375, 1000), F(175, 1000), F(2, 10)]
    scaled = [F(76, 100), F(44, 100), F(84, 100), F(66, 100), F(62, 100), F(1), F(0), F(76, 100), F(6, 10),
              F(62, 100)]
    assert [r[0] for r in got["joint"]] == IDS
    assert [r[1] for r in got["joint"]] == pytest.approx([float(x) for x in joint], abs=1e-12)
    assert [r[2] for r in got["joint"]] == pytest.approx([float(x) for x in scaled], abs=1e-12)
    #   step-100: (0.76*10 + 0.44*20 + 0.62*50 + 1*60 + 0.6*90) / 230 = 161.4 / 230
    #   step-300: (0.84*30 + 0.66*40 + 1*60 + 0.76*80 + 0.62*100) / 310 = 234.4 / 310
    rho100, rho300 = F(1614, 2300), F(2344, 3100)
    assert [m for *_, m, _ in got["stats"]] == pytest.approx([161.4, 234.4], rel=1e-12)
    expected = [rho100 / (rho100 + rho300), rho300 / (rho100 + rho300)]
    assert got["weights"] == pytest.approx([float(x) for x in expected], rel=1e-12)
    assert float(expected[0]) == pytest.approx(0.481346, abs=1e-6)


def test_the_cut_keeps_exactly_k_documents_ties_broken_by_id(tmp_path):
    # A constant-utility scorer: every document ties; the cut still keeps ceil(0.3 * 10) = 3, by id
    # (0.3 * 10 is 3.0000000000000004 in floats: a float ceil would keep 4).
    ties = [1.0, 0.5, 0.5, 0.5, 0.5, 0.2, 0.5, 0.5, 0.5, 0.0]  # d0 above the cut, then ties at 0.5
    config, run = make_run(tmp_path, scores=([0.25] * 10, ties), regroup_settings={"keep_fraction": 0.3})
    got = tables(regroup(load_config(config), log=lambda _: None))
    assert got["thresholds"] == [(100, 0.25, 10, 3, 0, 10), (300, 0.5, 10, 3, 1, 7)]
    assert got["groups"] == [("step-100", ["d0", "d1", "d2"]), ("step-300", ["d0", "d1", "d2"])]


@pytest.mark.parametrize("fraction,n,k", [(0.3, 10, 3), (0.5, 10, 5), (1.0, 7, 7), (1 / 3, 3, 1), (0.01, 50, 1),
                                          (0.999, 1000, 999), (1e-9, 5, 1)])
def test_keep_count_is_exact(fraction, n, k):
    got, q = keep_count(fraction, n)
    assert got == k
    assert F(n - k, n) < F(q) <= F(n - k + 1, n)  # the discrete quantile at q is the k-th largest


def reference(ids, tokens, utilities, alphas, keep_fraction, joint):
    """Appendix B in plain Python, written from DESIGN §2 independently of the SQL."""
    n = len(ids)
    k = math.ceil(F(repr(keep_fraction)) * n)
    kept, tau = {}, {}
    for step, u in utilities.items():
        order = sorted(range(n), key=lambda i: (-u[i], ids[i]))
        kept[step], tau[step] = {ids[i] for i in order[:k]}, u[order[k - 1]]
    index = {d: i for i, d in enumerate(ids)}
    if joint == "kept":
        members = set().union(*kept.values())
        J = {d: math.fsum(alphas[s] * utilities[s][index[d]] for s in utilities if d in kept[s]) for d in members}
    else:
        J = {d: math.fsum(alphas[s] * utilities[s][index[d]] for s in utilities) for d in ids}
    lo, hi = min(J.values()), max(J.values())
    S = {d: 1.0 if hi == lo else (j - lo) / (hi - lo) for d, j in J.items()}
    rho = {s: math.fsum(S[d] * tokens[index[d]] for d in kept[s]) / sum(tokens[index[d]] for d in kept[s])
           for s in utilities}
    total = math.fsum(rho.values())
    return tau, {s: sorted(v) for s, v in kept.items()}, J, {s: r / total for s, r in rho.items()}


# Utilities on a coarse grid so that ties (at the cut too) are common.
docs_strategy = st.lists(st.tuples(st.integers(-4, 4), st.integers(-4, 4), st.integers(1, 500)), min_size=1,
                         max_size=30)


@settings(max_examples=40, deadline=None)
@given(docs_strategy, st.floats(0.05, 1.0), st.sampled_from(["kept", "all"]), st.booleans())
# J ties in exact arithmetic (0.75 * 0.5 = 0.25 * -0.75 + 0.75 * 0.75): a unit of max|alpha u| * 2^-52 split
# it by one unit, and S by the whole range; the power-of-two unit keeps it.
@example(docs=[(0, 2, 1), (-3, 3, 1)], keep_fraction=0.5, joint="all", shuffled=False)
def test_tables_equal_the_reference_on_random_scores(docs, keep_fraction, joint, shuffled):
    with tempfile.TemporaryDirectory() as d:
        ids = [f"x{i:02d}" for i in range(len(docs))]
        tokens = [n for *_, n in docs]
        utilities = {100: [a / 4 for a, _, _ in docs], 300: [b / 4 for _, b, _ in docs]}
        config, run = make_run(Path(d), scores=(utilities[100], utilities[300]), ids=ids, tokens=tokens,
                               regroup_settings={"keep_fraction": keep_fraction, "joint": joint})
        if shuffled:  # scores in another order than the corpus's: joined by id, not by position
            write_scores(run, 300, ids[::-1], utilities[300][::-1], tokens[::-1])
        tau, kept, J, weights = reference(ids, tokens, utilities, {100: 0.25, 300: 0.75}, keep_fraction, joint)
        try:
            got = tables(regroup(load_config(config), log=lambda _: None))
        except AutomixerError as e:  # only the main-text form can leave every group at the minimum
            assert joint == "all" and "densities sum to 0" in str(e) and math.fsum(weights.values()) != 1
            return
        assert [(s, t) for s, t, *_ in got["thresholds"]] == list(tau.items())
        assert got["groups"] == [(f"step-{s}", v) for s, v in kept.items()]
        assert {i: j for i, j, _ in got["joint"]} == pytest.approx(J, abs=1e-12)
        assert got["weights"] == pytest.approx(list(weights.values()), rel=1e-9, abs=1e-12)
        assert sum(got["weights"]) == pytest.approx(1.0)


def joined_by(run: Path) -> str:
    with duckdb.connect(str(run / "automixer.duckdb"), read_only=True) as con:
        return con.execute("SELECT value FROM provenance WHERE key = 'joined_by'").fetchone()[0]


@pytest.mark.parametrize("joint", ["kept", "all"])
def test_the_positional_join_and_the_join_by_id_give_the_same_bits(tmp_path, joint):
    # 300 documents with ties at the cut: scores written in the corpus's order are joined by position; the
    # same scores in another order (another writer) by id. Every table is the same, to the last bit.
    ids = [f"x{i:03d}" for i in range(300)]
    tokens = [1 + (i * 37) % 50 for i in range(300)]
    u1 = [((i * 7) % 13) / 8 - 0.7 for i in range(300)]
    u2 = [((i * 11) % 17) / 3 - 2.0 for i in range(300)]
    config, run = make_run(tmp_path, scores=(u1, u2), ids=ids, tokens=tokens,
                           regroup_settings={"keep_fraction": 0.3, "joint": joint})
    positional = tables(regroup(load_config(config), log=lambda _: None))
    assert joined_by(run) == "position"
    with duckdb.connect(str(run / "automixer.duckdb"), read_only=True) as con:
        ties = con.execute("SELECT min(n_kept - n_above), max(n_at) FROM thresholds").fetchone()
    assert ties[0] > 0 and ties[1] > 1  # the cut falls among ties
    for step, u in ((100, u1), (300, u2)):
        write_scores(run, step, ids[::-1], u[::-1], tokens[::-1])
    assert tables(regroup(load_config(config), log=lambda _: None)) == positional
    assert joined_by(run) == "id"


def test_cli_prints_weights_and_rerun_is_identical(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "step-100" in out and "0.4034" in out and str(run / "automixer.duckdb") in out
    first = tables(run / "automixer.duckdb")
    assert main(["regroup", "-c", str(config), "--set", "regroup.keep_fraction=0.3"]) == 0
    assert tables(run / "automixer.duckdb") != first
    assert main(["regroup", "-c", str(config)]) == 0
    assert tables(run / "automixer.duckdb") == first
    assert not list(run.glob(".automixer.duckdb.tmp*"))


def refused(config, run, capsys, *messages):
    """regroup exits 2 with one line holding every message, and the previous database is untouched."""
    before = (run / "automixer.duckdb").read_bytes() if (run / "automixer.duckdb").exists() else None
    assert main(["regroup", "-c", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for m in messages:
        assert m in err, err
    after = (run / "automixer.duckdb").read_bytes() if (run / "automixer.duckdb").exists() else None
    assert after == before
    assert not list(run.glob(".automixer.duckdb.tmp*")) and not (run / ".duckdb_tmp").exists()
    return err


def test_scores_that_do_not_cover_the_corpus_are_named_by_id(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    capsys.readouterr()
    write_scores(run, 300, IDS[:9], U300[:9], TOKENS[:9])
    refused(config, run, capsys, "step 300: 1 missing (e.g. d9)")
    write_scores(run, 300, IDS[:9] + ["d0"], U300, TOKENS)  # counts add up, d9 missing and d0 twice
    refused(config, run, capsys, "step 300: 1 missing (e.g. d9)", "step 300: 1 scored more than once (e.g. d0)")
    write_scores(run, 300, IDS[:9] + ["stray"], U300, TOKENS)
    refused(config, run, capsys, "step 300: 1 unknown to the corpus (e.g. stray)")
    write_scores(run, 300, IDS, U300, TOKENS[:9] + [99])  # d9 has 100 tokens in the corpus
    refused(config, run, capsys, "with the corpus's n_tokens does not hold",
            "step 300: 1 n_tokens differs from the corpus's (e.g. d9)")
    for p in (run / "scores" / "step=300").glob("*"):
        p.unlink()
    with pytest.raises(AutomixerError, match="scores/step=300: no score shards"):
        regroup(load_config(config), log=lambda _: None)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), -float("inf")])
def test_null_or_non_finite_utilities_are_named_by_sampler_and_id(tmp_path, capsys, bad):
    config, run = make_run(tmp_path)
    write_scores(run, 100, IDS, U100[:3] + [bad] + U100[4:], TOKENS)
    refused(config, run, capsys, "every corpus id has exactly one finite score per sampler, with the corpus's "
            "n_tokens does not hold", "step 100: 1 NULL id or NULL, NaN or infinite utility (e.g. d3)")


def test_a_null_id_is_named(tmp_path, capsys):
    config, run = make_run(tmp_path)
    write_scores(run, 300, IDS[:9] + [None], U300, TOKENS)
    refused(config, run, capsys, "step 300: 1 NULL id or NULL, NaN or infinite utility (e.g. <NULL id>)",
            "step 300: 1 missing (e.g. d9)")


@pytest.mark.parametrize("samplers,message", [
    ([{**SAMPLERS[0], "alpha": 0.3}, SAMPLERS[1]], "alpha must sum to 1, got 1.05"),
    ([{**SAMPLERS[0], "alpha": -0.25}, {**SAMPLERS[1], "alpha": 1.25}], "samplers[0].alpha: expected a finite "
                                                                         "number >= 0, got -0.25"),
    ([SAMPLERS[0], {**SAMPLERS[1], "step": 100}], "step listed twice"),
    ([{k: v for k, v in SAMPLERS[0].items() if k != "alpha"}, SAMPLERS[1]], "samplers[0]: missing alpha"),
    ([], "samplers: empty"),
])
def test_a_selection_that_does_not_hold_is_named(tmp_path, capsys, samplers, message):
    config, run = make_run(tmp_path)
    (run / "selection.json").write_text(json.dumps({"tasks": {}, "samplers": samplers}))
    refused(config, run, capsys, "selection.json: ", message)


def test_a_truncated_selection_is_named(tmp_path, capsys):
    config, run = make_run(tmp_path)
    (run / "selection.json").write_text(json.dumps({"tasks": {}, "samplers": SAMPLERS})[:40])
    refused(config, run, capsys, "selection.json: not valid JSON")


def test_regroup_reads_only_the_selected_samplers(tmp_path):
    config, run = make_run(tmp_path)
    expected = tables(regroup(load_config(config), log=lambda _: None))
    # A stray directory that is not a step, and a sampler the selection does not hold: neither is read.
    write_scores(run, 999, IDS, [5.0] * 10, TOKENS)
    (run / "scores" / "step=abc").mkdir()
    pq.write_table(pa.table({"x": [1]}), run / "scores" / "step=abc" / "part-00000.parquet")
    (run / "scores" / "notes.txt").write_text("hello")
    assert tables(regroup(load_config(config), log=lambda _: None)) == expected


def test_unreadable_score_files_are_named(tmp_path, capsys):
    config, run = make_run(tmp_path)
    part = run / "scores" / "step=300" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:100])  # truncated
    refused(config, run, capsys, f"{part}: not a readable Parquet file")
    write_scores(run, 300, IDS, [str(u) for u in U300], TOKENS, utility_type=pa.string())
    refused(config, run, capsys, f"{part}: column 'utility' is string, expected number")
    pq.write_table(pa.table({"id": IDS, "score": U300, "n_tokens": TOKENS}), part)
    refused(config, run, capsys, f"{part}: no column 'utility'")


def test_densities_summing_to_zero_are_an_error_that_shows_them(tmp_path, capsys):
    # keep 1 of 3 per sampler: F_1 = {a}, F_2 = {b}. Over all samplers J(a) = J(b) = 5 < J(c) = 9, so
    # with joint: all both kept documents sit at the corpus' minimum and every density is 0.
    samplers = [{"step": 1, "tasks": ["t"], "alpha": 0.5, "checkpoint": ""},
                {"step": 2, "tasks": ["u"], "alpha": 0.5, "checkpoint": ""}]
    config, run = make_run(tmp_path, scores=([10.0, 0.0, 9.0], [0.0, 10.0, 9.0]), ids=["a", "b", "c"],
                           tokens=[5, 5, 5], samplers=samplers, regroup_settings={"keep_fraction": 1 / 3, "joint": "all"})
    refused(config, run, capsys, "the group densities sum to 0.0 (must be > 0 to make weights): step-1 0.0, step-2 0.0")
    # The Appendix-B form scales over the kept documents only: both are the whole range, S = 1.
    assert main(["regroup", "-c", str(config), "--set", "regroup.joint=kept"]) == 0
    assert tables(run / "automixer.duckdb")["weights"] == [0.5, 0.5]


def test_a_run_path_with_glob_characters_is_read_literally(tmp_path):
    # DuckDB expands '[1]' as a character class: without escaping, runs[1]/ would read the decoy runs1/.
    config, run = make_run(tmp_path, root="runs[1]")
    decoy = tmp_path / "runs1" / "hand"
    (decoy / "scores").mkdir(parents=True)
    write_scores(decoy, 100, IDS, [1.0] * 10, TOKENS)
    write_scores(decoy, 300, IDS, [1.0] * 10, TOKENS)
    (decoy / "corpus").mkdir()
    pq.write_table(pq.read_table(run / "corpus" / "part-00000.parquet"), decoy / "corpus" / "part-00000.parquet")
    got = tables(regroup(load_config(config), log=lambda _: None))
    assert got["weights"] == pytest.approx([0.4033504106692690, 0.5966495893307311], rel=1e-12)


def test_the_database_records_what_it_was_built_from(tmp_path):
    config, run = make_run(tmp_path)
    regroup(load_config(config), log=lambda _: None)
    with duckdb.connect(str(run / "automixer.duckdb"), read_only=True) as con:
        prov = dict(con.execute("FROM provenance").fetchall())
    assert {"corpus", "selection", "scores", "keep_fraction", "joint"} <= prov.keys()
    assert prov["joint"] == "kept" and prov["documents"] == "10" and prov["kept_per_sampler"] == "5"


def test_bad_memory_limit_is_named(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config), "--set", "regroup.memory_limit=lots"]) == 2
    assert "regroup.memory_limit: DuckDB refused 'lots'" in capsys.readouterr().err
    assert not (run / "automixer.duckdb").exists()
