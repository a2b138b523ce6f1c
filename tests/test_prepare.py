from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, write_config, write_jsonl

from automixer_ops.cli import main
from automixer_ops.config import load_config
from automixer_ops.prepare import prepare
from automixer_ops.rundir import SUCCESS


def corpus_table(run_dir: Path) -> pa.Table:
    return pq.read_table(sorted((run_dir / "corpus").glob("part-*.parquet")))


def run_prepare(config: Path, *extra: str) -> int:
    return main(["prepare", "--config", str(config), *extra])


@pytest.fixture(scope="module")
def prepared(small_corpus, tmp_path_factory):
    """The small real corpus prepared once: (config path, run dir, summary)."""
    tmp = tmp_path_factory.mktemp("prepared")
    config = write_config(tmp / "cfg.yaml", {"paths": [str(small_corpus / "*.jsonl")], "source_field": "domain",
                                             "docs_per_shard": 25, "batch_docs": 10})
    summary = prepare(load_config(config), log=lambda _: None)
    return config, Path(summary.run_dir), summary


def test_prepare_writes_shards_with_unique_ids_and_token_counts(prepared):
    config, run_dir, summary = prepared
    table = corpus_table(run_dir)
    assert table.schema.names == ["id", "source", "text", "n_tokens"]
    assert table.schema.field("n_tokens").type == pa.int64()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 9 * 12 == summary.n_docs
    assert sum(table.column("n_tokens").to_pylist()) == summary.n_tokens
    assert set(table.column("source").to_pylist()) == {p.stem for p in (ROOT / "data" / "corpus").glob("*.jsonl")}
    # 108 docs at 25 per shard, written in batches of 10 that straddle shard boundaries.
    assert [s["docs"] for s in summary.shards] == [25, 25, 25, 25, 8]
    assert [pq.read_metadata(p).num_rows for p in sorted((run_dir / "corpus").glob("part-*.parquet"))] == \
        [25, 25, 25, 25, 8]
    # n_tokens is what the saved tokenizer gives (no special tokens).
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(run_dir / "tokenizer"))
    assert tok.model_max_length == 256 and tok.eos_token == "<|endoftext|>"
    for row in table.slice(0, 5).to_pylist():
        assert row["n_tokens"] == len(tok(row["text"], add_special_tokens=False)["input_ids"])
    # The resolved config lands in the run directory and loads again.
    saved = load_config(run_dir / "config.yaml")
    assert saved.corpus.docs_per_shard == 25 and saved.run_dir == run_dir
    assert not list(run_dir.glob(".staging-*"))


def test_rerun_skips_changed_settings_refuse_and_force_rebuilds(prepared, capsys):
    config, run_dir, summary = prepared
    shard = run_dir / "corpus" / "part-00000.parquet"
    before = shard.stat().st_mtime_ns
    assert run_prepare(config) == 0
    assert "already prepared" in capsys.readouterr().err
    assert shard.stat().st_mtime_ns == before
    assert run_prepare(config, "--set", "corpus.docs_per_shard=50") == 2
    assert "prepared from other corpus inputs or corpus/tokenizer settings" in capsys.readouterr().err
    assert shard.stat().st_mtime_ns == before
    assert run_prepare(config, "--set", "corpus.docs_per_shard=50", "--force") == 0
    assert [pq.read_metadata(p).num_rows for p in sorted((run_dir / "corpus").glob("part-*.parquet"))] == [50, 50, 8]
    assert run_prepare(config, "--force") == 0  # back to the module's settings for other tests


def test_reruns_are_byte_identical(prepared, tmp_path):
    config, run_dir, _ = prepared
    other = load_config(config, ["run.id=again", f"run.root={tmp_path}"])
    prepare(other, log=lambda _: None)
    for name in ["tokenizer/tokenizer.json", *[f"corpus/part-0000{i}.parquet" for i in range(5)]]:
        assert (tmp_path / "again" / name).read_bytes() == (run_dir / name).read_bytes(), name


def test_given_tokenizer_is_used_and_copied(prepared, small_corpus, tmp_path):
    _, run_dir, summary = prepared
    config = write_config(tmp_path / "cfg.yaml", {"paths": [str(small_corpus)], "source_field": "domain"},
                          tokenizer={"path": str(run_dir / "tokenizer")})
    assert run_prepare(config) == 0
    new_run = tmp_path / "runs" / "t"
    assert corpus_table(new_run).column("n_tokens").to_pylist() == corpus_table(run_dir).column("n_tokens").to_pylist()
    assert (new_run / "tokenizer" / "tokenizer.json").is_file()


