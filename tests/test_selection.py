from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from automixer_ops.cli import main
from automixer_ops.errors import AutomixerError
from automixer_ops.samplers import Selection, format_table1
from automixer_ops.selection import select, select_samplers

STEPS = (100, 200, 300, 400)
# Hand-made benchmark: task -> metric -> values at STEPS.
TABLE = {
    "a": {"acc": [0.9, 0.1, 0.1, 0.1], "acc_norm": [0.2, 0.5, 0.3, 0.4]},  # acc_norm wins over acc: best 200
    "b": {"acc": [0.25, 0.30, 0.35, 0.40]},                               # still improving: best = last
    "c": {"acc_norm": [0.6, 0.5, 0.6, 0.55]},                              # tie at 100 and 300 -> earliest
    "d": {"perplexity": [40.0, 21.0, 22.0, 25.0]},                          # lower is better: best 200
    "e": {"acc": [0.3, 0.3, 0.3, 0.3]},                                    # flat: every step ties -> 100
}


def rows(table=TABLE):
    return [{"step": s, "task": t, "metric": m, "value": v, "stderr": 0.01, "n_docs": 100}
            for t, metrics in table.items() for m, vals in metrics.items() for s, v in zip(STEPS, vals)]


def test_hand_made_table_gives_expected_samplers_and_alpha():
    sel = select_samplers(rows())
    assert {t: (c.metric, c.best_step) for t, c in sel.tasks.items()} == {
        "a": ("acc_norm", 200), "b": ("acc", 400), "c": ("acc_norm", 100), "d": ("perplexity", 200),
        "e": ("acc", 100)}
    # k = 3 samplers for m = 5 tasks; s~ = (0.25, 0.5, 1.0), sum 1.75.
    assert [(s.step, s.tasks) for s in sel.samplers] == [(100, ["c", "e"]), (200, ["a", "d"]), (400, ["b"])]
    assert [s.alpha for s in sel.samplers] == pytest.approx([1 / 7, 2 / 7, 4 / 7])
    assert sum(s.alpha for s in sel.samplers) == pytest.approx(1.0)
    assert {t: c.progression for t, c in sel.tasks.items()} == {"a": 0.5, "b": 1.0, "c": 0.25, "d": 0.5, "e": 0.25}
    assert Selection.from_json(sel.to_json()) == sel


def test_single_checkpoint_for_all_tasks_gets_alpha_one():
    sel = select_samplers(rows({"x": {"acc": [0.1, 0.2, 0.3, 0.4]}, "y": {"acc_norm": [0.1, 0.1, 0.1, 0.9]}}))
    assert [(s.step, s.tasks, s.alpha) for s in sel.samplers] == [(400, ["x", "y"], 1.0)]


def test_a_task_without_a_usable_metric_is_an_error():
    with pytest.raises(AutomixerError, match="task 'f' reports none of acc_norm, acc, bits_per_byte, perplexity"):
        select_samplers(rows({"f": {"f1": [0.1, 0.2, 0.3, 0.4]}}))


