"""Proxy training throughput (tokens/s) of `automixer train-proxy`, against a bare loop.

Both sides train the same model (preset, vocabulary, seq_len, batch) with the same AdamW
in the same process and machine, alternately, --repeats times each:
  train-proxy  the real step: packed batches from the demo corpus, LR schedule, gradient
               clipping, logging (tokens/s from its own log, first interval dropped as warmup)
  bare loop    forward + backward + AdamW step on random tokens, nothing else
The ratio shows what the pipeline's data loading and bookkeeping cost on top of the math.

    .venv/bin/python benchmarks/proxy_throughput.py --repeats 5 --out benchmarks/results/proxy_throughput.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def bare_loop(model_cfg, seq_len: int, batch: int, steps: int) -> float:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(model_cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, model_cfg.vocab_size, (batch, seq_len))
    for i in range(steps + 3):
        if i == 3:  # warmup steps excluded
            t0 = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * batch * seq_len / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from automixer_ops.config import load_config
    from automixer_ops.prepare import prepare
    from automixer_ops.proxy import model_config, train_proxy
    from transformers import AutoTokenizer

    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    p = demo["proxy"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        demo["run"]["root"] = str(tmp / "runs")
        demo["corpus"]["paths"] = [str(ROOT / "data" / "corpus" / "*.jsonl")]
        demo["tasks"]["data_dir"] = str(ROOT / "data" / "benchmarks")
        ours, bare = [], []
        for r in range(args.repeats):
            demo["run"]["id"] = "bench" if r == 0 else f"bench{r}"
            demo["proxy"].update(max_steps=args.steps, save_every=args.steps, log_every=args.steps // 3,
                                 warmup_steps=5)
            if r > 0:  # reuse the prepared corpus and tokenizer of the first run
                demo["tokenizer"]["path"] = str(tmp / "runs" / "bench" / "tokenizer")
            path = tmp / f"r{r}.yaml"
            path.write_text(yaml.safe_dump(demo))
            cfg = load_config(path)
            prepare(cfg, log=lambda _: None)
            train_proxy(cfg, log=lambda _: None)
            log = [json.loads(x) for x in (cfg.run_dir / "proxy" / "train_log.jsonl").read_text().splitlines()]
            ours.append(statistics.median(e["tokens_per_s"] for e in log[1:]))
            tok = AutoTokenizer.from_pretrained(str(cfg.run_dir / "tokenizer"))
            mcfg = model_config(p["preset"], len(tok), max(p["seq_len"], tok.model_max_length), tok)
            bare.append(bare_loop(mcfg, p["seq_len"], p["batch_size"], args.steps // 3 * 2))
            print(f"repeat {r}: train-proxy {ours[-1]:,.0f} tok/s, bare loop {bare[-1]:,.0f} tok/s", flush=True)
    n_params = sum(x.numel() for x in __import__("transformers").LlamaForCausalLM(mcfg).parameters())
    mo, mb = statistics.median(ours), statistics.median(bare)
    text = "\n".join([
        "# Proxy training throughput on CPU",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}. Median of {args.repeats} alternating runs.",
        f"Model: preset `{p['preset']}` ({n_params:,} parameters with the demo's {mcfg.vocab_size}-token "
        f"vocabulary), seq_len {p['seq_len']}, batch {p['batch_size']} ({p['seq_len'] * p['batch_size']:,} tokens/step), "
        "fp32.",
        "",
        "Reproduce: `.venv/bin/python benchmarks/proxy_throughput.py --repeats 5 --out "
        "benchmarks/results/proxy_throughput.md`",
        "",
        "| loop | tokens/s (median) | runs |",
        "|---|---:|---|",
        f"| automixer train-proxy | {mo:,.0f} | {', '.join(f'{x:,.0f}' for x in ours)} |",
        f"| bare fwd+bwd+AdamW (baseline) | {mb:,.0f} | {', '.join(f'{x:,.0f}' for x in bare)} |",
        "",
        f"Ratio train-proxy / baseline: **{mo / mb:.2f}**.",
        "",
    ])
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
