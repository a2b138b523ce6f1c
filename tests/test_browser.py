"""The run in the Airflow UI, with a real browser (Debian's Chromium driven by Playwright).

A real Airflow (API server on a free loopback port, scheduler, DAG processor; SQLite,
LocalExecutor, the simple auth manager with a known user) runs the repository's dags/ and
plugins/. The test logs in, triggers `automixer` from its trigger form, first with
`keep_fraction` 2 (refused: the run fails in `check_params`, whose log names the Param),
then on a small config; waits for the run, opens the DAG run's "AutoMixer report" tab and
checks what a person sees: the weights table equals automixer.duckdb's `weights`, every
image loaded, the heatmap is there, the outputs are linked and download. Anonymous
requests to the report endpoints are refused. Screenshots go to $AUTOMIXER_TEST_ARTIFACTS
(default tests/artifacts/). Skipped where Chromium or Playwright is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import suppress
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(os.environ.get("AUTOMIXER_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
USER, PASSWORD = "tester", "browser-test-password"
DEADLINE = 600  # seconds for the whole test: Airflow up, two runs, the report
POOLS = {"automixer_gpu": 2, "automixer_duckdb": 1}

pytestmark = [
    pytest.mark.slow, pytest.mark.e2e,
    pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it as root)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Airflow:
    """Airflow's components in their own process groups, all stopped (the whole group) at the end."""

    def __init__(self, home: Path, runs_root: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen] = {}
        (home / "passwords.json").parent.mkdir(parents=True, exist_ok=True)
        (home / "passwords.json").write_text(json.dumps({USER: PASSWORD}))
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:user",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
            "AIRFLOW__API_AUTH__JWT_SECRET": "browser-test-" + "x" * 64,  # shared by the API server and workers
            "AIRFLOW__API__SECRET_KEY": "browser-test-secret-key",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "600",  # parse once: the DAG files do not change
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
            "AUTOMIXER_RUNS_ROOT": str(runs_root),
            "AUTOMIXER_TASK_RETRIES": "0",
            "TQDM_DISABLE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "HF_HOME": os.environ.get("HF_HOME", str(ROOT / ".hf_home")),
        }

    def setup_db(self) -> None:
        """Migrate the fresh SQLite DB and create the DAG's pools (one Python process: quicker than the CLI)."""
        code = ("from airflow.utils import db; db.initdb()\n"
                "from airflow.models.pool import Pool\n"
                f"for name, slots in {POOLS!r}.items():\n"
                "    Pool.create_or_update_pool(name, slots=slots, description='browser test', "
                "include_deferred=False)\n")
        p = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]

    def start(self, name: str, *args: str) -> None:
        log = open(self.home / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen([str(VENV_BIN / "airflow"), *args], env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True, cwd=self.home)

    def stop(self) -> None:
        """SIGTERM to every process group (the API server's workers, the executor's task processes), then KILL."""
        for p in self.procs.values():
            with suppress(OSError):  # already gone
                os.killpg(p.pid, signal.SIGTERM)
        end = time.monotonic() + 20
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs.values():
            with suppress(OSError):
                os.killpg(p.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)

    def check_alive(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        assert not dead, f"Airflow components exited: {dead}\n{self.log_tails()}"

    def log_tails(self, n: int = 40) -> str:
        out = []
        for log in sorted(self.home.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-n:]
            out.append(f"----- {log.name} (last {len(lines)} lines)\n" + "\n".join(lines))
        for log in sorted((self.home / "logs").rglob("*.log"))[-6:]:
            lines = log.read_text(errors="replace").splitlines()[-15:]
            out.append(f"----- task log {log.relative_to(self.home)}\n" + "\n".join(lines))
        return "\n".join(out)

    # -- the REST API (what the test checks besides the page; the browser does the user's part)

    def token(self) -> str:
        body = json.dumps({"username": USER, "password": PASSWORD}).encode()
        req = urllib.request.Request(f"{self.url}/auth/token", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())["access_token"]

    def get(self, path: str, token: str | None = None, raw: bool = False):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers), timeout=30) as r:
            data = r.read()
            return data if raw else json.loads(data)

    def status(self, path: str, **headers: str) -> int:
        """The HTTP status of a GET, redirects not followed."""
        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **k):
                return None

        opener = urllib.request.build_opener(NoRedirect)
        try:
            with opener.open(urllib.request.Request(self.url + path, headers=headers), timeout=30) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def wait_for(what: str, check, deadline: float, airflow: Airflow, every: float = 2.0):
    """Poll `check()` until it returns a truthy value; fail with the Airflow logs' tails past the deadline."""
    last_error = None
    while time.monotonic() < deadline:
        airflow.check_alive()
        try:
            value = check()
            if value:
                return value
        except (OSError, urllib.error.URLError, KeyError, ValueError) as e:
            last_error = e
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what} (last error: {last_error})\n{airflow.log_tails()}")


# ---------------------------------------------------------------- the browser's part

