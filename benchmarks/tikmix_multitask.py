"""Group Influence for T target tasks: one multi-task fit + score against T single-task runs (issue 17).

Per-task GI needs one DataInf r per task. lambda depends only on the fit samples and r is linear
in the validation gradient v, so `tikmix.multitask` fits and scores all T tasks in the same passes
(several right-hand sides). This script measures what that saves on the demo proxy:

  multi, T tasks     multi_task_fit(model, {T tasks}, fit batches) + multi_task_utilities(score batches)
                     (v per task; pass 1: norms + T dots; pass 2: T-row weighted sums; scoring: T dots)
  one single run     fit_in_memory(model, one task, fit batches) + utilities(score batches): the path of
                     `automixer score` (v; pass 1 with the series sums; pass 2 rereads only the samples
                     the series does not give to 1e-8; scoring)
  separate, T tasks  the first T single runs of the same round, summed (the runs are independent, so
                     T separate runs cost exactly that; timing each task once keeps the whole run short)
  one body pass      BatchGrads(model, batch) over the fit batches: the forward + activation backward
                     every pass pays, whatever T (for reading the numbers)
  v                  the validation gradients of all the tasks (weighted_gradient_sum), also for reading

T = 1, 2, 4, 8 (--tasks). Interleaved rounds (the order of the operations rotated every round) after
one warmup run of each on two batches; medians of --repeats rounds. Peak memory: growth of the
process's peak RSS (VmHWM, reset before each call) during the call. Agreement, in the same run:
multi at the largest T against the single runs (lambda, r per layer, utilities; max abs diff / max abs).

Model and data: the demo run when it is there (runs/demo: `tiny` proxy, latest checkpoint, its
8192-token tokenizer, the 8 tasks' validation pairs in valsets/ (32 pairs each, tokenized as the
scorer does), fit and scored documents: packed 256-token windows of the real corpus, as the
proxy trains); else the embedded corpus prepared into a temporary run (see influence_cost.py), a
randomly initialised `tiny` model (seed 0) and random-token validation pairs. Batches of up to
8192 padded tokens (influence.batch_tokens' default), fp32, the model in eval mode with
requires_grad off, as the scorer runs it.

    .venv/bin/python benchmarks/tikmix_multitask.py --repeats 3 --out benchmarks/results/tikmix_multitask.md

On a GPU (untested here): add --device cuda, and e.g. --preset 25m --fit-docs 1024 --score-docs 4096.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from influence_cost import (ROOT, corpus_docs, corpus_token_ids, demo_run, load_line, load_model,  # noqa: E402
                            load_tokenizer, machine_line, packed_windows)
from influence_vs_dattri import peak_rss_growth  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

BATCH_TOKENS = 8192  # influence.batch_tokens' default


def validation_sets(run: Path, tok, n_tasks: int, pairs: int, max_len: int) -> tuple[dict, str]:
    """task -> [(Batch, averaging weights)] as the scorer builds them for a one-task sampler; and a description."""
    from automixer_ops.influence.batching import length_batches, make_batch, pair_sequences
    from automixer_ops.tasks import read_validation_set

    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    names = sorted(p.stem for p in (run / "valsets").glob("*.jsonl"))[:n_tasks]
    if len(names) == n_tasks:
        encoded = {t: pair_sequences(tok, [(p["context"], p["continuation"])
                                           for p in read_validation_set(run, t)[:pairs]], eos, max_len)
                   for t in names}
        what = f"the demo's validation pairs (`{run.relative_to(ROOT)}/valsets`, first {pairs} per task)"
    else:  # no demo run: random token pairs of 24..160 tokens, the last 1..16 scored
        rng = np.random.default_rng(1)
        names = [f"task{i}" for i in range(n_tasks)]
        encoded = {}
        for t in names:
            lengths = rng.integers(24, 161, pairs)
            encoded[t] = [([eos] + rng.integers(0, len(tok), n - 1).tolist(), int(n - rng.integers(1, 17)))
                          for n in lengths]
        what = f"random token ids ({pairs} pairs per task, 24..160 tokens, the last 1..16 scored)"
    out = {}
    for t, enc in encoded.items():
        seqs, firsts = [s for s, _ in enc], [f for _, f in enc]
        w = 1.0 / len(seqs)
        out[t] = [(make_batch([seqs[i] for i in idx], [firsts[i] for i in idx], pad), torch.full((len(idx),), w))
                  for idx in length_batches([len(s) for s in seqs], BATCH_TOKENS)]
    return out, what


def setup(args):
    """Model, per-task validation batches, fit batches, scored batches (all on args.device) and what they are."""
    from automixer_ops.influence.batching import make_batch

    dev = torch.device(args.device)
    with demo_run() as (run, ckpt):
        tok = load_tokenizer(run)
        model = load_model(args.preset, tok, ckpt).eval().requires_grad_(False).to(dev)
        val, val_what = validation_sets(run, tok, max(args.tasks), args.pairs, args.seq_len)
        ids = corpus_token_ids(tok, [d["text"] for d in corpus_docs(run)])
        source = (f"`{run.relative_to(ROOT)}` (checkpoint `{ckpt.name}`)"
                  if ckpt and args.preset == "tiny" and run.is_relative_to(ROOT)
                  else "random init (seed 0); tokenizer and corpus: " + (
                      f"`{run.relative_to(ROOT)}`" if run.is_relative_to(ROOT) else "the embedded corpus, prepared"))
    val = {t: [(b.to(dev), w.to(dev)) for b, w in bs] for t, bs in val.items()}
    windows = packed_windows(ids, tok.eos_token_id, args.seq_len, args.fit_docs + args.score_docs, seed=0)
    per = max(1, BATCH_TOKENS // args.seq_len)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def batches(x: torch.Tensor) -> list:
        return [make_batch(x[i:i + per].tolist(), [1] * len(x[i:i + per]), pad).to(dev)
                for i in range(0, len(x), per)]

    return model, val, batches(windows[:args.fit_docs]), batches(windows[args.fit_docs:]), {
        "source": source, "val": val_what, "per": per,
        "params": sum(w.numel() for w in model.parameters()), "vocab": model.config.vocab_size,
        "hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers}


def clock(dev: torch.device) -> float:
    """perf_counter once the device's queued work is done (CUDA runs asynchronously)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def peak_growth_mib(fn, dev: torch.device):
    """fn() and the growth of peak memory during it in MiB: process RSS on CPU, allocated memory on CUDA."""
    if dev.type != "cuda":
        out, gib = peak_rss_growth(fn)
        return out, (gib or 0.0) * 1024
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    start = torch.cuda.memory_allocated(dev)
    out = fn()
    torch.cuda.synchronize(dev)
    return out, (torch.cuda.max_memory_allocated(dev) - start) / 2**20


