"""`automixer experiment -c <experiment.yaml>`: does the mixture help? Methods x seeds, on one footing.

Stages (each resumable; the Airflow DAG `automixer_experiment` runs them as tasks):

* `prepare`: the base run's pipeline up to `select` (prepare, train-proxy, evaluate, select),
  then each pipeline method's seed-independent work in its own run directory
  `methods/<method>/run/` (the base run's corpus, tokenizer, checkpoints, validation sets and
  benchmark table linked, not copied): its samplers (`automixer`: select; `last-ckpt`: the last
  checkpoint alone; `all-ckpt`: every checkpoint, alpha by step; `scores`: yours), score and
  regroup. A sampler's scores depend only on its checkpoint, tasks and the influence settings,
  so methods that share one share its files (`scores/<key>/`).
* `run --method M --seed S` (one unit): the method's mixture of `token_budget` tokens drawn with
  seed S (baselines: baselines.py; pipeline methods: `mix` in `methods/M/seed-S/`, a per-seed
  run holding a copy of the method's database), a target model trained on it from seed S
  (`targets/M/seed-S/`), and its evaluation on the base config's test documents
  (`tasks.docs.test`, disjoint from the selection and influence validation documents):
  `targets/M/seed-S/eval.parquet`.
* `table`: every unit's evaluation into `results.parquet` (method, kind, seed, task, metric,
  value, stderr, n_docs), `table.md` (per task and average, deltas vs the baseline paired by
  seed, the paper's numbers beside ours) and `plot.png`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

from automixer_ops.config import Config, plain_data
from automixer_ops.errors import AutomixerError
from automixer_ops.experiment_config import TIKMIX_KINDS, ExperimentConfig, MethodSpec
from automixer_ops.rundir import (RunDir, atomic_write, atomic_write_text, fingerprint, parquet_metadata,
                                  replace_link, write_run_marker)

PIPELINE_KINDS = ("automixer", "last-ckpt", "all-ckpt", "scores")
METHOD_MARKER = "_EXPERIMENT_METHOD.json"  # in a pipeline method's run: what it was prepared from
LINKED = ("corpus", "tokenizer", "checkpoints", "valsets")  # what a method's run shares with the base run


class Experiment:
    """Paths and stages of one experiment directory."""

    def __init__(self, exp: ExperimentConfig, log: Callable[[str], None] = print):
        self.exp, self.log = exp, log
        self.dir = exp.directory

    # ------------------------------------------------------------ paths

    def method_run(self, name: str) -> Path:
        return self.dir / "methods" / name / "run"

    def seed_dir(self, name: str, seed: int) -> Path:
        return self.dir / "methods" / name / f"seed-{seed}"

    def target_dir(self, name: str, seed: int) -> Path:
        return self.dir / "targets" / name / f"seed-{seed}"

    def eval_file(self, name: str, seed: int) -> Path:
        return self.target_dir(name, seed) / "eval.parquet"

    def tikmix_work(self, name: str) -> Path:
        """A TiKMiX method's Group Influence, solves and tikmix.duckdb."""
        return self.dir / "methods" / name / "work"

    def tikmix_config(self, m: MethodSpec) -> Config:
        """The base config with the method's overrides: TiKMiX reads the base run itself (checkpoints, corpus)."""
        return self.exp.base_config(m.overrides)

    def method_config(self, m: MethodSpec, seed: int | None = None) -> Config:
        """The base config with the method's overrides, pointed at the method's (or the unit's) run directory."""
        where = self.method_run(m.name) if seed is None else self.seed_dir(m.name, seed) / "run"
        # JSON is YAML: a path holding ': ' or ' #' stays one string.
        overrides = [*m.overrides, f"run.root={json.dumps(str(where.parent))}", f"run.id={where.name}",
                     f"mix.token_budget={self.exp.token_budget}"]
        if seed is not None:
            overrides.append(f"run.seed={seed}")
        return self.exp.base_config(overrides)

    # ------------------------------------------------------------ prepare

    def prepare(self) -> None:
        from automixer_ops.evaluate import evaluate
        from automixer_ops.prepare import prepare
        from automixer_ops.proxy import train_proxy
        from automixer_ops.selection import select

        t0 = time.perf_counter()
        base = self.exp.base_config()
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "experiment.json", json.dumps(plain_data(self.exp), indent=2) + "\n")
        self.log(f"experiment {self.exp.name}: base run {base.run_dir}")
        prepare(base, log=self.log)
        train_proxy(base, log=self.log)
        evaluate(base, log=self.log)
        select(base.run_dir, metric=base.select.metric, noise_z=base.select.noise_z)
        for m in self.exp.methods:
            if m.kind in PIPELINE_KINDS:
                self.prepare_pipeline_method(m, base)
            elif m.kind in ("ppl", "dsir"):  # their perplexities / importance weights, cached for every seed
                self.mixture(m, self.exp.seeds[0], base)
            elif m.kind in ("tikmix-d", "tikmix-m"):  # Group Influence at the proxy: the same for every seed
                from automixer_ops.tikmix.method import proxy_group_influence

                proxy_group_influence(self.tikmix_config(m), self.tikmix_work(m.name), self.log)
        _record_time(self.dir / "prepare.json", time.perf_counter() - t0)

    def prepare_pipeline_method(self, m: MethodSpec, base: Config) -> None:
        from automixer_ops.influence.score import score
        from automixer_ops.regroup import regroup

        cfg = self.method_config(m)
        run = RunDir(cfg.run_dir)
        link_base_run(RunDir(base.run_dir), run)
        self.write_selection(m, cfg, run)
        if m.kind != "scores":  # a user's scorer wrote its scores: regroup reads them, nothing writes there
            self.share_scores(cfg, run)
            self.log(f"{m.name}: scoring in {run.path}")
            score(cfg, log=self.log)
        regroup(cfg, log=self.log)
        atomic_write_text(run.path / METHOD_MARKER, json.dumps({"method": self.method_identity(m)}) + "\n")

    def method_identity(self, m: MethodSpec) -> str:
        """What a pipeline method's run was prepared from: the method's entry and the config it ran with."""
        return fingerprint({"method": plain_data(m), "config": self.method_config(m).to_dict()})

    def write_selection(self, m: MethodSpec, cfg: Config, run: RunDir) -> None:
        import pyarrow.parquet as pq

        from automixer_ops.samplers import Sampler
        from automixer_ops.selection import select, select_samplers

        if m.kind == "automixer":
            select(run.path, metric=cfg.select.metric, noise_z=cfg.select.noise_z)
            return
        if m.kind == "scores":
            src = self.exp.resolve(m.scores).resolve()
            if not (src / "selection.json").is_file():
                raise AutomixerError(f"methods ({m.name}).scores: {src}/selection.json not found")
            atomic_write(run.selection, lambda tmp: shutil.copyfile(src / "selection.json", tmp))
            from automixer_ops.samplers import read_selection

            for s in read_selection(run).samplers:
                _link(src / "scores" / f"step={s.step}", run.sampler_scores(s.step))
            return
        rows = pq.read_table(run.benchmark).to_pylist()
        selection = select_samplers(rows, metric=cfg.select.metric, noise_z=cfg.select.noise_z)
        tasks = sorted(selection.tasks)
        steps = sorted({int(r["step"]) for r in rows})
        if m.kind == "last-ckpt":  # the paper's Table 3: only the final checkpoint, every task
            chosen = [steps[-1]]
        else:  # all-ckpt: every saved checkpoint a sampler, alpha by step (s_j / sum s_i)
            chosen = steps
        total = sum(chosen) or 1
        selection.samplers = [Sampler(step=s, tasks=tasks, alpha=(s / total if sum(chosen) else 1 / len(chosen)),
                                      checkpoint=str(run.checkpoint(s))) for s in chosen]
        selection.check(str(run.selection))
        text = selection.to_json()
        if not run.selection.is_file() or run.selection.read_text(encoding="utf-8") != text:
            atomic_write_text(run.selection, text)

    def share_scores(self, cfg: Config, run: RunDir) -> None:
        """Point each sampler's scores/step=<N> at the experiment's store for (checkpoint, tasks, influence
        settings): a sampler another method already scored is not scored again."""
        from automixer_ops.samplers import read_selection

        settings = cfg.to_dict()
        for s in read_selection(run).samplers:
            key = fingerprint({"step": s.step, "tasks": sorted(s.tasks), "influence": settings["influence"],
                               "docs": settings["tasks"]["docs"], "corpus": run.corpus_fingerprint()})
            store = self.dir / "scores" / f"step={s.step}-{key}"
            store.mkdir(parents=True, exist_ok=True)
            _link(store, run.sampler_scores(s.step))

    # ------------------------------------------------------------ one unit

    def run_unit(self, name: str, seed: int) -> Path:
        from automixer_ops.evaluate import evaluate_model, write_rows
        from automixer_ops.experiment_table import headline_metrics
        from automixer_ops.train_target import train_target

        m = self.exp.method(name)
        if seed not in self.exp.seeds:
            raise AutomixerError(f"--seed {seed}: not a seed of this experiment ({self.exp.seeds})")
        base = self.exp.base_config()
        times = {}
        out = self.target_dir(name, seed)
        if m.kind == "tikmix-d-dynamic":  # the mixture is re-solved while the target trains: one step does both
            from automixer_ops.tikmix.dynamic import train_dynamic

            t0 = time.perf_counter()
            checkpoints = train_dynamic(self.tikmix_config(m), "d", out, self.exp.target, self.exp.token_budget, seed,
                                        log=self.log)
            times["train_s"] = time.perf_counter() - t0
        else:
            t0 = time.perf_counter()
            mixture = self.mixture(m, seed, base)
            times["mixture_s"] = time.perf_counter() - t0
            drawn = json.loads((mixture / "weights.json").read_text(encoding="utf-8"))
            if drawn.get("underfilled"):
                raise AutomixerError(f"{mixture}: holds {drawn.get('tokens')} of the {self.exp.token_budget:,} tokens "
                                     "(underfilled): its target would repeat data the others do not; lower "
                                     "token_budget or raise the method's mix.max_repeats")
            t0 = time.perf_counter()
            checkpoints = train_target(mixture, out, self.exp.target, seed, RunDir(base.run_dir).tokenizer,
                                       log=self.log)
            times["train_s"] = time.perf_counter() - t0
        last = max(checkpoints)

        t0 = time.perf_counter()
        path = self.eval_file(name, seed)
        stamp = self.eval_stamp(base, checkpoints[last])
        if path.is_file() and parquet_metadata(path).get("fingerprint") == stamp:
            self.log(f"{name} seed {seed}: already evaluated ({path})")
            return path
        rows = evaluate_model(base, checkpoints[last], use="test", step=last, setup_dir=self.dir / "eval_tasks")
        write_rows(path, rows, stamp)
        times["eval_s"] = time.perf_counter() - t0
        _record_time(self.target_dir(name, seed) / "unit.json", sum(times.values()), **times)
        headline = {t: next(r["value"] for r in rows if r["task"] == t and r["metric"] == m)
                    for t, m in headline_metrics(rows).items()}
        self.log(f"{name} seed {seed}: evaluated on the test documents -> {path} "
                 f"({', '.join(f'{t} {v:.3f}' for t, v in sorted(headline.items()))})")
        return path

    def eval_stamp(self, base: Config, ckpt: Path) -> str:
        """What a unit's evaluation depends on: the model's files and the evaluation setup (tasks, their test
        documents, the task YAMLs, lm-eval's version, gold_ll's settings)."""
        from automixer_ops.checkpoints import checkpoint_identity
        from automixer_ops.evaluate import eval_fingerprint
        from automixer_ops.tasks import write_task_yamls

        setup = write_task_yamls(base, self.dir / "eval_tasks").include_path  # the YAMLs as the evaluation uses them
        return fingerprint({"model": checkpoint_identity(ckpt), "test": list(base.tasks.docs.test),
                            "setup": eval_fingerprint(base, setup)})

    def stale_units(self, base: Config) -> list[str]:
        """Units whose target or evaluation no longer matches the experiment file (a target trained with other
        settings or seed, an evaluation of another model or setup): the table must not show them."""
        from automixer_ops.checkpoints import list_checkpoints
        from automixer_ops.rundir import read_marker
        from automixer_ops.trainer import settings_fingerprint

        stale = []
        for n, s in self.exp.units():
            ckpts = list_checkpoints(RunDir(self.target_dir(n, s)))
            train = (read_marker(ckpts[max(ckpts)]) or {}).get("train", {}) if ckpts else {}
            settings = settings_fingerprint(self.exp.target.training(self.exp.token_budget))
            if not ckpts or train.get("target") != settings or train.get("seed") != s:
                stale.append(f"{n} seed {s} (its target was trained with other settings)")
            elif parquet_metadata(self.eval_file(n, s)).get("fingerprint") != self.eval_stamp(base, ckpts[max(ckpts)]):
                stale.append(f"{n} seed {s} (evaluated on another model or setup)")
        return stale

    def mixture(self, m: MethodSpec, seed: int, base: Config) -> Path:
        if m.kind in ("tikmix-d", "tikmix-m"):
            from automixer_ops.tikmix.method import tikmix_mixture

            return tikmix_mixture(self.tikmix_config(m), m.kind[-1], self.seed_dir(m.name, seed) / "mixture",
                                  self.exp.token_budget, seed, self.tikmix_work(m.name), log=self.log)
        if m.kind not in PIPELINE_KINDS:
            from automixer_ops.baselines import baseline_mixture

            return baseline_mixture(m, base, self.seed_dir(m.name, seed) / "mixture", self.exp.token_budget, seed,
                                    cache=self.dir / "methods" / m.name / "cache", log=self.log)
        from automixer_ops.mix import mix

        method_run = RunDir(self.method_run(m.name))
        if not method_run.db.is_file():
            raise AutomixerError(f"{method_run.db}: not found; run `automixer experiment --stage prepare` first")
        marker = method_run.path / METHOD_MARKER
        recorded = json.loads(marker.read_text(encoding="utf-8")).get("method") if marker.is_file() else None
        if recorded != self.method_identity(m):
            raise AutomixerError(f"{method_run.path}: prepared for another version of method {m.name!r} or of the base "
                                 "config (its selection and regrouping would be stale); run `automixer experiment "
                                 "--stage prepare` first")
        cfg = self.method_config(m, seed)
        run = RunDir(cfg.run_dir)
        link_base_run(RunDir(base.run_dir), run)
        for name in ("selection.json", "scores"):
            _link(method_run.path / name, run.path / name)
        # The per-seed run draws from a copy of the method's database, so mixes of several seeds never write one
        # file; mix is deterministic (same database, budget and seed: the same mixture), so it simply runs again.
        atomic_write(run.db, lambda tmp: shutil.copyfile(method_run.db, tmp))
        return mix(cfg, log=self.log)

    # ------------------------------------------------------------ table

    def table(self) -> tuple[Path, Path]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from automixer_ops.experiment_table import write_table

        missing = [(n, s) for n, s in self.exp.units() if not self.eval_file(n, s).is_file()]
        if missing:
            raise AutomixerError(f"{self.dir}: {len(missing)} unit(s) not evaluated yet ("
                                 + ", ".join(f"{n} seed {s}" for n, s in missing[:6])
                                 + "); run `automixer experiment --stage run` for them first")
        stale = self.stale_units(self.exp.base_config())
        if stale:
            raise AutomixerError(f"{self.dir}: {len(stale)} unit(s) do not match the experiment file now: "
                                 + "; ".join(stale[:4]) + "; run `automixer experiment --stage run` for them again")
        tables = []
        for n, s in self.exp.units():
            t = pq.read_table(self.eval_file(n, s)).replace_schema_metadata(None)
            kind = self.exp.method(n).kind
            t = t.append_column("method", pa.array([n] * t.num_rows)).append_column(
                "kind", pa.array([kind] * t.num_rows)).append_column("seed", pa.array([s] * t.num_rows, pa.int64()))
            tables.append(t.select(["method", "kind", "seed", "task", "metric", "value", "stderr", "n_docs"]))
        results = pa.concat_tables(tables)
        path = self.dir / "results.parquet"
        atomic_write(path, lambda tmp: pq.write_table(results, tmp))
        wall = _read_time(self.dir / "prepare.json") + sum(_read_time(self.target_dir(n, s) / "unit.json")
                                                           for n, s in self.exp.units())
        meta = {"name": self.exp.name, "methods": [(m.name, m.kind) for m in self.exp.methods],
                "seeds": self.exp.seeds, "token_budget": self.exp.token_budget,
                "target": plain_data(self.exp.target), "base": str(self.exp.resolve(self.exp.base).resolve()),
                "command": f"automixer experiment -c {self.exp.source}", "wall_s": wall,
                "appendix": self.appendix(results.to_pylist())}
        return write_table(path, self.dir, self.exp.baseline, meta)

    def appendix(self, rows: list[dict]) -> list[str]:
        """What each method chose and drew: the base run's Table 1, each pipeline method's samplers, and every
        mixture's share of each source next to the corpus' own (seed of the first unit)."""
        from automixer_ops.samplers import format_table1, read_selection

        base = RunDir(self.exp.base_config().run_dir)
        lines = ["## What the methods chose", "", "The base run's Table 1 (the proxy's checkpoints on the selection "
                 "documents; `automixer` picks from it):", "", "```", format_table1(read_selection(base)), "```", ""]
        lines += ["| method | samplers: step (alpha) [tasks] |", "|---|---|"]
        for m in self.exp.methods:
            if m.kind in PIPELINE_KINDS:
                samplers = read_selection(RunDir(self.method_run(m.name))).samplers
                lines.append(f"| {m.name} | " + "; ".join(f"{s.step} ({s.alpha:.3f}) [{', '.join(s.tasks)}]"
                                                            for s in samplers) + " |")
        seed = self.exp.seeds[0]
        shares = {m.name: self.source_shares(self.unit_mixture(m, seed), base) for m in self.exp.methods}
        corpus = self.source_shares(None, base)
        sources = sorted(corpus)
        lines += ["", f"Each mixture's tokens by source (%, seed {seed}) against the corpus:", "",
                  "| method | " + " | ".join(sources) + " |", "|---|" + "---:|" * len(sources),
                  "| (corpus) | " + " | ".join(f"{100 * corpus[s]:.1f}" for s in sources) + " |"]
        for name, share in shares.items():
            lines.append(f"| {name} | " + " | ".join(f"{100 * share.get(s, 0.0):.1f}" for s in sources) + " |")
        return lines + [""] + self.tikmix_lines(seed) + self.noise_lines(read_selection(base), rows)

    def tikmix_lines(self, seed: int) -> list[str]:
        """Each dynamic TiKMiX method's stages (seed `seed`): the weights, and how the group ranking moved."""
        lines = []
        for m in self.exp.methods:
            path = self.target_dir(m.name, seed) / "stages.json"
            if m.kind not in TIKMIX_KINDS or not path.is_file():
                continue
            info = json.loads(path.read_text(encoding="utf-8"))
            groups = info["groups"]
            lines += [f"{m.name}'s mixture per stage (seed {seed}, %; Spearman of the groups' influence ranking "
                      "and of the weights with the previous stage's):", "",
                      "| stage | steps | " + " | ".join(groups) + " | ρ influence | ρ weights |",
                      "|---|---|" + "---:|" * (len(groups) + 2)]
            for st in info["stages"]:
                rho = [st.get("spearman_g_hat_vs_previous"), st.get("spearman_weights_vs_previous")]
                lines.append(f"| {st['stage']} | {st['steps'][0]}-{st['steps'][1]} | "
                             + " | ".join(f"{100 * st['weights'][g]:.1f}" for g in groups) + " | "
                             + " | ".join("-" if r is None else f"{r:+.2f}" for r in rho) + " |")
            lines.append("")
        return lines

    def noise_lines(self, selection, rows: list[dict]) -> list[str]:
        """How large a difference this experiment can see: each task's document-level stderr on the test documents,
        the checkpoints' separation in Table 1, and how far each target trained (its last logged loss)."""
        from automixer_ops.experiment_table import headline_metrics

        headline = headline_metrics(rows)
        lines = ["## How large a difference can this experiment see?", "",
                 "Per task: the median over units of lm-eval's standard error of the headline accuracy on the test "
                 "documents (points; the noise of one model's score from the finite test set), and of gold_ll.", "",
                 "| task | test docs | accuracy stderr (points) | gold_ll stderr |", "|---|---:|---:|---:|"]
        for task, metric in sorted(headline.items()):
            def median(metric_name):
                vals = sorted(r["stderr"] for r in rows if r["task"] == task and r["metric"] == metric_name
                              and r["stderr"] is not None)
                return vals[len(vals) // 2] if vals else None
            acc, ll = median(metric), median("gold_ll")
            n = max(r["n_docs"] for r in rows if r["task"] == task)
            scale, unit = (100, "") if metric in ("acc", "acc_norm") else (1, f" ({metric})")
            lines.append(f"| {task} | {n} | {'-' if acc is None else f'{scale * acc:.2f}{unit}'} | "
                         f"{'-' if ll is None else f'{ll:.4f}'} |")
        flags = [c.separated for c in selection.tasks.values()]
        lines += ["", f"Checkpoint selection (the base run's Table 1, select.noise_z = {selection.noise_z:g}): "
                  f"{sum(f is True for f in flags)} of {len(flags)} tasks have a best step separated from the last "
                  f"step, {sum(f is False for f in flags)} are within noise, {sum(f is None for f in flags)} peak at "
                  "the last step (or have no stderr).", "",
                  "Each target's last logged training loss on its own mixture (mean over seeds; every target trained the same "
                  "steps; a loss on different data, so it says how far training went, not which mixture is better):",
                  "", "| method | final train loss |", "|---|---:|"]
        for m in self.exp.methods:
            losses = [_last_loss(self.target_dir(m.name, s) / "train_log.jsonl") for s in self.exp.seeds]
            losses = [x for x in losses if x is not None]
            lines.append(f"| {m.name} | {sum(losses) / len(losses):.4f} |" if losses else f"| {m.name} | - |")
        return lines + [""]

    def unit_mixture(self, m: MethodSpec, seed: int) -> Path:
        if m.kind == "tikmix-d-dynamic":  # every stage's mixture (stages/stage-<s>/mixture/part-*.parquet)
            return self.target_dir(m.name, seed) / "stages"
        if m.kind in PIPELINE_KINDS:
            return self.seed_dir(m.name, seed) / "run" / "mixture"
        return self.seed_dir(m.name, seed) / "mixture"

    @staticmethod
    def source_shares(mixture: Path | None, base: RunDir) -> dict[str, float]:
        """Token share of each corpus source in a mixture (None: in the corpus)."""
        import duckdb

        from automixer_ops.sqlrun import literal_paths

        corpus = literal_paths(base.corpus_files())
        with duckdb.connect() as con:
            if mixture is None:
                rows = con.execute("SELECT source, sum(n_tokens) FROM read_parquet($c) GROUP BY source",
                                   {"c": corpus}).fetchall()
            else:
                parts = literal_paths([str(p) for p in sorted(mixture.rglob("part-*.parquet"))])
                rows = con.execute("""SELECT c.source, sum(c.n_tokens) FROM read_parquet($m) m
                                      JOIN read_parquet($c) c USING (id) GROUP BY c.source""",
                                   {"m": parts, "c": corpus}).fetchall()
        total = sum(float(n) for _, n in rows) or 1.0
        return {s: float(n) / total for s, n in rows}


def link_base_run(base: RunDir, run: RunDir) -> None:
    """A method's run directory: the base run's corpus, tokenizer, checkpoints and validation sets linked,
    and its benchmark table linked into a real eval/ (select writes the method's own heatmap there)."""
    for name in ("corpus", "tokenizer", "valsets"):
        if not (base.path / name).exists():
            raise AutomixerError(f"{base.path / name}: not found; the base run is not prepared and evaluated")
    run.path.mkdir(parents=True, exist_ok=True)
    write_run_marker(run.path, run.path.name)
    for name in LINKED:
        _link(base.path / name, run.path / name)
    if not run.eval.is_symlink():
        run.eval.mkdir(exist_ok=True)
        _link(base.benchmark, run.benchmark)


def _link(target: Path, link: Path) -> None:
    """link -> target, replaced atomically when it points elsewhere; a real file or directory there is an error
    (it is not ours to replace)."""
    if link.exists() and not link.is_symlink():
        raise AutomixerError(f"{link}: exists and is not a link; remove it to rebuild the experiment's run")
    link.parent.mkdir(parents=True, exist_ok=True)
    replace_link(link, target)


def _last_loss(log: Path) -> float | None:
    try:
        return float(json.loads(log.read_text(encoding="utf-8").splitlines()[-1])["loss"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _record_time(path: Path, seconds: float, **parts: float) -> None:
    atomic_write_text(path, json.dumps({"wall_s": round(seconds, 1), **{k: round(v, 1) for k, v in parts.items()}})
                      + "\n")


def _read_time(path: Path) -> float:
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0


def run_experiment(exp: ExperimentConfig, stage: str | None, method: str | None, seed: int | None,
                   log: Callable[[str], None] = print):
    """The CLI's entry: one stage, one unit, or everything in order (each part resumes)."""
    runner = Experiment(exp, log)
    if (method is not None or seed is not None) and stage != "run":
        raise AutomixerError("--method and --seed pick one unit of --stage run; give --stage run with them")
    if stage == "run" and (method is None) != (seed is None):
        raise AutomixerError("--stage run: give both --method and --seed (one unit), or neither (every unit)")
    if method is not None:
        exp.method(method)  # an unknown method or seed fails before any work
        if seed not in exp.seeds:
            raise AutomixerError(f"--seed {seed}: not a seed of this experiment ({exp.seeds})")
    if stage in (None, "prepare"):
        runner.prepare()
    if stage in (None, "run"):
        units = [(method, seed)] if method is not None else exp.units()
        for i, (name, s) in enumerate(units, 1):
            log(f"unit {i}/{len(units)}: {name} seed {s}")
            runner.run_unit(name, s)
    if stage in (None, "table"):
        return runner.table()
    return None
