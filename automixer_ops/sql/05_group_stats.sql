-- group_stats: influence density of each group,
-- rho_g = sum_{x in G_g} S(x) * s_x / sum_{x in G_g} s_x  (s_x = the document's token count),
-- i.e. the token-weighted mean scaled influence of the group (paper Appendix B).
CREATE OR REPLACE TABLE group_stats AS
SELECT g.group_name, g.step,
       count(*) AS n_docs,
       CAST(sum(g.n_tokens) AS BIGINT) AS n_tokens,
       sum(j.scaled_utility * g.n_tokens) AS scaled_token_mass,
       sum(j.scaled_utility * g.n_tokens) / sum(g.n_tokens) AS influence_density
FROM groups g
JOIN joint_scores j USING (id)
GROUP BY g.group_name, g.step
ORDER BY g.step;
