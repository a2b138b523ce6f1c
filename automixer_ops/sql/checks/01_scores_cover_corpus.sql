-- DESIGN §3: every corpus id has exactly one score per sampler. Corpus ids are unique
-- (prepare checks), so per sampler: as many scores as documents, all distinct, all known
-- ids means an exact cover. Counting is one pass; no (sampler x document) product is built.
WITH corpus AS (SELECT id FROM read_parquet($corpus_glob)),
     n AS (SELECT count(*) AS n_corpus FROM corpus),
     per_step AS (
        SELECT sm.step, count(s.id) AS n_scores, count(DISTINCT s.id) AS n_distinct,
               count(s.id) FILTER (WHERE s.id IN (SELECT id FROM corpus)) AS n_known
        FROM samplers sm LEFT JOIN scores s USING (step)
        GROUP BY sm.step),
     verdict AS (
        SELECT step, n_scores, n_distinct, n_known, n_corpus,
               n_scores = n_corpus AND n_distinct = n_scores AND n_known = n_scores AS ok
        FROM per_step, n)
SELECT 'every corpus id has exactly one score per sampler' AS invariant,
       bool_and(ok) AS ok,
       CASE WHEN bool_and(ok) THEN any_value(n_corpus) || ' documents x ' || count(*) || ' samplers, each scored once'
            ELSE string_agg(CASE WHEN NOT ok THEN 'step ' || step || ': ' || n_scores || ' scores for '
                                 || n_corpus || ' documents (' || n_distinct || ' distinct ids, '
                                 || n_known || ' known to the corpus)' END, '; ' ORDER BY step)
       END AS detail
FROM verdict;