def make_ops(model, val: dict, fit_b: list, score_b: list, tasks: list[int]) -> dict:
    """name -> fn() returning (seconds per part, result): every timed operation."""
    from automixer_ops.influence.datainf import fit_in_memory, utilities, weighted_gradient_sum
    from automixer_ops.influence.grads import BatchGrads, Workspace
    from automixer_ops.tikmix.multitask import multi_task_fit, multi_task_utilities

    names, dev = list(val), next(model.parameters()).device

    def multi(T: int):
        t0 = clock(dev)
        fit = multi_task_fit(model, {t: val[t] for t in names[:T]}, lambda: fit_b)
        t1 = clock(dev)
        u = multi_task_utilities(model, score_b, fit)
        return {"fit": t1 - t0, "score": clock(dev) - t1}, (fit, u)

    def single(t: str):
        t0 = clock(dev)
        fit = fit_in_memory(model, val[t], fit_b)
        t1 = clock(dev)
        u = utilities(model, score_b, fit)
        return {"fit": t1 - t0, "score": clock(dev) - t1}, (fit, u)

    def body():
        t0, ws = clock(dev), Workspace()
        for b in fit_b:
            BatchGrads(model, b, workspace=ws)
        return {"fit": clock(dev) - t0, "score": 0.0}, None

    def v_all():
        t0 = clock(dev)
        for t in names[:max(tasks)]:
            weighted_gradient_sum(model, val[t])
        return {"fit": clock(dev) - t0, "score": 0.0}, None

    ops = {f"multi{T}": (lambda T=T: multi(T)) for T in tasks}
    ops.update({f"single:{t}": (lambda t=t: single(t)) for t in names[:max(tasks)]})
    ops["body"], ops["v"] = body, v_all
    return ops


