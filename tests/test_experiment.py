"""`automixer experiment`: methods x seeds end to end on a small run, and the experiment file's checks."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from automixer_ops.cli import main
from automixer_ops.errors import ConfigError
from automixer_ops.experiment_config import load_experiment
from conftest import DATA, PROXY

TASKS = ["arc_easy", "piqa"]


def base_config(tmp: Path, small_corpus: Path) -> Path:
    cfg = {"run": {"id": "base", "root": str(tmp / "runs")},
           "corpus": {"paths": [str(small_corpus / "*.jsonl")], "source_field": "domain", "docs_per_shard": 60},
           "tokenizer": {"vocab_size": 400, "model_max_length": 256},
           "proxy": {**PROXY, "max_steps": 20},
           "tasks": {"targets": TASKS, "data_dir": str(DATA / "benchmarks"),
                     "docs": {"selection": [0, 12], "validation": [12, 16], "test": [20, 44]}},
           "influence": {"max_seq_len": 64, "batch_tokens": 512, "fit_samples": None},
           "evaluate": {"batch_size": 16}}
    path = tmp / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def experiment_file(tmp: Path, base: Path, methods: list[dict], **extra) -> Path:
    exp = {"name": "smoke", "base": str(base), "root": str(tmp / "experiments"), "seeds": [0],
           "token_budget": 3000, "target": {"preset": "tiny", "seq_len": 32, "batch_size": 4, "checkpoints": 1},
           "methods": methods, **extra}
    path = tmp / "experiment.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


@pytest.fixture(scope="module")
def smoke(small_corpus, tmp_path_factory):
    """A 2-method x 1-seed experiment run from the command line, as `make test` runs it."""
    tmp = tmp_path_factory.mktemp("experiment")
    exp = experiment_file(tmp, base_config(tmp, small_corpus),
                          [{"name": "uniform", "kind": "uniform"}, {"name": "automixer", "kind": "automixer"}])
    assert main(["experiment", "-c", str(exp)]) == 0
    return exp, load_experiment(exp).directory


def test_smoke_experiment_writes_results_table_and_plot(smoke, capsys):
    exp, out = smoke
    results = pq.read_table(out / "results.parquet").to_pylist()
    assert {(r["method"], r["seed"]) for r in results} == {("uniform", 0), ("automixer", 0)}
    for method in ("uniform", "automixer"):
        got = {(r["task"], r["metric"]) for r in results if r["method"] == method}
        assert {(t, "gold_ll") for t in TASKS} | {(t, "acc") for t in TASKS} <= got
        assert all(r["n_docs"] == 24 for r in results if r["method"] == method)  # tasks.docs.test: [20, 44)
    table = (out / "table.md").read_text()
    assert "automixer" in table and "uniform" in table and "gold_ll" in table
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Every method trained the same number of steps on its own mixture, from the same seed.
    steps = {m: json.loads((out / "targets" / m / "seed-0" / "train_log.jsonl").read_text().splitlines()[-1])["step"]
             for m in ("uniform", "automixer")}
    assert steps["uniform"] == steps["automixer"] == -(-3000 // (32 * 4))
    weights = json.loads((out / "methods" / "automixer" / "seed-0" / "run" / "mixture" / "weights.json").read_text())
    assert weights["token_budget"] == 3000 and weights["seed"] == 0


def test_a_finished_experiment_resumes_without_work(smoke, capsys):
    exp, out = smoke
    before = (out / "targets" / "automixer" / "seed-0" / "eval.parquet").stat().st_mtime_ns
    assert main(["experiment", "-c", str(exp), "--stage", "run", "--method", "automixer", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "already trained to step" in err and "already evaluated" in err
    assert (out / "targets" / "automixer" / "seed-0" / "eval.parquet").stat().st_mtime_ns == before


def test_test_documents_are_disjoint_from_selection_and_validation(smoke):
    _, out = smoke
    base = load_experiment(smoke[0]).base_config()
    valset = [json.loads(line)["doc"] for line in
              (base.run_dir / "valsets" / "piqa.jsonl").read_text().splitlines()]
    assert valset == list(range(12, 16))
    assert base.tasks.docs.test == [20, 44]


def test_table_needs_every_unit(smoke, tmp_path, small_corpus, capsys):
    exp = experiment_file(tmp_path, base_config(tmp_path, small_corpus), [{"name": "uniform", "kind": "uniform"}],
                          seeds=[0, 1])
    assert main(["experiment", "-c", str(exp), "--stage", "table"]) == 2
    assert "2 unit(s) not evaluated yet (uniform seed 0, uniform seed 1)" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"baseline": "nope"}, "baseline: 'nope' is not one of the methods"),
    ({"methods": [{"name": "a", "kind": "uniform"}, {"name": "a", "kind": "ppl"}]}, "distinct names"),
    ({"methods": [{"name": "a", "kind": "magic"}]}, "methods[0].kind: str 'magic' is not allowed"),
    ({"methods": [{"name": "uniform", "kind": "uniform", "overrides": ["select.metric=gold_ll"]}]},
     "overrides: only automixer, last-ckpt, all-ckpt, scores, tikmix-d, tikmix-m, tikmix-d-dynamic read"),
    ({"seeds": []}, "seeds: give distinct seeds"),
    ({"token_budget": 0}, "token_budget: must be >= 1"),
    ({"target": {"checkpoints": 0}}, "target.checkpoints: must be >= 1"),
    ({"methods": [{"name": "s", "kind": "scores"}], "baseline": "s"}, "scores: a directory is required"),
])
def test_bad_experiment_files_are_named(tmp_path, change, message):
    raw = {"name": "x", "base": "base.yaml", "token_budget": 100, "methods": [{"name": "uniform", "kind": "uniform"}],
           **change}
    path = tmp_path / "e.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_last_and_all_checkpoint_samplers(smoke):
    """The paper's Table 3 ablation: the last checkpoint alone (alpha 1), or every checkpoint with alpha by step."""
    from automixer_ops.experiment import Experiment
    from automixer_ops.experiment_config import MethodSpec
    from automixer_ops.rundir import RunDir
    from automixer_ops.samplers import read_selection

    exp = load_experiment(smoke[0])
    runner = Experiment(exp, log=lambda _: None)
    base = exp.base_config()
    for kind in ("last-ckpt", "all-ckpt"):
        m = MethodSpec(name=kind, kind=kind)
        exp.methods.append(m)
        cfg = runner.method_config(m)
        from automixer_ops.experiment import link_base_run

        link_base_run(RunDir(base.run_dir), RunDir(cfg.run_dir))
        runner.write_selection(m, cfg, RunDir(cfg.run_dir))
    last = read_selection(RunDir(runner.method_run("last-ckpt"))).samplers
    assert [(s.step, s.alpha, s.tasks) for s in last] == [(20, 1.0, TASKS)]
    every = read_selection(RunDir(runner.method_run("all-ckpt"))).samplers
    assert [s.step for s in every] == [10, 20] and [s.alpha for s in every] == pytest.approx([1 / 3, 2 / 3])


