"""Backend settings: the YAML file that says where and how each backend runs a command.

`backends.yaml` beside this module holds the defaults and documents every key. A user's
file (the `backend_settings` run param, else $AUTOMIXER_BACKENDS_FILE) is merged over it;
a key the defaults do not have is an error that names it, like the run config's.

A settings file decides what runs (the executable, `setup` shell lines, the environment), so
the run param may only name a file inside $AUTOMIXER_BACKENDS_DIR (default: this plugin's
directory), symlinks resolved, or the very file $AUTOMIXER_BACKENDS_FILE names: both are the
worker's administrator's choice, not the trigger form's.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

DEFAULTS_FILE = Path(__file__).with_name("backends.yaml")
ENV_VAR = "AUTOMIXER_BACKENDS_FILE"
DIR_ENV_VAR = "AUTOMIXER_BACKENDS_DIR"

# Mappings whose keys are the user's own (env names, labels, k8s quantities), not settings.
FREE_FORM = {"env", "labels", "annotations", "node_selector", "requests", "limits"}


def load_settings(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The defaults merged with the user's file (the argument, else $AUTOMIXER_BACKENDS_FILE)."""
    settings = _read(DEFAULTS_FILE)
    if path:
        user = allowed_file(path)
    elif os.environ.get(ENV_VAR):
        user = Path(os.environ[ENV_VAR])
    else:
        return settings
    _merge(settings, _read(user), where=str(user))
    return settings


def allowed_dir() -> Path:
    """Where the `backend_settings` param may point: $AUTOMIXER_BACKENDS_DIR, else this plugin's directory."""
    return Path(os.environ.get(DIR_ENV_VAR) or DEFAULTS_FILE.parent).resolve()


def allowed_file(path: str | os.PathLike) -> Path:
    """The settings file the param names, resolved; one inside allowed_dir() or $AUTOMIXER_BACKENDS_FILE."""
    resolved = Path(path).resolve()  # symlinks and '..' resolved: a link out of the directory is out
    admin_file = os.environ.get(ENV_VAR)
    if resolved.is_relative_to(allowed_dir()) or (admin_file and resolved == Path(admin_file).resolve()):
        return resolved
    raise AirflowFailException(f"Param 'backend_settings': {path} is outside {allowed_dir()}, the directory of "
                               f"backend settings files (set {DIR_ENV_VAR} on the workers to allow another)")


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
