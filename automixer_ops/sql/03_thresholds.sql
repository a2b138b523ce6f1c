-- thresholds: per sampler j, keep the top k = ceil(keep_fraction * n) documents by utility
-- (paper Appendix B: each sampler's filtered table holds its top K% by influence).
-- tau_j is the utility of the last kept document, the k-th largest (queries/kth_largest.sql,
-- bound here as $kth_largest in sampler order; regroup.py checks n_above < n_kept <= n_above + n_at).
-- n_above documents lie strictly above tau; the n_kept - n_above ties at tau are kept by id.
CREATE OR REPLACE TABLE thresholds AS
WITH cut AS (SELECT unnest($sampler_steps)::BIGINT AS step, unnest($kth_largest)::DOUBLE AS tau),
counts AS (
    SELECT c.step,
           count(*) FILTER (WHERE CAST(s.utility AS DOUBLE) > c.tau) AS n_above,
           count(*) FILTER (WHERE CAST(s.utility AS DOUBLE) = c.tau) AS n_at
    FROM read_parquet($score_files, hive_partitioning = true) s JOIN cut c ON c.step = CAST(s.step AS BIGINT)
    GROUP BY c.step
)
SELECT st.step, sm.group_name, cut.tau, st.n_scores AS n_scored, CAST($keep_k AS BIGINT) AS n_kept,
       c.n_above, c.n_at, st.max_abs_utility
FROM score_stats st JOIN cut USING (step) JOIN counts c USING (step) JOIN samplers sm USING (step)
ORDER BY step;
