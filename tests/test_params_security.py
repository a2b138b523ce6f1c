"""What a DAG run's params can reach: no shell line, no file outside the run's configuration,
no worker secret. Each case is what a trigger-form (or REST API) user could send; each failed
before the launcher checked it (param_checks, backend_settings, step_env, backend_slurm)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
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
from airflow.sdk.exceptions import AirflowFailException, ParamValidationError  # noqa: E402

from conftest import execute_quietly  # noqa: E402
from automixer_launcher import AutomixerStepOperator, cli_argv, config_overrides  # noqa: E402
from automixer_launcher import backend_slurm  # noqa: E402
from automixer_launcher.backend_local import LocalProcess  # noqa: E402
from automixer_launcher.backend_settings import load_settings  # noqa: E402
from automixer_launcher.backend_slurm import batch_script  # noqa: E402

DEMO = str(ROOT / "configs" / "demo.yaml")
INJECTED_ROOT = 'run.root="/x\\ntouch PWNED #"'  # the probe's value: YAML decodes \n to a newline


@pytest.fixture(autouse=True)
def _operators_outside_task_runner(monkeypatch):
    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)


@pytest.fixture(scope="module")
def dag():
    spec = importlib.util.spec_from_file_location("automixer_dag_security", ROOT / "dags" / "automixer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.automixer_dag


def context(params: dict) -> dict:
    ti = mock.MagicMock(map_index=-1, dag_id="automixer", task_id="t", run_id="r", try_number=1)
    return {"params": params, "ti": ti, "run_id": "r", "outlet_events": mock.MagicMock()}


class FakeSlurm:
    """A submit host that records each batch script and reports every job COMPLETED."""

    def __init__(self):
        self.scripts: list[str] = []

    def run(self, command: str, stdin: str | None = None, timeout: float = 120):
        if "sbatch" in command:
            self.scripts.append(stdin)
            return 0, b"42", ""
        if command.startswith("scontrol"):
            return 0, b"JobId=42 JobState=COMPLETED ExitCode=0:0", ""
        return 1, b"", ""


def slurm_settings_file(directory: Path, **slurm) -> Path:
    import yaml

    path = directory / "backends.yaml"
    path.write_text(yaml.safe_dump({"slurm": {"automixer": "true", "poll_seconds": 0, **slurm}}))
    return path


# ---------------------------------------------------------------- a newline is never a shell line

def test_a_newline_in_an_override_never_runs_as_a_line_of_the_slurm_script(tmp_path, monkeypatch):
    """The probe's case: run.root = "/x\\ntouch PWNED #" ended the `#SBATCH --output=` line."""
    monkeypatch.setenv("AUTOMIXER_BACKENDS_DIR", str(tmp_path))
    shell = FakeSlurm()
    monkeypatch.setattr(backend_slurm, "make_shell", lambda settings: shell)
    params = {"config": DEMO, "backend": "slurm", "backend_settings": str(slurm_settings_file(tmp_path)),
              "overrides": [INJECTED_ROOT]}
    op = AutomixerStepOperator(task_id="config", step="config")
    error = execute_quietly(op, params)
    # Run whatever was submitted as the node would (bash; `#SBATCH` lines are comments to it).
    work = tmp_path / "node"
    work.mkdir()
    for script in shell.scripts:
        subprocess.run(["bash", "-c", script], cwd=work, capture_output=True, timeout=30, check=False)
    assert not (work / "PWNED").exists(), "a param ran as a shell line of the batch script"
    assert shell.scripts == [], "nothing should reach sbatch"
    assert error is not None and "'run.root'" in str(error) and "\n" not in str(error)


def test_a_control_character_in_an_sbatch_option_is_refused():
    with pytest.raises(AirflowFailException, match=r"U\+000A.*#SBATCH"):
        batch_script(["automixer", "config"], settings={"cpu": {}}, gpu=False, job_name="j",
                     output="/x\ntouch PWNED #/demo/slurm/j-%j.out")


