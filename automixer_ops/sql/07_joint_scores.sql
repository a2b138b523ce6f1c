-- joint_scores: J(x) and its min-max scaling S(x) (paper Appendix B), read off joint_units and
-- joint_scale. A view: the big table is written once, as exact integers, and nothing is copied.
-- When every J is equal the scaling is undefined; S = 1 then gives every group the same density.
CREATE OR REPLACE VIEW joint_scores AS
SELECT j.id, CAST(j.units AS DOUBLE) * s.unit AS joint_utility, j.n_tokens, j.groups_mask,
       CASE WHEN s.hi = s.lo THEN 1.0 ELSE CAST(j.units - s.lo AS DOUBLE) / CAST(s.hi - s.lo AS DOUBLE) END
         AS scaled_utility
FROM joint_units j, joint_scale s;
