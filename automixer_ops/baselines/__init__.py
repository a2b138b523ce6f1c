"""Baseline data selections that write the `mixture/` contract (DESIGN §3), for the experiment runner.

    baseline_mixture(method, cfg, out, token_budget, seed, cache, log) -> out

kinds:
* uniform: a seeded random draw of T tokens from the whole corpus (documents in a permutation of
  `np.random.default_rng(seed)`, taken until T; past the corpus, further passes, repeat = 1, 2, ...);
* uniform-source: T/S tokens from each of the S sources the same way, rounding carried from source
  to source (in name order), so each source is within one document of T/S and the total of T;
* ppl: a perplexity band under a reference checkpoint of the base run (see ppl.py), then a uniform
  draw of T tokens from the band's documents;
* dsir: hashed n-gram importance weights towards the tasks' validation text (see dsir.py), then
  Gumbel-top-k sampling without replacement on the log weights until T tokens (further passes with
  new noise past the eligible documents).

A mixture's group is its document's source. The drawn occurrences are shuffled once with the same
generator, so the parts are in training order. Per-document perplexities and DSIR weights are cached
in `cache` (shared by the seeds of a method) keyed by their inputs. `out` is published atomically; a
rerun whose inputs match the weights.json of an existing `out` does nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from automixer_ops.baselines.common import (CorpusIndex, already_drawn, draw_groups, draw_passes,
                                            permutation_order, read_cache, read_corpus_index, summarize,
                                            write_cache, write_mixture)
from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.experiment_config import MethodSpec
from automixer_ops.progress import heartbeat
from automixer_ops.rundir import RunDir, file_hash, files_identity, fingerprint

KINDS = ("uniform", "uniform-source", "ppl", "dsir")
VERSION = 1  # of the draws below: a change that alters a draw bumps it, so reruns redraw
PPL_CACHE = "perplexity-step-{step}.parquet"  # one per reference checkpoint
DSIR_CACHE = "dsir_importance.parquet"
ORDER = "the drawn occurrences shuffled once with np.random.default_rng(seed), after the draw"

__all__ = ["KINDS", "baseline_mixture"]


def baseline_mixture(method: MethodSpec, cfg: Config, out: Path, token_budget: int, seed: int,
                     cache: Path, log: Callable[[str], None] = print) -> Path:
    """Write the mixture directory `out` for a baseline method; returns out."""
    where = f"methods[{method.name}]"
    if method.kind not in KINDS:
        raise ConfigError(f"{where}.kind: {method.kind!r} is not a baseline (baselines: {', '.join(KINDS)}); "
                          "the pipeline's kinds are run by the experiment runner, not here")
    if isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1:
        raise ConfigError(f"token_budget: must be an integer >= 1, got {token_budget!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ConfigError(f"seeds: a seed must be an integer in [0, 2^32), got {seed!r}")
    out, cache = Path(out), Path(cache)
    run = RunDir(cfg.run_dir)
    index = read_corpus_index(run)
    baseline = _BASELINES[method.kind](method, cfg, run, index, cache, where, log)
    inputs = {"version": VERSION, "name": method.name, "kind": method.kind, "token_budget": token_budget,
              "seed": seed, "docs_per_part": cfg.mix.docs_per_part, "corpus": run.corpus_fingerprint(),
              **baseline.inputs}
    input_fp = fingerprint(inputs)
    if already_drawn(out, input_fp):
        log(f"{method.name} (seed {seed}): already drawn -> {out}")
        return out

    rng = np.random.default_rng(seed)  # every random choice of this draw; numpy's global generator untouched
    idx, rep, facts = baseline.draw(token_budget, rng)
    summary = {"method": method.name, "kind": method.kind, "input_fingerprint": input_fp, "seed": seed,
               **summarize(index, idx, rep, token_budget), "corpus_documents": len(index),
               "corpus_tokens": int(index.n_tokens.sum()), "corpus_fingerprint": inputs["corpus"], "order": ORDER,
               **facts}
    with heartbeat(f"{method.name} (seed {seed})", "writing the mixture's parts (DuckDB)"):
        summary = write_mixture(index, idx, rep, rng, out, summary, cfg.mix.docs_per_part,
                                cfg.regroup.memory_limit)
    log(f"{method.name} (seed {seed}): {summary['documents']:,} documents, {summary['tokens']:,} tokens "
        f"(budget {token_budget:,}; {summary['passes']} pass(es)) -> {out}")
    return out


class _Baseline:
    """A kind's inputs (what its draw depends on, beyond budget, seed and corpus) and its draw."""

    def __init__(self, method: MethodSpec, cfg: Config, run: RunDir, index: CorpusIndex, cache: Path, where: str,
                 log: Callable[[str], None]):
        self.method, self.cfg, self.run, self.index, self.cache, self.where, self.log = (
            method, cfg, run, index, cache, where, log)
        self.inputs: dict = {}

    def draw(self, budget: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
        raise NotImplementedError


class _Uniform(_Baseline):
    def draw(self, budget, rng):
        idx, rep = draw_passes(self.index.n_tokens, np.arange(len(self.index)), budget, permutation_order(rng),
                               f"{self.where}: the corpus {self.run.corpus}")
        return idx, rep, {}


class _UniformSource(_Baseline):
    def draw(self, budget, rng):
        groups = self.index.source_rows()
        sources = sorted(groups)
        if not sources:
            raise AutomixerError(f"{self.where}: the corpus {self.run.corpus} holds no documents to draw from")
        quota = budget / len(sources)
        idx, rep = draw_groups(self.index.n_tokens, groups, {s: quota for s in sources}, permutation_order(rng),
                               f"{self.where}: the corpus {self.run.corpus}")
        return idx, rep, {"sources": len(sources), "tokens_per_source": quota}


class _Perplexity(_Baseline):
    def __init__(self, *args):
        super().__init__(*args)
        from automixer_ops.checkpoints import checkpoint_identity, checkpoint_tokenizer_dir, list_checkpoints

        ckpts = list_checkpoints(self.run)
        if not ckpts:
            raise AutomixerError(f"{self.run.checkpoints}: no checkpoints; the ppl baseline needs the base run's "
                                 "`automixer train-proxy`")
        self.step = self.method.reference_step if self.method.reference_step is not None else max(ckpts)
        if self.step not in ckpts:
            raise ConfigError(f"{self.where}.reference_step: no checkpoint step-{self.step} in {self.run.checkpoints} "
                              f"(steps: {', '.join(map(str, ckpts))})")
        self.ckpt = ckpts[self.step]
        tok_dir = checkpoint_tokenizer_dir(self.run, self.ckpt)
        self.key = fingerprint({"version": VERSION, "corpus": self.run.corpus_fingerprint(),
                                "checkpoint": checkpoint_identity(self.ckpt),
                                "tokenizer": files_identity(sorted(p for p in tok_dir.iterdir() if p.is_file())),
                                "max_seq_len": self.cfg.influence.max_seq_len})
        self.inputs = {"perplexities": self.key, "band": self.method.band, "band_fraction": self.method.band_fraction}

    def nll(self) -> np.ndarray:
        from automixer_ops.baselines.ppl import perplexities

        path = self.cache / PPL_CACHE.format(step=self.step)
        cached = read_cache(path, self.key, self.index, ["nll"])
        if cached is not None:
            self.log(f"{self.method.name}: perplexities of step-{self.step} from the cache {path}")
            return cached["nll"].astype(np.float64)
        self.log(f"{self.method.name}: perplexities of {len(self.index):,} documents under step-{self.step}")
        nll = perplexities(self.run, self.cfg, self.ckpt, self.index, self.log)
        self.cache.mkdir(parents=True, exist_ok=True)
        write_cache(path, self.key, {"id": self.index.ids, "n_tokens": self.index.n_tokens,
                                     "nll": nll, "ppl": np.exp(nll)},
                    {"reference_step": self.step, "checkpoint": str(self.ckpt),
                     "max_seq_len": self.cfg.influence.max_seq_len})
        return nll

    def draw(self, budget, rng):
        from automixer_ops.baselines.ppl import SEQUENCE, band_rows

        rows, facts = band_rows(self.index.ids, np.exp(self.nll()), self.method.band, self.method.band_fraction,
                                self.where)
        idx, rep = draw_passes(self.index.n_tokens, rows, budget, permutation_order(rng),
                               f"{self.where}: the {self.method.band} perplexity band")
        return idx, rep, {**facts, "reference_step": self.step, "reference_checkpoint": str(self.ckpt),
                          "max_seq_len": self.cfg.influence.max_seq_len, "scored_sequence": SEQUENCE,
                          "perplexity_cache": str(self.cache / PPL_CACHE.format(step=self.step))}


class _Dsir(_Baseline):
    def __init__(self, *args):
        super().__init__(*args)
        from automixer_ops.baselines.dsir import package_version

        self.tasks = self.cfg.tasks.names()
        if not self.tasks:
            raise ConfigError(f"{self.where}: dsir needs target tasks (tasks.targets or tasks.custom of the base "
                              "config): their validation text is its target")
        valsets = {}
        for task in self.tasks:
            path = self.run.valset(task)
            if not path.is_file():
                raise AutomixerError(f"{path}: no validation set for {task!r}; run `automixer evaluate` first")
            valsets[task] = file_hash(path)
        m = self.method
        self.key = fingerprint({"version": VERSION, "corpus": self.run.corpus_fingerprint(), "valsets": valsets,
                                "ngrams": m.ngrams, "num_buckets": m.num_buckets,
                                "min_example_length": m.min_example_length, "data_selection": package_version()})
        self.inputs = {"importance": self.key}

    def weights(self) -> tuple[np.ndarray, np.ndarray, int]:
        from automixer_ops.baselines.dsir import importance_weights, target_texts
        from automixer_ops.tasks import read_validation_set

        path, m = self.cache / DSIR_CACHE, self.method
        targets = target_texts({t: read_validation_set(self.run.path, t) for t in self.tasks})
        if not targets:
            raise AutomixerError(f"{self.run.valsets}: the validation sets of {', '.join(self.tasks)} are empty; "
                                 "dsir has no target text")
        cached = read_cache(path, self.key, self.index, ["log_weight", "words"])
        if cached is not None:
            self.log(f"{m.name}: DSIR importance weights from the cache {path}")
            return cached["log_weight"].astype(np.float64), cached["words"].astype(np.int64), len(targets)
        self.cache.mkdir(parents=True, exist_ok=True)
        logw, words = importance_weights(self.index, targets, m.ngrams, m.num_buckets, m.min_example_length,
                                         self.cache, self.log)
        write_cache(path, self.key, {"id": self.index.ids, "n_tokens": self.index.n_tokens,
                                     "log_weight": logw, "words": words, "kept": np.isfinite(logw)},
                    {"ngrams": m.ngrams, "num_buckets": m.num_buckets, "min_example_length": m.min_example_length})
        return logw, words, len(targets)

    def draw(self, budget, rng):
        from automixer_ops.baselines.dsir import gumbel_order, package_version

        logw, _, n_targets = self.weights()
        eligible = np.flatnonzero(np.isfinite(logw))
        dropped = len(self.index) - len(eligible)
        if not len(eligible):
            raise AutomixerError(f"{self.where}.min_example_length: all {len(self.index):,} documents have fewer than "
                                 f"{self.method.min_example_length} words, so every importance weight is 0")
        idx, rep = draw_passes(self.index.n_tokens, eligible, budget, gumbel_order(logw, rng),
                               f"{self.where}: the documents of nonzero importance")
        live = logw[eligible]
        return idx, rep, {
            "ngrams": self.method.ngrams, "num_buckets": self.method.num_buckets,
            "min_example_length": self.method.min_example_length, "zero_importance_documents": int(dropped),
            "eligible_documents": int(len(eligible)), "target_examples": n_targets, "tasks": self.tasks,
            "word_tokenizer": "wordpunct", "data_selection_version": package_version(),
            "log_importance": {"min": float(live.min()), "median": float(np.median(live)), "max": float(live.max())},
            "resampling": "Gumbel-top-k on the log importance weights, without replacement, until the budget; "
                          "further passes with new noise",
            "importance_cache": str(self.cache / DSIR_CACHE)}


_BASELINES = {"uniform": _Uniform, "uniform-source": _UniformSource, "ppl": _Perplexity, "dsir": _Dsir}
