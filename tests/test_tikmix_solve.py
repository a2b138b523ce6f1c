"""TiKMiX-D (automixer_ops/tikmix): Clarabel against the closed form and the box-clipped bisection, the KKT
conditions, floors, caps and the per-task guarantee, the limits in τ and κ, and every infeasible setting."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from automixer_ops.errors import AutomixerError
from automixer_ops.tikmix import SolveDSettings, box_clipped, closed_form, solve_d
from automixer_ops.tikmix.solve_d import _checked_problem, _solve_clarabel

GROUPS3 = ["g0", "g1", "g2"]


def names(n, prefix="g"):
    return [f"{prefix}{i}" for i in range(n)]


def zscores(gi):
    """Independent of normalize.py: each row's (GI - mean) / population std."""
    gi = np.asarray(gi, dtype=float)
    return (gi - gi.mean(axis=1, keepdims=True)) / gi.std(axis=1, keepdims=True)


def vec(mapping, keys):
    return np.array([mapping[k] for k in keys])


def random_instance(rng, n_groups=None):
    n_groups = n_groups or int(rng.integers(2, 12))
    n_tasks = int(rng.integers(1, 4))
    # Raw utilities are tiny and differ in scale per task; the normalisation must not care.
    gi = rng.normal(size=(n_tasks, n_groups)) * 10.0 ** rng.uniform(-7, -2, size=(n_tasks, 1))
    weights = rng.uniform(0.2, 1, n_tasks)
    p = rng.dirichlet(np.ones(n_groups))
    tau, kappa = rng.uniform(0.05, 2, 2)
    return gi, weights, p, float(tau), float(kappa)


def kkt_gaps(w, g_hat, p, tau, kappa, lower, upper, extra=0.0):
    """Stationarity of F + Σ η_t z_t·w on the box: one λ for the free groups, grad ≥ λ at a cap, ≤ λ at a
    floor. Returns (spread of grad over free groups, worst violation at the bounds)."""
    grad = g_hat - tau * (np.log(w) + 1) - kappa * (np.log(w / p) + 1) + extra
    at_upper, at_lower = w >= upper - 1e-12, w <= lower + 1e-12
    free = ~at_upper & ~at_lower
    lam = grad[free].mean()
    spread = np.ptp(grad[free]) if free.sum() > 1 else 0.0
    bound = max([0.0, *(lam - grad[at_upper]), *(grad[at_lower] - lam)])
    return spread, bound


# ---------------------------------------------------------------- the closed form is the oracle

def test_clarabel_equals_closed_form_when_no_bound_binds():
    rng = np.random.default_rng(7)
    for _ in range(12):
        gi, a, p, tau, kappa = random_instance(rng)
        groups, tasks = names(gi.shape[1]), names(gi.shape[0], "t")
        settings = SolveDSettings(tau=tau, kappa=kappa, repetition_factor=None,
                                  task_weights=dict(zip(tasks, a.tolist())))
        result = solve_d(groups, tasks, gi, np.full(gi.shape[1], 1e6), 1e7, settings, dict(zip(groups, p)))
        g_hat = (a / a.sum()) @ zscores(gi)
        np.testing.assert_allclose(vec(result.g_hat, groups), g_hat, atol=1e-12)
        # The oracle by hand: w ∝ p^(κ/β) exp(Ĝ/β).
        oracle = p ** (kappa / (tau + kappa)) * np.exp(g_hat / (tau + kappa))
        oracle /= oracle.sum()
        np.testing.assert_allclose(closed_form(g_hat, p, tau, kappa), oracle, atol=1e-14)
        np.testing.assert_allclose(vec(result.weights, groups), oracle, atol=1e-6)
        assert (result.status, result.exact, result.at_cap, result.at_floor) == ("optimal", True, (), ())
        assert result.objective >= result.influence_term - kappa * result.kl_to_prev - 1e-12


