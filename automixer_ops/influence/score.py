"""`automixer score`: DataInf utilities of every corpus document for one sampler.

Layout under `<run>/scores/step=<N>/` (DESIGN §3):

    fit.safetensors, fit.json   r_l and v_l per layer; lambda_l, n, the fit's fingerprint
    part-XXXXX.parquet          id, utility (float32), n_tokens: one file per corpus shard
    .fit/                       the fit's own resumable work: pass-1 statistics per shard,
                                checkpoints of the pass-1 and pass-2 sums

Passes over the data (DESIGN §2: lambda needs every ||g||^2, r needs lambda):
  0. the sampler's validation gradient v (its tasks' validation pairs, each task weighted
     equally, each document's loss the mean CE of its gold continuation);
  1. fit set: per document ||g_l||^2 and v_l.g_l -> lambda_l, and the series sums that give
     sum_i c_il g_il without lambda (datainf.py)   (checkpointed every minute);
  2. the fit documents whose coefficient the series does not give to 1e-8 (usually none):
     the rest of sum_i c_il g_il -> r_l            (checkpointed every minute);
  3. corpus: utility = sum_l r_l.g_l               (one independent job per shard).
With the default fit set (the whole corpus) the corpus is read twice (and pass 2 rereads
the few documents it needs); with `influence.fit_samples: N` passes 1-2 read only N
documents.

Every file is written to a temporary name and renamed into place; a score shard carries
the fit's fingerprint, so a shard scored with another fit is redone, and a finished one is
skipped on rerun. NaN or infinite values stop the step and name the documents.
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from automixer_ops.config import Config
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.progress import Progress, heartbeat, quiet_library_bars
from automixer_ops.rundir import (RunDir, atomic_write, atomic_write_text, file_hash, file_lock, fingerprint,
                                  read_marker, parquet_metadata)
from automixer_ops.samplers import read_selection

FIT_JSON, FIT_TENSORS, WORK = "fit.json", "fit.safetensors", ".fit"
# Held exclusively while a fit runs (and its own scoring), shared while `--shards` jobs score with a finished fit:
# a job that finds it taken exits 75 (transient) and the launcher retries it.
FIT_LOCK = ".fit.lock"
FIT_KEYS = {"fingerprint": str, "n": int, "layers": list, "dims": dict, "lambda": dict, "sum_sq_norm": dict}
WORK_FORMAT = "series-1"  # layout of WORK's files: work left by another layout is not resumed
CHECKPOINT_EVERY_S = 60.0


@dataclass
class Doc:
    id: str
    n_tokens: int
    ids: list[int]  # EOS + the document's first max_seq_len - 1 tokens


def parse_shards(spec: str, n: int) -> range:
    """'A:B' -> shards A..B-1 (clipped to the corpus), 'A:' -> A to the last, ':B' -> 0..B-1, 'A' -> just A."""
    try:
        lo, colon, hi = spec.partition(":")
        start = int(lo) if lo or not colon else 0
        r = range(start, int(hi) if hi else (n if colon else start + 1))
    except ValueError:
        raise ConfigError(f"--shards {spec!r}: expected START:END (0-based, END exclusive) or one index") from None
    if n == 0:
        raise ConfigError(f"--shards {spec!r}: the corpus has no shards; run `automixer prepare` first")
    if r.start < 0 or r.start >= n:
        raise ConfigError(f"--shards {spec!r}: START must be a shard of the corpus, 0..{n - 1}")
    if r.stop <= r.start:
        raise ConfigError(f"--shards {spec!r}: END ({r.stop}) must be greater than START ({r.start})")
    return range(r.start, min(r.stop, n))


class Scorer:
    """One sampler's model, validation set and fit, over the run's corpus shards."""

    def __init__(self, cfg: Config, step: int, log: Callable[[str], None] = print):
        import torch
        from transformers import AutoTokenizer

        from automixer_ops.influence.grads import check_plain_head
        from automixer_ops.checkpoints import checkpoint_tokenizer_dir, load_causal_lm, pick_device

        self.cfg, self.log, self.inf = cfg, log, cfg.influence
        self.run = RunDir(cfg.run_dir)
        corpus = read_marker(self.run.corpus)
        if corpus is None or "fingerprint" not in corpus:
            raise AutomixerError(f"{self.run.corpus}: no prepared corpus; run `automixer prepare` first")
        self.corpus_fingerprint = corpus["fingerprint"]
        self.shards = self.run.corpus_shards()
        self.sampler = read_selection(self.run).sampler(step)
        self.checkpoint = self.run.checkpoint(step)
        if not (self.checkpoint / "config.json").is_file():
            raise AutomixerError(f"{self.checkpoint}: checkpoint not found")
        self.out = self.run.sampler_scores(step)
        self.device = pick_device(self.inf.device)
        self.autocast = torch.bfloat16 if self.inf.precision == "bf16" else None
        quiet_library_bars()  # transformers' "Loading weights" bar, one line of carriage returns in a log
        self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_tokenizer_dir(self.run, self.checkpoint)))
        model = load_causal_lm(self.checkpoint, torch.float32)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and self.inf.max_seq_len > limit:
            raise ConfigError(f"influence.max_seq_len: {self.inf.max_seq_len} exceeds the model's "
                              f"max_position_embeddings {limit}")
        self.model = model.to(self.device).eval().requires_grad_(False)
        try:
            check_plain_head(self.model)
        except AutomixerError as e:
            raise AutomixerError(f"{self.checkpoint}: {e}") from None
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos

    # ---------------------------------------------------------------- inputs

    def fingerprint(self) -> str:
        from automixer_ops.checkpoints import checkpoint_identity

        made = read_marker(self.run.valsets)  # absent for validation sets written by hand
        wanted = list(self.cfg.tasks.docs.validation)
        if made is not None and made.get("validation") != wanted:
            written = (f"documents [{made['validation'][0]}, {made['validation'][1]})"
                       if _is_range(made.get("validation")) else
                       f"the first {made['val_docs_per_task']} documents (an older version)"
                       if isinstance(made.get("val_docs_per_task"), int) else "another setting")
            raise ConfigError(f"tasks.docs.validation: [{wanted[0]}, {wanted[1]}), but {self.run.valsets} was "
                              f"written with {written}; rerun `automixer evaluate` (it rewrites the validation sets)")
        valsets = {t: _valset_hash(self.run.valset(t)) for t in self.sampler.tasks}
        payload = {"checkpoint": checkpoint_identity(self.checkpoint), "corpus": self.corpus_fingerprint,
                   "valsets": valsets, "max_seq_len": self.inf.max_seq_len, "fit_samples": self.inf.fit_samples,
                   "seed": self.cfg.run.seed if self.inf.fit_samples is not None else None,  # picks the fit set
                   "precision": self.inf.precision}
        return fingerprint(payload)

    def validation_batches(self):
        import torch

        from automixer_ops.influence.batching import length_batches, make_batch, validation_sequences

        seqs, firsts, coeffs = [], [], []
        for task in self.sampler.tasks:
            # The same token sequences as evaluate's gold_ll (cut from the left, as lm-eval does).
            encoded = validation_sequences(self.run.path, self.tokenizer, task, self.eos, self.inf.max_seq_len)
            for ids, first in encoded:
                seqs.append(ids)
                firsts.append(first)
                coeffs.append(1.0 / (len(self.sampler.tasks) * len(encoded)))
        for idx in length_batches([len(s) for s in seqs], self.inf.batch_tokens):
            yield (make_batch([seqs[i] for i in idx], [firsts[i] for i in idx], self.pad).to(self.device),
                   torch.tensor([coeffs[i] for i in idx]))

    def read_shard(self, index: int, fit_only: bool = False) -> list[Doc]:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(self.shards[index], columns=["id", "text", "n_tokens"])
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise AutomixerError(f"{self.shards[index]}: not a readable corpus shard ({_first_line(e)}); rerun "
                                 "`automixer prepare --force`") from None
        ids, texts, n_tokens = (table.column(c).to_pylist() for c in ("id", "text", "n_tokens"))
        rows = range(len(ids))
        if fit_only and self.inf.fit_samples is not None:
            chosen = self.fit_rows()
            rows = [r for r in rows if (index, r) in chosen]
        enc = self.tokenizer.backend_tokenizer.encode_batch_fast([texts[r] for r in rows], add_special_tokens=False)
        keep = self.inf.max_seq_len - 1
        return [Doc(ids[r], n_tokens[r], [self.eos] + e.ids[:keep]) for r, e in zip(rows, enc)]

    def fit_rows(self) -> set[tuple[int, int]]:
        """The seeded uniform fit subsample as (shard, row) pairs."""
        if not hasattr(self, "_fit_rows"):
            import pyarrow.parquet as pq

            counts = [pq.ParquetFile(p).metadata.num_rows for p in self.shards]
            total = sum(counts)
            pick = np.random.default_rng(self.cfg.run.seed).choice(total, min(self.inf.fit_samples, total),
                                                                   replace=False)
            starts = np.cumsum([0] + counts)
            shard = np.searchsorted(starts, pick, side="right") - 1
            self._fit_rows = {(int(s), int(p - starts[s])) for s, p in zip(shard, pick)}
        return self._fit_rows

    def n_docs(self, indices, fit_only: bool = False) -> int:
        """Documents read_shard(i, fit_only) gives for the shards `indices`, from the Parquet footers (for
        progress totals); 0 when that cannot be told (a damaged shard: read_shard names it in its turn)."""
        import pyarrow.parquet as pq

        try:
            if fit_only and self.inf.fit_samples is not None:
                wanted = set(indices)
                return sum(1 for shard, _ in self.fit_rows() if shard in wanted)
            return sum(pq.ParquetFile(self.shards[i]).metadata.num_rows for i in indices)
        except Exception:  # pyarrow raises several types for a damaged file
            return 0

    def batches(self, docs: list[Doc]) -> Iterator[tuple[list[int], object]]:
        from automixer_ops.influence.batching import length_batches, make_batch

        for idx in length_batches([len(d.ids) for d in docs], self.inf.batch_tokens):
            yield idx, make_batch([docs[i].ids for i in idx], [1] * len(idx), self.pad).to(self.device)

    # ---------------------------------------------------------------- the fit

    def fit(self, force: bool = False) -> tuple[object, str]:
        """Passes 0-2; returns the Fit (loaded when already done with the same inputs) and its fingerprint."""
        from automixer_ops.influence.datainf import SeriesSums, finish, weighted_gradient_sum
        from automixer_ops.influence.grads import BatchGrads, Workspace

        fp = self.fingerprint()
        done = None if force else self.read_fit_json()  # forced: even a damaged fit.json is replaced
        why = "--force" if force else "inputs changed since the last fit"
        if done is not None and done["fingerprint"] == fp and not force:
            try:
                fit = self.load_fit(fp)
                self.log(f"step {self.sampler.step}: fit already done (n={done['n']:,})")
                return fit, fp
            except AutomixerError:
                why = f"{FIT_TENSORS} is missing or from another fit"
        val_batches = list(self.validation_batches())  # read and checked before any output is removed
        if done is not None or force:  # forced: a half-done fit's work goes too, not only a finished fit
            self.log(f"step {self.sampler.step}: {why}; refitting and rescoring")
            self.remove_outputs()
        series = SeriesSums(self.model)
        # Work left by other inputs, another file layout or other series settings (a code update) is not resumed.
        work, work_id = self.out / WORK, f"{fp} {WORK_FORMAT} {series.settings()}"
        if (work / "fingerprint").is_file() and (work / "fingerprint").read_text() != work_id:
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(work / "fingerprint", work_id)

        t0 = time.perf_counter()
        with heartbeat(f"fit step {self.sampler.step}", f"validation gradient ({len(val_batches)} batches)"):
            v = weighted_gradient_sum(self.model, val_batches, autocast_dtype=self.autocast)
        v = {k: t.float() for k, t in v.items()}
        _check_finite(v, "the validation gradient", self.sampler.step)
        self.log(f"step {self.sampler.step}: validation gradient of {', '.join(self.sampler.tasks)} "
                 f"({time.perf_counter() - t0:.1f} s)")

        # Pass 1: statistics per shard, the series sums checkpointed every minute with the next shard to do.
        import torch

        names, ws = list(v), Workspace()
        ckpt = _ShardCheckpoint(work / "pass1.pt", len(self.shards), self.device)
        if ckpt.state is not None:
            series.load_state_dict(ckpt.state["series"])
        todo = range(ckpt.first, len(self.shards))
        with Progress(f"fit step {self.sampler.step}: pass 1", self.n_docs(todo, fit_only=True),
                      "doc") as progress:
            for i in todo:
                self._pass1_shard(i, v, series, ws, work / f"stats-{i:05d}.parquet", progress)
                progress.doing(f"checkpointing after shard {i + 1}")
                ckpt.done(i, {"series": series.state_dict()})
                progress.doing(None)
        n = series.n
        if n == 0:
            raise AutomixerError("the fit set is empty")
        lam = series.damping()
        self.log(f"step {self.sampler.step}: pass 1 done, n={n:,}, lambda " +
                 ", ".join(f"{k}={lam[k]:.3e}" for k in names))

        # Pass 2: only the documents with a remainder; the fp64 sum checkpointed every minute.
        ckpt = _ShardCheckpoint(work / "pass2.pt", len(self.shards), self.device)
        c_sum, reread = (ckpt.state["c_sum"], ckpt.state["reread"]) if ckpt.state else (series.combine(lam), 0)
        todo = range(ckpt.first, len(self.shards))
        with Progress(f"fit step {self.sampler.step}: pass 2", len(todo), "shard") as progress:
            for i in todo:
                s = _read_stats(work / f"stats-{i:05d}.parquet")
                rem = {k: t.numpy() for k, t in series.remainders(_stats_obj(s, names), lam).items()}
                need = np.flatnonzero(np.any([rem[k] != 0 for k in names], axis=0))
                if len(need):
                    progress.doing(f"rereading {len(need):,} documents of shard {i + 1}")
                    docs = self.read_shard(i, fit_only=True)
                    if [d.id for d in docs] != s["id"].tolist():
                        raise AutomixerError(f"{self.shards[i]}: changed since pass 1 of the fit; rerun with --force")
                    docs = [docs[j] for j in need]
                    for idx, batch in self.batches(docs):
                        bg = BatchGrads(self.model, batch, autocast_dtype=self.autocast, workspace=ws)
                        for k in names:
                            bg.accumulate(torch.from_numpy(rem[k][need[idx]]), {k: c_sum[k]})
                    reread += len(need)
                    progress.doing(None)
                ckpt.done(i, {"c_sum": c_sum, "reread": reread})
                progress.update(1)
        self.log(f"step {self.sampler.step}: pass 2 reread {reread:,} of {n:,} fit documents")
        fit = finish(v, c_sum, n, lam, series.sum_sq, reread)
        _check_finite(fit.r, "r (the fit)", self.sampler.step)
        self.write_fit(fit, fp)
        self.log(f"step {self.sampler.step}: fit done in {time.perf_counter() - t0:.1f} s -> {self.out / FIT_JSON}")
        return fit, fp

    def _pass1_shard(self, i: int, v, series, ws, path: Path, progress: Progress) -> None:
        """Statistics of shard i's fit documents to `path`, their series terms into `series` (in memory: the
        caller checkpoints it after the shard; a shard that fails leaves only the last checkpoint)."""
        import pyarrow as pa
        import torch

        from automixer_ops.influence.datainf import pass1_batch

        docs = self.read_shard(i, fit_only=True)
        cols = {f"{p}_{k}": np.zeros(len(docs), bool if p == "series" else np.float32)
                for k in v for p in ("sq", "vdot", "series")}
        t0, bad = time.perf_counter(), []
        for idx, batch in self.batches(docs):
            st, _ = pass1_batch(self.model, batch, v, series, ws, self.inf.norm_mode, autocast_dtype=self.autocast)
            for k in v:
                cols[f"sq_{k}"][idx] = st.sq[k].cpu().numpy()
                cols[f"vdot_{k}"][idx] = st.vdot[k].cpu().numpy()
                cols[f"series_{k}"][idx] = st.in_series[k].cpu().numpy()
            bad += _nonfinite_ids(torch.stack([*st.sq.values(), *st.vdot.values()]), [docs[j].id for j in idx])
            progress.update(len(idx), tokens=sum(len(docs[j].ids) - 1 for j in idx))
        _raise_if_bad(bad, self.shards[i], "gradient")
        table = pa.table({"id": pa.array([d.id for d in docs], pa.string()), **cols})
        _write_parquet(table, path, {})
        progress.log_through(self.log)(f"step {self.sampler.step}: pass 1 shard {i + 1}/{len(self.shards)} "
                 f"({len(docs):,} docs, {time.perf_counter() - t0:.1f} s)")

    def read_fit_json(self) -> dict | None:
        """fit.json, checked for what the steps read from it; None when there is none."""
        path = self.out / FIT_JSON
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AutomixerError(f"{path}: damaged ({e}); {self.refit_hint()}") from None
        if not isinstance(info, dict):
            raise AutomixerError(f"{path}: expected a JSON object; {self.refit_hint()}")
        for key, kind in FIT_KEYS.items():
            if not isinstance(info.get(key), kind):
                raise AutomixerError(f"{path}: field {key!r} is missing or not a JSON {kind.__name__}; "
                                     f"{self.refit_hint()}")
        return info

    def refit_hint(self) -> str:
        return f"rerun `automixer score --step {self.sampler.step} --fit-only --force`"

    def lock(self, shared: bool):
        """The sampler's fit lock (see FIT_LOCK)."""
        what = "a fit of" if shared else "a fit or the scoring of"
        return file_lock(self.out / FIT_LOCK, shared=shared,
                         busy=f"{self.out / FIT_LOCK}: {what} sampler step {self.sampler.step} is running in another "
                              "process; retry when it ends")

    def write_fit(self, fit, fp: str) -> None:
        from safetensors.torch import save_file

        tensors = {f"r.{k}": t.contiguous().cpu() for k, t in fit.r.items()}
        tensors.update({f"v.{k}": t.contiguous().cpu() for k, t in fit.v.items()})
        atomic_write(self.out / FIT_TENSORS, lambda tmp: save_file(tensors, str(tmp), metadata={"fingerprint": fp}))
        info = {"fingerprint": fp, "step": self.sampler.step, "tasks": self.sampler.tasks,
                "checkpoint": str(self.checkpoint), "n": fit.n, "layers": list(fit.r),
                "dims": fit.dims, "lambda": fit.lam, "sum_sq_norm": fit.sum_sq, "pass2_reread": fit.reread,
                "settings": asdict(self.inf), "seed": self.cfg.run.seed,
                "formula": "utility = sum_l r_l . g_l ; r_l = (v_l - mean_i c_il g_il) / lambda_l"}
        atomic_write_text(self.out / FIT_JSON, json.dumps(info, indent=2) + "\n")  # written last: the marker

    def load_fit(self, fp: str):
        """The finished fit of the inputs `fp`. Both files must carry `fp`: fit.json is written after
        fit.safetensors, so a refit killed (or running) between the two leaves them from different fits."""
        from safetensors import safe_open

        from automixer_ops.influence.datainf import Fit

        info, path = self.read_fit_json(), self.out / FIT_TENSORS
        meta = None
        if path.is_file():
            try:
                with safe_open(str(path), "pt", device=str(self.device)) as f:
                    meta, t = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
            except Exception as e:  # SafetensorError, OSError, ... for a truncated or damaged file
                raise AutomixerError(f"{path}: damaged ({_first_line(e)}); {self.refit_hint()}") from None
        if info is None or info["fingerprint"] != fp or meta is None or meta.get("fingerprint") != fp:
            # The caller holds the fit lock, so no fit is running: one was stopped between writing the two files.
            raise AutomixerError(f"{self.out}: {FIT_JSON} and {FIT_TENSORS} are not both from the fit of the current "
                                 f"inputs (a refit was stopped); rerun `automixer score --step "
                                 f"{self.sampler.step} --fit-only`")
        missing = [f"{p}.{k}" for k in info["layers"] for p in ("r", "v") if f"{p}.{k}" not in t]
        if missing:
            raise AutomixerError(f"{path}: no tensor {', '.join(missing)} for the layers fit.json lists; "
                                 f"{self.refit_hint()}")
        return Fit(n=info["n"], dims=info["dims"], lam=info["lambda"], sum_sq=info["sum_sq_norm"],
                   r={k: t[f"r.{k}"] for k in info["layers"]}, v={k: t[f"v.{k}"] for k in info["layers"]},
                   reread=info.get("pass2_reread", 0))

    def remove_outputs(self) -> None:
        for p in list(self.out.glob("part-*.parquet")) + [self.out / FIT_JSON, self.out / FIT_TENSORS]:
            p.unlink(missing_ok=True)
        shutil.rmtree(self.out / WORK, ignore_errors=True)

    # ---------------------------------------------------------------- scoring

    def score_shards(self, shards: range, fit, fp: str) -> int:
        """Pass 3 for the given corpus shards with `fit` (made from inputs `fp`, which labels the parts); returns
        how many were scored (not skipped)."""
        import pyarrow as pa

        from automixer_ops.influence.grads import BatchGrads, Workspace

        scored, ws = 0, Workspace()
        with Progress(f"score step {self.sampler.step}", self.n_docs(shards), "doc") as progress:
            log = progress.log_through(self.log)
            for i in shards:
                path = self.out / self.shards[i].name
                if path.is_file() and parquet_metadata(path).get("fit") == fp:
                    progress.skip(self.n_docs([i]))
                    continue
                t0 = time.perf_counter()
                docs = self.read_shard(i)
                util, bad = np.zeros(len(docs), np.float32), []
                for idx, batch in self.batches(docs):
                    bg = BatchGrads(self.model, batch, autocast_dtype=self.autocast, project=self.projected(fit),
                                    workspace=ws)
                    u = sum(bg.dots(fit.r).values())
                    bad += _nonfinite_ids(u[None], [docs[j].id for j in idx])
                    util[idx] = u.cpu().numpy()
                    progress.update(len(idx), tokens=sum(len(docs[j].ids) - 1 for j in idx))
                _raise_if_bad(bad, self.shards[i], "utility")
                table = pa.table({"id": pa.array([d.id for d in docs], pa.string()), "utility": util,
                                  "n_tokens": pa.array([d.n_tokens for d in docs], pa.int64())})
                n_tok = sum(len(d.ids) - 1 for d in docs)
                dt = time.perf_counter() - t0
                # The time and tokens go with the part: the report's throughput per shard (file times are not
                # the work's when shards were scored in parallel).
                _write_parquet(table, path, {"fit": fp, "seconds": f"{dt:.3f}", "scored_tokens": str(n_tok)})
                log(f"step {self.sampler.step}: scored shard {i + 1}/{len(self.shards)} ({len(docs):,} docs, "
                    f"{n_tok / dt:,.0f} tok/s)")
                scored += 1
        return scored

    @staticmethod
    def projected(fit) -> tuple:
        """r of the output (or tied) layer: formed in the same matmul as the backward through the head."""
        return tuple(t for k, t in fit.r.items() if k != "embed")

    def check_fit_current(self) -> str:
        """The fingerprint of the current inputs, when the finished fit was made from them; else an error."""
        info = self.read_fit_json()
        if info is None:
            raise AutomixerError(f"{self.out / FIT_JSON}: no fit for sampler step {self.sampler.step}; "
                                 f"run `automixer score --step {self.sampler.step} --fit-only` first")
        if info["fingerprint"] != self.fingerprint():
            raise AutomixerError(f"{self.out / FIT_JSON}: the fit was made with other inputs (checkpoint, corpus, "
                                 f"validation sets or influence settings); rerun `automixer score --step "
                                 f"{self.sampler.step} --fit-only`")
        return info["fingerprint"]


