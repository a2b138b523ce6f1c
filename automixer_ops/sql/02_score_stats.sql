-- score_stats: one pass over the selected samplers' score files (scores/step=<N>/part-*.parquet),
-- per sampler: how many scores, how many are invalid (NULL id, NULL, NaN or infinite utility),
-- the checksum of its (id, n_tokens) pairs that checks/01 compares with the corpus's, the same
-- pairs' hashes mixed with their place, xor(h, hash(file, row)) (equal to the corpus's when the
-- parts list the corpus's ids in the corpus's own shards and order: regroup then builds
-- joint_units by position, see regroup.py), and max |utility| (the scale of the exact sums).
CREATE OR REPLACE TABLE score_stats AS
SELECT step,
       count(*) AS n_scores,
       count(*) FILTER (WHERE invalid) AS n_invalid,
       coalesce(sum(h::HUGEINT), 0) AS checksum,
       coalesce(sum(xor(h, hash(file, row))::HUGEINT), 0) AS position_checksum,
       max(abs(utility)) AS max_abs_utility
FROM (
    SELECT CAST(step AS BIGINT) AS step, hash(id, CAST(n_tokens AS BIGINT)) AS h, CAST(utility AS DOUBLE) AS utility,
           id IS NULL OR utility IS NULL OR NOT isfinite(CAST(utility AS DOUBLE)) AS invalid,
           CAST(file_index % $n_corpus_files AS BIGINT) AS file, CAST(file_row_number AS BIGINT) AS row
    FROM read_parquet($score_files, hive_partitioning = true)
)
GROUP BY step
ORDER BY step;
