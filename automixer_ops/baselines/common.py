"""What every baseline shares: the corpus index, the token-budgeted seeded draw, the mixture writer, the caches.

The draw (`draw_passes`): documents in an order (a seeded permutation, or DSIR's Gumbel keys) are taken
while the tokens before the next one are below the quota, so a draw stops at the first document that
reaches it; a quota above the candidates' tokens takes them all (repeat 0) and starts another pass
(repeat 1, 2, ...) in a new order. Every random choice comes from one local `np.random.default_rng(seed)`
(numpy's global generator is never touched). The drawn occurrences are then shuffled once with that
generator: the parts hold them in training order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from automixer_ops.errors import AutomixerError
from automixer_ops.mixture_io import PART_GLOB, part_name, write_parts_from_sql
from automixer_ops.rundir import (RunDir, atomic_write, atomic_write_text, clean_stale_staging, publish,
                                  staged_directory)

EPS = 1e-6  # float round-off in a carried quota must not draw one document too many
CACHE_KEY = b"automixer_cache_key"  # Parquet schema metadata of a cache file: what it was computed from


@dataclass
class CorpusIndex:
    """The corpus without its text, in shard-name then row order (the order every per-document array uses).
    Ids stay one Arrow array and sources integer codes: no Python object per document."""

    ids: object  # pyarrow string array
    source_names: list[str]  # sorted
    source_codes: np.ndarray  # int32 index into source_names
    n_tokens: np.ndarray  # int64
    shards: list[Path]

    def __len__(self) -> int:
        return len(self.n_tokens)

    def source_tokens(self) -> np.ndarray:
        """Tokens of each source, in source_names order (int64)."""
        return np.bincount(self.source_codes, weights=self.n_tokens, minlength=len(self.source_names)).astype(np.int64)

    def source_rows(self) -> dict[str, np.ndarray]:
        order = np.argsort(self.source_codes, kind="stable")
        bounds = np.searchsorted(self.source_codes[order], np.arange(len(self.source_names) + 1))
        return {name: np.sort(order[bounds[i]:bounds[i + 1]]) for i, name in enumerate(self.source_names)}


def read_corpus_index(run: RunDir) -> CorpusIndex:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shards = [Path(p) for p in run.corpus_files()]  # fails with one line when there are none
    tables = []
    for p in shards:
        try:
            tables.append(pq.read_table(p, columns=["id", "source", "n_tokens"]))
        except Exception as e:  # pyarrow raises several types for a damaged or foreign file
            raise AutomixerError(f"{p}: not a readable corpus shard ({_first_line(e)}); rerun "
                                 "`automixer prepare --force`") from None
    table = pa.concat_tables(tables)
    ids = table.column("id").cast(pa.string()).combine_chunks()
    sources = table.column("source").cast(pa.string()).combine_chunks()
    names = sorted(pc.unique(sources).to_pylist())
    codes = pc.index_in(sources, value_set=pa.array(names, pa.string())).to_numpy(zero_copy_only=False)
    return CorpusIndex(ids, names, codes.astype(np.int32),
                       table.column("n_tokens").to_numpy().astype(np.int64), shards)


# ---------------------------------------------------------------- the draw

Order = Callable[[np.ndarray], np.ndarray]  # candidates -> the same indices in this pass's draw order


def permutation_order(rng: np.random.Generator) -> Order:
    return lambda candidates: candidates[rng.permutation(len(candidates))]


def draw_passes(tokens: np.ndarray, candidates: np.ndarray, quota: float, order: Order,
                what: str) -> tuple[np.ndarray, np.ndarray]:
    """(document indices, repeats) drawn from `candidates` until `quota` tokens: whole passes while the quota
    exceeds what is left, then the prefix of one more pass in `order` that reaches it."""
    empty = np.zeros(0, dtype=np.int64)
    if quota <= EPS:
        return empty, empty.astype(np.int32)
    candidates = np.asarray(candidates, dtype=np.int64)
    total = int(tokens[candidates].sum()) if len(candidates) else 0
    if total <= 0:
        raise AutomixerError(f"{what}: no tokens to draw from ({len(candidates)} document(s) with 0 tokens), "
                             f"but {quota:,.0f} tokens were asked for")
    idx, rep = [], []
    remaining, passes = float(quota), 0
    while remaining > EPS:
        if remaining - EPS > total:  # a whole pass: its order does not matter to the draw
            idx.append(candidates)
            remaining -= total
        else:
            perm = order(candidates)
            cum = np.cumsum(tokens[perm])
            k = int(np.searchsorted(cum, remaining - EPS, side="left")) + 1
            idx.append(perm[:k])
            remaining = 0.0
        rep.append(np.full(len(idx[-1]), passes, dtype=np.int32))
        passes += 1
    return np.concatenate(idx), np.concatenate(rep)


def draw_groups(tokens: np.ndarray, groups: dict[str, np.ndarray], quotas: dict[str, float], order: Order,
                what: str) -> tuple[np.ndarray, np.ndarray]:
    """Each group its quota, in name order, the rounding carried to the next (the total ends within one
    document of the sum of the quotas, each group within one document of its own)."""
    idx, rep, carry = [], [], 0.0
    for name in sorted(groups):
        target = quotas[name] + carry
        i, r = draw_passes(tokens, groups[name], target, order, f"{what} (group {name!r})")
        idx.append(i)
        rep.append(r)
        carry = target - float(tokens[i].sum())
    if not idx:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    return np.concatenate(idx), np.concatenate(rep)


# ---------------------------------------------------------------- the mixture directory

def already_drawn(out: Path, input_fingerprint: str) -> bool:
    """`out` is a complete mixture made from these inputs: its weights.json records them and its parts."""
    try:
        info = json.loads((out / "weights.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("input_fingerprint") != input_fingerprint:
        return False
    n = info.get("parts")
    return isinstance(n, int) and sorted(p.name for p in out.glob(PART_GLOB)) == [part_name(i) for i in range(n)]


def summarize(index: CorpusIndex, idx: np.ndarray, rep: np.ndarray, budget: int) -> dict:
    """The draw's totals and its groups (= sources) for weights.json."""
    tokens = int(index.n_tokens[idx].sum())
    codes = index.source_codes[idx]
    groups = {}
    for code in np.unique(codes):
        sel = idx[codes == code]
        g_tokens = int(index.n_tokens[sel].sum())
        groups[index.source_names[code]] = {"tokens": g_tokens, "documents": int(len(sel)),
                                            "unique_documents": int(len(np.unique(sel))),
                                            "passes": int(rep[codes == code].max()) + 1,
                                            "share": g_tokens / tokens if tokens else 0.0}
    return {"token_budget": budget, "tokens": tokens, "documents": int(len(idx)),
            "unique_documents": int(len(np.unique(idx))), "underfilled": tokens < budget,
            "passes": int(rep.max()) + 1 if len(rep) else 0, "groups": groups}