def score(cfg: Config, step: int | None = None, shards: str | None = None, fit_only: bool = False,
          force: bool = False, log: Callable[[str], None] = print) -> list[Path]:
    """The CLI step: fit and/or score; returns the sampler output directories it touched."""
    run = RunDir(cfg.run_dir)
    if shards is not None and step is None:
        raise ConfigError("--shards needs --step (one sampler's shards at a time)")
    if shards is not None:  # checked before a model is loaded
        parse_shards(shards, len(run.corpus_shards()))
    steps = [step] if step is not None else [s.step for s in read_selection(run).samplers]
    outs = []
    for s in steps:
        scorer = Scorer(cfg, s, log)
        if shards is not None:  # a mapped job: the fit must already be there
            todo = parse_shards(shards, len(scorer.shards))
            # No lock file: no fit has ever started here, and check_fit_current says so (without creating one).
            with scorer.lock(shared=True) if (scorer.out / FIT_LOCK).exists() else nullcontext():
                fp = scorer.check_fit_current()
                fit = scorer.load_fit(fp)
                n = scorer.score_shards(todo, fit, fp)
        else:
            with scorer.lock(shared=False):
                fit, fp = scorer.fit(force=force)
                todo = range(len(scorer.shards))
                n = 0 if fit_only else scorer.score_shards(todo, fit, fp)
        if not fit_only:
            log(f"step {s}: {n} shard(s) scored, {len(todo) - n} already done -> {scorer.out}")
        outs.append(scorer.out)
    return outs


