"""Datasets in the formats TRL users already have, tokenised into padded tensors with masks.

Loading (`load_sft_dataset`, `load_preference_dataset`, `load_prompt_dataset`): a local
.json / .jsonl / .parquet / .csv file (or a directory of them; CSV cells are read as text), a
folder written by `save_to_disk`, through Hugging Face `datasets`, or a hub dataset name where
there is a network. A directory whose file names mark splits, as `datasets` reads them
(train.jsonl beside test.jsonl, the hub's data/train-00000-of-00001.parquet), gives the train
split's files alone. Accepted columns:

    SFT          prompt + completion    strings, or lists of chat messages (conversational)
                 messages               a chat; every assistant turn is trained on
                 text                   plain language modelling; every token is trained on
    preferences  prompt + chosen + rejected   strings or message lists (prompt may be left out:
                                              then chosen/rejected are the whole texts)
    PPO          prompt                 a string or a list of messages

Chat templates: conversational rows (message lists) are rendered with
`tokenizer.apply_chat_template`; string rows are used as they are (as TRL does). A
conversational row with a tokenizer that has no chat template is an error.

Token layout (`tokenize_sft`, `tokenize_preferences`, `tokenize_prompts`):

    string rows:  [bos if the tokenizer adds one] + prompt tokens + completion tokens + [eos]
    chat rows:    the rendered template (its own special tokens) + [eos if it does not end so]

Prompt and completion are tokenised separately and concatenated, so the prompt's tokens are
exactly those a policy sees before it generates. SFT `labels` equal `input_ids` on completion
(assistant) tokens and -100 on prompt tokens and padding. Training tensors are RIGHT-padded;
prompts for generation are LEFT-padded. Padding is marked by `attention_mask`, never by token id,
so a tokenizer whose pad token is its eos token is handled correctly.

Documented handling of bad input:
- missing columns: ValueError naming the columns found and the accepted formats;
- empty dataset (or nothing left after dropping): ValueError;
- sequences longer than `max_length`: `overlong="truncate"` (default for SFT and preferences:
  the response is cut at its end, the prompt is kept; a row whose prompt alone leaves no room
  for a response token is dropped), `"drop"` (default for PPO prompts: a cut prompt would be a
  different task) or `"error"`; truncated and dropped rows are counted in the result
  (`n_truncated`, `n_dropped`, `kept_indices`) and a warning says how many;
- a tokenizer without a pad token: its eos token is used for padding, with a warning
  (`ensure_pad_token`); without an eos token either it is an error; SFT refuses a tokenizer
  without an eos token (a response must be trained to end);
- a file that holds no rows the way the loaders read them (a JSON scalar, an object of columns
  as pandas' `DataFrame.to_json` writes by default, rows under one key, a CSV separated by ';'
  or tabs, ShareGPT's from/value messages, a chat saved as a string): ValueError saying what it
  holds and how to write it; a file that is not UTF-8 (the line and byte), a CSV header
  naming a column twice or a CSV record with more fields than its header (the line: pandas
  would shift its values a column to the left): ValueError;
- SFT data with the columns of two formats, or with a boolean `label` (unpaired preferences):
  a warning that says what trains and what is ignored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

__all__ = [
    "IGNORE_INDEX",
    "check_chat_rows",
    "collate_preferences",
    "collate_prompts",
    "collate_sft",
    "encode_preference_example",
    "encode_prompt",
    "encode_sft_example",
    "ensure_pad_token",
    "load_preference_dataset",
    "load_prompt_dataset",
    "load_records",
    "load_sft_dataset",
    "pad_sequences",
    "sft_format",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
]

IGNORE_INDEX = -100
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
SFT_FORMATS = "prompt + completion, messages, or text"
PREFERENCE_FORMATS = "prompt + chosen + rejected (or chosen + rejected)"
PROMPT_FORMATS = "prompt"
OVERLONG_POLICIES = ("truncate", "drop", "error")
# Progress bars only where tokenising takes a noticeable time.
PROGRESS_MIN_ROWS = 2000


# ----------------------------------------------------------------------------------------------
# loading
# ----------------------------------------------------------------------------------------------


def load_records(source: str | Path, split: str = "train", **load_kwargs: Any):
    """A `datasets.Dataset` from a local JSON/JSONL/Parquet file or directory, or a hub name.

    `load_kwargs` go to `datasets.load_dataset` (e.g. `field="data"` for a JSON file whose rows
    sit under one key). Raises FileNotFoundError for a missing local path and ValueError for
    an unsupported file type or an empty dataset.
    """
    import datasets

    from rlhf.loading import _looks_like_path

    path = Path(source)
    # a hub name is `name` or `org/name`: `runs/data/train` or `my data` can only be a path
    looks_local = path.exists() or path.suffix.lower() in LOCAL_FORMATS or _looks_like_path(
        str(source))
    if looks_local:
        path = path.expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset file {str(source)!r} does not exist")
        if _saved_to_disk(path):  # a `Dataset.save_to_disk` / `DatasetDict.save_to_disk` folder
            dataset = _load_from_disk(path, source, split)
            if len(dataset) == 0:
                raise ValueError(f"dataset {str(source)!r} has no rows")
            return dataset
        if _model_directory(path):  # its config.json was read as rows: a long CastError
            raise ValueError(f"dataset {str(source)!r} is a model directory (config.json with "
                             f"weights or tokenizer files), not data: give the dataset's .jsonl, "
                             f".json, .parquet or .csv file(s) (did the model path and the "
                             f"dataset path change places?)")
        files = _data_files(path, source, split)
        kinds = {LOCAL_FORMATS.get(p.suffix.lower()) for p in files}
        if not files or None in kinds:
            folders = sorted(p.name + "/" for p in path.iterdir() if p.is_dir()) \
                if path.is_dir() else []
            found = ([p.name for p in files] or (
                f"none at its top level (subfolders are not read: {folders}; point at the "
                f"folder that holds the files)"
                if folders else "an empty directory"))
            raise ValueError(f"dataset {str(source)!r}: expected .json, .jsonl, .parquet or "
                             f".csv file(s), got {found}")
        if len(kinds) > 1:
            raise ValueError(f"dataset directory {str(source)!r} mixes "
                             f"{' and '.join(sorted(k.upper() for k in kinds))} files; keep one "
                             f"format per directory")
        if all(p.stat().st_size == 0 for p in files):
            raise ValueError(f"dataset {str(source)!r} is empty (0 bytes)")
        kind = kinds.pop()
        plain = not load_kwargs  # the loader's own reading (no field=, sep=, ... given)
        if kind in ("json", "csv"):
            # Arrow's JSON reader takes bytes that are not UTF-8 into its strings, and reading
            # the row back then fails with a bare UnicodeDecodeError
            problem = next(filter(None, map(_utf8_problem, files)), None)
            if problem is not None:
                raise ValueError(f"could not read dataset {str(source)!r}: {problem}")
        if kind == "csv" and "features" not in load_kwargs:
            # every column text: a column of digits ("42") is not read as numbers
            load_kwargs = dict(load_kwargs, features=_csv_features(files, source, check=plain))
        try:
            with _quiet_json_loader(), _no_datasets_progress_bars():
                dataset = datasets.load_dataset(kind, data_files=[str(p) for p in files],
                                                split="train", **load_kwargs)
        except Exception as error:
            if isinstance(error, StopIteration) or "corresponds to no data" in str(error):
                raise ValueError(f"dataset {str(source)!r} has no rows") from error
            problem = _json_problem(files) or (
                _mixed_kinds(files) if "changed from" in _root_cause(error) else None) \
                or _root_cause(error)
            raise ValueError(f"could not read dataset {str(source)!r}: {problem}") from error
        if kind == "csv" and len(dataset.column_names) == 1 and plain:
            header = dataset.column_names[0]
            separator = next((sep for sep in (";", "\t", "|") if sep in header), None)
            if separator is not None:
                raise ValueError(f"dataset {str(source)!r} reads as one column {header!r}: its "
                                 f"fields look separated by {separator!r}, and a .csv file is "
                                 f"read with commas; save it comma-separated (or as .jsonl)")
        if len(dataset) == 1 and kind == "json" and len(files) == 1 and plain:
            problem = _columns_layout(files[0])
            if problem is not None:
                raise ValueError(f"dataset {str(source)!r} {problem}")
    else:
        from rlhf.loading import hub_offline_reason

        # no hub (offline mode, no connection): the datasets cache alone, said in seconds
        # instead of half a minute of connection retries
        offline = hub_offline_reason()
        try:
            with _hub_offline(offline is not None):
                dataset = datasets.load_dataset(str(source), split=split, **load_kwargs)
        except Exception as error:  # offline, unknown name, private: say what was tried
            if offline is not None:
                raise ValueError(f"could not load dataset {str(source)!r}: it is not a local "
                                 f"file, not in the datasets cache, and the hub cannot be used: "
                                 f"{offline}; give a local file (.jsonl, .json, .parquet, "
                                 f".csv), or load it where there is a network") from error
            raise ValueError(f"could not load dataset {str(source)!r}: it is not a local file "
                             f"and loading it from the Hugging Face hub failed "
                             f"({type(error).__name__}: {error})") from error
    if len(dataset) == 0:
        raise ValueError(f"dataset {str(source)!r} has no rows")
    return dataset


_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json")


def _model_directory(path: Path) -> bool:
    """Whether ``path`` is a Hugging Face model, adapter or tokenizer folder (what
    save_pretrained writes), whose .json files are configuration, not rows."""
    return path.is_dir() and any((path / name).is_file() for name in _MODEL_FILES) \
        and any((path / name).is_file() for name in ("config.json", "adapter_config.json",
                                                     "tokenizer_config.json"))


def _csv_features(files: Sequence[Path], source, check: bool = True):
    """String features for every column of the CSV files' header row (a CSV cell is text; the
    loader would otherwise read a column of digits as numbers), after checking each file's
    shape: a header naming a column twice (pandas would keep one of the two), or a record with
    more fields than the header names (pandas then takes the first field for a row index and
    shifts every value one column to the left, silently), is a ValueError naming the line
    (``check``: files read with the loader's own settings, commas). An unnamed header field (a
    trailing comma) is named as pandas names it, "Unnamed: <i>"."""
    import csv

    import datasets

    header: list[str] = []
    for file in files:
        with file.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            names = next((row for row in reader if row), [])
            header = header or names
            if not check:
                continue
            repeated = sorted({name for name in names if name and names.count(name) > 1})
            if repeated:
                raise ValueError(f"dataset {str(source)!r}: the header of {file} names the "
                                 f"column(s) {repeated} more than once; give each column one "
                                 f"name")
            for record in reader:
                if len(record) > len(names):
                    raise ValueError(
                        f"dataset {str(source)!r}: {file} line {reader.line_num} has "
                        f"{len(record)} fields but the header names {len(names)} "
                        f"({names}); a comma at the end of the line, or an unquoted comma "
                        f"inside a value (quote such values: \"a, b\")? Fix that line")
    names = [name or f"Unnamed: {index}" for index, name in enumerate(header)]
    return datasets.Features({name: datasets.Value("string") for name in names})


def _utf8_problem(file: Path) -> str | None:
    """Where a text file stops being UTF-8 ("file is not UTF-8 text (line 3, byte 17: invalid
    continuation byte); save it as UTF-8"), or None. Read in chunks: constant memory."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0
    with file.open("rb") as handle:
        while True:
            chunk = handle.read(1 << 20)
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as error:
                # error.object: the held-back bytes of a character split by the chunk + chunk
                start = offset - (len(error.object) - len(chunk)) + error.start
                line += error.object[:error.start].count(b"\n")
                return (f"{file} is not UTF-8 text (line {line}, byte {start}: "
                        f"{error.reason}); save it as UTF-8")
            if not chunk:
                return None
            line += chunk.count(b"\n")
            offset += len(chunk)


