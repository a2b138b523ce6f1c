"""`automixer prepare`: a raw corpus in, tokenized Parquet shards and a tokenizer out.

Passes over the input (each streaming, memory flat in corpus size):
  1. only when no tokenizer is given: train a byte-level BPE on the first
     `tokenizer.train_max_chars` characters;
  2. read + validate + count tokens, writing `corpus/part-*.parquet` and a small id index;
  3. DuckDB checks the id index for duplicates (it spills to disk, so this too stays
     bounded in memory for any corpus size).
Everything is built in a staging directory and moved into the run directory only when
all checks pass: a failed prepare leaves no run directory (or the previous one intact).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from automixer_ops.config import Config
from automixer_ops.corpus import Document, InputFile, ReadStats, read_documents, resolve_inputs
from automixer_ops.errors import ConfigError, CorpusError
from automixer_ops.progress import Progress, heartbeat
from automixer_ops.rundir import (RUN_MARKER, STAGING_PREFIX, SUCCESS, RunDir, atomic_write_text, clean_stale_staging,
                                  fingerprint, is_run_directory, read_marker, publish, staged_directory,
                                  write_marker, write_run_marker)
from automixer_ops.tokenizer import count_tokens, load_tokenizer, train_bpe

# A batch also ends at this many characters: tokenizer output is ~100 bytes per token, so
# a batch of long documents (books, textbooks) would otherwise set the peak memory.
BATCH_MAX_CHARS = 2_000_000
CORPUS_SCHEMA_FIELDS = (("id", "string"), ("source", "string"), ("text", "string"), ("n_tokens", "int64"))


@dataclass
class PrepareSummary:
    run_dir: str
    n_docs: int
    n_tokens: int
    skipped_empty: int
    shards: list[dict]
    sources: dict[str, dict] = field(default_factory=dict)  # source -> {"docs", "tokens"}
    tokenizer: str = ""
    fingerprint: str = ""
    reused: bool = False  # true when a rerun found the corpus already prepared


def prepare(cfg: Config, force: bool = False, log: Callable[[str], None] = print) -> PrepareSummary:
    run = RunDir(cfg.run_dir)
    check_run_directory(run.path)
    inputs = resolve_inputs(cfg)
    corpus_fp = _fingerprint(cfg, inputs)
    done = read_marker(run.corpus)
    if done and not force:
        if done.get("fingerprint") == corpus_fp:
            log(f"corpus already prepared in {run.corpus} (same inputs and settings); skipping")
            return PrepareSummary(**{**done, "reused": True})
        raise ConfigError(f"{run.path} was prepared from other corpus inputs or corpus/tokenizer settings; "
                          "pick another run.id, or rerun with --force to replace it")
    clean_stale_staging(run.path)
    root_made = not run.path.parent.exists()  # staging creates run.root too: a failure removes it again
    try:
        return _build(cfg, run, inputs, corpus_fp, log)
    except BaseException:
        if root_made and run.path.parent.is_dir() and not any(run.path.parent.iterdir()):
            run.path.parent.rmdir()
        raise


def _build(cfg: Config, run: RunDir, inputs: list[InputFile], corpus_fp: str,
           log: Callable[[str], None]) -> PrepareSummary:
    with staged_directory(run.path) as stage:
        if cfg.tokenizer.path:
            tokenizer = load_tokenizer(cfg.resolve(cfg.tokenizer.path), cfg.tokenizer)
            origin = str(cfg.resolve(cfg.tokenizer.path).resolve())
        else:
            log(f"training a byte-level BPE tokenizer (vocab {cfg.tokenizer.vocab_size}) on the corpus")
            with heartbeat("prepare", "training the tokenizer"):
                tokenizer = train_bpe((d.text for d in read_documents(inputs, cfg.corpus)), cfg.tokenizer)
            origin = f"trained: byte-level BPE, vocab {len(tokenizer)}"
        tokenizer.save_pretrained(str(stage / "tokenizer"))
        summary = _write_shards(cfg, inputs, tokenizer, stage / "corpus", stage / "id_index.parquet", log)
        with heartbeat("prepare", "checking that ids are unique (DuckDB)"):
            _check_unique_ids(stage / "id_index.parquet", inputs, stage)
        summary.run_dir, summary.tokenizer, summary.fingerprint = str(run.path.resolve()), origin, corpus_fp
        write_marker(stage / "corpus", summary.__dict__ | {"reused": False})
        atomic_write_text(stage / "config.yaml", cfg.dump_yaml())
        write_run_marker(run.path, cfg.run.id)  # from now on the directory is a run's, which steps may replace
        # The corpus marker decides "prepared": drop the old one first and move the corpus in
        # last, so a crash in between leaves "not prepared", never a new tokenizer + old corpus.
        (run.corpus / SUCCESS).unlink(missing_ok=True)
        publish(stage / "tokenizer", run.tokenizer)
        publish(stage / "config.yaml", run.config)
        publish(stage / "corpus", run.corpus)
    return summary


def check_run_directory(path: Path) -> None:
    """Prepare replaces config.yaml, tokenizer/ and corpus/ in the run directory: refuse a directory that is not
    one (no run marker), unless it is empty (or holds only what a killed first prepare left), so that a run.id or
    run.root pointing at the user's own files never replaces them."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path}: the run directory (run.root/run.id) exists and is not a directory")
    if not path.is_dir() or is_run_directory(path):
        return
    # the launcher's Slurm logs (<run>/slurm/, made before the prepare job runs) are ours too, and left alone
    others = sorted(p.name for p in path.iterdir() if not p.name.startswith(STAGING_PREFIX) and p.name != "slurm")
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ConfigError(f"{path}: exists and is not an AutoMixer run directory (no {RUN_MARKER}; it holds "
                          f"{shown}); prepare would replace its config.yaml, tokenizer/ and corpus/. Pick another "
                          "run.id or run.root, or an empty directory")