def test_parquet_and_datasets_inputs_with_custom_fields(prepared, tmp_path):
    import datasets

    _, run_dir, _ = prepared
    reference = corpus_table(run_dir).select(["id", "source", "text"]).slice(0, 40)
    renamed = reference.rename_columns(["doc_id", "origin", "body"])
    pq.write_table(renamed, tmp_path / "in.parquet")
    datasets.Dataset(renamed).save_to_disk(str(tmp_path / "hf"))
    datasets.DatasetDict({"train": datasets.Dataset(renamed)}).save_to_disk(str(tmp_path / "hfdict"))
    fields = {"id_field": "doc_id", "text_field": "body", "source_field": "origin"}
    tok = {"path": str(run_dir / "tokenizer")}
    for name, corpus in [("pq", {"paths": ["in.parquet"]}), ("hf", {"paths": ["hf"]}),
                         ("hfdict", {"paths": ["hfdict"], "hf_split": "train"})]:
        config = write_config(tmp_path / f"{name}.yaml", {**corpus, **fields}, tok, run={"id": name})
        assert run_prepare(config) == 0, name
        got = corpus_table(tmp_path / "runs" / name)
        assert got.select(["id", "source", "text"]).equals(reference), name


def test_integer_ids_missing_source_and_empty_text(tmp_path, capsys):
    write_jsonl(tmp_path / "web.jsonl", [{"id": 1, "text": "hello world " * 5}, {"id": 2, "text": "   "},
                                         {"id": "3", "text": "more text here", "source": "forum"}])
    with gzip.open(tmp_path / "extra.jsonl.gz", "wt") as f:
        f.write(json.dumps({"id": 4, "text": "compressed input"}) + "\n")
    config = write_config(tmp_path / "cfg.yaml", {"paths": ["web.jsonl", "extra.jsonl.gz"]})
    assert run_prepare(config) == 0
    assert "skipped 1 document(s) with empty text" in capsys.readouterr().out
    rows = corpus_table(tmp_path / "runs" / "t").select(["id", "source"]).to_pylist()
    assert rows == [{"id": "1", "source": "web"}, {"id": "3", "source": "forum"}, {"id": "4", "source": "extra"}]
    config = write_config(tmp_path / "strict.yaml", {"paths": ["web.jsonl"], "empty_text": "error"}, run={"id": "s"})
    assert run_prepare(config) == 2
    assert f"{tmp_path / 'web.jsonl'}:2: text field 'text' is empty" in capsys.readouterr().err


GOOD = json.dumps({"id": "a", "text": "some text"})


@pytest.mark.parametrize("lines, expected", [
    ([GOOD, json.dumps({"id": "b", "text": "x"}), json.dumps({"id": "a", "text": "again"})],
     "duplicate document ids: 1 id(s) occur more than once, e.g. id 'a' at {f}:1, {f}:3"),
    ([GOOD, json.dumps({"id": "b", "body": "x"})], "{f}:2: missing text field 'text' (fields present: 'id', 'body')"),
    ([GOOD, json.dumps({"text": "x"})], "{f}:2: missing id field 'id'"),
    ([GOOD, json.dumps({"id": "", "text": "x"})], "{f}:2: id field 'id' is empty"),
    ([GOOD, json.dumps({"id": "b", "text": ["x"]})], "{f}:2: text field 'text' must be a string, got list"),
    ([GOOD, json.dumps({"id": "b", "text": "x", "source": 5})], "{f}:2: source field 'source' must be a string"),
    ([], "{f}: empty input, no documents"),
    ([GOOD, '{"id": "b", "text": "x"'], "{f}:2: not valid JSON"),
    ([GOOD, '["a", "b"]'], "{f}:2: expected a JSON object, got list"),
    ([GOOD, b'{"id": "b", "text": "caf\xe9"}'], "{f}:2: not valid UTF-8 (byte 0xe9 at column 25)"),
], ids=["duplicate-id", "missing-text", "missing-id", "empty-id", "non-string-text", "bad-source", "empty-file",
        "bad-json", "not-object", "bad-utf8"])
def test_bad_corpus_fails_clearly_and_leaves_no_run_dir(tmp_path, capsys, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines))
    config = write_config(tmp_path / "cfg.yaml", {"paths": ["bad.jsonl"]})
    assert run_prepare(config) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and expected.format(f=path) in err, err
    assert not (tmp_path / "runs" / "t").exists()


def test_missing_column_in_parquet_and_unmatched_glob(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["a"], "content": ["x"]}), tmp_path / "in.parquet")
    assert run_prepare(write_config(tmp_path / "a.yaml", {"paths": ["in.parquet"]})) == 2
    assert f"{tmp_path / 'in.parquet'}: missing text field 'text' (columns: id, content)" in capsys.readouterr().err
    assert run_prepare(write_config(tmp_path / "b.yaml", {"paths": ["nothing/*.jsonl"]})) == 2
    assert "corpus.paths: 'nothing/*.jsonl' matches no file" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_failed_force_keeps_the_previous_corpus(tmp_path, capsys):
    data = write_jsonl(tmp_path / "c.jsonl", [{"id": str(i), "text": f"document number {i}"} for i in range(20)])
    config = write_config(tmp_path / "cfg.yaml", {"paths": ["c.jsonl"]})
    assert run_prepare(config) == 0
    run_dir = tmp_path / "runs" / "t"
    before = corpus_table(run_dir)
    (run_dir / ".staging-stale").mkdir()  # left by a killed run
    with open(data, "a") as f:
        f.write('{"id": "1", "text": "a duplicate"}\n')
    assert run_prepare(config, "--force") == 2
    assert "duplicate document ids" in capsys.readouterr().err
    assert corpus_table(run_dir).equals(before) and (run_dir / "corpus" / SUCCESS).is_file()
    assert sorted(p.name for p in run_dir.iterdir()) == ["_AUTOMIXER_RUN.json", "config.yaml", "corpus", "tokenizer"]


