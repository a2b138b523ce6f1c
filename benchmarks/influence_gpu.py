"""Influence scoring on a GPU: tokens/s and achieved TFLOP/s (issue 4), two measurements.

batch   The scorer's per-batch work (`BatchGrads`, as `automixer score` calls it) on B windows
        of --seq-len tokens of real corpus text, for each B in --batches: pass 3 (scoring),
        pass 1 (fit, with its series sums) and pass 2 (the fit's reread, as if every document
        needed it; the step rereads only those the series does not give exactly), next to one
        proxy training step (bf16 autocast forward +
        backward + AdamW, as `train-proxy` does on CUDA) on the same model and batch. The
        model is the --preset randomly initialised (seed 0): the cost does not depend on the
        weights. Median of --runs interleaved rounds after --warmup rounds; CUDA synchronised
        around every timed call. FLOPs are counted once per operation with
        torch's per-operator formulas (torch.utils.flop_counter: matmuls and attention, forward and
        backward; elementwise work not counted), so TFLOP/s = counted FLOPs / median time.

e2e     The real step end to end on the demo corpus: a run directory made from runs/demo
        (prepared corpus, tokenizer, validation sets, selection), the --preset proxy trained
        --train-steps steps on this GPU at --seq-len (`automixer train-proxy`), then
        `automixer score --step <S> --fit-only` and `automixer score --step <S>` (the exact fit:
        fit_samples null) with influence.max_seq_len = --seq-len, once in bf16 and once in
        fp32 on the same checkpoint; wall times of the commands, tokens/s over the tokens the
        scorer reads (EOS + the first max_seq_len - 1 tokens of each document), and the
        agreement of the bf16 scores with the fp32 ones (Pearson, Spearman, and the overlap
        of the top halves: what `regroup` keeps at keep_fraction 0.5).

Both need runs/demo (`make demo-cli`, or carry runs/demo/{corpus,tokenizer,valsets,
selection.json,config.yaml} to the GPU machine):

    python benchmarks/influence_gpu.py batch --out benchmarks/results/influence_gpu.md
    python benchmarks/influence_gpu.py e2e --out benchmarks/results/influence_gpu_e2e.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from influence_cost import (ROOT, corpus_docs, corpus_token_ids, emit, load_model, load_tokenizer,  # noqa: E402
                            packed_windows)

import torch  # noqa: E402

DEMO = ROOT / "runs" / "demo"


def device_line() -> str:
    import transformers

    if not torch.cuda.is_available():
        return f"Device: CPU (smoke run, not a GPU figure), torch {torch.__version__}"
    props = torch.cuda.get_device_properties(0)
    return (f"Device: {props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs), "
            f"torch {torch.__version__}, transformers {transformers.__version__}, Python "
            f"{platform.python_version()}, TF32 matmul {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}")


# ------------------------------------------------------------------ batch


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def peak_memory() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0


def counted_flops(fn) -> int:
    """FLOPs of fn by torch's own per-operator formulas (torch.utils.flop_counter). FlopCounterMode itself
    cannot be used: its module hooks break autograd.grad to the input embeddings, which BatchGrads calls."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.flops += formula(*args, **kwargs, out_val=out)
            return out

    with Counter():
        fn()
    return Counter.flops


