"""Reading data (JSONL, JSON, CSV, Parquet, directories, hub ids), rendering chats, masking
everything but the response, caching, packing and batching.

Files are read with the ``datasets`` library; a row's field mapping (``data.fields``) turns the
common shapes (prompt/response, Alpaca, chat ``messages``, ShareGPT ``conversations``) into chat
messages. Every bad row is reported as ``file:line`` (JSONL) or ``file[index]`` / ``id:split[index]``
with the field named, up to ``MAX_SHOWN`` of them with their count, before the model loads.

Masking renders the conversation prefix by prefix with the tokenizer's chat template and
labels exactly the characters each assistant turn adds (its content and end-of-turn marker),
then maps characters to tokens through the tokenizer's offsets. A template that does not
render prefixes consistently (some templates rewrite earlier turns) is an error naming the row,
never a silently wrong mask. The text of a special token typed in a message (``<|im_end|>`` in a
row) is tokenised as text, never as the control token, so data cannot inject turns (``ChatText``).

Packing (``pack_examples``) concatenates examples into rows of at most ``max_length`` tokens
with ``position_ids`` restarting at 0 for each example; without an ``attention_mask``,
transformers derives a block-diagonal causal mask from those positions
(``masking_utils.find_packed_sequence_indices``), so no token attends across an example.
"""

import codecs
import contextlib
import csv
import difflib
import hashlib
import json
import logging
import math
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from .config import MAX_ROW_BYTES
from .errors import DataError
from .state import Datasets, token_count

IGNORE_INDEX = -100
#: What an SFT row looks like, for messages about files in another format.
SFT_FORMAT = '{"prompt": "...", "response": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]}'
CHAT_ROLES = ("system", "user", "assistant", "tool")
#: ShareGPT's role names (``from``) and the chat roles they stand for.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
#: File suffixes and the ``datasets`` builder that reads them.
FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}
FORMAT_NAMES = "JSONL, JSON (array or lines), CSV, TSV, Parquet, a directory of those, or a Hugging Face dataset id"
#: JSON nested deeper than this is refused before it is parsed: the JSON readers recurse, and
#: thousands of levels crash Arrow's (a segfault) or Python's (RecursionError). A chat row needs 4.
MAX_DEPTH = 64
#: At most this many bad rows are listed in one message (all are counted).
MAX_SHOWN = 10
#: Bump when the tokenised cache's contents change meaning.
CACHE_VERSION = "1"


def cache_root():
    """``$FTENGINE_CACHE`` (default ``~/.cache/ftengine``), where models and tokenised data are cached."""
    return Path(os.environ.get("FTENGINE_CACHE", Path.home() / ".cache" / "ftengine"))


# --------------------------------------------------------------------------------------------
# bad rows: collected, then reported together
# --------------------------------------------------------------------------------------------


class BadRows:
    """Collects per-row ``DataError`` messages and raises them as one, listing the first
    ``MAX_SHOWN`` and the count (a single bad row is reported as its own message)."""

    def __init__(self, label):
        self.label, self.messages, self.count = label, [], 0

    @contextlib.contextmanager
    def check(self):
        try:
            yield
        except DataError as exc:
            self.count += 1
            if len(self.messages) < MAX_SHOWN:
                self.messages.append(str(exc))

    def raise_if_any(self):
        if not self.count:
            return
        if self.count == 1:
            raise DataError(self.messages[0])
        shown = f"the first {len(self.messages)} shown" if self.count > len(self.messages) else "all shown"
        raise DataError("\n".join(self.messages) + f"\n{self.count} bad rows in {self.label} ({shown}); fix or remove them")


# --------------------------------------------------------------------------------------------
# reading rows
# --------------------------------------------------------------------------------------------


def _format_hint(path, expected):
    return f"expected {FORMAT_NAMES}; each row {expected}"


