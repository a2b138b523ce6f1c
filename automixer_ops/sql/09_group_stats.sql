-- group_stats: influence density of each group (paper Appendix B's token-product weighting),
-- rho_g = sum_{x in G_g} S(x) * s_x / sum_{x in G_g} s_x  (s_x = the document's token count),
-- i.e. the token-weighted mean scaled influence of the group. The mass is summed exactly (as a
-- DECIMAL) so that reruns give the same bits whatever order threads add in.
CREATE OR REPLACE TABLE group_stats AS
SELECT group_name, step,
       count(*) AS n_docs,
       CAST(sum(n_tokens) AS BIGINT) AS n_tokens,
       CAST(sum(CAST(scaled_utility * n_tokens AS DECIMAL(38, 12))) AS DOUBLE) AS scaled_token_mass,
       CAST(sum(CAST(scaled_utility * n_tokens AS DECIMAL(38, 12))) AS DOUBLE) / sum(n_tokens) AS influence_density
FROM groups
GROUP BY group_name, step
ORDER BY step;