def test_raw_clarabel_answer_is_close_before_polishing():
    # The cone model itself is right: the polish only refines (DESIGN: the oracle is not used to polish).
    rng = np.random.default_rng(3)
    for _ in range(5):
        gi, _, p, tau, kappa = random_instance(rng)
        groups, tasks = names(gi.shape[1]), names(gi.shape[0], "t")
        settings = SolveDSettings(tau=tau, kappa=kappa, repetition_factor=None)
        prob = _checked_problem(groups, tasks, gi, np.ones(len(groups)), 1.0, dict(zip(groups, p)))
        g_hat = zscores(gi).mean(axis=0)
        lower, upper = np.zeros(len(groups)), np.ones(len(groups))
        w, _, status, exact, shift = _solve_clarabel(prob, settings, g_hat, np.zeros((0, len(groups))), [],
                                                     lower, upper, polish=False)
        assert (status, exact, shift) == ("optimal", False, None)
        np.testing.assert_allclose(w, closed_form(g_hat, p, tau, kappa), atol=1e-4)
        assert w.sum() == pytest.approx(1, abs=1e-12)


def test_bisection_equals_clarabel_when_floors_and_caps_bind():
    rng = np.random.default_rng(11)
    seen_cap = seen_floor = 0
    for _ in range(12):
        n = int(rng.integers(4, 12))
        gi, _, p, tau, kappa = random_instance(rng, n)
        groups, tasks = names(n), names(gi.shape[0], "t")
        tokens = rng.uniform(1, 10, n) * 1e5
        stage = float(tokens.sum() * rng.uniform(0.5, 1.5))  # caps 2·tokens/stage: some bind
        floor = float(rng.uniform(0, min(0.5 / n, 2.0 * tokens.min() / stage)))
        results = [solve_d(groups, tasks, gi, tokens, stage,
                           SolveDSettings(tau=tau, kappa=kappa, floor=floor, repetition_factor=2.0, solver=s),
                           dict(zip(groups, p)))
                   for s in ("clarabel", "analytic")]
        w, w_analytic = (vec(r.weights, groups) for r in results)
        np.testing.assert_allclose(w, w_analytic, atol=1e-6)
        caps = np.minimum(1, 2.0 * tokens / stage)
        assert vec(results[0].caps, groups) == pytest.approx(caps)
        assert (w >= floor - 1e-12).all() and (w <= caps + 1e-12).all()
        assert w.sum() == pytest.approx(1, abs=1e-12)
        assert results[0].at_cap == results[1].at_cap
        assert set(results[0].at_cap) == {g for g, x, c in zip(groups, w, caps) if x >= c - 1e-7}
        seen_cap += bool(results[0].at_cap)
        seen_floor += bool(results[0].at_floor)
        spread, bound = kkt_gaps(w, vec(results[0].g_hat, groups), p, tau, kappa, np.full(n, floor), caps)
        assert spread < 1e-9 and bound < 1e-9
    assert seen_cap >= 4 and seen_floor >= 2  # the instances did exercise both bounds


def test_box_clipped_hand_example():
    # Ĝ = 0, τ = 1, κ = 0: uniform 1/4 each, but the cap 0.1 on g0 moves 0.15 to the other three equally.
    w = box_clipped(np.zeros(4), np.full(4, 0.25), 1.0, 0.0, 0.0, [0.1, 1, 1, 1])
    np.testing.assert_allclose(w, [0.1, 0.3, 0.3, 0.3], atol=1e-15)
    # A floor lifts a group the closed form would starve: the others keep their ratio e^(2-1).
    w = box_clipped(np.array([2.0, 1.0, -30.0]), np.full(3, 1 / 3), 1.0, 0.0, 0.2, 1.0)
    assert w[2] == pytest.approx(0.2) and w[0] / w[1] == pytest.approx(np.e) and w.sum() == pytest.approx(1)


# ---------------------------------------------------------------- the per-task guarantee

