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

    path, text = report(_load(args), log=_log,
                        experiment=Path(args.experiment).resolve() if args.experiment else None)
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


def cmd_group_influence(args: argparse.Namespace) -> int:
    from automixer_ops.rundir import RunDir, fingerprint
    from automixer_ops.tikmix.group_influence import group_influence, record
    from automixer_ops.tikmix.method import DB_NAME, checkpoint_step, gi_settings

    cfg = _load(args)
    run = RunDir(cfg.run_dir)
    if args.checkpoint:
        ckpt, step = Path(args.checkpoint).resolve(), None
        label = f"checkpoint:{ckpt}"
        name = f"{ckpt.parent.name}-{ckpt.name}-{fingerprint(str(ckpt))[:8]}"  # two runs' step-100 apart
    else:
        if args.step is not None:
            cfg.tikmix.checkpoint = args.step
        step, ckpt = checkpoint_step(cfg, run)
        label, name = f"proxy:step-{step}", f"step={step}"
    settings = gi_settings(cfg, seed=cfg.run.seed)
    work = run.path / "tikmix"
    out = work / "gi" / f"{name}-{settings.estimate}"
    gi = group_influence(run, ckpt, list(cfg.tasks.names()), settings, out, log=_log)
    recorded = record(work / DB_NAME, out, label, step)
    import duckdb

    # Groups down, tasks across (higher = more helpful); the stderr and counts are in the table.
    rows = duckdb.sql("SELECT group_name, task, gi FROM read_parquet($p)", params={"p": str(gi)}).fetchall()
    tasks, groups = sorted({r[1] for r in rows}), sorted({r[0] for r in rows})
    value = {(g, t): v for g, t, v in rows}
    width = max(12, *(len(t) + 2 for t in tasks))
    print(f"{'group':<16}" + "".join(f"{t:>{width}}" for t in tasks))
    for g in groups:
        print(f"{g:<16}" + "".join(f"{value.get((g, t), float('nan')):>{width}.4g}" for t in tasks))
    print(f"group influence: {gi} ({recorded} rows in {work / DB_NAME}, table group_influence)")
    return 0


def cmd_tikmix(args: argparse.Namespace) -> int:
    from automixer_ops.rundir import RunDir
    from automixer_ops.tikmix.method import tikmix_mixture

    cfg = _load(args)
    run = RunDir(cfg.run_dir)
    seed = cfg.run.seed if args.seed is None else args.seed
    out = Path(args.out).resolve() if args.out else run.path / "tikmix" / f"mixture-{args.variant}"
    budget = cfg.mix.token_budget
    tikmix_mixture(cfg, args.variant, out, budget, seed, run.path / "tikmix", log=_log)
    print(f"mixture: {out} ({budget:,} tokens; weights.json, blend.txt, part-*.parquet)")
    return 0


def cmd_tikmix_dynamic(args: argparse.Namespace) -> int:
    from automixer_ops.rundir import RunDir
    from automixer_ops.tikmix.dynamic import train_dynamic

    cfg = _load(args)
    run = RunDir(cfg.run_dir)
    seed = cfg.run.seed if args.seed is None else args.seed
    out = Path(args.out).resolve() if args.out else run.path / "tikmix" / f"dynamic-{args.variant}" / f"seed-{seed}"
    ckpts = train_dynamic(cfg, args.variant, out, cfg.target, cfg.mix.token_budget, seed, log=_log,
                          until_stage=args.stage, measure_only=args.measure_only)
    print(f"stages: {out / 'stages.json'} (plot {out / 'stages.png'}); checkpoints: "
          f"{', '.join(f'step-{s}' for s in sorted(ckpts)) or 'none yet'}")
    return 0


