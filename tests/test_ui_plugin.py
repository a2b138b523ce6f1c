"""The AutoMixer UI plugin (plugins/automixer_ui): its app behind Airflow's real auth manager
(SimpleAuthManager, real JWTs) and a real SQLite metadata DB holding DAG runs; the path rules
that keep every served file inside the runs root; the DAG-run -> run directory lookup; and
what Airflow's plugin loader makes of plugins/automixer_ui_plugin.py."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", str(Path(tempfile.gettempdir()) / "automixer-test-airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
if str(ROOT / "plugins") not in sys.path:
    sys.path.insert(0, str(ROOT / "plugins"))

from automixer_ui.paths import Refused, media_type, resolve_in_root, servable_file  # noqa: E402

SECRET = "not-for-you-0451"
REPORT_HTML = """<!doctype html><html><body><h1>report</h1>
<table id="weights"><tr data-group="g0"><td class="weight" data-value="0.25">0.25</td></tr></table>
<img id="benchmark-heatmap" alt="heatmap" src="heatmap.png">
<section id="outputs"><a href="../automixer.duckdb">DuckDB</a></section></body></html>"""


# ---------------------------------------------------------------- fixtures: runs root, DB, auth

def write_config(path: Path, root: Path, run_id: str) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({"run": {"id": run_id, "root": str(root)}, "corpus": {"paths": ["x.jsonl"]}}))
    return path


@pytest.fixture
def runs(tmp_path, monkeypatch):
    """A runs root with a finished run (r1: report, DuckDB, mixture), a run without report (r2), a secret file
    outside the root, a symlink inside r1 pointing at it, and a run directory that is a symlink out of the root."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "runs"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text(SECRET)
    (outside / "config.yaml").write_text("run: {id: x}\n")
    (outside / "report").mkdir()
    (outside / "report" / "index.html").write_text(SECRET)

    r1 = root / "r1"
    for d in ("report", "mixture"):
        (r1 / d).mkdir(parents=True)
    write_config(r1 / "config.yaml", root, "r1")
    (r1 / "report" / "index.html").write_text(REPORT_HTML)
    (r1 / "report" / "summary.md").write_text("# summary\n")
    (r1 / "report" / "heatmap.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 16)
    (r1 / "mixture" / "weights.json").write_text(json.dumps({"groups": {"g0": {"weight": 1.0}}}))
    (r1 / "mixture" / "blend.txt").write_text("1.0 g0\n")
    pq.write_table(pa.table({"id": ["a", "b"]}), r1 / "mixture" / "part-00000.parquet")
    con = duckdb.connect(str(r1 / "automixer.duckdb"))
    con.execute("CREATE TABLE weights AS SELECT 'g0' AS group_name, 1.0::DOUBLE AS weight")
    con.close()
    (r1 / "escape.txt").symlink_to(outside / "secret.txt")
    (r1 / ".staging-x").mkdir()
    (r1 / ".staging-x" / "f.txt").write_text("partial")

    r2 = root / "r2"
    r2.mkdir()
    write_config(r2 / "config.yaml", root, "r2")
    (root / "linked").symlink_to(outside, target_is_directory=True)

    monkeypatch.setenv("AUTOMIXER_RUNS_ROOT", str(root))
    return root


@pytest.fixture(scope="module")
def airflow_db(tmp_path_factory):
    """A fresh SQLite metadata DB for this module (Airflow's ORM pointed at it, then back)."""
    from airflow import settings
    from airflow.configuration import conf
    from airflow.utils import db

    home = tmp_path_factory.mktemp("airflow_ui")
    before = conf.get("database", "sql_alchemy_conn")
    conf.set("database", "sql_alchemy_conn", f"sqlite:///{home / 'airflow.db'}")
    settings.configure_vars()
    settings.reconfigure_orm()
    db.initdb()
    yield home
    conf.set("database", "sql_alchemy_conn", before)
    settings.configure_vars()
    settings.reconfigure_orm()


@pytest.fixture(scope="module")
def tokens(airflow_db):
    """JWTs Airflow's SimpleAuthManager signs: a viewer (may read DAG runs) and a user without a role."""
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.configuration import conf

    settings = {("core", "simple_auth_manager_passwords_file"): str(airflow_db / "passwords.json"),
                ("api_auth", "jwt_secret"): "s" * 64}  # long enough for HS512
    before = {k: conf.get(*k, fallback=None) for k in settings}
    for k, v in settings.items():
        conf.set(*k, v)
    am = init_auth_manager()
    yield {"viewer": am.generate_jwt(SimpleAuthManagerUser(username="vera", role="viewer")),
           "no_role": am.generate_jwt(SimpleAuthManagerUser(username="nora", role=None))}
    for k, v in before.items():
        if v is None:
            conf.remove_option(*k)
        else:
            conf.set(*k, v)


@pytest.fixture
def client(tokens, runs):
    from fastapi.testclient import TestClient

    from automixer_ui.app import create_app

    with TestClient(create_app(), follow_redirects=False) as c:
        c.cookies.set("_token", tokens["viewer"])  # as the Airflow UI's session cookie
        yield c


@pytest.fixture
def anonymous(tokens, runs):
    from fastapi.testclient import TestClient

    from automixer_ui.app import create_app

    with TestClient(create_app(), follow_redirects=False) as c:
        yield c


def with_cookie(token: str):
    from fastapi.testclient import TestClient

    from automixer_ui.app import create_app

    c = TestClient(create_app(), follow_redirects=False)
    c.cookies.set("_token", token)
    return c


def add_dag_run(run_id: str, conf: dict | None, state: str = "success", dag_id: str = "automixer") -> None:
    from airflow.models.dag import DagModel
    from airflow.models.dagbundle import DagBundleModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from airflow.utils.types import DagRunTriggeredByType, DagRunType

    with create_session() as session:
        if session.get(DagBundleModel, "dags-folder") is None:
            session.add(DagBundleModel(name="dags-folder"))
            session.flush()
        if session.get(DagModel, dag_id) is None:
            session.add(DagModel(dag_id=dag_id, bundle_name="dags-folder"))
            session.flush()
        session.add(DagRun(dag_id=dag_id, run_id=run_id, conf=conf, state=DagRunState(state),
                           run_type=DagRunType.MANUAL, run_after=datetime.now(timezone.utc),
                           triggered_by=DagRunTriggeredByType.TEST))


# ---------------------------------------------------------------- path rules (no server)

@pytest.mark.parametrize("rel", [
    "../outside/secret.txt", "r1/../../outside/secret.txt", "r1/report/../../../outside/secret.txt",
    "/etc/passwd", str(Path(tempfile.gettempdir())), "r1/escape.txt", "linked/secret.txt",
    "linked/report/index.html", "r1/.staging-x/f.txt", ".", "r1/./report/index.html", "r1\\..\\..\\x", "r1/\x00",
])
def test_paths_outside_the_root_or_hidden_are_refused(runs, rel):
    with pytest.raises(Refused) as e:
        servable_file(runs.resolve(), rel)
    assert e.value.status == 403


def test_paths_inside_the_root_resolve_to_their_files_and_directories_are_not_files(runs):
    root = runs.resolve()
    assert servable_file(root, "r1/report/index.html") == root / "r1" / "report" / "index.html"
    assert servable_file(root, "r1//mixture/weights.json") == root / "r1" / "mixture" / "weights.json"
    (root / "r1" / "report" / "latest.html").symlink_to(root / "r1" / "report" / "index.html")
    assert servable_file(root, "r1/report/latest.html") == root / "r1" / "report" / "index.html"  # stays inside
    for rel in ("r1/report", "r1", "r1/missing.txt"):
        with pytest.raises(Refused) as e:
            servable_file(root, rel)
        assert e.value.status == 404
    assert resolve_in_root(root, "r2") == root / "r2"


def test_refusal_does_not_depend_on_whether_the_outside_path_exists(runs):
    (runs / "r1" / "dangling.txt").symlink_to(runs.parent / "outside" / "no-such-file")
    for rel in ("r1/escape.txt", "r1/dangling.txt", "linked/no-such-file"):
        with pytest.raises(Refused) as e:
            resolve_in_root(runs.resolve(), rel)
        assert e.value.status == 403 and "outside the runs root" in str(e.value)


def test_media_types_show_text_and_images_and_download_data_files():
    assert media_type(Path("a/index.html")) == ("text/html; charset=utf-8", False)
    assert media_type(Path("heatmap.PNG")) == ("image/png", False)
    assert media_type(Path("summary.md"))[0].startswith("text/plain")
    for name in ("automixer.duckdb", "part-00000.parquet", "x.svg", "model.safetensors"):
        assert media_type(Path(name)) == ("application/octet-stream", True)


# ---------------------------------------------------------------- auth

ENDPOINTS = ["/", "/runs/r1/", "/runs/r1/report/index.html", "/runs/r1/automixer.duckdb",
             "/dag-runs/automixer/some_run"]


@pytest.mark.parametrize("url", ENDPOINTS)
def test_anonymous_requests_get_401_without_a_redirect(anonymous, url):
    r = anonymous.get(url)
    assert r.status_code == 401 and "location" not in r.headers
    assert "weights" not in r.text and "<table" not in r.text


@pytest.mark.parametrize("url", ENDPOINTS)
def test_a_bad_token_or_a_user_without_read_access_is_refused(anonymous, tokens, url):
    assert anonymous.get(url, headers={"Authorization": "Bearer not.a.jwt"}).status_code == 403
    assert with_cookie(tokens["viewer"][:-4] + "AAAA").get(url).status_code == 403
    assert anonymous.get(url, headers={"Authorization": f"Bearer {tokens['no_role']}"}).status_code == 403


def test_a_viewer_gets_the_report_by_cookie_or_by_bearer_token(anonymous, tokens):
    by_cookie = with_cookie(tokens["viewer"]).get("/runs/r1/report/index.html")
    by_bearer = anonymous.get("/runs/r1/report/index.html", headers={"Authorization": f"Bearer {tokens['viewer']}"})
    assert by_cookie.status_code == by_bearer.status_code == 200
    assert by_cookie.text == by_bearer.text == REPORT_HTML


# ---------------------------------------------------------------- files through the app

@pytest.mark.parametrize("url", [
    "/runs/%2e%2e/outside/secret.txt", "/runs/r1/%2E%2E/%2e%2e/outside/secret.txt", "/runs/%2Fetc%2Fpasswd",
    "/runs//etc/passwd", "/runs/r1/escape.txt", "/runs/linked/secret.txt", "/runs/linked/report/index.html",
    "/runs/linked/", "/runs/r1/.staging-x/f.txt", "/runs/r1%2F..%2F..%2Foutside%2Fsecret.txt",
])
def test_the_app_refuses_paths_that_leave_the_root(client, url):
    r = client.get(url)
    assert r.status_code == 403, (url, r.status_code, r.text)
    assert SECRET not in r.text and "root" not in r.headers.get("content-type", "")


def test_files_are_served_with_their_content_types(client):
    r = client.get("/runs/r1/report/index.html")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "sandbox" not in csp  # no script at all
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "content-disposition" not in r.headers
    assert client.get("/runs/r1/report/heatmap.png").headers["content-type"] == "image/png"
    assert client.get("/runs/r1/mixture/weights.json").json() == {"groups": {"g0": {"weight": 1.0}}}
    md = client.get("/runs/r1/report/summary.md")
    assert md.headers["content-type"].startswith("text/plain") and md.text == "# summary\n"
    assert client.get("/runs/r1/mixture/blend.txt").text == "1.0 g0\n"
    for rel, name in (("automixer.duckdb", "automixer.duckdb"), ("mixture/part-00000.parquet", "part-00000.parquet")):
        r = client.get(f"/runs/r1/{rel}")
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"] == f'attachment; filename="{name}"'
        assert r.content == (Path(os.environ["AUTOMIXER_RUNS_ROOT"]) / "r1" / rel).read_bytes()


def test_no_directory_listing_but_a_run_page_and_the_runs_index(client):
    assert client.get("/runs/r1/report/").status_code == 404
    assert client.get("/runs/r1/mixture").status_code == 404
    assert client.get("/runs/r1/missing.html").status_code == 404
    page = client.get("/runs/r1/")
    assert page.status_code == 200 and 'href="/runs/r1/report/index.html"' in page.text
    assert 'href="/runs/r1/mixture/blend.txt"' in page.text
    index = client.get("/")
    assert index.status_code == 200
    assert '<tr data-run="r1">' in index.text and '<tr data-run="r2">' in index.text
    assert "linked" not in index.text  # a run directory symlinked out of the root is not listed
    r1 = index.text.split('<tr data-run="r1">')[1].split("</tr>")[0]
    r2 = index.text.split('<tr data-run="r2">')[1].split("</tr>")[0]
    assert "<td>index.html</td>" in r1 and "1 part file(s)" in r1 and "automixer.duckdb" in r1
    assert "<td>none yet</td>" in r2 and "nothing yet" in r2


# ---------------------------------------------------------------- DAG run -> report

def test_a_dag_run_opens_its_own_report(client, runs, tmp_path):
    add_dag_run("done_r1", {"config": str(write_config(tmp_path / "r1.yaml", runs, "r1"))})
    r = client.get("/dag-runs/automixer/done_r1")
    assert r.status_code == 307 and r.headers["location"] == "/runs/r1/report/index.html"
    # an override of run.id (a DAG run param) moves the run directory, as the tasks see it
    add_dag_run("moved_r2", {"config": str(tmp_path / "r1.yaml"), "overrides": ["run.id=r2"]}, state="running")
    r = client.get("/dag-runs/automixer/moved_r2")
    assert r.status_code == 200 and 'id="no-report"' in r.text
    assert "running" in r.text and "has not reached its report step" in r.text


def test_a_dag_run_without_a_report_gets_a_page_that_says_why(client, runs, tmp_path):
    add_dag_run("failed_r2", {"config": str(write_config(tmp_path / "r2.yaml", runs, "r2"))}, state="failed")
    add_dag_run("no_config_file", {"config": str(tmp_path / "gone.yaml")}, state="failed")
    add_dag_run("bad_override", {"config": str(tmp_path / "r2.yaml"), "overrides": ["run.root=/"]})
    add_dag_run("outside_root", {"config": str(write_config(tmp_path / "o.yaml", tmp_path, "outside"))})
    add_dag_run("no_conf", None, dag_id="other_dag")
    expected = {"automixer/failed_r2": "failed before the report step",
                "automixer/no_config_file": "config file not found",
                "automixer/bad_override": "cannot be set from a DAG run",
                "automixer/outside_root": "outside the runs root",
                "other_dag/no_conf": "no `config` param"}
    for path, why in expected.items():
        r = client.get(f"/dag-runs/{path}")
        assert r.status_code == 200 and 'id="no-report"' in r.text, (path, r.status_code, r.text)
        assert why in r.text, (path, r.text)
        assert SECRET not in r.text
    assert client.get("/dag-runs/automixer/no_such_run").status_code == 404


def test_the_dag_runs_params_default_to_the_serialized_dags(monkeypatch, runs, tmp_path):
    from automixer_ui import app as ui_app

    class Serialized:
        class dag:  # noqa: N801 (stands in for a SerializedDAG)
            class params:  # noqa: N801
                @staticmethod
                def dump():
                    return {"config": "/default.yaml", "keep_fraction": None, "overrides": []}

    monkeypatch.setattr("airflow.models.serialized_dag.SerializedDagModel.get", lambda *a, **k: Serialized)
    assert ui_app.run_params(None, "automixer", {"keep_fraction": 0.5}) == {
        "config": "/default.yaml", "keep_fraction": 0.5, "overrides": []}
    monkeypatch.setattr("airflow.models.serialized_dag.SerializedDagModel.get", lambda *a, **k: None)
    assert ui_app.run_params(None, "automixer", None) == {}


# ---------------------------------------------------------------- the plugin as Airflow loads it

@pytest.mark.filterwarnings("ignore:GitWildMatchPattern:DeprecationWarning")  # inside Airflow
def test_airflow_loads_the_plugin_light_and_mounts_its_app(tokens, runs, tmp_path):
    import subprocess

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    # The loader imports only automixer_ui_plugin.py (the package is ignored), and that import builds nothing.
    code = ("import sys; from airflow import plugins_manager as pm; "
            f"plugins, errors = pm._load_plugins_from_plugin_directory(plugins_folder={str(ROOT / 'plugins')!r}, "
            "load_examples=False, example_plugins_module=None); "
            "print(sorted(p.name for p in plugins), errors, 'automixer_ui.app' in sys.modules, "
            "'fastapi' in sys.modules and 'automixer_ops' in sys.modules)")
    env = {**os.environ, "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins")}
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "['automixer_ui'] {} False False"

    sys.path.insert(0, str(ROOT / "plugins"))
    import automixer_ui_plugin as plugin

    views = {v["destination"]: v for v in plugin.AutomixerUIPlugin.external_views}
    assert views["dag_run"]["href"] == "/automixer/dag-runs/{DAG_ID}/{RUN_ID}"
    assert views["dag_run"]["name"] == "AutoMixer report"
    [mount] = plugin.AutomixerUIPlugin.fastapi_apps
    root_app = FastAPI()
    root_app.mount(mount["url_prefix"], mount["app"])
    add_dag_run("mounted_r1", {"config": str(write_config(tmp_path / "m.yaml", runs, "r1"))})
    with TestClient(root_app, follow_redirects=False) as c:
        c.cookies.set("_token", tokens["viewer"])
        r = c.get("/automixer/dag-runs/automixer/mounted_r1")
        assert r.status_code == 307 and r.headers["location"] == "/automixer/runs/r1/report/index.html"
        assert c.get(r.headers["location"]).text == REPORT_HTML
        assert 'href="/automixer/runs/r1/report/index.html"' in c.get("/automixer/").text