def crafted_two_tasks(keep: bool, solver="clarabel"):
    # Task "a" (weight 0.9) prefers g0, task "b" prefers g2. Without the guarantee the mixture moves to g0
    # and b's influence drops below its value under w_prev (uniform).
    gi = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]]) * 1e-5
    settings = SolveDSettings(tau=0.2, kappa=0.2, repetition_factor=None, task_weights={"a": 0.9, "b": 0.1},
                              keep_task_influence=keep, solver=solver)
    return solve_d(GROUPS3, ["a", "b"], gi, [1e6] * 3, 1e6, settings, dict(zip(GROUPS3, [1 / 3] * 3))), gi


def test_task_constraint_holds_and_changes_the_answer():
    free, _ = crafted_two_tasks(keep=False)
    kept, gi = crafted_two_tasks(keep=True)
    assert free.task_influence["b"] < free.task_influence_prev["b"] - 1e-6  # the case needs the constraint
    assert kept.task_influence["b"] == pytest.approx(kept.task_influence_prev["b"], rel=1e-9)
    assert kept.task_influence["a"] >= kept.task_influence_prev["a"]
    assert kept.binding_tasks == ("b",) and kept.task_multipliers["b"] > 0 and kept.task_multipliers["a"] == 0
    w_free, w_kept = vec(free.weights, GROUPS3), vec(kept.weights, GROUPS3)
    assert np.abs(w_free - w_kept).max() > 0.05
    assert kept.exact and kept.objective < free.objective
    # KKT with the multiplier: grad F + η_b·z_b is the same on every group (none is at a bound).
    z = zscores(gi)
    spread, _ = kkt_gaps(w_kept, vec(kept.g_hat, GROUPS3), np.full(3, 1 / 3), 0.2, 0.2, np.zeros(3), np.ones(3),
                         extra=kept.task_multipliers["b"] * z[1])
    assert spread < 1e-9
    # And it is the best mixture that keeps b: nudging along the constraint's boundary only lowers F.
    assert np.isclose(w_kept @ z[1], np.full(3, 1 / 3) @ z[1])


def test_task_constraint_that_does_not_bind_changes_nothing():
    gi = np.array([[3.0, 1.0, 0.0], [2.0, 1.0, 0.5]])
    base = dict(tau=0.5, kappa=0.5, repetition_factor=None)
    off = solve_d(GROUPS3, ["a", "b"], gi, [1] * 3, 1, SolveDSettings(**base))
    on = solve_d(GROUPS3, ["a", "b"], gi, [1] * 3, 1, SolveDSettings(**base, keep_task_influence=True))
    np.testing.assert_allclose(vec(on.weights, GROUPS3), vec(off.weights, GROUPS3), atol=1e-12)
    assert on.binding_tasks == () and on.task_multipliers == {"a": 0.0, "b": 0.0}


def test_analytic_solver_refuses_task_constraints():
    with pytest.raises(AutomixerError, match=r"tikmix.d.solver: 'analytic' handles floors and caps only"):
        crafted_two_tasks(keep=True, solver="analytic")


# ---------------------------------------------------------------- limits in τ and κ

def test_large_kappa_returns_the_previous_mixture():
    rng = np.random.default_rng(5)
    gi, _, p, _, _ = random_instance(rng, 6)
    groups, tasks = names(6), names(gi.shape[0], "t")
    for solver in ("clarabel", "analytic"):
        r = solve_d(groups, tasks, gi, [1] * 6, 1, SolveDSettings(tau=0.1, kappa=1e6, repetition_factor=None,
                                                                   solver=solver), dict(zip(groups, p)))
        np.testing.assert_allclose(vec(r.weights, groups), p, atol=1e-5)


