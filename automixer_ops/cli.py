"""`automixer <step>`: run any pipeline step alone, from a shell, a pod or an Airflow task.

Every step takes the run's config file (`--config`) and optional `--set section.key=value`
overrides. Errors in inputs or settings print one line naming the file, line, field or
key at fault and exit with status 2; nothing half-written is left behind. A condition that
passes by itself (another process holds a lock the step needs, a fit is running) exits 75
(EX_TEMPFAIL): the Airflow launcher retries those, and fails the others without retrying.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from automixer_ops import __version__
from automixer_ops.errors import EXIT_BAD_INPUT, EXIT_TRANSIENT, AutomixerError, TransientError

EXIT_STATUSES = (f"exit status: 0 done; {EXIT_BAD_INPUT} bad input or settings (one line names the file, line, "
                 f"field or key; nothing half-written is left); {EXIT_TRANSIENT} transient (another process holds "
                 "what the step needs: retry later)")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", required=True, help="run config YAML (e.g. configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (YAML syntax); repeatable")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _record_config(args: argparse.Namespace) -> None:
    """Keep <run>/config.yaml the resolved configuration the run's latest step used."""
    from automixer_ops.rundir import atomic_write_text

    cfg = _load(args)
    if cfg.run_dir.is_dir():
        atomic_write_text(cfg.run_dir / "config.yaml", cfg.dump_yaml())


def _load(args: argparse.Namespace):
    from automixer_ops.config import load_config

    return load_config(args.config, args.overrides)


def cmd_prepare(args: argparse.Namespace) -> int:
    from automixer_ops.prepare import prepare, print_summary

    cfg = _load(args)
    summary = prepare(cfg, force=args.force, log=_log)
    print_summary(summary)
    return 0


