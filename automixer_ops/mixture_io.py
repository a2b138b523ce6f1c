"""Writing a mixture's parts (DESIGN §3, `mixture/`): shared by `automixer mix` and the baselines.

A mixture directory holds part-00000.parquet, part-00001.parquet, ... with the schema
(id string, group string, repeat int32, text string), `docs_per_part` rows a file, rows in
training order (a trainer reads the parts in name order and the rows in order). An empty
mixture still has its (empty) first part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

BATCH_ROWS = 8192  # rows per batch streamed from DuckDB to the Parquet writer
PART_GLOB = "part-*.parquet"


def mixture_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("group", pa.string()), ("repeat", pa.int32()), ("text", pa.string())])


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_parts(batches: Iterable, out: Path, docs_per_part: int) -> int:
    """Write record batches (columns id, group, repeat, text, cast to the schema) as parts into the existing
    directory `out`, in order; returns the number of parts written (at least 1)."""
    import pyarrow.parquet as pq

    if docs_per_part < 1:
        raise ValueError(f"docs_per_part must be >= 1, got {docs_per_part}")
    schema = mixture_schema()
    part, rows, writer = 0, 0, None
    try:
        for batch in batches:
            batch = batch.select(schema.names) if batch.schema.names != schema.names else batch
            batch = batch.cast(schema) if batch.schema != schema else batch
            start = 0
            while start < batch.num_rows:
                if writer is None:
                    writer = pq.ParquetWriter(out / part_name(part), schema, compression="zstd")
                n = min(batch.num_rows - start, docs_per_part - rows)
                writer.write_batch(batch.slice(start, n))
                start, rows = start + n, rows + n
                if rows == docs_per_part:
                    writer.close()
                    writer, rows, part = None, 0, part + 1
        if writer is None and part == 0:  # an empty mixture still has its (empty) first part
            pq.write_table(schema.empty_table(), out / part_name(0), compression="zstd")
            return 1
    finally:
        if writer is not None:
            writer.close()
    return part + 1 if rows else part


def write_parts_from_sql(con, sql: str, params: dict | None, out: Path, docs_per_part: int,
                         batch_rows: int = BATCH_ROWS) -> int:
    """Stream a DuckDB query's rows (id, group, repeat, text, in the query's ORDER BY) into parts: the text
    never sits whole in Python. Returns the number of parts."""
    reader = con.sql(sql, params=params).to_arrow_reader(batch_rows)
    return write_parts(reader, out, docs_per_part)
