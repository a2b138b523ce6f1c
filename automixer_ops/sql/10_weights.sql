-- weights: w_g = rho_g / sum_g' rho_g' — the share of the token budget each group gets.
-- (regroup.py refuses sum rho <= 0 before this table is published.)
CREATE OR REPLACE TABLE weights AS
SELECT group_name, step, n_docs, n_tokens, influence_density,
       influence_density / sum(influence_density) OVER () AS weight
FROM group_stats
ORDER BY step;
