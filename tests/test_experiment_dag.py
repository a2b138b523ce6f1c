"""The experiment DAG (dags/automixer_experiment.py): it parses fast without heavy imports, has the shape
prepare -> units -> run (mapped, GPU pool) -> table, validates its Params, maps one `run` per (method, seed)
of an experiment file, and renders the `automixer experiment` command lines every backend runs. The
`experiment` subcommand itself is not run here: a stand-in executable records the argv it was given."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", str(Path(tempfile.gettempdir()) / "automixer-test-airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
sys.path.insert(0, str(ROOT / "plugins"))

from airflow.sdk.bases.operator import ExecutorSafeguard  # noqa: E402
from airflow.sdk.definitions.mappedoperator import MappedOperator  # noqa: E402
from airflow.sdk.exceptions import AirflowFailException, ParamValidationError  # noqa: E402

from automixer_launcher import cli_argv  # noqa: E402
from automixer_launcher.step_operator import AutomixerStepOperator, ExperimentStepOperator  # noqa: E402



@pytest.fixture(scope="module")
def dagmod():
    spec = importlib.util.spec_from_file_location("automixer_experiment_dag_under_test",
                                                  ROOT / "dags" / "automixer_experiment.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def dag(dagmod):
    return dagmod.automixer_experiment_dag


@pytest.fixture(autouse=True)
def _airflow_test_setup(monkeypatch, tmp_path):
    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)  # execute() called directly
    monkeypatch.setenv("AUTOMIXER_BACKENDS_DIR", str(tmp_path))  # settings files from tmp_path


def write_experiment(tmp_path: Path, **changes) -> Path:
    import yaml

    raw = {"name": "small", "base": str(ROOT / "configs" / "demo.yaml"), "root": str(tmp_path / "experiments"),
           "seeds": [0, 7], "token_budget": 100_000, "baseline": "uniform",
           "methods": [{"name": "uniform", "kind": "uniform"}, {"name": "am", "kind": "automixer"},
                       {"name": "ppl-mid", "kind": "ppl"}], **changes}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def context(params: dict, map_index: int = -1) -> dict:
    ti = mock.MagicMock(map_index=map_index, dag_id="automixer_experiment", task_id="t", run_id="r", try_number=1)
    return {"params": params, "ti": ti, "run_id": "r", "dag": mock.MagicMock(parent_dag=None),
            "outlet_events": mock.MagicMock()}


# ---------------------------------------------------------------- parsing and shape

# Parsing the dags folder (both DAGs) fast and without heavy imports: tests/test_dag.py.


def test_shape_prepare_units_mapped_run_table(dag, dagmod):
    assert set(dag.task_ids) == {"prepare", "units", "run", "table"}
    assert dag.get_task("units").upstream_task_ids == {"prepare"}
    run = dag.get_task("run")
    assert isinstance(run, MappedOperator) and run.operator_class is ExperimentStepOperator
    assert run.upstream_task_ids == {"units"}
    assert dag.get_task("table").upstream_task_ids == {"run"}
    assert run.pool == dag.get_task("prepare").pool == dagmod.GPU_POOL == "automixer_gpu"
    assert run.partial_kwargs["gpu"] and dag.get_task("prepare").gpu and not dag.get_task("table").gpu
    assert dag.get_task("table").pool != dagmod.GPU_POOL
    assert isinstance(dag.get_task("prepare"), ExperimentStepOperator)
    assert dag.get_task("prepare").step_args == ["--stage", "prepare"]
    assert dag.get_task("table").step_args == ["--stage", "table"]
    assert dag.max_active_runs == 1 and dag.get_task("prepare").retries >= 1
    assert dag.doc_md and "--stage run" in dag.doc_md
    assert all(dag.get_task(t).doc_md for t in ("prepare", "units", "table")) and run.partial_kwargs["doc_md"]
    assert set(dag.params) == {"experiment", "backend", "backend_settings"}


def test_dag_serializes_for_the_scheduler(dag):
    from airflow.serialization.serialized_objects import DagSerialization

    back = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    assert set(back.task_ids) == set(dag.task_ids)


@pytest.mark.parametrize("name,value", [
    ("experiment", "configs/experiment.yaml"),  # relative: a worker's working directory is not yours
    ("experiment", "/x/e.yaml\ntouch PWNED"),
    ("experiment", None),                       # required
    ("backend", "aws"),
    ("backend_settings", "backends.yaml"),
])
def test_params_schema_rejects_bad_values(dag, name, value):
    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value)


def test_params_schema_accepts_good_values(dag, dagmod):
    good = {"experiment": "/runs/experiments/e.yaml", "backend": "slurm", "backend_settings": "/etc/a/b.yaml"}
    for name, value in good.items():
        assert dag.params.get_param(name).resolve(value) == value
    assert dag.params.get_param("backend_settings").resolve(None) is None
    assert dagmod.DEFAULT_EXPERIMENT == os.environ.get("AUTOMIXER_EXPERIMENT",
                                                       str(ROOT / "configs" / "experiment_demo.yaml"))


# ---------------------------------------------------------------- units

def test_units_are_the_experiments_method_seed_pairs(dagmod, tmp_path, capsys):
    exp = write_experiment(tmp_path)
    units = dagmod.experiment_units.function(params={"experiment": str(exp), "backend": "local"})
    assert units == [["--stage", "run", "--method", m, "--seed", s]
                     for s in ("0", "7") for m in ("uniform", "am", "ppl-mid")]
    from automixer_ops.experiment_config import load_experiment

    assert units == dagmod.unit_args(load_experiment(exp).units())
    assert "3 methods x 2 seeds = 6 units" in capsys.readouterr().out


def test_a_bad_experiment_file_fails_the_units_task_naming_it(dagmod, tmp_path):
    fn = dagmod.experiment_units.function
    missing = tmp_path / "missing.yaml"
    with pytest.raises(AirflowFailException, match="experiment file: .*missing.yaml: experiment file not found"):
        fn(params={"experiment": str(missing)})
    bad = write_experiment(tmp_path, baseline="nope")
    with pytest.raises(AirflowFailException, match="baseline: 'nope' is not one of the methods"):
        fn(params={"experiment": str(bad)})
    with pytest.raises(AirflowFailException, match="Param 'experiment'.*control character"):
        fn(params={"experiment": str(bad) + "\n"})


def test_map_index_label_names_the_unit(dag, dagmod):
    from types import SimpleNamespace

    template = dag.get_task("run").map_index_template
    assert template == dagmod.UNIT_LABEL
    rendered = dag.get_template_env().from_string(template).render(
        task=SimpleNamespace(step_args=["--stage", "run", "--method", "am", "--seed", "7"]))
    assert rendered == "am seed 7"


# ---------------------------------------------------------------- command lines

def test_rendered_command_lines(dag, tmp_path):
    exp = str(write_experiment(tmp_path))
    params = {"experiment": exp, "backend": "local", "backend_settings": None}
    assert dag.get_task("prepare").argv(context(params)) == \
        ["automixer", "experiment", "-c", exp, "--stage", "prepare"]
    assert dag.get_task("table").argv(context(params)) == ["automixer", "experiment", "-c", exp, "--stage", "table"]
    unit = ["--stage", "run", "--method", "am", "--seed", "7"]
    op = dag.get_task("run").unmap({"step_args": unit})  # the operator a worker runs for this map index
    assert isinstance(op, ExperimentStepOperator) and op.gpu and op.pool == "automixer_gpu"
    assert op.argv(context(params, map_index=4)) == ["automixer", "experiment", "-c", exp, *unit]
    assert op._job_name(context(params, map_index=4)) == "automixer-run-4"


def test_no_set_overrides_and_params_still_checked(dag, tmp_path):
    exp = str(write_experiment(tmp_path))
    op = dag.get_task("table")
    # A conf key outside the schema is not validated by Airflow: it never reaches the command line...
    argv = op.argv(context({"experiment": exp, "token_budget": 5, "overrides": ["mix.token_budget=5"]}))
    assert "--set" not in argv
    # ...but every param is still checked, as in the automixer DAG
    with pytest.raises(AirflowFailException, match="Param 'overrides'.*cannot be set"):
        op.argv(context({"experiment": exp, "overrides": ["run.root=/etc"]}))
    with pytest.raises(AirflowFailException, match="Param 'backend_settings'.*control character"):
        op.argv(context({"experiment": exp, "backend_settings": "/a\x1b[2J"}))


def test_local_backend_runs_the_experiment_command(dag, tmp_path):
    """The whole execute() path of the local backend, with a stand-in `automixer` that records its argv."""
    exp = str(write_experiment(tmp_path))
    record = tmp_path / "argv.json"
    fake = tmp_path / "fake-automixer"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\n"
                    f"open({str(record)!r}, 'w').write(json.dumps(sys.argv[1:]))\nprint('unit done')\n")
    fake.chmod(0o755)
    settings = tmp_path / "backends.yaml"
    settings.write_text(f"local:\n  automixer: {fake}\n")
    unit = ["--stage", "run", "--method", "ppl-mid", "--seed", "0"]
    op = dag.get_task("run").unmap({"step_args": unit})
    lines: list[str] = []
    op._log_line = lines.append
    op.execute(context({"experiment": exp, "backend": "local", "backend_settings": str(settings)}, map_index=2))
    assert json.loads(record.read_text()) == ["experiment", "-c", exp, *unit]
    assert "unit done" in lines


def test_kubernetes_pod_runs_the_same_argv(dag, tmp_path):
    settings = tmp_path / "k8s.yaml"
    settings.write_text("kubernetes:\n  image: reg.example/automixer-gpu:0.1\n")
    params = {"experiment": "/runs/experiments/e.yaml", "backend": "kubernetes", "backend_settings": str(settings)}
    op = dag.get_task("run").unmap({"step_args": ["--stage", "run", "--method", "am", "--seed", "1"]})
    (c,) = op.pod_operator(context(params, map_index=1)).build_pod_request_obj(dry_run=True).spec.containers
    assert c.command == ["automixer"]
    assert c.args == ["experiment", "-c", "/runs/experiments/e.yaml", "--stage", "run", "--method", "am",
                      "--seed", "1"]
    assert c.resources.limits and "nvidia.com/gpu" in c.resources.limits


def test_slurm_logs_go_to_the_experiment_directory(dag, tmp_path):
    exp = write_experiment(tmp_path)
    op = dag.get_task("table")
    assert op.work_dir({"experiment": str(exp)}) == (tmp_path / "experiments" / "small").resolve()
    with pytest.raises(AirflowFailException, match="experiment file: .*not found"):
        op.work_dir({"experiment": str(tmp_path / "none.yaml")})


def test_the_launcher_generalisation_keeps_the_automixer_commands():
    demo = str(ROOT / "configs" / "demo.yaml")
    params = {"config": demo, "token_budget": 10, "experiment": "/x/e.yaml"}
    assert cli_argv("mix", [], params) == ["automixer", "mix", "-c", demo, "--set", "mix.token_budget=10"]
    assert cli_argv("experiment", ["--stage", "table"], params, config_param="experiment", overrides=False) == \
        ["automixer", "experiment", "-c", "/x/e.yaml", "--stage", "table"]
    op = AutomixerStepOperator(task_id="mix", step="mix")
    assert op.argv(context(params)) == ["automixer", "mix", "-c", demo, "--set", "mix.token_budget=10"]
