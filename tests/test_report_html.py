"""report/index.html on the hand-made run of test_regroup (every number known), with an experiment (the recorded
experiments/demo, and a small synthetic one): the page's tables against the run's tables, its contract
(self-contained, images with id and alt, relative links to the outputs) and what it says when an input is absent."""

from __future__ import annotations

import base64
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_regroup import IDS, TOKENS, make_run

from automixer_ops.cli import main

ROOT = Path(__file__).resolve().parents[1]
DEMO_EXPERIMENT = ROOT / "experiments" / "demo"
SOURCES = {i: ("a" if n < 5 else "b") for n, i in enumerate(IDS)}  # d0..d4 from source a, d5..d9 from b


# ---------------------------------------------------------------- reading the page back

class Page(HTMLParser):
    """The page's tables ({id: [row]}, a row = (tr attributes, [(td attributes, text)])), images, links, ids."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list] = {}
        self.headers: dict[str, list[str]] = {}
        self.images: list[dict] = []
        self.links: list[str] = []
        self.ids: list[str] = []
        self.tags: set[str] = set()
        self.sections: list[str] = []
        self._table = self._row = self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "id" in a:
            self.ids.append(a["id"])
        if tag == "section":
            self.sections.append(a["id"])
        elif tag == "table":
            self._table = a["id"]
            self.tables[self._table], self.headers[self._table] = [], []
        elif tag == "tr" and self._table:
            self._row = (a, [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = (tag, a, [])
        elif tag == "img":
            self.images.append(a)
        elif tag == "a":
            self.links.append(a["href"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[2].append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            kind, a, text = self._cell
            self._row[1].append((kind, a, "".join(text)))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            attrs, cells = self._row
            if cells and all(k == "th" for k, _, _ in cells):
                self.headers[self._table] = [t for _, _, t in cells]
            else:
                self.tables[self._table].append((attrs, [(a, t) for _, a, t in cells]))
            self._row = None
        elif tag == "table":
            self._table = None

    def rows(self, table: str, key: str) -> dict[str, list[tuple[dict, str]]]:
        return {attrs[key]: cells for attrs, cells in self.tables[table]}

    def column(self, table: str, key: str, header: str) -> dict[str, tuple[dict, str]]:
        i = self.headers[table].index(header)
        return {k: cells[i] for k, cells in self.rows(table, key).items()}


def value(cell: tuple[dict, str]) -> float:
    return float(cell[0]["data-value"])


def read_page(run: Path) -> Page:
    return Page((run / "report" / "index.html").read_text(encoding="utf-8"))


def check_contract(run: Path) -> Page:
    """What other engineers build on: self-contained, every image embedded with an id and alt and written beside
    the page with the same bytes, ids unique, links relative and to files that exist, index.html written last."""
    report = run / "report"
    text = (report / "index.html").read_text(encoding="utf-8")
    page = Page(text)
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"(?i)[a-z]+://|//[a-z0-9]|url\(|@import", outside), "an external reference in the page"
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert len(page.ids) == len(set(page.ids)), sorted(i for i in page.ids if page.ids.count(i) > 1)
    pngs = {p.name: p for p in report.glob("*.png")}
    for img in page.images:
        assert img.get("id") and img.get("alt"), img
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]) == pngs[f"{img['id']}.png"].read_bytes()
    assert sorted(pngs) == sorted(f"{i['id']}.png" for i in page.images)  # no PNG of an earlier report is left
    for href in page.links:
        assert not href.startswith("/") and ":" not in href, href
        if not href.startswith("#"):
            assert (report / href).resolve().is_file(), href
    assert "outputs" in page.sections
    assert not [p.name for p in report.iterdir() if p.name.startswith(".")]  # no temporary file left
    index = (report / "index.html").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns <= index for p in pngs.values())
    return page


# ---------------------------------------------------------------- the hand-made run

@pytest.fixture
def hand_run(tmp_path):
    """test_regroup's run with two sources, step 100's score part timed (2 s, 500 tokens read), regrouped and
    mixed for 1,000 tokens with one repeat allowed (the kept groups hold 230 + 310 tokens: repeats are drawn)."""
    config, run = make_run(tmp_path)
    corpus = run / "corpus" / "part-00000.parquet"
    table = pq.read_table(corpus)
    pq.write_table(table.set_column(1, "source", pa.array([SOURCES[i] for i in IDS])), corpus)
    part = run / "scores" / "step=100" / "part-00000.parquet"
    scores = pq.read_table(part)
    pq.write_table(scores.replace_schema_metadata({"seconds": "2.0", "scored_tokens": "500"}), part)
    args = ["-c", str(config), "--set", "mix.token_budget=1000", "--set", "mix.max_repeats=1"]
    assert main(["regroup", *args]) == 0
    assert main(["mix", *args]) == 0
    return run, args


def test_the_page_holds_the_runs_numbers(hand_run, capsys):
    run, args = hand_run
    assert main(["report", *args]) == 0
    assert "index.html" in capsys.readouterr().err
    page = check_contract(run)
    db = run / "automixer.duckdb"
    with duckdb.connect(str(db), read_only=True) as con:
        weights = con.execute("SELECT group_name, weight FROM weights").fetchall()
        thresholds = dict(con.execute("SELECT step, tau FROM thresholds").fetchall())
    # The weights contract: one row per group, the exact DuckDB value in data-value.
    rows = page.rows("weights", "data-group")
    assert sorted(rows) == sorted(g for g, _ in weights) == ["step-100", "step-300"]
    for g, w in weights:
        cell = [c for c in rows[g] if c[0].get("class") == "weight"]
        assert len(cell) == 1 and cell[0][0]["data-value"] == repr(float(w))
        assert cell[0][1] == f"{w:.4f}"
    assert sum(value(c) for r in rows.values() for c in r if c[0].get("class") == "weight") == pytest.approx(1)

    # Overlap: step-100 keeps d0 d1 d4 d5 d8, step-300 d2 d3 d5 d7 d9 (test_regroup): d5 (60 tokens) in both.
    docs = page.rows("overlap-docs", "data-group")
    assert [[value(c) for c in docs[g][1:]] for g in ("step-100", "step-300")] == [[5, 1], [1, 5]]
    pair = page.rows("overlap-pairs", "data-pair")["step-100|step-300"]
    assert [value(c) for c in pair[2:]] == [1, 60, pytest.approx(1 / 9)]
    assert {k: value(c[1]) for k, c in page.rows("membership", "data-k").items()} == {"1": 8, "2": 1}

    # Composition by source (a: d0..d4, b: d5..d9), tokens in data-value, share in the text.
    comp = page.rows("composition-table", "data-row")
    header = page.headers["composition-table"]
    tokens = {name: {header[i]: value(c) for i, c in enumerate(cells) if i >= 2} for name, cells in comp.items()}
    assert tokens["corpus"] == {"a": 150, "b": 400}
    assert tokens["step-100"] == {"a": 10 + 20 + 50, "b": 60 + 90}
    assert tokens["step-300"] == {"a": 30 + 40, "b": 60 + 80 + 100}
    assert comp["step-100"][2][1] == f"{100 * 80 / 230:.1f}%"

    # The mixture, recomputed from the parts a trainer reads (not from the report's own queries).
    drawn = pq.read_table(sorted((run / "mixture").glob("part-*.parquet"))).to_pylist()
    n_tokens = dict(zip(IDS, TOKENS))
    by_group: dict[str, int] = {}
    by_pass: dict[tuple[str, int], list[int]] = {}
    for r in drawn:
        by_group[r["group"]] = by_group.get(r["group"], 0) + n_tokens[r["id"]]
        by_pass.setdefault((r["group"], r["repeat"]), []).append(n_tokens[r["id"]])
    assert any(r > 0 for _, r in by_pass)  # the budget needs a second pass
    summary = json.loads((run / "mixture" / "weights.json").read_text())
    mix = page.rows("mixture-groups", "data-group")
    h = page.headers["mixture-groups"]
    for g, w in weights:
        cells = mix[g]
        assert value(cells[h.index("drawn tokens")]) == by_group[g]
        assert value(cells[h.index("planned tokens")]) == pytest.approx(w * 1000)
        assert value(cells[h.index("allocated tokens")]) == summary["groups"][g]["allocated_tokens"]
        assert value(cells[h.index("max repeat")]) == summary["groups"][g]["max_repeat"]
    repeats = {(a["data-group"], int(a["data-repeat"])): [value(c) for c in cells[2:]]
               for a, cells in page.tables["repeats"]}
    assert repeats == {k: [len(v), sum(v)] for k, v in by_pass.items()}
    shares = page.rows("source-shares-table", "data-source")
    mixed_a = sum(n_tokens[r["id"]] for r in drawn if SOURCES[r["id"]] == "a")
    assert value(shares["a"][3]) == mixed_a and value(shares["a"][4]) == pytest.approx(mixed_a / summary["tokens"])
    assert value(shares["a"][2]) == pytest.approx(150 / 550)

    # Utilities: every document counted once, tau as regroup chose it.
    util = page.rows("utility", "data-step")
    for step in (100, 300):
        assert value(util[str(step)][1]) == 10 and util[str(step)][6][0]["data-value"] == repr(thresholds[step])
    assert {"utility-step-100", "utility-step-300"} <= {i["id"] for i in page.images}

    # Scoring: the timed part (2 s for 500 tokens read) gives 250 tokens/s; the other says so.
    shards = {(a["data-step"], a["data-shard"]): cells for a, cells in page.tables["scoring-shards"]}
    timed, untimed = shards[("100", "part-00000.parquet")], shards[("300", "part-00000.parquet")]
    assert [value(c) for c in timed[2:]] == [10, sum(TOKENS), 2.0, 250.0]
    assert untimed[4][1] == "not recorded"
    assert "scoring-throughput" in {i["id"] for i in page.images}


def test_what_the_run_lacks_is_said_not_failed(hand_run):
    run, args = hand_run
    assert main(["report", *args]) == 0
    page = read_page(run)
    text = (run / "report" / "index.html").read_text(encoding="utf-8")
    ids = {i["id"] for i in page.images}
    assert "benchmark-heatmap" not in ids and "No eval/benchmark.parquet in this run" in text
    assert "table1" not in page.tables and "lists no tasks" in text
    assert "proxy-loss" not in ids and "No proxy/train_log.jsonl in this run" in text
    assert "experiment" not in page.sections and "tikmix" not in page.sections  # TiKMiX: a hook, no section
    # The outputs: relative links to what the run has, and only that (no blend for a missing file, no eval/).
    links = set(page.links) - {h for h in page.links if h.startswith("#")}
    assert {"../automixer.duckdb", "../mixture/weights.json", "../mixture/blend.txt", "../mixture/part-00000.parquet",
            "summary.md", "invariants.json", "../selection.json"} <= links
    assert not any(link.startswith("../eval/") or link.startswith("../proxy/") for link in links)


def table_md(text: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first markdown table after a heading of table.md: its header and method -> cells."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    return cells(lines[start]), {cells(line)[0]: cells(line) for line in lines[start + 2:end]}


def test_the_experiment_tables_match_its_table_md(hand_run):
    run, args = hand_run
    assert main(["report", *args, "--experiment", str(DEMO_EXPERIMENT)]) == 0
    page = check_contract(run)
    assert "experiment" in page.sections and "experiment-plot" in {i["id"] for i in page.images}
    assert (run / "report" / "experiment-plot.png").read_bytes() == (DEMO_EXPERIMENT / "plot.png").read_bytes()
    text = (DEMO_EXPERIMENT / "table.md").read_text(encoding="utf-8")
    for table_id, heading in (("experiment-accuracy", "## Accuracy"), ("experiment-accuracy-delta", "### Δ accuracy"),
                              ("experiment-gold-ll", "## gold_ll"), ("experiment-gold-ll-delta", "### Δ gold_ll")):
        header, expected = table_md(text, heading)
        got = {a["data-method"]: [t for _, t in cells] for a, cells in page.tables[table_id]}
        assert got == expected, table_id  # every cell, to the digit and the † mark
        assert page.headers[table_id] == header


def test_a_small_experiment_by_hand_and_its_plot_is_replaced(hand_run, tmp_path):
    run, args = hand_run
    assert main(["report", *args, "--experiment", str(DEMO_EXPERIMENT)]) == 0
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "experiment.json").write_text(json.dumps({"name": "tiny", "baseline": "uniform", "methods": [
        {"name": "uniform", "kind": "uniform"}, {"name": "mine", "kind": "automixer"}]}))
    rows = [("uniform", "uniform", 0, 0.30), ("uniform", "uniform", 1, 0.40), ("mine", "automixer", 0, 0.35),
            ("mine", "automixer", 1, 0.50)]
    pq.write_table(pa.table({"method": [r[0] for r in rows], "kind": [r[1] for r in rows],
                             "seed": pa.array([r[2] for r in rows], pa.int64()), "task": ["piqa"] * 4,
                             "metric": ["acc"] * 4, "value": [r[3] for r in rows], "stderr": [0.01] * 4,
                             "n_docs": pa.array([200] * 4, pa.int64())}), exp / "results.parquet")
    assert main(["report", *args, "--experiment", str(exp)]) == 0
    page = check_contract(run)  # the demo experiment's plot.png is gone with it: this one has none
    assert not (run / "report" / "experiment-plot.png").exists()
    absolute = {a["data-method"]: [t for _, t in c] for a, c in page.tables["experiment-accuracy"]}
    # uniform 30, 40: mean 35, std 7.071 / sqrt 2 = 5; mine 35, 50: 42.5 ± 7.5.
    assert absolute == {"uniform": ["uniform", "uniform", "2", "35.00 ± 5.00", "35.00 ± 5.00"],
                        "mine": ["mine", "automixer", "2", "42.50 ± 7.50", "42.50 ± 7.50"]}
    # Paired: d = 5, 10 -> 7.5 ± 2.5, past 2 stderr.
    delta = {a["data-method"]: [t for _, t in c] for a, c in page.tables["experiment-accuracy-delta"]}
    assert delta["mine"][2:5] == ["2", "+7.50 ± 2.50 †", "+7.50 ± 2.50 †"]
    assert delta["uniform"][3] == "(baseline)"


def test_a_wrong_experiment_directory_is_named(hand_run, tmp_path, capsys):
    run, args = hand_run
    capsys.readouterr()
    assert main(["report", *args, "--experiment", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert f"--experiment {tmp_path / 'nowhere'}: no experiment.json" in err and err.count("\n") == 1
    assert not (run / "report").exists()  # refused before anything was written
    exp = tmp_path / "exp"
    exp.mkdir()
    shutil.copy(DEMO_EXPERIMENT / "experiment.json", exp)
    assert main(["report", *args, "--experiment", str(exp)]) == 2
    assert f"{exp / 'results.parquet'}: results not found" in capsys.readouterr().err


def test_a_failed_invariant_is_on_the_page(hand_run, capsys):
    run, args = hand_run
    with duckdb.connect(str(run / "automixer.duckdb")) as con:
        con.execute("UPDATE mixture SET n_tokens = 1")
    assert main(["report", *args]) == 2
    page = check_contract(run)
    rows = page.rows("invariants-table", "data-check")
    assert rows["03_mixture_budget"][2][1] == "FAILED" and rows["01_scores_exact_cover"][2][1] == "ok"
    assert [a.get("class") for a, _ in page.tables["invariants-table"]] == [None, None, "fail", None]
    assert "1 of 4 invariants FAILED" in (run / "report" / "index.html").read_text(encoding="utf-8")


def test_tikmix_stage_weights_render_when_the_hook_returns_them(hand_run, monkeypatch):
    """The hook (report_data.tikmix_stages) returns None today; what it returns is drawn as a table and a plot."""
    import automixer_ops.report_data as report_data

    run, args = hand_run
    monkeypatch.setattr(report_data, "tikmix_stages", lambda _run: {"stage 1": {"step-100": 0.4, "step-300": 0.6},
                                                                    "stage 2": {"step-100": 0.7, "step-300": 0.3}})
    assert main(["report", *args]) == 0
    page = check_contract(run)
    stages = page.rows("tikmix-weights", "data-stage")
    assert {s: [value(c) for c in cells[1:]] for s, cells in stages.items()} == {"stage 1": [0.4, 0.6],
                                                                                 "stage 2": [0.7, 0.3]}
    assert "tikmix-stages" in {i["id"] for i in page.images}
