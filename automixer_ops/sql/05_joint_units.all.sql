-- joint_units (regroup.joint: all; the paper's main-text form): J(x) = sum_j alpha_j * u_j(x)
-- over every sampler, for every corpus document, in the exact units of 05_joint_units.kept.sql.
-- groups_mask marks the filtered tables F_j that hold x, as in the kept form (0: in no group).
CREATE OR REPLACE TABLE joint_units AS
WITH cut AS (
    SELECT t.step, t.tau, sm.bit, sm.alpha / s.unit AS factor
    FROM thresholds t JOIN samplers sm USING (step), (FROM scale_unit) s
)
SELECT sc.id, sum_no_overflow(CAST(CAST(sc.utility AS DOUBLE) * c.factor AS BIGINT)) AS units,
       any_value(CAST(sc.n_tokens AS BIGINT)) AS n_tokens,
       bit_or(CASE WHEN CAST(sc.utility AS DOUBLE) > c.tau OR tk.id IS NOT NULL THEN c.bit ELSE CAST(0 AS UBIGINT) END)
         AS groups_mask
FROM read_parquet($score_files, hive_partitioning = true) sc
JOIN cut c ON c.step = CAST(sc.step AS BIGINT)
LEFT JOIN tie_keeps tk ON tk.step = c.step AND tk.id = sc.id
GROUP BY sc.id;
