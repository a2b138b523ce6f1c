"""TiKMiX online mode: checkpoints dropped one by one into a watched directory publish exactly one weights
version each (Group Influence on the tiny proxy's real checkpoints, TiKMiX-D from the previous version), a rerun
publishes nothing, half-written checkpoints are ignored; and the `automixer_tikmix_online` DAG does the same
under a real Airflow (dag.test() in a fresh SQLite home)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import duckdb
import pytest
import yaml

from conftest import arc_pairs, piqa_pairs, write_valset

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", str(Path(tempfile.gettempdir()) / "automixer-test-airflow"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")

STAGE_TOKENS = 20_000
REPETITION_FACTOR = 4.0  # tikmix.d's default


@pytest.fixture(scope="module")
def online_run(trained, small_corpus, tmp_path_factory):
    """A prepared run (the trained proxy's tokenizer) with two tasks' validation sets: (config path, Config, the
    proxy's checkpoints by step to drop into a watched directory)."""
    from automixer_ops.config import load_config
    from automixer_ops.prepare import prepare

    _, trained_dir = trained
    tmp = tmp_path_factory.mktemp("online")
    config = tmp / "online.yaml"
    config.write_text(yaml.safe_dump({
        "run": {"id": "online", "root": str(tmp / "runs")},
        "corpus": {"paths": [str(small_corpus / "*.jsonl")], "source_field": "domain"},
        "tokenizer": {"path": str(trained_dir / "tokenizer")},
        "tasks": {"targets": ["piqa", "arc_easy"]},
        "influence": {"max_seq_len": 64, "batch_tokens": 512, "device": "cpu"},
        "tikmix": {"per_group": 3, "stage_tokens": STAGE_TOKENS},
    }))
    cfg = load_config(config)
    prepare(cfg, log=lambda _: None)
    write_valset(cfg.run_dir, "piqa", piqa_pairs(6))
    write_valset(cfg.run_dir, "arc_easy", arc_pairs(6))
    return config, cfg, {s: trained_dir / "checkpoints" / f"step-{s}" for s in (10, 20, 30)}


def drop(src: Path, watch: Path, name: str) -> Path:
    """A finished checkpoint, as a trainer leaves it: copied in, last written an hour ago (settled)."""
    dst = watch / name
    shutil.copytree(src, dst)
    settle(dst)
    return dst


def settle(path: Path, age: float = 3600) -> None:
    t = time.time() - age
    for p in [*path.iterdir(), path]:
        os.utime(p, (t, t))


def half_written(src: Path, watch: Path, name: str) -> Path:
    """A checkpoint cut short: config.json there, its safetensors half its size."""
    dst = watch / name
    dst.mkdir()
    shutil.copy2(src / "config.json", dst / "config.json")
    data = (src / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    settle(dst)
    return dst


def table(db: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def parse_blend(text: str) -> dict[str, float]:
    """Megatron-LM's --data-path: weight prefix weight prefix ..."""
    items = text.split()
    assert len(items) % 2 == 0
    return {prefix.removesuffix("_text_document"): float(w) for w, prefix in zip(items[::2], items[1::2])}


def check_version(out: Path, name: str, groups: list[str]) -> dict:
    """The version directory's four files agree: weights sum to 1, blend and Olmix file say the same."""
    vdir = out / "versions" / name
    assert sorted(p.name for p in vdir.iterdir()) == ["blend.txt", "domain_weights.json", "solve.json",
                                                       "weights.json"]
    summary = json.loads((vdir / "weights.json").read_text())
    weights = summary["weights"]
    assert sorted(weights) == groups
    assert sum(weights.values()) == pytest.approx(1, abs=1e-9)
    blend = parse_blend((vdir / "blend.txt").read_text())
    assert sum(blend.values()) == pytest.approx(1, abs=1e-5)
    assert blend == pytest.approx({g: w for g, w in weights.items() if round(w, 6) > 0}, abs=1e-6)
    olmix = json.loads((vdir / "domain_weights.json").read_text())
    assert olmix == [{"domain": g, "weight": w} for g, w in weights.items()]
    solve = json.loads((vdir / "solve.json").read_text())
    assert solve["weights"] == pytest.approx(weights, abs=1e-12)
    return summary


@pytest.mark.slow
def test_each_checkpoint_dropped_in_publishes_one_version_chained_from_the_last(online_run, tmp_path, monkeypatch):
    from automixer_ops.tikmix import online
    from automixer_ops.tikmix.online import publish_new_checkpoints

    _, cfg, ckpts = online_run
    watch, out = tmp_path / "watch", tmp_path / "out"
    watch.mkdir()
    db = out / "tikmix.duckdb"
    lines: list[str] = []

    def scan():
        return publish_new_checkpoints(cfg, watch, out, "d", log=lines.append)

    # The corpus' groups and tokens, read here from its shards.
    with duckdb.connect() as con:
        counts = con.execute(f"""SELECT source, sum(n_tokens) FROM read_parquet('{cfg.run_dir}/corpus/part-*.parquet')
                                 GROUP BY source ORDER BY source""").fetchall()
    groups, tokens = [g for g, _ in counts], [int(t) for _, t in counts]
    natural = {g: t / sum(tokens) for g, t in counts}
    assert len(groups) == 9

    # Nothing yet: nothing published, no latest.
    assert scan() == []
    assert not (out / "latest").exists() and not (out / "weights.json").exists()

    # step-10 arrives, beside a checkpoint still being written (step-20, cut short). A crash after the version
    # directory is written but before its `published` row: the version does not count, the next scan redoes it.
    drop(ckpts[10], watch, "step-10")
    half_written(ckpts[20], watch, "step-20")
    def killed(*_):
        raise RuntimeError("killed")

    real_record = online.record_published
    monkeypatch.setattr(online, "record_published", killed)
    with pytest.raises(RuntimeError, match="killed"):
        scan()
    assert not (out / "latest").exists() and online.read_published(db) == []
    monkeypatch.setattr(online, "record_published", real_record)

    [v1] = scan()
    assert (v1["name"], v1["step"], v1["checkpoint"]) == ("v0001", 10, str(watch / "step-10"))
    assert any("skipping" in line and "step-20" in line and "truncated" in line for line in lines)
    s1 = check_version(out, "v0001", groups)
    prov = s1["provenance"]
    assert prov["previous_version"] is None
    assert prov["w_prev"] == pytest.approx(natural, abs=1e-12)  # the first stage starts from the natural shares
    assert prov["checkpoint"]["step"] == 10 and prov["stage_tokens"] == STAGE_TOKENS
    caps = json.loads((out / "versions" / "v0001" / "solve.json").read_text())["caps"]
    assert caps == pytest.approx({g: min(1.0, REPETITION_FACTOR * t / STAGE_TOKENS) for g, t in zip(groups, tokens)})
    assert os.readlink(out / "latest") == "versions/v0001"
    assert (out / "weights.json").read_text() == (out / "versions" / "v0001" / "weights.json").read_text()

    # A rerun publishes nothing, and writes nothing new.
    before = sorted(p.name for p in (out / "versions").iterdir())
    assert scan() == []
    assert sorted(p.name for p in (out / "versions").iterdir()) == before == ["v0001"]
    assert json.loads((out / "last_scan.json").read_text())["published"] == []

    # step-20 finishes (rewritten whole), step-30 arrives: two versions in step order, each from the one before.
    shutil.rmtree(watch / "step-20")
    drop(ckpts[20], watch, "step-20")
    drop(ckpts[30], watch, "step-30")
    v2, v3 = scan()
    assert [(v["name"], v["step"], v["previous_version"]) for v in (v2, v3)] == [("v0002", 20, 1), ("v0003", 30, 2)]
    s2, s3 = check_version(out, "v0002", groups), check_version(out, "v0003", groups)
    assert s2["provenance"]["w_prev"] == pytest.approx(s1["weights"], abs=1e-12)
    assert s3["provenance"]["w_prev"] == pytest.approx(s2["weights"], abs=1e-12)
    assert os.readlink(out / "latest") == "versions/v0003"
    assert json.loads((out / "weights.json").read_text()) == s3
    assert [p["version"] for p in json.loads((out / "last_scan.json").read_text())["published"]] == ["v0002", "v0003"]

    # A checkpoint older than the latest published one is not published (stale weights would become "latest").
    drop(ckpts[10], watch, "step-5")
    assert scan() == []
    assert any("step-5" in line and "before the latest published" in line for line in lines)
    shutil.rmtree(watch / "step-5")

    # The same checkpoint rewritten under its name (new files): a new version.
    (watch / "step-30" / "notes.txt").write_text("re-saved\n")
    settle(watch / "step-30")
    [v4] = scan()
    assert (v4["name"], v4["step"], v4["previous_version"]) == ("v0004", 30, 3)
    assert v4["identity"] != v3["identity"]

    # DuckDB: one `published` row per version; weights and Group Influence recorded per version and checkpoint.
    rows = table(db, "SELECT version, name, checkpoint, step, identity, files FROM published ORDER BY version")
    assert [(r[0], r[1], r[3]) for r in rows] == [(1, "v0001", 10), (2, "v0002", 20), (3, "v0003", 30),
                                                   (4, "v0004", 30)]
    assert len({r[4] for r in rows}) == 4
    assert rows[0][5] == [f"versions/v0001/{f}" for f in ("weights.json", "blend.txt", "domain_weights.json",
                                                           "solve.json")]
    weights = table(db, """SELECT version, count(*), sum(weight) FROM tikmix_weights GROUP BY version
                           ORDER BY version""")
    assert [(v, n) for v, n, _ in weights] == [(f"online-v000{i}", 9) for i in range(1, 5)]
    assert all(abs(s - 1) < 1e-9 for _, _, s in weights)
    stored = dict(table(db, "SELECT group_name, weight FROM tikmix_weights WHERE version = 'online-v0002'"))
    assert stored == pytest.approx(s2["weights"], abs=1e-12)
    chained = dict(table(db, "SELECT group_name, w_prev FROM tikmix_weights WHERE version = 'online-v0003'"))
    assert chained == pytest.approx(s2["weights"], abs=1e-12)
    gi = table(db, "SELECT checkpoint, step, count(*), count(DISTINCT task) FROM group_influence "
                   "GROUP BY checkpoint, step ORDER BY step, checkpoint")
    assert len(gi) == 4 and all(n == 2 * 9 and t == 2 for _, _, n, t in gi)
    assert {c for c, *_ in gi} == {f"step-{r[3]}-{r[4]}" for r in rows}
    assert sorted(p.name for p in (out / "gi").iterdir()) == sorted(c for c, *_ in gi)  # cached per checkpoint


def test_half_written_and_temporary_checkpoints_are_not_ready(online_run, tmp_path):
    from automixer_ops.tikmix.online import find_checkpoints

    _, _, ckpts = online_run
    src = ckpts[10]
    drop(src, tmp_path, "checkpoint-100")            # HF Trainer's name: ready
    drop(src, tmp_path, "iter_0000200")              # Megatron's: ready
    drop(src, tmp_path, ".step-300")                 # hidden
    drop(src, tmp_path, "step-400.tmp")              # a temporary name
    drop(src, tmp_path, "final")                     # no step number
    half_written(src, tmp_path, "step-500")          # weights cut short
    drop(src, tmp_path, "step-600")
    (tmp_path / "step-600" / ".incomplete").write_text("")  # the trainer's in-progress marker
    drop(src, tmp_path, "step-700")
    (tmp_path / "step-700" / ".model.safetensors.1a2b.tmp").write_bytes(b"x")  # a file still being written
    drop(src, tmp_path, "step-800")
    (tmp_path / "step-800" / "config.json").unlink()
    drop(src, tmp_path, "step-900")
    settle(tmp_path / "step-900", age=0)             # complete, but written just now
    (tmp_path / "notes-1000.txt").write_text("not a directory")
    (tmp_path / "best-100").symlink_to(tmp_path / "checkpoint-100")  # a trainer's link to one listed already
    lines: list[str] = []
    found = find_checkpoints(tmp_path, settle_seconds=600, log=lines.append)
    assert [(c.name, c.step) for c in found] == [("checkpoint-100", 100), ("iter_0000200", 200)]
    why = {name: next(line for line in lines if f"/{name}:" in line) for name in
           (".step-300", "step-400.tmp", "final", "step-500", "step-600", "step-700", "step-800", "step-900")}
    assert "temporary" in why[".step-300"] and "temporary" in why["step-400.tmp"]
    assert "no step number" in why["final"] and "truncated" in why["step-500"]
    assert ".incomplete" in why["step-600"] and "still being written" in why["step-700"]
    assert "no config.json" in why["step-800"] and "quiet 600 s" in why["step-900"]
    assert [c.name for c in find_checkpoints(tmp_path, settle_seconds=0, log=lines.append)] == [
        "checkpoint-100", "iter_0000200", "step-900"]

    from automixer_ops.errors import AutomixerError

    drop(src, tmp_path, "step-100")
    with pytest.raises(AutomixerError, match="two checkpoints of step 100"):
        find_checkpoints(tmp_path, settle_seconds=600, log=lines.append)


def test_a_second_scan_of_the_same_output_exits_transient(online_run, tmp_path):
    from automixer_ops.errors import TransientError
    from automixer_ops.rundir import file_lock
    from automixer_ops.tikmix.online import publish_new_checkpoints

    _, cfg, ckpts = online_run
    (tmp_path / "watch").mkdir()
    drop(ckpts[10], tmp_path / "watch", "step-10")
    out = tmp_path / "out"
    with file_lock(out / ".lock", shared=False, busy="held"):  # another scan, mid-publish
        with pytest.raises(TransientError, match="another tikmix-online scan"):
            publish_new_checkpoints(cfg, tmp_path / "watch", out, log=lambda _: None)
    assert not (out / "versions").exists()


# ---------------------------------------------------------------- the DAG

@pytest.fixture(scope="module")
def dagmod():
    spec = importlib.util.spec_from_file_location("automixer_tikmix_online_under_test",
                                                  ROOT / "dags" / "automixer_tikmix_online.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dag_shape_params_and_command(dagmod, tmp_path):
    from airflow.sdk.exceptions import ParamValidationError
    from airflow.serialization.serialized_objects import DagSerialization

    dag = dagmod.automixer_tikmix_online_dag
    assert dag.dag_id == "automixer_tikmix_online" and dag.catchup is False and dag.max_active_runs == 1
    assert dag.timetable.expression == "*/10 * * * *"
    [task] = dag.tasks
    assert [a.name for a in task.outlets] == ["automixer_tikmix_weights"] and task.pool == dagmod.GPU_POOL
    for name, bad in [("watch_dir", "relative/dir"), ("out_dir", "out"), ("config", "c.yaml"), ("variant", "x"),
                      ("watch_dir", "/a\nb")]:
        with pytest.raises(ParamValidationError):
            dag.params.get_param(name).resolve(bad)
    params = {"config": "/c/run.yaml", "watch_dir": "/ckpts", "out_dir": "/weights", "variant": "m",
              "backend": "local", "backend_settings": None}
    task.render_template_fields({"params": params})
    assert task.argv({"params": params}) == ["automixer", "tikmix-online", "-c", "/c/run.yaml", "--watch", "/ckpts",
                                             "--out", "/weights", "--variant", "m"]
    assert set(DagSerialization.from_dict(DagSerialization.to_dict(dag)).task_ids) == {"publish"}


RUN_DAG = textwrap.dedent("""
    import json, os, subprocess, sys
    from pathlib import Path
    home = Path(os.environ["AIRFLOW_HOME"])
    if not (home / ".migrated").exists():
        subprocess.run([str(Path(sys.executable).with_name("airflow")), "db", "migrate"], check=True,
                       stdout=subprocess.DEVNULL)
        (home / ".migrated").touch()
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.pool import Pool
    Pool.create_or_update_pool("automixer_gpu", slots=1, description="GPU steps", include_deferred=False)
    dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag("automixer_tikmix_online")
    run = dag.test(run_conf=json.loads(sys.argv[1]))
    value = lambda s: getattr(s, "value", s)
    print(json.dumps({"state": value(run.state),
                      "tasks": {ti.task_id: value(ti.state) for ti in run.get_task_instances()}}))
""")


@pytest.mark.e2e
@pytest.mark.slow
def test_the_dag_publishes_one_version_per_new_checkpoint_and_nothing_when_none_is_new(online_run, tmp_path):
    config, _, ckpts = online_run
    watch, out, home = tmp_path / "watch", tmp_path / "out", tmp_path / "airflow"
    watch.mkdir()
    home.mkdir()
    env = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
           "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
           "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AUTOMIXER_TASK_RETRIES": "0", "TQDM_DISABLE": "1"}
    conf = {"config": str(config), "watch_dir": str(watch), "out_dir": str(out), "variant": "d"}

    def run_dag() -> dict:
        p = subprocess.run([sys.executable, "-c", RUN_DAG, json.dumps(conf)], capture_output=True, text=True,
                           env=env, timeout=600)
        assert p.returncode == 0, (p.stdout + p.stderr)[-6000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    def events() -> list[dict]:
        with sqlite3.connect(home / "airflow.db") as db:
            rows = db.execute("SELECT a.name, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                              "ORDER BY e.id").fetchall()
        assert {name for name, _ in rows} <= {"automixer_tikmix_weights"}
        return [json.loads(extra) for _, extra in rows]

    drop(ckpts[10], watch, "step-10")
    assert run_dag() == {"state": "success", "tasks": {"publish": "success"}}
    assert [r[0] for r in table(out / "tikmix.duckdb", "SELECT name FROM published")] == ["v0001"]
    [e1] = events()
    assert e1["published"] == ["v0001"] and e1["latest"] == "v0001"
    assert e1["checkpoints"] == {"v0001": str(watch / "step-10")}
    assert sum(e1["weights"].values()) == pytest.approx(1, abs=1e-5)

    drop(ckpts[20], watch, "step-20")
    assert run_dag()["tasks"] == {"publish": "success"}
    assert [r[0] for r in table(out / "tikmix.duckdb", "SELECT name FROM published ORDER BY version")] == [
        "v0001", "v0002"]
    assert [e["published"] for e in events()] == [["v0001"], ["v0002"]]
    assert os.readlink(out / "latest") == "versions/v0002"

    # Nothing new: nothing published, the task ends skipped and no asset event fires.
    assert run_dag() == {"state": "success", "tasks": {"publish": "skipped"}}
    assert [r[0] for r in table(out / "tikmix.duckdb", "SELECT name FROM published ORDER BY version")] == [
        "v0001", "v0002"]
    assert len(events()) == 2
    assert sorted(p.name for p in (out / "versions").iterdir()) == ["v0001", "v0002"]
