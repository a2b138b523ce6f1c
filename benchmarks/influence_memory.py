"""Peak memory of influence scoring (pass 3) as the corpus grows 10x: it must stay flat.

For each corpus size (default 1,000 and 10,000 documents: the real corpus' documents,
repeated under new ids and reshuffled with a seed) the script builds a run directory:
`automixer prepare` (the demo's tokenizer, 500 documents per shard), one sampler
(checkpoint, selection.json, a validation set of 16 (context, continuation) pairs cut from
other corpus documents) and its fit (`Scorer.fit()` with `influence.fit_samples: 64`).
Then, --repeats times per size, a fresh process runs the mapped scoring job exactly as a
worker does,

    automixer score -c <run config> --step <S> --shards 0:<all shards>

(the streaming per-shard loop of `automixer_ops.influence.score`: read a shard, batch it
by length, score, write its part file; the child calls `score()` as the CLI's cmd_score
does, with a logger that samples RSS after every shard) and reports its own peak RSS
(ru_maxrss: the high-water mark of the whole process, Python, torch and tokenizer threads
included), its RSS after imports, and its RSS after the first and the last shard. Score
files are removed between repeats.

influence.max_seq_len is 64 here (docs scored on EOS + their first 63 tokens) to keep
10,000 documents within a couple of minutes on a 2-core CPU; a batch's working set is set
by influence.batch_tokens (8192 padded tokens, the default), not by max_seq_len.

Model and data: runs/demo (its tokenizer, corpus and latest checkpoint) when present;
else the embedded corpus prepared with a freshly trained BPE and a randomly initialised
`tiny` proxy (see influence_cost.py).

    .venv/bin/python benchmarks/influence_memory.py --repeats 3 --out benchmarks/results/influence_memory.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as influence_cost.py; inherited by the children
sys.path.insert(0, str(Path(__file__).resolve().parent))
from influence_cost import ROOT, corpus_docs, demo_run, emit, load_line, machine_line  # noqa: E402

STEP = 1
CHILD = """
import resource, sys
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
import torch, transformers, pyarrow, automixer_ops.influence.score, automixer_ops.influence.grads  # noqa
from automixer_ops.config import load_config
from automixer_ops.influence.score import score
base, after_shard = rss_mib(), []
def log(msg):  # the step logs once per scored shard: record the RSS between shards
    if "scored shard" in msg:
        after_shard.append(rss_mib())
# what `automixer score --config C --step S --shards A:B` runs (cli.cmd_score), with a logger that samples RSS
score(load_config(sys.argv[1]), step=int(sys.argv[2]), shards=sys.argv[3], log=log)
print("RESULT", base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, after_shard[0], after_shard[-1],
      max(after_shard), file=sys.stderr)
