-- Every utility is a finite number (the scorer refuses NaN/inf; this catches any other writer).
SELECT 'every utility is finite' AS invariant,
       count(*) FILTER (WHERE NOT isfinite(utility)) = 0 AS ok,
       count(*) FILTER (WHERE NOT isfinite(utility)) || ' of ' || count(*) || ' scores are NaN or infinite' AS detail
FROM scores;