_JSON_STRING_OR_BRACKET = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def _too_deep_at(text):
    """The offset in JSON ``text`` where arrays and objects nest deeper than ``MAX_DEPTH``, or
    ``None``; found without parsing (brackets inside strings do not count)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return None
    depth = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            depth += 1
            if depth > MAX_DEPTH:
                return match.start()
        elif token in ("]", "}"):
            depth -= 1
    return None


def _too_deep_message(where):
    return (
        f"{where}: JSON nested more than {MAX_DEPTH} levels deep, which the JSON readers cannot parse safely "
        f"(a chat row needs 4); store deep structures as a JSON string in one field"
    )


def _too_long_message(where, size, max_row_bytes):
    return (
        f"{where}: the row is {size} bytes, over the limit of {max_row_bytes} bytes (data.max_row_bytes); "
        f"shorten or split the row, or raise the limit (-o data.max_row_bytes={size})"
    )


def _refuse_rows_over(rows, max_row_bytes, label):
    """``rows``, checked that none is longer than ``max_row_bytes`` written as JSON: rows that
    are not lines of JSON (CSV, Parquet, a JSON array, a hub dataset) are measured once read,
    before rendering and tokenising cost many times their size."""
    bad = BadRows(label)
    for row, where in rows:
        with bad.check():
            size = len(json.dumps(row, ensure_ascii=False, default=str).encode())
            if size > max_row_bytes:
                raise DataError(_too_long_message(where, size, max_row_bytes))
    bad.raise_if_any()
    return rows


def _json_lines(handle, path, max_row_bytes, bad):
    """``(number, text)`` of each non-blank line of a JSON-lines file, read at most
    ``max_row_bytes`` at a time. A longer line, invalid UTF-8 or nesting deeper than
    ``MAX_DEPTH`` is collected in ``bad`` and never parsed; a byte-order mark is dropped."""
    number = 0
    while raw := handle.readline(max_row_bytes + 1):
        number, text = number + 1, None
        where = f"{path}:{number}"
        with bad.check():
            if len(raw) > max_row_bytes and not raw.endswith(b"\n"):
                size, rest = len(raw), raw
                while rest and not rest.endswith(b"\n"):  # skip the rest of the line, a block at a time
                    rest = handle.readline(1 << 20)
                    size += len(rest)
                raise DataError(_too_long_message(where, size, max_row_bytes))
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); save the file as UTF-8"
                ) from None
            if _too_deep_at(text) is not None:
                raise DataError(_too_deep_message(where))
        if text and text.strip():
            yield number, text


def _jsonl_errors(path, expected, max_row_bytes):
    """``[(row, where)]`` of a JSON-lines file, collecting malformed lines (the reader that
    names ``file:line`` when ``datasets`` cannot read the file)."""
    bad, rows = BadRows(path), []
    with open(path, "rb") as handle:
        for number, line in _json_lines(handle, path, max_row_bytes, bad):
            where = f"{path}:{number}"
            with bad.check():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"{where}: malformed JSON ({exc.msg} at column {exc.colno}); {_format_hint(path, expected)}"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(
                        f"{where}: each line must be a JSON object, got {type(row).__name__}; {_format_hint(path, expected)}"
                    )
                rows.append((row, where))
    bad.raise_if_any()
    return rows


def read_jsonl(path, expected=SFT_FORMAT, max_row_bytes=MAX_ROW_BYTES):
    """``[(row, "file:line")]`` of a JSONL file, read line by line with the standard library.

    :raises DataError: for a missing or empty file, invalid UTF-8, malformed JSON, non-object
        lines, lines over ``max_row_bytes`` or nested over ``MAX_DEPTH`` (up to ``MAX_SHOWN`` listed).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: data file not found (check data.train / data.eval)")
    rows = _jsonl_errors(path, expected, max_row_bytes)
    if not rows:
        raise DataError(f"{path}: the file holds no rows ({_format_hint(path, expected)})")
    return rows


def _json_array_text(path):
    """The text of a file holding one JSON array, checked before parsing: UTF-8 (a byte-order
    mark dropped) and nested at most ``MAX_DEPTH`` deep."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte at offset {exc.start}); save the file as UTF-8") from None
    offset = _too_deep_at(text)
    if offset is not None:
        raise DataError(_too_deep_message(f"{path}:{text.count(chr(10), 0, offset) + 1}"))
    return text


def _json_array(path, expected):
    """``[(row, "file[i]")]`` of a file holding one JSON array of objects (standard library)."""
    try:
        data = json.loads(_json_array_text(path))
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno}); {_format_hint(path, expected)}"
        ) from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: a JSON file must hold an array of row objects or one object per line; {_format_hint(path, expected)}"
        )
    bad, rows = BadRows(path), []
    for index, row in enumerate(data):
        with bad.check():
            if not isinstance(row, dict):
                raise DataError(f"{path}[{index}]: each row must be a JSON object, got {type(row).__name__}")
            rows.append((row, f"{path}[{index}]"))
    bad.raise_if_any()
    return rows


def _sniff(path):
    """The ``datasets`` builder for a file: by suffix, else by its first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(64)
    if head.startswith(b"PAR1"):
        return "parquet"
    builder = FORMATS.get(path.suffix.lower())
    if builder:
        return builder
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    known = ", ".join(FORMATS)
    raise DataError(
        f"{path}: unknown data format '{path.suffix or '(no suffix)'}'; data files must end in {known} ({FORMAT_NAMES})"
    )