def write_mixture(index: CorpusIndex, idx: np.ndarray, rep: np.ndarray, rng: np.random.Generator, out: Path,
                  summary: dict, docs_per_part: int, memory_limit: str) -> dict:
    """Shuffle the occurrences once with `rng` and publish `out` (parts, weights.json, blend.txt) atomically;
    returns weights.json's content."""
    import pyarrow as pa

    from automixer_ops.sqlrun import connect, literal_paths

    shuffle = rng.permutation(len(idx))
    idx, rep = idx[shuffle], rep[shuffle]
    drawn = pa.table({"ordinal": pa.array(np.arange(len(idx), dtype=np.int64)),
                      "id": index.ids.take(pa.array(idx)),
                      "group": pa.array(index.source_names, pa.string()).take(pa.array(index.source_codes[idx])),
                      "repeat": pa.array(rep, pa.int32())})
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_staging(out.parent)  # a killed draw's staging directory (a whole mixture's size)
    with staged_directory(out.parent) as stage:
        target = stage / out.name
        target.mkdir()
        con = connect(":memory:", memory_limit, stage / ".duckdb_tmp")
        try:
            con.register("drawn", drawn)
            parts = write_parts_from_sql(con, """SELECT d.id, d."group", d."repeat", c.text
                                                 FROM drawn d JOIN read_parquet($corpus) c USING (id)
                                                 ORDER BY d.ordinal""",
                                         {"corpus": literal_paths(index.shards)}, target, docs_per_part)
        finally:
            con.close()
        summary = {**summary, "parts": parts, "docs_per_part": docs_per_part}
        atomic_write_text(target / "weights.json", json.dumps(summary, indent=2) + "\n")
        total = summary["tokens"]
        blend = " ".join(f"{g['tokens'] / total:.6f} {name}_text_document"
                         for name, g in summary["groups"].items() if total and g["tokens"])
        atomic_write_text(target / "blend.txt", blend + "\n")
        publish(target, out)
    return summary


# ---------------------------------------------------------------- per-document caches

def read_cache(path: Path, key: str, index: CorpusIndex, columns: list[str]) -> dict[str, np.ndarray] | None:
    """A cache file's columns when it was computed from `key` for exactly this corpus (ids in order); else None."""
    import pyarrow.parquet as pq

    try:
        if (pq.read_schema(path).metadata or {}).get(CACHE_KEY) != key.encode():
            return None
        table = pq.read_table(path, columns=["id", *columns])
    except FileNotFoundError:
        return None
    except Exception:  # a damaged cache file is recomputed
        return None
    if table.num_rows != len(index) or not table.column("id").combine_chunks().equals(index.ids):
        return None
    return {c: table.column(c).to_numpy() for c in columns}


def write_cache(path: Path, key: str, columns: dict, info: dict | None = None) -> None:
    """A cache file (Parquet, its key and `info` in the schema metadata), written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    meta = {CACHE_KEY: key.encode(), b"automixer_cache_info": json.dumps(info or {}).encode()}
    table = table.replace_schema_metadata(meta)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
