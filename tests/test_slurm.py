"""The Slurm backend against a real single-node Slurm that this module starts.

munged, slurmctld and slurmd (Debian's slurm-wlm, 22.05 on bookworm) run as root on the
loopback with a generated slurm.conf in a temp dir: their own ports, state, spool, logs
and munge socket, so nothing of a system Slurm is used or touched. The tests submit real
`automixer` commands with sbatch through the launcher and check what a task would see:
success, the job's output copied into the log, a failing job's exit status, and scancel
when the task is killed; then the same through SSH, with an sshd on loopback standing in
for a login node. `.ci/run` installs slurm-wlm, munge and openssh-server when it runs as root.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", str(Path(tempfile.gettempdir()) / "automixer-test-airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
sys.path.insert(0, str(ROOT / "plugins"))

from airflow.sdk.bases.operator import ExecutorSafeguard  # noqa: E402
from airflow.sdk.exceptions import AirflowException, AirflowFailException  # noqa: E402

from conftest import execute_quietly  # noqa: E402
from automixer_launcher import AutomixerStepOperator  # noqa: E402
from automixer_launcher.backend_slurm import SlurmJob, batch_script  # noqa: E402

AUTOMIXER = str(Path(sys.executable).with_name("automixer"))
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "scontrol", "scancel", "sinfo")


def _slurm_missing() -> str | None:
    missing = [d for d, p in DAEMONS.items() if not (shutil.which(d) or os.path.exists(p))]
    missing += [c for c in CLIENTS if not shutil.which(c)]
    if missing:
        return (f"Slurm is not installed (missing {', '.join(missing)}); "
                "install it with `apt-get install -y slurm-wlm munge` (.ci/run does when root)")
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs; run the Slurm tests as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _daemon(name: str) -> str:
    return shutil.which(name) or DAEMONS[name]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster: {'conf': slurm.conf path, 'dir': its directory}."""
    if reason := _slurm_missing():
        pytest.skip(reason)
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log", "munge"):
        (d / sub).mkdir()
    (d / "munge").chmod(0o755)  # munged wants a socket directory others can traverse
    key = d / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    sock = d / "munge" / "munge.sock"
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(f"""\
ClusterName=automixer-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'log' / 'slurmctld.log'}
SlurmdLogFile={d / 'log' / 'slurmd.log'}
# No cgroups in a container: track processes by parent, no task affinity, no accounting.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
SwitchType=switch/none
MinJobAge=600
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    started: list[Path] = []  # pid files of what this fixture started, stopped in reverse
    try:
        subprocess.run([_daemon("munged"), "-f", f"--socket={sock}", f"--key-file={key}",
                        f"--log-file={d / 'log' / 'munged.log'}", f"--pid-file={d / 'munge' / 'munged.pid'}",
                        f"--seed-file={d / 'munge' / 'seed'}"], check=True, env=env, timeout=30)
        started.append(d / "munge" / "munged.pid")
        subprocess.run([_daemon("slurmctld"), "-i"], check=True, env=env, timeout=30)
        started.append(d / "slurmctld.pid")
        subprocess.run([_daemon("slurmd")], check=True, env=env, timeout=30)
        started.append(d / "slurmd.pid")
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env)
            state = p.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        else:
            logs = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in (d / "log").glob("*.log"))
            pytest.fail(f"the test Slurm node did not become idle (sinfo: {state!r})\n{logs}")
        yield {"conf": str(conf), "dir": d}
    finally:
        for pid_file in reversed(started):
            _stop(pid_file)


def _stop(pid_file: Path) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


def settings(slurm, **extra) -> dict:
    # What a user's backends.yaml says, for this cluster: the venv's automixer, no GPUs, no --mem
    # (the test node declares no memory).
    kind = {"partition": "debug", "gpus": 0, "cpus_per_task": 1, "mem": None, "time": "00:10:00", "sbatch_args": []}
    return {"ssh_conn_id": None, "slurm_conf": slurm["conf"], "log_dir": None, "automixer": AUTOMIXER,
            "setup": [], "env": {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}, "poll_seconds": 0.5,
            "gpu": dict(kind), "cpu": dict(kind), **extra}


def write_backends(tmp_path: Path, slurm) -> Path:
    import yaml

    path = tmp_path / "backends.yaml"
    path.write_text(yaml.safe_dump({"slurm": settings(slurm)}))
    return path


@pytest.fixture(autouse=True)
def _operators_outside_task_runner(monkeypatch):
    monkeypatch.setattr(ExecutorSafeguard, "test_mode", True)


@pytest.fixture(autouse=True)
def _settings_files_in_tmp_path(monkeypatch, tmp_path):
    # The tests' backend settings files live in tmp_path: the directory the launcher accepts them from.
    monkeypatch.setenv("AUTOMIXER_BACKENDS_DIR", str(tmp_path))


def context(params: dict) -> dict:
    return {"params": params, "ti": mock.MagicMock(map_index=2), "outlet_events": mock.MagicMock()}


def test_batch_script_runs_the_cli_argv_with_the_kind_of_steps_options():
    s = {"automixer": "/opt/venv/bin/automixer", "setup": ["module load cuda"], "env": {"A": "b c"},
         "gpu": {"partition": "gpu", "gpus": 2, "cpus_per_task": 8, "mem": "64G", "time": "12:00:00",
                 "sbatch_args": ["--account=proj"]}}
    script = batch_script(["automixer", "score", "-c", "/runs/my run.yaml", "--step", "300"], settings=s, gpu=True,
                          job_name="automixer-score", output="/logs/automixer-score-%j.out")
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    for opt in ("--job-name=automixer-score", "--output=/logs/automixer-score-%j.out", "--partition=gpu",
                "--gres=gpu:2", "--cpus-per-task=8", "--mem=64G", "--time=12:00:00", "--account=proj"):
        assert f"#SBATCH {opt}" in lines
    assert "module load cuda" in lines and "export A='b c'" in lines
    assert lines[-1] == "exec /opt/venv/bin/automixer score -c '/runs/my run.yaml' --step 300"


def test_a_newline_in_a_param_never_runs_on_the_node(slurm, tmp_path):
    """The probe's injection through a real sbatch: run.root "…\\ntouch …/PWNED #" ended the
    `#SBATCH --output=` line, and the node ran the rest as a shell line."""
    pwned = tmp_path / "PWNED"
    params = {"config": str(ROOT / "configs" / "demo.yaml"), "backend": "slurm",
              "backend_settings": str(write_backends(tmp_path, slurm)),
              "overrides": [f'run.root="{tmp_path}/r\\ntouch {pwned} #"']}
    op = AutomixerStepOperator(task_id="config", step="config")
    error = execute_quietly(op, params)
    assert not pwned.exists(), "a param ran as a shell line on the Slurm node"
    assert error is not None and "'run.root' cannot be set" in str(error)
    assert op._running is None  # refused before anything was submitted


def test_odd_characters_in_the_output_path_reach_sbatch_literally(slurm, tmp_path):
    # Blanks, '#' and quotes are sbatch's own syntax in #SBATCH lines: quoted, the path arrives whole.
    log_dir = tmp_path / "logs dir #1 it's \"q\""
    job = SlurmJob(settings(slurm))
    lines: list[str] = []
    job.run(["automixer", "config", "-c", str(ROOT / "configs" / "demo.yaml"), "--set", "run.id=odd"],
            gpu=False, job_name="automixer-config", log_dir=str(log_dir), log=lines.append)
    out = log_dir / f"automixer-config-{job.job_id}.out"
    assert out.is_file(), sorted(str(p) for p in tmp_path.rglob("*.out"))
    assert "  id: odd" in out.read_text().splitlines() and "  id: odd" in lines


def test_a_pipeline_step_runs_as_a_slurm_job_with_its_output_in_the_task_log(slurm, tmp_path, small_corpus):
    from conftest import write_config

    config = write_config(tmp_path / "slurm.yaml", {"paths": [str(small_corpus / "*.jsonl")],
                                                    "source_field": "domain", "docs_per_shard": 40},
                          run={"id": "slurm", "root": str(tmp_path / "runs")})
    params = {"config": str(config), "backend": "slurm", "backend_settings": str(write_backends(tmp_path, slurm))}
    op = AutomixerStepOperator(task_id="prepare", step="prepare", gpu=True)
    lines: list[str] = []
    op._log_line = lines.append
    op.execute(context(params))

    log = "\n".join(lines)
    job_id = op._running.job_id
    assert f"submitted Slurm job {job_id}" in log
    assert f"Slurm job {job_id} ended: COMPLETED, exit status 0" in log
    assert "[automixer] job" in log and f"prepare -c {config}" in log  # the batch script's own line
    run_dir = tmp_path / "runs" / "slurm"
    assert len(list((run_dir / "corpus").glob("part-*.parquet"))) == 3  # 108 documents, 40 per shard
    # the job's output file sits in <run dir>/slurm (log_dir: null) and its lines are in the task log
    out = run_dir / "slurm" / f"automixer-prepare-2-{job_id}.out"
    assert out.is_file()
    body = [line for line in out.read_text().splitlines() if line.strip()]
    assert body and all(line in lines for line in body)


def test_a_failing_job_fails_the_task_with_its_exit_status(slurm, tmp_path):
    missing = str(tmp_path / "missing.yaml")
    job = SlurmJob(settings(slurm))
    lines: list[str] = []
    with pytest.raises(AirflowFailException) as e:  # status 2: bad input, not retried
        job.run(["automixer", "prepare", "-c", missing], gpu=False, job_name="automixer-prepare",
                log_dir=str(tmp_path / "logs"), log=lines.append)
    msg = str(e.value)
    assert f"automixer prepare -c {missing}` (Slurm job {job.job_id}, FAILED" in msg
    assert "exited with status 2" in msg
    assert any("config file not found" in line for line in lines)  # the CLI's error, from the job output

    job = SlurmJob(settings(slurm, setup=["echo about to fail", "exit 3"]))
    with pytest.raises(AirflowFailException) as e:  # a crash is not retried either
        job.run(["automixer", "select", "-c", missing], gpu=False, job_name="automixer-select",
                log_dir=str(tmp_path / "logs"), log=lines.append)
    assert "exited with status 3 (not retried" in str(e.value) and "about to fail" in lines

    job = SlurmJob(settings(slurm, setup=["exit 75"]))
    with pytest.raises(AirflowException) as e:
        job.run(["automixer", "select", "-c", missing], gpu=False, job_name="automixer-select",
                log_dir=str(tmp_path / "logs"), log=lines.append)
    assert not isinstance(e.value, AirflowFailException)  # the transient status is retried
    assert "exited with status 75 (transient" in str(e.value)


def test_killing_the_task_cancels_the_job(slurm, tmp_path):
    op = AutomixerStepOperator(task_id="score", step="score", step_args=["--step", "1"], gpu=True)
    backends = tmp_path / "backends.yaml"
    import yaml

    backends.write_text(yaml.safe_dump({"slurm": settings(slurm, setup=["sleep 120"],
                                                          log_dir=str(tmp_path / "logs"))}))
    params = {"config": str(ROOT / "configs" / "demo.yaml"), "backend": "slurm", "backend_settings": str(backends)}
    lines: list[str] = []
    op._log_line = lines.append
    errors: list[BaseException] = []

    def run():
        try:
            op.execute(context(params))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(": RUNNING" in line for line in lines):
        time.sleep(0.2)
    assert any(": RUNNING" in line for line in lines), lines
    op.on_kill()
    t.join(60)
    assert not t.is_alive()
    assert errors and "CANCELLED" in str(errors[0])
    state, _ = op._running.state()
    assert state == "CANCELLED"


# ---------------------------------------------------------------- over SSH

@pytest.fixture(scope="module")
def login_node(slurm, tmp_path_factory):
    """An sshd on loopback standing in for the cluster's login node: the Airflow connection id."""
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(sshd) or not shutil.which("ssh-keygen"):
        pytest.skip("no sshd to stand in for a login node (apt-get install openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    (d / "authorized_keys").chmod(0o600)
    port = _free_port()
    (d / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {d / 'authorized_keys'}
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
""")
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    subprocess.run([sshd, "-f", str(d / "sshd_config"), "-E", str(d / "sshd.log")], check=True, timeout=30)
    conn = {"conn_type": "ssh", "host": "127.0.0.1", "port": port, "login": "root",
            "extra": {"key_file": str(d / "client_key"), "no_host_key_check": True}}
    os.environ["AIRFLOW_CONN_SLURM_LOGIN"] = json.dumps(conn)
    try:
        yield "slurm_login"
    finally:
        os.environ.pop("AIRFLOW_CONN_SLURM_LOGIN", None)
        _stop(d / "sshd.pid")


def test_jobs_are_submitted_and_followed_over_ssh(slurm, login_node, tmp_path):
    job = SlurmJob(settings(slurm, ssh_conn_id=login_node))
    lines: list[str] = []
    job.run(["automixer", "config", "-c", str(ROOT / "configs" / "demo.yaml"), "--set", "run.id=over-ssh"],
            gpu=True, job_name="automixer-config", log_dir=str(tmp_path / "logs"), log=lines.append)
    assert "  id: over-ssh" in lines  # the job's output, read back through the SSH connection
    assert f"Slurm job {job.job_id} ended: COMPLETED, exit status 0" in lines

    job = SlurmJob(settings(slurm, ssh_conn_id=login_node))
    with pytest.raises(AirflowFailException, match="FAILED.*exited with status 2"):
        job.run(["automixer", "prepare", "-c", str(tmp_path / "missing.yaml")], gpu=False,
                job_name="automixer-prepare", log_dir=str(tmp_path / "logs"), log=lines.append)


def test_a_scoring_shard_runs_as_a_slurm_job(slurm, tmp_path, scoring_run):
    """The DAG's mapped scoring job, `score --step N --shards A:B`, through sbatch on the real Slurm."""
    import shutil

    import pyarrow.parquet as pq

    from automixer_ops.config import load_config
    from automixer_ops.influence.score import score

    cfg = load_config(scoring_run, ["run.id=slurm-score"])
    shutil.copytree(load_config(scoring_run).run_dir, cfg.run_dir, symlinks=True,
                    ignore=shutil.ignore_patterns("scores"))
    score(cfg, step=10, fit_only=True, log=lambda _: None)  # the slot's fit task ran before
    params = {"config": str(scoring_run), "overrides": ["run.id=slurm-score"], "backend": "slurm",
              "backend_settings": str(write_backends(tmp_path, slurm))}
    op = AutomixerStepOperator(task_id="score", step="score", step_args=["--step", "10", "--shards", "1:3"],
                               gpu=True)
    lines: list[str] = []
    op._log_line = lines.append
    op.execute(context(params))

    log = "\n".join(lines)
    assert f"Slurm job {op._running.job_id} ended: COMPLETED, exit status 0" in log
    assert "2 shard(s) scored, 0 already done" in log
    out = cfg.run_dir / "scores" / "step=10"
    assert sorted(p.name for p in out.glob("part-*.parquet")) == ["part-00001.parquet", "part-00002.parquet"]
    assert pq.read_table(out / "part-00001.parquet").num_rows == 30
