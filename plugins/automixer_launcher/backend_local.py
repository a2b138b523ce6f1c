"""`local` backend: the command as a subprocess of the Airflow worker.

Its stdout and stderr are streamed line by line into the task log as they come (a long
scoring run shows progress in the UI), and a non-zero exit fails the task with the
command and its exit status. The process gets its own session so that killing the task
(on_kill) stops the whole process tree, not just the top process. Its environment is not
the worker's (database password, Fernet key...): step_env's allowlist, the `inherit_env`
setting's names and the `env` setting's values.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from automixer_launcher.cli_argv import command_failed
from automixer_launcher.step_env import step_environment


def resolve_executable(configured: str | None) -> str:
    """The `automixer` to run: the configured one, else the worker venv's, else PATH's."""
    if configured:
        return configured
    beside_python = Path(sys.executable).with_name("automixer")
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("automixer") or "automixer"


class LocalProcess:
    """Runs one argv to completion; `kill()` may be called from another thread."""

    def __init__(self, settings: Mapping[str, Any]):
        self.settings = settings
        self.proc: subprocess.Popen | None = None

    def run(self, argv: Sequence[str], log: Callable[[str], None]) -> None:
        argv = [resolve_executable(self.settings.get("automixer")), *argv[1:]]
        # Mapped scoring tasks run side by side on one worker, each with torch's full thread pool: with
        # spin-waiting OpenMP threads they took 3-4x longer than with sleeping waits (measured on 2 cores).
        # The worker's environment or the `env` setting overrides this default.
        env = {"OMP_WAIT_POLICY": "PASSIVE", **step_environment(self.settings.get("inherit_env")),
               **{k: str(v) for k, v in (self.settings.get("env") or {}).items()}}
        log(f"running: {_show(argv)}")
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     text=True, errors="replace", bufsize=1, start_new_session=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            log(line.rstrip("\n"))
        status = self.proc.wait()
        if status != 0:
            raise command_failed(argv, status if status > 0 else f"{status} (signal {-status})")

    def kill(self, grace_seconds: float = 10.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=grace_seconds)
                return
            except subprocess.TimeoutExpired:
                continue

    stop = kill  # what AutomixerStepOperator.on_kill calls


def _show(argv: Sequence[str]) -> str:
    import shlex

    return shlex.join(argv)