def local_files(path):
    """The data files of ``path`` (a file, or every data file under a directory, sorted)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS and not p.name.startswith("."))
        if not files:
            raise DataError(f"{path}: the directory holds no data files ({', '.join(FORMATS)})")
        kinds = {FORMATS[p.suffix.lower()] for p in files}
        if len(kinds) > 1:
            raise DataError(f"{path}: the directory mixes formats ({', '.join(sorted(kinds))}); keep one format per directory")
        return files
    if not path.is_file():
        raise DataError(f"{path}: data file not found (check data.train / data.eval)")
    return [path]


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets`` without progress bars or its own error logging (we report the errors)."""
    import datasets

    logger = logging.getLogger("datasets")
    level, bars = logger.level, datasets.utils.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logger.setLevel(logging.CRITICAL)
    try:
        yield datasets
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def _csv_is_header_only(path):
    with open(path, "rb") as handle:
        return sum(1 for raw in handle if raw.strip()) <= 1


def _jsonl_line_numbers(path, max_row_bytes):
    """The numbers of the non-blank lines of a JSON-lines file, or ``None`` if one of them does
    not start an object (the line reader then names it).

    :raises DataError: for lines no JSON reader should be given (too long, too deep, not UTF-8).
    """
    bad = BadRows(path)
    with open(path, "rb") as handle:
        lines = [(number, text.lstrip()[:1]) for number, text in _json_lines(handle, path, max_row_bytes, bad)]
    bad.raise_if_any()
    return None if any(first != "{" for _, first in lines) else [number for number, _ in lines]


def _csv_as_text(path, delimiter):
    """``datasets`` options that read every CSV cell as the text it holds: pandas would make
    ``2`` a float ``2.0`` (in a column with a gap) and ``NA`` or an empty cell a missing value."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
        header = next(csv.reader(handle, delimiter=delimiter), [])
    return {"converters": dict.fromkeys(range(len(header)), str), "keep_default_na": False, "na_filter": False}


def _read_local_file(path, expected, max_row_bytes):
    """``[(row, where)]`` of one local file through ``datasets``; JSON is checked first for what
    would crash or swamp its reader (lines over ``max_row_bytes``, nesting over ``MAX_DEPTH``)."""
    builder = _sniff(path)
    if path.stat().st_size == 0:
        return []
    kwargs = {}
    if builder == "csv":
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        kwargs = {"delimiter": delimiter, **_csv_as_text(path, delimiter)}
    with open(path, "rb") as handle:
        head = handle.read(256).removeprefix(codecs.BOM_UTF8)
    is_array = builder == "json" and path.suffix.lower() == ".json" and head.lstrip()[:1] == b"["
    if is_array:
        _json_array_text(path)  # refuses nesting that would crash the reader
    lines = _jsonl_line_numbers(path, max_row_bytes) if builder == "json" and not is_array else []
    if lines is None:
        return read_jsonl(path, expected, max_row_bytes)
    try:
        with _quiet_datasets() as datasets:
            table = datasets.load_dataset(
                builder, data_files=[str(path)], split="train", cache_dir=str(cache_root() / "datasets"), **kwargs
            )
            rows = table.to_list()
    except Exception as exc:  # noqa: BLE001 - every reader error becomes a message naming the file
        if builder == "csv" and _csv_is_header_only(path):
            return []
        if builder == "json":  # the standard library names the line (and rows of mixed types still load)
            if is_array:
                return _refuse_rows_over(_json_array(path, expected), max_row_bytes, path)
            return read_jsonl(path, expected, max_row_bytes)
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot read the file as {builder.upper()} ({reason}); {_format_hint(path, expected)}") from None
    if builder == "json" and not is_array:
        if len(lines) != len(rows):  # a row spanning lines: let the line reader name it
            return read_jsonl(path, expected, max_row_bytes)
        return [(row, f"{path}:{line}") for row, line in zip(rows, lines)]
    return _refuse_rows_over([(row, f"{path}[{index}]") for index, row in enumerate(rows)], max_row_bytes, path)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")


def _hub_reachable():
    """Whether the Hugging Face Hub answers (a 3 s connection, instead of minutes of retries)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
        return True
    except OSError:
        return False


def _offline_message(spec):
    return (
        f"{spec}: not a local file or directory, so it was taken for a Hugging Face dataset id, but the Hub cannot be "
        f"reached (no network, or HF_HUB_OFFLINE=1) and the dataset is not in the local datasets cache. Download it where "
        f"there is internet (datasets.load_dataset('{spec.split(':')[0]}').save_to_disk(...) or write it out as JSONL/Parquet) "
        f"and point data.train / data.eval at the files"
    )


