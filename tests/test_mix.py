"""Mixing under a token budget (DESIGN §2): the hand examples end to end, the checks that refuse a wrong
mixture, and the draw's properties against the doc-by-doc loop it replaces."""

from __future__ import annotations

import json

import duckdb
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_regroup import make_run

from automixer_ops.cli import main
from automixer_ops.mix import Group, ListOrder, allocate, draw


def drawn(run):
    return pq.read_table(sorted((run / "mixture").glob("part-*.parquet"))).to_pylist()


def mix(config, *settings_):
    return main(["mix", "-c", str(config), *[a for s in settings_ for a in ("--set", s)]])


def summary(run):
    return json.loads((run / "mixture" / "weights.json").read_text())


def test_hand_example_mixture_appendix_b(tmp_path):
    # Weights 0.403350 (step-100) and 0.596650 (step-300) from test_regroup; T = 300 tokens.
    # step-100 in J order: d5 .675 (60 tokens), d0 .225 (10), d1 .2 (20), d8 .175 (90), d4 .125 (50);
    #   quota 121.005 -> d5, d0, d1, d8 = 180 tokens, carrying -58.995 to the next group.
    # step-300 in J order: d5 .675 (60), d2 .45 (30), d7 .375 (80), d3 .3 (40), d9 .225 (100);
    #   quota 178.995 - 58.995 = 120 -> d5, d2, d7 = 170 tokens. Total 350: within one document of T.
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    assert mix(config, "mix.token_budget=300", "mix.max_repeats=0") == 0
    rows = drawn(run)
    by_group = {g: sorted(r["id"] for r in rows if r["group"] == g) for g in ("step-100", "step-300")}
    assert by_group == {"step-100": ["d0", "d1", "d5", "d8"], "step-300": ["d2", "d5", "d7"]}
    s = summary(run)
    assert (s["tokens"], s["documents"], s["capacity"], s["underfilled"]) == (350, 7, 540, False)
    assert s["groups"]["step-100"]["allocated_tokens"] == pytest.approx(121.00512, abs=1e-5)
    with duckdb.connect(str(run / "automixer.duckdb"), read_only=True) as con:
        table = con.execute('SELECT id, group_name, "repeat" FROM mixture ORDER BY ordinal').fetchall()
    assert table == [(r["id"], r["group"], r["repeat"]) for r in rows]  # the table is the parts, in order


def test_hand_example_mixture_main_text_form(tmp_path):
    # Weights 0.481346 (step-100) and 0.518654 (step-300) with joint: all; T = 300 tokens.
    # step-100 in J order: d5 (60 tokens), d0 (10), d4 (50), d8 (90), d1 (20); quota 144.40
    #   -> d5, d0, d4, d8 = 210 tokens, carrying -65.60 to the next group.
    # step-300 in J order: d5 (60), d2 (30), d7 (80), d3 (40), d9 (100); quota 155.60 - 65.60 = 90
    #   -> d5, d2 = 90 tokens. Total 300 = T.
    config, run = make_run(tmp_path, regroup_settings={"joint": "all"})
    assert main(["regroup", "-c", str(config)]) == 0
    assert mix(config, "mix.token_budget=300", "mix.max_repeats=0") == 0
    rows = drawn(run)
    by_group = {g: sorted(r["id"] for r in rows if r["group"] == g) for g in ("step-100", "step-300")}
    assert by_group == {"step-100": ["d0", "d4", "d5", "d8"], "step-300": ["d2", "d5"]}
    assert all(r["text"] == f"text {r['id']}" and r["repeat"] == 0 for r in rows)
    s = summary(run)
    assert s["tokens"] == 300 and s["documents"] == 6
    assert s["groups"]["step-100"]["allocated_tokens"] == pytest.approx(144.4038, abs=1e-4)
    assert (run / "mixture" / "blend.txt").read_text() == "0.700000 step-100_text_document 0.300000 step-300_text_document\n"
    # A trainer reads it with datasets directly; a rerun gives the same bytes.
    import datasets
    ds = datasets.load_dataset("parquet", data_files=str(run / "mixture" / "part-*.parquet"), split="train")
    assert ds.num_rows == 6 and set(ds.column_names) == {"id", "group", "repeat", "text"}
    first = {p.name: p.read_bytes() for p in (run / "mixture").iterdir()}
    assert mix(config, "mix.token_budget=300", "mix.max_repeats=0") == 0
    assert {p.name: p.read_bytes() for p in (run / "mixture").iterdir()} == first


