"""`slurm` backend: the command as a Slurm batch job, submitted here or on a login node over SSH.

The job is submitted with `sbatch --parsable` (the batch script goes on stdin, so nothing
needs copying to the cluster first), then polled: `scontrol show job` while the controller
still knows it, `sacct` afterwards (when accounting is enabled). Each poll copies the new
part of the job's output file into the task log, so the log shows the command's output as
it runs; the final state and exit code decide the task: COMPLETED with exit 0 succeeds,
anything else fails with the job's state and exit status. Killing the task scancels the job.

Commands run through a small Shell: `LocalShell` (the worker itself is a Slurm submit
host) or `SSHShell` (an Airflow SSH connection; paramiko is imported only then).

Nothing reaches the batch script unquoted: `#SBATCH` values are quoted for sbatch's own
parser and refused if they hold a control character (a newline would end the `#SBATCH`
line and start a shell line), the command is shlex-quoted, exported names are checked.
On the worker, sbatch runs with step_env's allowlisted environment, which it hands to the
job (sbatch's default `--export=ALL`): the worker's secrets stay on the worker.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
import unicodedata
from typing import Any, Callable, Mapping, Sequence

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from automixer_launcher.cli_argv import command_failed
from automixer_launcher.param_checks import REFUSED_CATEGORIES
from automixer_launcher.step_env import NAME, step_environment

# Job states after which nothing more happens (sacct/scontrol names).
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
# States where the cluster, not the command, ended the job: the task is retried whatever the exit status.
LOST_STATES = {"NODE_FAIL", "BOOT_FAIL", "PREEMPTED", "REVOKED"}
# Give up when neither scontrol nor sacct has known the job for this many polls in a row.
MAX_UNKNOWN_POLLS = 20


# ---------------------------------------------------------------- where commands run

class LocalShell:
    """Runs shell commands on this host (the Airflow worker is a Slurm submit host)."""

    def __init__(self, env: Mapping[str, str] | None = None, inherit: Sequence[str] = ()):
        # sbatch's own settings (SBATCH_ACCOUNT...) pass too; the job inherits all of this.
        self.env = {**step_environment(inherit, also=("SBATCH_", "SLURM_")), **(env or {})}

    def run(self, command: str, stdin: str | None = None, timeout: float = 120) -> tuple[int, bytes, str]:
        try:
            p = subprocess.run(["bash", "-c", command], input=stdin.encode() if stdin is not None else None,
                               capture_output=True, env=self.env, timeout=timeout)
        except subprocess.TimeoutExpired:  # a hung controller: report it like any failed command
            return 124, b"", f"timed out after {timeout} s: {command}"
        return p.returncode, p.stdout, p.stderr.decode(errors="replace")


class SSHShell:
    """Runs shell commands on a login node through an Airflow SSH connection."""

    def __init__(self, ssh_conn_id: str, env: Mapping[str, str] | None = None):
        from airflow.providers.ssh.hooks.ssh import SSHHook

        self.hook = SSHHook(ssh_conn_id=ssh_conn_id)
        self.prefix = "".join(f"export {k}={shlex.quote(v)}; " for k, v in (env or {}).items())

    def run(self, command: str, stdin: str | None = None, timeout: float = 120) -> tuple[int, bytes, str]:
        try:
            client = self.hook.get_conn()
            chan_in, chan_out, chan_err = client.exec_command(self.prefix + command, timeout=timeout)
            if stdin is not None:
                chan_in.write(stdin)
            chan_in.channel.shutdown_write()
            out, err = chan_out.read(), chan_err.read().decode(errors="replace")
            return chan_out.channel.recv_exit_status(), out, err
        except (OSError, EOFError) as e:  # socket timeouts and dropped connections: the next poll retries
            self.hook.client = None
            return 255, b"", f"ssh: {e}"


def make_shell(settings: Mapping[str, Any]):
    env = {"SLURM_CONF": settings["slurm_conf"]} if settings.get("slurm_conf") else {}
    if settings.get("ssh_conn_id"):
        return SSHShell(settings["ssh_conn_id"], env)
    return LocalShell(env, settings.get("inherit_env") or ())


# ---------------------------------------------------------------- the batch script

def batch_script(argv: Sequence[str], *, settings: Mapping[str, Any], gpu: bool, job_name: str,
                 output: str) -> str:
    """The sbatch script that runs argv (with the configured `automixer`) and exits with its status."""
    kind = settings["gpu" if gpu else "cpu"]
    options = [f"--job-name={job_name}", f"--output={output}"]
    if kind.get("partition"):
        options.append(f"--partition={kind['partition']}")
    if kind.get("gpus"):
        options.append(f"--gres=gpu:{int(kind['gpus'])}")
    for key in ("cpus_per_task", "mem", "time"):
        if kind.get(key) is not None:
            options.append(f"--{key.replace('_', '-')}={kind[key]}")
    options += [str(a) for a in kind.get("sbatch_args") or []]
    env = {str(k): str(v) for k, v in (settings.get("env") or {}).items()}
    for name in env:
        if not NAME.fullmatch(name):
            raise AirflowFailException(f"backend setting slurm.env: {name!r} is not an environment variable name")
    command = shlex.join([settings.get("automixer") or "automixer", *argv[1:]])
    lines = ["#!/bin/bash", *(f"#SBATCH {sbatch_quote(o)}" for o in options),
             "# Generated by the AutoMixer Airflow launcher (plugins/automixer_launcher/backend_slurm.py).",
             "set -eo pipefail",
             *[str(s) for s in settings.get("setup") or []],
             *(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
             f'echo "[automixer] job $SLURM_JOB_ID on $(hostname): "{shlex.quote(command)}',
             f"exec {command}", ""]
    return "\n".join(lines)


def sbatch_quote(option: str) -> str:
    """One `#SBATCH` argument, read back by sbatch exactly as given.

    sbatch splits the line at blanks outside quotes, ends it at an unescaped '#' (a comment)
    and reads backslash escapes; a newline would end the line and start a shell line. So:
    refuse control characters, and double-quote anything with a blank or a special character,
    backslash-escaping quotes, backslashes and '#'.
    """
    bad = next((c for c in option if unicodedata.category(c) in REFUSED_CATEGORIES), None)
    if bad is not None:
        raise AirflowFailException(f"Slurm option {option!r}: contains the control character U+{ord(bad):04X}, "
                                   "which would end the #SBATCH line")
    if not re.search(r"""[\s\\"'#]""", option):
        return option
    return '"' + re.sub(r"""([\\"'#])""", r"\\\1", option) + '"'


