"""
# AutoMixer experiment

Compares data-mixing methods (uniform, ppl, dsir, last-ckpt, all-ckpt, automixer, your own
scores) on one run: each method's mixture trains a target model per seed, which is evaluated
on the run's held-out test documents, and the table gives each method's accuracy and its
paired-by-seed Δ against the baseline. Every task runs one `automixer experiment` command on
the experiment file (automixer_ops/experiment_config.py documents its keys):

```
prepare -> units -> run (mapped over (method, seed)) -> table
```

- **prepare** `automixer experiment -c X --stage prepare`: the base run's pipeline and each
  method's seed-independent work (scores, perplexities, n-gram importances...);
- **units** reads the experiment file and lists its (method, seed) units, seeds outer;
- **run** `automixer experiment -c X --stage run --method M --seed S`, one map index per unit
  (labelled `M seed S`): the mixture, the target's training and its evaluation. Resumable: a
  cleared or retried unit continues where it stopped, a finished one returns at once;
- **table** `automixer experiment -c X --stage table`: `<experiment dir>/results.parquet`,
  `table.md` and `plot.png` in the experiment directory, once every unit succeeded.

**Params** (the trigger form): `experiment` (absolute path of the experiment YAML, readable
where the commands run: the workers, pods or Slurm nodes; default `$AUTOMIXER_EXPERIMENT`, else
configs/experiment_demo.yaml); `backend` runs the commands here
(`local`), in pods (`kubernetes`) or as Slurm jobs (`slurm`), with `backend_settings` (a YAML
file of $AUTOMIXER_BACKENDS_DIR; plugins/automixer_launcher/backends.yaml documents it). The
experiment file holds every other setting: no `--set` overrides. Params are single-line text;
every task checks them again (param_checks).

**Pools.** `automixer_gpu` (prepare and every unit; slots = GPUs: each unit trains one
target). Create it before the first run (`airflow pools set automixer_gpu 1 "GPU steps"`).

**Retries.** As the `automixer` DAG: `AUTOMIXER_TASK_RETRIES` (default 2, with backoff) apply
only to exit status 75 (transient) and to Slurm jobs their cluster lost; exit 2 (bad input,
named in one line) and crashes fail the task at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from airflow.sdk import Param, dag, task

HERE = Path(__file__).resolve().parent
try:
    import automixer_launcher  # noqa: F401  (Airflow puts its plugins folder on sys.path)
except ImportError:  # dags/ and plugins/ side by side, as in this repository
    sys.path.append(str(HERE.parent / "plugins"))

from automixer_launcher.dag_params import backend_params, default_args  # noqa: E402
from automixer_launcher.param_checks import ABSOLUTE_PATH_PATTERN  # noqa: E402
from automixer_launcher.step_operator import ExperimentStepOperator  # noqa: E402

GPU_POOL = "automixer_gpu"
DEFAULT_EXPERIMENT = os.environ.get("AUTOMIXER_EXPERIMENT", str(HERE.parent / "configs" / "experiment_demo.yaml"))
# A unit's map index label: `--stage run --method M --seed S` -> "M seed S".
UNIT_LABEL = "{{ task.step_args[3] }} seed {{ task.step_args[5] }}"

PARAMS = {
    "experiment": Param(DEFAULT_EXPERIMENT, type="string", pattern=ABSOLUTE_PATH_PATTERN,
                        minLength=2, title="Experiment file",
                        description="Absolute path of the experiment YAML (methods, seeds, token budget, target; "
                                    "its `base` names the run config). Must be readable where the commands run."),
    **backend_params(),
}

DEFAULT_ARGS = default_args()


def unit_args(units: list[tuple[str, int]]) -> list[list[str]]:
    """`--stage run --method M --seed S` for each (method, seed) unit, in the experiment's order."""
    return [["--stage", "run", "--method", method, "--seed", str(seed)] for method, seed in units]


@task(task_id="units")
def experiment_units(params=None) -> list[list[str]]:
    """The experiment's (method, seed) units, one `--stage run --method M --seed S` per map index."""
    from automixer_launcher.param_checks import check_params
    from automixer_ops.errors import AutomixerError
    from automixer_ops.experiment_config import load_experiment

    from airflow.sdk.exceptions import AirflowFailException

    check_params(params)
    try:
        exp = load_experiment(params["experiment"])
    except AutomixerError as e:
        raise AirflowFailException(f"experiment file: {e}") from None
    units = exp.units()
    print(f"experiment {exp.name}: {len(exp.methods)} methods x {len(exp.seeds)} seeds = {len(units)} units "
          f"(baseline {exp.baseline}; directory {exp.directory})")
    for method, seed in units:
        print(f"  {method} ({exp.method(method).kind}) seed {seed}")
    return unit_args(units)


@dag(dag_id="automixer_experiment", schedule=None, catchup=False, max_active_runs=1, params=PARAMS,
     default_args=DEFAULT_ARGS, doc_md=__doc__, tags=["automixer", "experiment"])
def automixer_experiment():
    prepare = ExperimentStepOperator(
        task_id="prepare", step_args=["--stage", "prepare"], gpu=True, pool=GPU_POOL,
        doc_md="`automixer experiment --stage prepare`: the base run's pipeline (resumes where it stopped) and "
               "each method's seed-independent work.")
    units = experiment_units()
    run = ExperimentStepOperator.partial(
        task_id="run", gpu=True, pool=GPU_POOL, map_index_template=UNIT_LABEL,
        doc_md="`automixer experiment --stage run --method M --seed S`: one unit's mixture, target training "
               "and evaluation on the test documents (resumable).",
    ).expand(step_args=units)
    table = ExperimentStepOperator(
        task_id="table", step_args=["--stage", "table"],
        doc_md="`automixer experiment --stage table`: `results.parquet`, `table.md` (means ± stderr over "
               "seeds, Δ vs the baseline paired by seed) and `plot.png` in the experiment directory.")

    prepare >> units >> run >> table


automixer_experiment_dag = automixer_experiment()
