"""Progress of the long steps: bars on a terminal, timestamped lines in logs, heartbeats for long calls.

This module alone decides how progress is shown (`progress_mode`), from two environment variables:

    AUTOMIXER_PROGRESS=bars|lines|off  force a mode; unset: bars when stderr is a terminal, else lines
    AUTOMIXER_PROGRESS_EVERY=SECONDS   seconds between two progress lines (default 30); a heartbeat
                                       line comes as often

Bars are tqdm's, with done/total, rate and ETA. Lines are for Airflow task logs and Slurm logs, which
keep every byte a bar would redraw: one per interval while a loop runs, and one at its end:

    2026-01-02T10:00:00+00:00 train-proxy: 120/300 steps (40%), 35,120 tokens/s, ETA 1m33s, loss 3.214

A step that is one long call (a DuckDB statement, lm-eval on a checkpoint) runs inside a `heartbeat`,
which says what it is doing and for how long (and how far, when the call can tell):

    2026-01-02T10:00:30+00:00 regroup: 07_joint_scores.sql running, 1m30s (45%)

Everything goes to stderr. The lines come from a daemon thread that the `with` block starts and stops
(joined on the way out, whether the block ends or raises), so a loop only adds to counters: no clock,
no formatting, no I/O per item. A failed block prints no end line: the error is the step's last line.
`off` prints none of this; the steps' own log lines are unchanged in every mode.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from datetime import datetime
from typing import Callable

from automixer_ops.errors import ConfigError

MODE_ENV, EVERY_ENV = "AUTOMIXER_PROGRESS", "AUTOMIXER_PROGRESS_EVERY"
MODES = ("bars", "lines", "off")
DEFAULT_EVERY_S = 30.0
BAR_REFRESH_S = 1.0  # a bar's elapsed time and postfix tick this often while nothing is counted


def progress_mode(stream=None) -> str:
    """'bars', 'lines' or 'off': AUTOMIXER_PROGRESS when set, else bars when `stream` (stderr) is a terminal."""
    forced = os.environ.get(MODE_ENV, "").strip().lower()
    if forced:
        if forced not in MODES:
            raise ConfigError(f"{MODE_ENV}={os.environ[MODE_ENV]!r}: expected one of {', '.join(MODES)} "
                              "(unset: bars on a terminal, lines otherwise)")
        return forced
    stream = sys.stderr if stream is None else stream
    try:
        return "bars" if stream.isatty() else "lines"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return "lines"


def progress_every() -> float:
    """Seconds between progress lines: AUTOMIXER_PROGRESS_EVERY, else DEFAULT_EVERY_S."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        every = float(raw)
    except ValueError:
        every = math.nan
    if not (math.isfinite(every) and every > 0):
        raise ConfigError(f"{EVERY_ENV}={raw!r}: expected a number of seconds > 0")
    return every


def quiet_library_bars() -> None:
    """Off a terminal, transformers' and datasets' own bars ("Loading weights", "Map") become one long line of
    carriage returns per bar in a log: turn them off there. On a terminal they stay."""
    if progress_mode() == "bars":
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


