-- Run only when checks/01 fails: which ids of which sampler have a NULL or non-finite utility,
-- are missing, duplicated, unknown to the corpus, or carry another n_tokens (up to 3 examples each).
WITH corpus AS (SELECT id, CAST(n_tokens AS BIGINT) AS n_tokens FROM read_parquet($corpus_files)),
scored AS (
    SELECT CAST(step AS BIGINT) AS step, id, CAST(n_tokens AS BIGINT) AS n_tokens, CAST(utility AS DOUBLE) AS utility
    FROM read_parquet($score_files, hive_partitioning = true)
),
problems AS (
    SELECT step, 'NULL id or NULL, NaN or infinite utility' AS kind, id
    FROM scored WHERE id IS NULL OR utility IS NULL OR NOT isfinite(utility)
    UNION ALL
    SELECT sm.step, 'missing', c.id
    FROM samplers sm CROSS JOIN corpus c ANTI JOIN scored s ON s.step = sm.step AND s.id = c.id
    UNION ALL
    SELECT step, 'unknown to the corpus', id FROM scored s ANTI JOIN corpus c USING (id) WHERE id IS NOT NULL
    UNION ALL
    SELECT step, 'scored more than once', id FROM scored WHERE id IS NOT NULL GROUP BY step, id HAVING count(*) > 1
    UNION ALL
    SELECT s.step, 'n_tokens differs from the corpus''s', s.id FROM scored s JOIN corpus c USING (id)
    WHERE s.n_tokens IS DISTINCT FROM c.n_tokens
)
SELECT step, kind, count(*) AS n, list(coalesce(id, '<NULL id>') ORDER BY id)[1:3] AS examples
FROM problems GROUP BY step, kind ORDER BY step, kind;