def cmd_tikmix_online(args: argparse.Namespace) -> int:
    from automixer_ops.tikmix.online import LATEST, publish_new_checkpoints

    out = Path(args.out).resolve()
    published = publish_new_checkpoints(_load(args), Path(args.watch).resolve(), out, args.variant, log=_log,
                                        settle_seconds=args.settle)
    for row in published:
        print(f"published {row['name']}: {row['checkpoint']} (step {row['step']}) -> "
              f"{out / 'versions' / row['name']} (weights.json, blend.txt, domain_weights.json)")
    print(f"latest: {out / LATEST}" if published else "nothing new")
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
    ("report", cmd_report, "check DESIGN §3's invariants in SQL; summarise the run -> report/index.html, summary.md",
     "Run the invariant queries of sql/checks/ on automixer.duckdb and write report/summary.md (Table 1, "
     "weights, the mixture per group, the invariants) and report/index.html, one self-contained page with "
     "plots (docs/report.md); fails if an invariant does not hold, after writing both."),
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
        if name == "report":
            p.add_argument("--experiment", metavar="DIR",
                           help="an experiment directory (e.g. experiments/demo): its table and plot go on the page")
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

    p = steps.add_parser("group-influence", help="TiKMiX's Group Influence of every group on every task at a "
                                                 "checkpoint -> tikmix/gi/, table group_influence",
                         description="Group Influence (docs/tikmix.md): the token-weighted mean DataInf utility of each "
                                     "group (tikmix.group_by) for each target task, fit and scored for all tasks in "
                                     "the same passes; from a per-group sample (tikmix.estimate: sample) or the whole "
                                     "corpus (full). Recorded in <run>/tikmix/tikmix.duckdb.")
    _add_config_args(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--step", type=int, help="a proxy checkpoint step (default: tikmix.checkpoint, else the last)")
    where.add_argument("--checkpoint", metavar="DIR", help="any checkpoint directory of the run's model family "
                                                           "(e.g. a target model's) with the run's tokenizer")
    p.set_defaults(func=cmd_group_influence)

    p = steps.add_parser("tikmix", help="a static TiKMiX-D or -M mixture from the proxy -> tikmix/mixture-<variant>/",
                         description="Group Influence at the proxy checkpoint, then TiKMiX-D (the influence-maximising "
                                     "mixture with entropy, floors and caps) or TiKMiX-M (probe trainings, LightGBM, "
                                     "search), and a token-budgeted draw by source: the mixture/ contract "
                                     "(docs/tikmix.md). Weights are recorded in <run>/tikmix/tikmix.duckdb.")
    _add_config_args(p)
    p.add_argument("--variant", choices=["d", "m"], default="d", help="TiKMiX-D (default) or TiKMiX-M")
    p.add_argument("--out", help="mixture directory (default: <run>/tikmix/mixture-<variant>)")
    p.add_argument("--seed", type=int, help="the draw's seed (default: run.seed)")
    p.set_defaults(func=cmd_tikmix)

    p = steps.add_parser("tikmix-dynamic", help="train the config's target in tikmix.stages stages, re-solving "
                                                "the mixture at each boundary -> tikmix/dynamic-<variant>/seed-<s>/",
                         description="Dynamic TiKMiX (docs/tikmix.md): the target model (`target`) trained for "
                                     "mix.token_budget tokens in stages; stage 0 on the corpus' natural shares, then at "
                                     "every boundary Group Influence on the target's own checkpoint, TiKMiX-D (or -M) "
                                     "from the previous stage's weights, and training continues (optimizer, schedule "
                                     "and data position carried over). Resumes; --stage runs up to one stage.")
    _add_config_args(p)
    p.add_argument("--variant", choices=["d", "m"], default="d", help="TiKMiX-D (default) or TiKMiX-M at each boundary")
    p.add_argument("--out", help="where checkpoints, stages and tables go "
                                 "(default: <run>/tikmix/dynamic-<variant>/seed-<seed>)")
    p.add_argument("--seed", type=int, help="initialisation and draw seed (default: run.seed)")
    p.add_argument("--stage", type=int, help="run stages 0..STAGE only (the DAG's task groups)")
    p.add_argument("--measure-only", action="store_true",
                   help="with --stage: measure, solve and draw that stage's mixture, do not train it")
    p.set_defaults(func=cmd_tikmix_dynamic)

    p = steps.add_parser("tikmix-online", help="watch your training run's checkpoint directory: publish TiKMiX "
                                               "weights for each new checkpoint -> OUT/versions/v<N>/",
                         description="TiKMiX online mode (docs/tikmix.md): for each complete checkpoint of --watch not "
                                     "published yet, in step order: Group Influence, TiKMiX-D (or -M) from the latest "
                                     "published weights, and a new version in --out (weights.json, Megatron blend.txt, "
                                     "Olmix domain_weights.json; tikmix.duckdb; OUT/latest). A rerun with no new "
                                     "checkpoint publishes nothing.")
    _add_config_args(p)
    p.add_argument("--watch", required=True, metavar="DIR", help="the directory your trainer saves checkpoints into")
    p.add_argument("--out", required=True, metavar="DIR", help="where the versions, tikmix.duckdb and latest go")
    p.add_argument("--variant", choices=["d", "m"], default="d", help="TiKMiX-D (default) or TiKMiX-M")
    p.add_argument("--settle", type=float, default=60.0, metavar="SECONDS",
                   help="a checkpoint directory must have been unchanged this long (default 60)")
    p.set_defaults(func=cmd_tikmix_online)

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
