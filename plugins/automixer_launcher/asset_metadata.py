"""Small summaries of a run's outputs, attached to the DAG's asset events.

Read after the step that wrote them succeeded; only a few numbers and group weights, so
that the asset view in the UI says what a run produced without opening the files.
"""

from __future__ import annotations

import json
from pathlib import Path


def weights_metadata(run_dir: Path) -> dict:
    """After `regroup`: the weights table of automixer.duckdb (group -> weight, rows)."""
    import duckdb
    from automixer_ops.rundir import RunDir

    db = RunDir(run_dir).db
    con = duckdb.connect(str(db), read_only=True)
    try:
        rows = con.execute("SELECT group_name, weight, n_docs FROM weights ORDER BY group_name").fetchall()
        (scored,) = con.execute("SELECT coalesce(sum(n_scored), 0) FROM thresholds").fetchall()[0]
    finally:
        con.close()
    return {"run_dir": str(run_dir), "duckdb": str(db), "rows": len(rows), "scored_rows": int(scored),
            "weights": {g: round(float(w), 6) for g, w, _ in rows},
            "documents": {g: int(n) for g, _, n in rows}}


def mixture_metadata(run_dir: Path) -> dict:
    """After `mix`: rows (drawn documents), tokens and the realised share per group."""
    from automixer_ops.rundir import RunDir

    mixture = RunDir(run_dir).mixture
    summary = json.loads((mixture / "weights.json").read_text())
    return {"run_dir": str(run_dir), "path": str(mixture), "rows": summary["documents"],
            "tokens": summary["tokens"], "token_budget": summary["token_budget"],
            "underfilled": bool(summary.get("underfilled", False)),
            "weights": {g: round(v["share"], 6) for g, v in summary["groups"].items()}}
