"""What a DAG run's params may say: single-line text, and overrides of the method's knobs only.

Whoever can trigger the DAG (the form, the REST API, `airflow dags trigger -c`) writes the
params. Airflow checks them against the DAG's Param schema when the run is created, but a
conf key the schema does not declare passes unchecked, and an operator used by another DAG
has no schema at all; so every task checks them again here (`config_overrides` calls
`check_params` before it builds anything):

- no control or line-breaking character in any param, nor in an override's decoded YAML
  value: a newline that reaches a shell script or an `#SBATCH` line starts a new shell line;
- `overrides` may set only the keys of OVERRIDABLE: the knobs of the method (what to target,
  how big, how many tokens), never a path. Where a run reads and writes (run.root, corpus.*,
  tokenizer.*, proxy.checkpoints, tasks.data_dir, tasks.custom) stays in the config file.

The DAG's Param schema uses the patterns below, so that the form refuses the same values.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Mapping

from airflow.sdk.exceptions import AirflowFailException

# The config keys `overrides` (and the named params) may set. Not here: paths, which decide what
# the workers read and where they write (run.root, corpus.*, tokenizer.path, proxy.checkpoints,
# tasks.data_dir, tasks.custom), what the corpus and tokenizer are (the rest of corpus.* and
# tokenizer.*: fixed when the run is prepared), and the worker's memory (regroup.memory_limit).
# run.id is a plain name (the config checks it: no '/', no leading '.'), so <root>/<id> stays
# under the config file's root.
OVERRIDABLE = (
    "run.id", "run.seed",
    "proxy.preset", "proxy.seq_len", "proxy.batch_size", "proxy.grad_accum", "proxy.max_steps",
    "proxy.save_every", "proxy.lr", "proxy.min_lr_ratio", "proxy.warmup_steps", "proxy.weight_decay",
    "proxy.grad_clip", "proxy.device", "proxy.log_every",
    "tasks.targets", "tasks.docs.selection", "tasks.docs.validation", "tasks.docs.test",
    "evaluate.batch_size", "evaluate.device",
    "select.metric",
    "influence.max_seq_len", "influence.fit_samples", "influence.batch_tokens",
    "influence.device", "influence.precision", "influence.norm_mode",
    "regroup.keep_fraction",
    "regroup.joint",
    "mix.token_budget", "mix.max_repeats", "mix.caps", "mix.docs_per_part", "mix.underfill",
    "target.preset", "target.seq_len", "target.batch_size", "target.grad_accum", "target.lr", "target.min_lr_ratio",
    "target.weight_decay", "target.grad_clip", "target.device", "target.log_every", "target.warmup_fraction",
    "target.checkpoints",
    "tikmix.group_by", "tikmix.estimate", "tikmix.per_group", "tikmix.checkpoint", "tikmix.stage_tokens",
    "tikmix.d.tau", "tikmix.d.kappa", "tikmix.d.floor", "tikmix.d.repetition_factor", "tikmix.d.task_weights",
    "tikmix.d.keep_task_influence", "tikmix.d.solver",
    "tikmix.m.n_candidates", "tikmix.m.concentration", "tikmix.m.probe_steps", "tikmix.m.probe_lr",
    "tikmix.m.probe_batch_size", "tikmix.m.n_search", "tikmix.m.top_k", "tikmix.m.num_boost_round",
    "tikmix.m.learning_rate", "tikmix.m.num_leaves", "tikmix.m.min_data_in_leaf", "tikmix.m.use_gi_feature",
)

# Unicode categories no param needs: C0/C1 controls (newline, tab, escape...), invisible format
# characters (bidi overrides), and the line and paragraph separators YAML breaks lines at.
REFUSED_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}

# For the JSON schema of the trigger form (Python's and the browser's regex dialects alike).
# Python's `$` also matches before a final newline, so the end of the text is spelt (?![\s\S]).
END = r"(?![\s\S])"
TEXT = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029]*"
ABSOLUTE_PATH_PATTERN = "^/" + TEXT + END
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]*" + END
OVERRIDE_PATTERN = "^(" + "|".join(re.escape(k) for k in OVERRIDABLE) + ")=" + TEXT + END


def check_params(params: Mapping[str, Any]) -> None:
    """Raise AirflowFailException (one line, naming the param) for params no task may run with."""
    for name in params:  # params[name], not .items(): an Airflow ParamsDict's items are Param objects
        check_text(f"Param {name!r}", params[name])
    overrides = params.get("overrides")
    if overrides in (None, ""):
        return
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise AirflowFailException(f"Param 'overrides': must be a list of 'section.key=value' strings, "
                                   f"got {_show(overrides)}")
    for item in overrides:
        check_override(item)


def check_override(item: str) -> None:
    """One `section.key=value`: an allowed key, and a value with no control character once decoded."""
    key, sep, value = item.partition("=")
    key = key.strip()  # as the config loader reads it
    if not sep or not key:
        raise AirflowFailException(f"Param 'overrides': {_show(item)} is not section.key=value")
    if key not in OVERRIDABLE:
        raise AirflowFailException(
            f"Param 'overrides': {key!r} cannot be set from a DAG run (paths and the corpus belong in the "
            f"config file); allowed keys: {', '.join(OVERRIDABLE)}")
    # "\n" in a double-quoted YAML value is a newline once the step parses it.
    import yaml

    try:
        decoded = yaml.safe_load(value)
    except yaml.YAMLError:
        return  # the step itself rejects it, naming the override (exit 2)
    check_text(f"Param 'overrides' ({key})", decoded)


def check_text(where: str, value: Any) -> None:
    """Every string in value (nested in lists and mappings too) is free of refused characters."""
    if isinstance(value, str):
        bad = next((c for c in value if unicodedata.category(c) in REFUSED_CATEGORIES), None)
        if bad is not None:
            raise AirflowFailException(f"{where}: {_show(value)} contains the control character "
                                       f"U+{ord(bad):04X}; params are single-line text")
    elif isinstance(value, Mapping):
        for k, v in value.items():
            check_text(where, k)
            check_text(where, v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_text(where, v)


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)  # repr: a newline shows as \n, the message stays one line
    return text if len(text) <= limit else text[:limit - 3] + "..."
