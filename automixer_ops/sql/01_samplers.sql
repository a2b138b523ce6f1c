-- samplers: the checkpoints chosen by `automixer select` and their blending factors
-- alpha_j = s~_j / sum_i s~_i with s~_j = s_j / max_i s_i (DESIGN §2, paper §3.2).
-- slot: the sampler's position in selection.json; bit = 2^slot, its bit in joint_units.groups_mask.
CREATE OR REPLACE TABLE samplers AS
SELECT CAST(step AS BIGINT) AS step, 'step-' || step AS group_name, CAST(alpha AS DOUBLE) AS alpha,
       CAST(slot - 1 AS INTEGER) AS slot, CAST(1 AS UBIGINT) << CAST(slot - 1 AS UBIGINT) AS bit
FROM (SELECT unnest($sampler_steps) AS step, unnest($sampler_alphas) AS alpha,
             unnest(range(1, len($sampler_steps) + 1)) AS slot)
ORDER BY slot;
