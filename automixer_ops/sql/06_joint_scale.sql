-- joint_scale: the unit of joint_units (J = units * unit) and the span of J over the
-- documents joint_units holds (A = union of the F_j, or the corpus with joint: all), which
-- min-max scales it: S(x) = (J - min J) / (max J - min J).
CREATE OR REPLACE TABLE joint_scale AS
SELECT s.unit, u.lo, u.hi
FROM (FROM scale_unit) s, (SELECT min(units) AS lo, max(units) AS hi FROM joint_units) u;
