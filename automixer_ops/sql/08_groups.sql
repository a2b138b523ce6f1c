-- groups: the filtered table F_j of each sampler is its group G_j (paper Appendix B), read
-- off joint_scores.groups_mask: exactly n_kept documents per group, ties at tau kept by id.
-- A document can sit in several groups; the paper keeps such overlaps on purpose. A view,
-- not a copy: each sampler's own utility u_j is in scores/step=<N>/ (README shows the join).
CREATE OR REPLACE VIEW groups AS
SELECT sm.group_name, sm.step, j.id, j.n_tokens, j.joint_utility, j.scaled_utility
FROM joint_scores j JOIN samplers sm ON j.groups_mask & sm.bit <> 0;
