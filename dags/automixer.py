"""
# AutoMixer

Turns a proxy training run's checkpoints into an influence-weighted pretraining mixture
(docs/DESIGN.md). Every task runs one `automixer <step>` command on the run's config file;
the tasks pass only paths and small strings, the data stays in the run directory.

```
check_params -> prepare -> train_proxy -> evaluate.find_checkpoints -> evaluate.checkpoint (mapped over checkpoints)
        -> evaluate.combine -> select -> samplers.list -> samplers.fit (mapped over samplers)
        -> samplers.score (mapped over every sampler's shard ranges) -> regroup -> mix -> report
```

**Samplers.** The graph is sized to the run: `samplers.list` reads `selection.json`, `fit` has one
map index per sampler (`score --step N --fit-only`: DataInf's lambda and r, once per sampler),
and `score` one per (sampler, range of corpus shards) (`score --step N --shards A:B`), a few
hundred per sampler at most; each map index is labelled with its step and shards. Every fit
finishes before scoring starts (a score reads its sampler's fit).

**Params** (the trigger form): `config` (absolute path of the run config YAML, visible to
the workers and to pods / Slurm nodes); `tasks`, `proxy_preset`, `keep_fraction`,
`token_budget` and `overrides` become `--set section.key=value` on every command
(empty: the config file's value); `backend` runs the commands here (`local`), in pods
(`kubernetes`) or as Slurm jobs (`slurm`), with `backend_settings` (a YAML file,
plugins/automixer_launcher/backends.yaml documents it); `shards_per_task` batches shards.
Params are single-line text, `overrides` may set only the method's knobs (never a path:
automixer_launcher/param_checks.py lists them) and `backend_settings` must be a file of
$AUTOMIXER_BACKENDS_DIR; every task checks this again (a conf key outside the schema is not
validated by Airflow). `check_params` loads the config with the params' overrides before anything
runs and fails in seconds with one line naming the Param (`keep_fraction 2` is outside (0, 1]): the
numeric fields carry no `minimum`/`maximum`, because the trigger form clamps a number to those
silently (2 became 1); the rules live in the config, checked by every step and by `check_params`.

**Pools.** `automixer_gpu` (GPU steps: train_proxy, evaluate, fit, score; slots = GPUs) and
`automixer_duckdb` (one slot: regroup and mix write automixer.duckdb / mixture/). Create
them before the first run (`airflow pools set automixer_gpu 1 "GPU steps"`, likewise
`automixer_duckdb 1`): the scheduler leaves tasks of a missing pool waiting.

**Retries.** `AUTOMIXER_TASK_RETRIES` (default 2, with backoff) apply only where waiting can help: a command
that exits 75 (transient: another process fits the same sampler or holds its lock) or a Slurm job its cluster
lost. Exit 2 (bad input, named in one line) and crashes fail the task at once.

**Assets.** `automixer_weights` (after regroup; event extra: group weights, rows) and
`automixer_mixture` (after mix; rows, tokens, realised shares).
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from airflow.sdk import Asset, Param, TaskGroup, dag, task

HERE = Path(__file__).resolve().parent
try:
    import automixer_launcher  # noqa: F401  (Airflow puts its plugins folder on sys.path)
except ImportError:  # dags/ and plugins/ side by side, as in this repository
    sys.path.append(str(HERE.parent / "plugins"))

from automixer_launcher import AutomixerStepOperator  # noqa: E402
from automixer_launcher.asset_metadata import mixture_metadata, weights_metadata  # noqa: E402
from automixer_launcher.dag_params import backend_params, default_args  # noqa: E402
from automixer_launcher.param_checks import (  # noqa: E402
    ABSOLUTE_PATH_PATTERN, NAME_PATTERN, OVERRIDABLE, OVERRIDE_PATTERN)

# Per sampler, at most this many scoring map indices (shards are batched into ranges).
MAX_SCORE_TASKS = 200
GPU_POOL = "automixer_gpu"
# A mapped step's label in the UI: "step 100 shards 0:4" rather than a bare map index.
ARGS_LABEL = "{{ task.step_args | join(' ') | replace('--', '') | replace('fit-only', 'fit') }}"
DUCKDB_POOL = "automixer_duckdb"
PROXY_PRESETS = ["tiny", "25m", "50m", "75m", "350m", "1.5b"]
DEFAULT_CONFIG = os.environ.get("AUTOMIXER_CONFIG", str(HERE.parent / "configs" / "demo.yaml"))

WEIGHTS = Asset(name="automixer_weights", uri="x-automixer://weights", group="automixer")
MIXTURE = Asset(name="automixer_mixture", uri="x-automixer://mixture", group="automixer")

PARAMS = {
    "config": Param(DEFAULT_CONFIG, type="string", pattern=ABSOLUTE_PATH_PATTERN, minLength=2, title="Run config",
                    description="Absolute path of the run config YAML (configs/demo.yaml is the embedded "
                                "demo). Must be readable where the commands run."),
    "tasks": Param(None, type=["null", "array"], uniqueItems=True,
                   items={"type": "string", "pattern": NAME_PATTERN}, title="Target tasks",
                   description="lm-eval task names (tasks.targets); empty: the config's."),
    "proxy_preset": Param(None, type=["null", "string"], enum=[None, *PROXY_PRESETS], title="Proxy preset",
                          values_display={None: "(the config's)"},
                          description="proxy.preset; empty: the config's."),
    # No `minimum`/`maximum` on numbers: the form clamps to them silently; check_params refuses instead.
    "keep_fraction": Param(None, type=["null", "number"], exclusiveMinimum=0,
                           title="Keep fraction", description="regroup.keep_fraction in (0, 1]; empty: the config's."),
    "token_budget": Param(None, type=["null", "integer"], exclusiveMinimum=0, title="Token budget",
                          description="mix.token_budget (tokens in the mixture); empty: the config's."),
    "overrides": Param([], type=["null", "array"], title="More overrides",
                       items={"type": "string", "pattern": OVERRIDE_PATTERN},
                       description="More config values as section.key=value (YAML value), for these keys only "
                                   f"(paths stay in the config file): {', '.join(OVERRIDABLE)}."),
    **backend_params(),
    "shards_per_task": Param(None, type=["null", "integer"], exclusiveMinimum=0, title="Shards per scoring task",
                             description=f"Corpus shards per score map index; empty: as few as keep each "
                                         f"sampler under {MAX_SCORE_TASKS} map indices."),
}

DEFAULT_ARGS = default_args()


def _run_config(params):
    """The run's Config as every command sees it (config file + the params' overrides)."""
    from automixer_launcher.cli_argv import OVERRIDE_PARAMS, config_overrides
    from automixer_ops.config import load_config
    from automixer_ops.errors import AutomixerError

    from airflow.sdk.exceptions import AirflowFailException

    try:
        return load_config(params["config"], config_overrides(params))
    except AutomixerError as e:
        # Name the Param the user typed, not only the config key it overrides.
        named = [f"Param {name!r}" for name, key in OVERRIDE_PARAMS.items()
                 if params.get(name) not in (None, [], "") and key.rsplit(".", 1)[1] in str(e)]
        raise AirflowFailException(f"{' / '.join(named) or 'run config'}: {e}") from None


def _samplers(cfg):
    from automixer_ops.errors import AutomixerError
    from automixer_ops.rundir import RunDir
    from automixer_ops.samplers import read_selection

    from airflow.sdk.exceptions import AirflowFailException

    try:
        return read_selection(RunDir(cfg.run_dir)).samplers
    except AutomixerError as e:
        raise AirflowFailException(str(e)) from None


@task(task_id="check_params")
def check_run_params(params=None) -> str:
    """Fail in seconds, naming the Param, when the run's config with its overrides is invalid."""
    cfg = _run_config(params)
    print(f"run config {params['config']}: run directory {cfg.run_dir}")
    return str(cfg.run_dir)


