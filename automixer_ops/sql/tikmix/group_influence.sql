-- Group Influence per (task, group) from the per-document utilities of one checkpoint (TiKMiX).
-- gi: the token-weighted mean utility, sum n_x u_x / sum n_x (higher = more helpful);
-- stderr: the ratio estimator's standard error of that mean,
--   sqrt(m / (m - 1) * sum (n_x (u_x - gi))^2) / sum n_x   over the group's m documents.
WITH g AS (
    SELECT task, group_name, sum(n_tokens * utility::DOUBLE) / sum(n_tokens) AS gi
    FROM read_parquet($utilities) GROUP BY task, group_name
)
SELECT u.task, u.group_name, g.gi,
       CASE WHEN count(*) > 1
            THEN sqrt(count(*) / (count(*) - 1) * sum(power(u.n_tokens * (u.utility::DOUBLE - g.gi), 2)))
                 / sum(u.n_tokens)
       END AS stderr,
       count(*)::BIGINT AS n_docs, sum(u.n_tokens)::BIGINT AS n_tokens
FROM read_parquet($utilities) u JOIN g USING (task, group_name)
GROUP BY u.task, u.group_name, g.gi
ORDER BY u.task, u.group_name
