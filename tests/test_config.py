from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from automixer_ops.cli import main
from automixer_ops.config import Config, config_from_dict, load_config, reference_markdown
from automixer_ops.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


def _load_text(tmp_path: Path, text: str, overrides=()) -> Config:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return load_config(path, overrides)


def test_demo_config_loads_with_defaults_and_resolved_paths():
    cfg = load_config(DEMO)
    assert cfg.corpus.source_field == "domain"
    assert cfg.corpus.text_field == "text"  # default
    assert cfg.tokenizer.min_frequency == 2  # default
    assert cfg.run_dir == (ROOT / "runs" / "demo").resolve()
    resolved = cfg.to_dict()
    assert resolved["corpus"]["paths"] == [str(ROOT / "data" / "corpus" / "*.jsonl")]
    # The resolved config is itself a valid config that names the same run.
    again = config_from_dict(yaml.safe_load(cfg.dump_yaml()))
    assert again.to_dict() == resolved


@pytest.mark.parametrize("text, expected", [
    ("corpus: {paths: [a.jsonl]}\nrunn: {id: x}\n", "unknown key 'runn' (did you mean 'run'?); allowed keys here: run, corpus, tokenizer"),
    ("corpus: {paths: [a.jsonl], txt_field: body}\n", "unknown key 'corpus.txt_field' (did you mean 'text_field'?)"),
    ("corpus: {paths: [a.jsonl], docs_per_shard: many}\n", "corpus.docs_per_shard: expected an integer, got str 'many'"),
    ("corpus: {paths: [a.jsonl], docs_per_shard: true}\n", "corpus.docs_per_shard: expected an integer, got bool True"),
    ("corpus: {paths: [a.jsonl], docs_per_shard: 0}\n", "corpus.docs_per_shard: must be >= 1, got 0"),
    ("corpus: {paths: [a.jsonl], format: csv}\n", "corpus.format: str 'csv' is not allowed; choose one of 'auto', 'jsonl', 'parquet', 'hf_dataset'"),
    ("corpus: {paths: []}\n", "corpus.paths: give at least one corpus file"),
    ("corpus: {paths: [3]}\n", "corpus.paths[0]: expected a string, got int 3"),
    ("run: {id: x}\n", "missing required key 'corpus'"),
    ("corpus: {text_field: body}\n", "missing required key 'corpus.paths'"),
    ("corpus: [a.jsonl]\n", "corpus: expected a mapping, got list"),
    ("corpus: {paths: [a.jsonl]}\nrun: {id: '../escape'}\n", "run.id: '../escape' is not a valid run id"),
    ("corpus: {paths: [a.jsonl]}\ntokenizer: {vocab_size: 100}\n", "tokenizer.vocab_size: must be >= 260"),
    ("- just\n- a list\n", "the top level must be a mapping, got list"),
    ("corpus: {paths: [a.jsonl]\n", "not valid YAML"),
])
def test_invalid_configs_name_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        _load_text(tmp_path, text)
    assert expected in str(err.value)
    assert str(tmp_path / "cfg.yaml") in str(err.value)  # and the file


def test_single_path_string_is_accepted_as_a_list(tmp_path):
    assert _load_text(tmp_path, "corpus: {paths: a.jsonl}\n").corpus.paths == ["a.jsonl"]


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    cfg = _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\n",
                     ["corpus.docs_per_shard=7", "tokenizer.path=null", "run.id=other"])
    assert (cfg.corpus.docs_per_shard, cfg.tokenizer.path, cfg.run.id) == (7, None, "other")
    with pytest.raises(ConfigError, match="unknown key 'corpus.shards'"):
        _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\n", ["corpus.shards=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\n", ["corpus.docs_per_shard"])


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    cfg = _load_text(sub, "corpus: {paths: [../data/*.jsonl]}\nrun: {root: ../runs, id: r1}\n")
    assert cfg.run_dir == (tmp_path / "runs" / "r1").resolve()
    assert cfg.to_dict()["corpus"]["paths"] == [str(tmp_path.resolve() / "data" / "*.jsonl")]


def test_every_setting_is_documented():
    text = reference_markdown()
    for section in dataclasses.fields(Config):
        if section.metadata.get("internal"):
            continue
        assert section.metadata["doc"]
        for f in dataclasses.fields(typing.get_type_hints(Config)[section.name]):
            assert f.metadata.get("doc"), f"{section.name}.{f.name} has no doc"
            assert f"`{f.name}`" in text


def test_reference_doc_is_up_to_date():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc.strip() == reference_markdown().strip(), "regenerate: automixer config --reference > docs/configuration.md"