@pytest.mark.parametrize("option", ["/logs/my run/j-%j.out", "/logs/#1/j.out", "/logs/it's/j.out",
                                    '/logs/"q"/j.out', "/logs/back\\slash/j.out"])
def test_sbatch_options_are_quoted_for_sbatchs_parser(option):
    # sbatch splits #SBATCH lines at blanks, ends them at '#' and reads quotes and backslashes:
    # this reads the line back the way sbatch's _get_argument does.
    script = batch_script(["automixer", "config"], settings={"cpu": {}}, gpu=False, job_name="j", output=option)
    (line,) = [x for x in script.splitlines() if x.startswith(("#SBATCH --output", '#SBATCH "'))]
    assert _sbatch_arguments(line[len("#SBATCH"):]) == [f"--output={option}"]


def _sbatch_arguments(line: str) -> list[str]:
    """Slurm's src/sbatch/opt.c _get_argument, applied until the line ends (a model of sbatch)."""
    args, i = [], 0
    while i < len(line):
        while i < len(line) and line[i].isspace():
            i += 1
        arg, quote, escaped = "", None, False
        while i < len(line) and (quote or not line[i].isspace()):
            c = line[i]
            if escaped:
                escaped = False
            elif c == "\\":
                escaped, i = True, i + 1
                continue
            elif quote:
                if c == quote:
                    quote, i = None, i + 1
                    continue
            elif c in "\"'":
                quote, i = c, i + 1
                continue
            elif c == "#":
                return args + ([arg] if arg else [])
            arg += c
            i += 1
        if arg:
            args.append(arg)
    return args


def test_slurm_env_names_must_be_variable_names():
    with pytest.raises(AirflowFailException, match="slurm.env: 'A;touch PWNED' is not"):
        batch_script(["automixer", "config"], settings={"cpu": {}, "env": {"A;touch PWNED": "1"}}, gpu=False,
                     job_name="j", output="/logs/j.out")


@pytest.mark.parametrize("name,value", [
    ("config", "/runs/a.yaml\ntouch PWNED"),
    ("config", "/runs/a.yaml\r"),
    ("backend_settings", "/etc/automixer/b.yaml\x1b[2J"),
    ("tasks", ["arc_easy\n"]),
    ("proxy_preset", "tiny\u2028"),               # a YAML line break
    ("overrides", ["tasks.docs.selection=[0, 5]\n"]),
    ("overrides", ['tasks.targets=["piqa\\ntouch PWNED"]']),  # decoded by YAML into a newline
    ("overrides", ["run.id=\"a\u202eb\""]),       # a bidi override: invisible in the UI
])
def test_control_characters_in_any_param_fail_every_task(name, value):
    params = {"config": DEMO, "backend": "local", name: value}
    with pytest.raises(AirflowFailException) as e:
        cli_argv("config", [], params)
    msg = str(e.value)
    assert f"Param '{name}'" in msg and "control character" in msg and "\n" not in msg


# ---------------------------------------------------------------- overrides: the method's knobs only

@pytest.mark.parametrize("item", [
    "run.root=/etc", INJECTED_ROOT, " run.root =/tmp/elsewhere", "run={root: /etc}",
    "corpus.paths=[/etc/passwd]", "corpus.text_field=x", "tokenizer.path=/home/someone/tok",
    "proxy.checkpoints=[{step: 1, path: /home/someone/ckpt}]", "tasks.data_dir=/data", "tasks.custom=[]",
    "regroup.memory_limit=1000GB", "nosuch.key=1",
])
def test_overrides_of_paths_and_the_corpus_are_refused_naming_the_key_and_the_allowed_ones(item):
    key = item.partition("=")[0].strip()
    with pytest.raises(AirflowFailException) as e:
        config_overrides({"config": DEMO, "overrides": [item]})
    msg = str(e.value)
    assert f"Param 'overrides': {key!r} cannot be set" in msg
    assert "allowed keys: run.id, run.seed, proxy.preset" in msg and "\n" not in msg


