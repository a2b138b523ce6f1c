-- scores: every (sampler, document) utility, read from the scorer's Parquet output.
-- DESIGN §3: scores/step=<N>/part-*.parquet with columns id, utility, n_tokens;
-- the step=<N> directory names the sampler (hive partitioning turns it into `step`).
-- Any scorer that writes `utility` feeds the same tables (DataInf, baselines).
CREATE OR REPLACE TABLE scores AS
SELECT CAST(step AS BIGINT) AS step, id, CAST(utility AS DOUBLE) AS utility, CAST(n_tokens AS BIGINT) AS n_tokens
FROM read_parquet($scores_glob, hive_partitioning = true)
WHERE CAST(step AS BIGINT) IN (SELECT unnest($sampler_steps));
