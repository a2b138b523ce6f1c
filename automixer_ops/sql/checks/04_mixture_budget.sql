-- DESIGN §3: the mixture's token count is within one document of the budget T
-- (one document: the longest in the mixture).
SELECT 'mixture tokens within one document of the budget' AS invariant,
       abs(sum(n_tokens) - $token_budget) <= max(n_tokens) AS ok,
       sum(n_tokens) || ' tokens for a budget of ' || $token_budget
         || ' (longest document ' || max(n_tokens) || ')' AS detail
FROM mixture;
