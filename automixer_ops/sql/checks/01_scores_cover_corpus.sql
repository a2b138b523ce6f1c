-- DESIGN §3: every corpus id has exactly one score per sampler (none missing, none twice,
-- no score for an id the corpus does not have).
WITH corpus AS (SELECT id FROM read_parquet($corpus_glob)),
     per_id AS (SELECT step, id, count(*) AS n FROM scores GROUP BY step, id),
     bad AS (
        SELECT sm.step, c.id, coalesce(p.n, 0) AS n FROM samplers sm CROSS JOIN corpus c
        LEFT JOIN per_id p ON p.step = sm.step AND p.id = c.id
        WHERE coalesce(p.n, 0) != 1
        UNION ALL
        SELECT step, id, n FROM per_id WHERE id NOT IN (SELECT id FROM corpus)),
     examples AS (SELECT * FROM bad ORDER BY step, id LIMIT 3)
SELECT 'every corpus id has exactly one score per sampler' AS invariant,
       (SELECT count(*) FROM bad) = 0 AS ok,
       (SELECT count(*) FROM corpus) || ' documents x ' || (SELECT count(*) FROM samplers) || ' samplers; '
         || (SELECT count(*) FROM bad) || ' (sampler, id) pairs without exactly one score'
         || coalesce(', e.g. ' || (SELECT string_agg('step ' || step || ' id ''' || id || ''': ' || n || ' score(s)',
                                                     '; ' ORDER BY step, id) FROM examples), '') AS detail;
