-- DESIGN §3: every corpus id has exactly one finite score per sampler, with the corpus's n_tokens.
-- Per sampler (score_stats, the one pass regroup made over its score files): no NULL id and no
-- NULL, NaN or infinite utility (the scorer refuses NaN/inf; this catches any other writer); as
-- many scores as corpus documents, and the same checksum of (id, n_tokens) pairs: the sum, as a
-- HUGEINT (no overflow), of their 64-bit hashes. A missing, duplicated or unknown id, or a wrong
-- n_tokens, changes the sum unless 64-bit hashes cancel exactly (an accident of about 2^-64).
-- No join or distinct count of string ids. When it fails, regroup names the ids
-- (sql/diagnose/scores_vs_corpus.sql); report checks that the score files are still those.
WITH corpus AS (
    SELECT count(*) AS n_corpus, coalesce(sum(hash(id, CAST(n_tokens AS BIGINT))::HUGEINT), 0) AS checksum
    FROM read_parquet($corpus_files)
),
verdict AS (
    SELECT sm.step, coalesce(s.n_scores, 0) AS n_scores, coalesce(s.n_invalid, 0) AS n_invalid, c.n_corpus,
           coalesce(s.n_invalid, 0) = 0 AND coalesce(s.n_scores, 0) = c.n_corpus
             AND coalesce(s.checksum, 0) = c.checksum AS ok
    FROM samplers sm LEFT JOIN score_stats s USING (step), corpus c
)
SELECT 'every corpus id has exactly one finite score per sampler, with the corpus''s n_tokens' AS invariant,
       bool_and(ok) AS ok,
       CASE WHEN bool_and(ok) THEN any_value(n_corpus) || ' documents x ' || count(*) || ' samplers, each scored once'
            ELSE string_agg(CASE WHEN NOT ok THEN 'step ' || step || ': ' || n_scores || ' scores for ' || n_corpus
                                 || ' documents, ' || n_invalid || ' NULL or non-finite, not the corpus''s ids and n_tokens'
                            END, '; ' ORDER BY step)
       END AS detail
FROM verdict;
