"""TiKMiX-M: a regression of the validation losses on the mixture, then a search over mixtures.

RegMix's recipe (Liu et al. 2024) applied at one checkpoint of a training run:

1. `candidate_mixtures`: K mixtures drawn from a Dirichlet centred on the corpus' natural token
   shares (`concentration` x natural), each made to respect the per-group caps;
2. the caller trains the checkpoint briefly on each and measures every task's change of
   validation loss (negative: the loss went down);
3. `fit_regressors`: per task a LightGBM regressor of that change on the K mixtures' weights,
   plus one feature that carries Group Influence, the first-order prediction of the change
   -sum_g w_g GI_tg (GI: higher = more helpful, DESIGN's sign), so that a few dozen trainings
   suffice for what the trees cannot learn from so few points; its held-out Spearman
   correlation (leave-one-out over the K mixtures) is recorded;
4. `search`: draw `n_search` more candidates from the same prior, predict, and average the
   `top_k` with the lowest predicted combined change. An average of capped points on the
   simplex is itself capped and on the simplex (both sets are convex).

The tasks are combined as in TiKMiX-D: each task's predicted change divided by the spread
(standard deviation) of its measured changes, weighted by the task weights. These are our
definitions: the paper releases no code and does not give them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping, Sequence

import numpy as np

from automixer_ops.config_fields import setting
from automixer_ops.errors import AutomixerError, ConfigError


@dataclass(frozen=True, kw_only=True)
class SolveMSettings:
    """TiKMiX-M's knobs; the `n_candidates` probe trainings at each re-solve are the expensive part."""

    n_candidates: int = setting(16, "K candidate mixtures, each probed by a short training (RegMix trains hundreds "
                                    "of small models; 16-32 fit a CPU).")
    concentration: float = setting(20.0, "Candidates ~ Dirichlet(concentration x natural shares), capped; larger "
                                         "stays closer to the natural mixture.")
    probe_steps: int = setting(8, "Optimizer steps of each probe training (continued from the checkpoint).")
    probe_lr: float | None = setting(None, "Learning rate of the probes (constant, AdamW); null: the training's "
                                           "final learning rate (lr x min_lr_ratio).")
    probe_batch_size: int | None = setting(None, "Sequences per probe step; null: the training's batch_size.")
    n_search: int = setting(100_000, "Capped candidates scored by the regressors.")
    top_k: int = setting(128, "The answer averages the top_k candidates with the best predicted loss change.")
    num_boost_round: int = setting(200, "LightGBM boosting rounds per task.")
    learning_rate: float = setting(0.05, "LightGBM learning rate.")
    num_leaves: int = setting(4, "LightGBM leaves per tree.")
    min_data_in_leaf: int = setting(2, "LightGBM min_data_in_leaf (its default of 20 never splits 16 points).")
    use_gi_feature: bool = setting(True, "Give each task's regressor the GI-predicted change -sum_g w_g GI_tg.")

    def __post_init__(self):
        self.check("tikmix.m")

    def check(self, where: str) -> None:
        checks = [("n_candidates", self.n_candidates >= 3, "must be >= 3 (leave-one-out needs a few points)"),
                  ("concentration", self.concentration > 0, "must be > 0"),
                  ("probe_steps", self.probe_steps >= 1, "must be >= 1"),
                  ("probe_lr", self.probe_lr is None or self.probe_lr > 0, "must be > 0 or null"),
                  ("probe_batch_size", self.probe_batch_size is None or self.probe_batch_size >= 1,
                   "must be >= 1 or null"),
                  ("n_search", self.n_search >= 1, "must be >= 1"),
                  ("top_k", 1 <= self.top_k <= self.n_search, "must be in [1, n_search]"),
                  ("num_boost_round", self.num_boost_round >= 1, "must be >= 1"),
                  ("learning_rate", self.learning_rate > 0, "must be > 0"),
                  ("num_leaves", self.num_leaves >= 2, "must be >= 2"),
                  ("min_data_in_leaf", self.min_data_in_leaf >= 1, "must be >= 1")]
        for name, ok, rule in checks:
            if not ok:
                raise ConfigError(f"{where}.{name}: {rule}, got {getattr(self, name)!r}")