def _fingerprint(cfg: Config, inputs: list[InputFile]) -> str:
    """What the corpus was built from: the settings that shape it and each input's size/mtime."""
    resolved = cfg.to_dict()
    stats = []
    for inp in inputs:
        files = [inp.path] if inp.path.is_file() else sorted(p for p in inp.path.rglob("*") if p.is_file())
        stats += [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    tok = cfg.resolve(cfg.tokenizer.path) if cfg.tokenizer.path else None
    if tok and tok.is_dir():
        stats += [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(tok.iterdir())]
    payload = {"corpus": resolved["corpus"], "tokenizer": resolved["tokenizer"], "files": stats}
    return fingerprint(payload)


def _batched(docs: Iterable[Document], max_docs: int, max_chars: int = BATCH_MAX_CHARS) -> Iterator[list[Document]]:
    batch: list[Document] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _write_shards(cfg: Config, inputs: list[InputFile], tokenizer, out: Path, id_index: Path,
                  log: Callable[[str], None]) -> PrepareSummary:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True)
    schema = pa.schema([(name, getattr(pa, typ)()) for name, typ in CORPUS_SCHEMA_FIELDS])
    index_schema = pa.schema([("id", pa.string()), ("file_index", pa.int32()), ("line", pa.int64())])
    stats = ReadStats()
    sources: dict[str, dict] = {}
    shards: list[dict] = []
    writer, rows_in_shard, batches = None, 0, 0
    per_shard = cfg.corpus.docs_per_shard
    # The number of documents is known only at the end: the lines count them and say which input is read.
    with pq.ParquetWriter(id_index, index_schema) as index_writer, Progress("prepare", unit="doc") as progress:
        log = progress.log_through(log)
        for batch in _batched(read_documents(inputs, cfg.corpus, stats), cfg.corpus.batch_docs):
            n_tokens = count_tokens(tokenizer, [d.text for d in batch])
            progress.update(len(batch), tokens=sum(n_tokens))
            progress.note(input=f"{batch[-1].file_index + 1}/{len(inputs)} {inputs[batch[-1].file_index].path.name}")
            index_writer.write_table(pa.table({"id": [d.id for d in batch],
                                               "file_index": [d.file_index for d in batch],
                                               "line": [d.line for d in batch]}, schema=index_schema))
            for d, n in zip(batch, n_tokens):
                s = sources.setdefault(d.source, {"docs": 0, "tokens": 0})
                s["docs"] += 1
                s["tokens"] += n
            start = 0
            while start < len(batch):  # a batch may straddle a shard boundary
                if writer is None:
                    name = f"part-{len(shards):05d}.parquet"
                    writer = pq.ParquetWriter(out / name, schema, compression="zstd")
                    shards.append({"file": name, "docs": 0, "tokens": 0})
                take = min(len(batch) - start, per_shard - rows_in_shard)
                chunk, chunk_tokens = batch[start:start + take], n_tokens[start:start + take]
                writer.write_table(pa.table({"id": [d.id for d in chunk], "source": [d.source for d in chunk],
                                             "text": [d.text for d in chunk], "n_tokens": chunk_tokens},
                                            schema=schema))
                shards[-1]["docs"] += take
                shards[-1]["tokens"] += sum(chunk_tokens)
                rows_in_shard += take
                start += take
                if rows_in_shard == per_shard:
                    writer.close()
                    writer, rows_in_shard = None, 0
            batches += 1
            if batches % 20 == 0:
                log(f"  {sum(s['docs'] for s in shards):,} documents tokenized")
    if writer is not None:
        writer.close()
    n_docs = sum(s["docs"] for s in shards)
    if n_docs == 0:
        names = ", ".join(str(i.path) for i in inputs)
        raise CorpusError(f"no documents with text in {names} ({stats.skipped_empty} empty texts skipped)")
    return PrepareSummary(run_dir="", n_docs=n_docs, n_tokens=sum(s["tokens"] for s in shards),
                          skipped_empty=stats.skipped_empty, shards=shards,
                          sources=dict(sorted(sources.items())))


