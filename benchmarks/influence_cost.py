"""Influence scoring cost per batch, in units of one proxy training step (DESIGN §5).

Both sides run on the same model (same weights), the same batch (16 x 256 tokens of
real corpus text), the same machine and process, alternately (interleaved rounds, the
order rotated every round), after warmup rounds; medians of --runs rounds:

  training step   model.train(); model(input_ids=x, labels=x).loss.backward();
                  opt.step(); opt.zero_grad()   (AdamW as automixer_ops/proxy.py builds it)
  pass 3 (score)  BatchGrads(model, batch, project=(r_output,)).dots(r): what
                  `automixer score` does per batch (model.eval().requires_grad_(False))
  pass 1 (fit)    datainf.pass1_batch: norms, v-dots and the series sums of sum_i c_i g_i
  pass 2 (fit)    BatchGrads(model, batch); .accumulate(c_l, acc_l) per layer: the reread of
                  documents the series does not give exactly, here as if every one needed it
                  (the step rereads only those; on these models, none)

r, v and the coefficients come from a real fit (`fit_in_memory`) on other batches of the
same corpus. Token ids only are shared: tokenization and batch building are left out of
both sides. fp32 on CPU, torch's default thread count. OMP_WAIT_POLICY defaults to PASSIVE here (set
before torch loads; override it from the environment): on a shared, oversubscribed CPU,
spin-waiting OpenMP threads made every operation 2-4x slower and very noisy.

Model and data: the demo run when it is there (runs/demo: corpus shards, tokenizer, the
latest checkpoint of the `tiny` proxy); on a fresh clone the embedded corpus
(data/corpus/*.jsonl) is prepared into a temporary run with configs/demo.yaml's settings
(which trains the same 8192-token byte-level BPE) and the `tiny` model is randomly
initialised (seed 0): the cost does not depend on the weights. The `25m` preset (same
vocabulary) is always randomly initialised.

    .venv/bin/python benchmarks/influence_cost.py --runs 9 --presets tiny,25m \\
        --out benchmarks/results/influence_cost.md

The helpers here (demo_run, load_model, corpus_token_ids, machine_line) are shared with influence_gpu.py,
influence_vs_dattri.py and influence_memory.py.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _k, _v in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("HF_HOME", str(ROOT / ".hf_home")),
               # Before torch loads: on a shared, oversubscribed CPU, OpenMP threads that spin-wait lose their
               # time slices to other processes (2-4x slower, noisy); sleeping waits keep the timings stable.
               # Set OMP_WAIT_POLICY yourself to override; the results record the value used.
               ("OMP_WAIT_POLICY", "PASSIVE")):
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402


# ------------------------------------------------------------------ shared set-up


@contextlib.contextmanager
def demo_run(log=print):
    """Yields (run dir with corpus/ and tokenizer/, latest checkpoint dir or None).

    runs/demo when it has a prepared corpus; else the embedded corpus prepared (BPE trained)
    into a temporary run with configs/demo.yaml's corpus and tokenizer settings.
    """
    from automixer_ops.rundir import read_marker

    demo = ROOT / "runs" / "demo"
    if read_marker(demo / "corpus") is not None and (demo / "tokenizer" / "tokenizer.json").is_file():
        steps = sorted(int(p.name[5:]) for p in (demo / "checkpoints").glob("step-*")
                       if p.name[5:].isdigit() and (p / "config.json").is_file())
        yield demo, (demo / "checkpoints" / f"step-{steps[-1]}" if steps else None)
        return
    from automixer_ops.config import load_config
    from automixer_ops.prepare import prepare

    with tempfile.TemporaryDirectory() as d:
        cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
        cfg = {"run": {"id": "bench", "root": str(Path(d) / "runs"), "seed": 0},
               "corpus": {**cfg["corpus"], "paths": [str(ROOT / "data" / "corpus" / "*.jsonl")]},
               "tokenizer": cfg["tokenizer"]}
        (Path(d) / "c.yaml").write_text(yaml.safe_dump(cfg))
        c = load_config(Path(d) / "c.yaml")
        log("runs/demo not found: preparing the embedded corpus (training the BPE) in a temporary run")
        prepare(c, log=lambda _: None)
        yield c.run_dir, None


def load_tokenizer(run: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(run / "tokenizer"))


def load_model(preset: str, tokenizer, checkpoint: Path | None = None, vocab: int | None = None):
    """The demo checkpoint when given (preset tiny), else a seeded random init of the preset."""
    from transformers import LlamaForCausalLM

    from automixer_ops.proxy import model_config

    if checkpoint is not None and preset == "tiny" and vocab is None:
        return LlamaForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
    torch.manual_seed(0)
    cfg = model_config(preset, vocab or len(tokenizer), max(512, tokenizer.model_max_length), tokenizer)
    return LlamaForCausalLM(cfg)


def corpus_docs(run: Path) -> list[dict]:
    """id, text, n_tokens of every corpus document, in shard order."""
    import pyarrow.parquet as pq

    rows = []
    for shard in sorted((run / "corpus").glob("part-*.parquet")):
        rows += pq.read_table(shard, columns=["id", "text", "n_tokens"]).to_pylist()
    return rows


def corpus_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    enc = tokenizer.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    return [e.ids for e in enc]


def machine_line() -> str:
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"Machine: {platform.machine()}, {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
            f"threads (default), OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
            f"torch {torch.__version__}, Python {platform.python_version()}")


def load_line(before, after) -> str:
    f = lambda t: " / ".join(f"{x:.2f}" for x in t)  # noqa: E731
    return (f"Load average (1/5/15 min) before: {f(before)}; after: {f(after)} "
            f"('after' counts this benchmark's own threads; the host is a shared VM, so both sides' runs are "
            f"interleaved to see the same conditions)")


def emit(text: str, out: Path | None) -> None:
    """Print a result and write it to --out when given."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


