"""Baseline selections (uniform, uniform-source, ppl, dsir) and the mixture contract they write."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_valset

from automixer_ops import baselines
from automixer_ops.baselines import baseline_mixture
from automixer_ops.config import load_config
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.experiment_config import MethodSpec
from automixer_ops.mixture_io import mixture_schema

QUIET = {"log": lambda _: None}


def spec(kind: str, name: str | None = None, **options) -> MethodSpec:
    return MethodSpec(name=name or kind, kind=kind, **options)


def hand_run(tmp_path: Path, docs: list[tuple[str, str, str, int]], shards: int = 1, docs_per_part: int = 7,
             tasks: list[str] = ("piqa",)):
    """A run directory holding only a corpus of (id, source, text, n_tokens) rows in `shards` shards."""
    run = tmp_path / "runs" / "hand"
    (run / "corpus").mkdir(parents=True)
    for s in range(shards):
        rows = docs[s::shards]
        pq.write_table(pa.table({"id": pa.array([d[0] for d in rows], pa.string()),
                                 "source": pa.array([d[1] for d in rows], pa.string()),
                                 "text": pa.array([d[2] for d in rows], pa.string()),
                                 "n_tokens": pa.array([d[3] for d in rows], pa.int64())}),
                       run / "corpus" / f"part-{s:05d}.parquet")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"run": {"id": "hand", "root": str(tmp_path / "runs")},
                                      "corpus": {"paths": ["x.jsonl"]}, "tasks": {"targets": list(tasks)},
                                      "mix": {"docs_per_part": docs_per_part}}))
    return load_config(config), run


def sized_corpus(n: int = 40, sources=("a", "b", "c"), seed: int = 7):
    rng = np.random.default_rng(seed)
    # source "c" is small: few, short documents, so an equal share makes it repeat
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        size = int(rng.integers(1, 6)) if src == "c" else int(rng.integers(5, 60))
        out.append((f"d{i:03d}", src, f"text of document {i} " * 3, size))
    return out


def corpus_table(run: Path) -> dict[str, dict]:
    t = pq.read_table(sorted((run / "corpus").glob("part-*.parquet"))).to_pylist()
    return {r["id"]: r for r in t}


def read_mixture(out: Path):
    parts = sorted(out.glob("part-*.parquet"))
    return parts, pq.read_table(parts).to_pylist() if parts else []


def check_contract(out: Path, run: Path, budget: int, docs_per_part: int) -> dict:
    """Everything DESIGN §3 and the runner expect of a mixture directory; returns weights.json."""
    corpus = corpus_table(run)
    parts, rows = read_mixture(out)
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(len(parts))]
    for p in parts:
        assert pq.read_schema(p).remove_metadata() == mixture_schema()
    assert [pq.ParquetFile(p).metadata.num_rows for p in parts[:-1]] == [docs_per_part] * (len(parts) - 1)
    assert 1 <= pq.ParquetFile(parts[-1]).metadata.num_rows <= docs_per_part
    for r in rows:  # every row is a corpus document with its own text, grouped by its source
        assert r["text"] == corpus[r["id"]]["text"] and r["group"] == corpus[r["id"]]["source"]
    tokens = [corpus[r["id"]]["n_tokens"] for r in rows]
    # stops at the first document that reaches T: T <= total < T + (some drawn document)
    assert budget <= sum(tokens) < budget + max(tokens)
    # repeats: occurrence r of a document exists only after occurrences 0 .. r-1, never twice
    seen: dict[str, list[int]] = {}
    for r in rows:
        seen.setdefault(r["id"], []).append(r["repeat"])
    for reps in seen.values():
        assert sorted(reps) == list(range(len(reps)))
    w = json.loads((out / "weights.json").read_text())
    assert (w["token_budget"], w["tokens"], w["documents"], w["parts"]) == (budget, sum(tokens), len(rows), len(parts))
    assert w["unique_documents"] == len(seen) and w["underfilled"] is False
    assert w["passes"] == max(r["repeat"] for r in rows) + 1
    groups = {}
    for r, n in zip(rows, tokens):
        g = groups.setdefault(r["group"], {"tokens": 0, "documents": 0, "passes": 0})
        g["tokens"] += n
        g["documents"] += 1
        g["passes"] = max(g["passes"], r["repeat"] + 1)
    assert {k: {f: v[f] for f in ("tokens", "documents", "passes")} for k, v in w["groups"].items()} == groups
    assert sum(g["share"] for g in w["groups"].values()) == pytest.approx(1.0)
    blend = (out / "blend.txt").read_text().split()
    assert blend[1::2] == [f"{g}_text_document" for g in sorted(groups)]
    return w


def order(out: Path) -> list[tuple]:
    return [(r["id"], r["repeat"]) for r in read_mixture(out)[1]]


# ---------------------------------------------------------------- uniform, uniform-source

def test_uniform_contract_seeds_and_rerun(tmp_path):
    cfg, run = hand_run(tmp_path, sized_corpus(), shards=3)
    total = sum(d[3] for d in sized_corpus())
    budget = total // 2
    out = tmp_path / "exp" / "uniform" / "seed-0" / "mixture"
    before = np.random.get_state()[1].copy()
    baseline_mixture(spec("uniform"), cfg, out, budget, 0, tmp_path / "cache", **QUIET)
    assert np.array_equal(np.random.get_state()[1], before)  # numpy's global generator untouched
    w = check_contract(out, run, budget, 7)
    assert (w["method"], w["kind"], w["seed"], w["passes"]) == ("uniform", "uniform", 0, 1)
    assert not list(out.parent.glob(".staging-*"))
    # the same seed draws the same mixture, byte for byte in its rows; another seed another one
    again = tmp_path / "again"
    baseline_mixture(spec("uniform"), cfg, again, budget, 0, tmp_path / "cache", **QUIET)
    assert order(again) == order(out)
    other = tmp_path / "other"
    baseline_mixture(spec("uniform"), cfg, other, budget, 1, tmp_path / "cache", **QUIET)
    check_contract(other, run, budget, 7)
    assert order(other) != order(out)
    assert sorted(order(other)) != sorted(order(out))  # another draw, not only another order
    # a rerun with the same inputs does nothing; other inputs redraw and replace
    logs = []
    stamp = (out / "part-00000.parquet").stat().st_mtime_ns
    baseline_mixture(spec("uniform"), cfg, out, budget, 0, tmp_path / "cache", log=logs.append)
    assert "already drawn" in logs[-1] and (out / "part-00000.parquet").stat().st_mtime_ns == stamp
    baseline_mixture(spec("uniform"), cfg, out, budget + 100, 0, tmp_path / "cache", log=logs.append)
    assert "already drawn" not in logs[-1]
    check_contract(out, run, budget + 100, 7)


def test_uniform_past_the_corpus_makes_passes(tmp_path):
    docs = sized_corpus(12)
    cfg, run = hand_run(tmp_path, docs)
    total = sum(d[3] for d in docs)
    budget = int(2.5 * total)
    out = tmp_path / "m"
    baseline_mixture(spec("uniform"), cfg, out, budget, 3, tmp_path / "c", **QUIET)
    w = check_contract(out, run, budget, 7)
    assert w["passes"] == 3
    rows = read_mixture(out)[1]
    for rep in (0, 1):  # whole passes hold every document once
        assert sorted(r["id"] for r in rows if r["repeat"] == rep) == sorted(d[0] for d in docs)
    assert 0 < sum(r["repeat"] == 2 for r in rows) < len(docs)


def test_uniform_source_equal_tokens_per_source(tmp_path):
    docs = sized_corpus(60)
    cfg, run = hand_run(tmp_path, docs, shards=2)
    budget = 1500  # 500 a source; source "c" has far fewer tokens: it repeats
    out = tmp_path / "m"
    baseline_mixture(spec("uniform-source", name="src"), cfg, out, budget, 0, tmp_path / "c", **QUIET)
    w = check_contract(out, run, budget, 7)
    longest = max(d[3] for d in docs)
    assert sorted(w["groups"]) == ["a", "b", "c"]
    for g in w["groups"].values():
        assert abs(g["tokens"] - budget / 3) < longest
    assert w["groups"]["c"]["passes"] > 1 and w["groups"]["a"]["passes"] == 1
    assert w["kind"] == "uniform-source" and w["tokens_per_source"] == pytest.approx(500)
    baseline_mixture(spec("uniform-source", name="src"), cfg, tmp_path / "m1", budget, 1, tmp_path / "c", **QUIET)
    assert order(tmp_path / "m1") != order(out)


# ---------------------------------------------------------------- dsir

TARGET = "the quantum electron orbits the nucleus while photons excite the atom energy level".split()
OTHER = "bake the bread dough with butter sugar flour and fresh eggs in a warm oven".split()


def test_dsir_prefers_target_like_documents(tmp_path):
    rng = np.random.default_rng(0)
    docs = []
    for i in range(60):
        like = i % 2 == 0
        words = rng.choice(TARGET if like else OTHER, size=int(rng.integers(20, 40)))
        docs.append((f"{'t' if like else 'o'}{i:03d}", f"s{i % 3}", " ".join(words), 30))
    docs.append(("short", "s0", "atom", 30))  # one word: under min_example_length, importance 0
    cfg, run = hand_run(tmp_path, docs, shards=2)
    write_valset(run, "piqa", [{"context": "Question: what does the " + " ".join(TARGET[i:i + 5]) + "?\nAnswer:",
                                "continuation": " " + " ".join(TARGET[i + 5:i + 9])} for i in range(6)])
    method = spec("dsir", num_buckets=2000, min_example_length=5)
    budget = 600  # 20 of the 61 documents
    out = tmp_path / "m"
    before = np.random.get_state()[1].copy()
    baseline_mixture(method, cfg, out, budget, 0, tmp_path / "cache", **QUIET)
    assert np.array_equal(np.random.get_state()[1], before)
    w = check_contract(out, run, budget, 7)
    rows = read_mixture(out)[1]
    assert sum(r["id"].startswith("t") for r in rows) >= 0.9 * len(rows)
    assert "short" not in {r["id"] for r in rows}
    assert (w["zero_importance_documents"], w["eligible_documents"]) == (1, 60)
    assert (w["ngrams"], w["num_buckets"], w["min_example_length"], w["target_examples"]) == (2, 2000, 5, 6)
    cache = pq.read_table(tmp_path / "cache" / "dsir_importance.parquet").to_pylist()
    assert [r["id"] for r in cache] == [d[0] for d in docs[0::2]] + [d[0] for d in docs[1::2]]  # shard order
    weights = {r["id"]: r["log_weight"] for r in cache}
    assert min(v for k, v in weights.items() if k.startswith("t")) > max(v for k, v in weights.items()
                                                                          if k.startswith("o"))
    assert weights["short"] == -math.inf
    assert not list((tmp_path / "cache").glob(".dsir-work-*"))
    # seeds: the same seed the same mixture; the weights come from the cache the second time
    logs = []
    baseline_mixture(method, cfg, tmp_path / "m0", budget, 0, tmp_path / "cache", log=logs.append)
    assert order(tmp_path / "m0") == order(out) and any("from the cache" in line for line in logs)
    baseline_mixture(method, cfg, tmp_path / "m1", budget, 1, tmp_path / "cache", **QUIET)
    assert order(tmp_path / "m1") != order(out)
    # past the eligible documents: further passes, never the dropped one
    big = tmp_path / "big"
    baseline_mixture(method, cfg, big, 2500, 0, tmp_path / "cache", **QUIET)
    assert check_contract(big, run, 2500, 7)["passes"] == 2
    assert "short" not in {r["id"] for r in read_mixture(big)[1]}
    # the package's default would drop every document here; ours says so
    with pytest.raises(AutomixerError, match=r"methods\[dsir\]\.min_example_length"):
        baseline_mixture(spec("dsir", num_buckets=2000, min_example_length=100), cfg, tmp_path / "x", budget, 0,
                         tmp_path / "cache", **QUIET)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- ppl

def test_ppl_bands_and_cache(trained, tmp_path, monkeypatch):
    import os
    import shutil

    from automixer_ops.baselines import ppl as ppl_module

    config, trained_run = trained
    run = tmp_path / "runs" / trained_run.name  # a copy: its checkpoint is touched below
    shutil.copytree(trained_run, run)
    cfg = load_config(config, [f"run.root={tmp_path / 'runs'}", "mix.docs_per_part=25", "influence.max_seq_len=48"])
    assert cfg.run_dir == run
    calls = []
    real = ppl_module.perplexities
    monkeypatch.setattr(ppl_module, "perplexities", lambda *a: calls.append(1) or real(*a))
    corpus = corpus_table(run)
    n = len(corpus)
    cache = tmp_path / "cache"
    budget = sum(d["n_tokens"] for d in corpus.values())  # more than any band: every band document drawn
    w = {}
    for band in ("low", "middle", "high"):
        out = tmp_path / band
        baseline_mixture(spec("ppl", name="ppl", band=band, band_fraction=0.3), cfg, out, budget, 0, cache, **QUIET)
        w[band] = check_contract(out, run, budget, 25)
        assert w[band]["band_documents"] == math.floor(0.3 * n) == len({r["id"] for r in read_mixture(out)[1]})
        assert (w[band]["reference_step"], w[band]["max_seq_len"]) == (30, 48)
    assert len(calls) == 1  # the perplexities are computed once and reused
    scores = pq.read_table(cache / "perplexity-step-30.parquet").to_pylist()
    ppl = {r["id"]: r["ppl"] for r in scores}
    assert len(ppl) == n and all(np.isfinite(v) and v > 1 for v in ppl.values())
    drawn = {band: [ppl[r["id"]] for r in read_mixture(tmp_path / band)[1]] for band in w}
    assert max(drawn["low"]) <= min(drawn["middle"]) and max(drawn["middle"]) <= min(drawn["high"])
    assert w["low"]["thresholds"]["ppl_max"] == max(drawn["low"])
    assert w["high"]["thresholds"]["rank_to"] == n and w["low"]["thresholds"]["rank_from"] == 0

    # one document's nll is the model's own mean next-token loss of [EOS] + its first max_seq_len - 1 tokens
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(run / "checkpoints" / "step-30"))
    model = AutoModelForCausalLM.from_pretrained(str(run / "checkpoints" / "step-30")).eval()
    doc = scores[5]
    text = corpus[doc["id"]]["text"]
    ids = [tok.eos_token_id] + tok.backend_tokenizer.encode(text, add_special_tokens=False).ids[:47]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert doc["nll"] == pytest.approx(loss, rel=1e-4)

    # another reference checkpoint: computed for it
    baseline_mixture(spec("ppl", name="ppl", reference_step=10), cfg, tmp_path / "s10", budget // 4, 0, cache, **QUIET)
    assert len(calls) == 2
    assert pq.read_table(cache / "perplexity-step-10.parquet").to_pylist()[5]["nll"] != doc["nll"]
    w10 = check_contract(tmp_path / "s10", run, budget // 4, 25)
    assert w10["reference_step"] == 10 and w10["band"] == "middle"

    # the reference checkpoint rewritten: recomputed
    weights_file = run / "checkpoints" / "step-30" / "config.json"
    stamp = weights_file.stat().st_mtime_ns + 10**9
    os.utime(weights_file, ns=(stamp, stamp))
    baseline_mixture(spec("ppl", name="ppl"), cfg, tmp_path / "middle", budget, 0, cache, **QUIET)
    assert len(calls) == 3
    check_contract(tmp_path / "middle", run, budget, 25)

    # errors: an empty band, a step that is not there
    with pytest.raises(AutomixerError, match=r"methods\[ppl\]\.band_fraction: the low band .* is empty"):
        baseline_mixture(spec("ppl", name="ppl", band="low", band_fraction=0.001), cfg, tmp_path / "e", 100, 0,
                         cache, **QUIET)
    with pytest.raises(ConfigError, match=r"methods\[ppl\]\.reference_step: no checkpoint step-7"):
        baseline_mixture(spec("ppl", name="ppl", reference_step=7), cfg, tmp_path / "e", 100, 0, cache, **QUIET)
    assert not (tmp_path / "e").exists() and len(calls) == 3


# ---------------------------------------------------------------- errors

def test_errors(tmp_path):
    cfg, _ = hand_run(tmp_path, sized_corpus(9))
    with pytest.raises(ConfigError, match=r"methods\[ours\]\.kind: 'automixer' is not a baseline"):
        baseline_mixture(spec("automixer", name="ours"), cfg, tmp_path / "m", 100, 0, tmp_path / "c", **QUIET)
    with pytest.raises(ConfigError, match="token_budget"):
        baseline_mixture(spec("uniform"), cfg, tmp_path / "m", 0, 0, tmp_path / "c", **QUIET)
    with pytest.raises(AutomixerError, match=r"piqa\.jsonl: no validation set"):
        baseline_mixture(spec("dsir"), cfg, tmp_path / "m", 100, 0, tmp_path / "c", **QUIET)
    assert not (tmp_path / "m").exists()

    empty_cfg, empty = hand_run(tmp_path / "empty", [])
    for kind in ("uniform", "uniform-source"):
        with pytest.raises(AutomixerError, match="no (tokens|documents) to draw"):
            baseline_mixture(spec(kind), empty_cfg, tmp_path / "m", 100, 0, tmp_path / "c", **QUIET)
    for p in (empty / "corpus").glob("*.parquet"):
        p.unlink()
    with pytest.raises(AutomixerError, match="no part-.*parquet shards"):
        baseline_mixture(spec("uniform"), empty_cfg, tmp_path / "m", 100, 0, tmp_path / "c", **QUIET)
    assert not (tmp_path / "m").exists()
    assert baselines.KINDS == ("uniform", "uniform-source", "ppl", "dsir")
