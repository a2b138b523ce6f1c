"""TiKMiX-D: the stage's mixture that maximises Group Influence, kept diverse and close to the last stage.

    maximise   F(w) = Σ_g w_g·Ĝ_g + τ·H(w) − κ·KL(w ‖ w_prev)
    subject to Σ_g w_g = 1,  floor ≤ w_g ≤ cap_g,  cap_g = min(1, repetition_factor · tokens_g / stage_tokens)
               and, with keep_task_influence, Σ_g w_g·GI_tg ≥ Σ_g w_prev_g·GI_tg for every task t of weight > 0.

Sign convention (DESIGN §2): utility u(x) = −I(x), HIGHER = more helpful (it lowers the task's validation
loss); GI_tg is the token-weighted mean utility of group g's documents for task t (higher = more helpful),
Ĝ the task-normalised, task-weighted combination (normalize.py). H and KL are in nats, 0·log 0 = 0.

With β = τ + κ > 0 and no bound binding the maximiser is closed-form (docs/tikmix.md derives it):
    w_g ∝ w_prev_g^(κ/β) · exp(Ĝ_g / β)                                  (`closed_form`)
With the box [floor, cap] it is the same form clipped to the box, with one scalar dual ν chosen by a
monotone 1-D bisection so the weights sum to 1 (`box_clipped`, solver 'analytic'). The general problem
(task constraints, or τ = κ = 0, a linear program) goes to cvxpy + Clarabel (solver 'clarabel'); an
interior-point answer is only good to ~1e-5 on this problem (the weights' error is the square root of the
duality gap), so for β > 0 it is polished: Clarabel's task multipliers η fix which task constraints bind,
and Newton's method on η solves w = box_clipped(Ĝ + Σ_t η_t·z_t) exactly (OSQP's polishing, in spirit).
A polish that fails a KKT check is dropped and Clarabel's own answer is kept (`exact: false`).

Zero-token groups have cap 0; with κ > 0 a group absent from w_prev is held at 0 (the KL is infinite
otherwise). Infeasible settings raise AutomixerError in one line naming the setting and the numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np

from automixer_ops.config_fields import setting
from automixer_ops.errors import AutomixerError, ConfigError
from automixer_ops.rundir import atomic_write_text
from automixer_ops.tikmix.normalize import combine, standardise_rows

SOLVERS = ("clarabel", "analytic")
BIND_TOL = 1e-7         # a weight this close to its floor or cap is reported as binding there
SUM_TOL = 1e-9          # floors and caps are compared with 1 up to this
PREV_SUM_TOL = 1e-6     # w_prev must sum to 1 up to this
TASK_TOL = 1e-9         # task constraints (in z units: the row's std) hold up to this
BINDING_TASK_TOL = 1e-7  # a task this close (z units) to its w_prev influence is reported as binding
# Clarabel's defaults stop at a gap of 1e-8; 1e-10 still ends 'optimal' reliably (1e-12 often does not).
CLARABEL_SETTINGS = {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10, "max_iter": 200}


@dataclass(frozen=True, kw_only=True)
class SolveDSettings:
    """The TiKMiX-D knobs; every value is checked on construction and a bad one is named (tikmix.d.<field>)."""

    tau: float = setting(0.5, "τ: weight of the entropy H(w) (diversity). In units of Ĝ, whose rows are z-scores.")
    kappa: float = setting(0.5, "κ: weight of KL(w ‖ w_prev), which keeps the stage near the previous mixture.")
    floor: float = setting(0.0, "Lower bound of every group's weight, in [0, 1).")
    repetition_factor: float | None = setting(
        4.0, "Cap w_g ≤ repetition_factor · tokens available in g / stage tokens (4: up to 4 passes cost little, "
        "Muennighoff et al. 2023); null: no caps (a group with no tokens is still capped at 0).")
    task_weights: dict[str, float] | None = setting(
        None, "Weight of each task in Ĝ (every task of the GI matrix, >= 0, rescaled to sum 1); null: equal.")
    keep_task_influence: bool = setting(
        False, "Also require Σ_g w_g·GI_tg ≥ Σ_g w_prev_g·GI_tg for every task of weight > 0 (needs clarabel).")
    solver: Literal["clarabel", "analytic"] = setting(
        "clarabel", "'clarabel': cvxpy + Clarabel (any setting), polished to machine precision when τ + κ > 0; "
        "'analytic': the box-clipped closed form (floors and caps only, τ + κ > 0; no cvxpy).")

    def __post_init__(self) -> None:
        self.check("tikmix.d")

    def check(self, where: str) -> None:
        for name in ("tau", "kappa", "floor"):
            value = _finite_number(where, name, getattr(self, name))
            if value < 0:
                raise ConfigError(f"{where}.{name}: must be >= 0, got {value}")
        if self.floor >= 1:
            raise ConfigError(f"{where}.floor: must be < 1 (a floor of 1 leaves no room to choose), got {self.floor}")
        if self.repetition_factor is not None and _finite_number(where, "repetition_factor",
                                                                 self.repetition_factor) <= 0:
            raise ConfigError(f"{where}.repetition_factor: must be > 0 or null (no caps), "
                              f"got {self.repetition_factor}")
        if self.task_weights is not None:
            if not isinstance(self.task_weights, Mapping) or not self.task_weights:
                raise ConfigError(f"{where}.task_weights: expected a non-empty mapping task -> weight or null, "
                                  f"got {self.task_weights!r}")
            for task, value in self.task_weights.items():
                if _finite_number(where, f"task_weights[{task!r}]", value) < 0:
                    raise ConfigError(f"{where}.task_weights[{task!r}]: must be >= 0, got {value}")
            if sum(self.task_weights.values()) <= 0:
                raise ConfigError(f"{where}.task_weights: at least one weight must be > 0")
        if not isinstance(self.keep_task_influence, bool):
            raise ConfigError(f"{where}.keep_task_influence: expected true or false, got {self.keep_task_influence!r}")
        if self.solver not in SOLVERS:
            raise ConfigError(f"{where}.solver: {self.solver!r} is not one of {', '.join(SOLVERS)}")
        if self.solver == "analytic" and self.keep_task_influence:
            raise ConfigError(f"{where}.solver: 'analytic' handles floors and caps only; keep_task_influence "
                              "needs solver 'clarabel'")
        if self.solver == "analytic" and self.tau + self.kappa == 0:
            raise ConfigError(f"{where}.solver: 'analytic' needs tau + kappa > 0 (tau = kappa = 0 is a linear "
                              "program: use solver 'clarabel')")


def _finite_number(where: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ConfigError(f"{where}.{name}: must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SolveDResult:
    """One stage's TiKMiX-D mixture and how it was reached. Weights sum to 1; `to_json` writes it all."""

    weights: dict[str, float]
    objective: float                   # F(w) = influence_term + τ·entropy − κ·kl_to_prev
    influence_term: float              # Σ_g w_g·Ĝ_g
    entropy: float                     # H(w), nats
    kl_to_prev: float | None           # KL(w ‖ w_prev), nats; None where infinite (only possible with κ = 0)
    g_hat: dict[str, float]            # Ĝ per group (higher = more helpful)
    w_prev: dict[str, float]
    caps: dict[str, float | None]      # None: uncapped (repetition_factor null)
    floor: float
    at_cap: tuple[str, ...]            # groups whose cap binds (within BIND_TOL), excluded groups left out
    at_floor: tuple[str, ...]          # groups held at a floor > 0
    excluded: dict[str, str]           # groups held at 0, and why
    task_influence_prev: dict[str, float]  # Σ_g w_prev_g·GI_tg, in GI units (higher = more helpful)
    task_influence: dict[str, float]       # Σ_g w_g·GI_tg
    task_multipliers: dict[str, float]     # η_t of the task constraints (keep_task_influence), in Ĝ units
    binding_tasks: tuple[str, ...]         # tasks held exactly at their w_prev influence
    solver: str
    status: str                        # 'optimal' (analytic), else cvxpy's status for Clarabel
    exact: bool                        # the weights solve the KKT conditions to rounding (analytic, polished)
    polish_shift: float | None         # clarabel: max |w_polished − w_clarabel|; None when not polished
    stage_tokens: float
    settings: dict

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write_json(self, path: Path) -> None:
        atomic_write_text(Path(path), self.to_json())