def agreement(multi_out, singles: dict) -> dict:
    """Max over tasks of |multi - single| / max |single| for lambda, r (each layer) and the utilities."""
    fit, u = multi_out
    worst = {"lam": 0.0, "u": 0.0}
    for j, t in enumerate(fit.tasks):
        s_fit, s_u = singles[t]
        worst["lam"] = max(worst["lam"], *(abs(fit.lam[k] - s_fit.lam[k]) / s_fit.lam[k] for k in s_fit.lam))
        for k, r in s_fit.r.items():
            worst[f"r_{k}"] = max(worst.get(f"r_{k}", 0.0), float((fit.r[t][k] - r).abs().max() / r.abs().max()))
        worst["u"] = max(worst["u"], float((u[:, j] - s_u).abs().max() / s_u.abs().max()))
    return worst


def run_rounds(ops: dict, fit_b: list, score_b: list, args) -> tuple[dict, dict, dict, dict]:
    """Warmup, then --repeats interleaved rounds: (times[name] per round, peaks[name] MiB, last results, rereads)."""
    warm = make_ops(*args.model_val, fit_b[:2], score_b[:2], args.tasks)
    for fn in warm.values():
        fn()
    times = {k: [] for k in ops}
    peaks: dict[str, float] = {}
    last: dict = {}
    names = list(ops)
    for rnd in range(args.repeats):
        order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate: no op always first
        for k in order:
            (parts, out), peak = peak_growth_mib(ops[k], torch.device(args.device))
            times[k].append(parts)
            peaks[k] = max(peaks.get(k, 0.0), peak)
            last[k] = out
        print(f"round {rnd + 1}: " + ", ".join(f"{k} {sum(times[k][-1].values()):.2f} s" for k in names), flush=True)
    rereads = {k: out[0].reread for k, out in last.items() if k.startswith("single:")}
    return times, peaks, last, rereads


