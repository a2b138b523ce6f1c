-- scale_unit (temporary): the unit of joint_units' exact sums, m * 2^-52 with
-- m = max_j alpha_j * max |u_j| (see 05_joint_units.kept.sql); 1 * 2^-52 when every utility is 0.
CREATE OR REPLACE TEMP TABLE scale_unit AS
SELECT coalesce(nullif(max(sm.alpha * t.max_abs_utility), 0), 1.0) / 4503599627370496 AS unit
FROM samplers sm JOIN thresholds t USING (step);