# ------------------------------------------------------------------ this benchmark


def packed_windows(ids: list[list[int]], eos: int, seq_len: int, n: int, seed: int) -> torch.Tensor:
    """n windows of seq_len tokens from the packed corpus stream (EOS after each doc), as the proxy trains."""
    stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
    windows = len(stream) // seq_len
    pick = np.random.default_rng(seed).choice(windows, n, replace=False)
    return torch.from_numpy(np.stack([stream[w * seq_len:(w + 1) * seq_len] for w in pick]))


def bench_preset(preset: str, run: Path, checkpoint: Path | None, args) -> dict:
    from automixer_ops.influence.batching import make_batch
    from automixer_ops.influence.datainf import (SeriesSums, coefficients, fit_in_memory, pass1_batch, sample_stats,
                                                 zeros_like_layers)
    from automixer_ops.influence.grads import BatchGrads, Workspace

    tok = load_tokenizer(run)
    ids = corpus_token_ids(tok, [d["text"] for d in corpus_docs(run)])
    B, T = args.batch, args.seq_len
    windows = packed_windows(ids, tok.eos_token_id, T, B * (2 + args.fit_batches), seed=0)
    x = windows[:B].contiguous()                       # the timed batch
    val_x = windows[B:2 * B]                           # validation: 16 other windows
    fit_x = windows[2 * B:]                            # fit set for r: fit_batches more batches

    def as_batch(t: torch.Tensor):
        return make_batch(t.tolist(), [1] * len(t), tok.pad_token_id)

    score_model = load_model(preset, tok, checkpoint).eval().requires_grad_(False)
    train_model = load_model(preset, tok, checkpoint).train()
    train_model.load_state_dict(score_model.state_dict())
    decay = [w for w in train_model.parameters() if w.dim() >= 2]
    no_decay = [w for w in train_model.parameters() if w.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    n_params = sum(w.numel() for w in score_model.parameters())

    batch = as_batch(x)
    val = [(as_batch(val_x), torch.full((B,), 1.0 / B))]
    fit_batches = [as_batch(fit_x[i * B:(i + 1) * B]) for i in range(args.fit_batches)]
    t0 = time.perf_counter()
    fit = fit_in_memory(score_model, val, fit_batches)
    fit_s = time.perf_counter() - t0
    stats, _ = sample_stats(score_model, [batch], fit.v)
    coeff = coefficients(stats, fit.lam)
    c_sum, series, ws = zeros_like_layers(score_model), SeriesSums(score_model), Workspace()
    project = tuple(t for k, t in fit.r.items() if k != "embed")  # Scorer.projected

    def train_step():
        train_model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()

    def pass3():
        return BatchGrads(score_model, batch, project=project, workspace=ws).dots(fit.r)

    def pass1():
        return pass1_batch(score_model, batch, fit.v, series, ws)

    def pass2():
        bg = BatchGrads(score_model, batch, workspace=ws)
        for k in c_sum:
            bg.accumulate(coeff[k], {k: c_sum[k]})

    ops = {"train": train_step, "pass3": pass3, "pass1": pass1, "pass2": pass2}
    times = {k: [] for k in ops}
    names = list(ops)
    for rnd in range(args.warmup + args.runs):
        order = names[rnd % len(names):] + names[:rnd % len(names)]  # rotate: no op always first
        for k in order:
            t0 = time.perf_counter()
            ops[k]()
            dt = time.perf_counter() - t0
            if rnd >= args.warmup:
                times[k].append(dt)
        if rnd >= args.warmup:
            print(f"  {preset} round {rnd - args.warmup + 1}: " +
                  ", ".join(f"{k} {times[k][-1] * 1000:.0f} ms" for k in names), flush=True)
    return {"preset": preset, "params": n_params, "times": times, "fit_s": fit_s,
            "weights": "demo checkpoint " + checkpoint.name if (checkpoint and preset == "tiny") else "random init",
            "vocab": score_model.config.vocab_size, "hidden": score_model.config.hidden_size,
            "layers": score_model.config.num_hidden_layers}


LABELS = {"train": "training step (fwd + bwd + AdamW), baseline",
          "pass3": "**pass 3: scoring** `BatchGrads(project=r).dots(r)`",
          "pass1": "pass 1 (fit): `pass1_batch` (‖g‖², v·g, series sums)",
          "pass2": "pass 2 (fit), if every document were reread: `accumulate(c_l)` per layer"}


def main() -> None:
    import transformers
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--presets", default="tiny,25m")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--fit-batches", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    load0, t_start = os.getloadavg(), time.perf_counter()
    results = []
    with demo_run() as (run, ckpt):
        source = (f"`{run.relative_to(ROOT)}` (corpus shards, tokenizer, checkpoint `{ckpt.name}`)"
                  if run.is_relative_to(ROOT) and ckpt else "the embedded corpus prepared into a temporary run")
        for preset in args.presets.split(","):
            print(f"preset {preset}", flush=True)
            results.append(bench_preset(preset, run, ckpt, args))
    load1, total = os.getloadavg(), time.perf_counter() - t_start

    cmd = (f".venv/bin/python benchmarks/influence_cost.py --runs {args.runs} --presets {args.presets} "
           f"--out benchmarks/results/influence_cost.md")
    lines = [
        "# Influence scoring cost per batch vs one training step (CPU)",
        "",
        machine_line() + ".",
        load_line(load0, load1) + ".",
        f"Batch: {args.batch} x {args.seq_len} tokens of real corpus text (packed windows, as the proxy trains), "
        f"fp32. Data: {source}. Median of {args.runs} interleaved rounds per operation after {args.warmup} "
        f"warmup rounds; the order of the four operations rotates every round. Whole run: {total:.0f} s.",
        "",
        f"Reproduce: `{cmd}`",
        "",
    ]
    for res in results:
        t = {k: statistics.median(v) for k, v in res["times"].items()}
        lines += [
            f"## preset `{res['preset']}`: {res['params']:,} parameters (vocab {res['vocab']}, hidden "
            f"{res['hidden']}, {res['layers']} layers; {res['weights']})",
            "",
            "| operation (one batch) | median (ms) | ÷ training step | min–max (ms) |",
            "|---|---:|---:|---|",
        ]
        for k in ("train", "pass3", "pass1", "pass2"):
            v = res["times"][k]
            lines.append(f"| {LABELS[k]} | {t[k] * 1000:.0f} | {t[k] / t['train']:.2f} | "
                         f"{min(v) * 1000:.0f}–{max(v) * 1000:.0f} |")
        paired = [s / tr for s, tr in zip(res["times"]["pass3"], res["times"]["train"])]
        lines += [
            "",
            f"Scoring ÷ training step: **{t['pass3'] / t['train']:.2f}** (ratio of medians; per-round ratios "
            f"{min(paired):.2f}–{max(paired):.2f}, median {statistics.median(paired):.2f}). A full fit + score over "
            f"the corpus costs pass 1 + pass 3 = {(t['pass1'] + t['pass3']) / t['train']:.2f} training steps per "
            f"batch (pass 2 rereads only the documents whose coefficient the series does not give to 1e-8: none "
            f"for the demo proxy; at worst, every one, pass 1 + pass 2 + pass 3 = "
            f"{(t['pass1'] + t['pass2'] + t['pass3']) / t['train']:.2f}).",
            "",
        ]
    lines += [
        "What is timed: the training step is `model(input_ids=x, labels=x).loss.backward(); opt.step(); "
        "opt.zero_grad()` with AdamW (betas 0.9/0.95, weight decay 0.1 on matrices, as `train-proxy`; its gradient "
        "clipping is left out, which makes the baseline a little cheaper and the ratios conservative), model in "
        "train mode; the scorer's model is `eval().requires_grad_(False)` as in `influence/score.py`. Each "
        "influence pass is one forward and one activation-only backward through the body plus the output-layer "
        "algebra of `BatchGrads`; r, v and c come from `fit_in_memory` on other batches of the same corpus.",
        "",
    ]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