def small_config(tmp_path: Path, small_corpus: Path, runs_root: Path) -> Path:
    """The small run of tests/test_dag.py's end-to-end test (6 shards, 2 target tasks, 20 proxy steps)."""
    import yaml

    from conftest import DATA, proxy_config

    config = proxy_config(tmp_path, small_corpus, "browser", max_steps=20, save_every=10)
    cfg = yaml.safe_load(config.read_text())
    cfg["run"]["root"] = str(runs_root)
    cfg["corpus"]["docs_per_shard"] = 20
    cfg["tasks"] = {"targets": ["arc_easy", "piqa"], "data_dir": str(DATA / "benchmarks"),
                    "docs": {"selection": [0, 8], "validation": [8, 12], "test": [12, 20]}}
    cfg["influence"] = {"max_seq_len": 64}
    config.write_text(yaml.safe_dump(cfg))
    return config


class Screens:
    def __init__(self, page):
        self.page, self.n = page, 0
        self.dir = ARTIFACTS / "browser"
        self.dir.mkdir(parents=True, exist_ok=True)

    def shot(self, name: str, full_page: bool = True) -> None:
        self.n += 1
        self.page.screenshot(path=str(self.dir / f"{self.n:02d}-{name}.png"), full_page=full_page)


def log_in(page, url: str) -> None:
    page.goto(url + "/")
    page.fill("input[name=username]", USER)
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(lambda u: "/auth/" not in u, timeout=60_000)


def trigger_from_form(page, url: str, screens: Screens, run_id: str, params: dict[str, str]) -> str:
    """Fill the DAG's trigger form as a person does (a Param's field, the run id under Advanced Options) and
    press Trigger; returns the form's error text if it refused, "" if it accepted the run."""
    page.goto(f"{url}/dags/automixer")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    for name, value in params.items():
        field = param_field(dialog, name)
        field.fill(value)
        field.press("Tab")  # a number input commits its value on blur
    dialog.get_by_role("button", name="Advanced Options").click()
    dialog.locator("input[name=dagRunId]").fill(run_id)
    screens.shot(f"trigger-form-{run_id}")
    dialog.get_by_test_id("trigger-dag-submit").click()
    try:
        dialog.wait_for(state="hidden", timeout=30_000)
        return ""
    except Exception:  # still open: the form or the server refused; its message is what the user reads
        screens.shot(f"trigger-refused-{run_id}")
        return dialog.inner_text()


def param_field(dialog, name: str):
    """The form's input for Param `name`: `#element_<name>`, or for a number the spinbutton its +/- buttons
    control (the form's labels are not tied to their inputs)."""
    plain = dialog.locator(f"[id='element_{name}']")
    if plain.count():
        return plain
    controls = dialog.locator(f"[id='number-input:element_{name}:inc']").get_attribute("aria-controls")
    return dialog.locator(f"[id='{controls}']")


def run_state(airflow: Airflow, token: str, run_id: str) -> str:
    return airflow.get(f"/api/v2/dags/automixer/dagRuns/{run_id}", token)["state"]


