"""AutomixerStepOperator: one `automixer <step>` call, on the backend the DAG run chose.

What runs is always `cli_argv(step, step_args, params)`: the run's config file, the run
params' `--set` overrides and the step's own arguments. The run param `backend` picks where:
a subprocess here (`local`), a pod (`kubernetes`, deferrable) or a Slurm job (`slurm`).
Exit status 75 (transient: another process holds what the step needs) is retried as the DAG
says, and so is a Slurm job its cluster lost (node failure, preemption); any other failure
(2: bad input or settings; a crash) fails the task without retries. After success, `outlet_metadata(run_dir)` (if given) becomes the
`extra` of every outlet asset event (rows, weights...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from automixer_launcher.cli_argv import BACKENDS, cli_argv, config_overrides
from automixer_launcher.param_checks import check_params


class AutomixerStepOperator(BaseOperator):
    """Run `automixer <step> -c CONFIG [--set ...] [step_args]` on the run's backend."""

    template_fields: Sequence[str] = ("step_args",)
    ui_color = "#dcefe3"

    def __init__(self, *, step: str, step_args: Sequence[Any] = (), gpu: bool = False,
                 outlet_metadata: Callable[[Path], dict] | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.step = step
        self.step_args = step_args
        self.gpu = gpu
        self.outlet_metadata = outlet_metadata
        self._running: Any = None  # the LocalProcess, SlurmJob or pod operator, for on_kill

    # ------------------------------------------------------------ what and where

    def argv(self, context) -> list[str]:
        return cli_argv(self.step, list(self.step_args or ()), context["params"])

    def backend(self, context) -> tuple[str, dict]:
        from automixer_launcher.backend_settings import load_settings

        params = context["params"]
        name = params.get("backend") or "local"
        if name not in BACKENDS:
            raise AirflowFailException(f"backend {name!r}: choose one of {', '.join(BACKENDS)}")
        return name, load_settings(params.get("backend_settings"))[name]

    def pod_operator(self, context):
        """The KubernetesPodOperator this task runs with the kubernetes backend."""
        from automixer_launcher.backend_kubernetes import pod_operator

        _, settings = self.backend(context)
        return pod_operator(self.argv(context), task_id=self.task_id, gpu=self.gpu, settings=settings)

    # ------------------------------------------------------------ running

    def execute(self, context) -> None:
        name, settings = self.backend(context)
        argv = self.argv(context)
        log = self._log_line
        if name == "local":
            from automixer_launcher.backend_local import LocalProcess

            self._running = LocalProcess(settings)
            self._running.run(argv, log=log)
        elif name == "slurm":
            from automixer_launcher.backend_slurm import SlurmJob

            log_dir = settings.get("log_dir") or str(self.work_dir(context["params"]) / "slurm")
            self._running = SlurmJob(settings)
            self._running.run(argv, gpu=self.gpu, job_name=self._job_name(context), log_dir=log_dir, log=log)
        else:
            pod = self._running = self.pod_operator(context)
            # What KubernetesPodOperator.execute dispatches to; called directly so that Airflow's
            # executor safeguard does not warn about a nested operator. Deferrable: raises
            # TaskDeferred, and the triggerer comes back to trigger_reentry below.
            (pod.execute_async if pod.deferrable else pod.execute_sync)(context)
        self._record_outputs(context)

    def trigger_reentry(self, context, event: dict[str, Any]) -> None:
        """Where a deferred pod comes back (the provider's method name): finish through the pod operator."""
        self._running = self.pod_operator(context)
        self._running.trigger_reentry(context, event)
        self._record_outputs(context)

    def on_kill(self) -> None:
        running = self._running
        if running is None:
            return
        # LocalProcess and SlurmJob have stop(); the pod operator deletes its pod in on_kill().
        stop = getattr(running, "stop", None) or running.on_kill
        stop()

    # ------------------------------------------------------------ helpers

    def work_dir(self, params) -> Path:
        """Where the command writes: the run directory (Slurm logs go to its `slurm/`; outlet metadata reads it)."""
        return run_dir(params)

    def _log_line(self, line: str) -> None:
        self.log.info("%s", line)

    def _job_name(self, context) -> str:
        ti = context["ti"]
        suffix = f"-{ti.map_index}" if getattr(ti, "map_index", -1) >= 0 else ""
        return f"automixer-{self.task_id.replace('.', '-')}{suffix}"

    def _record_outputs(self, context) -> None:
        if not self.outlet_metadata or not self.outlets:
            return
        extra = self.outlet_metadata(self.work_dir(context["params"]))
        for asset in self.outlets:
            context["outlet_events"][asset].extra.update(extra)


def run_dir(params) -> Path:
    """The run directory the run params' config (with their overrides) points at."""
    from automixer_ops.config import load_config

    return load_config(params["config"], config_overrides(params)).run_dir


class ExperimentStepOperator(AutomixerStepOperator):
    """Run `automixer experiment -c EXPERIMENT [step_args]` (dags/automixer_experiment.py) on the run's backend.

    The same operator with the experiment file (the run param `experiment`) in place of the run config, no
    `--set` overrides (the experiment file holds its settings), and the experiment directory as the place
    its Slurm logs go (`<experiment dir>/slurm/`)."""

    ui_color = "#e3e0f3"

    def __init__(self, *, step: str = "experiment", **kwargs: Any):
        super().__init__(step=step, **kwargs)

    def argv(self, context) -> list[str]:
        return cli_argv(self.step, list(self.step_args or ()), context["params"], config_param="experiment",
                        overrides=False)

    def work_dir(self, params) -> Path:
        return experiment_dir(params)


def experiment_dir(params) -> Path:
    """The directory of the experiment the run param `experiment` names (<root>/<name>)."""
    from automixer_ops.errors import AutomixerError
    from automixer_ops.experiment_config import load_experiment

    check_params(params)
    try:
        return load_experiment(params["experiment"]).directory
    except AutomixerError as e:
        raise AirflowFailException(f"experiment file: {e}") from None