# ---------------------------------------------------------------- the closed forms (also the tests' oracles)

def logits(g_hat: np.ndarray, p: np.ndarray, tau: float, kappa: float) -> np.ndarray:
    """b_g = (Ĝ_g + κ·log p_g) / (τ + κ): the closed form is softmax(b). −inf where p_g = 0 and κ > 0."""
    beta = tau + kappa
    if beta <= 0:
        raise ValueError("the closed form needs tau + kappa > 0")
    prior = np.zeros_like(g_hat, dtype=float)
    if kappa > 0:
        with np.errstate(divide="ignore"):
            prior = kappa * np.log(np.asarray(p, dtype=float))
    return (np.asarray(g_hat, dtype=float) + prior) / beta


def closed_form(g_hat, p, tau: float, kappa: float) -> np.ndarray:
    """argmax of Σ w·Ĝ + τH(w) − κKL(w‖p) on the simplex: w ∝ p^(κ/β)·exp(Ĝ/β), by log-sum-exp."""
    b = logits(np.asarray(g_hat, dtype=float), np.asarray(p, dtype=float), tau, kappa)
    e = np.exp(b - b[np.isfinite(b)].max())
    return e / e.sum()


def box_clipped(g_hat, p, tau: float, kappa: float, lower, upper) -> np.ndarray:
    """The same maximiser within lower ≤ w ≤ upper: w_g = clip(exp(b_g − ν), lower_g, upper_g), ν bisected."""
    b = logits(np.asarray(g_hat, dtype=float), np.asarray(p, dtype=float), tau, kappa)
    lo, hi = (np.broadcast_to(np.asarray(x, dtype=float), b.shape) for x in (lower, upper))
    return _box_softmax(b, lo, hi)[0]