def test_large_tau_returns_uniform_among_uncapped_groups():
    gi = np.array([[5.0, 4.0, 3.0, 2.0, 1.0]])
    tokens = [1e6, 5e4, 1e6, 1e6, 1e6]  # repetition 2 x 5e4 / 2e6: g1 capped at 0.05
    for solver in ("clarabel", "analytic"):
        r = solve_d(names(5), ["t"], gi, tokens, 2e6, SolveDSettings(tau=1e6, kappa=0.0, repetition_factor=2.0,
                                                                      solver=solver))
        np.testing.assert_allclose(vec(r.weights, names(5)), [0.2375, 0.05, 0.2375, 0.2375, 0.2375], atol=1e-5)
        assert r.at_cap == ("g1",)


def test_tau_kappa_zero_is_a_linear_program_for_clarabel_only():
    # The LP's vertex: the floors, then the most helpful groups filled to their caps in Ĝ order.
    gi = np.array([[4.0, 3.0, 2.0, 1.0]])
    settings = SolveDSettings(tau=0.0, kappa=0.0, floor=0.05, repetition_factor=1.0)
    r = solve_d(names(4), ["t"], gi, [3e5, 4e5, 1e6, 1e6], 1e6, settings)
    np.testing.assert_allclose(vec(r.weights, names(4)), [0.3, 0.4, 0.25, 0.05], atol=1e-6)
    assert r.exact is False and set(r.at_cap) == {"g0", "g1"} and r.at_floor == ("g3",)
    with pytest.raises(AutomixerError, match=r"'analytic' needs tau \+ kappa > 0"):
        SolveDSettings(tau=0.0, kappa=0.0, solver="analytic")


# ---------------------------------------------------------------- numerics

def test_no_overflow_with_a_tiny_temperature_or_tiny_prior():
    # Ĝ/β ~ 1e8 would overflow exp without log-sum-exp; p ~ 1e-300 gives log p ~ -690.
    g_hat = np.array([1.5, -1.0, 0.5])
    p = np.array([1e-300, 0.5, 0.5 - 1e-300])
    w = closed_form(g_hat, p, 1e-8, 0.0)
    np.testing.assert_allclose(w, [1, 0, 0], atol=1e-12)
    assert np.isfinite(closed_form(g_hat, p, 1e-3, 1.0)).all()
    r = solve_d(GROUPS3, ["t"], [[1.5, -1.0, 0.5]], [1, 1, 1], 1.0,
                SolveDSettings(tau=1e-8, kappa=0.0, repetition_factor=None, solver="analytic"))
    assert r.weights["g0"] == pytest.approx(1.0)


def test_zero_token_group_gets_nothing_and_stays_out_of_the_normalisation():
    gi = np.array([[1.0, 2.0, np.nan, 3.0]])  # no documents in g2: no GI
    r = solve_d(names(4), ["t"], gi, [1e6, 1e6, 0, 1e6], 1e6, SolveDSettings())
    assert r.weights["g2"] == 0 and r.caps["g2"] == 0 and "no available tokens" in r.excluded["g2"]
    np.testing.assert_allclose(vec(r.g_hat, ["g0", "g1", "g3"]), zscores([[1.0, 2.0, 3.0]])[0], atol=1e-12)
    assert r.at_cap == () and sum(r.weights.values()) == pytest.approx(1)
    with pytest.raises(AutomixerError, match=r"floor 0.01 > cap 0 of group 'g2' \(the group has 0 available tokens"):
        solve_d(names(4), ["t"], gi, [1e6, 1e6, 0, 1e6], 1e6, SolveDSettings(floor=0.01))


def test_group_absent_from_w_prev():
    gi = [[1.0, 2.0, 3.0]]
    prev = {"g0": 0.5, "g1": 0.5}  # g2 is new this stage
    held = solve_d(GROUPS3, ["t"], gi, [1] * 3, 1, SolveDSettings(repetition_factor=None), prev)
    assert held.weights["g2"] == 0 and "absent from w_prev" in held.excluded["g2"]
    assert held.kl_to_prev is not None and held.w_prev["g2"] == 0 and held.caps["g2"] is None  # not a token cap
    free = solve_d(GROUPS3, ["t"], gi, [1] * 3, 1, SolveDSettings(kappa=0.0, repetition_factor=None), prev)
    assert free.weights["g2"] > free.weights["g1"] and free.kl_to_prev is None and free.excluded == {}
    with pytest.raises(AutomixerError, match=r"group 'g2' \(the group is absent from w_prev and kappa 0.5 > 0"):
        solve_d(GROUPS3, ["t"], gi, [1] * 3, 1, SolveDSettings(floor=0.1), prev)