@task(task_id="find_checkpoints")
def checkpoint_args(params=None) -> list[list[str]]:
    """The proxy run's checkpoints, one `evaluate --step N` per map index."""
    from automixer_ops.checkpoints import list_checkpoints
    from automixer_ops.rundir import RunDir

    from airflow.sdk.exceptions import AirflowFailException

    steps = list(list_checkpoints(RunDir(_run_config(params).run_dir)))
    if not steps:
        raise AirflowFailException("no checkpoints in the run directory; did train_proxy run?")
    return [["--step", str(s)] for s in steps]


@task(task_id="list")
def fit_args(params=None) -> list[list[str]]:
    """One `score --step N --fit-only` per sampler of selection.json."""
    samplers = _samplers(_run_config(params))
    for i, s in enumerate(samplers):
        print(f"sampler {i}: step {s.step}, alpha {s.alpha:.4f}, tasks {', '.join(s.tasks)}")
    return [["--step", str(s.step), "--fit-only"] for s in samplers]


@task(task_id="shards")
def shard_ranges(params=None) -> list[list[str]]:
    """`score --step N --shards A:B` for every sampler: the corpus shards in ranges, a few hundred per sampler."""
    from automixer_ops.rundir import RunDir

    from airflow.sdk.exceptions import AirflowFailException

    cfg = _run_config(params)
    run = RunDir(cfg.run_dir)
    n = len(run.corpus_shards())
    if n == 0:
        raise AirflowFailException(f"{run.corpus}: no part-*.parquet shards")
    per = params.get("shards_per_task") or max(1, math.ceil(n / MAX_SCORE_TASKS))
    ranges = [(a, min(a + per, n)) for a in range(0, n, per)]
    steps = [str(s.step) for s in _samplers(cfg)]
    print(f"{len(steps)} samplers x {n} shards in {len(ranges)} ranges of at most {per}: "
          f"{len(steps) * len(ranges)} scoring tasks")
    return [["--step", step, "--shards", f"{a}:{b}"] for step in steps for a, b in ranges]