def _read_hub(spec, options, expected):
    """``[(row, "id:split[i]")]`` of a Hugging Face dataset (``id`` or ``id:split``)."""
    name, _, split = spec.partition(":")
    split = split or options.split
    with _quiet_datasets() as datasets:
        if not datasets.config.HF_HUB_OFFLINE and not _hub_reachable():
            raise DataError(_offline_message(spec))
        try:
            sliced = f"{split}[:{options.limit}]" if options.limit else split  # data.limit: no need to read the rest
            table = datasets.load_dataset(name, options.subset, split=sliced, cache_dir=str(cache_root() / "datasets"))
        except ConnectionError:
            raise DataError(_offline_message(spec)) from None
        except Exception as exc:  # noqa: BLE001
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DataError(
                f"{spec}: cannot load the dataset (split '{split}', subset {options.subset!r}): {reason}. "
                f"Check the id, data.split and data.subset"
            ) from None
        rows = table.to_list()
    return _refuse_rows_over([(row, f"{name}:{split}[{index}]") for index, row in enumerate(rows)], options.max_row_bytes, spec)


def looks_like_hub_id(spec):
    path = Path(spec)
    return not path.exists() and path.suffix.lower() not in FORMATS and bool(HUB_ID.match(spec)) and not spec.startswith(".")


def read_rows(spec, options=None, expected=SFT_FORMAT):
    """``[(row, where)]`` for ``data.train`` / ``data.eval``: a file, a directory of files, or a
    hub id (``org/name`` or ``org/name:split``), capped at ``data.limit`` rows.

    :param options: the ``data`` config section (``split``, ``subset``, ``limit``), or ``None``.
    :raises DataError: naming the file and the fix, for an unreadable or empty source.
    """
    from .config import DataOptions

    options = options or DataOptions()
    spec = str(spec)
    if looks_like_hub_id(spec) and "/" in spec:
        rows = _read_hub(spec, options, expected)
        if not rows:
            raise DataError(f"{spec}: split '{spec.partition(':')[2] or options.split}' holds no rows")
    else:
        path = Path(spec)
        rows = [item for file in local_files(path) for item in _read_local_file(file, expected, options.max_row_bytes)]
        if not rows:
            raise DataError(f"{path}: the file holds no rows ({_format_hint(path, expected)})")
    return rows[: options.limit] if options.limit else rows


def content_hash(spec):
    """A hash of the bytes of every file ``spec`` reads, or ``None`` for a hub id (not hashed)."""
    path = Path(spec)
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for file in local_files(path):
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# rows to chat messages
# --------------------------------------------------------------------------------------------


def _field(field, names):
    """How a canonical field is called in the user's data: ``'output' (data.fields.response)``."""
    column = (names or {}).get(field, field)
    return f"'{column}'" if column == field else f"'{column}' (data.fields.{field})"


def require_str(row, field, where, allow_empty=False, names=None):
    """Return ``row[field]`` if it is a (non-empty) string; else raise naming the field
    (by the data's own column name when ``names``, the ``data.fields`` mapping, renames it)."""
    if row.get(field) is None:
        raise DataError(f"{where}: missing field {_field(field, names)}")
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {_field(field, names)} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {_field(field, names)} is empty")
    return value