def test_cli_config_prints_resolved_config_and_rejects_bad_ones(tmp_path, capsys):
    assert main(["config", "--config", str(DEMO)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["corpus"]["docs_per_shard"] == 500
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: {paths: [a.jsonl], id_feild: doc_id}\n")
    assert main(["config", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'corpus.id_feild' (did you mean 'id_field'?)" in err and str(bad) in err


def test_yaml_quirks_and_ranges(tmp_path):
    cfg = _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\nproxy: {lr: 3e-4}\ntokenizer:\n", ["tokenizer.vocab_size=512"])
    assert cfg.proxy.lr == 3e-4 and cfg.tokenizer.vocab_size == 512  # YAML 1.1 reads 3e-4 as a string
    with pytest.raises(ConfigError, match="proxy.lr: expected a number, got str 'fast'"):
        _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\nproxy: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"run.seed: must be in \[0, 4294967295\].*got -1"):
        _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\nrun: {seed: -1}\n")


def test_task_docs_are_three_disjoint_ranges(tmp_path):
    cfg = _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\n")
    assert (cfg.tasks.docs.selection, cfg.tasks.docs.validation, cfg.tasks.docs.test) == ([0, 100], [100, 164],
                                                                                         [200, 500])
    demo = load_config(DEMO).tasks.docs
    assert (demo.selection, demo.validation, demo.test) == ([0, 100], [100, 132], [200, 400])
    # Adjacent ranges share no document ([0, 100) and [100, 164)); a --set replaces one range.
    cfg = _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\n", ["tasks.docs.selection=[0, 50]"])
    assert cfg.tasks.docs.selection == [0, 50]
    for docs, expected in [
        ("{selection: [0, 100], validation: [50, 82]}",
         "tasks.docs.selection [0, 100) and tasks.docs.validation [50, 82) overlap: a document used to choose or to "
         "score must not be a test document"),
        ("{test: [0, 10]}", "tasks.docs.selection [0, 100) and tasks.docs.test [0, 10) overlap"),
        ("{validation: [300, 400], test: [350, 360]}",
         "tasks.docs.validation [300, 400) and tasks.docs.test [350, 360) overlap"),
        ("{test: [10, 5]}", "tasks.docs.test: expected [start, end] with 0 <= start < end, got [10, 5]"),
        ("{test: [-1, 5]}", "tasks.docs.test: expected [start, end] with 0 <= start < end, got [-1, 5]"),
        ("{test: [600]}", "tasks.docs.test: expected [start, end] with 0 <= start < end, got [600]"),
        ("{test: [600, x]}", "tasks.docs.test[1]: expected an integer, got str 'x'"),
        ("{train: [0, 5]}", "unknown key 'tasks.docs.train'; allowed keys here: selection, validation, test"),
    ]:
        with pytest.raises(ConfigError) as err:
            _load_text(tmp_path, f"corpus: {{paths: [a.jsonl]}}\ntasks: {{docs: {docs}}}\n")
        assert expected in str(err.value) and str(tmp_path / "cfg.yaml") in str(err.value)


@pytest.mark.parametrize("text, overrides, expected", [
    ("evaluate: {limit: 100}\n", (), "cfg.yaml: evaluate.limit: moved to tasks.docs.selection (documents [0, limit))"),
    ("", ("evaluate.limit=5",), "cfg.yaml: evaluate.limit: moved to tasks.docs.selection"),
    ("evaluate: {limit: null, batch_size: 4}\n", (), "evaluate.limit: moved to tasks.docs.selection"),
    ("influence: {val_docs_per_task: 32}\n", (),
     "cfg.yaml: influence.val_docs_per_task: moved to tasks.docs.validation (documents [start, start + "
     "val_docs_per_task), disjoint from tasks.docs.selection and tasks.docs.test)"),
])
def test_moved_keys_say_where_they_went(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as err:
        _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\n" + text, list(overrides))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_select_section(tmp_path):
    cfg = _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\n")
    assert (cfg.select.metric, cfg.select.noise_z) == ("auto", 1.0)
    cfg = _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\nselect: {metric: gold_ll, noise_z: 2}\n")
    assert (cfg.select.metric, cfg.select.noise_z) == ("gold_ll", 2.0)
    with pytest.raises(ConfigError, match="select.metric: str 'f1' is not allowed; choose one of 'auto', 'acc', "
                                          "'acc_norm', 'gold_ll'"):
        _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\nselect: {metric: f1}\n")
    with pytest.raises(ConfigError, match="select.noise_z: must be >= 0, got -0.5"):
        _load_text(tmp_path, "corpus: {paths: [a.jsonl]}\nselect: {noise_z: -0.5}\n")


def test_reference_lists_the_nested_task_docs_keys():
    text = reference_markdown()
    for key in ("docs", "docs.selection", "docs.validation", "docs.test"):
        assert f"| `{key}` |" in text
    assert "| `docs.selection` | list of int | `[0, 100]` |" in text
