"""Run the regrouping SQL (automixer_ops/sql/, also at the repo's top-level sql/) into DuckDB.

Each .sql file creates one table of DESIGN §2 and is executed in file-name order with its
parameters bound (never formatted into the SQL). The database is built under a temporary
name and renamed to `<run>/automixer.duckdb` only when every file ran and every check
passed, so a reader never sees half a set of tables.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from automixer_ops.errors import AutomixerError

SQL_DIR = Path(__file__).with_name("sql")
DB_NAME = "automixer.duckdb"


def sql_files(prefix: str = "") -> list[Path]:
    return sorted(p for p in SQL_DIR.glob(f"{prefix}*.sql"))


def run_sql_files(con, files: list[Path], params: dict) -> None:
    for path in files:
        con.execute(*_bound(path, params))


def _bound(path: Path, params: dict) -> tuple[str, dict | None]:
    """A SQL file's text and the parameters it uses (a missing one is named)."""
    sql = path.read_text(encoding="utf-8")
    used = set(re.findall(r"\$([A-Za-z_]\w*)", _strip_comments(sql)))
    missing = used - params.keys()
    if missing:
        raise AutomixerError(f"{path.name}: no value bound for {', '.join(sorted(missing))}")
    return sql, ({k: params[k] for k in used} if used else None)


def _strip_comments(sql: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in sql.splitlines())


def build_database(path: Path, params: dict, checks, memory_limit: str = "4GB") -> None:
    """Create every table into `path` atomically; `checks(con)` may raise before publishing."""
    import duckdb

    tmp = path.with_name(f".{path.name}.tmp")
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        stale.unlink(missing_ok=True)
    spill = path.with_name(".duckdb_tmp")
    try:
        con = duckdb.connect(str(tmp), config={"memory_limit": memory_limit, "temp_directory": str(spill)})
    except duckdb.Error as e:
        raise AutomixerError(f"regroup.memory_limit: DuckDB refused {memory_limit!r}: {e}") from None
    try:
        run_sql_files(con, sql_files(), params)
        checks(con)
        con.execute("CHECKPOINT")
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        raise
    con.close()
    os.replace(tmp, path)
    shutil.rmtree(spill, ignore_errors=True)


def check_files(prefix: str = "") -> list[Path]:
    """The invariant queries of sql/checks/ (DESIGN §3), in file-name order."""
    return sorted((SQL_DIR / "checks").glob(f"{prefix}*.sql"))


def run_sql_checks(con, files: list[Path], params: dict) -> list[dict]:
    """Run check queries (one row each: invariant, ok, detail) on an open connection."""
    import duckdb

    results = []
    for path in files:
        try:
            row = con.execute(*_bound(path, params)).fetchone()
        except duckdb.Error as e:
            raise AutomixerError(f"{path.name}: {e}") from None
        results.append({"check": path.stem, "invariant": row[0], "ok": bool(row[1]), "detail": row[2]})
    return results