"""


def build_run(tmp: Path, name: str, docs: list[dict], n: int, tokenizer: Path, checkpoint: Path,
              args) -> tuple[Path, int]:
    """A run dir with n documents prepared, one sampler at STEP and its fit; returns (config path, shards)."""
    from automixer_ops.config import load_config
    from automixer_ops.influence.score import Scorer
    from automixer_ops.prepare import prepare
    from automixer_ops.selection import select_samplers

    rng = random.Random(0)
    pool = docs[16:]  # the first 16 documents make the validation set
    order = [(k, j) for k in range(-(-n // len(pool))) for j in range(len(pool))][:n]
    rng.shuffle(order)
    src = tmp / f"{name}.jsonl"
    with open(src, "w", encoding="utf-8") as f:
        for k, j in order:
            f.write(json.dumps({"id": f"{pool[j]['id']}#{k}", "text": pool[j]["text"]}, ensure_ascii=False) + "\n")
    cfg = {"run": {"id": name, "root": str(tmp / "runs"), "seed": 0},
           "corpus": {"paths": [str(src)], "docs_per_shard": args.docs_per_shard},
           "tokenizer": {"path": str(tokenizer)},
           "influence": {"max_seq_len": args.max_seq_len, "fit_samples": 64, "device": "cpu"}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    c = load_config(path)
    prepare(c, log=lambda _: None)
    run = c.run_dir
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / f"step-{STEP}").symlink_to(checkpoint, target_is_directory=True)
    rows = [{"step": STEP, "task": "corpus_val", "metric": "acc", "value": 0.5}]
    (run / "selection.json").write_text(select_samplers(rows).to_json())
    (run / "valsets").mkdir(exist_ok=True)
    with open(run / "valsets" / "corpus_val.jsonl", "w", encoding="utf-8") as f:
        for i, d in enumerate(docs[:16]):
            cut = len(d["text"]) // 2
            f.write(json.dumps({"task": "corpus_val", "doc": i, "context": d["text"][:cut],
                                "continuation": d["text"][cut:]}, ensure_ascii=False) + "\n")
    Scorer(c, STEP, log=lambda _: None).fit()
    return path, len(list((run / "corpus").glob("part-*.parquet")))


def run_child(cfg: Path, shards: int) -> tuple[float, ...]:
    run = Path(yaml.safe_load(cfg.read_text())["run"]["root"]) / yaml.safe_load(cfg.read_text())["run"]["id"]
    for p in (run / "scores" / f"step={STEP}").glob("part-*.parquet"):
        p.unlink()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(STEP), f"0:{shards}"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout + proc.stderr)
    scored = len(list((run / "scores" / f"step={STEP}").glob("part-*.parquet")))
    assert scored == shards, (scored, shards)
    base, peak, first, last, most = (float(x) for x in proc.stderr.split("RESULT")[-1].split()[:5])
    return base, peak, wall, first, last, most


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=64)
    ap.add_argument("--docs-per-shard", type=int, default=500)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    import transformers
    transformers.utils.logging.disable_progress_bar()

    sizes = [int(s) for s in args.sizes.split(",")]
    load0, t_start = os.getloadavg(), time.perf_counter()
    with demo_run() as (demo, ckpt), tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        docs = corpus_docs(demo)
        if ckpt is None:  # fresh clone: a random tiny proxy with the run's tokenizer
            from influence_cost import load_model, load_tokenizer
            tok = load_tokenizer(demo)
            ckpt = tmp / "ckpt"
            load_model("tiny", tok).save_pretrained(str(ckpt))
            tok.save_pretrained(str(ckpt))
        weights = f"`{ckpt.relative_to(ROOT)}`" if ckpt.is_relative_to(ROOT) else "a random-init `tiny` proxy"
        runs = {}
        for n in sizes:
            t0 = time.perf_counter()
            runs[n] = build_run(tmp, f"mem{n}", docs, n, demo / "tokenizer", ckpt.resolve(), args)
            print(f"built {n:,} docs ({runs[n][1]} shards) in {time.perf_counter() - t0:.0f} s", flush=True)
        results = {n: [] for n in sizes}
        for r in range(args.repeats):  # interleaved: every size once per round
            for n in (sizes if r % 2 == 0 else sizes[::-1]):
                results[n].append(run_child(*runs[n]))
                b, p, w = results[n][-1][:3]
                print(f"round {r + 1}: {n:,} docs: peak {p:.0f} MiB (after imports {b:.0f}), {w:.0f} s", flush=True)
    load1, total = os.getloadavg(), time.perf_counter() - t_start

    first = sizes[0]
    keys = ("base", "peak", "wall", "first", "last", "most")
    med = {n: {k: statistics.median(x[i] for x in results[n]) for i, k in enumerate(keys)} for n in sizes}
    lines = [
        "# Influence scoring (pass 3): peak memory vs corpus size",
        "",
        machine_line() + ".",
        load_line(load0, load1) + ".",
        f"Each run is a fresh process running `automixer score --step {STEP} --shards 0:<all>` (the streaming "
        f"per-shard loop; the child calls `influence.score.score()` as `cmd_score` does, with a logger that "
        f"samples the RSS after each shard) on a prepared run of N documents ({args.docs_per_shard} per shard), "
        f"model {weights} "
        f"(fp32, CPU), influence.max_seq_len {args.max_seq_len}, influence.batch_tokens 8192. Peak RSS = "
        f"ru_maxrss of that process; 'after imports' = its RSS once torch, transformers and the scorer are "
        f"imported. Median of {args.repeats} runs per size, sizes interleaved. Whole run: {total:.0f} s.",
        "",
        f"Reproduce: `.venv/bin/python benchmarks/influence_memory.py --repeats {args.repeats} "
        "--out benchmarks/results/influence_memory.md`",
        "",
        "| documents | shards | peak RSS (MiB) | ratio vs first | peak − after imports (MiB) | runs (peak MiB) | "
        "RSS after 1st / last shard, max between shards (MiB) | wall (s) |",
        "|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for n in sizes:
        m = med[n]
        lines.append(f"| {n:,} | {runs[n][1]} | {m['peak']:.0f} | {m['peak'] / med[first]['peak']:.2f} | "
                     f"{m['peak'] - m['base']:.0f} | {', '.join(f'{x[1]:.0f}' for x in results[n])} | "
                     f"{m['first']:.0f} / {m['last']:.0f}, {m['most']:.0f} | {m['wall']:.0f} |")
    last = sizes[-1]
    lines += [
        "",
        f"Peak RSS ratio {last:,} ÷ {first:,} documents: **{med[last]['peak'] / med[first]['peak']:.2f}** "
        f"(working set above the imports: "
        f"{(med[last]['peak'] - med[last]['base']) / (med[first]['peak'] - med[first]['base']):.2f}×).",
        "",
        "The documents are the real corpus' documents repeated under new ids (documents 17.. of the corpus, "
        "shuffled with seed 0); the validation set (16 pairs: first half of a document's text as context, second "
        "half as continuation) is cut from its first 16 documents. The fit (`influence.fit_samples: 64`) is made "
        "once per size before the timed runs, as the scoring jobs of a DAG find it.",
        "",
    ]
    emit("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