def _box_softmax(b: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """(w, ν, free): w = clip(exp(b − ν), lower, upper) with Σw = 1; `free` marks the weights strictly inside
    their box. s(ν) = Σ clip(...) falls monotonically in ν, so bisection finds the root; ν is then solved
    exactly on the free set, so the sum is 1 to rounding. Groups with b = −inf sit at their lower bound."""
    finite = np.isfinite(b) & (upper > 0)
    if lower.sum() >= 1 - SUM_TOL or not finite.any():
        return _fix_sum(lower.copy(), lower, upper), math.inf, np.zeros(b.shape, bool)

    def weights(nu: float) -> np.ndarray:
        with np.errstate(over="ignore"):
            return np.where(finite, np.clip(np.exp(np.where(finite, b, 0.0) - nu), lower, upper), lower)

    # At nu_lo every finite group is at its cap (s ≥ 1 when the caps allow 1); at nu_hi s ≤ 1.
    nu_lo = float(np.min(b[finite] - np.log(upper[finite])))
    nu_hi = float(np.max(b[finite]) + math.log(finite.sum()) - math.log(1 - lower.sum()))
    if weights(nu_lo).sum() < 1 - SUM_TOL:
        raise ValueError(f"the caps sum to {upper[finite].sum() + lower[~finite].sum():.6g} < 1")
    for _ in range(200):
        mid = 0.5 * (nu_lo + nu_hi)
        if mid in (nu_lo, nu_hi):
            break
        if weights(mid).sum() > 1:
            nu_lo = mid
        else:
            nu_hi = mid
    nu = 0.5 * (nu_lo + nu_hi)
    with np.errstate(over="ignore"):  # a group far above its cap: inf, clipped below
        raw = np.exp(np.where(finite, b, -np.inf) - nu)
    free = finite & (raw > lower) & (raw < upper)
    rest = 1.0 - np.where(raw >= upper, upper, lower)[~free].sum()
    if free.any() and rest > 0:  # exact ν on the free set: Σ_free exp(b − ν) = rest
        top = b[free].max()
        nu = float(top + math.log(np.exp(b[free] - top).sum()) - math.log(rest))
    w = _fix_sum(weights(nu), lower, upper)
    return w, nu, free & (w > lower) & (w < upper)


def _fix_sum(w: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Clip into the box and spread the rounding residual 1 − Σw over the room left, so the box still holds."""
    w = np.clip(w, lower, upper)
    residual = 1.0 - w.sum()
    room = np.minimum(upper - w, 1.0) if residual > 0 else w - lower
    if residual != 0 and room.sum() > 0:
        w = np.clip(w + residual * room / room.sum(), lower, upper)
    return w


def objective_terms(w, g_hat, p, tau: float, kappa: float) -> tuple[float, float, float, float | None]:
    """(F, Σ w·Ĝ, H(w), KL(w‖p)) in nats with 0·log 0 = 0; KL is None where w > 0 on a group with p = 0."""
    w, g_hat, p = (np.asarray(x, dtype=float) for x in (w, g_hat, p))
    pos = w > 0
    influence = float(w @ g_hat)
    entropy = float(-(w[pos] * np.log(w[pos])).sum())
    kl = None if (p[pos] <= 0).any() else float((w[pos] * np.log(w[pos] / p[pos])).sum())
    objective = influence + tau * entropy - (kappa * kl if kappa > 0 else 0.0)
    return objective, influence, entropy, kl


# ---------------------------------------------------------------- the entry point

@dataclass(frozen=True)
class _Problem:
    groups: tuple[str, ...]
    tasks: tuple[str, ...]
    gi: np.ndarray          # tasks x groups; a group without tokens has its task's mean (its GI may be NaN)
    tokens: np.ndarray
    stage_tokens: float
    p: np.ndarray           # w_prev over the groups, sums to 1


def solve_d(groups: Sequence[str], tasks: Sequence[str], gi, tokens_available, stage_tokens: float,
            settings: SolveDSettings | None = None, w_prev: Mapping[str, float] | None = None) -> SolveDResult:
    """TiKMiX-D for one stage.

    groups: the group names; tasks: the task names; gi: the Group Influence matrix (tasks x groups, higher =
    more helpful; NaN allowed only for a group without tokens); tokens_available: tokens per group (a
    sequence in `groups` order or a mapping group -> tokens); stage_tokens: the tokens this stage trains on;
    w_prev: the previous stage's mixture (groups left out count 0; default: natural token shares).
    """
    settings = settings or SolveDSettings()
    prob = _checked_problem(groups, tasks, gi, tokens_available, stage_tokens, w_prev)
    z, _, std = standardise_rows(prob.gi, prob.tokens > 0)
    task_weights = _task_weights(settings, prob.tasks)
    g_hat = combine(z, task_weights)
    lower, upper, excluded = _bounds(prob, settings)
    _check_box(prob, settings, lower, upper, excluded)
    constrained = np.flatnonzero((task_weights > 0) & (std > 0)) if settings.keep_task_influence else np.array([], int)
    _check_each_task(prob, lower, upper, constrained)

    if settings.solver == "analytic":
        w = box_clipped(g_hat, prob.p, settings.tau, settings.kappa, lower, upper)
        eta, status, exact, shift = np.zeros(0), "optimal", True, None
    else:
        w, eta, status, exact, shift = _solve_clarabel(prob, settings, g_hat, z[constrained],
                                                        [prob.tasks[k] for k in constrained], lower, upper)

    objective, influence, entropy, kl = objective_terms(w, g_hat, prob.p, settings.tau, settings.kappa)
    at_cap = [g for i, g in enumerate(prob.groups)
              if upper[i] < 1 and w[i] >= upper[i] - BIND_TOL and g not in excluded]
    at_floor = [g for i, g in enumerate(prob.groups)
                if settings.floor > 0 and w[i] <= lower[i] + BIND_TOL and g not in at_cap]
    token_caps = _token_caps(prob, settings.repetition_factor)
    slack = z[constrained] @ w - z[constrained] @ prob.p
    return SolveDResult(
        weights={g: float(x) for g, x in zip(prob.groups, w)},
        objective=objective, influence_term=influence, entropy=entropy, kl_to_prev=kl,
        g_hat={g: float(x) for g, x in zip(prob.groups, g_hat)},
        w_prev={g: float(x) for g, x in zip(prob.groups, prob.p)},
        caps={g: None if settings.repetition_factor is None and t > 0 else float(c)
              for g, t, c in zip(prob.groups, prob.tokens, token_caps)},
        floor=float(settings.floor), at_cap=tuple(at_cap), at_floor=tuple(at_floor), excluded=excluded,
        task_influence_prev={t: float(x) for t, x in zip(prob.tasks, prob.gi @ prob.p)},
        task_influence={t: float(x) for t, x in zip(prob.tasks, prob.gi @ w)},
        task_multipliers={prob.tasks[k]: float(e) for k, e in zip(constrained, eta)},
        binding_tasks=tuple(prob.tasks[k] for k, s in zip(constrained, slack) if s <= BINDING_TASK_TOL),
        solver=settings.solver, status=status, exact=exact, polish_shift=shift,
        stage_tokens=prob.stage_tokens, settings=asdict(settings))


def _checked_problem(groups, tasks, gi, tokens_available, stage_tokens, w_prev) -> _Problem:
    groups, tasks = tuple(groups), tuple(tasks)
    for what, names in (("groups", groups), ("tasks", tasks)):
        if not names:
            raise AutomixerError(f"{what}: give at least one name")
        if any(not isinstance(n, str) or not n for n in names):
            raise AutomixerError(f"{what}: names must be non-empty strings, got {list(names)!r}")
        if len(set(names)) != len(names):
            raise AutomixerError(f"{what}: names must be unique, got {sorted(n for n in names if names.count(n) > 1)}")
    if isinstance(tokens_available, Mapping):
        missing = [g for g in groups if g not in tokens_available]
        unknown = [g for g in tokens_available if g not in groups]
        if missing or unknown:
            raise AutomixerError(f"tokens_available: missing groups {missing}, unknown groups {unknown}")
        tokens_available = [tokens_available[g] for g in groups]
    tokens = np.asarray(tokens_available, dtype=float)
    if tokens.shape != (len(groups),):
        raise AutomixerError(f"tokens_available: expected {len(groups)} values (one per group), got shape "
                             f"{tokens.shape}")
    bad = [g for g, t in zip(groups, tokens) if not (math.isfinite(t) and t >= 0)]
    if bad:
        raise AutomixerError(f"tokens_available: must be finite and >= 0; group {bad[0]!r} has "
                             f"{tokens[groups.index(bad[0])]}")
    if not tokens.sum() > 0:
        raise AutomixerError("tokens_available: every group has 0 tokens")
    if isinstance(stage_tokens, bool) or not isinstance(stage_tokens, (int, float, np.integer, np.floating)) \
            or not math.isfinite(stage_tokens) or stage_tokens <= 0:
        raise AutomixerError(f"stage_tokens: must be a finite number > 0, got {stage_tokens!r}")
    gi = np.array(gi, dtype=float)
    if gi.shape != (len(tasks), len(groups)):
        raise AutomixerError(f"gi: expected shape (tasks, groups) = ({len(tasks)}, {len(groups)}), got {gi.shape}")
    has_tokens = tokens > 0
    for t, g in zip(*np.nonzero(~np.isfinite(gi) & has_tokens)):
        raise AutomixerError(f"gi: task {tasks[t]!r}, group {groups[g]!r} is {gi[t, g]} (only a group with 0 "
                             "available tokens may have no finite GI)")
    # A group without tokens cannot be drawn; its GI (NaN when it has no documents) counts as its task's mean.
    means = np.array([row[has_tokens].mean() for row in gi])
    gi[:, ~has_tokens] = means[:, None]
    return _Problem(groups, tasks, gi, tokens, float(stage_tokens), _checked_prev(w_prev, groups, tokens))


def _checked_prev(w_prev, groups, tokens) -> np.ndarray:
    if w_prev is None:
        return tokens / tokens.sum()
    if not isinstance(w_prev, Mapping):
        raise AutomixerError(f"w_prev: expected a mapping group -> weight, got {type(w_prev).__name__}")
    unknown = [g for g in w_prev if g not in groups]
    if unknown:
        raise AutomixerError(f"w_prev: unknown groups {unknown}; the groups are {list(groups)}")
    for g, x in w_prev.items():
        if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)) \
                or not math.isfinite(x) or x < 0:
            raise AutomixerError(f"w_prev[{g!r}]: must be a finite number >= 0, got {x!r}")
    p = np.array([float(w_prev.get(g, 0.0)) for g in groups])
    if abs(p.sum() - 1) > PREV_SUM_TOL:
        raise AutomixerError(f"w_prev: weights sum to {p.sum():.9g}, expected 1 (groups left out count 0)")
    return p / p.sum()


def _task_weights(settings: SolveDSettings, tasks: tuple[str, ...]) -> np.ndarray:
    if settings.task_weights is None:
        return np.full(len(tasks), 1.0 / len(tasks))
    missing = [t for t in tasks if t not in settings.task_weights]
    unknown = [t for t in settings.task_weights if t not in tasks]
    if missing or unknown:
        raise ConfigError(f"tikmix.d.task_weights: missing tasks {missing}, unknown tasks {unknown}; give "
                          f"every task of the GI matrix a weight (0 to leave it out): {list(tasks)}")
    a = np.array([float(settings.task_weights[t]) for t in tasks])
    if not (a > 0).any():
        raise ConfigError("tikmix.d.task_weights: at least one weight must be > 0")
    return a


def _token_caps(prob: _Problem, repetition_factor: float | None) -> np.ndarray:
    """cap_g = min(1, repetition_factor · tokens_g / stage_tokens); 1 without a repetition_factor; 0 without tokens."""
    if repetition_factor is None:
        return np.where(prob.tokens > 0, 1.0, 0.0)
    return np.minimum(1.0, repetition_factor * prob.tokens / prob.stage_tokens)


def _bounds(prob: _Problem, settings: SolveDSettings) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """(lower, upper, excluded): the token caps, and 0 for the groups that cannot take weight, with why."""
    upper = _token_caps(prob, settings.repetition_factor)
    excluded = {g: "no available tokens (cap 0)" for g, t in zip(prob.groups, prob.tokens) if t == 0}
    if settings.kappa > 0:
        for i, g in enumerate(prob.groups):
            if prob.p[i] == 0 and g not in excluded:
                excluded[g] = "absent from w_prev: with kappa > 0 any weight makes KL(w || w_prev) infinite"
                upper[i] = 0.0
    return np.full(len(prob.groups), float(settings.floor)), upper, excluded


def _check_box(prob: _Problem, settings: SolveDSettings, lower, upper, excluded: dict[str, str]) -> None:
    """Floors and caps leave a mixture (Σ floor ≤ 1 ≤ Σ cap and floor ≤ cap per group), else one line why."""
    rf = settings.repetition_factor
    for i, g in enumerate(prob.groups):
        if lower[i] <= upper[i] + SUM_TOL:
            continue
        if prob.tokens[i] == 0:
            why = "the group has 0 available tokens: set floor 0 or drop the group"
        elif g in excluded:
            why = (f"the group is absent from w_prev and kappa {settings.kappa:g} > 0 holds it at 0: give it a "
                   "weight in w_prev, or set floor 0 or kappa 0")
        else:
            why = (f"repetition_factor {rf:g} x {prob.tokens[i]:,.0f} available tokens / stage tokens "
                   f"{prob.stage_tokens:,.0f}: lower floor or stage tokens, or raise repetition_factor")
        raise AutomixerError(f"floor {settings.floor:g} > cap {upper[i]:.6g} of group {g!r} ({why})")
    if lower.sum() > 1 + SUM_TOL:
        raise AutomixerError(f"floors sum to {lower.sum():.6g} > 1: floor {settings.floor:g} x {len(lower)} groups "
                             f"(at most {1 / len(lower):.6g} for {len(lower)} groups)")
    if upper.sum() < 1 - SUM_TOL:
        held = [g for g in excluded if prob.tokens[prob.groups.index(g)] > 0]
        note = f"; held at 0 (absent from w_prev, kappa > 0): {held}" if held else ""
        if rf is None:
            raise AutomixerError(f"caps sum to {upper.sum():.6g} < 1: no group can take weight{note}")
        usable = float(prob.tokens[upper > 0].sum())
        raise AutomixerError(
            f"caps sum to {upper.sum():.6g} < 1: repetition_factor {rf:g} x available tokens {usable:,.0f} / "
            f"stage tokens {prob.stage_tokens:,.0f} (lower stage tokens to at most {rf * usable:,.0f} or raise "
            f"repetition_factor to at least {prob.stage_tokens / usable:.6g}){note}")


def _check_each_task(prob: _Problem, lower, upper, constrained) -> None:
    """keep_task_influence, one task at a time: the box's best mixture for the task (fill the floors, then
    the most helpful groups up to their caps) must reach the task's influence under w_prev."""
    for k in constrained:
        row = prob.gi[k]
        best = lower.copy()
        room = 1.0 - best.sum()
        for g in np.argsort(-row, kind="stable"):
            add = min(upper[g] - best[g], room)
            best[g] += max(add, 0.0)
            room -= max(add, 0.0)
        need, reach = float(row @ prob.p), float(row @ best)
        if reach < need - TASK_TOL * (abs(need) + np.abs(row).max()):
            raise AutomixerError(
                f"keep_task_influence: task {prob.tasks[k]!r} cannot keep its influence under w_prev ({need:.6g}) "
                f"within the floors and caps: at most {reach:.6g}; loosen floor / repetition_factor or set "
                "keep_task_influence false")


def _solve_clarabel(prob: _Problem, settings: SolveDSettings, g_hat, rows, task_names, lower, upper,
                    polish: bool = True):
    """cvxpy + Clarabel over the groups that can take weight; then the polish (module docstring).
    Returns (w, η, status, exact, polish_shift)."""
    import cvxpy as cp

    tau, kappa = settings.tau, settings.kappa
    beta = tau + kappa
    on = upper > 0
    c = g_hat[on] + (kappa * np.log(prob.p[on]) if kappa > 0 else 0.0)  # p > 0 on `on` when kappa > 0
    rhs = rows @ prob.p
    w = cp.Variable(int(on.sum()))
    scale = max(1.0, beta)  # −κ·KL = κ·entr(w) + κ·w·log p up to a constant: one entropy term of weight β
    objective = (c / scale) @ w + ((beta / scale) * cp.sum(cp.entr(w)) if beta > 0 else 0)
    task_rows = [rows[:, on] @ w >= rhs] if len(rhs) else []
    problem = cp.Problem(cp.Maximize(objective),
                         [cp.sum(w) == 1, w >= lower[on], w <= upper[on], *task_rows])
    try:
        problem.solve(solver=cp.CLARABEL, **CLARABEL_SETTINGS)
    except cp.error.SolverError as e:
        raise AutomixerError(f"tikmix.d.solver 'clarabel' failed: {e}") from None
    status = problem.status
    if status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        if not task_rows:  # _check_box proved the box feasible: this is the solver's failure, not the settings'
            raise AutomixerError(f"tikmix.d.solver 'clarabel' found the floors and caps infeasible "
                                 f"({status}); solver 'analytic' solves this case exactly")
        raise AutomixerError(f"keep_task_influence: no mixture within the floors and caps keeps every task at or "
                             f"above its influence under w_prev (tasks {', '.join(task_names)}; each alone can): "
                             "loosen floor / repetition_factor or set keep_task_influence false")
    if status not in (cp.OPTIMAL, cp.OPTIMAL_INACCURATE):
        raise AutomixerError(f"tikmix.d.solver 'clarabel' ended with status {status!r}")
    raw = np.zeros(len(on))
    raw[on] = np.asarray(w.value, dtype=float).ravel()
    raw = _fix_sum(raw, lower, upper)
    eta = np.maximum(scale * np.asarray(task_rows[0].dual_value, dtype=float).ravel(), 0.0) if task_rows \
        else np.zeros(0)
    if not polish or beta <= 0:
        return raw, eta, status, False, None
    polished = _polish(logits(g_hat, prob.p, tau, kappa), beta, lower, upper, rows, rhs, eta)
    if polished is None:
        return raw, eta, status, False, None
    w_exact, eta_exact = polished
    return w_exact, eta_exact, status, True, float(np.abs(w_exact - raw).max())


# ---------------------------------------------------------------- polishing Clarabel's answer (β > 0)

def _polish(b, beta, lower, upper, rows, rhs, eta0):
    """The exact optimum given which task constraints bind: w(η) = box_softmax(b + rowsᵀη/β) with
    rows_A·w(η) = rhs_A on the binding set A, η_A ≥ 0, the others satisfied. A starts from Clarabel's η
    and is corrected (drop a negative η, add a violated row) a few times. None: no such point found."""
    eta = np.where(eta0 > 1e-8 * max(1.0, float(eta0.max(initial=0))), eta0, 0.0)
    active = eta > 0
    for _ in range(2 * len(rhs) + 2):
        eta = _newton(b, beta, lower, upper, rows, rhs, eta, active)
        if eta is None:
            return None
        w = _box_softmax(b + rows.T @ eta / beta, lower, upper)[0]
        if (eta[active] < 0).any():
            worst = int(np.argmin(np.where(active, eta, np.inf)))
            active[worst], eta[worst] = False, 0.0
            continue
        slack = rows @ w - rhs
        violated = ~active & (slack < -TASK_TOL)
        if violated.any():
            active[int(np.argmin(np.where(violated, slack, np.inf)))] = True
            continue
        return w, eta
    return None


def _newton(b, beta, lower, upper, rows, rhs, eta, active):
    """Solve rows_A·w(η) = rhs_A for η_A by Newton's method with backtracking. Jacobian on the free groups F:
    ∂w_F/∂η = (diag(w_F) − w_F·w_Fᵀ/Σw_F)·rows_F,ᵀ / β."""
    idx = np.flatnonzero(active)
    eta = eta.copy()
    if idx.size == 0:
        return eta

    def residual(e):
        w, _, free = _box_softmax(b + rows.T @ e / beta, lower, upper)
        return rows[idx] @ w - rhs[idx], w, free

    r, w, free = residual(eta)
    for _ in range(60):
        if np.abs(r).max() <= 1e-12:
            return eta
        zf, wf = rows[idx][:, free], w[free]
        if wf.sum() <= 0:
            return None
        zw = zf @ wf
        jac = ((zf * wf) @ zf.T - np.outer(zw, zw) / wf.sum()) / beta
        step = np.linalg.lstsq(jac, -r, rcond=None)[0]
        t = 1.0
        while t > 1e-8:
            trial = eta.copy()
            trial[idx] += t * step
            r2, w2, free2 = residual(trial)
            if np.linalg.norm(r2) < np.linalg.norm(r):
                break
            t /= 2
        else:
            return None
        eta, r, w, free = trial, r2, w2, free2
    return eta if np.abs(r).max() <= 1e-10 else None