def _data_files(path: Path, source, split: str = "train") -> list[Path]:
    """The files a local dataset path stands for: the file itself; for a directory, its .json,
    .jsonl, .parquet and .csv files, or, when their names mark the splits of a dataset as
    `datasets` reads them (train.jsonl beside test.jsonl; the hub's
    data/train-00000-of-00001.parquet, in subfolders too), the files of ``split`` alone:
    the held-out split is not trained on. A directory whose files name other splits but not
    ``split`` is a ValueError; a data file in no split is left out with a warning."""
    if not path.is_dir():
        return [path]
    top = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_FORMATS)
    splits = _named_splits(path)
    if splits is None:
        return top
    if split not in splits:
        named = "; ".join(f"{name}: {[str(p.relative_to(path)) for p in files][:3]}"
                          for name, files in sorted(splits.items()))
        raise ValueError(f"dataset {str(source)!r} is a directory whose file names mark the "
                         f"splits of a dataset ({named}), none of them {split!r}; point at the "
                         f"file(s) to train on (e.g. {str(next(iter(splits.values()))[0])!r}), "
                         f"or name them {split}.jsonl (or .json, .parquet, .csv)")
    in_splits = {p.resolve() for files in splits.values() for p in files}
    left_out = [p.name for p in top if p.resolve() not in in_splits]
    if left_out:
        warnings.warn(f"dataset {str(source)!r}: its file names mark the splits "
                      f"{sorted(splits)}, and {left_out} belong to none of them: they are not "
                      f"read (the {split!r} split is {[p.name for p in splits[split]]}); rename "
                      f"them to be read", stacklevel=3)
    return splits[split]


def _under(path: Path, file: Path) -> Path:
    """``file`` (an absolute path `datasets` resolved) named as ``path``/..., as the caller
    names its files, where it lies under ``path``."""
    for base in (Path(os.path.abspath(path)), path.resolve()):
        with contextlib.suppress(ValueError):
            return path / file.relative_to(base)
    return file


