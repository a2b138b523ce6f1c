"""Ĝ: the per-task Group Influence rows put on one scale and combined with the task weights (docs/tikmix.md).

Sign convention (DESIGN §2): a document's utility is u(x) = -I(x), HIGHER = more helpful (it lowers the
task's validation loss); a group's GI is the token-weighted mean utility of its documents, so a higher GI
is a more helpful group, and so is a higher Ĝ.

Our definition (the paper does not fix one): each task's row is z-scored across the groups that have
tokens, z_tg = (GI_tg - mean_t) / std_t (population std). Why z-scores: the maximiser on the simplex does
not change when a constant is added to Ĝ, and the scale of raw utilities differs between tasks by orders
of magnitude (they are products of gradients with a task-specific inverse-Hessian vector), so dividing
by the spread makes the task weights mean what they say and τ, κ comparable across runs. A row whose
spread is zero (all groups equal, or one group) carries no preference and becomes 0.
"""

from __future__ import annotations

import numpy as np

# A spread below this fraction of the row's largest |GI| is rounding noise on a constant row, not a signal.
RELATIVE_ZERO_SPREAD = 1e-12


def standardise_rows(gi: np.ndarray, has_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """z-score each task's row over the groups with tokens: (z, mean, std). Groups without tokens get z = 0
    (their GI may be NaN: no documents) and do not enter the statistics; a zero-spread row is all zeros
    and reports std 0."""
    n_tasks, n_groups = gi.shape
    z = np.zeros((n_tasks, n_groups))
    mean, std = np.zeros(n_tasks), np.zeros(n_tasks)
    if not has_tokens.any():
        return z, mean, std
    rows = gi[:, has_tokens]
    mean = rows.mean(axis=1)
    std = rows.std(axis=1)
    biggest = np.abs(rows).max(axis=1)
    flat = std <= RELATIVE_ZERO_SPREAD * biggest  # also true for an all-zero row (0 <= 0)
    std = np.where(flat, 0.0, std)
    safe = np.where(flat, 1.0, std)
    z[:, has_tokens] = np.where(flat[:, None], 0.0, (rows - mean[:, None]) / safe[:, None])
    return z, mean, std


def combine(z: np.ndarray, task_weights: np.ndarray) -> np.ndarray:
    """Ĝ_g = Σ_t a_t · z_tg with the task weights a rescaled to sum to 1 (so τ and κ keep their meaning
    whatever the number of tasks)."""
    a = np.asarray(task_weights, dtype=float)
    return (a / a.sum()) @ z