def cap_mixture(w: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """The mixture closest in proportion to `w` with w_g <= caps_g: capped groups at their cap, the
    rest scaled up together (water-filling). Rows of a 2-D array are capped independently."""
    w = np.array(w, dtype=np.float64, ndmin=2)
    caps = np.asarray(caps, dtype=np.float64)
    if caps.sum() < 1 - 1e-12:
        raise AutomixerError(f"tikmix caps sum to {caps.sum():.4g} < 1: no mixture fits them; raise "
                             "repetition_factor or lower the stage's tokens")
    out = w / w.sum(axis=1, keepdims=True)
    for _ in range(len(caps) + 1):  # each round caps at least one more group, or stops
        over = out > caps + 1e-15
        if not over.any():
            break
        fixed = over | np.isclose(out, caps, rtol=0, atol=1e-15)
        room = 1 - np.where(fixed, caps, 0).sum(axis=1, keepdims=True)
        free = np.where(fixed, 0, out)
        scale = np.divide(room, free.sum(axis=1, keepdims=True), out=np.zeros_like(room),
                          where=free.sum(axis=1, keepdims=True) > 0)
        out = np.where(fixed, caps, free * scale)
    if not np.allclose(out.sum(axis=1), 1, rtol=0, atol=1e-9):
        raise AutomixerError("tikmix: the caps bind every group the mixture draws from; no capped mixture "
                             "keeps its proportions (raise repetition_factor)")
    return out


def candidate_mixtures(natural: np.ndarray, caps: np.ndarray, n: int, concentration: float,
                       rng: np.random.Generator) -> np.ndarray:
    """n mixtures (rows) from Dirichlet(concentration * natural), capped. Groups with no tokens stay at 0."""
    natural = np.asarray(natural, dtype=np.float64)
    alive = natural > 0
    draws = np.zeros((n, len(natural)))
    draws[:, alive] = rng.dirichlet(concentration * natural[alive] / natural[alive].sum(), size=n)
    # A small alpha gives exact zeros in float64; a zero never scales up, so capping could find no room.
    draws[:, alive] = np.maximum(draws[:, alive], 1e-12)
    return cap_mixture(draws, caps)


def gi_feature(weights: np.ndarray, gi: np.ndarray) -> np.ndarray:
    """(n, tasks): -sum_g w_g GI_tg, the first-order change of each task's loss (GI: higher = more helpful)."""
    return -np.asarray(weights) @ np.asarray(gi).T


@dataclass
class Regressors:
    """One LightGBM booster per task, and what is needed to use and judge them."""

    tasks: list[str]
    boosters: list
    scale: np.ndarray                       # per task: std of its measured changes (combines the tasks)
    gi: np.ndarray | None                   # (tasks, groups) when the GI feature is used
    heldout_spearman: dict[str, float] = field(default_factory=dict)

    def features(self, weights: np.ndarray) -> list[np.ndarray]:
        weights = np.asarray(weights, dtype=np.float64)
        if self.gi is None:
            return [weights] * len(self.tasks)
        extra = gi_feature(weights, self.gi)
        return [np.column_stack([weights, extra[:, t]]) for t in range(len(self.tasks))]

    def predict(self, weights: np.ndarray) -> np.ndarray:
        """(n, tasks): the predicted change of each task's validation loss."""
        return np.column_stack([b.predict(x) for b, x in zip(self.boosters, self.features(weights))])


def _train(x: np.ndarray, y: np.ndarray, s: SolveMSettings, seed: int):
    import lightgbm as lgb

    params = {"objective": "regression", "learning_rate": s.learning_rate, "num_leaves": s.num_leaves,
              "min_data_in_leaf": s.min_data_in_leaf, "min_data_in_bin": 1, "seed": seed,
              "deterministic": True, "num_threads": 1, "verbosity": -1}
    return lgb.train(params, lgb.Dataset(x, y, params={"min_data_in_bin": 1}), num_boost_round=s.num_boost_round)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")  # a constant prediction ranks nothing
    return float(spearmanr(a, b).statistic)


def fit_regressors(weights: np.ndarray, changes: np.ndarray, tasks: Sequence[str], settings: SolveMSettings,
                   gi: np.ndarray | None = None, seed: int = 0) -> Regressors:
    """Per task, LightGBM of the measured loss change (changes[:, t]) on the K mixtures (rows of weights).

    The held-out Spearman is leave-one-out: each mixture's change predicted by a model fit on the others."""
    weights, changes = np.asarray(weights, dtype=np.float64), np.asarray(changes, dtype=np.float64)
    k = len(weights)
    if changes.shape != (k, len(tasks)):
        raise AutomixerError(f"tikmix-m: {changes.shape} loss changes for {k} mixtures x {len(tasks)} tasks")
    if not np.isfinite(changes).all():
        raise AutomixerError("tikmix-m: a measured loss change is NaN or infinite; rerun that candidate")
    if settings.use_gi_feature and gi is None:
        raise AutomixerError("tikmix-m: use_gi_feature needs the Group Influence matrix (tasks x groups)")
    gi = np.asarray(gi, dtype=np.float64) if settings.use_gi_feature else None
    scale = changes.std(axis=0)
    scale[scale == 0] = 1.0
    fitted = Regressors(list(tasks), [], scale, gi)
    xs = fitted.features(weights)
    for t, name in enumerate(tasks):
        fitted.boosters.append(_train(xs[t], changes[:, t], settings, seed))
        loo = np.empty(k)
        for i in range(k):
            keep = np.arange(k) != i
            loo[i] = _train(xs[t][keep], changes[keep, t], settings, seed).predict(xs[t][i:i + 1])[0]
        fitted.heldout_spearman[name] = _spearman(loo, changes[:, t])
    return fitted


@dataclass(frozen=True)
class SolveMResult:
    weights: dict[str, float]
    predicted_change: dict[str, float]      # per task, at the answer
    heldout_spearman: dict[str, float]
    best_predicted: float                   # the combined objective of the best single candidate
    settings: dict

    def to_json(self) -> dict:
        return asdict(self)


def search(fitted: Regressors, groups: Sequence[str], natural: np.ndarray, caps: np.ndarray,
           task_weights: Mapping[str, float], settings: SolveMSettings, seed: int = 0) -> SolveMResult:
    """The average of the top_k of n_search capped candidates by the predicted combined change."""
    missing = [t for t in fitted.tasks if t not in task_weights]
    if missing:
        raise AutomixerError(f"tikmix-m: no task weight for {', '.join(missing)}")
    rng = np.random.default_rng([seed, 1])  # not the probes' candidate stream
    cands = candidate_mixtures(natural, caps, settings.n_search, settings.concentration, rng)
    tw = np.array([task_weights[t] for t in fitted.tasks], dtype=np.float64)
    combined = (fitted.predict(cands) / fitted.scale) @ tw
    best = np.argsort(combined, kind="stable")[:settings.top_k]
    answer = cands[best].mean(axis=0)
    answer /= answer.sum()
    pred = fitted.predict(answer[None])[0]
    return SolveMResult(weights=dict(zip(groups, map(float, answer))),
                        predicted_change=dict(zip(fitted.tasks, map(float, pred))),
                        heldout_spearman=dict(fitted.heldout_spearman),
                        best_predicted=float(combined[best[0]]), settings=asdict(settings))