# ---------------------------------------------------------------- one job

class SlurmJob:
    """Submit one command, follow it to the end, cancel it on request (from another thread)."""

    def __init__(self, settings: Mapping[str, Any], shell=None):
        self.settings = settings
        self.shell = shell or make_shell(settings)
        self.job_id: str | None = None
        self.output: str | None = None

    def run(self, argv: Sequence[str], *, gpu: bool, job_name: str, log_dir: str,
            log: Callable[[str], None]) -> None:
        self.submit(argv, gpu=gpu, job_name=job_name, log_dir=log_dir, log=log)
        try:
            state, status = self.wait(log)
        except Exception:
            # Lost track of the job: cancel it rather than leave it running beside the retry's job.
            self.cancel()
            raise
        if state != "COMPLETED" or status != 0:
            raise command_failed(argv, status if status is not None else "unknown",
                                 where=f"(Slurm job {self.job_id}, {state}, output {self.output})",
                                 lost=state in LOST_STATES or status is None)

    def submit(self, argv: Sequence[str], *, gpu: bool, job_name: str, log_dir: str,
               log: Callable[[str], None]) -> str:
        self.output = f"{log_dir.rstrip('/')}/{job_name}-%j.out"
        script = batch_script(argv, settings=self.settings, gpu=gpu, job_name=job_name, output=self.output)
        log("sbatch script:\n" + script)
        rc, out, err = self.shell.run(f"mkdir -p {shlex.quote(log_dir)} && sbatch --parsable", stdin=script)
        text = out.decode(errors="replace").strip()
        parsed = re.fullmatch(r"(\d+)(;\S+)?", text)  # "<id>[;<cluster>]"; the id goes into shell commands
        if rc != 0 or not parsed:
            raise AirflowException(f"sbatch failed (status {rc}): {err.strip() or text}")
        self.job_id = parsed.group(1)
        self.output = self.output.replace("%j", self.job_id)
        log(f"submitted Slurm job {self.job_id}; output: {self.output}")
        return self.job_id

    def wait(self, log: Callable[[str], None]) -> tuple[str, int | None]:
        """Poll until the job ends, copying its output into the log; (state, exit status)."""
        poll = float(self.settings.get("poll_seconds", 15))
        offset, partial, unknown, last_state = 0, b"", 0, None
        while True:
            state, status = self.state()
            if state != last_state:
                log(f"Slurm job {self.job_id}: {state}")
                last_state = state
            offset, partial = self._copy_output(offset, partial, log)
            if state in TERMINAL_STATES:
                # The node may flush the file's last lines after the controller records the end.
                time.sleep(min(poll, 1.0))
                offset, partial = self._copy_output(offset, partial, log)
                if partial:
                    log(partial.decode(errors="replace"))
                log(f"Slurm job {self.job_id} ended: {state}, exit status {status}")
                return state, status
            unknown = unknown + 1 if state == "UNKNOWN" else 0
            if unknown >= MAX_UNKNOWN_POLLS:
                raise AirflowException(f"Slurm job {self.job_id}: neither scontrol nor sacct knows it "
                                       f"any more; see {self.output}")
            time.sleep(poll)

    def state(self) -> tuple[str, int | None]:
        """(state, exit status) from scontrol, else sacct; ("UNKNOWN", None) when neither knows."""
        rc, out, _ = self.shell.run(f"scontrol show job -o {self.job_id}")
        text = out.decode(errors="replace")
        if rc == 0 and "JobState=" in text:
            state = re.search(r"\bJobState=(\S+)", text).group(1)
            code = re.search(r"\bExitCode=(\d+):(\d+)", text)
            return state, _exit_status(code.group(1), code.group(2)) if code else None
        rc, out, _ = self.shell.run(f"sacct -j {self.job_id} -X -n -P -o State,ExitCode")
        line = out.decode(errors="replace").strip().splitlines()
        if rc == 0 and line and "|" in line[0]:
            state, code = line[0].split("|", 1)
            status, _, signal = code.partition(":")
            return state.split()[0], _exit_status(status, signal or "0")
        return "UNKNOWN", None

    def cancel(self) -> None:
        if self.job_id:
            self.shell.run(f"scancel {self.job_id}")

    stop = cancel  # what AutomixerStepOperator.on_kill calls

    def _copy_output(self, offset: int, partial: bytes, log: Callable[[str], None]) -> tuple[int, bytes]:
        rc, data, _ = self.shell.run(f"tail -c +{offset + 1} {shlex.quote(self.output)} 2>/dev/null")
        if rc != 0 or not data:
            return offset, partial
        *lines, rest = (partial + data).split(b"\n")
        for line in lines:
            log(line.decode(errors="replace"))
        return offset + len(data), rest


def _exit_status(status: str, signal: str) -> int:
    # ExitCode=<status>:<signal>; a job killed by a signal reports 128 + signal, like a shell.
    return 128 + int(signal) if int(signal) and not int(status) else int(status)