def test_a_users_own_scores_plug_in(smoke, tmp_path):
    """kind 'scores': your scorer's selection.json and scores/ (DESIGN §3) are regrouped like automixer's; given
    automixer's own scores, the weights are automixer's, and nothing is written into your directory."""
    import shutil

    import duckdb

    from automixer_ops.experiment import Experiment
    from automixer_ops.experiment_config import MethodSpec
    from automixer_ops.rundir import RunDir

    exp = load_experiment(smoke[0])
    runner = Experiment(exp, log=lambda _: None)
    theirs = tmp_path / "my_scorer"
    source = RunDir(runner.method_run("automixer"))
    shutil.copyfile(source.selection, theirs.mkdir() or theirs / "selection.json")
    for step_dir in source.scores.iterdir():
        (theirs / "scores" / step_dir.name).mkdir(parents=True)
        for part in step_dir.glob("part-*.parquet"):
            shutil.copyfile(part, theirs / "scores" / step_dir.name / part.name)
    before = sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*"))
    m = MethodSpec(name="mine", kind="scores", scores=str(theirs))
    exp.methods.append(m)
    runner.prepare_pipeline_method(m, exp.base_config())

    def weights(db):
        with duckdb.connect(str(db), read_only=True) as con:
            return con.execute("SELECT group_name, n_docs, weight FROM weights ORDER BY step").fetchall()

    assert weights(RunDir(runner.method_run("mine")).db) == weights(source.db)
    assert sorted(str(p.relative_to(theirs)) for p in theirs.rglob("*")) == before


def test_units_that_no_longer_match_the_file_are_refused(smoke, tmp_path, capsys):
    """Edit the experiment after its units ran: the table refuses their stale results, and a pipeline method
    whose entry changed must be prepared again before a unit draws from it."""
    exp_path, _ = smoke
    raw = yaml.safe_load(exp_path.read_text())
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**raw, "target": {**raw["target"], "lr": 0.001}}))
    assert main(["experiment", "-c", str(changed), "--stage", "table"]) == 2
    assert "2 unit(s) do not match the experiment file now: uniform seed 0 (its target was trained with other " \
           "settings)" in capsys.readouterr().err
    methods = [raw["methods"][0], {**raw["methods"][1], "overrides": ["regroup.keep_fraction=0.3"]}]
    changed.write_text(yaml.safe_dump({**raw, "methods": methods}))
    assert main(["experiment", "-c", str(changed), "--stage", "run", "--method", "automixer", "--seed", "0"]) == 2
    assert "prepared for another version of method 'automixer'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--seed", "0"], "--method and --seed pick one unit of --stage run"),
    (["--stage", "run", "--method", "uniform"], "give both --method and --seed"),
    (["--stage", "run", "--method", "nope", "--seed", "0"], "--method nope: not a method of this experiment"),
    (["--stage", "run", "--method", "uniform", "--seed", "9"], "--seed 9: not a seed of this experiment"),
])
def test_unit_flags_are_checked_before_any_work(smoke, argv, message, capsys):
    assert main(["experiment", "-c", str(smoke[0]), *argv]) == 2
    assert message in capsys.readouterr().err
