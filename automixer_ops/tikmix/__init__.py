"""TiKMiX (Wang et al. 2025, arXiv 2508.17677): mixtures re-solved in stages from Group Influence.

solve_d: TiKMiX-D, the influence-maximising mixture with entropy, a KL to the previous stage, floors, caps
and optional per-task guarantees (docs/tikmix.md). Group Influence follows DESIGN §2's sign convention:
higher = more helpful.
"""

from automixer_ops.tikmix.solve_d import SolveDResult, SolveDSettings, box_clipped, closed_form, solve_d

__all__ = ["SolveDResult", "SolveDSettings", "box_clipped", "closed_form", "solve_d"]