def test_trigger_a_run_from_the_form_and_read_its_report(tmp_path, small_corpus):
    sync_api = pytest.importorskip("playwright.sync_api")
    import duckdb

    deadline = time.monotonic() + DEADLINE
    signal.signal(signal.SIGALRM, _out_of_time)  # the hard stop, should a browser step hang past its own timeout
    signal.alarm(DEADLINE + 120)
    runs_root = tmp_path / "runs"
    runs_root.mkdir()
    config = small_config(tmp_path, small_corpus, runs_root)
    airflow = Airflow(tmp_path / "airflow", runs_root)
    airflow.setup_db()
    browser = None
    try:
        airflow.start("api-server", "api-server")
        airflow.start("scheduler", "scheduler")
        airflow.start("dag-processor", "dag-processor")
        # No triggerer: the local backend never defers.
        wait_for("the API server", lambda: airflow.get("/api/v2/monitor/health"), deadline, airflow)
        token = airflow.token()
        wait_for("the automixer DAG to be parsed", lambda: airflow.get("/api/v2/dags/automixer", token),
                 deadline, airflow)

        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.set_default_timeout(60_000)
            screens = Screens(page)
            try:
                log_in(page, airflow.url)
                screens.shot("logged-in")

                # 1. keep_fraction 2 is out of (0, 1]: refused, and the user can see why.
                refusal = trigger_from_form(page, airflow.url, screens, "bad_keep_fraction",
                                            {"config": str(config), "keep_fraction": "2"})
                if refusal:
                    assert "keep_fraction" in refusal.lower().replace(" ", "_"), refusal
                    page.get_by_role("dialog").get_by_role("button", name="Close").first.click()
                else:
                    state = wait_for("the bad run to end",
                                     lambda: (s := run_state(airflow, token, "bad_keep_fraction")) in (
                                         "success", "failed") and s, deadline, airflow)
                    assert state == "failed"
                    ti = airflow.get("/api/v2/dags/automixer/dagRuns/bad_keep_fraction/taskInstances/check_params",
                                     token)
                    assert ti["state"] == "failed"
                    log = airflow.get("/api/v2/dags/automixer/dagRuns/bad_keep_fraction/taskInstances/"
                                      f"check_params/logs/{ti['try_number']}", token)
                    assert "keep_fraction" in json.dumps(log), log
                    page.goto(f"{airflow.url}/dags/automixer/runs/bad_keep_fraction/tasks/check_params")
                    page.get_by_text("keep_fraction").first.wait_for()
                    screens.shot("bad-run-check-params-log")

                # 2. The good run, on the small config.
                assert trigger_from_form(page, airflow.url, screens, "browser_good",
                                         {"config": str(config), "token_budget": "30000",
                                          "shards_per_task": "4"}) == ""
                state = wait_for("the good run to end",
                                 lambda: (s := run_state(airflow, token, "browser_good")) in (
                                     "success", "failed") and s, deadline, airflow, every=5)
                page.goto(f"{airflow.url}/dags/automixer/runs/browser_good")
                screens.shot("good-run")
                assert state == "success", airflow.log_tails()

                # 3. The DAG run's report tab, as a person opens it.
                page.get_by_role("tab", name="AutoMixer report").or_(
                    page.get_by_role("link", name="AutoMixer report")).first.click()
                frame = page.frame_locator("iframe[title='AutoMixer report']")
                frame.locator("table#weights").wait_for()
                screens.shot("report-tab")
                check_report(frame, runs_root / "browser", duckdb)
                check_downloads(page, frame, runs_root / "browser")
                page.goto(f"{airflow.url}/automixer/dag-runs/automixer/browser_good")  # the report on its own
                assert page.url.endswith("/automixer/runs/browser/report/index.html")
                screens.shot("report")
                page.goto(f"{airflow.url}/automixer/")
                screens.shot("runs-index")
                assert "index.html" in page.locator('tr[data-run="browser"]').inner_text()
            except BaseException:
                with suppress(Exception):  # the page may be gone
                    screens.shot("failure")
                raise
            finally:
                browser.close()

        # 4. Anonymous requests to the report endpoints are refused (no redirect to a page of the run).
        report = "/automixer/runs/browser/report/index.html"
        for path in (report, "/automixer/dag-runs/automixer/browser_good", "/automixer/",
                     "/automixer/runs/browser/automixer.duckdb"):
            assert airflow.status(path) == 401, path
        assert airflow.status(report, Authorization=f"Bearer {token}") == 200
    except BaseException:
        print(airflow.log_tails())
        raise
    finally:
        signal.alarm(0)
        airflow.stop()


def _out_of_time(signum, frame):
    raise TimeoutError(f"tests/test_browser.py ran past its hard limit of {DEADLINE + 120} s")


def check_report(frame, run_dir: Path, duckdb) -> None:
    """What a person sees: the weights table equals automixer.duckdb, every image loaded, the heatmap is there."""
    con = duckdb.connect(str(run_dir / "automixer.duckdb"), read_only=True)
    expected = {g: repr(float(w)) for g, w in con.execute("SELECT group_name, weight FROM weights").fetchall()}
    con.close()
    shown = dict(frame.locator("table#weights tr[data-group]").evaluate_all(
        "rows => rows.map(r => [r.dataset.group, r.querySelector('td.weight').dataset.value])"))
    assert shown == expected and expected
    images = frame.locator("img").evaluate_all(
        "imgs => imgs.map(i => ({id: i.id, alt: i.alt, loaded: i.complete && i.naturalWidth > 0}))")
    assert images and all(i["loaded"] and i["id"] and i["alt"] for i in images), images
    assert "benchmark-heatmap" in {i["id"] for i in images}
    assert frame.locator("#benchmark-heatmap").is_visible()


def check_downloads(page, frame, run_dir: Path) -> None:
    """Every output the report links is served: the right type, the run's bytes; the DuckDB file downloads."""
    links = frame.locator("#outputs a").evaluate_all("as => as.map(a => [a.getAttribute('href'), a.href])")
    hrefs = {rel for rel, _ in links}
    for rel in ("../automixer.duckdb", "../mixture/weights.json", "../mixture/blend.txt", "summary.md",
                "invariants.json", "../selection.json"):
        assert rel in hrefs, (rel, hrefs)
    assert any(rel.startswith("../mixture/part-") and rel.endswith(".parquet") for rel in hrefs), hrefs
    types = {".duckdb": "application/octet-stream", ".parquet": "application/octet-stream",
             ".json": "application/json", ".txt": "text/plain", ".md": "text/plain"}
    for rel, absolute in links:
        r = page.request.get(absolute)
        assert r.status == 200, (rel, r.status)
        kind = types.get(Path(rel).suffix)
        if kind:
            assert r.headers["content-type"].startswith(kind), (rel, r.headers["content-type"])
        local = (run_dir / "report" / rel).resolve()
        assert r.body() == local.read_bytes(), rel
        if kind == "application/octet-stream":
            assert r.headers["content-disposition"].startswith("attachment"), rel
    with page.expect_download() as download:
        frame.locator('#outputs a[href="../automixer.duckdb"]').click()
    assert download.value.suggested_filename == "automixer.duckdb"
    assert Path(download.value.path()).read_bytes() == (run_dir / "automixer.duckdb").read_bytes()
