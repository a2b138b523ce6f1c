"""Run the regrouping SQL (automixer_ops/sql/, also at the repo's top-level sql/) into DuckDB.

Each .sql file creates one table (or view) of DESIGN §2 and is executed in file-name order with its
parameters bound (never formatted into the SQL). A file named `NN_table.<variant>.sql` is
one of several forms of a table (e.g. `regroup.joint: kept | all`); only the chosen one runs.
The database is built under a temporary name and renamed to `<run>/automixer.duckdb` only
when every file ran and every check passed, so a reader never sees half a set of tables.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

from automixer_ops.errors import AutomixerError, TransientError

SQL_DIR = Path(__file__).with_name("sql")
DB_NAME = "automixer.duckdb"
GLOB_CHARS = re.compile(r"([\[*?])")  # what DuckDB expands; "]" alone is literal


def sql_files(prefix: str = "", variants: frozenset[str] | set[str] = frozenset()) -> list[Path]:
    """The table files in order; a file with a variant (`05_joint_units.all.sql`) only when it is chosen."""
    files = []
    for p in sorted(SQL_DIR.glob(f"{prefix}*.sql")):
        variant = p.stem.partition(".")[2]
        if not variant or variant in variants:
            files.append(p)
    return files


def literal_paths(paths: list[Path] | list[str]) -> list[str]:
    """Paths for DuckDB's read_parquet, which expands glob characters in every name it is given: each
    such character becomes a one-character class ('[' -> '[[]'), so 'runs/a[1]' reads runs/a[1], not runs/a1."""
    return [GLOB_CHARS.sub(r"[\1]", str(p)) for p in paths]


def run_sql_files(con, files: list[Path], params: dict) -> None:
    for path in files:
        _execute(con, path, params)


def _execute(con, path: Path, params: dict):
    """One SQL file on an open connection, its parameters bound; a DuckDB error names the file."""
    import duckdb

    try:
        return con.execute(*_bound(path, params))
    except duckdb.Error as e:
        raise AutomixerError(f"{path.name}: {_first_line(e)}") from None


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


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def connect(path: Path | str, memory_limit: str, spill: Path, read_only: bool = False):
    """A DuckDB connection held to `memory_limit` that spills to `spill` (a setting DuckDB refuses is named)."""
    import duckdb

    config = {"memory_limit": memory_limit, "temp_directory": str(spill)}
    try:
        con = duckdb.connect(str(path), read_only=read_only, config=config)
    except duckdb.Error as e:
        if "memory" in str(e).lower():
            raise AutomixerError(f"regroup.memory_limit: DuckDB refused {memory_limit!r}: {_first_line(e)}") from None
        if "lock" in str(e).lower():  # another regroup, mix or reader holds the file: worth a retry
            raise TransientError(f"{path}: in use by another process ({_first_line(e)}); retry when it ends") from None
        raise AutomixerError(f"{path}: DuckDB cannot open it: {_first_line(e)}") from None
    con.execute("SET enable_progress_bar = false")  # it would garble task logs and what reads a step's output
    return con


def build_database(path: Path, build: Callable, memory_limit: str = "4GB") -> None:
    """`build(con)` creates every table into a temporary database beside `path` (and may raise: nothing is
    published then); the finished file replaces `path` atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
        stale.unlink(missing_ok=True)
    spill = path.with_name(".duckdb_tmp")
    con = connect(tmp, memory_limit, spill)
    try:
        build(con)
        con.execute("CHECKPOINT")
    except BaseException:
        con.close()
        tmp.unlink(missing_ok=True)
        shutil.rmtree(spill, ignore_errors=True)
        raise
    con.close()
    os.replace(tmp, path)
    shutil.rmtree(spill, ignore_errors=True)


def check_files(prefix: str = "") -> list[Path]:
    """The invariant queries of sql/checks/ (DESIGN §3), in file-name order."""
    return sorted((SQL_DIR / "checks").glob(f"{prefix}*.sql"))


def run_sql_checks(con, files: list[Path], params: dict) -> list[dict]:
    """Run check queries (one row each: invariant, ok, detail) on an open connection."""
    results = []
    for path in files:
        row = _execute(con, path, params).fetchone()
        results.append({"check": path.stem, "invariant": row[0], "ok": bool(row[1]), "detail": row[2]})
    return results


def query_file(con, relative: str, params: dict) -> list[tuple]:
    """The rows of one query file under sql/ (e.g. 'diagnose/scores_vs_corpus.sql')."""
    return _execute(con, SQL_DIR / relative, params).fetchall()


def record_provenance(con, info: dict) -> None:
    """What the tables were built from (corpus, selection, scores, settings), as table `provenance`."""
    con.execute("CREATE OR REPLACE TABLE provenance AS SELECT unnest($k) AS key, unnest($v) AS value",
                {"k": list(info), "v": [str(v) for v in info.values()]})


def read_provenance(con) -> dict[str, str]:
    """The provenance of an open database; {} for one built before provenance was recorded."""
    import duckdb

    try:
        return dict(con.execute("SELECT key, value FROM provenance").fetchall())
    except duckdb.CatalogException:
        return {}


def stale_inputs(run, provenance: dict[str, str]) -> str:
    """Which of the corpus, selection.json and the samplers' score files differ from what the tables were
    built from ('' when none): a step that reads automixer.duckdb refuses tables of other inputs."""
    from automixer_ops.samplers import read_selection, selection_fingerprint

    now = {"corpus": run.corpus_fingerprint(), "selection": selection_fingerprint(run)}
    if now["selection"] == provenance.get("selection"):  # the same samplers: their score files must be too
        now["scores"] = run.scores_fingerprint([s.step for s in read_selection(run).samplers])
    names = {"corpus": "corpus/", "selection": "selection.json", "scores": "scores/"}
    return " and ".join(names[k] for k, v in now.items() if provenance.get(k) != v)


def weights_table(db: Path) -> list[tuple]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT group_name, n_docs, n_tokens, influence_density, weight FROM weights "
                           "ORDER BY step").fetchall()


def format_weights(rows: list[tuple]) -> str:
    lines = [f"{'group':<12}  {'docs':>8}  {'tokens':>12}  {'density':>8}  {'weight':>7}"]
    lines += [f"{g:<12}  {d:>8,}  {t:>12,}  {rho:>8.4f}  {w:>7.4f}" for g, d, t, rho, w in rows]
    return "\n".join(lines)
