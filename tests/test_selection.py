from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from automixer_ops.cli import main
from automixer_ops.errors import AutomixerError
from automixer_ops.samplers import Selection
from automixer_ops.selection import select_samplers

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
