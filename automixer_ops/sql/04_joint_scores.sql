-- joint_scores: J(x) = sum_j alpha_j * u_j(x) over all samplers, and its min-max scaling
-- S(x) = (J - min J) / (max J - min J) over the whole corpus (paper Appendix B).
-- When every J is equal the scaling is undefined; S = 1 then gives every group the same density.
CREATE OR REPLACE TABLE joint_scores AS
WITH joint AS (
    SELECT sc.id, sum(sm.alpha * sc.utility) AS joint_utility, any_value(sc.n_tokens) AS n_tokens
    FROM scores sc
    JOIN samplers sm USING (step)
    GROUP BY sc.id
)
SELECT id, joint_utility, n_tokens,
       CASE WHEN max(joint_utility) OVER () = min(joint_utility) OVER () THEN 1.0
            ELSE (joint_utility - min(joint_utility) OVER ())
                 / (max(joint_utility) OVER () - min(joint_utility) OVER ())
       END AS scaled_utility
FROM joint
ORDER BY id;
