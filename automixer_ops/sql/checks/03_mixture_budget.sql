-- DESIGN §3: the mixture's token count is within one document of the budget T it was drawn
-- for (one document: the longest in the mixture), or, where the user allowed it
-- (mix.underfill: allow), exactly everything the groups can give, said as such.
WITH info AS (
    SELECT CAST(max(value) FILTER (WHERE key = 'token_budget') AS BIGINT) AS budget,
           CAST(max(value) FILTER (WHERE key = 'capacity') AS BIGINT) AS capacity,
           coalesce(max(value) FILTER (WHERE key = 'underfilled') = 'true', false) AS underfilled
    FROM mixture_info
),
drawn AS (SELECT CAST(coalesce(sum(n_tokens), 0) AS BIGINT) AS tokens, coalesce(max(n_tokens), 0) AS longest FROM mixture)
SELECT 'mixture tokens within one document of the budget' AS invariant,
       CASE WHEN underfilled THEN tokens = capacity AND tokens < budget
            ELSE abs(tokens - budget) <= longest END AS ok,
       tokens || ' tokens for a budget of ' || budget
         || CASE WHEN underfilled THEN ' (UNDERFILLED, allowed by mix.underfill: the groups give ' || capacity || ')'
                 ELSE ' (longest document ' || longest || ')' END AS detail
FROM info, drawn;
