"""Reading a raw corpus: JSONL, Parquet or a local `datasets` directory, as a stream.

`read_documents` yields validated `Document`s one at a time, in input order, without
holding more than one Parquet batch or JSONL line in memory. Every problem is reported
with the file, the line (JSONL) or row (Parquet, datasets) and the field at fault.
Checks that need the whole corpus (unique ids) are done by the prepare step.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from automixer_ops.config import Config, CorpusSection
from automixer_ops.errors import CorpusError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
BATCH_ROWS = 1024


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str
    file_index: int  # index into the list of input files, for error messages
    line: int  # 1-based line (JSONL) or row (Parquet, datasets) within that file


@dataclass(frozen=True)
class InputFile:
    path: Path
    format: str  # "jsonl" | "parquet" | "hf_dataset"

    @property
    def default_source(self) -> str:
        name = self.path.name
        for suffix in JSONL_SUFFIXES + PARQUET_SUFFIXES:
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name

    @property
    def unit(self) -> str:
        return "line" if self.format == "jsonl" else "row"


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _format_of(path: Path, wanted: str) -> str | None:
    if path.is_dir():
        return "hf_dataset" if _is_hf_dataset_dir(path) else None
    if wanted != "auto":
        return wanted
    if path.name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if path.name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


# Inside a directory only files with a data suffix count (not .json: that is where metadata
# such as dataset_info.json lives), and a nested `datasets` directory is one input.
DIR_SUFFIXES = {"jsonl": (".jsonl", ".jsonl.gz", ".ndjson"), "parquet": PARQUET_SUFFIXES}


def _data_files(directory: Path, wanted: str) -> list[InputFile]:
    found = []
    for child in sorted(directory.iterdir()):
        if child.is_dir():
            found += [InputFile(child, "hf_dataset")] if _is_hf_dataset_dir(child) else _data_files(child, wanted)
            continue
        for fmt, suffixes in DIR_SUFFIXES.items():
            if wanted in ("auto", fmt) and child.name.endswith(suffixes):
                found.append(InputFile(child, fmt))
    return found


def resolve_inputs(cfg: Config) -> list[InputFile]:
    """Expand the configured paths, directories and globs into an ordered list of inputs."""
    section = cfg.corpus
    inputs: list[InputFile] = []
    for pattern in section.paths:
        full = cfg.resolve(pattern)
        matches = expand_path(full)
        if not matches:
            raise CorpusError(f"corpus.paths: {pattern!r} matches no file ({full})")
        for path in matches:
            if path.is_dir() and not _is_hf_dataset_dir(path):
                children = _data_files(path, section.format)
                if not children:
                    raise CorpusError(f"corpus.paths: directory {path} holds no JSONL or Parquet file "
                                      "and is not a `datasets` save_to_disk directory")
                inputs += children
                continue
            fmt = _format_of(path, section.format)
            if fmt is None:
                raise CorpusError(f"{path}: cannot tell the format from the name; use a .jsonl/.parquet "
                                  "extension or set corpus.format")
            inputs.append(InputFile(path, fmt))
    seen: set[Path] = set()
    unique = [i for i in inputs if not (i.path.resolve() in seen or seen.add(i.path.resolve()))]
    return unique


def expand_path(full: Path) -> list[Path]:
    """The files a configured path names. A path that exists is itself, even when its name holds glob
    characters ('data[1].jsonl', 'run*'); otherwise the part below its deepest existing directory is a glob
    pattern, and that directory is matched literally (a config directory named 'exp[1]' is not a pattern)."""
    if full.exists():
        return [full]
    base = full.parent
    while not base.is_dir() and base != base.parent:
        base = base.parent
    rest = os.path.relpath(full, base)
    if not glob.has_magic(rest):
        return []
    return sorted(Path(p) for p in glob.glob(os.path.join(glob.escape(str(base)), rest), recursive=True))


@dataclass
class ReadStats:
    records: int = 0
    skipped_empty: int = 0


def read_documents(inputs: list[InputFile], section: CorpusSection,
                   stats: ReadStats | None = None) -> Iterator[Document]:
    """Yield validated documents in input order; empty texts are skipped and counted in `stats`."""
    stats = stats if stats is not None else ReadStats()
    for index, inp in enumerate(inputs):
        reader = {"jsonl": _jsonl_records, "parquet": _parquet_records, "hf_dataset": _hf_records}[inp.format]
        before = stats.records
        records = reader(inp, section)
        while True:
            try:
                line, record = next(records)
            except StopIteration:
                break
            except (OSError, EOFError, ValueError) as e:  # truncated .gz, corrupt Parquet page, ...
                raise CorpusError(f"{inp.path}: cannot read past record {stats.records - before}: {e}") from None
            stats.records += 1
            doc = _validate(record, inp, index, line, section)
            if doc is None:
                stats.skipped_empty += 1
            else:
                yield doc
        if stats.records == before:
            raise CorpusError(f"{inp.path}: empty input, no documents")


def _validate(record: Any, inp: InputFile, index: int, line: int, s: CorpusSection) -> Document | None:
    where = f"{inp.path}:{line}" if inp.format == "jsonl" else f"{inp.path}: row {line}"
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if s.id_field not in record:
        raise CorpusError(f"{where}: missing id field {s.id_field!r} (fields present: {_fields(record)})")
    if record[s.id_field] is None:
        raise CorpusError(f"{where}: id field {s.id_field!r} is null")
    raw_id = record[s.id_field]
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise CorpusError(f"{where}: id field {s.id_field!r} must be a string or integer, "
                          f"got {type(raw_id).__name__}")
    doc_id = str(raw_id)
    if not doc_id.strip():
        raise CorpusError(f"{where}: id field {s.id_field!r} is empty")
    if s.text_field not in record:
        raise CorpusError(f"{where}: missing text field {s.text_field!r} (fields present: {_fields(record)})")
    if record[s.text_field] is None:
        raise CorpusError(f"{where}: text field {s.text_field!r} is null")
    text = record[s.text_field]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: text field {s.text_field!r} must be a string, got {type(text).__name__}")
    source = record.get(s.source_field)
    if source is None:
        source = inp.default_source
    elif not isinstance(source, str):
        raise CorpusError(f"{where}: source field {s.source_field!r} must be a string, "
                          f"got {type(source).__name__}")
    if not text.strip():
        if s.empty_text == "error":
            raise CorpusError(f"{where}: text field {s.text_field!r} is empty (set corpus.empty_text: skip "
                              "to drop such documents)")
        return None
    return Document(doc_id, source, text, index, line)


def _fields(record: dict) -> str:
    return ", ".join(map(repr, list(record)[:12])) or "none"


def _jsonl_records(inp: InputFile, section: CorpusSection) -> Iterator[tuple[int, Any]]:
    opener = gzip.open if inp.path.name.endswith(".gz") else open
    with opener(inp.path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CorpusError(f"{inp.path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                                  f"column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{inp.path}:{lineno}: not valid JSON: {e.msg} at column {e.colno}") from None


def _columns_wanted(available: list[str], inp: InputFile, s: CorpusSection) -> list[str]:
    for role, name in (("id", s.id_field), ("text", s.text_field)):
        if name not in available:
            raise CorpusError(f"{inp.path}: missing {role} field {name!r} (columns: {', '.join(available)})")
    return [c for c in dict.fromkeys([s.id_field, s.text_field, s.source_field]) if c in available]


def _parquet_records(inp: InputFile, section: CorpusSection) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(inp.path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise CorpusError(f"{inp.path}: not a readable Parquet file: {e}") from None
    columns = _columns_wanted(pf.schema_arrow.names, inp, section)
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
        for record in batch.to_pylist():
            row += 1
            yield row, record


def _hf_records(inp: InputFile, section: CorpusSection) -> Iterator[tuple[int, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(inp.path))
    except Exception as e:
        raise CorpusError(f"{inp.path}: cannot load the `datasets` directory: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if section.hf_split is None:
            raise CorpusError(f"{inp.path}: holds splits {list(ds)}; set corpus.hf_split to pick one")
        if section.hf_split not in ds:
            raise CorpusError(f"corpus.hf_split: {section.hf_split!r} is not a split of {inp.path} "
                              f"(splits: {', '.join(ds)})")
        ds = ds[section.hf_split]
    columns = _columns_wanted(ds.column_names, inp, section)
    # Memory-mapped Arrow underneath: iterating in batches keeps memory flat.
    row = 0
    for batch in ds.select_columns(columns).iter(batch_size=BATCH_ROWS):
        for i in range(len(batch[columns[0]])):
            row += 1
            yield row, {c: batch[c][i] for c in columns}
