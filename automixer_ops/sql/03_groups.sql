-- groups: G_j = {x : u_j(x) >= tau_j}, one group per sampler. A document can sit in
-- several groups; the paper keeps such overlaps on purpose.
CREATE OR REPLACE TABLE groups AS
SELECT 'step-' || s.step AS group_name, s.step, s.id, s.utility, s.n_tokens
FROM scores s
JOIN thresholds t USING (step)
WHERE s.utility >= t.tau
ORDER BY s.step, s.id;
