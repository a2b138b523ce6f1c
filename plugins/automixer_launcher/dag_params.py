"""What every AutoMixer DAG shares: where its commands run (trigger-form Params) and how tasks retry."""

from __future__ import annotations

import os
from datetime import timedelta

from airflow.sdk import Param

from automixer_launcher.cli_argv import BACKENDS
from automixer_launcher.param_checks import ABSOLUTE_PATH_PATTERN


def backend_params() -> dict[str, Param]:
    """`backend` and `backend_settings`, their defaults from $AUTOMIXER_BACKEND / $AUTOMIXER_BACKENDS_FILE."""
    return {
        "backend": Param(os.environ.get("AUTOMIXER_BACKEND", "local"), type="string", enum=list(BACKENDS),
                         title="Backend", description="Where commands run: a subprocess of the worker (local), "
                                                      "a Kubernetes pod or a Slurm job."),
        "backend_settings": Param(os.environ.get("AUTOMIXER_BACKENDS_FILE"), type=["null", "string"],
                                  pattern=ABSOLUTE_PATH_PATTERN, title="Backend settings file",
                                  description="YAML merged over plugins/automixer_launcher/backends.yaml "
                                              "(image, GPUs, node selector, volumes, partition...); a file in "
                                              "$AUTOMIXER_BACKENDS_DIR on the workers (default: the plugin's "
                                              "directory) or the one $AUTOMIXER_BACKENDS_FILE names."),
    }


def default_args() -> dict:
    """Retries with backoff ($AUTOMIXER_TASK_RETRIES, default 2). The operator retries only a command that exits 75
    (transient) or a Slurm job its cluster lost; bad input (exit 2) fails at once."""
    return {
        "owner": "automixer",
        "retries": int(os.environ.get("AUTOMIXER_TASK_RETRIES", "2")),
        "retry_delay": timedelta(minutes=1),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(minutes=30),
    }