def bench_batch(args) -> list[dict]:
    from automixer_ops.influence.batching import make_batch
    from automixer_ops.influence.datainf import (SeriesSums, coefficients, fit_in_memory, pass1_batch, sample_stats,
                                                 zeros_like_layers)
    from automixer_ops.influence.grads import BatchGrads, Workspace

    dev, T = args.device, args.seq_len
    amp = torch.bfloat16 if args.precision == "bf16" else None
    tok = load_tokenizer(DEMO)
    tok.model_max_length = max(T, tok.model_max_length)
    ids = corpus_token_ids(tok, [d["text"] for d in corpus_docs(DEMO)])
    biggest = max(args.batches)
    windows = packed_windows(ids, tok.eos_token_id, T, biggest * 3, seed=0)

    def as_batch(t: torch.Tensor):
        return make_batch(t.tolist(), [1] * len(t), tok.pad_token_id).to(dev)

    score_model = load_model(args.preset, tok).to(dev).eval().requires_grad_(False)
    train_model = load_model(args.preset, tok).to(dev).train()
    decay = [w for w in train_model.parameters() if w.dim() >= 2]
    no_decay = [w for w in train_model.parameters() if w.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    n_params = sum(w.numel() for w in score_model.parameters())
    # A real fit (v from 8 other windows, lambda and r from `biggest` more) gives r, v and the coefficients.
    val = [(as_batch(windows[biggest:biggest + 8]), torch.full((8,), 1 / 8))]
    fit = fit_in_memory(score_model, val, [as_batch(windows[2 * biggest:3 * biggest])], autocast_dtype=amp)
    project = tuple(t for k, t in fit.r.items() if k != "embed")
    results = []
    for B in args.batches:
        x = windows[:B].to(dev)
        batch = as_batch(windows[:B])
        stats, _ = sample_stats(score_model, [batch], fit.v, autocast_dtype=amp)
        coeff = coefficients(stats, fit.lam)
        c_sum, series, ws = zeros_like_layers(score_model), SeriesSums(score_model), Workspace()

        def train_step():
            with torch.autocast(dev, dtype=torch.bfloat16):
                loss = train_model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        def pass3():
            BatchGrads(score_model, batch, autocast_dtype=amp, project=project, workspace=ws).dots(fit.r)

        def pass1():
            pass1_batch(score_model, batch, fit.v, series, ws, autocast_dtype=amp)

        def pass2():
            bg = BatchGrads(score_model, batch, autocast_dtype=amp, workspace=ws)
            for k in c_sum:
                bg.accumulate(coeff[k], {k: c_sum[k]})

        ops = {"train": train_step, "pass3": pass3, "pass1": pass1, "pass2": pass2}
        flops = {k: counted_flops(f) for k, f in ops.items()}
        times, peak = {k: [] for k in ops}, {}
        names = list(ops)
        for rnd in range(args.warmup + args.runs):
            for k in names[rnd % 4:] + names[:rnd % 4]:
                if dev == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                dt = timed(ops[k])
                peak[k] = max(peak.get(k, 0), peak_memory())
                if rnd >= args.warmup:
                    times[k].append(dt)
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"B={B}: " + ", ".join(f"{k} {med[k] * 1000:.1f} ms" for k in names), flush=True)
        results.append({"B": B, "times": times, "med": med, "flops": flops, "peak": peak, "params": n_params,
                        "vocab": score_model.config.vocab_size})
    return results


