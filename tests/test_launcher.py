"""The scoring launcher plugin: argv from params, backend settings, the local backend for
real (subprocesses), and what the Kubernetes backend sends (no cluster: the pod spec and
the deferral are checked without one). The Slurm backend is tested in test_slurm.py."""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Airflow reads AIRFLOW_HOME on import and creates it; keep tests out of ~/airflow.
os.environ.setdefault("AIRFLOW_HOME", str(Path(tempfile.gettempdir()) / "automixer-test-airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
sys.path.insert(0, str(ROOT / "plugins"))

from airflow.sdk.bases.operator import ExecutorSafeguard  # noqa: E402
from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred  # noqa: E402

from automixer_launcher import AutomixerStepOperator, cli_argv, config_overrides  # noqa: E402
from automixer_launcher.backend_local import LocalProcess  # noqa: E402
from automixer_launcher.backend_settings import load_settings  # noqa: E402

AUTOMIXER = str(Path(sys.executable).with_name("automixer"))
DEMO = str(ROOT / "configs" / "demo.yaml")


@pytest.fixture(autouse=True)
def _operators_outside_task_runner(monkeypatch):
    # Tests call execute() directly; Airflow's safeguard would only log a warning about it.
    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)


@pytest.fixture(autouse=True)
def _settings_files_in_tmp_path(monkeypatch, tmp_path):
    # The tests' backend settings files live in tmp_path: the directory the launcher accepts them from.
    monkeypatch.setenv("AUTOMIXER_BACKENDS_DIR", str(tmp_path))


def context(params: dict, map_index: int = -1) -> dict:
    ti = mock.MagicMock(map_index=map_index, dag_id="automixer", task_id="t", run_id="r", try_number=1)
    return {"params": params, "ti": ti, "run_id": "r", "dag": mock.MagicMock(parent_dag=None),
            "outlet_events": mock.MagicMock()}


# ---------------------------------------------------------------- argv and settings

def test_params_become_set_overrides_that_the_config_loader_reads():
    from automixer_ops.config import load_config

    params = {"config": DEMO, "tasks": ["arc_easy", "piqa"], "proxy_preset": "25m", "keep_fraction": 0.25,
              "token_budget": 123456, "overrides": ["tasks.docs.selection=[0, 7]"], "backend": "local"}
    argv = cli_argv("score", ["--step", 300, "--shards", "0:4"], params)
    assert argv[:4] == ["automixer", "score", "-c", DEMO]
    assert argv[-4:] == ["--step", "300", "--shards", "0:4"]
    assert argv.count("--set") == 5
    cfg = load_config(DEMO, config_overrides(params))
    assert cfg.tasks.targets == ["arc_easy", "piqa"]
    assert (cfg.proxy.preset, cfg.regroup.keep_fraction, cfg.mix.token_budget, cfg.tasks.docs.selection) == \
        ("25m", 0.25, 123456, [0, 7])


def test_null_params_keep_the_config_files_values():
    assert cli_argv("mix", [], {"config": DEMO, "tasks": None, "keep_fraction": None, "overrides": []}) == \
        ["automixer", "mix", "-c", DEMO]
    # a blank field of the trigger form may come as an empty list or string
    assert cli_argv("mix", [], {"config": DEMO, "tasks": [], "proxy_preset": "", "overrides": None}) == \
        ["automixer", "mix", "-c", DEMO]


def test_backend_settings_merge_over_defaults_and_reject_unknown_keys(tmp_path):
    user = tmp_path / "backends.yaml"
    user.write_text("kubernetes:\n  image: reg.example/automixer-gpu:1.2\n  gpu:\n    node_selector: {pool: h100}\n")
    s = load_settings(user)
    assert s["kubernetes"]["image"] == "reg.example/automixer-gpu:1.2"
    assert s["kubernetes"]["gpu"]["node_selector"] == {"pool": "h100"}  # replaced, not merged
    assert s["kubernetes"]["gpu"]["resources"]["limits"]["nvidia.com/gpu"] == "1"  # default kept
    user.write_text("slurm:\n  partiton: gpu\n")
    with pytest.raises(AirflowFailException, match="unknown backend setting 'slurm.partiton'"):
        load_settings(user)


# ---------------------------------------------------------------- local backend

def test_local_backend_streams_output_and_succeeds(tmp_path):
    lines: list[str] = []
    op = AutomixerStepOperator(task_id="config", step="config")
    op._log_line = lines.append
    op.execute(context({"config": DEMO, "backend": "local", "overrides": ["run.id=streamed"]}))
    assert lines[0].startswith("running: ") and "automixer config -c" in lines[0]
    assert "  id: streamed" in lines  # the command's own output, line by line


def test_local_backend_environment_defaults_and_overrides(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    seen: list[str] = []
    LocalProcess({"automixer": "sh"}).run(["automixer", "-c", "echo $OMP_WAIT_POLICY"], log=seen.append)
    assert seen[-1] == "PASSIVE"  # sleeping OpenMP waits for tasks that share the worker's cores
    seen.clear()
    LocalProcess({"automixer": "sh", "env": {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": 3}}).run(
        ["automixer", "-c", "echo $OMP_WAIT_POLICY $OMP_NUM_THREADS"], log=seen.append)
    assert seen[-1] == "ACTIVE 3"


def test_local_backend_bad_input_fails_without_retry_naming_command_and_status(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    op = AutomixerStepOperator(task_id="prepare", step="prepare")
    op._log_line = lambda line: None
    with pytest.raises(AirflowFailException) as e:
        op.execute(context({"config": missing, "backend": "local"}))
    assert f"automixer prepare -c {missing}` exited with status 2" in str(e.value)


def test_local_backend_only_the_transient_status_is_retried():
    with pytest.raises(AirflowException) as e:  # 75: another process holds what the step needs
        LocalProcess({"automixer": "sh"}).run(["automixer", "-c", "exit 75"], log=lambda line: None)
    assert not isinstance(e.value, AirflowFailException)
    assert "exited with status 75 (transient" in str(e.value)
    with pytest.raises(AirflowFailException) as e:  # a crash (a traceback) would crash again
        LocalProcess({"automixer": "false"}).run(["automixer", "score"], log=lambda line: None)
    assert "`false score` exited with status 1 (not retried" in str(e.value)


def test_local_backend_kill_stops_the_process_tree():
    proc = LocalProcess({"automixer": "sh"})
    errors: list[BaseException] = []

    def run():
        try:
            proc.run(["automixer", "-c", "sleep 60 & sleep 60"], log=lambda line: None)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while proc.proc is None and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    proc.kill(grace_seconds=5)
    t.join(10)
    assert not t.is_alive() and time.monotonic() - started < 6
    assert errors and "signal 15" in str(errors[0])


# ---------------------------------------------------------------- kubernetes backend

K8S_USER = """
kubernetes:
  namespace: mixers
  image: reg.example/automixer-gpu:0.1
  kubernetes_conn_id: null
  volumes: [{name: runs, persistentVolumeClaim: {claimName: automixer-runs}}]
  volume_mounts: [{name: runs, mountPath: /runs}]
  gpu:
    resources: {requests: {cpu: "8", memory: 64Gi}, limits: {nvidia.com/gpu: 2, memory: 64Gi}}
    node_selector: {nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}
    tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]
"""


def scoring_pod(tmp_path, gpu=True, step="score", step_args=("--step", "300", "--shards", "0:4")):
    settings = tmp_path / "backends.yaml"
    settings.write_text(K8S_USER)
    params = {"config": "/runs/configs/big.yaml", "backend": "kubernetes", "backend_settings": str(settings),
              "keep_fraction": 0.4}
    op = AutomixerStepOperator(task_id="score", step=step, step_args=list(step_args), gpu=gpu)
    return op, context(params, map_index=3)


def test_kubernetes_pod_spec_for_a_scoring_task(tmp_path):
    op, ctx = scoring_pod(tmp_path)
    pod = op.pod_operator(ctx).build_pod_request_obj(dry_run=True)
    (c,) = pod.spec.containers
    assert c.image == "reg.example/automixer-gpu:0.1"
    assert c.command == ["automixer"]
    assert c.args == ["score", "-c", "/runs/configs/big.yaml", "--set", "regroup.keep_fraction=0.4",
                      "--step", "300", "--shards", "0:4"]
    assert c.resources.limits == {"nvidia.com/gpu": "2", "memory": "64Gi"}
    assert c.resources.requests == {"cpu": "8", "memory": "64Gi"}
    assert pod.spec.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [(t.key, t.operator, t.effect) for t in pod.spec.tolerations] == [("nvidia.com/gpu", "Exists", "NoSchedule")]
    assert pod.spec.volumes[0].persistent_volume_claim.claim_name == "automixer-runs"
    assert [(m.name, m.mount_path) for m in c.volume_mounts] == [("runs", "/runs")]
    assert {e.name: e.value for e in c.env}["HF_HUB_OFFLINE"] == "1"
    assert pod.metadata.namespace == "mixers"
    assert pod.metadata.name.startswith("automixer-score-step-300")
    assert pod.metadata.labels["automixer-step"] == "score"
    assert pod.spec.restart_policy == "Never"


def test_kubernetes_cpu_step_asks_for_no_gpu(tmp_path):
    op, ctx = scoring_pod(tmp_path, gpu=False, step="regroup", step_args=())
    pod = op.pod_operator(ctx).build_pod_request_obj(dry_run=True)
    (c,) = pod.spec.containers
    assert c.args == ["regroup", "-c", "/runs/configs/big.yaml", "--set", "regroup.keep_fraction=0.4"]
    assert "nvidia.com/gpu" not in (c.resources.limits or {})
    assert not pod.spec.node_selector and not pod.spec.tolerations


def test_kubernetes_task_defers_to_the_triggerer_and_comes_back_through_this_operator(tmp_path):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    op, ctx = scoring_pod(tmp_path)
    real_build = KubernetesPodOperator.build_pod_request_obj
    created = []
    with mock.patch.object(KubernetesPodOperator, "build_pod_request_obj",
                           lambda self, context=None: real_build(self, context, dry_run=True)), \
         mock.patch.object(KubernetesPodOperator, "get_or_create_pod",
                           lambda self, pod_request_obj, context: created.append(pod_request_obj) or pod_request_obj):
        with pytest.raises(TaskDeferred) as e:
            op.execute(ctx)
    assert e.value.method_name == "trigger_reentry" and callable(op.trigger_reentry)
    assert type(e.value.trigger).__name__ == "KubernetesPodTrigger"
    assert e.value.trigger.pod_name == created[0].metadata.name
    assert e.value.trigger.pod_namespace == "mixers"
    # on_kill reaches the pod operator (which deletes the pod)
    with mock.patch.object(KubernetesPodOperator, "on_kill") as on_kill:
        op.on_kill()
    on_kill.assert_called_once()
