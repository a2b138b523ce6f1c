"""
# TiKMiX, dynamic

Trains the run config's `target` model for `mix.token_budget` tokens in stages, re-solving
the data mixture at every stage boundary from the model's own Group Influence
(docs/tikmix.md). One task group per stage; every task runs one `automixer tikmix-dynamic`
command on the run's config file:

```
stage_0.draw -> stage_0.train -> stage_1.measure -> stage_1.train -> ... -> stage_<S-1>.train
```

- **stage_0.draw** (`--stage 0 --measure-only`): stage 0's mixture, the corpus' natural token
  shares (a model at initialisation has no preferences to measure);
- **stage_s.measure** (`--stage s --measure-only`): Group Influence of every source on every
  target task at the target's checkpoint of the boundary, TiKMiX-D (or -M) from the previous
  stage's weights, and the stage's mixture drawn (each source read on where the last stage
  stopped);
- **stage_s.train** (`--stage s`): training continues to the stage's last step, optimizer,
  schedule and data position carried over; a checkpoint at the boundary.

The number of stages is the DAG's (`AUTOMIXER_TIKMIX_STAGES` where the DAG is parsed,
default 4): every command gets `--set tikmix.stages=<S>`, so the run config's own value does
not matter here. Outputs (default `<run>/tikmix/dynamic-<variant>/seed-<seed>/`): checkpoints,
`stages.json` and `stages.png` (the weights per stage, the Spearman correlation of the group
ranking between stages), `tikmix.duckdb` (tables group_influence, tikmix_weights).

**Params**: `config` (absolute path of the run config: a prepared run, i.e. `automixer`'s DAG or
`automixer prepare`, `train-proxy` and `evaluate` ran: its corpus and validation sets are used),
`variant` (d or m), `seed`, `overrides` (the method's knobs, as the `automixer` DAG), `backend`
and `backend_settings`. **Pools**: `automixer_gpu` for every task.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from airflow.sdk import Param, TaskGroup, dag

HERE = Path(__file__).resolve().parent
try:
    import automixer_launcher  # noqa: F401  (Airflow puts its plugins folder on sys.path)
except ImportError:  # dags/ and plugins/ side by side, as in this repository
    sys.path.append(str(HERE.parent / "plugins"))

from automixer_launcher import AutomixerStepOperator  # noqa: E402
from automixer_launcher.dag_params import backend_params, default_args  # noqa: E402
from automixer_launcher.param_checks import ABSOLUTE_PATH_PATTERN, OVERRIDABLE, OVERRIDE_PATTERN  # noqa: E402

STAGES = int(os.environ.get("AUTOMIXER_TIKMIX_STAGES", "4"))
GPU_POOL = "automixer_gpu"
DEFAULT_CONFIG = os.environ.get("AUTOMIXER_CONFIG", str(HERE.parent / "configs" / "demo.yaml"))

PARAMS = {
    "config": Param(DEFAULT_CONFIG, type="string", pattern=ABSOLUTE_PATH_PATTERN, minLength=2, title="Run config",
                    description="Absolute path of a prepared run's config YAML (corpus, validation sets, `target`, "
                                "`tikmix`). Must be readable where the commands run."),
    "variant": Param("d", type="string", enum=["d", "m"], title="Variant",
                     description="TiKMiX-D (the influence-maximising mixture) or TiKMiX-M (probes, LightGBM, search) "
                                 "at each boundary."),
    "seed": Param(0, type="integer", exclusiveMinimum=-1, title="Seed",
                  description="The target's initialisation and the draws' seed."),
    "overrides": Param([], type=["null", "array"], title="More overrides",
                       items={"type": "string", "pattern": OVERRIDE_PATTERN},
                       description="Config values as section.key=value for these keys only: "
                                   f"{', '.join(OVERRIDABLE)}."),
    **backend_params(),
}


def stage_args(stage: int, measure_only: bool) -> list[str]:
    """`tikmix-dynamic` arguments of one task (templated: the variant and seed come from the run's params)."""
    return ["--set", f"tikmix.stages={STAGES}", "--variant", "{{ params.variant }}", "--seed", "{{ params.seed }}",
            "--stage", str(stage), *(["--measure-only"] if measure_only else [])]


@dag(dag_id="automixer_tikmix", schedule=None, catchup=False, max_active_runs=1, params=PARAMS,
     default_args=default_args(), doc_md=__doc__, tags=["automixer", "tikmix"])
def automixer_tikmix():
    previous = None
    for s in range(STAGES):
        with TaskGroup(f"stage_{s}", tooltip=f"stage {s} of {STAGES}: its mixture, then its training") as group:
            measure = AutomixerStepOperator(
                task_id="draw" if s == 0 else "measure", step="tikmix-dynamic", step_args=stage_args(s, True),
                gpu=True, pool=GPU_POOL,
                doc_md=("Stage 0's mixture: the corpus' natural token shares." if s == 0 else
                        f"Group Influence at the boundary checkpoint, TiKMiX from stage {s - 1}'s weights, and "
                        f"stage {s}'s mixture."))
            train = AutomixerStepOperator(
                task_id="train", step="tikmix-dynamic", step_args=stage_args(s, False), gpu=True, pool=GPU_POOL,
                doc_md=f"Training through stage {s} (resumes at the boundary checkpoint).")
            measure >> train
        if previous is not None:
            previous >> group
        previous = group


automixer_tikmix_dag = automixer_tikmix()
