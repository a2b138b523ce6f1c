-- scale_unit (temporary): the unit of joint_units' exact sums, the power of two 2^(e - 52) with
-- 2^e >= m = max_j alpha_j * max |u_j| (see 05_joint_units.kept.sql); 2^-52 when every utility is 0.
-- A power of two, so that where the double products alpha_j * u_j are exact their units are too,
-- and J ties where it ties in exact arithmetic (an m-based unit rounded 2/3 and 1/3 apart by one).
CREATE OR REPLACE TEMP TABLE scale_unit AS
SELECT pow(2.0, coalesce(ceil(log2(nullif(max(sm.alpha * t.max_abs_utility), 0))), 0) - 52) AS unit
FROM samplers sm JOIN thresholds t USING (step);
