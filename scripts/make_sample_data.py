"""Rebuild the embedded demo data under data/ from the full copies in ../shared/data.

The committed files under data/ are the output of this script; it is kept so that the
sample can be audited and regenerated (`python scripts/make_sample_data.py`). It needs
only the standard library.

Corpus: per domain, documents are taken in a seeded random order until a character
budget is spent; documents longer than MAX_DOC_CHARS are skipped so that a few long
books do not eat a domain's budget. Records keep their attribution fields.

Benchmarks: each evaluation split is converted to the schema of the Hugging Face dataset
that lm-evaluation-harness's bundled task YAML reads, so that the bundled YAML's
doc_to_text / doc_to_target / doc_to_choice apply unchanged. Splits larger than
MAX_EVAL_DOCS are subsampled (seeded, original order kept).
"""

from __future__ import annotations

import bz2
import json
import random
import sys
from pathlib import Path

SEED = 1234
DOMAIN_CHAR_BUDGET = 450_000
MAX_DOC_CHARS = 30_000
MAX_EVAL_DOCS = 1000
KEEP_FIELDS = ("id", "domain", "source", "text", "title", "author", "url", "license", "date", "created")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "data"


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"  {path.relative_to(ROOT)}: {len(rows)} rows, {path.stat().st_size / 1e6:.2f} MB")


def sample_corpus() -> None:
    by_domain: dict[str, list[dict]] = {}
    for path in sorted((SHARED / "corpus").glob("*/*.jsonl")):
        for doc in read_jsonl(path):
            by_domain.setdefault(doc["domain"], []).append(doc)
    rng = random.Random(SEED)
    for domain, docs in sorted(by_domain.items()):
        order = list(range(len(docs)))
        rng.shuffle(order)
        chosen, spent = [], 0
        for i in order:
            n = len(docs[i]["text"])
            if n > MAX_DOC_CHARS or spent + n > DOMAIN_CHAR_BUDGET:
                continue
            chosen.append(i)
            spent += n
        rows = [{k: docs[i][k] for k in KEEP_FIELDS if k in docs[i]} for i in sorted(chosen)]
        write_jsonl(OUT / "corpus" / f"{domain}.jsonl", rows)


def subsample(rows: list[dict], rng: random.Random) -> list[dict]:
    if len(rows) <= MAX_EVAL_DOCS:
        return rows
    keep = sorted(rng.sample(range(len(rows)), MAX_EVAL_DOCS))
    return [rows[i] for i in keep]


def arc(path: Path) -> list[dict]:
    # allenai/ai2_arc schema: choices is a dict of parallel lists.
    rows = []
    for d in read_jsonl(path):
        q = d["question"]
        rows.append({
            "id": d["id"],
            "question": q["stem"],
            "choices": {"text": [c["text"] for c in q["choices"]],
                        "label": [c["label"] for c in q["choices"]]},
            "answerKey": d["answerKey"],
        })
    return rows


def with_labels(jsonl: Path, labels: Path) -> list[tuple[dict, str]]:
    docs = read_jsonl(jsonl)
    labs = [s.strip() for s in labels.read_text().splitlines() if s.strip()]
    assert len(docs) == len(labs), (jsonl, len(docs), len(labs))
    return list(zip(docs, labs))


def hellaswag(path: Path) -> list[dict]:
    # The shared copy is klosax's 6-lines-per-item text extract (already preprocessed the
    # way lm-eval's hellaswag utils do). ctx_a/ctx_b cannot be separated again, so ctx_a
    # holds the whole context and ctx_b is empty; lm-eval's process_docs then rebuilds the
    # same query except that ctx_b's first letter is not re-capitalised.
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    rows = []
    for i in range(0, len(lines) - 5, 6):
        head, label, *endings = lines[i:i + 6]
        activity, _, ctx = head.partition(": ")
        rows.append({"ind": i // 6, "activity_label": activity, "ctx_a": ctx, "ctx_b": "",
                     "ctx": ctx, "endings": endings, "source_id": "", "split": "val",
                     "split_type": "", "label": label.strip()})
    return rows


def convert_benchmarks() -> None:
    b = SHARED / "benchmarks"
    rng = random.Random(SEED)
    out = OUT / "benchmarks"
    write_jsonl(out / "arc_easy" / "validation.jsonl", subsample(arc(b / "arc_easy/ARC-Easy-Dev.jsonl"), rng))
    write_jsonl(out / "arc_challenge" / "validation.jsonl",
                subsample(arc(b / "arc_challenge/ARC-Challenge-Dev.jsonl"), rng))
    boolq = [{"question": d["question"], "passage": d["passage"], "idx": i, "label": int(d["answer"])}
             for i, d in enumerate(read_jsonl(b / "boolq/dev.jsonl"))]
    write_jsonl(out / "boolq" / "validation.jsonl", subsample(boolq, rng))
    piqa = [{**d, "label": int(lab)} for d, lab in with_labels(b / "piqa/valid.jsonl", b / "piqa/valid-labels.lst")]
    write_jsonl(out / "piqa" / "validation.jsonl", subsample(piqa, rng))
    siqa = [{**d, "label": lab} for d, lab in with_labels(b / "siqa/dev.jsonl", b / "siqa/dev-labels.lst")]
    write_jsonl(out / "social_iqa" / "validation.jsonl", subsample(siqa, rng))
    write_jsonl(out / "hellaswag" / "validation.jsonl",
                subsample(hellaswag(b / "hellaswag/hellaswag_val_full.txt.bz2"), rng))
    obqa = [{"id": d["id"], "question_stem": d["question"]["stem"],
             "choices": {"text": [c["text"] for c in d["question"]["choices"]],
                         "label": [c["label"] for c in d["question"]["choices"]]},
             "answerKey": d["answerKey"]} for d in read_jsonl(b / "openbookqa/Main/test.jsonl")]
    write_jsonl(out / "openbookqa" / "test.jsonl", subsample(obqa, rng))
    wino = [{"sentence": d["sentence"], "option1": d["option1"], "option2": d["option2"], "answer": lab}
            for d, lab in with_labels(b / "winogrande/dev.jsonl", b / "winogrande/dev-labels.lst")]
    write_jsonl(out / "winogrande" / "validation.jsonl", subsample(wino, rng))


if __name__ == "__main__":
    if not SHARED.is_dir():
        sys.exit(f"error: {SHARED} not found; this script needs the full shared data")
    print("corpus:")
    sample_corpus()
    print("benchmarks:")
    convert_benchmarks()
