-- thresholds: per sampler j, tau_j = quantile_cont(u_j, 1 - keep_fraction)
-- (paper Appendix B: keep the top keep_fraction of samples ranked by each sampler).
CREATE OR REPLACE TABLE thresholds AS
SELECT step,
       quantile_cont(utility, 1 - $keep_fraction) AS tau,
       count(*) AS n_scored
FROM scores
GROUP BY step
ORDER BY step;