def _named_splits(path: Path) -> dict[str, list[Path]] | None:
    """{split: data files} of a directory whose file names mark splits (`datasets`' own
    patterns: train / test / validation / ..., as a name or a part of one), or None."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(path))
        if {str(name): list(p) for name, p in patterns.items()} == {"train": ["**"]}:
            return None  # no split in the names: every file is data
        resolved = DataFilesDict.from_patterns(patterns, base_path=str(path))
    except Exception:  # noqa: BLE001 - no files, unreadable: the caller says what it sees
        return None
    splits = {str(name): sorted(_under(path, Path(f)) for f in files
                                if Path(f).suffix.lower() in LOCAL_FORMATS)
              for name, files in resolved.items()}
    splits = {name: files for name, files in splits.items() if files}
    return splits or None


def _columns_layout(file: Path) -> str | None:
    """What is wrong with a JSON file that is one object of columns, or None. `datasets`
    reads {"prompt": ["a", "b"], "completion": [...]} and pandas' `DataFrame.to_json` default
    {"prompt": {"0": "a", "1": "b"}, ...} as ONE row whose cells are the whole columns (the
    row checks would then blame row 1's values). A one-row chat ({"messages": [{"role": ...},
    ...]}) is not such a file: its lists hold mappings."""
    import json

    try:
        document = json.loads(file.read_text(encoding="utf-8-sig"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(document, dict) or not document:
        return None
    values = list(document.values())
    if all(isinstance(v, list) and v and not any(isinstance(x, Mapping) for x in v)
           for v in values) and len({len(v) for v in values}) == 1:
        layout = f"a list of {len(values[0])} values"
    elif all(isinstance(v, Mapping) and v and all(str(k).isdigit() for k in v)
             for v in values):
        layout = (f"a mapping of {len(values[0])} row numbers to values, pandas' "
                  f"DataFrame.to_json default")
    else:
        return None
    return (f"is one JSON object of columns (each column {layout}: {sorted(document)}), "
            f"which reads as a single row; write one JSON object per row: a list of objects, "
            f"or JSON lines (pandas: df.to_json(path, orient='records', lines=True))")


def _saved_to_disk(path: Path) -> bool:
    """Whether ``path`` is a folder `datasets` wrote with ``save_to_disk``: a Dataset's
    (state.json + dataset_info.json beside .arrow shards) or a DatasetDict's
    (dataset_dict.json and one such folder per split). Its .json files are metadata, not rows."""
    return path.is_dir() and ((path / "state.json").is_file()
                              or (path / "dataset_dict.json").is_file())


def _load_from_disk(path: Path, source, split: str):
    """A ``save_to_disk`` folder as a Dataset (a DatasetDict: its ``split``)."""
    import datasets

    try:
        with _no_datasets_progress_bars():
            loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001 - damaged or written by another version
        raise ValueError(f"could not read dataset {str(source)!r} (a datasets save_to_disk "
                         f"folder): {_root_cause(error)}") from error
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"dataset {str(source)!r} is a DatasetDict without a {split!r} "
                             f"split; its splits are {sorted(loaded)}: point at one of them "
                             f"({str(path / sorted(loaded)[0])!r})")
        loaded = loaded[split]
    return loaded


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """`datasets` and `huggingface_hub` in offline mode while the block runs (when
    ``offline``): a cached dataset loads, anything else fails at once."""
    if not offline:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    before = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = before


@contextlib.contextmanager
def _no_datasets_progress_bars() -> Iterator[None]:
    """No `datasets` progress bars while it reads a local file: its "Generating train split: 2
    examples" (and "Loading dataset from disk") bars, printed between a stage's own lines,
    measure a read that takes a fraction of a second. Its warnings still show (they are log
    records, not bars), and so do the trainer's own bars (plain tqdm, not `datasets`'). Left
    alone when the user chose with HF_DATASETS_DISABLE_PROGRESS_BARS (datasets gives that
    variable priority) or turned them off already."""
    import datasets

    if ("HF_DATASETS_DISABLE_PROGRESS_BARS" in os.environ
            or datasets.are_progress_bars_disabled()):
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


@contextlib.contextmanager
def _quiet_json_loader() -> Iterator[None]:
    """Hold back the `datasets` JSON loader's own error log ("Failed to load JSON from file
    ...", with a traceback) while it reads a local file: a file that does not parse gets one
    error from us, naming its line (`_json_problem`)."""
    json_logger = logging.getLogger("datasets.packaged_modules.json.json")
    previous = json_logger.level
    json_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        json_logger.setLevel(previous)


def _json_problem(files: Sequence[Path]) -> str | None:
    """Where the first JSON/JSONL file that does not parse goes wrong ("file line 3, column 17:
    Unterminated string"), or None. Run only after `datasets` failed (it says no more than
    "An error occurred while generating the dataset")."""
    import json

    for file in files:
        if LOCAL_FORMATS.get(file.suffix.lower()) != "json":
            continue
        try:
            text = file.read_text(encoding="utf-8-sig")  # a byte order mark is not line 1's
        except UnicodeDecodeError as error:
            return (f"{file} is not UTF-8 text (byte {error.start}: {error.reason}); save it "
                    f"as UTF-8")
        try:
            document = json.loads(text)  # one JSON document (a list of rows, rows under a key)
        except json.JSONDecodeError as whole:
            document_error = whole
        else:
            if isinstance(document, list):
                strings = all(isinstance(row, str) for row in document)  # read as `text`
                bad = next(((number, row) for number, row in enumerate(document, 1)
                            if not isinstance(row, dict)), None)
                if bad is not None and not strings:
                    return (f"{file} row {bad[0]} is a JSON {type(bad[1]).__name__}, not an "
                            f"object (each row must be one object, e.g. "
                            f"{{\"prompt\": ..., ...}})")
            elif not isinstance(document, dict):
                return (f"{file} holds a single JSON {type(document).__name__}, not rows; "
                        f"expected a list of objects, or one JSON object per line")
            repeated = _repeated_key(text)
            if repeated is not None:  # pandas' reading of it fails with a riddle
                return (f"{file}: a row names the key {repeated!r} twice in one object; give "
                        f"each column once")
            continue
        if text.lstrip().startswith("["):
            return (f"{file} line {document_error.lineno}, column {document_error.colno}: "
                    f"{document_error.msg} (the file must be valid JSON)")
        for number, line in enumerate(text.splitlines(), 1):  # JSON lines: one row per line
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return (f"{file} line {number}, column {error.colno}: {error.msg} (each line "
                        f"must be one JSON object); fix or remove that line")
            if not isinstance(row, dict):
                return (f"{file} line {number} is a JSON {type(row).__name__}, not an object "
                        f"(each line must be one row, e.g. {{\"prompt\": ..., ...}})")
            repeated = _repeated_key(line)
            if repeated is not None:  # pandas' reading of it fails with a riddle
                return (f"{file} line {number} names the key {repeated!r} twice in one object; "
                        f"give each column once")
    return None


def _repeated_key(text: str) -> str | None:
    """A key that a JSON object of ``text`` names twice, or None."""
    import json

    repeated: list[str] = []

    def pairs_hook(pairs):
        keys = [key for key, _ in pairs]
        repeated.extend(key for key in keys if keys.count(key) > 1)
        return dict(pairs)

    json.loads(text, object_pairs_hook=pairs_hook)
    return repeated[0] if repeated else None


def _mixed_kinds(files: Sequence[Path]) -> str | None:
    """Where a column first holds another kind of JSON value than in its first row ("file line
    5: column 'prompt' is a list here and a string on line 1 ..."), or None. `datasets` (Arrow)
    refuses such a file with "JSON parse error: Column(/prompt) changed from string to array in
    row 0", counting rows per block of the file. Run only after `datasets` failed."""
    import json

    kinds = {str: "string", list: "list", dict: "mapping", bool: "boolean", int: "number",
             float: "number"}
    first: dict[str, tuple[str, str]] = {}  # column -> (kind, where)
    for file in files:
        if LOCAL_FORMATS.get(file.suffix.lower()) != "json":
            continue
        text = file.read_text(encoding="utf-8-sig")
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            document = None
        if isinstance(document, list):
            rows = [(f"row {number}", row) for number, row in enumerate(document, 1)]
        else:
            rows = [(f"line {number}", json.loads(line))
                    for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        for where, row in rows:
            if not isinstance(row, dict):
                continue
            for column, value in row.items():
                kind = kinds.get(type(value))
                if kind is None:  # null: any column may be empty in a row
                    continue
                seen = first.setdefault(column, (kind, f"{where} of {file.name}"))
                if seen[0] != kind:
                    return (f"{file} {where}: column {column!r} is a {kind} here and a "
                            f"{seen[0]} on {seen[1]}; a column holds one kind of value in every "
                            f"row (e.g. all strings, or all lists of chat messages)")
    return None


def _root_cause(error: BaseException) -> str:
    """The innermost error of a chain (the library's own reason), as "Type: message"."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    return f"{type(error).__name__}: {error}"


def _require_columns(columns: Iterable[str], source: str, accepted: str,
                     *alternatives: tuple[str, ...]) -> tuple[str, ...]:
    present = set(columns)
    for alternative in alternatives:
        if set(alternative) <= present:
            return alternative
    spaced = sorted(name for name in present if name.strip() != name)
    other = next((kind for kind_columns, kind in _DATA_KINDS
                  if set(kind_columns) <= present and (len(kind_columns) > 1 or
                                                       present == set(kind_columns))), None)
    if other is not None and not spaced:  # the data of another stage (pairs given to SFT, ...)
        raise ValueError(f"dataset {source}: no columns for the accepted formats ({accepted}); "
                         f"its columns are {sorted(present)}: {other}, not this stage's data")
    hint = f" (the names {spaced} have spaces around them)" if spaced else ""
    raise ValueError(f"dataset {source}: no columns for the accepted formats ({accepted}); its "
                     f"columns are {sorted(present)}{hint}. Rename the columns (e.g. with "
                     f"datasets' rename_column) to one of the accepted formats.")


# The columns of each stage's data, to name the stage whose data a dataset is when another
# stage is given it. Checked in order: a pairs file also has a prompt column; a one-column
# kind is named only when it is the dataset's one column.
_DATA_KINDS = (
    (("chosen", "rejected"), "preference pairs, the reward model's data (rlhf rm dataset=..., "
                             "reward.dataset= in rlhf pipeline)"),
    (("prompt", "completion"), "SFT examples (rlhf sft dataset=..., sft.dataset= in rlhf "
                               "pipeline)"),
    (("messages",), "SFT chats (rlhf sft dataset=..., sft.dataset= in rlhf pipeline)"),
    (("text",), "SFT texts (rlhf sft dataset=..., sft.dataset= in rlhf pipeline)"),
    (("prompt",), "prompts alone, the RL stages' data (rlhf ppo / grpo dataset=..., "
                  "ppo.dataset= in rlhf pipeline)"),
)


def sft_format(columns: Iterable[str], source: str = "") -> str:
    """"prompt_completion", "messages" or "text" for a set of SFT columns (ValueError if none)."""
    found = _require_columns(columns, source or "(in memory)", SFT_FORMATS,
                             ("prompt", "completion"), ("messages",), ("text",))
    return {("prompt", "completion"): "prompt_completion", ("messages",): "messages",
            ("text",): "text"}[found]


def load_sft_dataset(source: str | Path, split: str = "train", **load_kwargs: Any):
    """SFT rows (a `datasets.Dataset`): prompt/completion, messages, or text columns. Every
    row's values are checked (`_check_rows`)."""
    dataset = load_records(source, split, **load_kwargs)
    with _nested_rows_hint(source, dataset.column_names, load_kwargs):
        fmt = sft_format(dataset.column_names, repr(str(source)))
    columns = {"prompt_completion": ("prompt", "completion"), "messages": ("messages",),
               "text": ("text",)}[fmt]
    _check_rows(dataset, source, columns, chat=fmt != "text", load_kwargs=load_kwargs)
    unused = [name for name in ("messages", "text")
              if name in dataset.column_names and name not in columns]
    if unused:
        warnings.warn(f"dataset {str(source)!r} has the columns of more than one SFT format: "
                      f"SFT trains on {' + '.join(columns)} and ignores {' and '.join(unused)}; "
                      f"drop the columns of the format you do not mean", stacklevel=2)
    if fmt == "prompt_completion" and "label" in dataset.column_names:
        # TRL's unpaired preference format (KTO): prompt, completion and a bool label
        rejected = sum(label is False for label in dataset["label"])
        if rejected:
            warnings.warn(f"dataset {str(source)!r} has a boolean 'label' column, False in "
                          f"{rejected} of {len(dataset)} rows (an unpaired preference dataset, "
                          f"as TRL's KTO takes): SFT ignores it and trains on every completion, "
                          f"the undesired ones too; keep the rows labelled true for SFT",
                          stacklevel=2)
    if fmt == "prompt_completion":
        _warn_repeated_prompt(dataset, source, ("completion",))
    return dataset


def _warn_repeated_prompt(dataset, source, responses: Sequence[str]) -> None:
    """Warn when nearly all (90 %) string rows' ``responses`` start with the row's own prompt:
    the whole text copied into the response column, so that the prompt is in the training text
    twice (prompt + response are concatenated)."""
    prompts = dataset["prompt"]
    columns = [dataset[name] for name in responses]
    rows = [i for i, prompt in enumerate(prompts) if isinstance(prompt, str) and prompt.strip()
            and all(isinstance(column[i], str) for column in columns)]
    repeated = [i for i in rows if all(column[i].startswith(prompts[i]) for column in columns)]
    if rows and 10 * len(repeated) >= 9 * len(rows):  # a data-building mistake, not chance
        warnings.warn(f"dataset {str(source)!r}: in {len(repeated)} of {len(rows)} rows "
                      f"{' and '.join(responses)} start with the row's prompt (the first: "
                      f"{_row_location(source, repeated[0], {})}); the text trained on is "
                      f"prompt + {responses[0]}, so the prompt is in it twice: give "
                      f"{' and '.join(responses)} without the prompt, or leave the prompt "
                      f"column out", stacklevel=3)


def load_preference_dataset(source: str | Path, split: str = "train", **load_kwargs: Any):
    """Preference rows (a `datasets.Dataset`) with prompt/chosen/rejected (prompt optional: a
    null prompt is no prompt). Every row's values are checked (`_check_rows`)."""
    dataset = load_records(source, split, **load_kwargs)
    with _nested_rows_hint(source, dataset.column_names, load_kwargs):
        _require_columns(dataset.column_names, repr(str(source)), PREFERENCE_FORMATS,
                         ("chosen", "rejected"))
    _check_rows(dataset, source, ("chosen", "rejected"), chat=True, load_kwargs=load_kwargs,
                optional=("prompt",) if "prompt" in dataset.column_names else ())
    if "prompt" in dataset.column_names:
        _warn_repeated_prompt(dataset, source, ("chosen", "rejected"))
    return dataset


def load_prompt_dataset(source: str | Path, split: str = "train", **load_kwargs: Any):
    """PPO prompt rows (a `datasets.Dataset`) with a prompt column. Every row's value is
    checked (`_check_rows`)."""
    dataset = load_records(source, split, **load_kwargs)
    with _nested_rows_hint(source, dataset.column_names, load_kwargs):
        _require_columns(dataset.column_names, repr(str(source)), PROMPT_FORMATS, ("prompt",))
    _check_rows(dataset, source, ("prompt",), chat=True, load_kwargs=load_kwargs)
    return dataset


@contextlib.contextmanager
def _nested_rows_hint(source, columns: Sequence[str], load_kwargs: Mapping[str, Any]
                      ) -> Iterator[None]:
    """A missing-columns error of a JSON file that is one object holding its rows under one key
    (``{"data": [{...}, ...]}``: `datasets` reads it as one row of one column) says so: the
    accepted columns are there, one level down."""
    try:
        yield
    except ValueError as error:
        path = Path(str(source)).expanduser()
        if load_kwargs or len(columns) != 1 or not path.is_file() or \
                LOCAL_FORMATS.get(path.suffix.lower()) != "json":
            raise
        import json

        try:
            document = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError):
            raise error from None
        rows = document.get(columns[0]) if isinstance(document, dict) else None
        if not (isinstance(rows, list) and rows and isinstance(rows[0], dict)) \
                or any(isinstance(row, dict) and ("role" in row or "from" in row)
                       for row in rows):
            # not rows under a key; a chat of chat messages is one row (a .jsonl of one line)
            raise
        raise ValueError(f"dataset {str(source)!r} is one JSON object holding its rows under "
                         f"the key {columns[0]!r} (their columns: {sorted(rows[0])}), which "
                         f"reads as one row of one column {columns[0]!r}; write the rows as a "
                         f"list at the top of the file, or one JSON object per line (.jsonl)"
                         ) from error


def _value_problem(value: Any, column: str, chat: bool) -> str | None:
    """What is wrong with one row's ``column`` value, or None: a string, or (``chat``) a
    non-empty list of {'role', 'content'} messages with string roles and contents."""
    expected = ("a string or a list of {'role', 'content'} messages" if chat else "a string")
    if value is None:
        return f"column {column!r} is missing or null; expected {expected}"
    if isinstance(value, str):
        return None
    if chat and isinstance(value, (list, tuple)):
        if not value:
            return f"column {column!r} is an empty list of messages"
        for number, message in enumerate(value, 1):
            if isinstance(message, Mapping) and "role" not in message \
                    and {"from", "value"} <= set(message):
                return (f"column {column!r}, message {number} is {message!r:.80}: ShareGPT's "
                        f"'from'/'value' keys; each message needs 'role' ('system', 'user' or "
                        f"'assistant') and 'content' (rename the keys, and 'human'/'gpt' to "
                        f"'user'/'assistant')")
            if not (isinstance(message, Mapping) and isinstance(message.get("role"), str)
                    and message.get("content") is not None):
                return (f"column {column!r}, message {number} is {message!r:.80}; each message "
                        f"needs a 'role' string and a 'content'")
        return None
    return f"column {column!r} is {type(value).__name__} {value!r:.60}; expected {expected}"


def _check_rows(dataset, source: str | Path, columns: Sequence[str], *, chat: bool,
                load_kwargs: Mapping[str, Any], optional: Sequence[str] = ()) -> None:
    """Every row's ``columns`` (and ``optional`` columns where not null) hold text the
    tokenisation takes, and a `messages` chat has an assistant turn: else one ValueError
    naming the file and its line (`_row_location`). Run when the data loads, so that a bad
    row stops the run before the model loads rather than after."""
    for column in (*columns, *optional):
        for index, value in enumerate(dataset[column]):
            if value is None and column in optional:
                continue
            problem = _value_problem(value, column, chat)
            if problem is None and isinstance(value, str) and (
                    column == "messages" or (chat and _chat_as_text(value))):
                # a chat written out as its text (JSON, or a Python list as pandas' to_csv
                # writes one) would be trained on as those characters
                path = Path(str(source)).expanduser()
                csv = path.suffix.lower() == ".csv" or (path.is_dir()
                                                        and any(path.glob("*.csv")))
                problem = (f"column {column!r} is a string {value!r:.60}"
                           + ("" if column == "messages" else ", a chat written as text")
                           + "; expected a list of {'role', 'content'} messages"
                           + (" (a CSV cell is text, never a list: write chats to .jsonl or "
                              ".parquet)" if csv else ""))
            if problem is None and column == "messages" and not any(
                    message["role"] == "assistant" for message in value):
                problem = "column 'messages' has no assistant turn to train on"
            if problem is not None:
                raise ValueError(f"dataset {_row_location(source, index, load_kwargs)}: "
                                 f"{problem}; fix or remove that row")


def _chat_as_text(text: str) -> bool:
    """Whether ``text`` is a list of {'role', 'content'} messages written out: as JSON, or as
    Python prints it (pandas' to_csv of a column of lists)."""
    import ast
    import json

    text = text.strip()
    if not (text.startswith("[") and text.endswith("]") and "role" in text):
        return False
    for parse in (json.loads, ast.literal_eval):
        try:
            return _is_messages(parse(text))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
    return False


def check_chat_rows(rows, tokenizer, source: str | Path | None = None) -> None:
    """Refuse chat rows (a value that is a list of {'role', 'content'} messages) when
    ``tokenizer`` has no chat template to render them: one ValueError naming the first such
    row (its file line when ``source``, the dataset ``rows`` were loaded from, is given). Rows:
    a `datasets.Dataset`, or a list of row dicts or of prompts. Cheap (no tokenising): the
    stages run it before the model loads."""
    if getattr(tokenizer, "chat_template", None):
        return
    for index, row in enumerate(rows):
        items = row.items() if isinstance(row, Mapping) else [("prompt", row)]
        column = next((name for name, value in items if _is_messages(value)), None)
        if column is None:
            continue
        where = (f"dataset {_row_location(source, index, {})}" if source is not None
                 else f"row {index + 1}")
        raise ValueError(f"{where}: column {column!r} is a chat (a list of messages) but the "
                         f"tokenizer has no chat template to render it; use a model whose "
                         f"tokenizer has one (in rlhf sft and rlhf ppo / grpo also tokenizer=...),"
                         f" add a chat_template to the tokenizer's tokenizer_config.json, or "
                         f"give the rows as strings")


def _row_location(source: str | Path, index: int, load_kwargs: Mapping[str, Any]) -> str:
    """Where row ``index`` (0-based, in the loaded order) of a dataset sits: "'file' line 7"
    for JSON lines and CSV (blank lines skipped, as the loaders do; a CSV record's first line),
    "'file' row 3" for a JSON list or Parquet, "'name' row 3" for a hub dataset or a
    save_to_disk folder (rows counted from 1)."""
    import json

    path = Path(source).expanduser()
    if load_kwargs or not path.exists() or _saved_to_disk(path):
        return f"{str(source)!r} row {index + 1}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # said when the dataset loaded
        try:
            files = _data_files(path, source)
        except ValueError:
            return f"{str(source)!r} row {index + 1}"
    for file in files:
        if LOCAL_FORMATS.get(file.suffix.lower()) == "csv":
            import csv

            starts, previous, header = [], 0, True  # the first line of each data record
            with file.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                for record in reader:
                    start, previous = previous + 1, reader.line_num
                    if record and not header:
                        starts.append(start)
                    header = header and not record
            if index < len(starts):
                return f"{str(file)!r} line {starts[index]}"
            index -= len(starts)
            continue
        if LOCAL_FORMATS.get(file.suffix.lower()) == "parquet":
            import pyarrow.parquet

            rows = pyarrow.parquet.ParquetFile(file).metadata.num_rows
            if index < rows:
                return f"{str(file)!r} row {index + 1}"
            index -= rows
            continue
        text = file.read_text(encoding="utf-8-sig")
        with contextlib.suppress(json.JSONDecodeError):
            document = json.loads(text)
            if isinstance(document, list):
                if index < len(document):
                    return f"{str(file)!r} row {index + 1}"
                index -= len(document)
                continue
        lines = [number for number, line in enumerate(text.splitlines(), 1) if line.strip()]
        if index < len(lines):
            return f"{str(file)!r} line {lines[index]}"
        index -= len(lines)
    return f"{str(source)!r} row {index + 1}"


# ----------------------------------------------------------------------------------------------
# tokenizer set-up and text -> ids
# ----------------------------------------------------------------------------------------------


def ensure_pad_token(tokenizer) -> int:
    """The pad token id; a tokenizer without one gets its eos token as pad (with a warning).

    Safe because padding is always marked by attention_mask (never by token id): a real eos
    at the end of a response is still trained on and still ends generation.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an eos token; set one, e.g. "
                         "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the "
                         "model's embeddings")
    warnings.warn(f"the tokenizer has no pad token; using its eos token "
                  f"{tokenizer.eos_token!r} (id {tokenizer.eos_token_id}) for padding",
                  stacklevel=2)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


def _bos_prefix(tokenizer) -> list[int]:
    # The tokenizer's own rule: Llama-style tokenizers add <bos> to every text, GPT-2 and Qwen
    # add nothing. Read it off an empty encoding rather than guessing from the class.
    specials = tokenizer("", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and specials[:1] == [bos] else []


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _is_messages(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(
        isinstance(m, Mapping) and "role" in m and "content" in m for m in value) and len(value) > 0


def _check_text(value: Any, column: str, row: int) -> str:
    if not isinstance(value, str):
        raise ValueError(f"row {row}: column {column!r} must be a string (or, for chat data, a "
                         f"list of {{'role', 'content'}} messages), got {type(value).__name__} "
                         f"{value!r:.80}")
    return value


def _render_chat(tokenizer, messages: Sequence[Mapping], add_generation_prompt: bool,
                 continue_final_message: bool = False) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this row is a chat (a list of messages) but the tokenizer has no chat "
                         "template; set tokenizer.chat_template or give prompt/completion as "
                         "strings")
    import jinja2

    extra = {"continue_final_message": True} if continue_final_message else {}
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.TemplateError as error:  # the template's raise_exception, or its syntax
        roles = ", ".join(str(m.get("role")) for m in messages)
        raise ValueError(f"the tokenizer's chat template refuses a conversation of the roles "
                         f"[{roles}]: {type(error).__name__}: {error}; write the chats as the "
                         f"template expects (its roles, their order)") from error
    for number, message in enumerate(messages, 1):
        content = message["content"]
        if isinstance(content, (list, tuple, Mapping)) and str(content) in text:
            # a template for text content prints a list of parts as Python would: the model
            # would be trained on "[{'type': 'text', ...}]"
            raise ValueError(f"message {number} ({message['role']}) has a content that is not "
                             f"a string, {content!r:.80}, and the tokenizer's chat template "
                             f"renders it as it is printed in Python, not as text; give the "
                             f"content as a string (e.g. the parts' texts joined)")
    return text


def _chat_segments(tokenizer, messages: Sequence[Mapping], n_context: int = 0
                   ) -> list[tuple[str, bool]]:
    """(text, is_trained) pieces of a rendered chat; assistant turns after `n_context` messages
    are trained on. Each piece is the difference between renders of successive prefixes, so
    the pieces join to exactly the full render."""
    segments: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        trained = message["role"] == "assistant" and index >= n_context
        if trained:
            # The assistant header (e.g. "<|assistant|>\n") belongs to the prompt side.
            before = _render_chat(tokenizer, messages[:index], add_generation_prompt=True)
            if not before.startswith(rendered):
                raise _not_prefix_error()
            segments.append((before[len(rendered):], False))
            rendered = before
        upto = _render_chat(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not upto.startswith(rendered):
            raise _not_prefix_error()
        segments.append((upto[len(rendered):], trained))
        rendered = upto
    return [(text, trained) for text, trained in segments if text]


def _not_prefix_error() -> ValueError:
    return ValueError("the tokenizer's chat template renders a conversation so that a shorter "
                      "conversation is not a prefix of a longer one, so the assistant turns "
                      "cannot be located; use prompt/completion strings instead")


def _encode_segments(tokenizer, segments: Sequence[tuple[str, bool]], chat: bool
                     ) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 trained flag per token; eos appended (trained) if missing."""
    ids: list[int] = [] if chat else _bos_prefix(tokenizer)  # a chat template adds its own
    trained: list[int] = [0] * len(ids)
    for text, is_trained in segments:
        piece = _ids(tokenizer, text)
        ids += piece
        trained += [int(is_trained)] * len(piece)
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        # The eos ends the last piece: trained on when that piece is a response.
        ids.append(eos)
        trained.append(int(bool(segments) and segments[-1][1]))
    return ids, trained


# ----------------------------------------------------------------------------------------------
# per-example encoding
# ----------------------------------------------------------------------------------------------


def encode_sft_example(example: Mapping[str, Any], tokenizer, row: int = 0
                       ) -> dict[str, list[int]]:
    """One SFT row -> {"input_ids", "labels"} (lists; labels -100 where not trained on) and
    "prompt_length" (number of leading untrained tokens)."""
    fmt = sft_format(example.keys(), f"row {row}")
    if fmt == "messages":
        messages = example["messages"]
        if not _is_messages(messages):
            raise ValueError(f"row {row}: 'messages' must be a non-empty list of "
                             f"{{'role', 'content'}} dicts, got {messages!r:.80}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"row {row}: 'messages' has no assistant turn to train on")
        ids, trained = _encode_segments(tokenizer, _chat_segments(tokenizer, messages), chat=True)
    elif fmt == "text":
        text = _check_text(example["text"], "text", row)
        ids, trained = _encode_segments(tokenizer, [(text, True)], chat=False)
    else:
        prompt, completion = example["prompt"], example["completion"]
        if _is_messages(prompt) or _is_messages(completion):
            prompt_msgs = list(prompt) if _is_messages(prompt) else [
                {"role": "user", "content": _check_text(prompt, "prompt", row)}]
            completion_msgs = list(completion) if _is_messages(completion) else [
                {"role": "assistant", "content": _check_text(completion, "completion", row)}]
            segments = _chat_segments(tokenizer, prompt_msgs + completion_msgs,
                                      n_context=len(prompt_msgs))
            ids, trained = _encode_segments(tokenizer, segments, chat=True)
        else:
            segments = [(_check_text(prompt, "prompt", row), False),
                        (_check_text(completion, "completion", row), True)]
            ids, trained = _encode_segments(tokenizer, segments, chat=False)
    labels = [token if flag else IGNORE_INDEX for token, flag in zip(ids, trained)]
    prompt_length = next((i for i, flag in enumerate(trained) if flag), len(ids))
    return {"input_ids": ids, "labels": labels, "prompt_length": prompt_length}


def encode_prompt(prompt: str | Sequence[Mapping], tokenizer, row: int = 0) -> list[int]:
    """A prompt's token ids as the policy sees them before generating (chat: with the
    generation prompt of the template; a chat whose last message is the assistant's is a
    start of the response, which the policy continues, as TRL reads such a prompt)."""
    if _is_messages(prompt):
        if prompt[-1]["role"] == "assistant":
            return _ids(tokenizer, _render_chat(tokenizer, prompt, add_generation_prompt=False,
                                                continue_final_message=True))
        return _ids(tokenizer, _render_chat(tokenizer, prompt, add_generation_prompt=True))
    return _bos_prefix(tokenizer) + _ids(tokenizer, _check_text(prompt, "prompt", row))


def encode_preference_example(example: Mapping[str, Any], tokenizer, row: int = 0
                              ) -> dict[str, Any]:
    """One preference row -> {"chosen_input_ids", "rejected_input_ids", "prompt_length"}."""
    _require_columns(example.keys(), f"row {row}", PREFERENCE_FORMATS, ("chosen", "rejected"))
    prompt = example.get("prompt")
    if prompt is None:
        prompt = "" if not _is_messages(example["chosen"]) else []
    out: dict[str, Any] = {}
    for key in ("chosen", "rejected"):
        response = example[key]
        if _is_messages(response) or _is_messages(prompt):
            prompt_msgs = list(prompt) if _is_messages(prompt) else (
                [{"role": "user", "content": _check_text(prompt, "prompt", row)}] if prompt
                else [])
            response_msgs = list(response) if _is_messages(response) else [
                {"role": "assistant", "content": _check_text(response, key, row)}]
            segments = _chat_segments(tokenizer, prompt_msgs + response_msgs,
                                      n_context=len(prompt_msgs))
            ids, trained = _encode_segments(tokenizer, segments, chat=True)
        else:
            segments = [(_check_text(prompt, "prompt", row), False),
                        (_check_text(response, key, row), True)]
            ids, trained = _encode_segments(tokenizer, segments, chat=False)
        out[f"{key}_input_ids"] = ids
        out[f"{key}_prompt_length"] = next((i for i, f in enumerate(trained) if f), len(ids))
    return out


# ----------------------------------------------------------------------------------------------
# padding and collators
# ----------------------------------------------------------------------------------------------


def pad_sequences(sequences: Sequence[Sequence[int]], pad_value: int, side: str = "right"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of ids -> (ids (N, T) int64, attention_mask (N, T) int64), padded on `side`."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if not len(sequence):
            continue
        columns = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence),
                                                                         width)
        ids[row, columns] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, columns] = 1
    return ids, mask