def report_batch(args, results: list[dict], total: float) -> str:
    r0 = results[0]
    lines = [
        f"# Influence scoring throughput on a GPU: preset `{args.preset}`, sequence length {args.seq_len}",
        "",
        device_line() + ".",
        f"Model: `{args.preset}` randomly initialised (seed 0), {r0['params']:,} parameters with the demo's "
        f"{r0['vocab']:,}-token vocabulary; weights fp32, influence body in {args.precision} "
        f"({'bf16 autocast' if args.precision == 'bf16' else 'fp32'}), per-sample statistics fp32, sums fp64. "
        f"Batch: B windows of {args.seq_len} tokens of the demo corpus (packed, as the proxy trains). "
        f"Median of {args.runs} interleaved rounds after {args.warmup} warmup rounds. Whole run: {total:.0f} s.",
        "",
        f"Reproduce (GPU machine, runs/demo present): `python benchmarks/influence_gpu.py batch --preset "
        f"{args.preset} --seq-len {args.seq_len} --batches {' '.join(map(str, args.batches))} --precision "
        f"{args.precision} --out benchmarks/results/influence_gpu.md`",
        "",
        "| B | operation | median (ms) | tokens/s | counted GFLOP | achieved TFLOP/s | ÷ training step | "
        "peak GPU memory (GiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    label = {"pass3": "**pass 3: scoring**", "pass1": "pass 1 (fit: ‖g‖², v·g, series sums)",
             "pass2": "pass 2 (fit: Σ c g, if every document were reread)",
             "train": "training step (bf16 fwd + bwd + AdamW)"}
    for r in results:
        tokens = r["B"] * args.seq_len
        for k in ("pass3", "pass1", "pass2", "train"):
            t = r["med"][k]
            lines.append(f"| {r['B']} | {label[k]} | {t * 1000:.1f} | {tokens / t:,.0f} | {r['flops'][k] / 1e9:,.0f} | "
                         f"{r['flops'][k] / t / 1e12:.1f} | {t / r['med']['train']:.2f} | "
                         f"{r['peak'][k] / 2**30:.1f} |")
    best = max(results, key=lambda r: r["B"] * args.seq_len / r["med"]["pass3"])
    t3 = best["med"]["pass3"]
    lines += [
        "",
        f"Scoring (pass 3) at B = {best['B']}: **{best['B'] * args.seq_len / t3:,.0f} tokens/s, "
        f"{best['flops']['pass3'] / t3 / 1e12:.0f} TFLOP/s achieved** (counted FLOPs ÷ time). A full exact fit + "
        f"score reads the corpus twice: pass 1 + pass 3 = "
        f"{sum(best['med'][k] for k in ('pass1', 'pass3')) / best['med']['train']:.2f} training steps per batch "
        f"(plus pass 2 for the documents it rereads; all of them: "
        f"{sum(best['med'][k] for k in ('pass1', 'pass2', 'pass3')) / best['med']['train']:.2f}).",
        "",
        "Counted FLOPs are those of torch.utils.flop_counter's formulas (matrix products and attention, forward and backward) for "
        "one call; the softmax residual, gathers and index_add are not counted, so the figure is a lower bound "
        "on the work done. The scorer's default `influence.batch_tokens` is 8192 (B = 4 at this length); on a "
        "GPU set it to B × seq_len for the B that is fastest here.",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ e2e


def automixer(*argv: str, log: list) -> float:
    """Run one CLI step in a fresh process; returns its wall time, appends its output to log."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "automixer_ops.cli", *argv], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    dt = time.perf_counter() - t0
    log.append(f"$ automixer {' '.join(argv)}  ({dt:.1f} s, exit {proc.returncode})\n{proc.stdout}{proc.stderr}")
    if proc.returncode != 0:
        print("\n".join(log))
        raise SystemExit(f"automixer {' '.join(argv)} failed with exit {proc.returncode}")
    return dt


def make_run(name: str, args) -> Path:
    """A run directory holding runs/demo's prepared inputs, and a config for it."""
    import yaml

    run = ROOT / "runs" / name
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    for part in ("corpus", "tokenizer", "valsets"):
        shutil.copytree(DEMO / part, run / part)
    shutil.copy(DEMO / "selection.json", run / "selection.json")
    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    # Absolute paths: the config lives in the run directory, not next to configs/demo.yaml.
    cfg["run"].update(id=name, root=str(ROOT / "runs"))
    cfg["corpus"]["paths"] = [str(ROOT / "data" / "corpus" / "*.jsonl")]
    cfg["tasks"]["data_dir"] = str(ROOT / "data" / "benchmarks")
    cfg["proxy"] = {"preset": args.preset, "seq_len": args.seq_len, "batch_size": args.train_batch,
                    "max_steps": args.train_steps, "save_every": args.train_steps, "warmup_steps": 5,
                    "lr": 3e-4, "log_every": 10}
    cfg["influence"] = {**cfg["influence"], "max_seq_len": args.seq_len, "fit_samples": None,
                        "device": args.device, "batch_tokens": args.batch_tokens}
    path = run / "config-benchmark.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def bench_e2e(args) -> str:
    import numpy as np
    import pyarrow.parquet as pq
    from scipy.stats import spearmanr

    t_start, log = time.perf_counter(), []
    step = args.train_steps  # the demo selection has a sampler at step 50 (arc_easy, boolq, social_iqa)
    cfg = make_run("gpu-e2e", args)
    run = cfg.parent
    train_s = automixer("train-proxy", "-c", str(cfg), log=log)
    tokens = scored_tokens(run, args.seq_len)
    timings = {}
    for precision in ("bf16", "fp32"):
        over = ["--set", f"influence.precision={precision}"]
        fit_s = automixer("score", "-c", str(cfg), "--step", str(step), "--fit-only", *over, log=log)
        score_s = automixer("score", "-c", str(cfg), "--step", str(step), *over, log=log)
        out = run / "scores" / f"step={step}"
        table = pq.read_table(sorted(out.glob("part-*.parquet"))).sort_by("id")
        timings[precision] = {"fit": fit_s, "score": score_s, "u": table.column("utility").to_numpy(),
                              "fit_json": json.loads((out / "fit.json").read_text())}
        shutil.move(str(out), str(run / f"scores-{precision}"))
    ub, uf = timings["bf16"]["u"].astype(np.float64), timings["fp32"]["u"].astype(np.float64)
    pearson = float(np.corrcoef(ub, uf)[0, 1])
    spearman = float(spearmanr(ub, uf).statistic)
    half = len(ub) // 2
    top_b, top_f = set(np.argsort(-ub)[:half]), set(np.argsort(-uf)[:half])
    overlap = len(top_b & top_f) / half
    total = time.perf_counter() - t_start
    (ROOT / "runs" / "gpu-e2e" / "e2e.log").write_text("\n".join(log))
    lines = [
        f"# `automixer score` end to end on a GPU: preset `{args.preset}`, max_seq_len {args.seq_len}",
        "",
        device_line() + ".",
        f"Run: the demo's prepared corpus ({len(ub):,} documents; the scorer reads {tokens:,} tokens per pass: "
        f"EOS + the first {args.seq_len - 1} tokens of each), tokenizer and validation sets; the `{args.preset}` "
        f"proxy trained {args.train_steps} steps here (batch {args.train_batch} × {args.seq_len}, bf16, "
        f"{train_s:.0f} s with start-up and checkpoint save), sampler at step {step} "
        f"(tasks {', '.join(timings['bf16']['fit_json']['tasks'])}); exact fit "
        f"(fit_samples null), influence.batch_tokens {args.batch_tokens}. One run of each command (wall time of "
        f"the process: Python start, imports, model load included). Whole benchmark: {total:.0f} s.",
        "",
        "Reproduce (GPU machine, runs/demo present): `python benchmarks/influence_gpu.py e2e --out "
        "benchmarks/results/influence_gpu_e2e.md`",
        "",
        "| precision | fit: v + pass 1 + pass 2 (s) | pass 3: score (s) | scoring tokens/s (pass 3) | "
        "fit + score tokens/s (3 passes) |",
        "|---|---:|---:|---:|---:|",
    ]
    for p in ("bf16", "fp32"):
        t = timings[p]
        lines.append(f"| {p} | {t['fit']:.1f} | {t['score']:.1f} | {tokens / t['score']:,.0f} | "
                     f"{3 * tokens / (t['fit'] + t['score']):,.0f} |")
    lam = {p: timings[p]["fit_json"]["lambda"] for p in timings}
    lines += [
        "",
        f"bf16 against fp32 scores (same checkpoint, each with its own fit): Pearson **{pearson:.5f}**, Spearman "
        f"{spearman:.5f}, top-half overlap {overlap:.4f} (the documents `regroup` keeps at keep_fraction 0.5). "
        f"λ bf16 {lam['bf16']}, fp32 {lam['fp32']}.",
        "",
    ]
    return "\n".join(lines)


def scored_tokens(run: Path, max_seq_len: int) -> int:
    import pyarrow.parquet as pq

    n = pq.read_table(sorted((run / "corpus").glob("part-*.parquet")), columns=["n_tokens"]).column(
        "n_tokens").to_numpy()
    return int((n + 1).clip(max=max_seq_len).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["batch", "e2e"])
    ap.add_argument("--preset", default="350m")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=50, help="must be a sampler step of the demo selection")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=32768)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself, not a figure")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("influence_gpu.py needs a CUDA GPU (or --device cpu for a smoke run)")
    if not (DEMO / "corpus").is_dir():
        raise SystemExit(f"{DEMO}: no demo run; run `make demo-cli` first (or carry runs/demo's inputs)")
    t0 = time.perf_counter()
    text = (report_batch(args, bench_batch(args), time.perf_counter() - t0) if args.mode == "batch"
            else bench_e2e(args))
    emit(text, args.out)


if __name__ == "__main__":
    main()
