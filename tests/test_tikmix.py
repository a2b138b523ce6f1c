"""TiKMiX on a real (tiny) run: Group Influence recorded in DuckDB, static TiKMiX-D and -M mixtures that honour
the mixture contract and their solve, the dynamic run (stage by stage = all at once, cursors, checkpoints at the
boundaries) and the `automixer_tikmix` DAG end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from automixer_ops.cli import main
from automixer_ops.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["tasks.targets=[arc_easy, piqa]", "tikmix.per_group=4", "target.seq_len=64", "target.batch_size=4",
         "target.warmup_fraction=0.25"]


def cfg_of(scoring_run, *more):
    return load_config(scoring_run, [*SMALL, *more])


def test_group_influence_cli_records_every_task_and_source(scoring_run, capsys):
    args = ["-c", str(scoring_run), *[x for o in SMALL for x in ("--set", o)]]
    assert main(["group-influence", *args, "--step", "30"]) == 0
    out = capsys.readouterr()
    cfg = cfg_of(scoring_run)
    db = cfg.run_dir / "tikmix" / "tikmix.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute("""SELECT task, count(*), sum(n_docs), min(n_docs), count(stderr) FROM group_influence
                              WHERE checkpoint = 'proxy:step-30' GROUP BY task ORDER BY task""").fetchall()
    assert rows == [("arc_easy", 9, 36, 4, 9), ("piqa", 9, 36, 4, 9)]  # 9 sources x 4 sampled documents
    assert "arc_easy" in out.out and "piqa" in out.out
    assert main(["group-influence", *args, "--step", "30"]) == 0  # a rerun reuses the estimate
    assert "already done" in capsys.readouterr().err
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM group_influence").fetchone()[0] == 18  # replaced, not appended


def test_static_tikmix_d_draws_the_solved_weights_in_the_mixture_contract(scoring_run, tmp_path):
    from automixer_ops.tikmix.method import tikmix_mixture

    cfg = cfg_of(scoring_run)
    out, work, budget = tmp_path / "mixture", tmp_path / "work", 4000
    logs = []
    tikmix_mixture(cfg, "d", out, budget, 0, work, log=logs.append)
    info = json.loads((out / "weights.json").read_text())
    solved = json.loads((work / "solve-d-step=30-seed=0.json").read_text())
    assert abs(sum(solved["weights"].values()) - 1) < 1e-9 and solved["exact"]
    # Sources in name order, each its share of the budget plus the rounding carried from the one before: after
    # every source the tokens drawn so far are the shares so far, within the one document that reached them.
    corpus = pq.read_table(list((cfg.run_dir / "corpus").glob("part-*.parquet")), columns=["n_tokens"])
    longest = max(corpus.column("n_tokens").to_pylist())
    want = got = 0.0
    for g in sorted(solved["weights"]):
        want += solved["weights"][g] * budget
        got += info["groups"].get(g, {"tokens": 0})["tokens"]
        assert -1e-6 <= got - want <= longest, g
    parts = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert set(parts.column_names) >= {"id", "group", "repeat", "text"}
    assert (out / "blend.txt").read_text().strip()
    with duckdb.connect(str(work / "tikmix.duckdb"), read_only=True) as con:
        total, n = con.execute("SELECT sum(weight), count(*) FROM tikmix_weights WHERE version = "
                               "'static-d-step=30-seed=0'").fetchone()
    assert abs(total - 1) < 1e-9 and n == 9
    mtime = (out / "weights.json").stat().st_mtime_ns
    tikmix_mixture(cfg, "d", out, budget, 0, work, log=logs.append)  # the same inputs: nothing to do
    assert "already drawn" in logs[-1] and (out / "weights.json").stat().st_mtime_ns == mtime


def test_static_tikmix_m_probes_fits_and_searches(scoring_run, tmp_path):
    from automixer_ops.tikmix.method import tikmix_mixture

    cfg = cfg_of(scoring_run, "tikmix.m.n_candidates=5", "tikmix.m.probe_steps=2", "tikmix.m.probe_batch_size=2",
                 "tikmix.m.n_search=400", "tikmix.m.top_k=8", "tikmix.m.num_boost_round=20")
    tikmix_mixture(cfg, "m", tmp_path / "mixture", 4000, 1, tmp_path / "work", log=lambda _: None)
    solved = json.loads((tmp_path / "work" / "solve-m-step=30-seed=1.json").read_text())
    w = np.array(list(solved["weights"].values()))
    caps = np.array([solved["caps"][g] for g in solved["weights"]])
    assert abs(w.sum() - 1) < 1e-9 and (w <= caps + 1e-9).all()
    assert set(solved["heldout_spearman"]) == {"arc_easy", "piqa"}
    assert np.array(solved["measured_changes"]).shape == (5, 2)
    assert json.loads((tmp_path / "mixture" / "weights.json").read_text())["tokens"] >= 4000


def _tensors(ckpt: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_dynamic_stage_by_stage_equals_all_at_once_and_reads_on_through_the_corpus(scoring_run, tmp_path):
    from automixer_ops.tikmix.dynamic import train_dynamic

    cfg = cfg_of(scoring_run, "tikmix.stages=3")
    budget = 256 * 12  # 12 steps of 4 x 64 tokens: stages at steps 4 and 8
    whole = tmp_path / "whole"
    ckpts = train_dynamic(cfg, "d", whole, cfg.target, budget, 0, log=lambda _: None)
    assert {4, 8, 12} <= set(ckpts)  # a checkpoint at every boundary (and the end), besides save_every's
    stages = json.loads((whole / "stages.json").read_text())
    assert stages["bounds"] == [0, 4, 8, 12] and stages["complete"]
    assert [s["checkpoint"] for s in stages["stages"]] == [None, "target:step-4", "target:step-8"]
    for prev, st in zip(stages["stages"], stages["stages"][1:]):  # stage 0: the natural shares
        assert abs(sum(st["weights"].values()) - 1) < 1e-9
        assert st["solve"]["w_prev"] == pytest.approx(prev["weights"])  # D's KL is to the previous stage
    assert (whole / "stages.png").stat().st_size > 0

    # The same run in the DAG's pieces (draw, train, measure, train, ...), through the CLI: the same model.
    split = tmp_path / "split"
    args = ["tikmix-dynamic", "-c", str(scoring_run), *[x for o in [*SMALL, "tikmix.stages=3",
                                                                     f"mix.token_budget={budget}"]
                                                         for x in ("--set", o)], "--out", str(split), "--seed", "0"]
    for s in range(3):
        assert main([*args, "--stage", str(s), "--measure-only"]) == 0
        assert main([*args, "--stage", str(s)]) == 0
    a, b = _tensors(whole / "checkpoints" / "step-12"), _tensors(split / "checkpoints" / "step-12")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((split / "stages.json").read_text())["stages"] == stages["stages"]

    # Each source is read on from stage to stage: no document is drawn twice while the source has unread ones.
    seen: dict[str, set] = {}
    sources = dict(duckdb.sql(f"SELECT id, source FROM '{cfg.run_dir}/corpus/part-*.parquet'").fetchall())
    per_source = {s: sum(1 for v in sources.values() if v == s) for s in set(sources.values())}
    for s in range(3):
        t = pq.read_table(sorted((whole / "stages" / f"stage-{s}" / "mixture").glob("part-*.parquet")))
        for doc, rep in zip(t.column("id").to_pylist(), t.column("repeat").to_pylist()):
            src = sources[doc]
            if rep == 0:
                assert doc not in seen.setdefault(src, set()), (s, doc)
            seen.setdefault(src, set()).add(doc)
            assert len(seen[src]) <= per_source[src]
    with duckdb.connect(str(whole / "tikmix.duckdb"), read_only=True) as con:
        versions = con.execute("SELECT stage, count(*), sum(weight) FROM tikmix_weights GROUP BY stage "
                               "ORDER BY stage").fetchall()
        gi = con.execute("SELECT DISTINCT checkpoint FROM group_influence ORDER BY 1").fetchall()
    assert [(s, n) for s, n, _ in versions] == [(0, 9), (1, 9), (2, 9)]
    assert all(abs(t - 1) < 1e-9 for _, _, t in versions)
    assert gi == [("target:step-4",), ("target:step-8",)]


def test_a_dynamic_run_solves_each_stage_once_and_refuses_a_changed_stage_it_trained_past(scoring_run, tmp_path,
                                                                                            monkeypatch):
    import automixer_ops.tikmix.method as method
    from automixer_ops.errors import AutomixerError
    from automixer_ops.tikmix.dynamic import train_dynamic

    cfg = cfg_of(scoring_run, "tikmix.stages=2")
    out, budget = tmp_path / "dyn", 256 * 8
    train_dynamic(cfg, "d", out, cfg.target, budget, 0, log=lambda _: None)
    first = json.loads((out / "stages.json").read_text())

    def no_solve(*a, **k):
        raise AssertionError("solved again")

    monkeypatch.setattr(method, "solve", no_solve)  # a rerun, and an earlier stage's task, reuse the recorded solve
    train_dynamic(cfg, "d", out, cfg.target, budget, 0, log=lambda _: None)
    train_dynamic(cfg, "d", out, cfg.target, budget, 0, log=lambda _: None, until_stage=1, measure_only=True)
    assert json.loads((out / "stages.json").read_text()) == first  # kept whole, still complete
    monkeypatch.undo()

    # Another validation set changes stage 1's Group Influence, hence its mixture: the target trained past it.
    valset = cfg.run_dir / "valsets" / "piqa.jsonl"
    saved = valset.read_text()
    try:
        valset.write_text(saved.splitlines()[0] + "\n")
        with pytest.raises(AutomixerError, match="stage 1's mixture would change"):
            train_dynamic(cfg, "d", out, cfg.target, budget, 0, log=lambda _: None)
    finally:
        valset.write_text(saved)


def test_the_tikmix_dag_parses_with_one_task_group_per_stage(monkeypatch):
    import importlib.util

    monkeypatch.setenv("AUTOMIXER_TIKMIX_STAGES", "3")
    spec = importlib.util.spec_from_file_location("automixer_tikmix_dag_under_test", ROOT / "dags" / "automixer_tikmix.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dag = mod.automixer_tikmix_dag
    assert sorted(g for g in dag.task_group.children) == ["stage_0", "stage_1", "stage_2"]
    order = ["stage_0.draw", "stage_0.train", "stage_1.measure", "stage_1.train", "stage_2.measure", "stage_2.train"]
    for up, down in zip(order, order[1:]):
        assert dag.get_task(down).upstream_task_ids == {up}
    assert dag.get_task("stage_1.measure").step_args == [
        "--set", "tikmix.stages=3", "--variant", "{{ params.variant }}", "--seed", "{{ params.seed }}",
        "--stage", "1", "--measure-only"]
    assert all(dag.get_task(t).pool == mod.GPU_POOL for t in order)


@pytest.mark.e2e
@pytest.mark.slow
def test_the_tikmix_dag_runs_end_to_end(scoring_run, tmp_path):
    import yaml

    raw = yaml.safe_load(Path(scoring_run).read_text())
    raw["run"]["root"] = str(load_config(scoring_run).run_dir.parent)  # the prepared run, from a config elsewhere
    raw.setdefault("tasks", {})["targets"] = ["arc_easy", "piqa"]
    raw["tikmix"] = {"per_group": 4}
    raw["target"] = {"seq_len": 64, "batch_size": 4, "warmup_fraction": 0.25}
    raw["mix"] = {"token_budget": 256 * 8}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "AUTOMIXER_TIKMIX_STAGES": "2", "AUTOMIXER_TASK_RETRIES": "0"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "dag_demo.py"), "--dag", "automixer_tikmix",
                        "--config", str(config), "--airflow-home", str(tmp_path / "airflow"),
                        "--conf", json.dumps({"seed": 3})], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    cfg = load_config(config)
    out = cfg.run_dir / "tikmix" / "dynamic-d" / "seed-3"
    stages = json.loads((out / "stages.json").read_text())
    assert stages["bounds"] == [0, 4, 8] and stages["complete"] and len(stages["stages"]) == 2
    assert (out / "checkpoints" / "step-8" / "config.json").is_file()


def test_the_report_reads_every_tikmix_weights_table_of_the_run(tmp_path):
    from automixer_ops.report_data import tikmix_stages
    from automixer_ops.rundir import RunDir
    from automixer_ops.tikmix.method import record_weights

    run = RunDir(tmp_path / "run")
    assert tikmix_stages(run) is None

    def rows(version, stage, w):
        return [{"version": version, "stage": stage, "checkpoint": "c", "variant": "d", "group_name": g, "weight": x,
                 "w_prev": 0.5, "cap": None, "gi_hat": None, "tokens_available": 10} for g, x in w.items()]

    record_weights(run.path / "tikmix" / "tikmix.duckdb", rows("static-d-step=30-seed=0", 0, {"a": 0.7, "b": 0.3}))
    dyn = run.path / "tikmix" / "dynamic-d" / "seed-0" / "tikmix.duckdb"
    for s, w in enumerate([{"a": 0.5, "b": 0.5}, {"a": 0.2, "b": 0.8}]):
        record_weights(dyn, rows(f"dynamic-d-seed-0-stage-{s}", s, w))
    assert tikmix_stages(run) == {"dynamic-d-seed-0 · stage 0": {"a": 0.5, "b": 0.5},
                                  "dynamic-d-seed-0 · stage 1": {"a": 0.2, "b": 0.8},
                                  "static-d-step=30-seed=0": {"a": 0.7, "b": 0.3}}
