-- joint_units (regroup.joint: kept, the default; paper Appendix B's total_influence): each
-- sampler's filtered table F_j is its top n_kept documents (u_j > tau_j, and the ties of
-- tie_keeps); J(x) = sum over the samplers whose F_j holds x of alpha_j * u_j(x), for the
-- documents of A = union of the F_j. groups_mask has bit 2^slot_j set when x is in F_j.
-- J is summed exactly, so that a rerun gives the same bits whatever order threads add in: each
-- term alpha_j * u_j as a whole number of units (joint_scale.unit: the power of two 2^-52 times the
-- top of the range, the resolution of a double there; 04_scale_unit.sql), summed as BIGINT:
-- |sum| <= 64 * 2^53 < 2^63, hence sum_no_overflow (DuckDB's BIGINT sum without a HUGEINT state).
-- This file aggregates by id, for score files in any order; where they are aligned with the
-- corpus (as `automixer score` writes them) regroup.py builds the same table by position.
CREATE OR REPLACE TABLE joint_units AS
WITH cut AS (
    SELECT t.step, t.tau, sm.bit, sm.alpha / s.unit AS factor
    FROM thresholds t JOIN samplers sm USING (step), (FROM scale_unit) s
),
kept AS (
    SELECT CAST(s.step AS BIGINT) AS step, s.id, CAST(s.utility AS DOUBLE) AS utility, CAST(s.n_tokens AS BIGINT) AS n_tokens
    FROM read_parquet($score_files, hive_partitioning = true) s JOIN thresholds t ON t.step = CAST(s.step AS BIGINT)
    WHERE CAST(s.utility AS DOUBLE) > t.tau
    UNION ALL
    SELECT step, id, utility, n_tokens FROM tie_keeps
)
SELECT k.id, sum_no_overflow(CAST(k.utility * c.factor AS BIGINT)) AS units, any_value(k.n_tokens) AS n_tokens,
       bit_or(c.bit) AS groups_mask
FROM kept k JOIN cut c USING (step)
GROUP BY k.id;