def _check_unique_ids(id_index: Path, inputs: list[InputFile], stage: Path) -> None:
    import duckdb

    from automixer_ops.sqlrun import literal_paths

    index = literal_paths([id_index])  # read_parquet globs: a run path holding '[1]' must read what it names
    con = duckdb.connect()
    try:
        # Grouping by id spills to disk past the memory limit, so any corpus size fits.
        con.execute("SET memory_limit = '1GB'")
        con.execute("SET temp_directory = ?", [str(stage / "duckdb_tmp")])
        con.execute("SET preserve_insertion_order = false")
        n_dup = con.execute("SELECT count(*) FROM (SELECT id FROM read_parquet(?) GROUP BY id "
                            "HAVING count(*) > 1)", [index]).fetchone()[0]
        if n_dup == 0:
            return
        rows = con.execute(
            """WITH dup AS (SELECT id FROM read_parquet($p) GROUP BY id HAVING count(*) > 1
                            ORDER BY min([file_index, line]) LIMIT 3)
               SELECT i.id, i.file_index, i.line FROM read_parquet($p) i JOIN dup USING (id)
               ORDER BY i.id, i.file_index, i.line""", {"p": index}).fetchall()
    finally:
        con.close()
    places: dict[str, list[str]] = {}
    for doc_id, file_index, line in rows:
        inp = inputs[file_index]
        places.setdefault(doc_id, []).append(f"{inp.path}:{line}" if inp.format == "jsonl"
                                             else f"{inp.path} row {line}")
    detail = "; ".join(f"id {doc_id!r} at {', '.join(p[:3])}" for doc_id, p in places.items())
    raise CorpusError(f"duplicate document ids: {n_dup:,} id(s) occur more than once, e.g. {detail}")


def print_summary(summary: PrepareSummary, out=None) -> None:
    out = out or sys.stdout
    w = max([len("source")] + [len(s) for s in summary.sources])
    print(f"\nprepared corpus: {summary.run_dir}/corpus  ({len(summary.shards)} shards)", file=out)
    print(f"tokenizer: {summary.tokenizer}", file=out)
    print(f"{'source':<{w}}  {'docs':>9}  {'tokens':>12}  {'share':>6}", file=out)
    for name, s in summary.sources.items():
        share = s["tokens"] / summary.n_tokens if summary.n_tokens else 0.0
        print(f"{name:<{w}}  {s['docs']:>9,}  {s['tokens']:>12,}  {share:>6.1%}", file=out)
    print(f"{'total':<{w}}  {summary.n_docs:>9,}  {summary.n_tokens:>12,}  {1:>6.1%}", file=out)
    if summary.skipped_empty:
        print(f"skipped {summary.skipped_empty:,} document(s) with empty text", file=out)
    print(f"n_tokens sum: {summary.n_tokens}", file=out)
