"""Group Influence of every corpus group on every target task, at one checkpoint (TiKMiX).

TiKMiX's Group Influence of a group S on a validation loss is the first-order effect of
up-weighting every document of S: -grad L_val^T H^-1 sum_{x in S} grad L(x). With DataInf's
H^-1 (our influence machinery, `multitask.py`) a document's utility u_t(x) = r_t . g(x) is
linear in its gradient, so the influence of a group's *token share* is exactly the
token-weighted mean utility of its documents:

    GI_tg = sum_{x in g} n_x u_t(x) / sum_{x in g} n_x        (higher = more helpful, DESIGN's sign)

with n_x the document's tokens (its gradient is that of its mean per-token loss over the
scoring window, as in `automixer score`). Groups are the values of a corpus column
(`source` by default). Two estimates:

- `full`: every corpus document; DataInf is fit on the whole corpus (read twice) and scored
  once more. The stderr column is then the spread of the group's utilities (the standard
  error the mean would have as a sample), not an estimation error.
- `sample`: a seeded sample of `per_group` documents of each group (the first by a hash of
  seed and id: the same documents on every machine); DataInf is fit on the pooled sample and
  scores it. stderr is the ratio estimator's standard error of the token-weighted mean.

Outputs, under `out` (written to temporary names, gi.json last, so a directory with gi.json
is complete): `utilities.parquet` (task, id, group_name, n_tokens, utility) and
`gi.parquet` (task, group_name, gi, stderr, n_docs, n_tokens); `record()` copies gi.parquet
into the `group_influence` table of a DuckDB file.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

from automixer_ops.errors import AutomixerError
from automixer_ops.rundir import RunDir, atomic_write, atomic_write_text, file_hash, fingerprint
from automixer_ops.sqlrun import literal_paths

GI_JSON, UTILITIES, GI_PARQUET = "gi.json", "utilities.parquet", "gi.parquet"
SQL_DIR = Path(__file__).resolve().parents[1] / "sql" / "tikmix"


@dataclass(frozen=True)
class GISettings:
    """What a Group Influence estimate depends on, besides the checkpoint, the corpus and the tasks."""

    group_by: str = "source"
    estimate: Literal["sample", "full"] = "sample"
    per_group: int = 64
    seed: int = 0
    max_seq_len: int = 512
    batch_tokens: int = 8192
    norm_mode: str = "auto"
    device: str = "auto"

    def __post_init__(self):
        if self.estimate not in ("sample", "full"):
            raise AutomixerError(f"tikmix.estimate: 'sample' or 'full', got {self.estimate!r}")
        if self.per_group < 2:
            raise AutomixerError(f"tikmix.per_group: must be >= 2 (a standard error needs two), got {self.per_group}")
        if self.max_seq_len < 2:
            raise AutomixerError(f"influence.max_seq_len: must be >= 2, got {self.max_seq_len}")


@dataclass
class Documents:
    ids: list[str]
    groups: list[str]
    n_tokens: list[int]
    texts: list[str]


def read_documents(run: RunDir, settings: GISettings) -> Documents:
    """The documents of the estimate, in a fixed order (group, then the seeded hash order)."""
    import duckdb

    shards = run.corpus_shards()
    if not shards:
        raise AutomixerError(f"{run.corpus}: no part-*.parquet shards; run `automixer prepare` first")
    con = duckdb.connect()
    cols = {r[0] for r in con.execute("DESCRIBE SELECT * FROM read_parquet($p)", {"p": literal_paths(shards)})
            .fetchall()}
    if settings.group_by not in cols:
        raise AutomixerError(f"tikmix.group_by: the corpus ({run.corpus}) has no column {settings.group_by!r}; "
                             f"it has {', '.join(sorted(cols))}")
    limit = "" if settings.estimate == "full" else "WHERE k <= $per_group"
    rows = con.execute(f"""
        SELECT id, grp, n_tokens, text FROM (
            SELECT CAST(id AS VARCHAR) AS id, CAST("{settings.group_by}" AS VARCHAR) AS grp, n_tokens, text,
                   row_number() OVER (PARTITION BY "{settings.group_by}"
                                      ORDER BY hash($seed, CAST(id AS VARCHAR)), CAST(id AS VARCHAR)) AS k
            FROM read_parquet($p)) {limit}
        ORDER BY grp, k""", {"p": literal_paths(shards), "seed": settings.seed,
                              **({} if settings.estimate == "full" else {"per_group": settings.per_group})}).fetchall()
    if any(r[1] is None for r in rows):
        raise AutomixerError(f"tikmix.group_by: column {settings.group_by!r} of {run.corpus} has NULL values")
    ids, groups, n_tokens, texts = (list(c) for c in zip(*rows)) if rows else ([], [], [], [])
    return Documents(ids, groups, n_tokens, texts)


def validation_by_task(run: RunDir, tokenizer, tasks: list[str], max_seq_len: int, batch_tokens: int, eos: int,
                       pad: int, device) -> dict[str, list]:
    """Per task: its validation pairs (valsets/<task>.jsonl) as batches with weights 1/n, the loss `score` uses."""
    import torch

    from automixer_ops.influence.batching import length_batches, make_batch, validation_sequences

    out = {}
    for task in tasks:
        encoded = validation_sequences(run.path, tokenizer, task, eos, max_seq_len)
        w = 1.0 / len(encoded)
        out[task] = [(make_batch([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], pad).to(device),
                      torch.full((len(idx),), w))
                     for idx in length_batches([len(s) for s, _ in encoded], batch_tokens)]
    return out


def inputs_fingerprint(run: RunDir, checkpoint: Path, tasks: list[str], settings: GISettings) -> str:
    from automixer_ops.checkpoints import checkpoint_identity

    corpus = run.corpus_fingerprint()
    missing = [t for t in tasks if not run.valset(t).is_file()]
    if missing:
        raise AutomixerError(f"{run.valsets}: no validation set for {', '.join(missing)}; run `automixer evaluate` "
                             "with these tasks first")
    return fingerprint({"checkpoint": checkpoint_identity(checkpoint), "corpus": corpus, "tasks": tasks,
                        "valsets": {t: file_hash(run.valset(t)) for t in tasks},
                        "settings": {k: v for k, v in asdict(settings).items() if k not in ("device",)}})


def group_influence(run: RunDir, checkpoint: Path, tasks: list[str], settings: GISettings, out: Path,
                    log: Callable[[str], None] = print) -> Path:
    """GI of every group on every task at `checkpoint` -> out/gi.parquet (skipped when already done)."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from automixer_ops.checkpoints import checkpoint_tokenizer_dir, load_causal_lm, pick_device
    from automixer_ops.influence.batching import length_batches, make_batch
    from automixer_ops.influence.grads import check_plain_head
    from automixer_ops.tikmix.multitask import multi_task_fit, multi_task_utilities

    if not (checkpoint / "config.json").is_file():
        raise AutomixerError(f"{checkpoint}: checkpoint not found")
    fp = inputs_fingerprint(run, checkpoint, tasks, settings)
    done = read_gi_json(out)
    if done is not None and done.get("fingerprint") == fp:
        log(f"group influence: {out} already done ({done['n_docs']:,} documents, {len(tasks)} tasks)")
        return out / GI_PARQUET

    t0 = time.perf_counter()
    docs = read_documents(run, settings)
    device = pick_device(settings.device)
    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_tokenizer_dir(run, checkpoint)))
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    model = load_causal_lm(checkpoint, torch.float32).to(device).eval().requires_grad_(False)
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and settings.max_seq_len > limit:
        raise AutomixerError(f"influence.max_seq_len: {settings.max_seq_len} exceeds {checkpoint}'s "
                             f"max_position_embeddings {limit}")
    try:
        check_plain_head(model)
    except AutomixerError as e:
        raise AutomixerError(f"{checkpoint}: {e}") from None
    val = validation_by_task(run, tokenizer, tasks, settings.max_seq_len, settings.batch_tokens, eos, pad, device)
    enc = tokenizer.backend_tokenizer.encode_batch_fast(docs.texts, add_special_tokens=False)
    seqs = [[eos] + e.ids[:settings.max_seq_len - 1] for e in enc]
    order = list(length_batches([len(s) for s in seqs], settings.batch_tokens))

    def batches():
        for idx in order:
            yield make_batch([seqs[i] for i in idx], [1] * len(idx), pad).to(device)

    log(f"group influence: {len(seqs):,} documents ({settings.estimate}, by {settings.group_by}), "
        f"{len(tasks)} tasks, checkpoint {checkpoint}")
    fit = multi_task_fit(model, val, batches, mode=settings.norm_mode)
    u = multi_task_utilities(model, batches(), fit)
    flat = [i for idx in order for i in idx]
    if not torch.isfinite(u).all():
        bad = sorted({docs.ids[flat[r]] for r in (~torch.isfinite(u)).any(1).nonzero()[:, 0].tolist()})
        raise AutomixerError(f"group influence at {checkpoint}: non-finite utility for documents {', '.join(bad[:5])}")
    u = u.numpy()
    table = pa.table({
        "task": [t for t in tasks for _ in flat],
        "id": [docs.ids[i] for _ in tasks for i in flat],
        "group_name": [docs.groups[i] for _ in tasks for i in flat],
        "n_tokens": pa.array([docs.n_tokens[i] for _ in tasks for i in flat], pa.int64()),
        "utility": pa.array(u.T.reshape(-1), pa.float32())})
    out.mkdir(parents=True, exist_ok=True)
    (out / GI_JSON).unlink(missing_ok=True)  # the marker goes first: half-replaced outputs are never "done"
    atomic_write(out / UTILITIES, lambda p: pq.write_table(table, p))
    with duckdb.connect() as con:
        gi = con.sql(_gi_sql(), params={"utilities": str(out / UTILITIES)}).to_arrow_table()
    atomic_write(out / GI_PARQUET, lambda p: pq.write_table(gi, p))
    info = {"fingerprint": fp, "checkpoint": str(checkpoint), "tasks": tasks, "n_docs": len(flat),
            "groups": sorted(set(docs.groups)), "lambda": fit.lam, "settings": asdict(settings),
            "seconds": round(time.perf_counter() - t0, 3)}
    atomic_write_text(out / GI_JSON, json.dumps(info, indent=2) + "\n")
    log(f"group influence: {out / GI_PARQUET} ({info['seconds']:.1f} s)")
    return out / GI_PARQUET