def test_overrides_must_be_a_list_of_strings():
    # The REST API may send a bare string: each of its characters would become an override.
    with pytest.raises(AirflowFailException, match="Param 'overrides': must be a list"):
        config_overrides({"config": DEMO, "overrides": "run.root=/etc"})


def test_allowed_overrides_pass_and_the_config_loader_reads_them():
    from automixer_ops.config import load_config

    items = ["run.id=exp2", "run.seed=7", "tasks.docs.selection=[0, 5]", "influence.fit_samples=null",
             "mix.caps=[{group: step-50, max_tokens: 10}]", "proxy.lr=0.001", "tasks.targets=[piqa]",
             "select.metric=gold_ll"]
    assert config_overrides({"config": DEMO, "overrides": items}) == items
    cfg = load_config(DEMO, items)
    assert (cfg.run.id, cfg.run.seed, cfg.tasks.docs.selection, cfg.mix.caps[0].max_tokens, cfg.select.metric) == \
        ("exp2", 7, [0, 5], 10, "gold_ll")


def test_every_overridable_key_is_a_config_key_and_none_is_a_path():
    import typing

    from automixer_launcher.cli_argv import OVERRIDE_PARAMS
    from automixer_launcher.param_checks import OVERRIDABLE
    from automixer_ops.config import Config

    for key in OVERRIDABLE:  # section.key, or section.subsection.key (tasks.docs.selection)
        hints = typing.get_type_hints(Config)
        *sections, name = key.split(".")
        for section in sections:
            hints = typing.get_type_hints(hints[section])
        assert name in hints, key
    assert set(OVERRIDE_PARAMS.values()) <= set(OVERRIDABLE)  # the named params are overrides too
    paths = {"run.root", "tokenizer.path", "proxy.checkpoints", "tasks.data_dir", "tasks.custom"}
    assert not paths & set(OVERRIDABLE) and not any(k.startswith(("corpus.", "tokenizer.")) for k in OVERRIDABLE)