def cmd_train_proxy(args: argparse.Namespace) -> int:
    from automixer_ops.proxy import train_proxy

    ckpts = train_proxy(_load(args), log=_log)
    print(f"checkpoints: {', '.join(f'step-{s}' for s in ckpts)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from automixer_ops.evaluate import evaluate

    path = evaluate(_load(args), log=_log, step=args.step)
    print(f"{'checkpoint results' if args.step is not None else 'benchmark table'}: {path}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from automixer_ops.rundir import RunDir
    from automixer_ops.samplers import format_table1
    from automixer_ops.selection import select

    cfg = _load(args)
    selection = select(cfg.run_dir, metric=cfg.select.metric, noise_z=cfg.select.noise_z)
    run = RunDir(cfg.run_dir)
    print(format_table1(selection))
    print(f"\nselection: {run.selection}\nheatmap: {run.heatmap}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from automixer_ops.influence.score import score

    outs = score(_load(args), step=args.step, shards=args.shards, fit_only=args.fit_only, force=args.force,
                 log=_log)
    print("\n".join(f"scores: {o}" for o in outs))
    return 0


def cmd_regroup(args: argparse.Namespace) -> int:
    from automixer_ops.regroup import regroup
    from automixer_ops.sqlrun import format_weights, weights_table

    db = regroup(_load(args), log=_log)
    print(format_weights(weights_table(db)))
    print(f"\nDuckDB: {db}  (tables: samplers, score_stats, thresholds, joint_units, joint_scale, group_stats, "
          "weights, provenance; views: joint_scores, groups)")
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from automixer_ops.mix import mix

    out = mix(_load(args), log=_log)
    print(f"mixture: {out}/part-*.parquet\nweights: {out}/weights.json\nMegatron blend: {out}/blend.txt")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from automixer_ops.report import report

    path, text = report(_load(args), log=_log)
    print(text)
    return 0


def cmd_train_target(args: argparse.Namespace) -> int:
    from automixer_ops.rundir import RunDir
    from automixer_ops.train_target import train_target

    cfg = _load(args)
    run = RunDir(cfg.run_dir)
    seed = cfg.run.seed if args.seed is None else args.seed
    mixture = Path(args.mixture).resolve() if args.mixture else run.mixture
    out = Path(args.out).resolve() if args.out else run.path / "targets" / "mixture" / f"seed-{seed}"
    ckpts = train_target(mixture, out, cfg.target, seed, run.tokenizer, log=_log)
    print(f"target checkpoints: {', '.join(str(out / 'checkpoints' / f'step-{s}') for s in ckpts)}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from automixer_ops.experiment import run_experiment
    from automixer_ops.experiment_config import load_experiment

    exp = load_experiment(args.config)
    out = run_experiment(exp, args.stage, args.method, args.seed, log=_log)
    if out is not None:
        table, plot = out
        print(table.read_text(encoding="utf-8"))
        print(f"table: {table}\nplot: {plot}\nresults: {table.parent / 'results.parquet'}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from automixer_ops.config import reference_markdown

    if args.reference:
        print(reference_markdown())
        return 0
    if not args.config:
        raise AutomixerError("config: give --config FILE to validate and print, or --reference")
    print(_load(args).dump_yaml(), end="")
    return 0


# The pipeline steps in run order: (subcommand, handler, one-line help, description).
STEPS = [
    ("prepare", cmd_prepare, "validate and tokenize the corpus into corpus/part-*.parquet",
     "Read the corpus (JSONL, Parquet or a datasets directory), train or load the tokenizer, and write "
     "tokenized shards into the run directory."),
    ("train-proxy", cmd_train_proxy, "train the proxy model, saving checkpoints/step-<N> (or link yours)",
     "Train the Llama proxy on the prepared corpus and save a checkpoint every proxy.save_every steps; resumes "
     "from the latest complete checkpoint. With proxy.checkpoints, links your existing checkpoints instead."),
    ("evaluate", cmd_evaluate, "lm-eval every checkpoint on every target task -> eval/benchmark.parquet",
     "Run lm-evaluation-harness on each checkpoint for each target task, resuming per checkpoint, and write "
     "the influence validation sets."),
    ("select", cmd_select, "pick each task's best checkpoint, the samplers and alpha -> selection.json",
     "Choose the best checkpoint per task (acc_norm, else acc; ties to the earliest step), group them into "
     "samplers with blending factors, print the Table 1 analogue and plot the benchmark heatmap."),
    ("score", cmd_score, "DataInf utility of every document per sampler -> scores/step=<N>/part-*.parquet",
     "Fit DataInf (lambda, r) on the embedding and output layers of a sampler's checkpoint against its tasks' "
     "validation loss, then score the corpus shards (utility = -influence; positive lowers the loss). Resumes: "
     "finished fit passes and shards are skipped."),
    ("regroup", cmd_regroup, "thresholds, groups, joint scores and weights in DuckDB -> automixer.duckdb",
     "Run the SQL of sql/ on the samplers' score shards: per-sampler top keep_fraction groups, the "
     "alpha-weighted joint score, each group's influence density and the group weights."),
    ("mix", cmd_mix, "draw a token-budgeted mixture -> mixture/part-*.parquet, weights.json, blend.txt",
     "Allocate mix.token_budget tokens by the group weights (caps and max_repeats respected, remainders "
     "redistributed) and write the drawn documents, the realised weights and a Megatron-LM blend."),
    ("train-target", cmd_train_target, "train a fresh target model on a mixture -> targets/.../checkpoints",
     "Train a model of the config's `target` settings (a preset, which may differ from the proxy's) on a mixture "
     "directory (mix's or any method's), for the mixture's token budget, in the mixture's order; resumes exactly "
     "from its latest checkpoint."),
    ("report", cmd_report, "check DESIGN §3's invariants in SQL and summarise the run -> report/summary.md",
     "Run the invariant queries of sql/checks/ on automixer.duckdb and write report/summary.md (Table 1, "
     "weights, the mixture per group, the invariants); fails if an invariant does not hold."),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="automixer",
        description="AutoMixer: turn a proxy run's checkpoints into an influence-weighted data mixture.",
        epilog=EXIT_STATUSES)
    parser.add_argument("--version", action="version", version=f"automixer {__version__}")
    steps = parser.add_subparsers(dest="step", metavar="<step>", required=True)

    for name, func, short, long in STEPS:
        p = steps.add_parser(name, help=short, description=long)
        _add_config_args(p)
        if name == "prepare":
            p.add_argument("--force", action="store_true",
                           help="rebuild even if the run already has a prepared corpus")
        if name == "score":
            p.add_argument("--step", type=int, help="the sampler's checkpoint step (default: every sampler)")
            what = p.add_mutually_exclusive_group()
            what.add_argument("--fit-only", action="store_true", help="fit lambda and r, score nothing")
            what.add_argument("--shards", metavar="START:END",
                              help="score only corpus shards START..END-1 (0-based; START: to the last, "
                                   "or one index); needs a finished fit")
            p.add_argument("--force", action="store_true", help="refit even if a fit with the same inputs exists")
        if name == "train-target":
            p.add_argument("--mixture", help="mixture directory (default: the run's mixture/)")
            p.add_argument("--out", help="where the target's checkpoints/ and log go "
                                         "(default: <run>/targets/mixture/seed-<seed>)")
            p.add_argument("--seed", type=int, help="initialisation seed (default: run.seed)")
        if name == "evaluate":
            p.add_argument("--step", type=int, help="evaluate only the checkpoint of this step (resumable); "
                                                    "a later run without --step combines the table")
        p.set_defaults(func=func)

    p = steps.add_parser("experiment", help="methods x seeds: mixtures, target models, the comparison table",
                         description="Run an experiment file (docs: README 'Does the mixture help?'): the base "
                                     "run's pipeline, every method's mixture per seed, a target model on each, "
                                     "its evaluation on the held-out test documents, and table.md / plot.png. "
                                     "Every stage resumes; without --stage, all of them in order.")
    p.add_argument("--config", "-c", required=True, help="experiment YAML (e.g. configs/experiment_demo.yaml)")
    p.add_argument("--stage", choices=["prepare", "run", "table"], help="one stage only (the Airflow DAG's tasks)")
    p.add_argument("--method", help="with --stage run: one method's unit")
    p.add_argument("--seed", type=int, help="with --stage run: one seed's unit")
    p.set_defaults(func=cmd_experiment)

    p = steps.add_parser("config", help="validate a config and print it resolved, or print the reference",
                         description="Validate a run config and print it with every default filled in and "
                                     "paths resolved; --reference prints every setting with its doc.")
    p.add_argument("--config", "-c", help="run config YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--reference", action="store_true", help="print all settings as Markdown")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not sys.stderr.isatty():
        # Progress bars (tqdm: lm-eval, transformers) are noise in logs; tqdm reads this on import.
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        rc = args.func(args)
        if rc == 0 and args.step not in ("config", "experiment"):
            _record_config(args)
        return rc
    except TransientError as e:
        print(f"error (transient, retry later): {one_line(str(e))}", file=sys.stderr)
        return EXIT_TRANSIENT
    except AutomixerError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def one_line(message: str) -> str:
    """A message as one log line: library errors quoted in it may hold newlines."""
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


if __name__ == "__main__":
    raise SystemExit(main())
