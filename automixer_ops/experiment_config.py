"""The experiment file (`automixer experiment -c <experiment.yaml>`): methods x seeds on one run.

An experiment names a run config (`base`: corpus, proxy, tasks and their document splits),
the methods to compare, the seeds, the token budget and the target model. Every method gets
the same budget, target preset and seeds; `tasks.docs.test` of the base config are the
documents the target models are judged on. Loaded with the run config's machinery: unknown
keys, wrong types and bad values fail with the key's path.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from automixer_ops.config import Config, TargetSection, _build, load_config, read_yaml_mapping, required, setting
from automixer_ops.errors import ConfigError

METHOD_KINDS = ("uniform", "uniform-source", "ppl", "dsir", "last-ckpt", "all-ckpt", "automixer", "scores",
                "tikmix-d", "tikmix-m", "tikmix-d-dynamic")
TIKMIX_KINDS = ("tikmix-d", "tikmix-m", "tikmix-d-dynamic")
OVERRIDE_KINDS = ("automixer", "last-ckpt", "all-ckpt", "scores", *TIKMIX_KINDS)


@dataclass(kw_only=True)
class MethodSpec:
    name: str = required("Method name in tables and paths (letters, digits, '.', '_', '-').")
    kind: Literal[METHOD_KINDS] = required(
        "uniform: a seeded random draw of the budget from the whole corpus; uniform-source: equal tokens per "
        "source; ppl: a perplexity band under a reference model; dsir: hashed n-gram importance resampling "
        "towards the tasks' validation text; last-ckpt / all-ckpt: AutoMixer with only the last checkpoint / "
        "every checkpoint as sampler (the paper's Table 3); automixer: the pipeline; scores: your own scorer's "
        "selection.json and scores/ (see README), regrouped and mixed like automixer; tikmix-d / tikmix-m: a "
        "static TiKMiX-D / -M mixture from Group Influence at the proxy's checkpoint; tikmix-d-dynamic: the target "
        "itself trained in tikmix.stages stages, TiKMiX-D re-solved on its own checkpoints (docs/tikmix.md).")
    overrides: list[str] = setting(
        [], "automixer, last-ckpt, all-ckpt, scores and the tikmix kinds: --set overrides of the base run config "
        "for this method (e.g. select.metric=gold_ll, regroup.keep_fraction=0.3, tikmix.d.tau=1).")
    band: Literal["low", "middle", "high"] = setting(
        "middle", "ppl: which band of documents by perplexity to keep (low: the lowest, high: the highest).")
    band_fraction: float = setting(0.5, "ppl: the fraction of the corpus' documents the band holds.")
    reference_step: int | None = setting(
        None, "ppl: checkpoint step of the base run whose model measures perplexity; null: the last.")
    ngrams: int = setting(2, "dsir: hashed n-gram order (unigrams and bigrams with 2).")
    num_buckets: int = setting(10_000, "dsir: hash buckets of the n-gram features.")
    min_example_length: int = setting(
        0, "dsir: documents with fewer words get importance 0 (data-selection's default of 100 drops short "
        "documents silently; 0 keeps every document).")
    scores: str | None = setting(
        None, "scores: a directory holding your scorer's selection.json and scores/step=<N>/part-*.parquet "
        "(DESIGN §3's contract).")

    def check(self, where: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"{where}.name: {self.name!r} is not a valid method name")
        if not 0 < self.band_fraction <= 1:
            raise ConfigError(f"{where}.band_fraction: must be in (0, 1], got {self.band_fraction}")
        if self.ngrams < 1 or self.num_buckets < 1 or self.min_example_length < 0:
            raise ConfigError(f"{where}: ngrams and num_buckets must be >= 1, min_example_length >= 0")
        if (self.kind == "scores") != (self.scores is not None):
            raise ConfigError(f"{where}.scores: a directory is required for kind 'scores' and only for it")
        if self.overrides and self.kind not in OVERRIDE_KINDS:
            raise ConfigError(f"{where}.overrides: only {', '.join(OVERRIDE_KINDS)} read the run config's "
                              f"settings; kind {self.kind!r} takes none")


@dataclass(kw_only=True)
class ExperimentConfig:
    name: str = required("Experiment name: its directory is <root>/<name>.")
    base: str = required("The run config the methods share (corpus, proxy, tasks and tasks.docs).")
    root: str = setting("experiments", "Directory that holds experiment directories.")
    seeds: list[int] = setting([0, 1, 2], "Seeds: seed s gives every method's target the same initialisation, "
                                          "seeds a baseline's random draw and every mixture's order (a pipeline "
                                          "method's documents are chosen deterministically); every method runs "
                                          "every seed.")
    token_budget: int = required("Tokens of every method's mixture; the target trains on them once.")
    baseline: str = setting("uniform", "The method the table's deltas are taken against (paired by seed).")
    target: TargetSection = setting(TargetSection(), "The target model every method trains.")
    methods: list[MethodSpec] = required("The methods compared, each one entry.")

    base_dir: Path = dataclasses.field(default=Path("."), repr=False, compare=False, metadata={"internal": True})
    source: Path = dataclasses.field(default=Path("experiment.yaml"), repr=False, compare=False,
                                     metadata={"internal": True})

    def check(self, where: str) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ConfigError(f"{where}: name: {self.name!r} is not a valid experiment name")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(not 0 <= s < 2**32 for s in self.seeds):
            raise ConfigError(f"{where}: seeds: give distinct seeds in [0, 2^32), got {self.seeds}")
        if self.token_budget < 1:
            raise ConfigError(f"{where}: token_budget: must be >= 1, got {self.token_budget}")
        names = [m.name for m in self.methods]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"{where}: methods: give at least one, with distinct names, got {names}")
        if self.baseline not in names:
            raise ConfigError(f"{where}: baseline: {self.baseline!r} is not one of the methods ({', '.join(names)})")
        self.target.check("target")
        for i, m in enumerate(self.methods):
            m.check(f"methods[{i}] ({m.name})")

    def resolve(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def directory(self) -> Path:
        return self.resolve(self.root).resolve() / self.name

    def method(self, name: str) -> MethodSpec:
        for m in self.methods:
            if m.name == name:
                return m
        raise ConfigError(f"--method {name}: not a method of this experiment ({', '.join(m.name for m in self.methods)})")

    def base_config(self, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        return load_config(self.resolve(self.base), list(overrides))

    def units(self) -> list[tuple[str, int]]:
        """(method, seed) pairs in run order: each is trained and evaluated alone (resumable)."""
        return [(m.name, s) for s in self.seeds for m in self.methods]


def load_experiment(path: str | Path) -> ExperimentConfig:
    path = Path(path)
    raw = read_yaml_mapping(path, "experiment file")
    exp = _build(ExperimentConfig, raw, prefix="", where=str(path))
    try:
        exp.check(str(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if not str(e).startswith(str(path)) else str(e)) from None
    exp.base_dir, exp.source = path.resolve().parent, path
    return exp
