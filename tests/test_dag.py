"""The Airflow DAG: it parses fast and cleanly, has the shape DESIGN §4 describes, validates
its Params, sizes the samplers' fit and scoring to the run, and (marked e2e) runs end to
end on a small run with outputs that hold the invariants of DESIGN §3."""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", str(Path(tempfile.gettempdir()) / "automixer-test-airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

from airflow.sdk import TriggerRule  # noqa: E402
from airflow.sdk.definitions.mappedoperator import MappedOperator  # noqa: E402
from airflow.sdk.exceptions import ParamValidationError  # noqa: E402

HEAVY = ("torch", "transformers", "pandas", "duckdb", "pyarrow", "automixer_ops", "kubernetes", "paramiko")


@pytest.fixture(scope="module")
def dagmod():
    spec = importlib.util.spec_from_file_location("automixer_dag_under_test", ROOT / "dags" / "automixer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dag(dagmod):
    return dagmod.automixer_dag


def test_dag_file_parses_in_under_two_seconds_without_heavy_imports():
    """Every DAG file of dags/, as the DAG processor parses the folder."""
    # A fresh interpreter, as the DAG processor has: Airflow itself already imported, then the file
    # parsed by a DagBag (what `airflow dags list-import-errors` and the processor do).
    code = textwrap.dedent(f"""
        import json, sys, time
        from airflow.dag_processing.dagbag import DagBag
        t = time.perf_counter()
        bag = DagBag(dag_folder={str(ROOT / 'dags')!r})
        took = time.perf_counter() - t
        errors = {{k: str(v) for k, v in bag.import_errors.items()}}
        print(json.dumps({{"seconds": took, "dags": sorted(bag.dag_ids), "errors": errors,
                          "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["errors"] == {}
    assert out["dags"] == ["automixer", "automixer_experiment", "automixer_tikmix", "automixer_tikmix_online"]
    assert out["heavy"] == [], f"imported at parse time: {out['heavy']}"
    assert out["seconds"] < 2.0, f"DAG file took {out['seconds']:.2f} s to parse"


def test_samplers_are_sized_to_the_run_with_one_fit_per_sampler_and_flat_mapped_scoring(dag, dagmod):
    groups = dag.task_group.children
    assert not [g for g in groups if g.startswith("sampler_")]  # no fixed slots left to skip
    assert sorted(groups["samplers"].children) == [f"samplers.{t}" for t in ("fit", "list", "score", "shards")]
    fit, score = dag.get_task("samplers.fit"), dag.get_task("samplers.score")
    for mapped in (fit, score, dag.get_task("evaluate.checkpoint")):
        assert isinstance(mapped, MappedOperator) and mapped.pool == dagmod.GPU_POOL
        assert mapped.partial_kwargs["map_index_template"] == dagmod.ARGS_LABEL
    assert fit.partial_kwargs["step"] == score.partial_kwargs["step"] == "score"
    assert fit.upstream_task_ids == {"samplers.list"}
    assert score.upstream_task_ids == {"samplers.fit", "samplers.shards"}  # every fit before any score
    assert score.downstream_task_ids == {"regroup"}


def test_wiring_pools_retries_and_assets(dag, dagmod):
    order = ["check_params", "prepare", "train_proxy", "evaluate.find_checkpoints", "evaluate.checkpoint",
             "evaluate.combine", "select", "samplers.list", "samplers.fit", "samplers.score", "regroup"]
    for up, down in zip(order, order[1:], strict=False):
        assert up in dag.get_task(down).upstream_task_ids
    assert dag.get_task("check_params").upstream_task_ids == set()
    assert dag.get_task("mix").upstream_task_ids == {"regroup"}
    assert dag.get_task("report").upstream_task_ids == {"mix"}
    regroup = dag.get_task("regroup")
    assert regroup.trigger_rule == TriggerRule.ALL_SUCCESS
    assert regroup.pool == dag.get_task("mix").pool == dagmod.DUCKDB_POOL
    assert dag.get_task("train_proxy").pool == dagmod.GPU_POOL
    assert [a.name for a in regroup.outlets] == ["automixer_weights"]
    assert [a.name for a in dag.get_task("mix").outlets] == ["automixer_mixture"]
    assert dag.get_task("prepare").retries >= 1 and dag.get_task("prepare").retry_exponential_backoff
    assert dag.doc_md and "sampler" in dag.doc_md and all(
        dag.get_task(t).doc_md for t in ("prepare", "regroup", "samplers.fit", "samplers.list", "check_params"))
    assert dag.max_active_runs == 1  # runs share a run directory


def test_map_index_labels_say_which_step_and_shards(dagmod):
    from jinja2 import Environment

    label = Environment().from_string(dagmod.ARGS_LABEL)
    task = type("T", (), {})
    for args, want in [(["--step", "100", "--shards", "0:4"], "step 100 shards 0:4"),
                       (["--step", "50", "--fit-only"], "step 50 fit"), (["--step", "300"], "step 300")]:
        task.step_args = args
        assert label.render(task=task) == want


def test_dag_serializes_for_the_scheduler(dag):
    from airflow.serialization.serialized_objects import DagSerialization

    data = DagSerialization.to_dict(dag)
    back = DagSerialization.from_dict(data)
    assert set(back.task_ids) == set(dag.task_ids)


@pytest.mark.parametrize("name,value", [
    ("keep_fraction", 0), ("keep_fraction", -0.5), ("keep_fraction", "half"),
    ("token_budget", 0), ("token_budget", -3), ("token_budget", 2.5),
    ("backend", "aws"), ("proxy_preset", "huge"),
    ("tasks", ["arc_easy", "arc_easy"]), ("tasks", ["bad name"]),
    ("config", "configs/demo.yaml"),  # relative: a worker's working directory is not yours
    ("overrides", ["not an override"]),
    ("shards_per_task", 0),
])
def test_params_schema_rejects_bad_values(dag, name, value):
    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value)


def test_params_schema_accepts_good_values(dag):
    good = {"keep_fraction": 1, "token_budget": 10**9, "backend": "slurm", "proxy_preset": "350m",
            "tasks": ["arc_easy", "my_task-2"], "config": "/data/run.yaml", "overrides": ["tasks.docs.selection=[0, 5]"],
            "shards_per_task": 4, "backend_settings": "/etc/automixer/backends.yaml"}
    for name, value in good.items():
        assert dag.params.get_param(name).resolve(value) == value
    for name in ("keep_fraction", "token_budget", "proxy_preset", "tasks", "shards_per_task"):
        assert dag.params.get_param(name).resolve(None) is None  # empty: the config's value


def _fake_run(tmp_path: Path, n_shards: int, sampler_steps: list[int]) -> dict:
    """A run dir with corpus shard files and a selection.json; returns DAG params for it."""
    import yaml

    run = tmp_path / "runs" / "r"
    (run / "corpus").mkdir(parents=True)
    for i in range(n_shards):
        (run / "corpus" / f"part-{i:05d}.parquet").write_bytes(b"")
    samplers = [{"step": s, "tasks": [f"t{s}"], "alpha": 1 / len(sampler_steps), "checkpoint": ""}
                for s in sampler_steps]
    (run / "selection.json").write_text(json.dumps({"tasks": {}, "samplers": samplers}))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"run": {"id": "r", "root": str(tmp_path / "runs")}, "corpus": {"paths": ["x"]}}))
    return {"config": str(cfg), "shards_per_task": None, "overrides": []}


def test_numbers_carry_no_bound_the_trigger_form_would_clamp_to(dag):
    # Airflow's form clamps a number field to `minimum`/`maximum` without a word (keep_fraction 2 became 1);
    # exclusiveMinimum it does not read, and the upper bound is check_params' (and every step's) to refuse.
    for name in ("keep_fraction", "token_budget", "shards_per_task"):
        schema = dag.params.get_param(name).schema
        assert "minimum" not in schema and "maximum" not in schema, name


@pytest.mark.parametrize("conf,named", [
    ({"keep_fraction": 2}, "Param 'keep_fraction': "), ({"keep_fraction": 1.5}, "Param 'keep_fraction': "),
    ({"token_budget": 10**30}, "Param 'token_budget': "),
    ({"token_budget": 0}, "Param 'token_budget': "),  # the form no longer clamps it to 1
    ({"overrides": ["mix.max_repeats=-1"]}, "run config: "),
])
def test_check_params_fails_in_one_line_naming_the_param(dagmod, tmp_path, conf, named):
    from airflow.sdk.exceptions import AirflowFailException

    params = {**_fake_run(tmp_path, n_shards=1, sampler_steps=[50]), **conf}
    with pytest.raises(AirflowFailException) as e:
        dagmod.check_run_params.function(params=params)
    assert str(e.value).startswith(named) and "\n" not in str(e.value)


def test_check_params_passes_a_good_run_and_says_where_it_writes(dagmod, tmp_path, capsys):
    params = {**_fake_run(tmp_path, n_shards=1, sampler_steps=[50]), "keep_fraction": 1, "token_budget": 5}
    assert dagmod.check_run_params.function(params=params) == str(tmp_path / "runs" / "r")


def test_fit_and_score_map_over_every_sampler_of_the_selection(dagmod, tmp_path):
    params = _fake_run(tmp_path, n_shards=2, sampler_steps=[50, 300])
    assert dagmod.fit_args.function(params=params) == [["--step", "50", "--fit-only"], ["--step", "300", "--fit-only"]]
    assert dagmod.shard_ranges.function(params={**params, "shards_per_task": 1}) == [
        ["--step", s, "--shards", r] for s in ("50", "300") for r in ("0:1", "1:2")]


def test_shard_ranges_batch_shards_so_the_map_stays_in_the_hundreds(dagmod, tmp_path):
    params = _fake_run(tmp_path, n_shards=7, sampler_steps=[50])
    fn = dagmod.shard_ranges.function
    assert fn(params={**params, "shards_per_task": 3}) == [
        ["--step", "50", "--shards", "0:3"], ["--step", "50", "--shards", "3:6"], ["--step", "50", "--shards", "6:7"]]
    assert len(fn(params=params)) == 7  # auto: one shard per task while under the cap
    many = _fake_run(tmp_path / "many", n_shards=1001, sampler_steps=[50])
    ranges = fn(params=many)
    assert len(ranges) <= dagmod.MAX_SCORE_TASKS
    covered = [i for r in ranges for i in range(*map(int, r[3].split(":")))]
    assert covered == list(range(1001))  # every shard exactly once


@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # inside Airflow
def test_airflow_plugin_loader_leaves_the_launcher_package_alone():
    # The loader imports each plugins/*.py by its bare name (sys.modules["__init__"], ...).
    from airflow._shared.module_loading import find_path_from_directory

    found = find_path_from_directory(str(ROOT / "plugins"), ".airflowignore", "glob")
    # Only the UI plugin's one module (plugins/automixer_ui_plugin.py); its package and the launcher are ignored.
    assert [f for f in found if f.endswith(".py")] == [str(ROOT / "plugins" / "automixer_ui_plugin.py")]


def test_proxy_presets_match_the_config(dagmod):
    import typing

    from automixer_ops.config import ProxySection

    assert dagmod.PROXY_PRESETS == list(typing.get_args(typing.get_type_hints(ProxySection)["preset"]))


# ---------------------------------------------------------------- end to end

@pytest.mark.e2e
@pytest.mark.slow
def test_dag_runs_end_to_end_on_a_small_run(tmp_path, small_corpus):
    """scripts/dag_demo.py (fresh SQLite Airflow home, dag.test()) on a tiny run, then DESIGN §3."""
    import duckdb
    import pyarrow.parquet as pq
    import yaml

    from conftest import DATA, proxy_config

    config = proxy_config(tmp_path, small_corpus, "dag", max_steps=20, save_every=10)
    cfg = yaml.safe_load(config.read_text())
    cfg["run"]["root"] = str(tmp_path / "runs")
    cfg["corpus"]["docs_per_shard"] = 20  # 108 documents -> 6 shards
    cfg["tasks"] = {"targets": ["arc_easy", "piqa"], "data_dir": str(DATA / "benchmarks"),
                    "docs": {"selection": [0, 8], "validation": [8, 12], "test": [12, 20]}}
    cfg["influence"] = {"max_seq_len": 64}
    config.write_text(yaml.safe_dump(cfg))
    budget = 30_000
    conf = {"shards_per_task": 4, "token_budget": budget}  # 2 scoring tasks per sampler; a param override

    home = tmp_path / "airflow"
    env = {**os.environ, "AUTOMIXER_TASK_RETRIES": "0"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "dag_demo.py"), "--config", str(config),
                        "--airflow-home", str(home), "--conf", json.dumps(conf)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
    run_dir = tmp_path / "runs" / "dag"
    assert f"run directory: {run_dir}" in p.stdout

    # Airflow's view: every task succeeded (none skipped: the graph is sized to the run), the mapped
    # tasks are labelled, assets carry metadata.
    with sqlite3.connect(home / "airflow.db") as db:
        states = db.execute("SELECT task_id, map_index, state, rendered_map_index FROM task_instance").fetchall()
        events = dict(db.execute("SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"))
    samplers = json.loads((run_dir / "selection.json").read_text())["samplers"]
    k = len(samplers)
    assert all(state == "success" for _, _, state, _ in states), states
    labels = {t: sorted(label for task, _, _, label in states if task == t) for t in ("samplers.fit", "samplers.score")}
    assert labels["samplers.fit"] == sorted(f"step {s['step']} fit" for s in samplers)
    assert labels["samplers.score"] == sorted(f"step {s['step']} shards {r}" for s in samplers for r in ("0:4", "4:6"))
    weights_event, mixture_event = json.loads(events["automixer_weights"]), json.loads(events["automixer_mixture"])
    assert abs(sum(weights_event["weights"].values()) - 1) < 1e-6 and weights_event["rows"] == k
    assert mixture_event["token_budget"] == budget

    # DESIGN §3: every corpus id has exactly one score per sampler.
    con = duckdb.connect()
    corpus = f"{run_dir}/corpus/part-*.parquet"
    n_docs = con.execute(f"SELECT count(*) FROM '{corpus}'").fetchall()[0][0]
    assert n_docs == 108
    for s in samplers:
        scores = f"{run_dir}/scores/step={s['step']}/part-*.parquet"
        bad = con.execute(f"""SELECT count(*) FROM (SELECT id FROM '{corpus}') c
                              FULL JOIN (SELECT id, count(*) AS n FROM '{scores}' GROUP BY id) s USING (id)
                              WHERE s.n IS DISTINCT FROM 1""").fetchall()[0][0]
        assert bad == 0, f"step {s['step']}: {bad} ids without exactly one score"

    # weights sum to 1 (DuckDB table and mixture/weights.json)
    w = duckdb.connect(str(run_dir / "automixer.duckdb"), read_only=True)
    assert abs(w.execute("SELECT sum(weight) FROM weights").fetchall()[0][0] - 1) < 1e-9
    w.close()
    summary = json.loads((run_dir / "mixture" / "weights.json").read_text())
    assert abs(sum(g["weight"] for g in summary["groups"].values()) - 1) < 1e-9

    # the mixture's token count is within one document of the budget
    drawn = pq.read_table(list((run_dir / "mixture").glob("part-*.parquet")), columns=["id"]).column("id").to_pylist()
    n_tokens = dict(con.execute(f"SELECT id, n_tokens FROM '{corpus}'").fetchall())
    total = sum(n_tokens[i] for i in drawn)
    assert total == summary["tokens"]
    assert abs(total - budget) <= max(n_tokens[i] for i in drawn)
    assert (run_dir / "report" / "summary.md").is_file()
