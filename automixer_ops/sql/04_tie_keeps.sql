-- tie_keeps (temporary, not kept in the database): of the documents whose utility equals
-- tau_j, the first n_kept - n_above by id; with those above tau they make exactly n_kept.
-- Usually a handful; a constant-utility scorer makes it the whole cut, and still exact.
-- pos: the document's (shard, row), for the positional build of joint_units (regroup.py).
CREATE OR REPLACE TEMP TABLE tie_keeps AS
SELECT step, id, utility, n_tokens, pos
FROM (
    SELECT t.step, s.id, CAST(s.utility AS DOUBLE) AS utility, CAST(s.n_tokens AS BIGINT) AS n_tokens,
           CAST(s.file_index % $n_corpus_files AS BIGINT) * 4294967296 + CAST(s.file_row_number AS BIGINT) AS pos,
           t.n_kept - t.n_above AS n_ties_kept,
           row_number() OVER (PARTITION BY t.step ORDER BY s.id) AS tie_rank
    FROM read_parquet($score_files, hive_partitioning = true) s JOIN thresholds t ON t.step = CAST(s.step AS BIGINT)
    -- the constant list first: a filter DuckDB applies in the scan, before it reads the ids
    WHERE list_contains($kth_largest, CAST(s.utility AS DOUBLE)) AND CAST(s.utility AS DOUBLE) = t.tau
)
WHERE tie_rank <= n_ties_kept;