def report(times, peaks, last, rereads, info, args, load0, load1, total) -> str:
    tasks, cuda = args.tasks, args.device.startswith("cuda")
    singles = [k for k in times if k.startswith("single:")]
    tot = {k: [sum(p.values()) for p in v] for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in tot.items()}
    part = {k: {p: statistics.median(x[p] for x in v) for p in ("fit", "score")} for k, v in times.items()}
    sep = {T: [sum(tot[s][r] for s in singles[:T]) for r in range(args.repeats)] for T in tasks}
    sep_med = {T: statistics.median(v) for T, v in sep.items()}
    speed = {T: [s / m for s, m in zip(sep[T], tot[f"multi{T}"])] for T in tasks}
    t1, tmax = tasks[0], tasks[-1]
    m1 = med[f"multi{t1}"]
    slope = (med[f"multi{tmax}"] - m1) / max(1, tmax - t1)
    one = statistics.median(x for s in singles for x in tot[s])
    s_fit = statistics.median(x["fit"] for s in singles for x in times[s])
    s_score = statistics.median(x["score"] for s in singles for x in times[s])
    agree = agreement(last[f"multi{tmax}"], {s.split(":", 1)[1]: last[s] for s in singles})
    n_fit, n_score, body = args.fit_docs, args.score_docs, med["body"]
    mem = "peak allocated growth, multi (MiB)" if cuda else "peak RSS growth, multi (MiB)"
    cmd = (f".venv/bin/python benchmarks/tikmix_multitask.py --repeats {args.repeats} --fit-docs {n_fit} "
           f"--score-docs {n_score} --tasks {','.join(map(str, tasks))} --pairs {args.pairs} "
           f"--seq-len {args.seq_len} --preset {args.preset} --device {args.device} "
           f"--out benchmarks/results/tikmix_multitask.md")
    device = (f"GPU: {torch.cuda.get_device_name(torch.device(args.device))}. " if cuda else "")
    lines = [
        f"# Group Influence: one multi-task fit + score vs one single-task run per task ({'GPU' if cuda else 'CPU'})",
        "",
        device + machine_line() + "." + ("" if cuda else " The cores are shared with other work, hence medians of "
                                          "interleaved rounds."),
        load_line(load0, load1) + ".",
        f"Model: preset `{args.preset}`, {info['params']:,} parameters (vocab {info['vocab']}, hidden "
        f"{info['hidden']}, {info['layers']} layers), {info['source']}. Fit set: {n_fit} documents; scored: "
        f"{n_score} other documents; each a packed {args.seq_len}-token window of the real corpus, in batches of "
        f"{info['per']} (8192 padded tokens). Validation: {info['val']}; a task's v is the mean gradient over its "
        f"pairs. fp32, eval mode, requires_grad off. Median of {args.repeats} interleaved rounds (the order of the "
        f"{len(times)} operations rotated every round) after a warmup on two batches. Whole run: {total:.0f} s.",
        "",
        f"Reproduce: `{cmd}`",
        "",
        f"| T tasks | multi: fit (s) | multi: score (s) | **multi: fit + score (s)** | ÷ multi at T={t1} | "
        f"per extra task since the previous T (s) | separate: T single runs (s) | "
        f"**speed-up separate ÷ multi** (median; per round) | {mem} |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i, T in enumerate(tasks):
        k = f"multi{T}"
        extra = f"{(med[k] - med[f'multi{tasks[i - 1]}']) / (T - tasks[i - 1]):.2f}" if i else "–"
        lines.append(f"| {T} | {part[k]['fit']:.2f} | {part[k]['score']:.2f} | **{med[k]:.2f}** | {med[k] / m1:.2f} | "
                     f"{extra} | {sep_med[T]:.2f} | **{statistics.median(speed[T]):.2f}×** "
                     f"({', '.join(f'{x:.2f}' for x in speed[T])}) | {peaks[k]:.0f} |")
    lines += [
        "",
        f"One single-task run (`fit_in_memory` + `utilities`, the `score` step's path), median over "
        f"{len(singles)} tasks × {args.repeats} rounds: **{one:.2f} s** (fit {s_fit:.2f} + score {s_score:.2f}; "
        f"runs {min(x for s in singles for x in tot[s]):.2f}–{max(x for s in singles for x in tot[s]):.2f} s); "
        f"peak memory growth up to {max(peaks[s] for s in singles):.0f} MiB. Their pass 2 reread "
        f"{max(rereads.values())} fit samples (pass 1's series sums gave every coefficient). One body pass over the "
        f"{n_fit} fit documents (`BatchGrads(model, batch)` alone: forward, softmax residual, activation "
        f"backward): **{body:.2f} s** (runs {', '.join(f'{x:.2f}' for x in tot['body'])}).",
        "",
        f"**Cost per extra task** (multi, (T={tmax} − T={t1}) ÷ {tmax - t1}, medians): **{slope:.2f} s = "
        f"{slope / m1:.2f} of the T={t1} run**, against {one:.2f} s for one more separate run. Speed-up at "
        f"T={tmax}: **{statistics.median(speed[tmax]):.2f}×**; at T={t1} the multi path costs "
        f"{m1 / sep_med[t1]:.2f}× one single run.",
        "",
        f"Agreement (multi at T={tmax} against the {len(singles)} single runs, worst task; max abs diff ÷ max abs): "
        f"λ {agree['lam']:.1e}, " + ", ".join(f"r_{k[2:]} {v:.1e}" for k, v in agree.items() if k.startswith("r_"))
        + f", utilities {agree['u']:.1e}.",
        "",
        reading(m1, one, slope, body, med["v"] / max(tasks), sep_med, speed, tasks, rereads, args),
        "",
        GPU_NOTE if not cuda else "",
    ]
    return "\n".join(lines)


def reading(m1, one, slope, body, v_task, sep_med, speed, tasks, rereads, args) -> str:
    """What the numbers say: what every T shares, what a task adds, where the multi path starts to pay."""
    n_fit, n_score, t1 = args.fit_docs, args.score_docs, tasks[0]
    multi_passes, single_passes = body * (2 + n_score / n_fit), body * (1 + n_score / n_fit)
    pays = next((T for T in tasks if statistics.median(speed[T]) > 1), None)
    why = (f"The multi path at T={t1} costs {m1 / sep_med[t1]:.2f}× a single run because it reads the fit set twice "
           f"(pass 2 forms the exact coefficients' sum, no series) where the single run reads it once (pass 1's series "
           f"sums; its pass 2 reread {max(rereads.values())} samples). " if m1 > sep_med[t1] else "")
    return (
        f"Reading. Shared, whatever T: the model passes. By the body-pass timing, the multi path's three passes "
        f"(passes 1 and 2 over the {n_fit} fit documents, scoring over the {n_score}) are about {multi_passes:.1f} s "
        f"of its {m1:.2f} s at T={t1}, and a single run's two (pass 1, scoring) about {single_passes:.1f} s of its "
        f"{one:.2f} s. {why}"
        + (f"The multi path is ahead from T={pays} on. " if pays else f"The multi path is not ahead at T ≤ {tasks[-1]}. ")
        + f"Per task: its v ({v_task:.2f} s: forward + backward over its {args.pairs} pairs), and in each of the three "
        f"passes one more (tokens × vocab) × (vocab × hidden) product (the residual times v_t or r_t, in the same "
        f"matmul as the backward through the output layer; in pass 2, one more row of the weighted sum), the "
        f"embedding-layer dots and index-adds, and a (vocab × hidden) fp64 accumulator: "
        f"{slope:.2f} s in all, {slope / body:.2f} of one body pass over the fit set, {max(0.0, slope - v_task):.2f} s "
        f"of it outside v. For many tasks the speed-up tends to one run ÷ one extra task = "
        f"{one / slope if slope > 0 else float('inf'):.1f}×.")


GPU_NOTE = (
    "GPU: none was lent to this session, so only the CPU was measured. The same script runs on one with "
    "`--device cuda` (timings synchronise the device; memory becomes the growth of peak allocated memory; that path "
    "is untested here), e.g. `--device cuda --preset 25m --fit-docs 1024 --score-docs 4096 --repeats 5` (the `25m` "
    "and `350m` presets are randomly initialised; the cost does not depend on the weights). There the body's small "
    "kernels weigh less against the per-task GEMMs than on this CPU, so measure the cost per extra task there "
    "rather than carry this fraction over.")


def main() -> None:
    import transformers
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tasks", default="1,2,4,8", help="the T values, increasing")
    ap.add_argument("--pairs", type=int, default=32, help="validation pairs per task")
    ap.add_argument("--fit-docs", type=int, default=256)
    ap.add_argument("--score-docs", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--preset", default="tiny", help="tiny: the demo checkpoint when present; others: random init")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.tasks = sorted(int(x) for x in args.tasks.split(","))

    load0, t_start = os.getloadavg(), time.perf_counter()
    model, val, fit_b, score_b, info = setup(args)
    args.model_val = (model, val)
    ops = make_ops(model, val, fit_b, score_b, args.tasks)
    times, peaks, last, rereads = run_rounds(ops, fit_b, score_b, args)
    load1, total = os.getloadavg(), time.perf_counter() - t_start
    text = report(times, peaks, last, rereads, info, args, load0, load1, total)
    print(text)
    if args.out:
        from automixer_ops.rundir import atomic_write_text

        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
