"""The environment a step's command gets: an allowlist of the worker's, never its secrets.

An Airflow worker's environment holds the metadata database's password
(AIRFLOW__DATABASE__SQL_ALCHEMY_CONN), the Fernet key, the API's JWT secret...; a step runs
code that reads user-given files (corpora, checkpoints, task files), so it gets only what it
needs: the names and prefixes below, minus anything that looks like a credential, plus the
names the backend's `inherit_env` setting lists, plus the setting's own `env` values (the
backends do that last part: the Slurm script exports them, a pod gets them as its env).

Used by the `local` backend for the command, and by the `slurm` backend for sbatch on the
worker (sbatch hands its environment to the job). A Kubernetes pod never sees the worker's
environment: only its settings' `env`.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping

# Inherited by name: the process basics, locale and time zone, temp dir, hashing and GPUs.
NAMES = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "PYTHONHASHSEED",
         "PYTHONUNBUFFERED", "LD_LIBRARY_PATH", "XDG_CACHE_HOME", "TOKENIZERS_PARALLELISM"}
# Inherited by prefix: locale, Hugging Face (offline mode, cache), thread pools, CUDA/NVIDIA,
# torch, progress bars and AutoMixer's own settings.
PREFIXES = ("LC_", "HF_", "TRANSFORMERS_", "OMP_", "MKL_", "OPENBLAS_", "CUDA_", "NVIDIA_", "TORCH_",
            "PYTORCH_", "TQDM_", "AUTOMIXER_")
# ...except what looks like a credential (HF_TOKEN, AUTOMIXER_API_KEY, ...).
SECRET = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|PASS|KEY|CREDENTIALS?|AUTH|JWT|CONN)(_|$)")
# What a variable name must look like to be exported by a shell script.
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def inherited(name: str, extra: Iterable[str] = (), prefixes: tuple[str, ...] = PREFIXES) -> bool:
    """Whether a worker variable passes: allowlisted and not secret-looking, or listed in `extra`.

    `extra` (the `inherit_env` setting) holds exact names or prefixes ending in '*'; an
    administrator who lists a name gets it, secret-looking or not.
    """
    for item in extra:
        if name == item or (item.endswith("*") and name.startswith(item[:-1])):
            return True
    return (name in NAMES or name.startswith(prefixes)) and not SECRET.search(name)


def step_environment(inherit: Iterable[str] | None = (), *, also: tuple[str, ...] = (),
                     base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The worker's variables a step may see: the allowlist, `also` prefixes (same secret filter),
    and the `inherit` names. `base`: the worker's environment, os.environ."""
    extra = list(inherit or ())
    prefixes = PREFIXES + tuple(also)
    source = os.environ if base is None else base
    return {k: v for k, v in source.items() if inherited(k, extra, prefixes)}