def step(task_id: str, cli_step: str, doc: str, **kwargs) -> AutomixerStepOperator:
    return AutomixerStepOperator(task_id=task_id, step=cli_step, doc_md=doc, **kwargs)


@dag(dag_id="automixer", schedule=None, catchup=False, max_active_runs=1, params=PARAMS,
     default_args=DEFAULT_ARGS, doc_md=__doc__, tags=["automixer"])
def automixer():
    prepare = step("prepare", "prepare", "Validate and tokenize the corpus into `corpus/part-*.parquet`.")
    train = step("train_proxy", "train-proxy", "Train the proxy (or link your checkpoints); resumes.",
                 gpu=True, pool=GPU_POOL)

    with TaskGroup("evaluate", tooltip="lm-eval each checkpoint, then combine the benchmark table") as evaluate:
        per_checkpoint = AutomixerStepOperator.partial(
            task_id="checkpoint", step="evaluate", gpu=True, pool=GPU_POOL, map_index_template=ARGS_LABEL,
            doc_md="`automixer evaluate --step N`: one checkpoint on every target task (resumable).",
        ).expand(step_args=checkpoint_args())
        combine = step("combine", "evaluate", "`automixer evaluate`: the finished steps into "
                       "`eval/benchmark.parquet` and the influence validation sets.")
        per_checkpoint >> combine

    select = step("select", "select", "Each task's best checkpoint, the samplers and alpha -> `selection.json`.")

    # Sized to the run: one fit per sampler, one score per (sampler, shard range); the label shows which.
    with TaskGroup("samplers", tooltip="DataInf fit and scoring of every sampler in selection.json") as samplers:
        fit = AutomixerStepOperator.partial(
            task_id="fit", step="score", gpu=True, pool=GPU_POOL, map_index_template=ARGS_LABEL,
            doc_md="`automixer score --step N --fit-only`: DataInf lambda and r of one sampler.",
        ).expand(step_args=fit_args())
        score = AutomixerStepOperator.partial(
            task_id="score", step="score", gpu=True, pool=GPU_POOL, map_index_template=ARGS_LABEL,
            doc_md="`automixer score --step N --shards A:B`: utilities of a range of corpus shards.",
        ).expand(step_args=shard_ranges())
        fit >> score

    regroup = step("regroup", "regroup", "Thresholds, groups, joint scores and weights -> `automixer.duckdb`.",
                   pool=DUCKDB_POOL, outlets=[WEIGHTS], outlet_metadata=weights_metadata)
    mix = step("mix", "mix", "Draw the token-budgeted mixture -> `mixture/`.",
               pool=DUCKDB_POOL, outlets=[MIXTURE], outlet_metadata=mixture_metadata)
    report = step("report", "report", "Summary of the run -> `report/`.")

    check_run_params() >> prepare >> train >> evaluate >> select >> samplers >> regroup >> mix >> report


automixer_dag = automixer()