def require_messages(value, field, where):
    """Check a chat message list: ``[{"role": str, "content": str}, ...]``."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of messages")
    checked = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{where}: {field}[{i}] must be an object with a string 'role'")
        if message["role"] not in CHAT_ROLES:
            close = difflib.get_close_matches(message["role"].lower(), CHAT_ROLES, n=1, cutoff=0.5)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise DataError(
                f"{where}: {field}[{i}].role is {message['role']!r}, which is not a chat role "
                f"(expected one of {', '.join(CHAT_ROLES)}).{hint}"
            )
        if not isinstance(message.get("content"), str):
            raise DataError(f"{where}: {field}[{i}].content must be a string")
        # Columnar readers give every message every key seen in the file, missing ones as None.
        checked.append({key: item for key, item in message.items() if item is not None})
    return checked


def sharegpt_messages(value, field, where):
    """ShareGPT ``[{"from": "human"|"gpt"|"system", "value": str}, ...]`` as chat messages."""
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field '{field}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict) or not isinstance(turn.get("from"), str):
            raise DataError(f"{where}: {field}[{i}] must be an object with a string 'from'")
        role = SHAREGPT_ROLES.get(turn["from"].lower())
        if role is None:
            raise DataError(
                f"{where}: {field}[{i}].from is {turn['from']!r}, which is not a ShareGPT role "
                f"(expected one of {', '.join(SHAREGPT_ROLES)})"
            )
        if not isinstance(turn.get("value"), str):
            raise DataError(f"{where}: {field}[{i}].value must be a string")
        messages.append({"role": role, "content": turn["value"]})
    return messages


#: The canonical fields ``data.fields`` maps from the data's own column names.
CANONICAL_FIELDS = ("prompt", "response", "system", "messages", "conversations", "instruction", "input", "output")


def field_names(fields):
    """``{canonical: column}`` from the ``data.fields`` section (or a dict), unmapped ones left out."""
    if fields is None:
        return {}
    items = fields.items() if isinstance(fields, dict) else fields.model_dump().items()
    return {canonical: column for canonical, column in items if column}


def check_fields(names, columns, label):
    """Every column ``data.fields`` maps must exist in the data (checked once per file)."""
    missing = [f"data.fields.{canonical}: column '{column}'" for canonical, column in names.items() if column not in columns]
    if missing:
        raise DataError(f"{label}: {'; '.join(missing)} is not in the data; its columns are: {', '.join(sorted(columns))}")


def map_fields(row, names):
    """``row`` with the mapped columns renamed to their canonical fields."""
    if not names:
        return row
    mapped = {k: v for k, v in row.items() if k not in names.values()}
    mapped.update({canonical: row.get(column) for canonical, column in names.items()})
    return mapped


def _with_system(messages, row, names, where):
    if row.get("system") is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": require_str(row, "system", where, allow_empty=True, names=names)}, *messages]


def _check_chat(messages, field, where):
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: '{field}' has no assistant turn to learn from")
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: '{field}' ends with a {messages[-1]['role']!r} turn that no assistant turn answers; "
            f"end each chat with the assistant's reply (drop the trailing turn)"
        )
    return messages


def row_to_messages(row, where, names=None):
    """A row of any supported shape as a list of chat messages.

    Shapes (after renaming by ``names``, the ``data.fields`` mapping): ``messages`` (chat),
    ``conversations`` (ShareGPT), ``instruction`` + optional ``input`` + ``output`` (Alpaca),
    ``prompt`` + ``response`` (or ``completion``); each may add a ``system`` column.
    """
    names = names or {}
    row = map_fields(row, names)
    if row.get("messages") is not None:
        label = names.get("messages", "messages")
        messages = _with_system(require_messages(row["messages"], label, where), row, names, where)
        return _check_chat(messages, label, where)
    if row.get("conversations") is not None:
        label = names.get("conversations", "conversations")
        messages = _with_system(sharegpt_messages(row["conversations"], label, where), row, names, where)
        return _check_chat(messages, label, where)
    if row.get("instruction") is not None or row.get("output") is not None:
        prompt = require_str(row, "instruction", where, allow_empty=True, names=names)
        if row.get("input") is not None and require_str(row, "input", where, allow_empty=True, names=names).strip():
            prompt = f"{prompt}\n\n{row['input']}"
        response = require_str(row, "output", where, names=names)
        return _with_system([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], row, names, where)
    if row.get("response") is None and row.get("completion") is not None and "response" not in names:
        row = {**row, "response": row["completion"]}  # TRL's prompt/completion rows
    if "prompt" in row or "response" in row:
        prompt = require_str(row, "prompt", where, allow_empty=True, names=names)
        response = require_str(row, "response", where, names=names)
        return _with_system([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], row, names, where)
    keys = sorted(k for k, v in row.items() if v is not None)
    raise DataError(
        f"{where}: expected a 'messages' list or 'prompt' and 'response' fields (or Alpaca 'instruction'/'output', "
        f"ShareGPT 'conversations'); got keys {keys}. Map your columns with data.fields (e.g. -o data.fields.prompt={keys[0] if keys else 'question'})"
    )


# --------------------------------------------------------------------------------------------
# rendering and tokenising
# --------------------------------------------------------------------------------------------


class ChatText(str):
    """Text rendered from chat messages that remembers where the messages' content typed the
    text of a special token (``literals``: char spans). ``encode_chat_text`` tokenises those
    as text, as the serving engines do, so that a data row or a user cannot inject turns."""

    literals = ()


#: Stand-ins for special-token text in message content while a template renders: private-use
#: characters (U+F0000 on), as many as the text has, so that rendered offsets stay the same.
_PLACEHOLDER = 0xF0000


def _hide_special_text(tokenizer, messages):
    """``(messages, restore)``: ``messages`` with each special token's text in their content
    replaced by placeholders, and ``restore(rendered)``, the ``ChatText`` with it put back."""
    specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len, reverse=True)
    contents = [m["content"] for m in messages if isinstance(m.get("content"), str)]
    typed = [s for s in specials if any(s in content for content in contents)]
    if not typed:
        return messages, ChatText
    placeholder = {s: chr(_PLACEHOLDER + i) * len(s) for i, s in enumerate(typed)}
    special_of = {chr(_PLACEHOLDER + i): s for i, s in enumerate(typed)}
    special_text = re.compile("|".join(map(re.escape, typed)))  # longest first
    placeholders = re.compile("|".join(map(re.escape, placeholder.values())))
    hidden = [
        {**m, "content": special_text.sub(lambda match: placeholder[match.group()], m["content"])}
        if isinstance(m.get("content"), str)
        else m
        for m in messages
    ]

    def restore(rendered):
        text = ChatText(placeholders.sub(lambda match: special_of[match.group()[0]], rendered))
        text.literals = tuple(match.span() for match in placeholders.finditer(rendered))
        return text

    return hidden, restore


def render_prompt(tokenizer, messages):
    """The generation prompt of ``messages`` in the chat template, as a ``ChatText`` (tokenise
    it with ``encode_chat_text``)."""
    hidden, restore = _hide_special_text(tokenizer, messages)
    return restore(tokenizer.apply_chat_template(hidden, tokenize=False, add_generation_prompt=True))


def encode_chat_text(tokenizer, text, add_special_tokens=False, return_offsets_mapping=False):
    """``{"input_ids"[, "offset_mapping"]}`` of ``text``. In a ``ChatText`` the template's own
    special tokens are control tokens and the special-token text its messages typed
    (``literals``) is split into ordinary tokens; other text tokenises as the tokenizer alone would.

    :param add_special_tokens: for text that no template rendered (a template writes its own).
    """
    keys = ["input_ids", "offset_mapping"] if return_offsets_mapping else ["input_ids"]
    literals = getattr(text, "literals", ())
    if not literals:
        encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=return_offsets_mapping)
        return {key: encoding[key] for key in keys}
    bounds = [0, *(bound for span in literals for bound in span), len(text)]
    encoded = {key: [] for key in keys}
    for index, (start, end) in enumerate(zip(bounds, bounds[1:])):
        if start == end:
            continue
        split = {"split_special_tokens": True} if index % 2 else {}  # odd pieces are the literals
        encoding = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=return_offsets_mapping, **split)
        encoded["input_ids"] += encoding["input_ids"]
        if return_offsets_mapping:
            encoded["offset_mapping"] += [(a + start, b + start) for a, b in encoding["offset_mapping"]]
    return encoded


def render_chat(tokenizer, messages, where):
    """Render ``messages`` and return ``(text, spans)``: the ``ChatText`` and the char spans of
    each assistant turn.

    Without a chat template, turns are concatenated as plain text and each assistant turn ends
    with the EOS token.
    """
    messages, restore = _hide_special_text(tokenizer, messages)
    if not tokenizer.chat_template:
        text, spans = "", []
        for message in messages:
            start = len(text)
            text += message["content"]
            if message["role"] == "assistant":
                text += tokenizer.eos_token or ""
                spans.append((start, len(text)))
        return restore(text), spans

    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not upto.startswith(before):
            raise DataError(
                f"{where}: the chat template does not render turn {i} as an extension of the "
                f"turns before it, so the response tokens cannot be located; use a template "
                f"that renders prefixes consistently"
            )
        spans.append((len(before), len(upto)))
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if spans and not text.startswith(text[: spans[-1][1]]):
        raise DataError(f"{where}: the chat template renders the whole chat differently from its prefixes")
    return restore(text), spans


def tokenize_with_mask(tokenizer, text, spans):
    """Token ids of ``text`` (``encode_chat_text``) and labels that keep only tokens starting
    inside ``spans``."""
    encoding = encode_chat_text(tokenizer, text, return_offsets_mapping=True)
    ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for index, (start, end) in enumerate(encoding["offset_mapping"]):
        if end > start and any(s <= start < e for s, e in spans):
            labels[index] = ids[index]
    return ids, labels


# --------------------------------------------------------------------------------------------
# batching and packing
# --------------------------------------------------------------------------------------------


def pad_batch(sequences, pad_value):
    """Right-pad lists of ints into a ``[batch, longest]`` long tensor."""
    longest = max(len(s) for s in sequences)
    return torch.tensor([list(s) + [pad_value] * (longest - len(s)) for s in sequences], dtype=torch.long)


def collate_sft(examples, pad_token_id):
    """Pad SFT examples into ``input_ids``, ``attention_mask`` and ``labels``.

    Packed rows (examples with ``position_ids``) also get ``position_ids``; their padding
    continues as one more sequence starting at 0, which no real token attends to (causal).
    Their ``attention_mask`` marks the real tokens for counting only: ``target_logits`` does not
    pass it to the model, so that transformers confines attention to each packed example.
    """
    ids = [e["input_ids"] for e in examples]
    batch = {
        "input_ids": pad_batch(ids, pad_token_id),
        "attention_mask": pad_batch([[1] * len(s) for s in ids], 0),
        "labels": pad_batch([e["labels"] for e in examples], IGNORE_INDEX),
    }
    if "position_ids" in examples[0]:
        longest = batch["input_ids"].shape[1]
        batch["position_ids"] = torch.tensor(
            [list(e["position_ids"]) + list(range(longest - len(e["position_ids"]))) for e in examples], dtype=torch.long
        )
    return batch


def pack_examples(examples, max_length, label="the training data"):
    """Pack examples into rows of at most ``max_length`` tokens (best-fit decreasing, deterministic).

    Each row holds ``input_ids``, ``labels`` and ``position_ids`` restarting at 0 per example
    (and the ``sources`` and source ``rows`` of its examples);
    the first label of every example is ``IGNORE_INDEX`` (the previous example's last token
    must not learn to predict it; unpacked, nothing predicts it either).

    :raises DataError: listing the examples longer than ``max_length`` (never cut silently).
    """
    bad = BadRows(label)
    for example in examples:
        with bad.check():
            if len(example["input_ids"]) > max_length:
                raise DataError(
                    f"{example.get('source', 'an example')}: {len(example['input_ids'])} tokens do not fit a packed row of "
                    f"train.max_length={max_length}; raise train.max_length, or shorten or remove the row (packing never cuts a row)"
                )
    bad.raise_if_any()
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows, space = [], []  # space[r]: tokens left in rows[r]
    for i in order:
        length = len(examples[i]["input_ids"])
        fits = [r for r in range(len(rows)) if space[r] >= length]
        if fits:
            r = min(fits, key=lambda r: (space[r], r))
        else:
            rows.append([])
            space.append(max_length)
            r = len(rows) - 1
        rows[r].append(i)
        space[r] -= length
    packed = []
    for members in rows:
        members.sort()
        row = {"input_ids": [], "labels": [], "position_ids": [], "sources": [], "rows": []}
        for i in members:
            example = examples[i]
            row["input_ids"] += example["input_ids"]
            row["labels"] += [IGNORE_INDEX] + list(example["labels"][1:])
            row["position_ids"] += range(len(example["input_ids"]))
            row["sources"].append(example.get("source"))
            row["rows"].append(example.get("row"))
        packed.append(row)
    return packed


class Truncation:
    """Cuts the examples of one file to ``max_length`` tokens and counts what it cut.

    An example is one or more ``(ids, labels)`` sequences (one for SFT; chosen and rejected for
    DPO). Sequences keep their start; an example is dropped when a sequence loses every labelled
    token. ``stats`` gives the counts a loader reports (and the progress plugin prints).
    """

    def __init__(self, max_length):
        self.max_length, self.truncated, self.dropped = max_length, 0, 0

    def cut(self, sequences):
        """``sequences`` cut to ``max_length``, or ``None`` if the example is to be dropped."""
        if all(len(ids) <= self.max_length for ids, _ in sequences):
            return sequences
        self.truncated += 1
        cut = [(ids[: self.max_length], labels[: self.max_length]) for ids, labels in sequences]
        if any(all(label == IGNORE_INDEX for label in labels) for _, labels in cut):
            self.dropped += 1
            return None
        return cut

    def stats(self, kept):
        """``{"rows", "truncated", "dropped"}`` for a file of which ``kept`` examples were kept."""
        return {"rows": kept + self.dropped, "truncated": self.truncated, "dropped": self.dropped}


# --------------------------------------------------------------------------------------------
# SFT files, cached by content
# --------------------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer):
    """A hash of what tokenises and renders: the vocabulary and rules, specials, chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(
        backend.to_str().encode() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items())).encode()
    )
    digest.update(json.dumps([tokenizer.chat_template, tokenizer.eos_token, type(tokenizer).__name__], default=str).encode())
    return digest.hexdigest()


