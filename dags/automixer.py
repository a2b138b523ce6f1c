"""
# AutoMixer

Turns a proxy training run's checkpoints into an influence-weighted pretraining mixture
(docs/DESIGN.md). Every task runs one `automixer <step>` command on the run's config file;
the tasks pass only paths and small strings, the data stays in the run directory.

```
prepare -> train_proxy -> evaluate.find_checkpoints -> evaluate.checkpoint (mapped over checkpoints)
        -> evaluate.combine -> select -> samplers
        -> sampler_<i>.sampler -> sampler_<i>.fit + sampler_<i>.shards -> sampler_<i>.score (mapped)
        -> regroup -> mix -> report
```

**Samplers.** There is one task group per *sampler slot*, fixed when the DAG is parsed
(`AUTOMIXER_SAMPLER_SLOTS`, default 8: one per paper task, since k <= m). Slot *i* scores
with the *i*-th sampler of `selection.json` (sorted by step); a slot beyond the number of
samplers is skipped and `regroup` still runs (trigger rule: none failed, at least one success).
Each slot fits DataInf once (`score --step N --fit-only`), then scores the corpus shards in
ranges (`score --step N --shards A:B`): one map index per range, a few hundred at most.

**Params** (the trigger form): `config` (absolute path of the run config YAML, visible to
the workers and to pods / Slurm nodes); `tasks`, `proxy_preset`, `keep_fraction`,
`token_budget` and `overrides` become `--set section.key=value` on every command
(empty: the config file's value); `backend` runs the commands here (`local`), in pods
(`kubernetes`) or as Slurm jobs (`slurm`), with `backend_settings` (a YAML file,
plugins/automixer_launcher/backends.yaml documents it); `shards_per_task` batches shards.
Params are single-line text, `overrides` may set only the method's knobs (never a path:
automixer_launcher/param_checks.py lists them) and `backend_settings` must be a file of
$AUTOMIXER_BACKENDS_DIR; every task checks this again (a conf key outside the schema is not
validated by Airflow).

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

from airflow.sdk import Asset, Param, TaskGroup, TriggerRule, dag, task

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

# One task group per possible sampler: the default config's 8 target tasks (k <= m).
SAMPLER_SLOTS = int(os.environ.get("AUTOMIXER_SAMPLER_SLOTS", "8"))
# Per sampler, at most this many scoring map indices (shards are batched into ranges).
MAX_SCORE_TASKS = 200
GPU_POOL = "automixer_gpu"
DUCKDB_POOL = "automixer_duckdb"
PROXY_PRESETS = ["tiny", "25m", "50m", "75m", "350m", "1.5b"]
DEFAULT_CONFIG = os.environ.get("AUTOMIXER_CONFIG", str(HERE.parent / "configs" / "demo.yaml"))

WEIGHTS = Asset(name="automixer_weights", uri="x-automixer://weights", group="automixer")
MIXTURE = Asset(name="automixer_mixture", uri="x-automixer://mixture", group="automixer")

PARAMS = {
    "config": Param(DEFAULT_CONFIG, type="string", pattern=ABSOLUTE_PATH_PATTERN, minLength=2, title="Run config",
                    description="Absolute path of the run config YAML (configs/demo.yaml is the embedded "
                                "demo). Must be readable where the commands run."),
    "tasks": Param(None, type=["null", "array"], maxItems=SAMPLER_SLOTS, uniqueItems=True,
                   items={"type": "string", "pattern": NAME_PATTERN}, title="Target tasks",
                   description=f"lm-eval task names (tasks.targets), at most {SAMPLER_SLOTS}; "
                               "empty: the config's."),
    "proxy_preset": Param(None, type=["null", "string"], enum=[None, *PROXY_PRESETS], title="Proxy preset",
                          values_display={None: "(the config's)"},
                          description="proxy.preset; empty: the config's."),
    "keep_fraction": Param(None, type=["null", "number"], exclusiveMinimum=0, maximum=1,
                           title="Keep fraction", description="regroup.keep_fraction in (0, 1]; empty: the config's."),
    "token_budget": Param(None, type=["null", "integer"], minimum=1, title="Token budget",
                          description="mix.token_budget (tokens in the mixture); empty: the config's."),
    "overrides": Param([], type=["null", "array"], title="More overrides",
                       items={"type": "string", "pattern": OVERRIDE_PATTERN},
                       description="More config values as section.key=value (YAML value), for these keys only "
                                   f"(paths stay in the config file): {', '.join(OVERRIDABLE)}."),
    **backend_params(),
    "shards_per_task": Param(None, type=["null", "integer"], minimum=1, title="Shards per scoring task",
                             description=f"Corpus shards per score map index; empty: as few as keep each "
                                         f"sampler under {MAX_SCORE_TASKS} map indices."),
}

DEFAULT_ARGS = default_args()


def _run_config(params):
    """The run's Config as every command sees it (config file + the params' overrides)."""
    from automixer_launcher.cli_argv import config_overrides
    from automixer_ops.config import load_config
    from automixer_ops.errors import AutomixerError

    from airflow.sdk.exceptions import AirflowFailException

    try:
        return load_config(params["config"], config_overrides(params))
    except AutomixerError as e:
        raise AirflowFailException(f"run config: {e}") from None


def _samplers(cfg):
    from automixer_ops.errors import AutomixerError
    from automixer_ops.rundir import RunDir
    from automixer_ops.samplers import read_selection

    from airflow.sdk.exceptions import AirflowFailException

    try:
        return read_selection(RunDir(cfg.run_dir)).samplers
    except AutomixerError as e:
        raise AirflowFailException(str(e)) from None


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


@task(task_id="samplers")
def check_samplers(params=None) -> int:
    """How many samplers selection.json has; more than the DAG's slots is an error that says what to do."""
    from airflow.sdk.exceptions import AirflowFailException

    samplers = _samplers(_run_config(params))
    for i, s in enumerate(samplers):
        print(f"sampler_{i}: step {s.step}, alpha {s.alpha:.4f}, tasks {', '.join(s.tasks)}")
    if len(samplers) > SAMPLER_SLOTS:
        raise AirflowFailException(f"selection.json has {len(samplers)} samplers but the DAG has "
                                   f"{SAMPLER_SLOTS} slots; set AUTOMIXER_SAMPLER_SLOTS={len(samplers)} "
                                   "where the DAG is parsed")
    return len(samplers)


