"""Progress: bars on a terminal, timestamped lines elsewhere, heartbeats for long calls (automixer_ops/progress.py)."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from conftest import proxy_config

from automixer_ops.config import load_config
from automixer_ops.errors import ConfigError
from automixer_ops.prepare import prepare
from automixer_ops.progress import Progress, duckdb_percent, heartbeat, progress_every, progress_mode, watch_duckdb

STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:[+-]\d\d:\d\d|Z)"
DURATION = r"\d+(?:s|m\d\ds|h\d\dm)"
WAIT_S = 60  # the longest a test waits for a line that is due every few hundredths of a second


class Recorder(io.TextIOBase):
    """A stderr that keeps what was written and lets a test wait for a line matching a pattern."""

    def __init__(self):
        self.text, self.changed = "", threading.Condition()

    def write(self, s: str) -> int:
        with self.changed:
            self.text += s
            self.changed.notify_all()
        return len(s)

    def lines(self) -> list[str]:
        return self.text.splitlines()

    def matching(self, pattern: str) -> list[str]:
        return [line for line in self.lines() if re.search(pattern, line)]

    def wait_for(self, pattern: str, count: int = 1) -> list[str]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.matching(pattern)) >= count, timeout=WAIT_S)
        found = self.matching(pattern)
        assert len(found) >= count, f"no {count} line(s) matching {pattern!r} in:\n{self.text}"
        return found


@pytest.fixture
def lines_every_20ms(monkeypatch):
    """Lines every 20 ms; returns a function that puts a Recorder in place of stderr (in the test itself:
    pytest installs its own capture between a fixture and the test)."""
    monkeypatch.setenv("AUTOMIXER_PROGRESS", "lines")
    monkeypatch.setenv("AUTOMIXER_PROGRESS_EVERY", "0.02")

    def record_stderr() -> Recorder:
        err = Recorder()
        monkeypatch.setattr(sys, "stderr", err)
        return err
    return record_stderr


def progress_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("progress: ")]


# ---------------------------------------------------------------- the decision

class FakeStream:
    def __init__(self, tty: bool):
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_bars_on_a_terminal_lines_elsewhere_unless_forced(monkeypatch):
    monkeypatch.delenv("AUTOMIXER_PROGRESS", raising=False)
    primary, secondary = os.openpty()  # a real terminal
    try:
        with open(secondary, "w", closefd=False) as tty:
            assert progress_mode(tty) == "bars"
    finally:
        os.close(primary)
        os.close(secondary)
    read, write = os.pipe()  # what the Airflow launcher and Slurm give a step
    with open(write, "w") as pipe:
        assert progress_mode(pipe) == "lines"
    os.close(read)
    assert progress_mode(io.StringIO()) == "lines"
    for forced in ("bars", "lines", "off", " Lines "):
        monkeypatch.setenv("AUTOMIXER_PROGRESS", forced)
        assert progress_mode(FakeStream(True)) == progress_mode(FakeStream(False)) == forced.strip().lower()
    monkeypatch.setenv("AUTOMIXER_PROGRESS", "fancy")
    with pytest.raises(ConfigError, match=r"AUTOMIXER_PROGRESS='fancy': expected one of bars, lines, off"):
        progress_mode(FakeStream(True))


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("AUTOMIXER_PROGRESS_EVERY", raising=False)
    assert progress_every() == 30.0
    monkeypatch.setenv("AUTOMIXER_PROGRESS_EVERY", "2.5")
    assert progress_every() == 2.5
    for bad in ("0", "-1", "soon", "nan", "inf"):
        monkeypatch.setenv("AUTOMIXER_PROGRESS_EVERY", bad)
        with pytest.raises(ConfigError, match="AUTOMIXER_PROGRESS_EVERY"):
            progress_every()


# ---------------------------------------------------------------- lines

def test_a_line_has_time_counts_rate_eta_and_notes(monkeypatch):
    monkeypatch.setenv("AUTOMIXER_PROGRESS", "lines")
    p = Progress("train-proxy", total=300, unit="step", initial=100)
    p._t0 -= 10  # 10 s in
    p.update(20, tokens=20 * 4096)
    p.note(loss=3.21456)
    line = p.line()
    assert re.fullmatch(rf"{STAMP} train-proxy: 120/300 steps \(40%\), [\d,]+ tokens/s, ETA {DURATION}, loss 3\.215",
                        line), line
    rate = float(re.search(r"([\d,]+) tokens/s", line)[1].replace(",", ""))
    eta = re.search(r"ETA (\d+)m(\d\d)s", line)
    assert 4000 < rate <= 8192  # 81,920 tokens in 10 s (and the moments since)
    assert eta and 90 <= int(eta[1]) * 60 + int(eta[2]) <= 180  # 180 steps to go at 20 steps per 10 s
    assert re.fullmatch(rf"{STAMP} train-proxy: 120/300 steps \(40%\), [\d,]+ tokens/s, loss 3\.215, took 10s",
                        p.line(final=True))


def test_resumed_units_count_as_done_but_not_in_the_rate(monkeypatch):
    monkeypatch.setenv("AUTOMIXER_PROGRESS", "lines")
    p = Progress("score step 10", total=100, unit="doc")
    p._t0 -= 10
    p.skip(50)  # two shards scored by an earlier job
    p.update(20)
    line = p.line()
    assert re.search(r"70/100 docs \(70%\), (2|1\.9\d*) docs/s, ETA 1\ds", line), line  # 30 to go at 2 a second
    slow = Progress("evaluate", total=3, unit="checkpoint")
    slow._t0 -= 50
    slow.update(1)
    assert re.search(r"1/3 checkpoints \(33%\), 5\d s/checkpoint, ETA 1m4\ds", slow.line()), slow.line()
    assert Progress("prepare", unit="doc").line().endswith("prepare: 0 docs")  # no total: no ETA, no %


def test_lines_come_at_the_interval_and_once_more_at_the_end(lines_every_20ms):
    err = lines_every_20ms()
    with Progress("score step 10", total=40, unit="doc") as p:
        p.update(12, tokens=600)
        err.wait_for(r"12/40 docs \(30%\), [\d,]+ tokens/s, ETA", count=2)  # a steady rate, not one line
        p.update(28, tokens=1400)
        p.doing("writing part-00001.parquet")
        err.wait_for(r"40/40 docs \(100%\).*writing part-00001\.parquet running, " + DURATION)
    lines = err.lines()
    assert all(re.match(rf"{STAMP} score step 10: ", line) for line in lines), lines
    assert re.fullmatch(rf"{STAMP} score step 10: 40/40 docs \(100%\), [\d,]+ tokens/s, took {DURATION}", lines[-1])
    assert not progress_threads()


def test_off_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv("AUTOMIXER_PROGRESS", "off")
    monkeypatch.setenv("AUTOMIXER_PROGRESS_EVERY", "0.01")
    with Progress("train-proxy", total=3) as p, heartbeat("regroup", "08_groups.sql"):
        assert not progress_threads()
        p.update(3, tokens=10)
    assert capsys.readouterr().err == ""


def test_bars_show_done_total_rate_and_eta(monkeypatch):
    monkeypatch.setenv("AUTOMIXER_PROGRESS", "bars")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with Progress("train-proxy", total=10, unit="step") as p:
        logged = []
        log = p.log_through(logged.append)
        for _ in range(4):
            p.update(1, tokens=100)
        log("step      4  loss 3.0")
    out = err.getvalue()
    assert "train-proxy:" in out and "4/10" in out and re.search(r"\[\d\d:\d\d<\d\d:\d\d, ", out), out  # elapsed<ETA
    assert "step/s" in out or "s/step" in out
    assert logged == ["step      4  loss 3.0"]
    assert not re.search(STAMP, out)  # no timestamped lines on a terminal


# ---------------------------------------------------------------- heartbeats

def test_heartbeat_beats_while_a_call_runs_and_stops_after_it(lines_every_20ms):
    err = lines_every_20ms()

    def slow_call():  # returns once the heartbeat has spoken three times
        err.wait_for(r"regroup: 07_joint_scores\.sql running, \d+s \(45%\)$", count=3)
        return 42

    with heartbeat("regroup", "07_joint_scores.sql", percent=lambda: 45.0) as beat:
        assert slow_call() == 42
        beat.doing("08_groups.sql")
        beat.percent = None
        err.wait_for(r"regroup: 08_groups\.sql running, \d+s$")
    after = err.text
    assert not progress_threads()
    time.sleep(0.2)  # ten intervals: a thread left behind would have written
    assert err.text == after
    assert all(re.fullmatch(rf"{STAMP} regroup: 0[78]_\w+\.sql running, {DURATION}( \(45%\))?", line)
               for line in err.lines()), err.text  # and no end line: the step says when it is done


def test_heartbeat_stops_when_the_call_raises(lines_every_20ms):
    err = lines_every_20ms()
    with pytest.raises(RuntimeError, match="DuckDB ran out of disk"):
        with heartbeat("mix", "writing the mixture's parts", percent=lambda: 1 / 0):  # a failing percent too
            err.wait_for(r"mix: writing the mixture's parts running, \d+s$", count=2)
            raise RuntimeError("DuckDB ran out of disk")
    after = err.text
    assert not progress_threads()
    time.sleep(0.2)
    assert err.text == after


def test_a_broken_stderr_does_not_break_the_step(monkeypatch):
    monkeypatch.setenv("AUTOMIXER_PROGRESS", "lines")
    monkeypatch.setenv("AUTOMIXER_PROGRESS_EVERY", "0.01")

    class Broken(io.TextIOBase):
        def write(self, s):
            raise BrokenPipeError("the log reader went away")

    monkeypatch.setattr(sys, "stderr", Broken())
    with heartbeat("regroup", "08_groups.sql") as beat:
        time.sleep(0.2)  # twenty beats that cannot be written
        assert beat._thread.is_alive()
    assert not progress_threads()


def test_a_duckdb_statement_s_heartbeat_says_how_far_it_is(lines_every_20ms):
    import duckdb

    err = lines_every_20ms()
    con = duckdb.connect()
    watch_duckdb(con)
    percent = duckdb_percent(con)
    assert percent() is None  # nothing running
    for _ in range(3):  # DuckDB reports progress once a statement has run a while: a second or so here
        with heartbeat("regroup", "07_joint_scores.sql", percent=percent):
            (n,) = con.execute("SELECT count(*) FROM range(200000000) r WHERE hash(r.range) % 7 = 1").fetchone()
        if err.matching(r"\(\d+%\)$"):
            break
    assert n > 0 and err.matching(rf"{STAMP} regroup: 07_joint_scores\.sql running, {DURATION} \(\d+%\)$"), err.text
    assert "%" not in "".join(line for line in err.lines() if not re.search(STAMP, line))  # no bar of DuckDB's
    con.close()


# ---------------------------------------------------------------- a real step

def test_training_off_a_terminal_logs_timestamped_progress_lines(small_corpus, tmp_path):
    """`automixer train-proxy` with stderr a pipe (as the Airflow launcher and Slurm run it): lines, no bars."""
    config = proxy_config(tmp_path, small_corpus, "progress", max_steps=8, save_every=4, log_every=4)
    prepare(load_config(config), log=lambda _: None)
    env = {**os.environ, "AUTOMIXER_PROGRESS_EVERY": "0.05"}
    env.pop("AUTOMIXER_PROGRESS", None)
    proc = subprocess.run([sys.executable, "-m", "automixer_ops", "train-proxy", "-c", str(config)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "\r" not in err, err  # no bar of ours or of transformers' redrawn into the log
    progress = [line for line in err.splitlines() if re.match(rf"{STAMP} ", line)]
    assert progress, err
    assert re.search(rf" train-proxy: 8/8 steps \(100%\), [\d,]+ tokens/s, loss \d\.\d+, took {DURATION}$",
                     progress[-1]), err  # the end line, once
    assert sum(" took " in line for line in progress) == 2  # the packing's and the training's
    assert all(re.fullmatch(rf"{STAMP} (pack proxy/tokens\.bin|train-proxy): .+", line) for line in progress), err
    assert re.search(r"pack proxy/tokens\.bin: \d+/\d+ docs \(100%\), [\d,]+ tokens/s, took", err), err
    # the log's own lines are still there
    assert "step      4  loss" in err and "step      8  loss" in err
