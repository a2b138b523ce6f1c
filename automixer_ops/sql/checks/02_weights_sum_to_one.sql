-- DESIGN §3: the group weights sum to 1, and none is negative.
SELECT 'weights sum to 1' AS invariant,
       abs(sum(weight) - 1) <= 1e-9 AND min(weight) >= 0 AS ok,
       'sum ' || printf('%.12f', sum(weight)) || ', min ' || printf('%.6f', min(weight))
         || ' over ' || count(*) || ' groups' AS detail
FROM weights;