def _cache_key(parts):
    source = Path(__file__).read_bytes()  # a change to this module's code invalidates the cache
    return hashlib.sha256(json.dumps([CACHE_VERSION, hashlib.sha256(source).hexdigest(), *parts]).encode()).hexdigest()[:32]


def _read_cache(directory):
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / "meta.json").read_text())
        tensors = load_file(directory / "tokens.safetensors")
    except (OSError, ValueError):  # absent, or damaged: tokenise again
        return None
    ids, labels, offsets = tensors["input_ids"].tolist(), tensors["labels"].tolist(), tensors["offsets"].tolist()
    examples = [
        {"input_ids": ids[a:b], "labels": labels[a:b], "row": row, "source": source}
        for a, b, row, source in zip(offsets[:-1], offsets[1:], meta["rows"], meta["sources"])
    ]
    return examples, meta["stats"]


def _write_cache(directory, examples, stats):
    from safetensors.torch import save_file

    from .checkpoint import atomic_directory

    lengths = [len(e["input_ids"]) for e in examples]
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    tensors = {
        "input_ids": torch.tensor([i for e in examples for i in e["input_ids"]], dtype=torch.int64),
        "labels": torch.tensor([i for e in examples for i in e["labels"]], dtype=torch.int64),
        "offsets": offsets,
    }
    meta = {"stats": stats, "rows": [e["row"] for e in examples], "sources": [e["source"] for e in examples]}
    try:
        with atomic_directory(directory) as tmp:
            save_file(tensors, str(tmp / "tokens.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(meta))
    except OSError:  # a read-only or full cache only costs the next run the tokenising
        pass


def load_sft_file(path, tokenizer, max_length, options=None, cache=True, truncate=True):
    """Tokenise an SFT data source (a file, directory or hub id); return ``(examples, stats)``.

    Sequences longer than ``max_length`` are truncated and counted (``truncate``), or kept whole
    for packing, which refuses them; a row whose response tokens are all cut off is dropped and
    counted. Every bad row is collected and reported together. The result is cached under
    ``$FTENGINE_CACHE/tokenized`` by the hash of the data's bytes, the tokenizer and the options.

    :param options: the ``data`` config section (field mapping, split, subset, limit).
    """
    from .config import DataOptions

    options = options or DataOptions()
    names = field_names(options.fields)
    content = content_hash(path) if cache else None
    directory = None
    if content is not None:
        key = _cache_key(
            [
                content,
                tokenizer_fingerprint(tokenizer),
                max_length if truncate else None,
                names,
                options.limit,
                str(path),  # the examples name their rows by path
            ]
        )
        directory = cache_root() / "tokenized" / key
        cached = _read_cache(directory)
        if cached is not None:
            return cached
    rows = read_rows(path, options)
    columns = {key for row, _ in rows for key in row}
    check_fields(names, columns, path)
    examples, truncation, bad = [], Truncation(max_length if truncate else math.inf), BadRows(path)
    for row, where in rows:
        with bad.check():
            messages = row_to_messages(row, where, names)
            text, spans = render_chat(tokenizer, messages, where)
            ids, labels = tokenize_with_mask(tokenizer, text, spans)
            if all(label == IGNORE_INDEX for label in labels):
                raise DataError(f"{where}: the response is empty after tokenisation")
            sequences = truncation.cut([(ids, labels)])
            if sequences is None:
                continue
            ((ids, labels),) = sequences
            examples.append({"input_ids": ids, "labels": labels, "row": row, "source": where})
    bad.raise_if_any()
    stats = truncation.stats(kept=len(examples))
    if directory is not None:
        _write_cache(directory, examples, stats)
    return examples, stats


def split_off_eval(examples, fraction, seed, label):
    """``(train, eval)``: a seeded ``fraction`` of ``examples`` (at least one) carved off for evaluation."""
    count = max(1, round(len(examples) * fraction))
    if count >= len(examples):
        raise DataError(
            f"{label}: data.eval_split={fraction} of {len(examples)} examples leaves no training example; "
            f"give more rows or a smaller eval_split"
        )
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen = set(order[:count])
    return [e for i, e in enumerate(examples) if i not in chosen], [e for i, e in enumerate(examples) if i in chosen]


def load_splits(config, read_file, collate, length=token_count):
    """``Datasets`` from ``data.train``, ``data.eval`` (or ``data.eval_split`` of the train data)
    and ``data.eval_sets``.

    :param read_file: ``read_file(path, split) -> (examples, stats)`` for one data source.
    :param collate: pads a list of examples into a batch.
    :param length: an example's tokens (``Datasets.length``).
    """
    data = config.data
    train, stats = read_file(data.train, "train")
    if data.eval:
        eval_examples, eval_stats = read_file(data.eval, "eval")
    elif data.eval_split:
        train, eval_examples = split_off_eval(train, data.eval_split, config.train.seed, data.train)
        eval_stats = {"rows": len(eval_examples), "truncated": 0, "dropped": 0, "split_from": "train"}
    else:
        eval_examples, eval_stats = [], {}
    eval_sets, set_stats = {}, {}
    for name, source in data.eval_sets.items():
        eval_sets[name], set_stats[f"eval_{name}"] = read_file(source, name)
    stats = {"train": stats, "eval": eval_stats, **set_stats}
    return Datasets(train=train, eval=eval_examples, collate=collate, stats=stats, eval_sets=eval_sets, length=length)
