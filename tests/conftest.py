"""Shared fixtures. Hugging Face is kept offline with a project-local cache for every test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", str(ROOT / ".hf_home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

DATA = ROOT / "data"


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return path


def write_config(path: Path, corpus: dict, tokenizer: dict | None = None, run: dict | None = None) -> Path:
    import yaml

    cfg = {"run": {"id": "t", "root": "runs", **(run or {})},
           "corpus": corpus,
           "tokenizer": {"vocab_size": 400, "model_max_length": 256, **(tokenizer or {})}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """The first 12 documents of each of the 9 embedded domains: real text, quick to prepare."""
    out = tmp_path_factory.mktemp("small_corpus")
    for src in sorted((DATA / "corpus").glob("*.jsonl")):
        with open(src, encoding="utf-8") as f:
            rows = [json.loads(next(f)) for _ in range(12)]
        write_jsonl(out / src.name, rows)
    return out


PROXY = {"preset": "tiny", "seq_len": 64, "batch_size": 8, "max_steps": 30, "save_every": 10,
         "warmup_steps": 3, "log_every": 5, "lr": 0.003}


def proxy_config(tmp: Path, small_corpus: Path, run_id: str, **proxy) -> Path:
    import yaml

    path = write_config(tmp / f"{run_id}.yaml", {"paths": [str(small_corpus / "*.jsonl")], "source_field": "domain"},
                        run={"id": run_id})
    cfg = yaml.safe_load(path.read_text())
    cfg["proxy"] = {**PROXY, **proxy}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def trained(small_corpus, tmp_path_factory):
    """A tiny proxy trained 30 steps on the small real corpus: (config path, run dir)."""
    tmp = tmp_path_factory.mktemp("trained")
    config = proxy_config(tmp, small_corpus, "a")
    from automixer_ops.config import load_config
    from automixer_ops.prepare import prepare
    from automixer_ops.proxy import train_proxy

    cfg = load_config(config)
    prepare(cfg, log=lambda _: None)
    train_proxy(cfg, log=lambda _: None)
    return config, cfg.run_dir


def write_valset(run_dir, task: str, rows: list[dict]) -> None:
    (run_dir / "valsets").mkdir(exist_ok=True)
    with open(run_dir / "valsets" / f"{task}.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps({"task": task, "doc": i, **r}) + "\n")


def piqa_pairs(n: int) -> list[dict]:
    with open(DATA / "benchmarks" / "piqa" / "validation.jsonl") as f:
        docs = [json.loads(line) for line, _ in zip(f, range(n))]
    return [{"context": f"Question: {d['goal']}\nAnswer:", "continuation": " " + d[f"sol{d['label'] + 1}"]}
            for d in docs]


def arc_pairs(n: int) -> list[dict]:
    with open(DATA / "benchmarks" / "arc_easy" / "validation.jsonl") as f:
        docs = [json.loads(line) for line, _ in zip(f, range(n))]
    out = []
    for d in docs:
        gold = d["choices"]["text"][d["choices"]["label"].index(d["answerKey"])]
        out.append({"context": f"Question: {d['question']}\nAnswer:", "continuation": " " + gold})
    return out


def linked_scoring_run(tmp: Path, trained_dir: Path, small_corpus: Path, run_id: str, checkpoints: dict,
                       samplers: list, valsets: dict, docs_per_shard: int, influence: dict) -> Path:
    """A run that scores the given checkpoints ({step: path}, linked as a user's own): the prepared corpus, the
    validation sets ({task: pairs}) and a selection (Sampler objects) written directly; returns its config."""
    import yaml

    from automixer_ops.config import load_config
    from automixer_ops.prepare import prepare
    from automixer_ops.proxy import train_proxy
    from automixer_ops.samplers import Selection

    refs = [{"step": s, "path": str(path)} for s, path in checkpoints.items()]
    config = proxy_config(tmp, small_corpus, run_id, checkpoints=refs)
    raw = yaml.safe_load(config.read_text())
    raw["tokenizer"]["path"] = str(trained_dir / "tokenizer")
    raw["corpus"]["docs_per_shard"] = docs_per_shard
    raw["influence"] = influence
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    prepare(cfg, log=lambda _: None)
    train_proxy(cfg, log=lambda _: None)
    for task, pairs in valsets.items():
        write_valset(cfg.run_dir, task, pairs)
    (cfg.run_dir / "selection.json").write_text(Selection({}, samplers).to_json())
    return config


@pytest.fixture(scope="session")
def scoring_run(trained, small_corpus, tmp_path_factory):
    """The tiny trained proxy's checkpoints linked into a run of 4 corpus shards, with two samplers."""
    from automixer_ops.samplers import Sampler

    _, trained_dir = trained
    return linked_scoring_run(
        tmp_path_factory.mktemp("scoring"), trained_dir, small_corpus, "sc",
        {s: trained_dir / "checkpoints" / f"step-{s}" for s in (10, 30)},
        [Sampler(10, ["piqa"], 0.25), Sampler(30, ["arc_easy", "piqa"], 0.75)],
        {"piqa": piqa_pairs(8), "arc_easy": arc_pairs(8)}, docs_per_shard=30,
        influence={"max_seq_len": 64, "batch_tokens": 512})


def execute_quietly(op, params: dict):
    """Run a launcher operator's execute() on the params, its log muted: the AirflowFailException it fails
    with, or None."""
    from unittest import mock

    from airflow.sdk.exceptions import AirflowFailException

    op._log_line = lambda line: None
    ti = mock.MagicMock(map_index=-1, dag_id="automixer", task_id="t", run_id="r", try_number=1)
    try:
        op.execute({"params": params, "ti": ti, "run_id": "r", "outlet_events": mock.MagicMock()})
    except AirflowFailException as e:
        return e
    return None
