#!/usr/bin/env python3
"""Run the AutoMixer Airflow DAG end to end on one machine, with no scheduler or webserver.

    .venv/bin/python scripts/dag_demo.py                     # configs/demo.yaml (what `make demo` runs)
    .venv/bin/python scripts/dag_demo.py --config my.yaml --conf '{"token_budget": 200000}'

A fresh Airflow home with a SQLite metadata DB is kept under the repository (.airflow_demo/,
git-ignored): `airflow db migrate` runs once when the DB is new, the two pools the DAG
uses are created, then `dag.test()` runs every task in this process in dependency order
(the `automixer` commands themselves run as subprocesses: the `local` backend). At the end
it prints each task's state and where the weights, the DuckDB file and the run directory are.
Exit status: 0 when the DAG run succeeded, 2 for params the DAG's schema rejects, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POOLS = {"automixer_gpu": (1, "GPU steps: train-proxy, evaluate, score (one per GPU)"),
         "automixer_duckdb": (1, "The single writer of automixer.duckdb and mixture/ (regroup, mix)")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="run config YAML")
    p.add_argument("--conf", default="{}",
                   help='DAG run params as JSON, e.g. \'{"token_budget": 200000}\' (the DAG\'s Params form); '
                        'shards_per_task defaults to 3 here')
    p.add_argument("--airflow-home", default=str(ROOT / ".airflow_demo"), help="Airflow home (SQLite DB, logs)")
    p.add_argument("--dag", default="automixer", help="the DAG to run (automixer_tikmix: the dynamic TiKMiX run "
                                                      "on the same config; its conf takes no shards_per_task)")
    return p.parse_args(argv)


def airflow_env(home: Path) -> dict[str, str]:
    """The environment Airflow reads at import: set before the first `import airflow`."""
    return {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"),
        # The run's commands: offline Hugging Face with the project's cache, no progress bars.
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": os.environ.get("HF_HOME", str(ROOT / ".hf_home")),
        "TQDM_DISABLE": "1",
        # dag.test() waits out a retry's delay; in a demo a failure should show at once.
        "AUTOMIXER_TASK_RETRIES": os.environ.get("AUTOMIXER_TASK_RETRIES", "0"),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = Path(args.airflow_home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.update(airflow_env(home))
    # On one CPU the tasks run one after the other and each scoring task starts a process
    # (torch import, model load): 3 shards per task instead of 1 saves minutes on the demo.
    conf = {"config": str(Path(args.config).resolve()), **({"shards_per_task": 3} if args.dag == "automixer" else {}),
            **json.loads(args.conf)}

    started = time.monotonic()
    import airflow

    # Migrate once per Airflow version: the marker is written only after a migration finished.
    migrated = home / f".migrated-{airflow.__version__}"
    if not migrated.exists():
        print(f"== airflow db migrate ({home / 'airflow.db'})", flush=True)
        subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], check=True,
                       stdout=subprocess.DEVNULL)
        migrated.touch()

    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.pool import Pool

    for name, (slots, description) in POOLS.items():
        Pool.create_or_update_pool(name, slots=slots, description=description, include_deferred=False)

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    if bag.import_errors:
        for path, err in bag.import_errors.items():
            print(f"DAG import error in {path}:\n{err}", file=sys.stderr)
        return 1
    dag = bag.get_dag(args.dag)
    if dag is None:
        print(f"error: no DAG {args.dag!r} in {ROOT / 'dags'} (DAGs: {', '.join(sorted(bag.dag_ids))})", file=sys.stderr)
        return 2
    print(f"== dag.test() with params {json.dumps(conf)}", flush=True)
    from airflow.sdk.exceptions import ParamValidationError

    try:
        run = dag.test(run_conf=conf)
    except ParamValidationError as e:  # checked against the DAG's Params schema before any task runs
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2

    states = {}
    for ti in sorted(run.get_task_instances(), key=lambda t: (t.task_id, t.map_index)):
        states.setdefault(ti.task_id, []).append(str(ti.state))
    print("\n== task states")
    for task_id, s in states.items():
        counts = {x: s.count(x) for x in sorted(set(s))}
        print(f"  {task_id:24s} " + ", ".join(f"{k} x{v}" if v > 1 else k for k, v in counts.items()))

    from automixer_ops.config import load_config  # after the run: the package is only needed here
    from automixer_ops.rundir import RunDir

    rd = RunDir(load_config(conf["config"], _overrides(conf)).run_dir)
    print(f"\n== DAG run {run.run_id}: {run.state} in {time.monotonic() - started:.0f} s")
    print(f"run directory: {rd.path}")
    if args.dag != "automixer":
        print(f"Airflow home:  {home}  (task logs under logs/)")
        return 0 if str(run.state) in ("success", "DagRunState.SUCCESS") else 1
    print(f"weights:       {rd.mixture / 'weights.json'}")
    print(f"DuckDB:        {rd.db}  (tables: weights, groups, joint_scores, ...)")
    print(f"mixture:       {rd.mixture}/part-*.parquet")
    print(f"report:        {rd.report}")
    print(f"Airflow home:  {home}  (task logs under logs/)")
    return 0 if str(run.state) in ("success", "DagRunState.SUCCESS") else 1


def _overrides(conf: dict) -> list[str]:
    sys.path.insert(0, str(ROOT / "plugins"))
    from automixer_launcher.cli_argv import config_overrides

    return config_overrides(conf)


if __name__ == "__main__":
    raise SystemExit(main())