def test_cap_redistributes_and_repeats_fill_a_small_group(tmp_path):
    config, run = make_run(tmp_path, regroup_settings={"joint": "all"})
    assert main(["regroup", "-c", str(config)]) == 0
    # Cap step-100 at 100 tokens: it can give d5 + d0 = 70 (d4 would pass the cap), the rest of the
    # budget (230) goes to step-300: d5, d2, d7, d3, d9 = 310. Total 380 < T + 100.
    assert mix(config, "mix.token_budget=300", "mix.max_repeats=0", "mix.caps=[{group: step-100, max_tokens: 100}]") == 0
    s = summary(run)
    assert s["groups"]["step-100"]["tokens"] == 70 and s["groups"]["step-300"]["tokens"] == 310
    assert s["groups"]["step-100"]["capacity"] == 70
    # T = 1000 is more than one pass of both groups (540 tokens): a second pass (repeat = 1) fills it.
    assert mix(config, "mix.token_budget=1000", "mix.max_repeats=1") == 0
    s = summary(run)
    assert s["groups"]["step-100"]["tokens"] == 460  # both passes: its capacity
    assert s["tokens"] == 1080 and s["groups"]["step-300"]["max_repeat"] == 1
    assert {r["repeat"] for r in drawn(run)} == {0, 1}
    assert main(["report", "-c", str(config), "--set", "mix.token_budget=1000", "--set", "mix.max_repeats=1"]) == 0