def _gi_sql() -> str:
    return (SQL_DIR / "group_influence.sql").read_text(encoding="utf-8")


def read_gi_json(out: Path) -> dict | None:
    try:
        return json.loads((out / GI_JSON).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@contextmanager
def db_writer(db: Path):
    """One writer of a tikmix.duckdb at a time: several units of an experiment (or seeds of a method) may record
    into the same file at once, and DuckDB refuses a second writing process instead of waiting. This waits."""
    import fcntl

    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def record(db: Path, gi_dir: Path, checkpoint_label: str, step: int | None) -> int:
    """gi_dir's estimate into the `group_influence` table of `db` (rows of the same checkpoint and estimate
    replaced, in one transaction). Returns the rows written."""
    import duckdb

    info = read_gi_json(gi_dir)
    if info is None:
        raise AutomixerError(f"{gi_dir}: no finished group influence estimate ({GI_JSON} missing)")
    estimate = info["settings"]["estimate"]
    with db_writer(db), duckdb.connect(str(db)) as con:
        con.execute("""CREATE TABLE IF NOT EXISTS group_influence (
                           checkpoint VARCHAR, step BIGINT, estimate VARCHAR, group_by VARCHAR, task VARCHAR,
                           group_name VARCHAR, gi DOUBLE, stderr DOUBLE, n_docs BIGINT, n_tokens BIGINT,
                           fingerprint VARCHAR)""")
        con.execute("BEGIN")
        con.execute("DELETE FROM group_influence WHERE checkpoint = $c AND estimate = $e",
                    {"c": checkpoint_label, "e": estimate})
        con.execute("""INSERT INTO group_influence
                       SELECT $c, $s, $e, $g, task, group_name, gi, stderr, n_docs, n_tokens, $f
                       FROM read_parquet($p)""",
                    {"c": checkpoint_label, "s": step, "e": estimate, "g": info["settings"]["group_by"],
                     "f": info["fingerprint"], "p": str(gi_dir / GI_PARQUET)})
        n = con.execute("SELECT count(*) FROM group_influence WHERE checkpoint = $c AND estimate = $e",
                        {"c": checkpoint_label, "e": estimate}).fetchone()[0]
        con.execute("COMMIT")
    return n
