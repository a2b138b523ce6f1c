"""Peak memory of `automixer prepare` as the corpus grows: it must stay flat.

Inputs:
  1x   the embedded sample (data/corpus, ~4.3 MB, 2,695 documents)
  10x  the sample written 10 times with distinct ids (~43 MB, 26,950 documents)
  full the complete shared corpus (../shared/data/corpus, ~52 MB, 17,462 distinct
       documents), when that folder exists
Each is prepared twice per repeat: with a given tokenizer (the pure streaming path) and
with BPE training on the corpus. Each prepare runs in a fresh process that reports its own
peak RSS (ru_maxrss, Rust tokenizer threads included). Median of --repeats runs.

    .venv/bin/python benchmarks/prepare_memory.py --repeats 3 --out benchmarks/results/prepare_memory.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "corpus"

NOTES = """
Notes: with a given tokenizer the peak stays flat as the input grows 10× (the `10x` input
repeats the sample's texts under new ids). Training the BPE holds a count per distinct
word, so its peak grows with the vocabulary of the text, not with its size: the `10x`
input has no new words (flat), the `full` corpus has 12× the sample's distinct text
(+37%); `tokenizer.train_max_chars` bounds it for any corpus. The fixed ~170 MiB gap
between the two modes is `transformers.AutoTokenizer` importing torch.
"""

CHILD = """
import resource, sys
from automixer_ops.cli import main
rc = main(["prepare", "--config", sys.argv[1]])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(rc)
"""


def make_inputs(tmp: Path) -> dict[str, list[str]]:
    sample = sorted((ROOT / "data" / "corpus").glob("*.jsonl"))
    inputs = {"1x": [str(p) for p in sample]}
    big = tmp / "x10"
    big.mkdir()
    for src in sample:
        lines = src.read_text(encoding="utf-8").splitlines()
        with open(big / src.name, "w", encoding="utf-8") as f:
            for k in range(10):
                for line in lines:
                    doc = json.loads(line)
                    doc["id"] = f"{doc['id']}#{k}"
                    f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    inputs["10x"] = [str(big / "*.jsonl")]
    if SHARED.is_dir():
        inputs["full"] = [str(SHARED / "*" / "*.jsonl")]
    return inputs


def size_mb(patterns: list[str]) -> float:
    import glob
    return sum(Path(p).stat().st_size for pat in patterns for p in glob.glob(pat)) / 1e6


def run_once(tmp: Path, name: str, paths: list[str], tokenizer: str | None, rep: int) -> tuple[float, float]:
    cfg = {"run": {"id": f"{name}-{'given' if tokenizer else 'train'}-{rep}", "root": str(tmp / "runs")},
           "corpus": {"paths": paths, "source_field": "domain"},
           "tokenizer": {"vocab_size": 8192, **({"path": tokenizer} if tokenizer else {})}}
    path = tmp / f"{cfg['run']['id']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stderr)
    peak_kb = int(proc.stderr.split("PEAK_KB")[-1].split()[0])
    return peak_kb / 1024, wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        inputs = make_inputs(tmp)
        # A tokenizer to hand to the "given" runs, trained once on the sample.
        run_once(tmp, "tok", inputs["1x"], None, 0)
        tokenizer = str(tmp / "runs" / "tok-train-0" / "tokenizer")
        rows = []
        for name, paths in inputs.items():
            for tok in (tokenizer, None):
                peaks, walls = zip(*(run_once(tmp, name, paths, tok, r) for r in range(args.repeats)))
                rows.append((name, size_mb(paths), "given" if tok else "trained",
                             statistics.median(peaks), statistics.median(walls)))
                print(rows[-1], flush=True)
    base = {mode: peak for name, _, mode, peak, _ in rows if name == "1x"}
    lines = [
        "# prepare: peak memory vs corpus size",
        "",
        f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}. "
        f"Median of {args.repeats} runs, each prepare in a fresh process (peak RSS = ru_maxrss).",
        "",
        "Reproduce: `.venv/bin/python benchmarks/prepare_memory.py --repeats 3 --out benchmarks/results/prepare_memory.md`",
        "",
        "| input | size (MB) | tokenizer | peak RSS (MiB) | ratio vs 1x | wall (s) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for name, mb, mode, peak, wall in rows:
        lines.append(f"| {name} | {mb:.1f} | {mode} | {peak:.0f} | {peak / base[mode]:.2f} | {wall:.1f} |")
    text = "\n".join(lines) + "\n" + NOTES
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