def collate_sft(features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int
                ) -> dict[str, torch.Tensor]:
    """encode_sft_example outputs -> right-padded input_ids, attention_mask, labels (N, T)."""
    input_ids, attention_mask = pad_sequences([f["input_ids"] for f in features], pad_token_id)
    labels, _ = pad_sequences([f["labels"] for f in features], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_preferences(features: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int
                        ) -> dict[str, torch.Tensor]:
    """encode_preference_example outputs -> right-padded chosen_/rejected_ ids and masks."""
    batch = {}
    for key in ("chosen", "rejected"):
        ids, mask = pad_sequences([f[f"{key}_input_ids"] for f in features], pad_token_id)
        batch[f"{key}_input_ids"], batch[f"{key}_attention_mask"] = ids, mask
    return batch


def collate_prompts(prompts: Sequence[Sequence[int]], pad_token_id: int
                    ) -> dict[str, torch.Tensor]:
    """Prompt ids -> LEFT-padded input_ids, attention_mask (N, P): generation appends on the
    right, so every row's last column is a real token."""
    input_ids, attention_mask = pad_sequences(prompts, pad_token_id, side="left")
    return {"input_ids": input_ids, "attention_mask": attention_mask}


# ----------------------------------------------------------------------------------------------
# whole datasets -> tensors
# ----------------------------------------------------------------------------------------------


def _check_policy(overlong: str, max_length: int) -> None:
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong must be one of {OVERLONG_POLICIES}, got {overlong!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {max_length}")


def _rows(examples: Iterable[Mapping[str, Any]], what: str) -> list[Mapping[str, Any]]:
    rows = examples if isinstance(examples, Sequence) else list(examples)
    if len(rows) == 0:
        raise ValueError(f"no {what} given: the dataset is empty")
    return rows  # type: ignore[return-value]


def _progress(rows: Sequence[Any], what: str):
    return tqdm(rows, desc=f"tokenising {what}", disable=len(rows) < PROGRESS_MIN_ROWS,
                dynamic_ncols=True)


@contextlib.contextmanager
def _row_named(what: str, index: int) -> Iterator[None]:
    """A ValueError of one row that does not say which row (a chat template's refusal) names
    it: "SFT example 3: ..." (counted from 1)."""
    try:
        yield
    except ValueError as error:
        if str(error).startswith("row "):
            raise
        raise ValueError(f"{what} {index + 1}: {error}") from error


# what "truncated" and "dropped" mean for a row with a response (overlong="truncate")
_CUT_RESPONSES = ("; a truncated row keeps its prompt and loses the end of its response "
                  "(and its eos), a dropped row's prompt alone fills max_length; raise "
                  "max_length to keep them whole")


def _report(what: str, total: int, truncated: int, dropped: int, max_length: int,
            how: str = "") -> None:
    if truncated or dropped:
        warnings.warn(f"{truncated + dropped} of {total} {what} were longer than max_length="
                      f"{max_length} tokens: {truncated} truncated, {dropped} dropped{how}",
                      stacklevel=3)


def _fit(ids: list[int], prompt_length: int, max_length: int, overlong: str, what: str,
         row: int) -> tuple[str, int]:
    """"keep", "truncate" or "drop" for one sequence, and the length to keep."""
    if len(ids) <= max_length:
        return "keep", len(ids)
    if overlong == "error":
        raise ValueError(f"{what} row {row} has {len(ids)} tokens, more than max_length="
                         f"{max_length}; raise max_length or set overlong='truncate' or 'drop'")
    if overlong == "drop" or prompt_length >= max_length:
        return "drop", 0  # a response cut to nothing teaches nothing
    return "truncate", max_length


def tokenize_sft(examples: Iterable[Mapping[str, Any]], tokenizer, max_length: int,
                 overlong: str = "truncate") -> dict[str, Any]:
    """SFT rows -> {"input_ids", "attention_mask", "labels"} (N, T) int64, right-padded, plus
    "n_truncated", "n_dropped" (ints) and "kept_indices" (N,) int64 (rows that survived).

    labels[i, t] == input_ids[i, t] on trained (completion / assistant) tokens, -100 elsewhere;
    a model predicts labels[:, 1:] from input_ids[:, :-1]. See the module docstring for the
    overlong policies.
    """
    _check_policy(overlong, max_length)
    rows = _rows(examples, "SFT examples")
    pad_id = ensure_pad_token(tokenizer)
    if tokenizer.eos_token_id is None:  # every response would be trained to go on forever
        raise ValueError("the tokenizer has no eos token: SFT appends it to every response so "
                         "that the model learns where a response ends (and generation stops "
                         "there); set one: \"eos_token\" in the tokenizer's "
                         "tokenizer_config.json, or tokenizer.eos_token = '...'")
    features, kept, truncated = [], [], 0
    for index, example in enumerate(_progress(rows, "SFT examples")):
        with _row_named("SFT example", index):
            feature = encode_sft_example(example, tokenizer, row=index)
        action, length = _fit(feature["input_ids"], feature["prompt_length"], max_length,
                              overlong, "SFT", index)
        if action == "drop":
            continue
        truncated += action == "truncate"
        features.append({"input_ids": feature["input_ids"][:length],
                         "labels": feature["labels"][:length]})
        kept.append(index)
    dropped = len(rows) - len(kept)
    _report("SFT examples", len(rows), truncated, dropped, max_length,
            _CUT_RESPONSES if overlong == "truncate" else "")
    if not features:
        raise ValueError(f"all {len(rows)} SFT examples were dropped as longer than max_length="
                         f"{max_length} (their prompts alone fill it); raise max_length")
    batch: dict[str, Any] = collate_sft(features, pad_id)
    batch.update(n_truncated=truncated, n_dropped=dropped,
                 kept_indices=torch.tensor(kept, dtype=torch.long))
    return batch


def tokenize_preferences(pairs: Iterable[Mapping[str, Any]], tokenizer, max_length: int,
                         overlong: str = "truncate") -> dict[str, Any]:
    """Preference rows -> chosen_input_ids, chosen_attention_mask, rejected_input_ids,
    rejected_attention_mask (N, Tc) / (N, Tr) int64, right-padded, plus "n_truncated",
    "n_dropped", "kept_indices". A pair is dropped if either side must be."""
    _check_policy(overlong, max_length)
    rows = _rows(pairs, "preference pairs")
    pad_id = ensure_pad_token(tokenizer)
    features, kept, truncated = [], [], 0
    for index, example in enumerate(_progress(rows, "preference pairs")):
        with _row_named("preference pair", index):
            feature = encode_preference_example(example, tokenizer, row=index)
        fits = {key: _fit(feature[f"{key}_input_ids"], feature[f"{key}_prompt_length"],
                          max_length, overlong, "preference", index)
                for key in ("chosen", "rejected")}
        if any(action == "drop" for action, _ in fits.values()):
            continue
        truncated += any(action == "truncate" for action, _ in fits.values())
        features.append({f"{key}_input_ids": feature[f"{key}_input_ids"][:length]
                         for key, (_, length) in fits.items()})
        kept.append(index)
    dropped = len(rows) - len(kept)
    _report("preference pairs", len(rows), truncated, dropped, max_length,
            _CUT_RESPONSES if overlong == "truncate" else "")
    same = [kept[i] for i, f in enumerate(features)
            if f["chosen_input_ids"] == f["rejected_input_ids"]]
    if same:  # a data error (a copy, a bad join): the reward model learns nothing from them
        warnings.warn(f"{len(same)} of {len(rows)} preference pairs have the same chosen and "
                      f"rejected tokens (the first: row {same[0] + 1}): they state no "
                      f"preference (loss log 2, no gradient); check how the pairs were made",
                      stacklevel=2)
    if not features:
        raise ValueError(f"all {len(rows)} preference pairs were dropped as longer than "
                         f"max_length={max_length}; raise max_length")
    batch: dict[str, Any] = collate_preferences(features, pad_id)
    batch.update(n_truncated=truncated, n_dropped=dropped,
                 kept_indices=torch.tensor(kept, dtype=torch.long))
    return batch


def tokenize_prompts(prompts: Iterable[str | Sequence[Mapping] | Mapping[str, Any]], tokenizer,
                     max_length: int, overlong: str = "drop") -> dict[str, Any]:
    """Prompts (strings, message lists, or rows with a "prompt" column) -> LEFT-padded
    input_ids, attention_mask (N, P) int64 for generation, plus "n_truncated", "n_dropped",
    "kept_indices" (which prompts survived, to align texts with rows).

    Overlong prompts: "drop" (default), "truncate" (keep bos + the LAST tokens: the end of a
    prompt is what the response continues), or "error".
    """
    _check_policy(overlong, max_length)
    rows = _rows(prompts, "prompts")
    pad_id = ensure_pad_token(tokenizer)
    bos = _bos_prefix(tokenizer)
    encoded, kept, truncated = [], [], 0
    for index, prompt in enumerate(_progress(rows, "prompts")):
        if isinstance(prompt, Mapping):
            _require_columns(prompt.keys(), f"row {index}", PROMPT_FORMATS, ("prompt",))
            prompt = prompt["prompt"]
        with _row_named("prompt", index):
            ids = encode_prompt(prompt, tokenizer, row=index)
        if len(ids) > max_length:
            if overlong == "error":
                raise ValueError(f"prompt {index} has {len(ids)} tokens, more than max_length="
                                 f"{max_length}; raise max_length or set overlong='truncate' "
                                 f"or 'drop'")
            if overlong == "drop":
                continue
            head = bos if ids[: len(bos)] == bos else []
            ids = head + ids[len(ids) - (max_length - len(head)):]
            truncated += 1
        encoded.append(ids)
        kept.append(index)
    dropped = len(rows) - len(kept)
    _report("prompts", len(rows), truncated, dropped, max_length)
    if not encoded:
        raise ValueError(f"all {len(rows)} prompts are longer than max_length={max_length} "
                         f"tokens; raise max_length or set overlong='truncate'")
    batch: dict[str, Any] = collate_prompts(encoded, pad_id)
    batch.update(n_truncated=truncated, n_dropped=dropped,
                 kept_indices=torch.tensor(kept, dtype=torch.long))
    return batch
