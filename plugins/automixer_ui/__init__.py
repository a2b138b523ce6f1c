"""The AutoMixer runs in the Airflow UI: a FastAPI app the API server mounts (plugin
`automixer_ui_plugin.py`) that lists the run directories under the runs root and serves
their reports and outputs, plus a "AutoMixer report" tab on each DAG run's page.

- `paths`: the runs root (`AUTOMIXER_RUNS_ROOT`) and the one rule for serving a file: its
  resolved path (symlinks and `..` resolved) must lie inside the resolved root.
- `runs`: which run directories exist and what they hold; a DAG run's run directory.
- `pages`: the small HTML pages (runs index, "no report yet").
- `app`: the routes, each behind Airflow's own authentication.

A regular package on `sys.path` (Airflow adds its plugins folder), listed in
`plugins/.airflowignore` so that the plugin loader does not import its modules by bare name.
"""