def test_dag_tasks_that_read_the_config_refuse_path_overrides_too(tmp_path):
    spec = importlib.util.spec_from_file_location("automixer_dag_security_tasks", ROOT / "dags" / "automixer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    params = {"config": DEMO, "shards_per_task": None, "overrides": [f"run.root={tmp_path}"]}
    for task in (mod.check_run_params, mod.fit_args, mod.shard_ranges, mod.checkpoint_args):
        with pytest.raises(AirflowFailException, match="'run.root' cannot be set"):
            task.function(params=params)


# ---------------------------------------------------------------- the form's schema says the same

@pytest.mark.parametrize("name,value", [
    ("overrides", [INJECTED_ROOT]), ("overrides", ["run.root=/etc"]), ("overrides", ["corpus.paths=[/]"]),
    ("overrides", ["tokenizer.path=/x"]), ("overrides", ["tasks.docs.selection=[0, 5]\n"]),
    ("config", "/runs/a.yaml\n"), ("config", "/runs/a.yaml\ntouch PWNED"), ("backend_settings", "/etc/b.yaml\n"),
    ("tasks", ["arc_easy\n"]),  # Python's `$` matches before a final newline: the old pattern let it through
])
def test_params_schema_refuses_control_characters_and_path_overrides(dag, name, value):
    with pytest.raises(ParamValidationError):
        dag.params.get_param(name).resolve(value)


def test_a_conf_key_outside_the_schema_passes_airflow_but_not_the_tasks(dag):
    # What create_dagrun does with a trigger's conf (REST API, CLI) on the serialized DAG:
    # the declared params are validated, an undeclared key is not.
    from airflow.serialization.serialized_objects import DagSerialization

    served = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    with pytest.raises(ParamValidationError):
        served.params.deep_merge({"overrides": ["run.root=/etc"]}).validate()
    conf = {"notes": "ok\ntouch PWNED"}
    served.params.deep_merge(conf).validate()
    with pytest.raises(AirflowFailException, match="Param 'notes'.*control character U\\+000A"):
        cli_argv("prepare", [], {"config": DEMO, **conf})


def test_params_given_as_an_airflow_params_dict_are_checked_too():
    from airflow.sdk.definitions.param import ParamsDict

    params = ParamsDict({"config": DEMO, "overrides": ["run.root=/etc"]})
    with pytest.raises(AirflowFailException, match="'run.root' cannot be set"):
        cli_argv("prepare", [], params)
    with pytest.raises(AirflowFailException, match="Param 'config'"):
        cli_argv("prepare", [], ParamsDict({"config": DEMO + "\n"}))


def test_params_schema_accepts_allowed_overrides(dag):
    good = ["tasks.docs.selection=[0, 5]", "run.id=exp2", "mix.caps=[{group: step-50, max_tokens: 10}]",
            "influence.precision=bf16"]
    assert dag.params.get_param("overrides").resolve(good) == good


# ---------------------------------------------------------------- backend settings: a configured directory

SITECUSTOMIZE = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


def test_backend_settings_outside_the_directory_cannot_inject_code(tmp_path, monkeypatch):
    """A settings file anywhere on the worker set PYTHONPATH, and its sitecustomize.py ran in the step."""
    monkeypatch.delenv("AUTOMIXER_BACKENDS_DIR", raising=False)
    monkeypatch.delenv("AUTOMIXER_BACKENDS_FILE", raising=False)
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "PWNED"
    (evil / "sitecustomize.py").write_text(SITECUSTOMIZE.format(marker=str(marker)))
    settings = tmp_path / "backends.yaml"
    settings.write_text(json.dumps({"local": {"env": {"PYTHONPATH": str(evil)}}}))
    op = AutomixerStepOperator(task_id="config", step="config")
    op._log_line = lambda line: None
    error = None
    try:
        op.execute(context({"config": DEMO, "backend": "local", "backend_settings": str(settings)}))
    except AirflowFailException as e:
        error = e
    assert not marker.exists(), "code from a user-named settings file ran in the step"
    plugin_dir = str(ROOT / "plugins" / "automixer_launcher")
    assert str(error) == (f"Param 'backend_settings': {settings} is outside {plugin_dir}, the directory of "
                            "backend settings files (set AUTOMIXER_BACKENDS_DIR on the workers to allow another)")


def test_backend_settings_links_and_dotdot_out_of_the_directory_are_refused(tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    outside = tmp_path / "outside.yaml"
    outside.write_text("local: {automixer: /bin/sh}\n")
    (allowed / "link.yaml").symlink_to(outside)
    monkeypatch.setenv("AUTOMIXER_BACKENDS_DIR", str(allowed))
    monkeypatch.delenv("AUTOMIXER_BACKENDS_FILE", raising=False)
    for path in (allowed / "link.yaml", f"{allowed}/../outside.yaml"):
        with pytest.raises(AirflowFailException, match=f"outside {allowed}"):
            load_settings(path)


def test_backend_settings_inside_the_directory_or_the_admins_file_load(tmp_path, monkeypatch):
    allowed = tmp_path / "allowed"
    (allowed / "team").mkdir(parents=True)
    (allowed / "team" / "k8s.yaml").write_text("kubernetes: {image: reg.example/a:1}\n")
    monkeypatch.setenv("AUTOMIXER_BACKENDS_DIR", str(allowed))
    assert load_settings(allowed / "team" / "k8s.yaml")["kubernetes"]["image"] == "reg.example/a:1"
    # the file AUTOMIXER_BACKENDS_FILE names is the administrator's choice (the form's default)
    admin = tmp_path / "admin.yaml"
    admin.write_text("kubernetes: {image: reg.example/b:2}\n")
    monkeypatch.setenv("AUTOMIXER_BACKENDS_FILE", str(admin))
    assert load_settings(admin)["kubernetes"]["image"] == "reg.example/b:2"
    assert load_settings(None)["kubernetes"]["image"] == "reg.example/b:2"
    # by default: the plugin's own directory
    monkeypatch.delenv("AUTOMIXER_BACKENDS_DIR")
    monkeypatch.delenv("AUTOMIXER_BACKENDS_FILE")
    defaults = ROOT / "plugins" / "automixer_launcher" / "backends.yaml"
    assert load_settings(defaults)["local"]["automixer"] is None


# ---------------------------------------------------------------- the worker's secrets stay on the worker

WORKER_SECRETS = {
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg2://airflow:hunter2@postgres/airflow",
    "AIRFLOW__CORE__FERNET_KEY": "fernet-secret", "AIRFLOW__API_AUTH__JWT_SECRET": "jwt-secret",
    "AIRFLOW__API__SECRET_KEY": "api-secret", "HF_TOKEN": "hf_secret", "AUTOMIXER_API_KEY": "am-secret",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
}


def _env_lines(lines: list[str]) -> dict[str, str]:
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("running:"))


def test_local_steps_do_not_see_the_workers_secrets(monkeypatch):
    for k, v in {**WORKER_SECRETS, "HF_HOME": "/hf", "OMP_NUM_THREADS": "3", "LC_ALL": "C.UTF-8",
                 "CUDA_VISIBLE_DEVICES": "1", "AUTOMIXER_CONFIG": "/c.yaml", "NCCL_DEBUG": "INFO"}.items():
        monkeypatch.setenv(k, v)
    lines: list[str] = []
    LocalProcess({"automixer": "env", "env": {"EXTRA": "yes"}}).run(["automixer"], log=lines.append)
    env = _env_lines(lines)
    assert not set(WORKER_SECRETS) & set(env), sorted(set(WORKER_SECRETS) & set(env))
    assert not any(v in "\n".join(lines) for v in WORKER_SECRETS.values())
    for k in ("PATH", "HOME", "HF_HOME", "OMP_NUM_THREADS", "LC_ALL", "CUDA_VISIBLE_DEVICES", "AUTOMIXER_CONFIG"):
        assert k in env, k
    assert env["EXTRA"] == "yes" and "NCCL_DEBUG" not in env
    # the administrator may pass more of the worker's variables: by name or prefix
    lines.clear()
    LocalProcess({"automixer": "env", "inherit_env": ["NCCL_*", "HF_TOKEN"]}).run(["automixer"], log=lines.append)
    env = _env_lines(lines)
    assert env["NCCL_DEBUG"] == "INFO" and env["HF_TOKEN"] == "hf_secret"
    assert "AIRFLOW__CORE__FERNET_KEY" not in env


def test_sbatch_on_the_worker_and_so_the_job_do_not_see_its_secrets(monkeypatch):
    for k, v in {**WORKER_SECRETS, "SBATCH_ACCOUNT": "proj", "HF_HOME": "/hf"}.items():
        monkeypatch.setenv(k, v)
    env = backend_slurm.make_shell({"slurm_conf": "/etc/slurm/test.conf"}).env
    assert not set(WORKER_SECRETS) & set(env)
    assert env["SLURM_CONF"] == "/etc/slurm/test.conf" and env["SBATCH_ACCOUNT"] == "proj"
    assert env["HF_HOME"] == "/hf" and "PATH" in env


def test_kubernetes_pods_get_only_their_settings_env(tmp_path, monkeypatch):
    for k, v in WORKER_SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AUTOMIXER_BACKENDS_DIR", str(tmp_path))
    settings = tmp_path / "backends.yaml"
    settings.write_text("kubernetes: {kubernetes_conn_id: null, env: {HF_HUB_OFFLINE: '1'}}\n")
    op = AutomixerStepOperator(task_id="regroup", step="regroup")
    ctx = context({"config": "/runs/c.yaml", "backend": "kubernetes", "backend_settings": str(settings)})
    (c,) = op.pod_operator(ctx).build_pod_request_obj(dry_run=True).spec.containers
    assert {e.name for e in c.env} == {"HF_HUB_OFFLINE"}
