"""Backend settings: the YAML file that says where and how each backend runs a command.

`backends.yaml` beside this module holds the defaults and documents every key. A user's
file (the `backend_settings` run param, else $AUTOMIXER_BACKENDS_FILE) is merged over it;
a key the defaults do not have is an error that names it, like the run config's.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

DEFAULTS_FILE = Path(__file__).with_name("backends.yaml")
ENV_VAR = "AUTOMIXER_BACKENDS_FILE"

# Mappings whose keys are the user's own (env names, labels, k8s quantities), not settings.
FREE_FORM = {"env", "labels", "annotations", "node_selector", "requests", "limits"}


def load_settings(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The defaults merged with the user's file (the argument, else $AUTOMIXER_BACKENDS_FILE)."""
    settings = _read(DEFAULTS_FILE)
    user = path or os.environ.get(ENV_VAR)
    if user:
        _merge(settings, _read(Path(user)), where=str(user))
    return settings


def _read(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise AirflowFailException(f"{path}: cannot read backend settings: {e}") from None
    if not isinstance(data, dict):
        raise AirflowFailException(f"{path}: backend settings must be a mapping of backend sections")
    return data


def _merge(base: dict, override: dict, where: str, prefix: str = "") -> None:
    for key, value in override.items():
        if key not in base:
            raise AirflowFailException(f"{where}: unknown backend setting '{prefix}{key}'; "
                                       f"allowed here: {', '.join(base)}")
        if isinstance(base[key], dict) and isinstance(value, dict) and key not in FREE_FORM:
            _merge(base[key], value, where, f"{prefix}{key}.")
        else:
            base[key] = copy.deepcopy(value)