def test_normalisation_ignores_each_task_scale_and_offset():
    rng = np.random.default_rng(2)
    gi = rng.normal(size=(2, 5))
    moved = gi * np.array([[1e-6], [3e4]]) + np.array([[5.0], [-2.0]])
    a = solve_d(names(5), ["x", "y"], gi, [1] * 5, 1, SolveDSettings(repetition_factor=None, solver="analytic"))
    b = solve_d(names(5), ["x", "y"], moved, [1] * 5, 1, SolveDSettings(repetition_factor=None, solver="analytic"))
    np.testing.assert_allclose(vec(a.weights, names(5)), vec(b.weights, names(5)), atol=1e-12)
    # A constant row carries no preference; a task of weight 0 none either.
    flat = solve_d(GROUPS3, ["x", "y"], [[2.0, 2.0, 2.0], [1.0, 0.0, 0.0]], [1] * 3, 1,
                   SolveDSettings(task_weights={"x": 1.0, "y": 0.0}, repetition_factor=None))
    assert flat.g_hat == {"g0": 0.0, "g1": 0.0, "g2": 0.0}


# ---------------------------------------------------------------- infeasible settings, one line each

def test_caps_that_cannot_sum_to_one():
    # 2 x (500,000 + 1,050,000) / 5,000,000 = 0.62
    with pytest.raises(AutomixerError) as e:
        solve_d(["a", "b"], ["t"], [[1.0, 2.0]], [500_000, 1_050_000], 5_000_000,
                SolveDSettings(repetition_factor=2.0))
    assert str(e.value) == ("caps sum to 0.62 < 1: repetition_factor 2 x available tokens 1,550,000 / stage tokens "
                            "5,000,000 (lower stage tokens to at most 3,100,000 or raise repetition_factor to at "
                            "least 3.22581)")


def test_floors_that_sum_above_one():
    with pytest.raises(AutomixerError, match=r"^floors sum to 1.2 > 1: floor 0.4 x 3 groups \(at most 0.333333"):
        solve_d(GROUPS3, ["t"], [[1.0, 2.0, 3.0]], [1] * 3, 1, SolveDSettings(floor=0.4, repetition_factor=None))


def test_floor_above_a_cap():
    with pytest.raises(AutomixerError) as e:
        solve_d(GROUPS3, ["t"], [[1.0, 2.0, 3.0]], [1e6, 1e6, 1e4], 1e6, SolveDSettings(floor=0.05))
    assert str(e.value).startswith("floor 0.05 > cap 0.04 of group 'g2' (repetition_factor 4 x 10,000 available "
                                   "tokens / stage tokens 1,000,000")


def test_task_that_cannot_keep_its_influence_alone():
    # w_prev is all on g0, the task's best group; floor 0.2 on the other two caps it at 0.6 (kappa 0: with
    # kappa > 0, groups absent from w_prev would be held at 0 and the floor would fail first).
    with pytest.raises(AutomixerError) as e:
        solve_d(GROUPS3, ["t"], [[1.0, 0.0, 0.0]], [1] * 3, 1,
                SolveDSettings(floor=0.2, kappa=0.0, repetition_factor=None, keep_task_influence=True),
                {"g0": 1.0})
    assert str(e.value).startswith("keep_task_influence: task 't' cannot keep its influence under w_prev (1) "
                                   "within the floors and caps: at most 0.6")


