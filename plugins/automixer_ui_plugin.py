"""Airflow plugin: the AutoMixer runs in the Airflow UI (package automixer_ui).

- a FastAPI app mounted by the API server at /automixer: the runs index, each run's report
  and outputs (automixer_ui/app.py has the routes and the access rules);
- an external view on every DAG run's page, "AutoMixer report", that opens that run's
  report (an iframe on /automixer/dag-runs/{DAG_ID}/{RUN_ID}), and a nav entry for the index.

Every Airflow component imports the plugins folder, so this module stays light: the app is
built on its first request, in the API server only.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from airflow.configuration import conf
from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/automixer"
# The UI puts href in an iframe as it is: prefix the path part of [api] base_url, if any.
BASE_PATH = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


class LazyApp:
    """An ASGI app that builds automixer_ui's FastAPI app on its first request."""

    def __init__(self):
        self._app = None

    async def __call__(self, scope, receive, send):
        if self._app is None:
            from automixer_ui.app import create_app

            self._app = create_app()
        await self._app(scope, receive, send)


class AutomixerUIPlugin(AirflowPlugin):
    name = "automixer_ui"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "AutoMixer runs"}]
    external_views = [
        {"name": "AutoMixer report", "href": f"{BASE_PATH}{URL_PREFIX}/dag-runs/{{DAG_ID}}/{{RUN_ID}}",
         "destination": "dag_run", "url_route": "automixer-report"},
        {"name": "AutoMixer runs", "href": f"{BASE_PATH}{URL_PREFIX}/", "destination": "nav",
         "category": "browse", "url_route": "automixer-runs"},
    ]
