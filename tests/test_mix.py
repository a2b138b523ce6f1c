"""Mixing under a token budget (DESIGN §2): the hand example end to end, and properties."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_regroup import make_run

from automixer_ops.cli import main
from automixer_ops.mix import Group, allocate, draw


def drawn(run):
    rows = pq.read_table(sorted((run / "mixture").glob("part-*.parquet"))).to_pylist()
    return rows


def test_hand_example_mixture(tmp_path):
    # Weights 0.481346 (step-100) and 0.518654 (step-300) from test_regroup; T = 300 tokens.
    # step-100 in J order: d5 (60 tokens), d0 (10), d4 (50), d8 (90), d1 (20); quota 144.40
    #   -> d5, d0, d4, d8 = 210 tokens, carrying -65.60 to the next group.
    # step-300 in J order: d5 (60), d2 (30), d7 (80), d3 (40), d9 (100); quota 155.60 - 65.60 = 90
    #   -> d5, d2 = 90 tokens. Total 300 = T.
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    assert main(["mix", "-c", str(config), "--set", "mix.token_budget=300", "--set", "mix.max_repeats=0"]) == 0
    rows = drawn(run)
    by_group = {g: [r["id"] for r in rows if r["group"] == g] for g in ("step-100", "step-300")}
    assert sorted(by_group["step-100"]) == sorted(["d5", "d0", "d4", "d8"])
    assert sorted(by_group["step-300"]) == ["d2", "d5"]
    assert all(r["text"] == f"text {r['id']}" and r["repeat"] == 0 for r in rows)
    summary = json.loads((run / "mixture" / "weights.json").read_text())
    assert summary["tokens"] == 300 and summary["documents"] == 6
    assert summary["groups"]["step-100"]["allocated_tokens"] == pytest.approx(144.4038, abs=1e-4)
    assert (run / "mixture" / "blend.txt").read_text() == "0.700000 step-100_text_document 0.300000 step-300_text_document\n"
    # A trainer reads it with datasets directly; a rerun gives the same bytes.
    import datasets
    ds = datasets.load_dataset("parquet", data_files=str(run / "mixture" / "part-*.parquet"), split="train")
    assert ds.num_rows == 6 and set(ds.column_names) == {"id", "group", "repeat", "text"}
    first = (run / "mixture" / "part-00000.parquet").read_bytes()
    assert main(["mix", "-c", str(config), "--set", "mix.token_budget=300", "--set", "mix.max_repeats=0"]) == 0
    assert (run / "mixture" / "part-00000.parquet").read_bytes() == first


def test_cap_redistributes_and_repeats_fill_a_small_group(tmp_path):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    # Cap step-100 at 100 tokens: its quota falls to 100 (d5 + d0 = 70; d4 would pass the cap),
    # the rest (200 + 30 carried) goes to step-300: d5, d2, d7, d3, d9 = 310. Total 380 < T + 100.
    cap = '{group: step-100, max_tokens: 100}'
    assert main(["mix", "-c", str(config), "--set", "mix.token_budget=300", "--set", "mix.max_repeats=0",
                 "--set", f"mix.caps=[{cap}]"]) == 0
    summary = json.loads((run / "mixture" / "weights.json").read_text())
    assert summary["groups"]["step-100"]["tokens"] == 70 and summary["groups"]["step-300"]["tokens"] == 310
    # T = 1000 is more than one pass of both groups (540 tokens): a second pass (repeat = 1) fills it.
    assert main(["mix", "-c", str(config), "--set", "mix.token_budget=1000", "--set", "mix.max_repeats=1"]) == 0
    summary = json.loads((run / "mixture" / "weights.json").read_text())
    assert summary["groups"]["step-100"]["tokens"] == 460  # both passes: its capacity
    assert summary["tokens"] == 1080 and summary["groups"]["step-300"]["max_repeat"] == 1
    assert {r["repeat"] for r in drawn(run)} == {0, 1}


def test_unknown_cap_group_is_named(tmp_path, capsys):
    config, run = make_run(tmp_path)
    assert main(["regroup", "-c", str(config)]) == 0
    assert main(["mix", "-c", str(config), "--set", "mix.caps=[{group: step-7, max_tokens: 5}]"]) == 2
    assert "mix.caps: unknown group(s) ['step-7']" in capsys.readouterr().err


groups_strategy = st.lists(
    st.tuples(st.floats(0, 1), st.lists(st.integers(1, 50), max_size=8), st.one_of(st.none(), st.integers(0, 300))),
    min_size=1, max_size=4).filter(lambda gs: any(w > 0 for w, _, _ in gs))


def build(spec, max_repeats):
    return [Group(f"g{i}", w, [(f"g{i}-d{j}", n) for j, n in enumerate(docs)], cap, max_repeats)
            for i, (w, docs, cap) in enumerate(spec)]


@settings(max_examples=300, deadline=None)
@given(groups_strategy, st.integers(0, 2), st.integers(1, 3000))
def test_mixing_properties(spec, max_repeats, budget):
    groups = build(spec, max_repeats)
    alloc = draw(groups, budget)
    total = sum(g.used for g in groups)
    max_doc = max((n for g in groups for _, n in g.docs), default=0)
    for g in groups:
        assert g.cap is None or g.used <= g.cap  # caps are never exceeded
        assert all(r <= max_repeats for _, r in g.drawn)  # nor max_repeats
        assert alloc[g.name] <= g.capacity + 1e-6
    # Allocation hands out the whole budget, or everything the weighted groups can hold.
    weighted = sum(g.capacity for g in groups if g.weight > 0)
    assert sum(alloc.values()) == pytest.approx(min(budget, weighted), abs=1e-6)
    # Within one document of T, and nothing unassigned while a group can still take a document.
    assert total < budget + max_doc or total == 0
    if total < budget:
        assert all(g.next_doc() is None for g in groups)


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
