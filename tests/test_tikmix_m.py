"""TiKMiX-M: capped Dirichlet candidates, LightGBM regressors with their held-out Spearman, and the
top-k search, on synthetic loss surfaces whose optimum is known."""

from __future__ import annotations

import numpy as np
import pytest

from automixer_ops.errors import AutomixerError
from automixer_ops.tikmix.solve_m import (SolveMSettings, cap_mixture, candidate_mixtures, fit_regressors,
                                          gi_feature, search)

NATURAL = np.array([0.4, 0.3, 0.2, 0.1])
CAPS = np.array([0.5, 0.6, 0.35, 0.3])
GROUPS = ["web", "code", "math", "books"]


def test_capping_keeps_the_proportions_of_the_groups_it_does_not_cap():
    w = np.array([0.7, 0.1, 0.1, 0.1])
    out = cap_mixture(w, CAPS)[0]
    assert out.sum() == pytest.approx(1) and (out <= CAPS + 1e-12).all()
    assert out[0] == pytest.approx(0.5)
    assert out[1:] / out[1:].sum() == pytest.approx(w[1:] / w[1:].sum())
    # A cascade: scaling the free groups up pushes another over its cap, which is then capped too.
    out = cap_mixture(np.array([0.6, 0.05, 0.33, 0.02]), CAPS)[0]
    assert out[0] == pytest.approx(0.5) and out[2] == pytest.approx(0.35)
    assert out[1] / out[3] == pytest.approx(0.05 / 0.02) and out.sum() == pytest.approx(1)
    assert cap_mixture(NATURAL, CAPS)[0] == pytest.approx(NATURAL)  # nothing to cap: unchanged


def test_caps_that_cannot_hold_a_mixture_are_refused():
    with pytest.raises(AutomixerError, match=r"caps sum to 0.9 < 1"):
        cap_mixture(NATURAL, np.array([0.3, 0.3, 0.2, 0.1]))
    with pytest.raises(AutomixerError, match="bind every group"):
        cap_mixture(np.array([0.5, 0.5, 0.0, 0.0]), np.array([0.4, 0.4, 0.5, 0.5]))


def test_candidates_are_seeded_capped_mixtures_around_the_natural_shares():
    a = candidate_mixtures(NATURAL, CAPS, 5000, 20.0, np.random.default_rng(3))
    b = candidate_mixtures(NATURAL, CAPS, 5000, 20.0, np.random.default_rng(3))
    assert np.array_equal(a, b)
    assert np.allclose(a.sum(axis=1), 1) and (a <= CAPS + 1e-12).all() and (a >= 0).all()
    assert np.abs(a.mean(axis=0) - NATURAL).max() < 0.03
    wide = candidate_mixtures(NATURAL, CAPS, 5000, 2.0, np.random.default_rng(3))
    assert wide.std(axis=0).mean() > 1.5 * a.std(axis=0).mean()  # concentration sets the spread
    dead = candidate_mixtures(np.array([0.5, 0.5, 0.0, 0.0]), np.ones(4), 10, 20.0, np.random.default_rng(0))
    assert (dead[:, 2:] == 0).all()  # a group with no tokens is never drawn


def _measured(weights, target, rng, noise=0.002):
    """Two tasks: a bowl with its minimum at `target` (non-linear), and a linear one GI explains."""
    bowl = ((weights - target) ** 2).sum(axis=1)
    linear = -weights @ np.array([0.1, -0.05, 0.2, 0.0])
    return np.column_stack([bowl, linear]) + noise * rng.standard_normal((len(weights), 2))


def test_regressors_rank_held_out_mixtures_and_the_search_finds_the_known_optimum():
    rng = np.random.default_rng(0)
    settings = SolveMSettings(n_candidates=32, n_search=20_000, top_k=128, concentration=10.0)
    k = candidate_mixtures(NATURAL, CAPS, settings.n_candidates, settings.concentration, rng)
    target = np.array([0.25, 0.45, 0.2, 0.1])
    changes = _measured(k, target, rng)
    gi = np.array([[0.0, 0.0, 0.0, 0.0], [0.1, -0.05, 0.2, 0.0]])  # GI of the linear task is its exact slope
    fitted = fit_regressors(k, changes, ["bowl", "lin"], settings, gi=gi)
    assert fitted.heldout_spearman["lin"] > 0.9  # the GI feature carries it
    assert fitted.heldout_spearman["bowl"] > 0.3  # the trees learn the bowl from 32 points, roughly
    only_bowl = search(fitted, GROUPS, NATURAL, CAPS, {"bowl": 1.0, "lin": 0.0}, settings)
    w = np.array([only_bowl.weights[g] for g in GROUPS])
    assert w.sum() == pytest.approx(1) and (w <= CAPS + 1e-9).all()
    assert np.abs(w - target).sum() < 0.5 * np.abs(NATURAL - target).sum()  # moved towards the optimum
    only_lin = search(fitted, GROUPS, NATURAL, CAPS, {"bowl": 0.0, "lin": 1.0}, settings)
    w = np.array([only_lin.weights[g] for g in GROUPS])
    assert w[2] > NATURAL[2] and w[1] < NATURAL[1]  # more of the helpful group, less of the harmful one
    assert only_lin.predicted_change["lin"] < changes[:, 1].mean()
    again = search(fitted, GROUPS, NATURAL, CAPS, {"bowl": 0.0, "lin": 1.0}, settings)
    assert again.weights == only_lin.weights  # seeded
    assert set(only_lin.to_json()) >= {"weights", "heldout_spearman", "predicted_change", "settings"}


def test_the_gi_feature_is_the_first_order_change():
    w = np.array([[0.5, 0.5, 0.0, 0.0]])
    gi = np.array([[1.0, 3.0, 0.0, 0.0]])
    assert gi_feature(w, gi)[0, 0] == pytest.approx(-2.0)  # more helpful groups: the loss falls


@pytest.mark.parametrize("field,value,msg", [("n_candidates", 2, "n_candidates: must be >= 3"),
                                             ("top_k", 0, "top_k: must be in"), ("concentration", 0, "concentration"),
                                             ("min_data_in_leaf", 0, "min_data_in_leaf")])
def test_settings_name_the_bad_field(field, value, msg):
    with pytest.raises(AutomixerError, match=msg):
        SolveMSettings(**{field: value})


def test_bad_measurements_are_refused():
    k = candidate_mixtures(NATURAL, CAPS, 8, 20.0, np.random.default_rng(0))
    s = SolveMSettings(n_candidates=8, use_gi_feature=False)
    with pytest.raises(AutomixerError, match="NaN or infinite"):
        fit_regressors(k, np.full((8, 1), np.nan), ["t"], s)
    with pytest.raises(AutomixerError, match=r"for 8 mixtures x 2 tasks"):
        fit_regressors(k, np.zeros((8, 1)), ["t", "u"], s)
    with pytest.raises(AutomixerError, match="needs the Group Influence"):
        fit_regressors(k, np.zeros((8, 1)), ["t"], SolveMSettings(n_candidates=8))
