#!/usr/bin/env python3
"""Write `.env` for docker-compose.yml with freshly generated secrets.

    python scripts/gen_env.py            # writes ./.env; refuses if it exists
    python scripts/gen_env.py --force    # replaces it (new secrets: see below)

`.env.example` is the template: its comments and settings are copied, every empty value
is filled with a new random secret, and AIRFLOW_UID is set to the current user id. The
file is created with mode 0600 and the secrets are never printed.

Replacing an existing .env on a deployment that already ran is not harmless: the Postgres
volume keeps the old password and the metadata database stays encrypted with the old
fernet key. Hence --force.

Standard library only: it runs before any environment is installed.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# One generator per secret of .env.example. All values are URL-safe (letters, digits,
# '-', '_', '='), so they can stand in a SQLAlchemy URL or a YAML file unquoted.
GENERATORS = {
    "POSTGRES_PASSWORD": lambda: secrets.token_urlsafe(32),
    "AIRFLOW_ADMIN_PASSWORD": lambda: secrets.token_urlsafe(24),
    # What cryptography.fernet.Fernet.generate_key() returns: urlsafe base64 of 32 random bytes.
    "AIRFLOW__CORE__FERNET_KEY": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode("ascii"),
    "AIRFLOW__API_AUTH__JWT_SECRET": lambda: secrets.token_urlsafe(64),
    "AIRFLOW__API__SECRET_KEY": lambda: secrets.token_urlsafe(32),
}

SETTING = re.compile(r"^(?P<key>[A-Za-z_][A-Za-z0-9_]*)=(?P<value>.*)$")


def host_uid() -> int:
    """The uid the Airflow containers should run as: yours, unless you are root (or not on POSIX)."""
    uid = os.getuid() if hasattr(os, "getuid") else 50000
    return 50000 if uid == 0 else uid


def render(template: str) -> str:
    """The .env text: the template with its empty values generated and AIRFLOW_UID filled in."""
    out = []
    for line in template.splitlines():
        m = SETTING.match(line)
        if m:
            key, value = m["key"], m["value"].strip()
            if key == "AIRFLOW_UID":
                value = str(host_uid())
            elif not value:
                if key not in GENERATORS:
                    raise SystemExit(f"gen_env: {key} is empty in the template and has no generator; "
                                     f"give it a value or add one to GENERATORS in {Path(__file__).name}")
                value = GENERATORS[key]()
            line = f"{key}={value}"
        out.append(line)
    return "\n".join(out) + "\n"


def write_new(path: Path, text: str, force: bool) -> None:
    """Create `path` with mode 0600; an existing file is kept unless `force`."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise SystemExit(f"gen_env: {path} exists; not overwriting it (its secrets may already be in use). "
                         f"Pass --force to replace it.") from None
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, 0o600)  # O_CREAT's mode does not apply to a file that already existed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", "-o", type=Path, default=ROOT / ".env", help="where to write (default: %(default)s)")
    parser.add_argument("--template", type=Path, default=ROOT / ".env.example",
                        help="the template to fill in (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)

    text = render(args.template.read_text(encoding="utf-8"))
    write_new(args.output, text, args.force)
    keys = [m["key"] for m in map(SETTING.match, text.splitlines()) if m]
    print(f"wrote {args.output} (mode 0600): {', '.join(keys)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
