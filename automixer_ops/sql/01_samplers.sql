-- samplers: the checkpoints chosen by `automixer select` and their blending factors
-- alpha_j = s~_j / sum_i s~_i with s~_j = s_j / max_i s_i (DESIGN §2, paper §3.2).
CREATE OR REPLACE TABLE samplers AS
SELECT unnest($sampler_steps) AS step, unnest($sampler_alphas) AS alpha;
