"""How much do a sampler's influence scores depend on its validation documents? A split-half check.

The last checkpoint of a base run scores the corpus for all of the run's tasks three times: against the
first half of `tasks.docs.validation`, against the second half, and against all of it. If the halves
rank the corpus alike, the validation set is large enough for the ranking regroup uses (its top
keep_fraction); if not, the mixture follows the particular validation documents. Written for the demo
experiment (experiments/demo/README.md); a few minutes on 2 cores:

    .venv/bin/python scripts/influence_split_half.py -c configs/demo.yaml --out experiments/demo/influence_split_half.md

The runs go to <run root>/<run id>-split-*/ (the base run's corpus, tokenizer and checkpoints linked).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from automixer_ops.checkpoints import list_checkpoints  # noqa: E402
from automixer_ops.config import load_config  # noqa: E402
from automixer_ops.evaluate import write_validation_sets  # noqa: E402
from automixer_ops.experiment import _link  # noqa: E402
from automixer_ops.influence.score import score  # noqa: E402
from automixer_ops.rundir import RunDir, atomic_write_text, write_run_marker  # noqa: E402
from automixer_ops.samplers import Sampler, Selection  # noqa: E402
from automixer_ops.tasks import load_checked_tasks  # noqa: E402


def scored_run(config: Path, name: str, docs: list[int], base: RunDir, step: int, log) -> RunDir:
    base_cfg = load_config(config)
    cfg = load_config(config, [f"run.id={base_cfg.run.id}-split-{name}", f"tasks.docs.validation={json.dumps(docs)}"])
    run = RunDir(cfg.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    write_run_marker(run.path, run.path.name)
    for part in ("corpus", "tokenizer", "checkpoints"):
        _link(base.path / part, run.path / part)
    _, tasks, ranges = load_checked_tasks(cfg, run.eval / "tasks")
    write_validation_sets(cfg, run, tasks, ranges, log)
    selection = Selection({}, [Sampler(step=step, tasks=sorted(tasks), alpha=1.0)])
    atomic_write_text(run.selection, selection.to_json())
    score(cfg, log=log)
    return run


def main() -> int:
    import duckdb

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", required=True, type=Path, help="the base run config (evaluated and trained)")
    ap.add_argument("--out", type=Path, help="write the result as Markdown here")
    args = ap.parse_args()
    cfg = load_config(args.config)
    base = RunDir(cfg.run_dir)
    step = max(list_checkpoints(base))
    a, b = cfg.tasks.docs.validation
    mid = (a + b) // 2
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    runs = {name: scored_run(args.config, name, docs, base, step, log)
            for name, docs in (("a", [a, mid]), ("b", [mid, b]), ("full", [a, b]))}
    keep = cfg.regroup.keep_fraction
    con = duckdb.connect()
    for name, run in runs.items():
        parts = [str(p) for p in run.score_parts([step])]
        con.execute(f"""CREATE TABLE s_{name} AS SELECT id, utility,
                        rank() OVER (ORDER BY utility DESC, id) AS r FROM read_parquet($p)""", {"p": parts})
    n = con.execute("SELECT count(*) FROM s_full").fetchone()[0]
    k = -(-int(keep * 10**9) * n // 10**9)

    def compare(x: str, y: str) -> tuple[float, float]:
        rho = con.execute(f"SELECT corr(x.r, y.r) FROM s_{x} x JOIN s_{y} y USING (id)").fetchone()[0]
        both = con.execute(f"""SELECT count(*) FROM s_{x} x JOIN s_{y} y USING (id)
                               WHERE x.r <= {k} AND y.r <= {k}""").fetchone()[0]
        return rho, both / k

    rows = [("half a vs half b", *compare("a", "b")), ("half a vs all", *compare("a", "full")),
            ("half b vs all", *compare("b", "full"))]
    lines = [f"# Influence scores against halves of the validation set (step {step}, all {len(cfg.tasks.names())} "
             "tasks)", "",
             f"`{' '.join(sys.argv)}`; corpus of {n:,} documents; halves: validation documents [{a}, {mid}) and "
             f"[{mid}, {b}) of each task ({mid - a} and {b - mid} per task), all: [{a}, {b}).", "",
             f"| pair | Spearman of the utilities | share of the top {keep:g} (k = {k:,}) kept by both |",
             "|---|---:|---:|"]
    lines += [f"| {name} | {rho:.3f} | {share:.3f} |" for name, rho, share in rows]
    lines += ["", f"Two independent random top-{keep:g} sets would share {keep:.3f} of their documents."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