def test_unknown_cap_group_is_named(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    assert mix(config, "mix.caps=[{group: step-7, max_tokens: 5}]") == 2
    assert "mix.caps: unknown group(s) ['step-7']" in capsys.readouterr().err


def state(run):
    """What a refused mix must leave as it was: the mixture directory and the database's mixture tables."""
    files = {p.name: p.read_bytes() for p in (run / "mixture").iterdir()} if (run / "mixture").exists() else None
    with duckdb.connect(str(run / "automixer.duckdb"), read_only=True) as con:
        tables = {t: con.execute(f"FROM {t} ORDER BY ALL").fetchall() for t in ("mixture", "mixture_info")
                  if con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = ?", [t]).fetchone()[0]}
    return files, tables, sorted(p.name for p in run.iterdir())


def test_a_budget_above_capacity_is_refused_with_the_numbers(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    assert mix(config, "mix.token_budget=300", "mix.max_repeats=0") == 0
    before = state(run)
    capsys.readouterr()
    assert mix(config, "mix.token_budget=2000", "mix.max_repeats=2") == 2
    err = capsys.readouterr().err
    assert ("mix.token_budget: 2,000 tokens is more than the groups can give: 1,620 with mix.max_repeats 2 "
            "(step-100 690 (230 tokens x 3 passes); step-300 930 (310 tokens x 3 passes))") in err
    assert err.count("\n") == 1
    assert state(run) == before


def test_underfill_allowed_is_said_everywhere_and_the_report_accepts_it(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    args = ["--set", "mix.token_budget=2000", "--set", "mix.max_repeats=2", "--set", "mix.underfill=allow"]
    assert main(["mix", "-c", str(config), *args]) == 0
    assert "UNDERFILLED: the groups can give 1,620" in capsys.readouterr().err
    s = summary(run)
    assert (s["tokens"], s["capacity"], s["underfilled"]) == (1620, 1620, True)
    assert "underfilled" in s["note"]
    assert {r["repeat"] for r in drawn(run)} == {0, 1, 2}
    assert main(["report", "-c", str(config), *args]) == 0
    text = (run / "report" / "summary.md").read_text()
    assert "UNDERFILLED (mix.underfill: allow): 1,620 of the 2,000 tokens" in text
    assert "- [x] mixture tokens within one document of the budget: 1620 tokens for a budget of 2000 (UNDERFILLED" in text


def test_a_database_of_another_corpus_selection_or_scores_is_refused(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    # The corpus is prepared again without d9: mixing the old tables would draw d9 with no text.
    corpus = run / "corpus" / "part-00000.parquet"
    pq.write_table(pq.read_table(corpus).slice(0, 9), corpus)
    assert mix(config, "mix.token_budget=300") == 2
    assert "automixer.duckdb: built from another corpus/ than the run has now; rerun `automixer regroup` first" \
        in capsys.readouterr().err
    assert not (run / "mixture").exists()
    config, run = make_run(tmp_path / "b")
    assert main(["regroup", "-c", str(config)]) == 0
    sel = json.loads((run / "selection.json").read_text())
    sel["samplers"][0]["alpha"], sel["samplers"][1]["alpha"] = 0.5, 0.5
    (run / "selection.json").write_text(json.dumps(sel))
    assert mix(config, "mix.token_budget=300") == 2
    assert "built from another selection.json" in capsys.readouterr().err
    # A sampler scored again after regroup: the tables no longer hold its utilities.
    config, run = make_run(tmp_path / "c")
    assert main(["regroup", "-c", str(config)]) == 0
    assert mix(config, "mix.token_budget=300") == 0
    part = run / "scores" / "step=300" / "part-00000.parquet"
    pq.write_table(pq.read_table(part), part)
    for step in (["mix", "-c", str(config), "--set", "mix.token_budget=300"],
                 ["report", "-c", str(config), "--set", "mix.token_budget=300"]):
        capsys.readouterr()
        assert main(step) == 2
        assert "built from another scores/ than the run has now; rerun `automixer regroup`" in capsys.readouterr().err


def test_an_interrupted_mix_is_named_by_report(tmp_path, capsys, monkeypatch):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    assert mix(config, "mix.token_budget=300") == 0
    # Killed after the database's mixture tables were committed, before mixture/ was replaced.
    import automixer_ops.mix as mix_module

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(mix_module, "publish", killed)
    assert mix(config, "mix.token_budget=400") == 130
    monkeypatch.undo()
    assert summary(run)["token_budget"] == 300 and not list(run.glob(".staging-*"))
    capsys.readouterr()
    assert main(["report", "-c", str(config), "--set", "mix.token_budget=400"]) == 2
    assert "come from different runs of `automixer mix` (one was interrupted" in capsys.readouterr().err
    assert mix(config, "mix.token_budget=400") == 0
    assert main(["report", "-c", str(config), "--set", "mix.token_budget=400"]) == 0


def test_report_names_a_mixture_drawn_for_another_budget_or_not_drawn(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    assert main(["report", "-c", str(config)]) == 2
    assert "no mixture drawn since the last `automixer regroup`; run `automixer mix` first" in capsys.readouterr().err
    assert mix(config, "mix.token_budget=300") == 0
    assert main(["report", "-c", str(config), "--set", "mix.token_budget=400"]) == 2
    assert "drawn for mix.token_budget 300, but the config asks for 400; rerun `automixer mix`" in \
        capsys.readouterr().err


def test_parts_hold_docs_per_part_rows(tmp_path):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    assert mix(config, "mix.token_budget=1000", "mix.max_repeats=1", "mix.docs_per_part=4") == 0
    parts = sorted((run / "mixture").glob("part-*.parquet"))
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in parts]
    assert sizes[:-1] == [4] * (len(parts) - 1) and 1 <= sizes[-1] <= 4
    assert sum(sizes) == summary(run)["documents"]


# ---------------------------------------------------------------- the draw's properties

groups_strategy = st.lists(
    st.tuples(st.floats(0, 1), st.lists(st.integers(1, 50), max_size=8), st.one_of(st.none(), st.integers(0, 300))),
    min_size=1, max_size=4).filter(lambda gs: any(w > 0 for w, _, _ in gs))


def build(spec, max_repeats):
    return [Group(f"g{i}", w, ListOrder(docs), cap, max_repeats) for i, (w, docs, cap) in enumerate(spec)]


def loop_draw(spec, max_repeats, budget):
    """The doc-by-doc loop DESIGN §2 describes, written plainly: the reference for `draw`'s binary searches."""
    groups = build(spec, max_repeats)
    alloc = allocate(groups, budget)
    taken = {g.name: 0 for g in groups}

    def next_tokens(g):
        k, docs = taken[g.name], g.order.lengths
        if not docs or k >= len(docs) * (1 + max_repeats):
            return None
        n = docs[k % len(docs)]
        return None if g.cap is not None and g.cum(k) + n > g.cap else n

    used = {g.name: 0 for g in groups}
    carry = 0.0
    weighted = [g for g in groups if g.weight > 0]
    for g in weighted:
        target = alloc[g.name] + carry
        while used[g.name] < target - 1e-6 and next_tokens(g) is not None:
            used[g.name] += next_tokens(g)
            taken[g.name] += 1
        carry = target - used[g.name]
    for g in weighted:
        while sum(used.values()) < budget and next_tokens(g) is not None:
            used[g.name] += next_tokens(g)
            taken[g.name] += 1
    return taken


@settings(max_examples=300, deadline=None)
@given(groups_strategy, st.integers(0, 2), st.integers(1, 3000))
def test_draw_equals_the_doc_by_doc_loop_and_holds_its_promises(spec, max_repeats, budget):
    groups = build(spec, max_repeats)
    capacity = sum(g.capacity for g in groups if g.weight > 0)
    alloc = draw(groups, budget)
    assert {g.name: g.taken for g in groups} == loop_draw(spec, max_repeats, budget)
    total = sum(g.used for g in groups)
    max_doc = max((n for g in groups for n in g.order.lengths), default=0)
    for g in groups:
        assert g.cap is None or g.used <= g.cap  # caps are never exceeded
        assert g.taken <= g.limit  # nor max_repeats
        assert alloc[g.name] <= g.capacity + 1e-6
        assert g.weight > 0 or g.taken == 0  # a group of weight 0 gets nothing
    # Allocation hands out the whole budget, or everything the weighted groups can hold.
    assert sum(alloc.values()) == pytest.approx(min(budget, capacity), abs=1e-6)
    # Within one document of T, or everything the groups can give when that is less.
    if budget <= capacity:
        assert budget <= total < budget + max_doc
    else:
        assert total == capacity


@settings(max_examples=200, deadline=None)
@given(groups_strategy, st.integers(0, 2))
def test_allocation_follows_weights_when_nothing_is_capped(spec, max_repeats):
    groups = build(spec, max_repeats)
    budget = 1.0  # tiny: no group reaches its capacity unless it has none
    alloc = allocate(groups, budget)
    live = [g for g in groups if g.weight > 0 and g.capacity >= 1.0]
    if len(live) == len([g for g in groups if g.weight > 0]):
        total_w = sum(g.weight for g in live)
        for g in live:
            assert alloc[g.name] == pytest.approx(g.weight / total_w, abs=1e-9)


@pytest.mark.parametrize("budget,max_repeats,caps", [
    (2_000, 0, {}),                                   # a small budget: only the top of each group is sorted
    (2_000, 1, {"step-100": 700}),                    # a cap below one pass
    (2_000, 2, {"step-300": 9_000}),                  # a cap above one pass: found within the pass it ends in
    (60_000, 3, {}),                                  # more than a pass: the whole order, repeats
])
def test_duckdb_draws_what_the_in_memory_draw_does(tmp_path, budget, max_repeats, caps):
    # 3,000 documents, 300 a group (keep_fraction 0.1): the draw order table (all of a group, or only as
    # much of its top as the draw can reach), the binary searches on it and the SQL that expands the counts
    # give the in-memory draw on the whole order, row for row.
    n = 3000
    ids = [f"x{i:05d}" for i in range(n)]
    tokens = [1 + (i * 7919) % 97 for i in range(n)]
    u1 = [((i * 37) % 1000) / 1000 for i in range(n)]
    u2 = [((i * 91) % 1000) / 1000 for i in range(n)]
    config, run = make_run(tmp_path, scores=(u1, u2), ids=ids, tokens=tokens,
                           regroup_settings={"keep_fraction": 0.1})
    assert main(["regroup", "-c", str(config)]) == 0
    with duckdb.connect(str(run / "automixer.duckdb"), read_only=True) as con:
        weights = con.execute("SELECT group_name, weight FROM weights ORDER BY step").fetchall()
        orders = {g: con.execute("SELECT id, n_tokens FROM groups WHERE group_name = ? "
                                 "ORDER BY joint_utility DESC, id", [g]).fetchall() for g, _ in weights}
    cap_setting = "[" + ", ".join(f"{{group: {g}, max_tokens: {c}}}" for g, c in caps.items()) + "]"
    assert mix(config, f"mix.token_budget={budget}", f"mix.max_repeats={max_repeats}",
               f"mix.caps={cap_setting}") == 0
    groups = [Group(g, w, ListOrder([t for _, t in orders[g]]), caps.get(g), max_repeats) for g, w in weights]
    draw(groups, budget)
    expected = sorted((g.name, orders[g.name][k % g.order.docs][0], k // g.order.docs)
                      for g in groups for k in range(g.taken))
    assert sorted((r["group"], r["id"], r["repeat"]) for r in drawn(run)) == expected
    s = summary(run)
    assert s["tokens"] == sum(g.used for g in groups)
    assert {name: v["capacity"] for name, v in s["groups"].items()} == {g.name: g.capacity for g in groups}
    if budget > 10_000:
        assert max(r for *_, r in expected) >= 1


def test_an_empty_table_of_weights_cannot_be_mixed(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    with duckdb.connect(str(run / "automixer.duckdb")) as con:
        con.execute("DELETE FROM weights")
    assert mix(config) == 2
    assert "token_budget" in capsys.readouterr().err


def test_a_database_held_by_another_process_is_a_transient_error(tmp_path, capsys):
    # Another process writing automixer.duckdb (a regroup publishing, a mix): mix exits 75, which the
    # launcher retries, not 2 (bad input).
    import subprocess
    import sys
    import time

    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(60)", str(run / "automixer.duckdb")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        t0 = time.monotonic()
        assert mix(config, "mix.token_budget=300") == 75
        assert time.monotonic() - t0 < 30
        err = capsys.readouterr().err
        assert "automixer.duckdb: in use by another process" in err and "retry" in err
    finally:
        holder.kill()
        holder.wait()
    assert mix(config, "mix.token_budget=300") == 0