@task(task_id="sampler")
def sampler_step(slot: int, params=None) -> str:
    """This slot's sampler: its checkpoint step; skipped when selection.json has fewer samplers."""
    from airflow.sdk.exceptions import AirflowSkipException

    samplers = _samplers(_run_config(params))
    if slot >= len(samplers):
        raise AirflowSkipException(f"sampler slot {slot} is unused: selection.json has {len(samplers)} samplers")
    s = samplers[slot]
    print(f"sampler_{slot}: step {s.step}, alpha {s.alpha:.4f}, tasks {', '.join(s.tasks)}")
    return str(s.step)


@task(task_id="shards")
def shard_ranges(step: str, params=None) -> list[list[str]]:
    """`score --step N --shards A:B` arguments: the corpus shards in ranges, a few hundred at most."""
    from automixer_ops.rundir import RunDir

    from airflow.sdk.exceptions import AirflowFailException

    cfg = _run_config(params)
    run = RunDir(cfg.run_dir)
    n = len(run.corpus_shards())
    if n == 0:
        raise AirflowFailException(f"{run.corpus}: no part-*.parquet shards")
    per = params.get("shards_per_task") or max(1, math.ceil(n / MAX_SCORE_TASKS))
    ranges = [(a, min(a + per, n)) for a in range(0, n, per)]
    print(f"step {step}: {n} shards in {len(ranges)} scoring tasks of at most {per}")
    return [["--step", step, "--shards", f"{a}:{b}"] for a, b in ranges]


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
            task_id="checkpoint", step="evaluate", gpu=True, pool=GPU_POOL,
            doc_md="`automixer evaluate --step N`: one checkpoint on every target task (resumable).",
        ).expand(step_args=checkpoint_args())
        combine = step("combine", "evaluate", "`automixer evaluate`: the finished steps into "
                       "`eval/benchmark.parquet` and the influence validation sets.")
        per_checkpoint >> combine

    select = step("select", "select", "Each task's best checkpoint, the samplers and alpha -> `selection.json`.")
    samplers = check_samplers()

    slots = []
    for slot in range(SAMPLER_SLOTS):
        with TaskGroup(f"sampler_{slot}", tooltip=f"the sampler at position {slot} of selection.json") as group:
            sampler = sampler_step.override(doc_md=f"Sampler slot {slot}: its checkpoint step, or skip.")(slot)
            fit = step("fit", "score", "`automixer score --step N --fit-only`: DataInf lambda and r.",
                       step_args=["--step", sampler, "--fit-only"], gpu=True, pool=GPU_POOL)
            score = AutomixerStepOperator.partial(
                task_id="score", step="score", gpu=True, pool=GPU_POOL,
                doc_md="`automixer score --step N --shards A:B`: utilities of a range of corpus shards.",
            ).expand(step_args=shard_ranges(sampler))
            fit >> score
        slots.append(group)

    regroup = step("regroup", "regroup", "Thresholds, groups, joint scores and weights -> `automixer.duckdb`.",
                   pool=DUCKDB_POOL, trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
                   outlets=[WEIGHTS], outlet_metadata=weights_metadata)
    mix = step("mix", "mix", "Draw the token-budgeted mixture -> `mixture/`.",
               pool=DUCKDB_POOL, outlets=[MIXTURE], outlet_metadata=mixture_metadata)
    report = step("report", "report", "Summary of the run -> `report/`.")

    prepare >> train >> evaluate >> select >> samplers >> slots >> regroup >> mix >> report


automixer_dag = automixer()
