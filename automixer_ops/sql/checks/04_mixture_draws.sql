-- DESIGN §2 mixing: every drawn document belongs to the group it was drawn for, and no group
-- repeats a document more than max_repeats times (the setting the mixture was drawn with).
WITH info AS (SELECT CAST(max(value) FILTER (WHERE key = 'max_repeats') AS BIGINT) AS max_repeats FROM mixture_info)
SELECT 'mixture draws come from their groups within max_repeats' AS invariant,
       count(*) FILTER (WHERE g.id IS NULL) = 0 AND coalesce(max(m."repeat"), 0) <= any_value(info.max_repeats) AS ok,
       count(*) FILTER (WHERE g.id IS NULL) || ' draws outside their group; highest repeat '
         || coalesce(max(m."repeat"), 0) || ' (max_repeats ' || any_value(info.max_repeats) || ')' AS detail
FROM mixture m LEFT JOIN groups g ON g.group_name = m.group_name AND g.id = m.id, info;
