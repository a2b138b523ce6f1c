"""The experiment's table and plot (automixer_ops/experiment_table.py) on hand-made results: paired deltas
and their stderr equal hand-computed numbers, the task average is taken per seed, acc_norm wins over acc,
missing baselines and seeds are named, and table.md / plot.png are written whole or not at all."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from automixer_ops.errors import AutomixerError
from automixer_ops.experiment_table import (PAPER_REFERENCE, paired_delta, read_results, render_table, summarize,
                                            write_table)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(method, seed, task, metric, value, kind=None, n_docs=100):
    kind = kind or {"uniform": "uniform", "am": "automixer", "ppl": "ppl"}.get(method, "scores")
    return {"method": method, "kind": kind,
            "seed": seed, "task": task, "metric": metric, "value": value, "stderr": 0.01, "n_docs": n_docs}


def write_results(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("method", pa.string()), ("kind", pa.string()), ("seed", pa.int64()), ("task", pa.string()),
                        ("metric", pa.string()), ("value", pa.float64()), ("stderr", pa.float64()),
                        ("n_docs", pa.int64())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def accuracy_rows(values: dict[tuple[str, str], list[float]], metric: str = "acc") -> list[dict]:
    """{(method, task): [value of seed 0, 1, ...]} as rows of one metric."""
    return [row(m, s, t, metric, v) for (m, t), vs in values.items() for s, v in enumerate(vs)]


META = {"name": "t", "methods": [("uniform", "uniform"), ("am", "automixer")], "seeds": [0, 1, 2],
        "token_budget": 1000, "target": {"preset": "tiny", "seq_len": 64}, "n_docs": {"a": 100, "b": 100},
        "command": "automixer experiment -c /x/e.yaml --stage table", "wall_time": 75.0}


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """The first markdown table after the line starting with `heading`: method -> its cells (after method)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    i = next(j for j in range(start, len(lines)) if lines[j].startswith("|"))
    out = {}
    for line in lines[i + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        out[cells[0]] = cells[1:]
    return out


def header_cells(text: str, heading: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    line = next(line for line in lines[start:] if line.startswith("|"))
    return [c.strip() for c in line.strip("|").split("|")]


# ---------------------------------------------------------------- statistics

def test_paired_delta_equals_hand_computed_numbers():
    a = {0: 50.0, 1: 52.0, 2: 55.0}
    b = {0: 49.0, 1: 50.0, 2: 52.0}
    mean, se, n = paired_delta(a, b)
    # d = (1, 2, 3): mean 2, std (ddof=1) 1, stderr 1/sqrt(3)
    assert n == 3 and mean == pytest.approx(2.0) and se == pytest.approx(1 / math.sqrt(3))


def test_paired_stderr_is_much_smaller_than_unpaired_when_seeds_move_both_methods():
    # The seed moves both methods by several points; the method adds 1 +- 0.1.
    base = {0: 40.0, 1: 46.0, 2: 52.0, 3: 43.0}
    method = {0: 41.0, 1: 47.1, 2: 52.9, 3: 44.0}
    mean, se, n = paired_delta(method, base)
    _, se_a, _ = summarize(method)
    _, se_b, _ = summarize(base)
    unpaired = math.sqrt(se_a ** 2 + se_b ** 2)
    assert n == 4 and mean == pytest.approx(1.0)
    assert se == pytest.approx(statistics.stdev([1.0, 1.1, 0.9, 1.0]) / 2)
    assert se < unpaired / 20


def test_paired_delta_uses_only_the_seeds_both_have():
    mean, se, n = paired_delta({0: 3.0, 1: 5.0, 2: 9.0}, {1: 1.0, 2: 4.0, 7: 0.0})
    assert (n, mean) == (2, pytest.approx(4.5)) and se == pytest.approx(0.5)  # d = (4, 5)
    mean, se, n = paired_delta({0: 3.0}, {0: 1.0})
    assert (mean, se, n) == (2.0, None, 1)  # one seed: no stderr
    mean, se, n = paired_delta({0: 3.0}, {1: 1.0})
    assert n == 0 and se is None and math.isnan(mean)


# ---------------------------------------------------------------- the table

def test_table_cells_and_paired_deltas_match_hand_computation(tmp_path):
    values = {("uniform", "a"): [0.40, 0.50, 0.45], ("uniform", "b"): [0.60, 0.62, 0.70],
              ("am", "a"): [0.42, 0.53, 0.46], ("am", "b"): [0.61, 0.66, 0.72]}
    rows = accuracy_rows(values)
    text, _ = render_table(rows, "uniform", META)
    absolute = table_rows(text, "## Accuracy")
    # uniform, task a: 40, 50, 45 points -> mean 45, stderr std(5)/sqrt(3)
    assert absolute["uniform"][2] == f"45.00 ± {5 / math.sqrt(3):.2f}"
    # avg per seed: uniform (50, 56, 57.5), am (51.5, 59.5, 59)
    u_avg, am_avg = [50.0, 56.0, 57.5], [51.5, 59.5, 59.0]
    assert absolute["uniform"][4] == f"{statistics.fmean(u_avg):.2f} ± {statistics.stdev(u_avg) / math.sqrt(3):.2f}"
    delta = table_rows(text, "### Δ accuracy")
    d = [x - y for x, y in zip(am_avg, u_avg, strict=True)]  # 1.5, 3.5, 1.5
    assert delta["am"][4].startswith(f"+{statistics.fmean(d):.2f} ± {statistics.stdev(d) / math.sqrt(3):.2f}")
    da = [2.0, 3.0, 1.0]
    assert delta["am"][2].startswith(f"+2.00 ± {statistics.stdev(da) / math.sqrt(3):.2f}")
    assert delta["uniform"][2] == "(baseline)"
    assert header_cells(text, "### Δ accuracy")[-1].startswith("paper")
    assert "+1.93" in delta["am"][-1] and "+1.22" in delta["am"][-1]  # automixer: Table 2 and Table 3
    assert delta["uniform"][-1].startswith("0")


def test_significance_mark_only_where_the_mean_exceeds_two_stderr(tmp_path):
    values = {("uniform", "a"): [0.40, 0.50, 0.60], ("am", "a"): [0.41, 0.51, 0.61],   # d = 1, 1, 1 +- 0
              ("uniform", "b"): [0.40, 0.50, 0.60], ("am", "b"): [0.45, 0.46, 0.60]}   # d = 5, -4, 0
    text, _ = render_table(accuracy_rows(values), "uniform", META)
    delta = table_rows(text, "### Δ accuracy")
    assert delta["am"][2].endswith("†") and not delta["am"][3].endswith("†")
    assert "† marks" in text and "How to read it" in text


def test_avg_is_taken_per_seed_and_a_seed_missing_a_task_is_left_out(tmp_path):
    values = {("uniform", "a"): [0.40, 0.50, 0.45], ("uniform", "b"): [0.60, 0.62, 0.70],
              ("am", "a"): [0.42, 0.53, 0.46], ("am", "b"): [0.61, 0.66]}   # am has no seed 2 for task b
    text, blocks = render_table(accuracy_rows(values), "uniform", META)
    acc = blocks[0]
    assert acc.avg["am"] == pytest.approx({0: 51.5, 1: 59.5})
    assert acc.avg["uniform"] == pytest.approx({0: 50.0, 1: 56.0, 2: 57.5})
    delta = table_rows(text, "### Δ accuracy")
    assert delta["am"][1] == "2"  # paired seeds of avg
    assert delta["am"][4].startswith(f"+{(1.5 + 3.5) / 2:.2f} ± {1.0:.2f}")
    assert "am: seed(s) 2 lack a task of this block and are left out of avg" in text


def test_acc_norm_is_preferred_over_acc_per_task():
    rows = (accuracy_rows({("uniform", "a"): [0.30, 0.31], ("am", "a"): [0.32, 0.33]}, "acc")
            + accuracy_rows({("uniform", "a"): [0.50, 0.51], ("am", "a"): [0.55, 0.56]}, "acc_norm")
            + accuracy_rows({("uniform", "b"): [0.20, 0.21], ("am", "b"): [0.22, 0.23]}, "acc"))
    text, blocks = render_table(rows, "uniform", {"methods": [("uniform", "uniform"), ("am", "automixer")]})
    assert blocks[0].tasks == {"a": "acc_norm", "b": "acc"}
    assert header_cells(text, "## Accuracy")[3:6] == ["a (acc_norm)", "b (acc)", "avg"]
    assert table_rows(text, "## Accuracy")["uniform"][2].startswith("50.50 ±")
    assert table_rows(text, "### Δ accuracy")["am"][2].startswith("+5.00 ± 0.00")


def test_gold_ll_and_likelihood_only_tasks_get_their_own_blocks():
    rows = (accuracy_rows({("uniform", "a"): [0.4, 0.5], ("am", "a"): [0.5, 0.6]})
            + accuracy_rows({("uniform", "a"): [-2.5, -2.4], ("am", "a"): [-2.4, -2.2]}, "gold_ll")
            + accuracy_rows({("uniform", "c"): [1.2, 1.1], ("am", "c"): [1.1, 1.05]}, "bits_per_byte"))
    text, blocks = render_table(rows, "uniform", {})
    assert [b.title for b in blocks] == ["accuracy", "gold_ll", "bits_per_byte"]
    assert blocks[0].tasks == {"a": "acc"}  # the likelihood-only task is not in the accuracy average
    gold = table_rows(text, "### Δ gold_ll")
    assert gold["am"][2].startswith("+0.1500 ± 0.0500")  # d = 0.1, 0.2
    assert "paper" not in " ".join(header_cells(text, "### Δ gold_ll"))
    assert "lower is better" in text
    assert table_rows(text, "### Δ bits_per_byte")["am"][2].startswith("-0.0750 ± 0.0250")


def test_methods_in_the_experiments_order_and_one_seed_gives_na():
    rows = accuracy_rows({("am", "a"): [0.5], ("uniform", "a"): [0.4]})
    text, _ = render_table(rows, "uniform", {"methods": [["uniform", "uniform"], ["am", "automixer"]],
                                             "seeds": [0]})
    assert list(table_rows(text, "## Accuracy")) == ["uniform", "am"]
    assert table_rows(text, "## Accuracy")["am"][2] == "50.00 ± n/a"
    delta = table_rows(text, "### Δ accuracy")["am"]
    assert delta[2] == "+10.00 ± n/a" and "†" not in delta[2]  # no stderr, no mark


def test_missing_seeds_and_methods_show_na_and_are_named():
    rows = accuracy_rows({("uniform", "a"): [0.4, 0.5, 0.45], ("am", "a"): [0.42]})
    meta = {**META, "methods": [("uniform", "uniform"), ("am", "automixer"), ("ppl", "ppl")]}
    text, _ = render_table(rows, "uniform", meta)
    assert "**missing results**" in text and "am seed(s) 1, 2" in text and "ppl seed(s) 0, 1, 2" in text
    delta = table_rows(text, "### Δ accuracy")
    assert delta["am"][1] == "1" and delta["am"][2] == "+2.00 ± n/a"
    assert delta["ppl"][1:4] == ["0", "n/a", "n/a"]
    assert "+0.66" in delta["ppl"][-1]


def test_missing_baseline_is_a_clear_error(tmp_path):
    rows = accuracy_rows({("am", "a"): [0.5, 0.6]})
    with pytest.raises(AutomixerError, match="baseline 'uniform' has no results .*am"):
        render_table(rows, "uniform", META)
    results = write_results(tmp_path / "results.parquet", rows)
    with pytest.raises(AutomixerError, match="baseline 'uniform'"):
        write_table(results, tmp_path / "out", "uniform", META)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    with pytest.raises(AutomixerError, match="results not found"):
        write_table(tmp_path / "nope.parquet", tmp_path / "out", "uniform", META)


def test_duplicate_values_are_refused(tmp_path):
    rows = accuracy_rows({("uniform", "a"): [0.4]}) * 2
    with pytest.raises(AutomixerError, match="more than one value for method 'uniform', seed 0, task 'a'"):
        read_results(write_results(tmp_path / "r.parquet", rows))


def test_header_reads_standalone():
    rows = accuracy_rows({("uniform", "a"): [0.4, 0.5, 0.45], ("am", "a"): [0.42, 0.5, 0.5]})
    text, _ = render_table(rows, "uniform", META)
    for expected in ("# Experiment `t`", "uniform (uniform), am (automixer); baseline: uniform", "seeds: 0, 1, 2",
                     "token budget: 1,000 tokens", "target: tiny (seq_len=64)", "test documents per task: a 100",
                     "reproduce: `automixer experiment -c /x/e.yaml --stage table`", "wall time: 75 s"):
        assert expected in text, expected
    # the runner's spelling (automixer_ops/experiment.py): wall_s, base; n_docs from the results
    meta = {"name": "t", "wall_s": 3723.4, "base": "/x/demo.yaml"}
    text, _ = render_table(rows, "uniform", meta)
    for expected in ("wall time: 3723 s (1h02m03s)", "base run config: `/x/demo.yaml`",
                     "test documents per task: a 100"):
        assert expected in text, expected


def test_paper_reference_covers_the_kinds_of_design_section_5():
    from automixer_ops.experiment_config import METHOD_KINDS

    assert set(PAPER_REFERENCE) <= set(METHOD_KINDS)
    assert {k: [v for v, _ in refs] for k, refs in PAPER_REFERENCE.items()} == {
        "uniform": [0.0], "automixer": [1.93, 1.22], "ppl": [0.66], "dsir": [0.60], "last-ckpt": [0.7],
        "all-ckpt": [0.8]}


# ---------------------------------------------------------------- the files

def _results(tmp_path: Path) -> Path:
    rows = (accuracy_rows({("uniform", "a"): [0.4, 0.5, 0.45], ("am", "a"): [0.42, 0.53, 0.46],
                           ("uniform", "b"): [0.6, 0.62, 0.7], ("am", "b"): [0.61, 0.66, 0.72]})
            + accuracy_rows({("uniform", "a"): [-2.5, -2.4, -2.45], ("am", "a"): [-2.4, -2.3, -2.4]}, "gold_ll"))
    return write_results(tmp_path / "results.parquet", rows)


def test_write_table_writes_markdown_and_a_png(tmp_path):
    table, plot = write_table(_results(tmp_path), tmp_path / "out", "uniform", META)
    assert (table, plot) == (tmp_path / "out" / "table.md", tmp_path / "out" / "plot.png")
    assert table.read_text(encoding="utf-8").startswith("# Experiment `t`")
    data = plot.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 5000
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plot.png", "table.md"]  # no temporaries


def test_a_failed_write_leaves_the_previous_files_and_no_partial_one(tmp_path, monkeypatch):
    import automixer_ops.experiment_table as et

    out = tmp_path / "out"
    out.mkdir()
    (out / "table.md").write_text("old table")
    (out / "plot.png").write_bytes(b"old plot")

    def broken_plot(blocks, methods, kinds, baseline, path):
        path.write_bytes(PNG_MAGIC + b"half")  # a plot cut short
        raise RuntimeError("disk full")

    monkeypatch.setattr(et, "_render_plot", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        write_table(_results(tmp_path), out, "uniform", META)
    assert (out / "table.md").read_text() == "old table" and (out / "plot.png").read_bytes() == b"old plot"
    assert sorted(p.name for p in out.iterdir()) == ["plot.png", "table.md"]

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="disk full"):
        write_table(_results(tmp_path), fresh, "uniform", META)
    assert list(fresh.iterdir()) == []