def test_console_script_help_lists_the_steps():
    exe = Path(sys.executable).with_name("automixer")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "prepare" in out and "config" in out
    bad = subprocess.run([str(exe), "prepare", "--config", "/nonexistent.yaml"], capture_output=True, text=True)
    assert bad.returncode == 2 and "error: /nonexistent.yaml: config file not found" in bad.stderr


def test_demo_sample_is_valid_and_covers_every_domain():
    con = duckdb.connect()
    rows = con.execute("SELECT domain, count(*), count(DISTINCT id) FROM read_json_auto(?) GROUP BY domain",
                       [str(ROOT / "data" / "corpus" / "*.jsonl")]).fetchall()
    assert len(rows) == 9 and sum(r[1] for r in rows) >= 2000
    assert all(n == distinct for _, n, distinct in rows)


def test_directory_inputs_read_data_files_only_and_bad_gzip_is_named(tmp_path, capsys):
    data = tmp_path / "dump"
    write_jsonl(data / "a.jsonl", [{"id": "a", "text": "alpha text"}])
    write_jsonl(data / "sub" / "b.jsonl", [{"id": "b", "text": "beta text"}])
    (data / "dataset_info.json").write_text('{"not": "a document"}')
    (data / "README.md").write_text("# about this dump\n")
    (data / "_SUCCESS").write_text("")
    assert run_prepare(write_config(tmp_path / "a.yaml", {"paths": ["dump"]})) == 0
    assert corpus_table(tmp_path / "runs" / "t").column("id").to_pylist() == ["a", "b"]
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"id": str(i), "text": "x" * 200}) + "\n" for i in range(500)))
    (tmp_path / "c.jsonl.gz").write_bytes((tmp_path / "c.jsonl.gz").read_bytes()[:300])  # truncated download
    assert run_prepare(write_config(tmp_path / "b.yaml", {"paths": ["c.jsonl.gz"]}, run={"id": "gz"})) == 2
    assert f"error: {tmp_path / 'c.jsonl.gz'}: cannot read past record" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "gz").exists()


def test_paths_with_glob_characters_are_read_as_named(tmp_path):
    """A corpus file, the config's directory and the run root may hold '[1]' or '*': a path that exists is what it
    names (before, 'data[1].jsonl' was a pattern matching data1.jsonl, and 'exp[1]/' matched nothing)."""
    base = tmp_path / "exp[1]"
    write_jsonl(base / "data[1].jsonl", [{"id": "a", "text": "alpha text here"}])
    write_jsonl(base / "data1.jsonl", [{"id": "other", "text": "not this file"}])
    write_jsonl(base / "more" / "b.jsonl", [{"id": "b", "text": "beta text here"}])
    config = write_config(base / "cfg.yaml", {"paths": ["data[1].jsonl", "more/*.jsonl"]}, run={"root": "runs[2]*"})
    assert run_prepare(config) == 0
    run_dir = base / "runs[2]*" / "t"
    assert corpus_table(run_dir).column("id").to_pylist() == ["a", "b"]
    assert (run_dir / "_AUTOMIXER_RUN.json").is_file()
    assert run_prepare(config) == 0  # the rerun finds its own corpus and run marker


def test_prepare_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    write_jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "alpha text here"}])
    mine = tmp_path / "runs" / "t"
    mine.mkdir(parents=True)
    (mine / "config.yaml").write_text("my own\n")
    config = write_config(tmp_path / "cfg.yaml", {"paths": ["c.jsonl"]})
    assert run_prepare(config, "--force") == 2
    assert "is not an AutoMixer run directory" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["config.yaml"] and (mine / "config.yaml").read_text() == "my own\n"
    (mine / "config.yaml").unlink()  # an empty directory is the user's way of saying "put the run here"
    assert run_prepare(config) == 0 and (mine / "_AUTOMIXER_RUN.json").is_file()
    legacy = tmp_path / "runs" / "t" / "_AUTOMIXER_RUN.json"
    legacy.unlink()  # a run prepared before the marker existed: its corpus/_SUCCESS.json makes it a run
    assert run_prepare(config, "--force") == 0