class Progress:
    """A loop's progress (with `unit`: done of `total` units, optionally tokens for the rate) and what it is
    doing now (`doing`), shown as a bar or as timestamped lines; use it as a context manager.

    update(n, tokens) is all a loop calls per item; note(loss=...) adds values to the next line."""

    def __init__(self, name: str, total: int | None = None, unit: str | None = "step", initial: int = 0,
                 doing: str | None = None, percent: Callable[[], float | None] | None = None,
                 summary: bool = True):
        self.name, self.total, self.unit, self.initial = name, total, unit, initial
        self.done, self.tokens = initial, 0
        self.summary = summary  # an end line (lines) or a bar left on screen (bars) when the block ends well
        self.percent = percent  # how far the current call is, 0..100 (None or < 0: unknown); may raise
        self.notes: dict[str, object] = {}
        self.mode = progress_mode()
        self.every = progress_every() if self.mode == "lines" else BAR_REFRESH_S
        self._doing, self._doing_since = doing, time.monotonic()
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bar = None

    # ---------------------------------------------------------------- what the loop calls

    def update(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(n)

    def skip(self, n: int = 1) -> None:
        """n units found already done (a resumed step): counted as done, left out of the rate and ETA."""
        self.done += n
        self.initial += n
        if self._bar is not None:
            self._bar.update(n)

    def note(self, **values) -> None:
        """Values shown after the counts (`loss=3.2`); floats are shown with 4 significant digits."""
        self.notes.update(values)

    def doing(self, what: str | None) -> None:
        """What the step is doing now (shown with how long it has been at it); None: nothing in particular."""
        self._doing, self._doing_since = what, time.monotonic()

    def log_through(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log`, made to print above the bars on a terminal instead of through them (as is, in other modes)."""
        if self.mode != "bars":
            return log

        def above_bars(message: str) -> None:
            from tqdm import tqdm

            with tqdm.external_write_mode(file=sys.stderr):
                log(message)
        return above_bars

    # ---------------------------------------------------------------- start and stop

    def __enter__(self) -> "Progress":
        if self.mode == "off":
            return self
        if self.mode == "bars":
            self._bar = self._make_bar()
        self._thread = threading.Thread(target=self._tick_until_stopped, name=f"progress: {self.name}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close(ok=exc_type is None)
        return False

    def close(self, ok: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)  # it only formats and writes one line; never hold the step up for it
            self._thread = None
        if self._bar is not None:
            try:
                if ok:
                    self._refresh_bar()
                self._bar.close()
            except Exception:
                pass
            self._bar = None
        elif ok and self.summary and self.mode == "lines":
            try:
                self._write(self.line(final=True))
            except Exception:  # a closed or broken stderr: the step's work is done all the same
                pass

    # ---------------------------------------------------------------- output

    def line(self, final: bool = False) -> str:
        """One progress line: the time, the step's name, the counts, rate, ETA, notes and what it is doing."""
        now = time.monotonic()
        elapsed = now - self._t0
        parts = []
        if self.unit is not None:
            parts += self._counts(elapsed, final)
        parts += [f"{k} {_show(v)}" for k, v in self.notes.items()]
        if final:
            parts.append(f"took {duration(elapsed)}")
        elif self._doing:
            parts.append(f"{self._doing} running, {duration(now - self._doing_since)}{self._percent_text()}")
        return f"{timestamp()} {self.name}: {', '.join(parts)}"

    def _counts(self, elapsed: float, final: bool) -> list[str]:
        units = _plural(self.unit)
        done, ran = self.done, self.done - self.initial
        if self.total:
            parts = [f"{done:,}/{self.total:,} {units} ({100 * done / self.total:.0f}%)"]
        else:
            parts = [f"{done:,} {units}"]
        if elapsed > 0 and self.tokens:
            parts.append(f"{self.tokens / elapsed:,.0f} tokens/s")
        elif elapsed > 0 and ran:  # as tqdm does: units a second, or seconds a unit when slower
            parts.append(f"{ran / elapsed:,.3g} {units}/s" if ran >= elapsed else f"{elapsed / ran:,.3g} s/{self.unit}")
        if self.total and not final and done < self.total:
            parts.append(f"ETA {duration((self.total - done) * elapsed / ran)}" if ran > 0 else "ETA ?")
        return parts

    def _percent_text(self) -> str:
        if self.percent is None:
            return ""
        try:
            p = self.percent()
        except Exception:  # the call it watches may be ending right now; the beat goes on without it
            return ""
        return f" ({p:.0f}%)" if p is not None and 0 <= p <= 100 else ""

    def _tick_until_stopped(self) -> None:
        while not self._stop.wait(self.every):
            try:
                if self._bar is not None:
                    self._refresh_bar()
                else:
                    self._write(self.line())
            except Exception:  # a closed or broken stderr must not end the step
                pass

    def _make_bar(self):
        from tqdm import tqdm

        if self.unit is None:  # a heartbeat: a status line that goes away when the call ends
            return tqdm(desc=f"{self.name}: {self._doing or ''}", file=sys.stderr, bar_format="{desc}", leave=False,
                        dynamic_ncols=True)
        return tqdm(desc=self.name, total=self.total, initial=self.initial, unit=self.unit, file=sys.stderr,
                    leave=self.summary, dynamic_ncols=True, mininterval=0.5)

    def _refresh_bar(self) -> None:
        now = time.monotonic()
        parts = [f"{self.tokens / (now - self._t0):,.0f} tok/s"] if self.tokens and now > self._t0 else []
        parts += [f"{k} {_show(v)}" for k, v in self.notes.items()]
        if self._doing:
            parts.append(f"{self._doing} running, {duration(now - self._doing_since)}{self._percent_text()}")
        if self.unit is None:
            self._bar.set_description_str(f"{self.name}: {', '.join(parts)}", refresh=False)
        else:
            self._bar.set_postfix_str(", ".join(parts), refresh=False)
        self._bar.refresh()

    @staticmethod
    def _write(line: str) -> None:
        stream = sys.stderr  # looked up now: whatever stderr is when the line is due
        stream.write(line + "\n")  # one write, so lines from two threads never interleave within a line
        stream.flush()


def heartbeat(name: str, what: str, percent: Callable[[], float | None] | None = None) -> Progress:
    """A context manager for one long call: while it runs, a line every AUTOMIXER_PROGRESS_EVERY seconds says
    `name: what running, <time>` (and the `percent` done, when given); on a terminal, a status line. Change
    `what` with .doing() as the step moves on to its next call."""
    return Progress(name, unit=None, doing=what, percent=percent, summary=False)


def duckdb_percent(con) -> Callable[[], float | None]:
    """How far the statement running on DuckDB connection `con` is, for a heartbeat (needs
    `enable_progress_bar`; `watch_duckdb` turns it on without DuckDB's own printing)."""
    def percent() -> float | None:
        p = con.query_progress()
        return p if p >= 0 else None
    return percent


def watch_duckdb(con) -> None:
    """Let `duckdb_percent` see how far a statement is: DuckDB tracks progress only with its progress bar on,
    and prints it unless told not to (its bar would garble the logs and the step's stdout)."""
    con.execute("SET enable_progress_bar_print = false")
    con.execute("SET enable_progress_bar = true")


def timestamp() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def duration(seconds: float) -> str:
    """45s, 1m30s, 2h05m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _plural(unit: str) -> str:
    return unit if unit.endswith("s") else unit + "s"


def _show(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