# -------------------------------------------------------------------- helpers

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _is_range(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)


def _valset_hash(path: Path) -> str:
    if not path.is_file():
        raise AutomixerError(f"{path}: no validation set; run `automixer evaluate` first")
    return file_hash(path)


def _check_finite(tensors: dict, what: str, step: int) -> None:
    import torch

    bad = [k for k, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise AutomixerError(f"step {step}: {what} has NaN or infinite values in layer(s) {', '.join(bad)}")


def _nonfinite_ids(values, ids: list[str]) -> list[str]:
    """Ids of the samples (columns of `values`) with a NaN or infinite value."""
    import torch

    return [ids[j] for j in (~torch.isfinite(values)).any(0).nonzero().flatten().tolist()]


def _raise_if_bad(bad: list[str], shard: Path, what: str) -> None:
    if bad:
        names = ", ".join(repr(b) for b in bad[:5])
        raise AutomixerError(f"{shard}: {len(bad)} document(s) give a NaN or infinite {what}, e.g. id {names}; "
                             "nothing was written for this shard")


def _read_stats(path: Path) -> dict:
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    return {c: (np.asarray(t.column(c).to_pylist(), dtype=object) if c == "id" else t.column(c).to_numpy())
            for c in t.column_names}


def _stats_obj(s: dict, names: list[str]):
    import torch

    from automixer_ops.influence.datainf import SampleStats

    return SampleStats(sq={k: torch.tensor(s[f"sq_{k}"]) for k in names},
                       vdot={k: torch.tensor(s[f"vdot_{k}"]) for k in names},
                       in_series={k: torch.tensor(s[f"series_{k}"]) for k in names})


def _write_parquet(table, path: Path, meta: dict) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(table.replace_schema_metadata({k: str(v) for k, v in meta.items()}),
                                                  tmp))


class _ShardCheckpoint:
    """The state of a resumable pass over the shards: loaded from `path` when there, and saved there (with the
    next shard to do) every CHECKPOINT_EVERY_S and after the last shard."""

    def __init__(self, path: Path, n_shards: int, device):
        import torch

        self.path, self.n_shards = path, n_shards
        self.state = None
        if path.is_file():
            try:  # our own tensors and numbers: weights_only refuses anything else
                self.state = torch.load(path, map_location=device, weights_only=True)
            except Exception as e:  # UnpicklingError, RuntimeError, EOFError for a damaged file
                raise AutomixerError(f"{path}: cannot resume the fit from it ({_first_line(e)}); rerun with "
                                     "--force to start the fit again") from None
        self.first = self.state["next_shard"] if self.state else 0  # the shard to resume from
        self._saved = time.perf_counter()

    def done(self, i: int, state: dict) -> None:
        """Shard i is done; `state` is what the pass resumes from after it."""
        if time.perf_counter() - self._saved > CHECKPOINT_EVERY_S or i == self.n_shards - 1:
            _atomic_torch_save({**state, "next_shard": i + 1}, self.path)
            self._saved = time.perf_counter()


def _atomic_torch_save(obj, path: Path) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))
