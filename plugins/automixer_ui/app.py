"""The FastAPI app the Airflow API server mounts at /automixer (automixer_ui_plugin.py).

    GET /                              the runs index: each run's report and mixture state, links
    GET /runs/<run>/                   one run's outputs
    GET /runs/<path under the root>    a file of a run (report/index.html, PNGs, weights.json, ...)
    GET /dag-runs/<dag_id>/<run_id>    the DAG run's report: a redirect to its report/index.html,
                                       or a page saying why there is none yet

Airflow does not protect a plugin's app: every route here depends on Airflow's own
authentication (the UI's `_token` cookie, which a same-origin iframe sends, or an
`Authorization: Bearer` token) and on read access to DAG runs, of the DAG named in the URL
or, for files, of `automixer`. Anonymous: 401 (a JSON body, no redirect).

Served files are the run's own outputs, written by the workers; they are sent with a
Content-Security-Policy that allows no script at all (nor forms, plugins or anything fetched
from elsewhere), so that an HTML file in a run directory cannot act with the user's Airflow
session. Not the CSP `sandbox` directive: a sandboxed page has an opaque origin, and the
browser would then withhold the SameSite session cookie from the report's own links.
"""

from __future__ import annotations

from urllib.parse import quote

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.common.db.common import SessionDep
from airflow.api_fastapi.core_api.security import requires_access_dag

from automixer_ui import pages
from automixer_ui.paths import Refused, inside, media_type, resolve_in_root, runs_root, servable_file
from automixer_ui.runs import RunDirUnknown, dag_run_dir, list_runs, run_info

DAG_ID = "automixer"  # files: readers of this DAG's runs may read the runs root
REPORT = "report/index.html"
# No script (script-src falls back to 'none'), nothing fetched from elsewhere, no form posts; links and
# downloads still work (the report links its outputs).
NO_SCRIPT_CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; form-action 'none'; "
                 "base-uri 'none'; frame-ancestors 'self'")
COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}

read_runs_files = Depends(requires_access_dag("GET", DagAccessEntity.RUN, param_dag_id=DAG_ID))
read_dag_run = Depends(requires_access_dag("GET", DagAccessEntity.RUN))  # the {dag_id} of the path


def base_of(request: Request) -> str:
    """Where this app is mounted ("/automixer"; "" when it runs alone, as in tests)."""
    return request.scope.get("root_path", "").rstrip("/")


def html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers={**COMMON_HEADERS, "Content-Security-Policy": NO_SCRIPT_CSP})


def refused(e: Refused) -> JSONResponse:
    return JSONResponse({"detail": str(e)}, status_code=e.status, headers=COMMON_HEADERS)


def create_app() -> FastAPI:
    app = FastAPI(title="AutoMixer runs", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", dependencies=[read_runs_files], response_class=HTMLResponse)
    def index(request: Request) -> Response:
        root = runs_root()
        return html(pages.runs_index(base_of(request), str(root), list_runs(root)))

    @app.get("/runs/{path:path}", dependencies=[read_runs_files])
    def run_file(path: str, request: Request) -> Response:
        root = runs_root()
        try:
            target = resolve_in_root(root, path)
            if target.is_dir() and target.parent == root:  # a run directory: its small index page
                if not (target / "config.yaml").is_file():
                    raise Refused(404, f"not a run directory: {path}")
                return html(pages.run_page(base_of(request), run_info(root, root / target.name)))
            target = servable_file(root, path)  # no listing of any other directory
        except Refused as e:
            return refused(e)
        kind, download = media_type(target)
        headers = {**COMMON_HEADERS, "Content-Security-Policy": NO_SCRIPT_CSP}
        return FileResponse(target, media_type=kind, headers=headers,
                            filename=target.name if download else None,
                            content_disposition_type="attachment" if download else "inline")

    @app.get("/dag-runs/{dag_id}/{run_id}", dependencies=[read_dag_run])
    def dag_run_report(dag_id: str, run_id: str, request: Request, session: SessionDep) -> Response:
        from airflow.models.dagrun import DagRun

        base = base_of(request)
        dag_run = session.query(DagRun).filter(DagRun.dag_id == dag_id, DagRun.run_id == run_id).one_or_none()
        if dag_run is None:
            return html(pages.page("AutoMixer report", f"<p id=\"no-report\">No DAG run {pages.escape(run_id)} "
                                   f"of {pages.escape(dag_id)}.</p>"), status=404)
        state = str(dag_run.state.value if hasattr(dag_run.state, "value") else dag_run.state)
        root = runs_root()
        try:
            run_dir = dag_run_dir(run_params(session, dag_id, dag_run.conf))
        except RunDirUnknown as e:
            return html(pages.no_report(base, dag_id, run_id, state, f"its run directory is unknown: {e}", None))
        resolved = run_dir.resolve()
        if not inside(root, resolved) or resolved == root:
            return html(pages.no_report(base, dag_id, run_id, state,
                                        f"its run directory {run_dir} is outside the runs root this server "
                                        "serves ($AUTOMIXER_RUNS_ROOT)", None))
        info = run_info(root, root / resolved.relative_to(root))
        if info.outputs["report"]:
            return RedirectResponse(f"{base}/runs/{quote(info.name)}/{REPORT}", status_code=307)
        why = {"failed": "the DAG run failed before the report step wrote it",
               "success": "the run finished, but report/index.html is missing"}.get(
            state, "the DAG run has not reached its report step yet")
        return html(pages.no_report(base, dag_id, run_id, state, why, info if resolved.is_dir() else None))

    return app


def run_params(session, dag_id: str, conf: dict | None) -> dict:
    """The params the DAG run's tasks see: the DAG's defaults (its serialized Params) updated by the run's conf."""
    from airflow.models.serialized_dag import SerializedDagModel

    params: dict = {}
    serialized = SerializedDagModel.get(dag_id, session=session)
    if serialized is not None:
        params.update(serialized.dag.params.dump())
    params.update(conf or {})
    return params
