"""How a config setting is declared: its default and the one-line doc the reference shows.

Its own module so that settings dataclasses defined beside their code (tikmix.solve_d, tikmix.solve_m)
can use it without importing config.py, which imports them.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import field
from typing import Any


def setting(default: Any, doc: str) -> Any:
    """A config field with its default and the doc line shown in the reference."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def required(doc: str) -> Any:
    return field(metadata={"doc": doc, "required": True})
