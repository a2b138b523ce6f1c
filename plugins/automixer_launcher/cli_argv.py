"""The `automixer` command line a task runs, built from the step and the DAG run's params.

Every backend runs exactly this argv (the first element, `automixer`, may be replaced by
the backend's path to the executable). The run params that override the config file
become `--set section.key=value` on every call, so each step sees the same configuration.
The params are checked first (param_checks): single-line text, overrides of allowed keys only.
"""

from __future__ import annotations

import json
import shlex
from typing import Any, Mapping, Sequence

from airflow.sdk.exceptions import AirflowException, AirflowFailException

from automixer_launcher.param_checks import check_params

BACKENDS = ("local", "kubernetes", "slurm")

# DAG param -> the config key it overrides. A null param keeps the config file's value.
OVERRIDE_PARAMS = {
    "tasks": "tasks.targets",
    "proxy_preset": "proxy.preset",
    "keep_fraction": "regroup.keep_fraction",
    "token_budget": "mix.token_budget",
}

# The CLI's contract (automixer_ops/errors.py): 0 ok; 2 bad input or settings; 75 (EX_TEMPFAIL) a transient
# condition (another process holds a lock the step needs): only that one passes by itself, so only it is retried.
# Any other status is a crash or a kill (a traceback, the OOM killer): the same command would do it again.
EXIT_BAD_INPUT = 2
EXIT_TRANSIENT = 75


def config_overrides(params: Mapping[str, Any]) -> list[str]:
    """`section.key=value` overrides from the run params (values as JSON, which YAML reads).

    An empty param (null, or an empty list or string, as a form's blank field may send) keeps
    the config file's value. Bad params (param_checks) fail the task, naming the param.
    """
    check_params(params)
    out = [f"{key}={json.dumps(params[name])}" for name, key in OVERRIDE_PARAMS.items()
           if params.get(name) not in (None, [], "")]
    out.extend(params.get("overrides") or [])
    return out


def cli_argv(step: str, step_args: Sequence[Any], params: Mapping[str, Any], *, config_param: str = "config",
             overrides: bool = True) -> list[str]:
    """["automixer", step, "-c", CONFIG, "--set", ..., *step_args].

    CONFIG is the param `config_param` names (the run config; `experiment` for `automixer experiment`);
    `overrides=False` leaves out the `--set` overrides (a command whose file holds all its settings). The
    params are checked either way."""
    if overrides:
        sets = config_overrides(params)  # checks the params first
    else:
        check_params(params)
        sets = []
    argv = ["automixer", step, "-c", str(params[config_param])]
    for item in sets:
        argv += ["--set", item]
    return argv + [str(a) for a in step_args]


def command_failed(argv: Sequence[str], status: int | str, where: str = "", lost: bool = False) -> AirflowException:
    """The task failure for a command that did not exit 0: retried (AirflowException) only for the transient
    status, or when the backend lost the job (`lost`: a failed node, a preempted job), not for anything the
    command itself decided (AirflowFailException)."""
    msg = f"`{shlex.join(argv)}`{' ' + where if where else ''} exited with status {status}"
    if status == EXIT_TRANSIENT:
        return AirflowException(msg + " (transient: another process holds what the step needs; retried)")
    if lost:
        return AirflowException(msg + " (the job was lost by its backend; retried)")
    if status == EXIT_BAD_INPUT:
        return AirflowFailException(msg + " (bad input or settings; not retried)")
    return AirflowFailException(msg + " (not retried: only exit status 75 is transient)")