def test_tasks_that_cannot_keep_their_influence_together():
    # Each alone can reach 0.5 (at most 0.6), but both need w0 + w1 >= 1 while the floor keeps g2 at 0.2.
    gi = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    with pytest.raises(AutomixerError, match=r"^keep_task_influence: no mixture within the floors and caps keeps "
                                             r"every task .* \(tasks a, b; each alone can\)"):
        solve_d(GROUPS3, ["a", "b"], gi, [1] * 3, 1,
                SolveDSettings(floor=0.2, kappa=0.0, repetition_factor=None, keep_task_influence=True),
                {"g0": 0.5, "g1": 0.5})


# ---------------------------------------------------------------- settings and inputs

@pytest.mark.parametrize("kwargs, message", [
    ({"tau": -0.1}, r"tikmix.d.tau: must be >= 0, got -0.1"),
    ({"kappa": float("nan")}, r"tikmix.d.kappa: must be a finite number, got nan"),
    ({"tau": True}, r"tikmix.d.tau: must be a finite number, got True"),
    ({"floor": 1.0}, r"tikmix.d.floor: must be < 1"),
    ({"repetition_factor": 0}, r"tikmix.d.repetition_factor: must be > 0 or null"),
    ({"repetition_factor": float("inf")}, r"tikmix.d.repetition_factor: must be a finite number"),
    ({"task_weights": {"a": -1.0}}, r"tikmix.d.task_weights\['a'\]: must be >= 0"),
    ({"task_weights": {"a": 0.0}}, r"tikmix.d.task_weights: at least one weight must be > 0"),
    ({"task_weights": {}}, r"tikmix.d.task_weights: expected a non-empty mapping"),
    ({"keep_task_influence": 1}, r"tikmix.d.keep_task_influence: expected true or false"),
    ({"solver": "scs"}, r"tikmix.d.solver: 'scs' is not one of clarabel, analytic"),
])
def test_settings_validation_names_the_field(kwargs, message):
    with pytest.raises(AutomixerError, match=message):
        SolveDSettings(**kwargs)


@pytest.mark.parametrize("call, message", [
    (dict(gi=[[1.0, 2.0]]), r"gi: expected shape \(tasks, groups\) = \(1, 3\), got \(1, 2\)"),
    (dict(gi=[[1.0, np.nan, 2.0]]), r"gi: task 't', group 'g1' is nan"),
    (dict(tokens=[1, -1, 1]), r"tokens_available: must be finite and >= 0; group 'g1' has -1"),
    (dict(tokens={"g0": 1, "g1": 1}), r"tokens_available: missing groups \['g2'\]"),
    (dict(stage=0), r"stage_tokens: must be a finite number > 0"),
    (dict(prev={"g0": 0.5, "gx": 0.5}), r"w_prev: unknown groups \['gx'\]"),
    (dict(prev={"g0": 0.5, "g1": 0.4}), r"w_prev: weights sum to 0.9, expected 1"),
    (dict(settings=SolveDSettings(task_weights={"x": 1.0})), r"task_weights: missing tasks \['t'\], unknown "
                                                             r"tasks \['x'\]"),
])
def test_input_validation_names_the_input(call, message):
    with pytest.raises(AutomixerError, match=message):
        solve_d(GROUPS3, ["t"], call.get("gi", [[1.0, 2.0, 3.0]]), call.get("tokens", [1, 1, 1]),
                call.get("stage", 1), call.get("settings", SolveDSettings(repetition_factor=None)), call.get("prev"))


def test_result_is_frozen_and_round_trips_through_json(tmp_path):
    result, _ = crafted_two_tasks(keep=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.objective = 0.0
    path = tmp_path / "stage" / "tikmix_d.json"
    result.write_json(path)
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(result.to_dict()))
    assert loaded["settings"]["keep_task_influence"] is True and loaded["binding_tasks"] == ["b"]
    assert sum(loaded["weights"].values()) == pytest.approx(1, abs=1e-12)
    assert [p.name for p in path.parent.iterdir()] == ["tikmix_d.json"]  # no temporary file left behind
