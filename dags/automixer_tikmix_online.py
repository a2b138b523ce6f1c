"""
# AutoMixer: TiKMiX online

Watches the checkpoint directory of **your own training run** and, for each new complete checkpoint,
publishes the next stage's mixture weights (docs/tikmix.md, "Online mode"). One task runs

```
automixer tikmix-online -c CONFIG --watch WATCH_DIR --out OUT_DIR --variant d|m
```

which measures each new checkpoint's Group Influence, solves TiKMiX-D (or -M) from the latest published
weights and writes `OUT_DIR/versions/v<NNNN>/` (weights.json, blend.txt for Megatron-LM, domain_weights.json
in Olmix's format), `OUT_DIR/tikmix.duckdb` and `OUT_DIR/latest`. A checkpoint already published publishes
nothing, so the schedule can run as often as you like: a run that finds no new checkpoint ends **skipped**
and emits no asset event; one that publishes emits `automixer_tikmix_weights` with the versions it published
and the latest weights in the event's extra (a trainer's DAG can be scheduled on that asset).

**Schedule**: `$AUTOMIXER_TIKMIX_ONLINE_SCHEDULE` (a cron expression, default every 10 minutes; `none`: only
when triggered). No catch-up, one run at a time; paused when first created: set the Params' defaults
(`$AUTOMIXER_TIKMIX_CONFIG`, `$AUTOMIXER_TIKMIX_WATCH_DIR`, `$AUTOMIXER_TIKMIX_OUT_DIR`) before unpausing,
since scheduled runs use them.

**Params**: `config` (absolute path of the prepared AutoMixer run's config: its corpus gives the groups, its
valsets the tasks); `watch_dir` (where your trainer saves checkpoints: HF checkpoint directories named with
their step, e.g. `step-1000` or `checkpoint-1000`); `out_dir` (where versions go; not inside watch_dir);
`variant`; `backend` and `backend_settings` as in the `automixer` DAG. Paths must be readable where the
command runs (the worker, a pod or a Slurm node).

**Pool**: `automixer_gpu` (as the `automixer` DAG's GPU steps; create it before the first run:
`airflow pools set automixer_gpu 1 "GPU steps"`).

**Retries**: exit 75 (another scan holds `OUT_DIR/.lock`) is retried; bad input fails at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from airflow.sdk import Asset, Param, dag

HERE = Path(__file__).resolve().parent
try:
    import automixer_launcher  # noqa: F401  (Airflow puts its plugins folder on sys.path)
except ImportError:  # dags/ and plugins/ side by side, as in this repository
    sys.path.append(str(HERE.parent / "plugins"))

from automixer_launcher import AutomixerStepOperator  # noqa: E402
from automixer_launcher.dag_params import backend_params, default_args  # noqa: E402
from automixer_launcher.param_checks import ABSOLUTE_PATH_PATTERN  # noqa: E402

ONLINE_RUNS = HERE.parent / "runs" / "tikmix-online"
DEFAULT_CONFIG = os.environ.get("AUTOMIXER_TIKMIX_CONFIG",
                                os.environ.get("AUTOMIXER_CONFIG", str(HERE.parent / "configs" / "demo.yaml")))
DEFAULT_WATCH = os.environ.get("AUTOMIXER_TIKMIX_WATCH_DIR", str(ONLINE_RUNS / "checkpoints"))
DEFAULT_OUT = os.environ.get("AUTOMIXER_TIKMIX_OUT_DIR", str(ONLINE_RUNS / "weights"))
SCHEDULE = os.environ.get("AUTOMIXER_TIKMIX_ONLINE_SCHEDULE", "*/10 * * * *")
GPU_POOL = "automixer_gpu"  # the automixer DAG's: a scan measures Group Influence on the GPU

TIKMIX_WEIGHTS = Asset(name="automixer_tikmix_weights", uri="x-automixer://tikmix-weights", group="automixer")

PARAMS = {
    "config": Param(DEFAULT_CONFIG, type="string", pattern=ABSOLUTE_PATH_PATTERN, minLength=2, title="Run config",
                    description="Absolute path of the prepared run's config YAML (corpus, tokenizer, valsets, "
                                "tikmix settings). Must be readable where the command runs."),
    "watch_dir": Param(DEFAULT_WATCH, type="string", pattern=ABSOLUTE_PATH_PATTERN, minLength=2,
                       title="Checkpoint directory",
                       description="Absolute path of the directory your trainer saves checkpoints into "
                                   "(step-<N>/, checkpoint-<N>/, ...)."),
    "out_dir": Param(DEFAULT_OUT, type="string", pattern=ABSOLUTE_PATH_PATTERN, minLength=2, title="Output directory",
                     description="Absolute path where versions/, tikmix.duckdb, latest and weights.json go."),
    "variant": Param("d", type="string", enum=["d", "m"], title="TiKMiX variant",
                     values_display={"d": "TiKMiX-D (solve)", "m": "TiKMiX-M (probes + regressors)"}),
    **backend_params(),
}


def online_metadata(out_dir: Path) -> dict:
    """The asset event's extra: what this scan published (OUT_DIR/last_scan.json) and the latest weights."""
    import json

    scan = json.loads((out_dir / "last_scan.json").read_text(encoding="utf-8"))
    extra = {"out_dir": str(out_dir), "published": [p["version"] for p in scan["published"]],
             "checkpoints": {p["version"]: p["checkpoint"] for p in scan["published"]}}
    if scan["latest"]:
        latest = json.loads((out_dir / scan["latest"]["path"] / "weights.json").read_text(encoding="utf-8"))
        extra.update(latest=scan["latest"]["version"], weights={g: round(w, 6) for g, w in latest["weights"].items()})
    return extra


class OnlineStepOperator(AutomixerStepOperator):
    """`automixer tikmix-online`: its outputs (and Slurm logs) live in the out_dir Param, not the run directory;
    a scan that published nothing ends skipped, so that no asset event fires."""

    def work_dir(self, params) -> Path:
        return Path(params["out_dir"])

    def _record_outputs(self, context) -> None:
        from airflow.sdk.exceptions import AirflowSkipException

        super()._record_outputs(context)
        if not context["outlet_events"][TIKMIX_WEIGHTS].extra.get("published"):
            raise AirflowSkipException("no new checkpoint: nothing published")


@dag(dag_id="automixer_tikmix_online", schedule=None if SCHEDULE.strip().lower() in ("", "none") else SCHEDULE,
     catchup=False, max_active_runs=1, is_paused_upon_creation=True, params=PARAMS, default_args=default_args(),
     doc_md=__doc__, tags=["automixer", "tikmix"])
def automixer_tikmix_online():
    OnlineStepOperator(
        task_id="publish", step="tikmix-online", gpu=True, pool=GPU_POOL,
        step_args=["--watch", "{{ params.watch_dir }}", "--out", "{{ params.out_dir }}",
                   "--variant", "{{ params.variant }}"],
        outlets=[TIKMIX_WEIGHTS], outlet_metadata=online_metadata,
        doc_md="`automixer tikmix-online`: Group Influence and the solve for each new checkpoint of watch_dir, "
               "one version each in out_dir; skipped when there is none.")


automixer_tikmix_online_dag = automixer_tikmix_online()