def test_select_step_writes_selection_heatmap_and_prints_table1(tmp_path, capsys):
    run = tmp_path / "runs" / "r"
    (run / "eval").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows()), run / "eval" / "benchmark.parquet")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"id": "r", "root": "runs"}, "corpus": {"paths": ["x.jsonl"]}}))
    assert main(["select", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "3 sampler(s) for 5 task(s)" in out
    assert "step    200  alpha 0.2857  tasks: a, d" in out
    saved = json.loads((run / "selection.json").read_text())
    assert saved["samplers"][2] == {"step": 400, "tasks": ["b"], "alpha": pytest.approx(4 / 7),
                                    "checkpoint": str(run / "checkpoints" / "step-400")}
    png = (run / "eval" / "benchmark_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_select_without_benchmark_names_the_missing_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"id": "r", "root": "runs"}, "corpus": {"paths": ["x.jsonl"]}}))
    assert main(["select", "-c", str(config)]) == 2
    assert "eval/benchmark.parquet: not found; run `automixer evaluate` first" in capsys.readouterr().err


def rows_with_stderr(table: dict) -> list[dict]:
    """table: task -> metric -> [(value, stderr)] at STEPS."""
    return [{"step": s, "task": t, "metric": m, "value": v, "stderr": se, "n_docs": 100}
            for t, metrics in table.items() for m, vals in metrics.items() for s, (v, se) in zip(STEPS, vals)]


# acc_norm peaks at 200, gold_ll (continuous) at 300; acc at 100.
BY_METRIC = {
    "a": {"acc": [(0.40, 0.05), (0.30, 0.05), (0.35, 0.05), (0.30, 0.05)],
          "acc_norm": [(0.30, 0.05), (0.45, 0.05), (0.40, 0.05), (0.42, 0.05)],
          "gold_ll": [(-3.0, 0.01), (-2.8, 0.01), (-2.5, 0.01), (-2.6, 0.01)]},
    "b": {"acc": [(0.50, 0.05), (0.52, 0.05), (0.55, 0.05), (0.51, 0.05)],  # no acc_norm (as boolq)
          "gold_ll": [(-2.0, 0.02), (-1.9, 0.02), (-1.95, 0.02), (-1.8, 0.02)]},
}


def test_select_metric_chooses_the_metric_that_picks_the_best_step():
    rows = rows_with_stderr(BY_METRIC)
    by = {m: select_samplers(rows, metric=m) for m in ("auto", "acc", "acc_norm", "gold_ll")}
    assert {t: (c.metric, c.best_step) for t, c in by["auto"].tasks.items()} == {"a": ("acc_norm", 200),
                                                                               "b": ("acc", 300)}
    assert {t: (c.metric, c.best_step) for t, c in by["acc"].tasks.items()} == {"a": ("acc", 100), "b": ("acc", 300)}
    # acc_norm where a task reports it, else as auto (b has no acc_norm)
    assert {t: c.metric for t, c in by["acc_norm"].tasks.items()} == {"a": "acc_norm", "b": "acc"}
    gold = by["gold_ll"]
    assert {t: (c.metric, c.best_step, c.best_value) for t, c in gold.tasks.items()} == {
        "a": ("gold_ll", 300, -2.5), "b": ("gold_ll", 400, -1.8)}  # higher is better
    assert [(s.step, s.tasks) for s in gold.samplers] == [(300, ["a"]), (400, ["b"])]
    assert gold.metric == "gold_ll"
    saved = json.loads(gold.to_json())
    assert (saved["metric"], saved["metric_preference"], saved["noise_z"]) == ("gold_ll", ["gold_ll"], 1.0)
    assert Selection.from_json(gold.to_json()) == gold


def test_gold_ll_is_required_of_every_task_when_chosen():
    rows = rows_with_stderr({"a": BY_METRIC["a"], "old": {"acc": [(0.1, 0.01)] * 4}})
    with pytest.raises(AutomixerError, match="task 'old' reports none of gold_ll \\(has acc\\); the benchmark table "
                                             "predates gold_ll: rerun `automixer evaluate`"):
        select_samplers(rows, metric="gold_ll")
    with pytest.raises(AutomixerError, match="select.metric: 'f1' is not one of"):
        select_samplers(rows, metric="f1")


def test_separated_flags_a_best_step_beyond_the_noise_of_the_last():
    table = {
        # |0.45 - 0.40| = 0.05 <= 1 * sqrt(0.05^2 + 0.05^2) = 0.0707: within noise
        "noisy": {"acc": [(0.30, 0.05), (0.45, 0.05), (0.42, 0.05), (0.40, 0.05)]},
        # |0.60 - 0.40| = 0.20 > sqrt(0.02^2 + 0.02^2) = 0.028: separated
        "clear": {"acc": [(0.30, 0.02), (0.60, 0.02), (0.50, 0.02), (0.40, 0.02)]},
        "at_last": {"acc": [(0.30, 0.02), (0.35, 0.02), (0.40, 0.02), (0.50, 0.02)]},  # best is the last: None
        "no_stderr": {"acc": [(0.30, None), (0.60, 0.02), (0.50, 0.02), (0.40, float("nan"))]},  # None
    }
    sel = select_samplers(rows_with_stderr(table))
    assert {t: c.separated for t, c in sel.tasks.items()} == {"noisy": False, "clear": True, "at_last": None,
                                                             "no_stderr": None}
    assert (sel.tasks["noisy"].best_stderr, sel.tasks["noisy"].last_stderr) == (0.05, 0.05)
    assert (sel.tasks["no_stderr"].best_stderr, sel.tasks["no_stderr"].last_stderr) == (0.02, None)
    # A larger noise_z asks more of a separation; 0 flags any difference.
    assert select_samplers(rows_with_stderr(table), noise_z=10).tasks["clear"].separated is False
    assert select_samplers(rows_with_stderr(table), noise_z=0).tasks["noisy"].separated is True

    text = format_table1(sel)
    lines = text.splitlines()
    assert "best value" in lines[0] and "best vs last" in lines[0]
    noisy = next(line for line in lines if line.startswith("noisy"))
    assert "0.4500 ± 0.0500" in noisy and "0.4000 ± 0.0500" in noisy and noisy.endswith("within noise")
    assert next(line for line in lines if line.startswith("clear")).endswith("separated")
    assert next(line for line in lines if line.startswith("at_last")).endswith("-")
    no_se = next(line for line in lines if line.startswith("no_stderr"))
    assert "0.6000 ± 0.0200" in no_se and " 0.4000 " in no_se and no_se.endswith("-")
    assert sum(line.startswith("best vs last: 'within noise' when |best - last| <= 1 x") for line in lines) == 1


def test_an_older_selection_json_still_reads():
    old = {"metric_preference": ["acc_norm", "acc", "bits_per_byte", "perplexity"],
           "tasks": {"a": {"task": "a", "metric": "acc", "best_step": 100, "best_value": 0.5, "last_step": 200,
                           "last_value": 0.4, "progression": 0.5}},
           "samplers": [{"step": 100, "tasks": ["a"], "alpha": 1.0, "checkpoint": ""}]}
    sel = Selection.from_json(json.dumps(old))
    c = sel.tasks["a"]
    assert (c.best_stderr, c.last_stderr, c.separated, sel.metric, sel.noise_z) == (None, None, None, "auto", 1.0)
    assert "0.5000" in format_table1(sel)


def test_select_records_the_metric_setting(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "eval").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows_with_stderr(BY_METRIC)), run / "eval" / "benchmark.parquet")
    sel = select(run, metric="gold_ll", noise_z=2.0)
    saved = json.loads((run / "selection.json").read_text())
    assert (saved["metric"], saved["noise_z"]) == ("gold_ll", 2.0)
    assert saved["tasks"]["a"]["best_stderr"] == 0.01 and saved["tasks"]["a"]["separated"] is True
    assert Selection.from_json((run / "selection.json").read_text()) == sel
