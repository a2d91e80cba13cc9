#!/usr/bin/env python3
# /// script
# requires-python = ">=3.11"
# dependencies = ["httpx>=0.25", "tqdm>=4.64", "pyarrow>=14"]
# ///
"""Score every row of a large dataset with a local LLM spread over a fleet of machines.

Reads source-code functions from Parquet or JSONL, asks each Ollama (or
OpenAI-compatible) server listed in endpoints.txt to grade them 1..10, and
appends one JSON line per finished row to a checkpoint that survives crashes.
Throughput adds up across machines; each machine gets as many requests in flight
as it can use (adaptive), and the run can be killed and resumed at any moment.

Usage:
    python score.py data.parquet --endpoints endpoints.txt
    python score.py data.parquet --endpoints endpoints.txt --resume   # after a crash
    python score.py data.parquet --check                              # preflight only

Input:
    a .parquet file, a directory of .parquet files, or .jsonl/.ndjson (optionally .gz).
    Ids come from --id-column (default "id" if present, else the 0-based row number;
    for JSONL the physical line number). Text comes from --text-column (default the
    first of code, function, content, text).

Output (<input>.scores.jsonl unless -o): one JSON object per finished row, e.g.
    {"id": "fn-17", "score": 7, "reason": "...", "model": "qwen2.5-coder:7b", ...,
     "error": null, "error_kind": null}
    Consumers take the last record with a non-null score per id.

Resuming: --resume skips every id that has a score or a permanent error (empty text,
malformed line), repairs a torn final line, and retries rows whose attempts ran out.
A sidecar <output>.meta.json pins model, prompt and input; mixing needs --force.

Exit codes:
    0    every row taken has a score
    1    some rows have no score (failed, permanently skipped, or --max-downtime hit)
    2    bad usage or input, no usable endpoint, or an existing output without --resume
    130  interrupted (SIGINT);  143  terminated (SIGTERM)

Layout of this file (in the order data flows):
    Constants · Data model · Errors · Input · Checkpoint · Endpoints · Scoring ·
    Scheduling · Progress and summary · Export and report · CLI
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import functools
import gzip
import hashlib
import html
import itertools
import json
import math
import os
import random
import re
import signal
import ssl
import statistics
import string
import sys
import time
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

# ── Constants ───────────────────────────────────────────────────────────────────

__version__ = "0.3.0"

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}

DEFAULT_MODEL = "qwen2.5-coder:7b"
DEFAULT_ENDPOINT = "http://localhost:11434"
OLLAMA_PORT = 11434
TEXT_COLUMNS = ("code", "function", "content", "text")
ENDPOINT_KEYS = ("concurrency", "model", "name", "api", "key_env")

SCORE_SCHEMA = {
    "type": "object",
    "properties": {
        "score": {"type": "integer", "minimum": 1, "maximum": 10},
        "reason": {"type": "string"},
    },
    "required": ["score", "reason"],
}

DEFAULT_PROMPT = """\
You are reviewing source code to select high-quality examples for fine-tuning a code model.
Rate the function below from 1 to 10 as a training example.

Judge: readability and naming; apparent correctness; idiomatic use of the language;
documentation (docstring or comments where they help); usefulness as a self-contained
example a model should learn from.

1  = broken, meaningless, auto-generated or unreadable; never train on it.
5  = works and is readable but unremarkable: thin docs, some smells, little to learn.
10 = exemplary: clear, correct, idiomatic, well documented, worth imitating.

Answer with JSON only: {{"score": <integer 1-10>, "reason": "<one short sentence>"}}

```
{code}
```
"""

NUM_PREDICT = 256           # answer budget; a score and one sentence fit easily
CHARS_PER_TOKEN = 2.5       # conservative for code: cut more rather than overflow
CONTEXT_MARGIN = 64         # tokens kept free for the chat template's own markup
MAX_SHRINKS = 4             # context-overflow re-cuts of one item before giving up
TRUNCATION_MARK = "\n... [truncated]"

PERMANENT_ERRORS = frozenset({"empty", "malformed", "no_id", "template"})

DOWN_AFTER = 3              # consecutive endpoint faults that take an endpoint down
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
PROBE_CAP = 60.0            # longest wait between probes of a down endpoint
PROBE_TIMEOUT = 60.0        # single-slot servers answer probes only between generations
POISON_FAULTS = 3           # endpoint faults one item may cause before it is suspect

AUTO_MAX = 64               # ceiling for adaptive concurrency
AUTO_GAIN = 0.08            # a higher limit must raise throughput by this share to stay,
AUTO_STEP_SHARE = 0.25      # and by this share of the step's relative size (x2 must gain 25%)
AUTO_PROPORTIONAL = 0.85    # a doubling that raised throughput less than this share of x2 passed the server's capacity
AUTO_WINDOW = 4             # completions per measurement window (at least the limit) while ramping,
AUTO_STEADY = 4             # times this while holding, where a noisy window could talk it down
AUTO_PROBE_SECONDS = 30.0   # first upward re-probe after settling; doubles while probes do not pay
AUTO_PROBE_MAX = 600.0
AUTO_DROP = 0.8             # a held limit whose throughput falls below this share is probed downward
HEDGE_RATIO = 0.5           # race an item when we expect to finish in < this share of its remaining time
OVERDUE = 3.0               # a request running this many service times may be stalled: not counted on

QUEUE_SIZE = 256            # bounded hand-off between the reader and the workers
READ_CHUNK = 256            # rows per hop from the reader thread to the event loop
FSYNC_EVERY = 2.0           # seconds between fsyncs of the checkpoint while running

HANDFUL = 4                 # up to this many endpoints, the progress line names each; beyond, it summarises
MIN_BAR = 10                # the progress bar keeps at least this many columns
BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"   # the rate is in the status
RATE_WINDOW = 30.0          # seconds over which the progress line's items/s is measured
LOG_STATUS = 160            # characters of fleet status in the once-a-minute log line

# ── Data model ──────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One line of endpoints.txt, validated."""

    url: str
    name: str
    api: str                     # "auto", "ollama" or "openai"
    model: str | None            # per-machine override of --model
    concurrency: int | None      # None = adaptive
    key_env: str | None
    line: int


@dataclass(frozen=True, slots=True)
class Config:
    """Everything the run needs, typed; argparse stops before this."""

    input: Path
    output: Path
    endpoints: tuple[EndpointSpec, ...]
    resume: bool
    overwrite: bool
    force: bool
    model: str
    id_column: str | None
    text_column: str | None
    prompt: str
    prompt_source: str
    concurrency: int | None
    timeout: float
    max_attempts: int
    limit: int | None
    num_ctx: int
    temperature: float
    seed: int
    keep_alive: str
    max_downtime: float | None
    startup_timeout: float
    allow_mixed_models: bool
    pull: bool
    check: bool
    hedge: bool
    dedup: bool
    progress: bool
    export: Path | None
    min_score: int | None
    report: bool
    report_html: Path | None


@dataclass(slots=True, eq=False)
class Item:
    """One input row on its way through the fleet; identity-hashed."""

    id: int | str
    key: int                      # compact 64-bit form of the id, for the done-set
    text: str | None
    fields: dict[str, Any]
    digest: int = 0               # content hash for duplicate fan-out (0 = none)
    problem: tuple[str, str] | None = None   # (error_kind, message): never sent
    attempts: int = 0             # item faults charged against --max-attempts
    faults: int = 0               # endpoint faults seen while carrying this item
    fault_endpoints: set[str] | None = None
    avoid: str | None = None      # endpoint that last gave a bad answer for it
    max_chars: int | None = None  # code budget learned from a context overflow
    shrinks: int = 0
    last_error: str = ""
    tasks: dict[Any, asyncio.Task] = field(default_factory=dict)
    hedged: bool = False
    racer: Any = None             # the endpoint that sent the raced copy
    finished: bool = False
    followers: list[Item] | None = None


@dataclass(slots=True)
class Answer:
    """A validated answer from one request."""

    score: int
    reason: str
    prompt_tokens: int | None
    output_tokens: int | None
    latency: float
    truncated: bool
    seed: int
    temperature: float


# ── Errors ──────────────────────────────────────────────────────────────────────
# Whose fault decides what happens next: an endpoint's trouble re-queues the item
# for free, an item's trouble costs one of its attempts, a fatal answer retires
# the endpoint, and a UsageError ends the run with exit 2 before damage is done.


class UsageError(Exception):
    """Bad command line, input or environment: one line, exit 2."""


class EndpointFault(Exception):
    """The endpoint could not answer (down, busy, crashed, timed out)."""

    def __init__(self, message: str, *, retry_after: float | None = None, connect: bool = False,
                 item_related: bool = True, overload: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.overload = overload          # busy/slow: fewer requests in flight would help
        self.connect = connect            # never the item's fault: no request was made
        self.item_related = item_related  # could this item have caused it?


class ItemFault(Exception):
    """The endpoint answered, but not usefully for this item."""

    def __init__(self, message: str, kind: str = "bad_answer") -> None:
        super().__init__(message)
        self.kind = kind


class ContextOverflow(Exception):
    """The prompt does not fit the server's context: cut the code and resend."""

    def __init__(self, message: str, requested: int | None, limit: int | None) -> None:
        super().__init__(message)
        self.requested = requested
        self.limit = limit


class EndpointGone(Exception):
    """The endpoint refuses us for good (auth, missing model): take it out."""


class FormatRejected(Exception):
    """An OpenAI-compatible server rejected json_schema response_format."""


class StopRun(Exception):
    """The run cannot go on (all endpoints retired, --max-downtime hit, disk full)."""

    def __init__(self, message: str, code: int = EXIT_INCOMPLETE) -> None:
        super().__init__(message)
        self.code = code


# ── Input ───────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class InputInfo:
    """What the dataset looks like: its files, columns and size."""

    kind: str                       # "parquet" or "jsonl"
    files: tuple[Path, ...]
    columns: tuple[str, ...]
    total: int | None               # rows (Parquet metadata); JSONL is counted later
    id_column: str | None           # None: ids are row (line) numbers
    text_column: str
    fields: tuple[str, ...]         # template columns besides {code}


def id_key(value: int | str) -> int:
    """Return the compact signed 64-bit key that stands for an id in memory."""
    if type(value) is int and -(1 << 63) <= value < (1 << 63):
        return value
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


TRAILING_BLANKS = re.compile(r"[ \t]+(?=\n)")


def text_digest(text: str) -> int:
    """Hash code after a cheap normalization: line endings, trailing blanks, outer whitespace."""
    normal = TRAILING_BLANKS.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
    value = int.from_bytes(hashlib.blake2b(normal.encode(), digest_size=8).digest(), "little", signed=True)
    return value or 1


def format_digest(value: int) -> str:
    """Render a content digest as 16 hex characters, as stored in records."""
    return (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little").hex()


def parse_digest(text: str) -> int:
    """Invert format_digest."""
    return int.from_bytes(bytes.fromhex(text), "little", signed=True)


def template_fields(template: str) -> tuple[str, ...]:
    """Return the {column} names a prompt template uses, raising ValueError if malformed."""
    names = []
    for _, name, _, _ in string.Formatter().parse(template):
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"unsupported placeholder {{{name}}}: use {{column}} names only")
        if name not in names:
            names.append(name)
    return tuple(names)


def input_kind(path: Path) -> str:
    """Tell Parquet from JSONL by suffix, or raise UsageError."""
    if path.is_dir():
        return "parquet"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] == ".parquet":
        return "parquet"
    if suffixes and suffixes[-1] in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    raise UsageError(f"{path}: unknown input type (expected .parquet, a directory of them, .jsonl or .ndjson, optionally .gz)")


def open_lines(path: Path):
    """Open a JSONL file for binary line reading, transparently gunzipping."""
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rb")
    return open(path, "rb")


def inspect_input(path: Path, id_column: str | None, text_column: str | None, template: str) -> InputInfo:
    """Check the input exists and has the columns we need; choose id and text columns."""
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    kind = input_kind(path)
    if kind == "parquet":
        files = tuple(sorted(p for p in path.rglob("*.parquet") if p.is_file())) if path.is_dir() else (path,)
        if not files:
            raise UsageError(f"{path}: directory holds no .parquet files")
        total, columns = 0, None
        for file in files:
            try:
                meta = pq.ParquetFile(file)
            except (pa.ArrowException, OSError) as exc:
                raise UsageError(f"{file}: not a readable Parquet file ({one_line(exc)})") from None
            total += meta.metadata.num_rows
            names = tuple(meta.schema_arrow.names)
            if columns is None:
                columns = names
            elif set(names) != set(columns):
                raise UsageError(f"{file}: columns {list(names)} differ from {files[0].name}'s {list(columns)}")
    else:
        files, total, columns = (path,), None, ()
        try:
            with open_lines(path) as lines:
                for raw in itertools.islice(lines, 1000):
                    with contextlib.suppress(ValueError):
                        row = json.loads(raw)
                        if isinstance(row, dict):
                            columns = tuple(row)
                            break
        except (OSError, EOFError) as exc:
            raise UsageError(f"{path}: cannot read ({one_line(exc)})") from None
        if not columns:
            raise UsageError(f"{path}: no JSON object found in the first 1000 lines")
    if id_column is None:
        id_column = "id" if "id" in columns else None
    elif id_column not in columns:
        raise UsageError(f"{path}: no id column {id_column!r}; columns are: {', '.join(columns)}")
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None:
            raise UsageError(f"{path}: no text column (looked for {', '.join(TEXT_COLUMNS)}); "
                             f"columns are: {', '.join(columns)}; pick one with --text-column")
    elif text_column not in columns:
        raise UsageError(f"{path}: no text column {text_column!r}; columns are: {', '.join(columns)}")
    try:
        names = template_fields(template)
    except ValueError as exc:
        raise UsageError(f"prompt template: {exc}") from None
    if "code" not in names and text_column not in names:
        raise UsageError("prompt template has no {code} placeholder for the function's text")
    missing = [n for n in names if n != "code" and n not in columns]
    if missing:
        raise UsageError(f"prompt template uses {', '.join(missing)}, which the input lacks; columns are: {', '.join(columns)}")
    fields = tuple(n for n in names if n != "code")
    return InputInfo(kind, files, columns, total, id_column, text_column, fields)


def row_id(ident: Any, label: str) -> int | str:
    """Normalize an id value; a null id becomes the row's label (row:N / line:N)."""
    if ident is None:
        return label
    return ident if isinstance(ident, (int, str)) else str(ident)


def make_item(ident: int | str, key: int, text: Any, fields: dict[str, Any], dedup: bool,
              null_id: bool = False) -> Item:
    """Build an Item from one row, marking rows that must not be sent."""
    problem = ("no_id", "the id column is null") if null_id else None
    if problem is None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        elif text is not None and not isinstance(text, str):
            text = str(text)
        if text is None or not text.strip():
            problem = ("empty", "the text is null or empty")
        elif missing := [k for k, v in fields.items() if v is None]:
            problem = ("template", f"no value for prompt column(s) {', '.join(missing)}")
    item = Item(id=ident, key=key, text=text if problem is None else None, fields=fields, problem=problem)
    if problem is None and dedup:
        item.digest = text_digest(text)
    return item


def read_parquet(info: InputInfo, dedup: bool, done: Callable[[int], bool]) -> Iterator[Item]:
    """Stream items from Parquet in record batches, reading only the needed columns.

    Each row group is read twice: its ids first, to find the rows still to do, and
    then (only if there are any) the text of just those rows. Resuming near the end
    of a big file therefore decodes ids, not gigabytes of code into Python strings.
    """
    wanted = [c for c in dict.fromkeys([info.id_column, info.text_column, *info.fields]) if c]
    row = 0
    for file in info.files:
        try:
            parquet = pq.ParquetFile(file)
            for group in range(parquet.num_row_groups):
                start = row
                row += parquet.metadata.row_group(group).num_rows
                todo = pending_rows(parquet, group, start, row, info.id_column, done)
                if todo:
                    yield from read_rows(parquet, group, start, todo, info, wanted, dedup)
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"{file}: cannot read row group starting at row {row} ({one_line(exc)})") from None


def pending_rows(parquet: pq.ParquetFile, group: int, start: int, end: int, id_column: str | None,
                 done: Callable[[int], bool]) -> array:
    """Return the in-group positions of rows not yet done (8 bytes each)."""
    todo = array("q")
    if id_column is None:
        todo.extend(i - start for i in range(start, end) if not done(i))
        return todo
    position = 0
    for batch in parquet.iter_batches(batch_size=65536, row_groups=[group], columns=[id_column]):
        for ident in batch.column(0).to_pylist():
            if not done(id_key(row_id(ident, f"row:{start + position}"))):
                todo.append(position)
            position += 1
    return todo


def read_rows(parquet: pq.ParquetFile, group: int, start: int, todo: array, info: InputInfo,
              wanted: list[str], dedup: bool) -> Iterator[Item]:
    """Yield Items for the rows at positions `todo` of one row group, batch by batch."""
    position = 0
    for batch in parquet.iter_batches(batch_size=16384, row_groups=[group], columns=wanted):
        lo = bisect.bisect_left(todo, position)
        hi = bisect.bisect_left(todo, position + batch.num_rows)
        if lo < hi:
            picked = batch.take(pa.array([p - position for p in todo[lo:hi]], pa.int64()))
            data = {name: picked.column(name).to_pylist() for name in wanted}
            for j, p in enumerate(todo[lo:hi]):
                number = start + p
                raw_id = data[info.id_column][j] if info.id_column else number
                ident = row_id(raw_id, f"row:{number}")
                fields = {name: data[name][j] for name in info.fields}
                yield make_item(ident, id_key(ident), data[info.text_column][j], fields, dedup,
                                null_id=raw_id is None)
        position += batch.num_rows


def read_jsonl(info: InputInfo, dedup: bool, done: Callable[[int], bool]) -> Iterator[Item]:
    """Stream items from JSONL line by line; a malformed line becomes an error item."""
    path = info.files[0]
    try:
        with open_lines(path) as lines:
            for number, raw in enumerate(lines):
                if info.id_column is None and done(number):   # row-number ids: skip without parsing
                    continue
                if not raw.strip():
                    continue
                label = f"line:{number + 1}"
                try:
                    obj = json.loads(raw)
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                except ValueError as exc:
                    ident = number if info.id_column is None else label
                    key = id_key(ident)
                    if info.id_column is None or not done(key):
                        yield Item(id=ident, key=key, text=None, fields={}, problem=(
                            "malformed", f"line {number + 1}: not valid JSON ({one_line(exc)})"))
                    continue
                if info.id_column is None:
                    ident, key, null_id = number, number, False
                else:
                    raw_id = obj.get(info.id_column)
                    ident, null_id = row_id(raw_id, label), raw_id is None
                    key = id_key(ident)
                    if done(key):
                        continue
                fields = {name: obj.get(name) for name in info.fields}
                yield make_item(ident, key, obj.get(info.text_column), fields, dedup, null_id)
    except (OSError, EOFError) as exc:
        raise UsageError(f"{path}: cannot read ({one_line(exc)})") from None


def read_items(info: InputInfo, dedup: bool = True, done: Callable[[int], bool] = lambda key: False) -> Iterator[Item]:
    """Stream the rows not yet `done` (by id key) as Items, never holding the dataset in memory."""
    reader = read_parquet if info.kind == "parquet" else read_jsonl
    return reader(info, dedup, done)


def count_rows(info: InputInfo) -> int:
    """Count JSONL lines quickly (for the progress total); Parquet knows from metadata."""
    if info.total is not None:
        return info.total
    count, last = 0, b"\n"
    with open_lines(info.files[0]) as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


# ── Checkpoint ──────────────────────────────────────────────────────────────────


def arrow_int64(values: array) -> pa.Array:
    """View an array('q') as an Arrow array without copying."""
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def to_array(values: pa.Array) -> array:
    """Copy an Arrow int64 array back into an array('q')."""
    out = array("q")
    out.frombytes(values.buffers()[1].to_pybytes()[values.offset * 8:(values.offset + len(values)) * 8])
    return out


def sort_together(keys: array, *others: array) -> tuple[array, ...]:
    """Sort keys (stably, in C++) and carry parallel arrays along; a Python sort of a million
    ints would allocate ~40 MB of int objects."""
    if not keys:
        return (keys, *others)
    order = pc.sort_indices(arrow_int64(keys))
    return tuple(to_array(arrow_int64(a).take(order)) for a in (keys, *others))


class KeySet:
    """A frozen set of 64-bit keys in a sorted array: 8 bytes per key."""

    def __init__(self, keys: array) -> None:
        (self._keys,) = sort_together(keys)

    def __contains__(self, key: int) -> bool:
        i = bisect.bisect_left(self._keys, key)
        return i < len(self._keys) and self._keys[i] == key

    def __len__(self) -> int:
        return len(self._keys)


class DigestIndex:
    """Map content digests to the checkpoint offset of the first scored record with that text."""

    def __init__(self, keys: array | None = None, offsets: array | None = None) -> None:
        # sorted by digest, and stably, so the first of equal digests is the earliest record
        self._keys, self._offsets = sort_together(keys or array("q"), offsets or array("q"))
        self._recent: dict[int, int] = {}

    def get(self, digest: int) -> int | None:
        """Return the record offset for digest, or None."""
        offset = self._recent.get(digest)
        if offset is not None:
            return offset
        i = bisect.bisect_left(self._keys, digest)
        if i < len(self._keys) and self._keys[i] == digest:
            return self._offsets[i]
        return None

    def add(self, digest: int, offset: int) -> None:
        """Remember the first scored record of a text."""
        if self.get(digest) is None:
            self._recent[digest] = offset
            if len(self._recent) > max(50_000, len(self._keys) // 2):
                self._compact()

    def _compact(self) -> None:
        # A dict entry costs ~100 bytes, an array slot 16: fold recent entries into the arrays.
        keys, offsets = array("q", self._keys), array("q", self._offsets)
        keys.extend(self._recent.keys())
        offsets.extend(self._recent.values())
        self._keys, self._offsets = sort_together(keys, offsets)
        self._recent = {}

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)


@dataclass(slots=True)
class ResumeState:
    """What an existing checkpoint says is finished."""

    scored: KeySet
    permanent: KeySet               # ids with a permanent error and no score
    digests: DigestIndex
    records: int = 0
    retried: int = 0                # ids whose last attempt failed: resume retries them
    bad_lines: int = 0
    torn_bytes: int = 0


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; run one writer per file there
    fcntl = None


# Our own lines start with id and score and end with error_kind, with hash between: reading
# just those with one regex is ~6x faster than json.loads, which stays the fallback.
RECORD_FIELDS = re.compile(rb'\{"id": ("(?:[^"\\]|\\.)*"|-?\d+), "score": (null|\d+), '
                           rb'.*"hash": (null|"[0-9a-f]{16}"), .*"error_kind": (null|"[a-z_]+")\}\r?\n?$', re.S)


def scan_record(line: bytes) -> tuple[int, int | None, str | None, str | None] | None:
    """Return (id key, score, hash, error_kind) of a checkpoint line, or None if unreadable."""
    found = RECORD_FIELDS.match(line)
    try:
        if found:
            raw_id, raw_score, raw_hash, raw_kind = found.groups()
            ident = json.loads(raw_id) if raw_id[:1] == b'"' else int(raw_id)
            return (id_key(ident), None if raw_score == b"null" else int(raw_score),
                    None if raw_hash == b"null" else raw_hash[1:-1].decode(),
                    None if raw_kind == b"null" else raw_kind[1:-1].decode())
        record = json.loads(line)
        return id_key(record["id"]), record.get("score"), record.get("hash"), record.get("error_kind")
    except (ValueError, KeyError, TypeError):
        return None


class Checkpoint:
    """Append-only JSONL of finished items: the only source of truth for resume."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self.size = os.lseek(fd, 0, os.SEEK_END)
        self._synced_at = time.monotonic()
        self._dirty = False

    @classmethod
    def open(cls, path: Path, *, resume: bool, overwrite: bool) -> tuple[Checkpoint, ResumeState]:
        """Open (and lock) the output for appending, repairing and scanning it on resume."""
        exists = path.exists() and path.stat().st_size > 0
        if exists and not (resume or overwrite):
            raise UsageError(f"{path} already holds results ({path.stat().st_size:,} bytes); "
                             "continue it with --resume or start over with --overwrite")
        if path.parent and not path.parent.exists():
            raise UsageError(f"{path.parent}: output directory does not exist")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            raise UsageError(f"{path}: cannot open for writing ({exc.strerror})") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UsageError(f"{path} is being written by another score.py; wait for it or choose another -o") from None
        if overwrite and not resume:
            os.ftruncate(fd, 0)
        checkpoint = cls(path, fd)
        state = ResumeState(KeySet(array("q")), KeySet(array("q")), DigestIndex())
        if resume and checkpoint.size:
            state.torn_bytes = checkpoint._repair_tail()
            state = checkpoint._scan(state.torn_bytes)
        return checkpoint, state

    def _repair_tail(self) -> int:
        """Cut a torn final line (a crash mid-write) and return how many bytes went."""
        size = self.size
        if os.pread(self._fd, 1, size - 1) == b"\n":
            return 0
        end = size
        while end > 0:
            start = max(0, end - 65536)
            block = os.pread(self._fd, end - start, start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
                break
            end = start
        os.ftruncate(self._fd, end)
        os.fsync(self._fd)
        self.size = end
        return size - end

    def _scan(self, torn: int) -> ResumeState:
        """Read every complete line once to learn what is finished."""
        scored, failed, permanent = array("q"), set(), array("q")
        digest_keys, digest_offsets = array("q"), array("q")
        records = bad = 0
        offset = 0
        with open(self.path, "rb", buffering=1 << 20) as f:
            for line in f:
                here, offset = offset, offset + len(line)
                fields = scan_record(line)
                if fields is None:
                    bad += 1
                    continue
                key, score, digest, kind = fields
                records += 1
                if score is not None:
                    scored.append(key)
                    if digest:
                        with contextlib.suppress(ValueError):
                            digest_keys.append(parse_digest(digest))
                            digest_offsets.append(here)
                elif kind in PERMANENT_ERRORS:
                    permanent.append(key)
                else:
                    failed.add(key)
        scored_set = KeySet(scored)
        permanent = array("q", (k for k in permanent if k not in scored_set))
        retried = sum(1 for k in failed if k not in scored_set)
        digests = DigestIndex(digest_keys, digest_offsets)
        return ResumeState(scored_set, KeySet(permanent), digests, records, retried, bad, torn)

    def append(self, record: dict[str, Any]) -> int:
        """Write one record as one complete line; return its offset."""
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        offset = self.size
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise StopRun(f"cannot write {self.path}: {exc.strerror}; fix that and rerun with --resume") from None
        self.size += len(data)
        self._dirty = True
        return offset

    def read_at(self, offset: int) -> dict[str, Any]:
        """Read back the record that starts at offset."""
        data = b""
        while b"\n" not in data:
            block = os.pread(self._fd, 65536, offset + len(data))
            if not block:
                break
            data += block
        return json.loads(data.split(b"\n", 1)[0])

    def sync(self) -> None:
        """Push written lines to the disk."""
        if self._dirty:
            self._dirty = False
            os.fsync(self._fd)

    async def sync_soon(self) -> None:
        """fsync at most every FSYNC_EVERY seconds, in a thread so the loop keeps dispatching."""
        if self._dirty and time.monotonic() - self._synced_at >= FSYNC_EVERY:
            self._dirty = False
            self._synced_at = time.monotonic()
            await asyncio.to_thread(os.fsync, self._fd)

    def close(self) -> None:
        """fsync and release the file (and its lock)."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.sync()
            os.close(self._fd)
            self._fd = -1


def meta_path(output: Path) -> Path:
    """Return the sidecar that pins what a checkpoint's records mean."""
    return output.with_name(output.name + ".meta.json")


def write_meta(output: Path, meta: dict[str, Any]) -> None:
    """Write the sidecar atomically (temp file + rename)."""
    target = meta_path(output)
    temp = target.with_name(target.name + ".tmp")
    temp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
    os.replace(temp, target)


def fingerprint(config: Config, info: InputInfo) -> dict[str, Any]:
    """Describe what makes two runs' scores comparable."""
    return {
        "model": config.model,
        "prompt_sha256": hashlib.sha256(config.prompt.encode()).hexdigest(),
        "schema_sha256": hashlib.sha256(json.dumps(SCORE_SCHEMA, sort_keys=True).encode()).hexdigest(),
        "input": str(config.input.resolve()),
        "id_column": info.id_column,
        "text_column": info.text_column,
    }


def check_meta(config: Config, info: InputInfo) -> dict[str, Any]:
    """Compare the run with the checkpoint's sidecar; refuse to mix unless --force."""
    current = fingerprint(config, info)
    path = meta_path(config.output)
    if not (config.resume and path.exists()):
        return {"fingerprint": current, "endpoints": {}}
    try:
        meta = json.loads(path.read_text())
        old = meta["fingerprint"]
    except (ValueError, KeyError, OSError) as exc:
        warn(f"{path}: unreadable ({one_line(exc)}); it will be rewritten")
        return {"fingerprint": current, "endpoints": {}}
    changed = [k for k in current if old.get(k) != current[k]]
    if changed:
        lines = [f"  {k}: was {old.get(k)!r}, now {current[k]!r}" for k in changed]
        message = (f"{config.output} was written with a different setup; "
                   f"resuming would mix incomparable scores:\n" + "\n".join(lines))
        if not config.force:
            raise UsageError(message + "\nrerun with --force to mix them anyway, or choose another -o")
        warn("WARNING: " + message + "\n(--force given: mixing them)")
        meta["fingerprint"] = current
    meta.setdefault("endpoints", {})
    return meta


# ── Endpoints ───────────────────────────────────────────────────────────────────


def normalize_url(text: str) -> tuple[str, str | None]:
    """Turn host, host:port or a URL into (base URL, implied api); raise ValueError."""
    if "://" not in text:
        text = "http://" + text
        url = httpx.URL(text)
        if url.port is None:
            url = url.copy_with(port=OLLAMA_PORT)
    else:
        url = httpx.URL(text)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"not an http(s) URL: {text!r}")
    base = str(url).rstrip("/")
    if base.endswith("/v1"):
        return base[:-3], "openai"
    return base, None


def parse_endpoint_line(text: str, number: int, source: str) -> EndpointSpec:
    """Parse `URL [key=value ...]` from one line of an endpoints file."""
    where = f"{source}:{number}"
    first, *pairs = text.split()
    try:
        url, implied_api = normalize_url(first)
    except (ValueError, httpx.InvalidURL) as exc:
        raise UsageError(f"{where}: bad endpoint {first!r} ({one_line(exc)})") from None
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value:
            raise UsageError(f"{where}: expected key=value, got {pair!r}")
        if key not in ENDPOINT_KEYS:
            raise UsageError(f"{where}: unknown key {key!r} (known: {', '.join(ENDPOINT_KEYS)})")
        options[key] = value
    concurrency: int | None = None
    if "concurrency" in options and options["concurrency"] != "auto":
        try:
            concurrency = int(options["concurrency"])
            if concurrency < 1:
                raise ValueError
        except ValueError:
            raise UsageError(f"{where}: concurrency must be a positive integer or auto") from None
    api = options.get("api", implied_api or "auto")
    if api not in ("auto", "ollama", "openai"):
        raise UsageError(f"{where}: api must be ollama, openai or auto, not {api!r}")
    key_env = options.get("key_env")
    if key_env is not None and key_env not in os.environ:
        raise UsageError(f"{where}: key_env={key_env} but the environment variable {key_env} is not set")
    name = options.get("name") or httpx.URL(url).netloc.decode()
    return EndpointSpec(url=url, name=name, api=api, model=options.get("model"),
                        concurrency=concurrency if "concurrency" in options else -1,
                        key_env=key_env, line=number)


def parse_endpoints(path: Path | None) -> tuple[EndpointSpec, ...]:
    """Read endpoints.txt (or fall back to the local Ollama)."""
    if path is None:
        return (parse_endpoint_line(DEFAULT_ENDPOINT, 0, "default"),)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read endpoints file ({exc.strerror})") from None
    specs = []
    for number, raw in enumerate(lines, 1):
        text = raw.split("#", 1)[0].strip()
        if text:
            specs.append(parse_endpoint_line(text, number, str(path)))
    if not specs:
        raise UsageError(f"{path}: no endpoints (one URL or host:port per line)")
    for kind in ("url", "name"):
        seen: dict[str, int] = {}
        for spec in specs:
            value = getattr(spec, kind)
            if value in seen:
                raise UsageError(f"{path}:{spec.line}: {kind} {value} already on line {seen[value]}")
            seen[value] = spec.line
    return tuple(specs)


def model_matches(wanted: str, name: str) -> bool:
    """Compare model tags the way Ollama does (a missing tag means :latest)."""
    def full(tag: str) -> str:
        return tag if ":" in tag.rsplit("/", 1)[-1] else tag + ":latest"
    return full(wanted) == full(name)


class Limiter:
    """Adaptive in-flight limit for one endpoint: as many requests as raise throughput, no more.

    Throughput at a limit is measured over a window of completions of requests that
    started at that limit. The ramp doubles the limit while each step pays; a step
    pays when it raises throughput by AUTO_GAIN and by AUTO_STEP_SHARE of its own
    relative size: when latency grows in step with the limit, the extra requests only
    wait in the server's queue. After the first step that does not pay, one refining
    step goes to where the two measurements put the server's capacity, then the
    limiter holds. While holding it probes one step up, at growing intervals while
    probes do not pay, and down (to where the fall puts the capacity) only when
    throughput falls by a fifth. Overload signals (503, 429, timeouts) halve the limit.

    It also estimates the service time, the latency of a request not queued on the
    server: requests started while a trial limit was above the settled one are
    left out, since they may have waited behind the others.
    """

    def __init__(self, fixed: int | None) -> None:
        self.auto = fixed is None
        self.limit = fixed or 1
        self.best_limit, self.best_rate = self.limit, 0.0
        self.ceiling = AUTO_MAX + 1      # smallest limit known not to pay
        self.phase = "climb"             # climb (doubling), refine, hold, fell, or probe (one step up or down)
        self.probe_every, self.next_probe = AUTO_PROBE_SECONDS, math.inf
        self.settled_rate = 0.0
        self.trials: deque[list[float]] = deque(maxlen=2)   # [from, to] of the latest trials above the settled limit
        self.service: float | None = None
        self.restart(0.0)

    def restart(self, now: float) -> None:
        self.since, self.first, self.count, self.starved = now, None, 0, False
        self.seen, self.seen_first = 0, now

    @property
    def slots(self) -> int:
        """Requests the server is known to serve at once without queueing them."""
        return self.best_limit

    def queued(self, started: float) -> bool:
        """Say whether a request started during a trial, so it may have waited on the server."""
        return any(begin <= started <= end for begin, end in self.trials)

    def on_done(self, started: float, now: float) -> None:
        """Account one completed request (successful or answered)."""
        if not self.queued(started):
            latency = now - started
            self.service = latency if self.service is None else 0.8 * self.service + 0.2 * latency
        if not self.auto:
            return
        if self.limit > self.best_limit and self._losing(now):
            return
        if started < self.since:        # it started at another limit
            return
        if self.first is None:
            self.first = now
            return
        self.count += 1
        if self.count < self.window() or now <= self.first:
            return
        if self.starved:       # not enough work to fill the limit: the window says nothing
            self.restart(now)
            return
        self._decide(self.count / (now - self.first), now)
        self.restart(now)

    def window(self) -> int:
        """Completions per measurement: few while ramping, more while holding, where noise is the enemy."""
        return max(AUTO_WINDOW, self.limit) * (AUTO_STEADY if self.phase in ("hold", "fell", "probe") else 1)

    def _losing(self, now: float) -> bool:
        """Judge a trial at once if it already loses throughput, counting every completion since the step.

        On a server whose throughput falls past its capacity, every request slows down at
        once, and a full window of requests started at the new limit would cost more than
        it could tell.
        """
        self.seen += 1
        if self.seen == 1:
            self.seen_first = now
            return False
        rate = (self.seen - 1) / max(now - self.seen_first, 1e-9)
        if self.seen <= AUTO_WINDOW or self.starved or rate >= self.best_rate * (1 - AUTO_GAIN):
            return False
        self._decide(rate, now)
        self.restart(now)
        return True

    def on_starved(self) -> None:
        """Note that the endpoint had a free slot and nothing to put in it."""
        self.starved = True

    def on_overload(self, now: float) -> None:
        """Halve the limit after a sign the server is past its capacity."""
        if self.auto and self.limit > 1:
            self.ceiling = self.limit
            self.limit = self.best_limit = max(1, self.limit // 2)
            self.best_rate = 0.0
            self._settle(now, AUTO_PROBE_SECONDS)

    def _set(self, limit: int, phase: str, now: float) -> None:
        if self.trials and self.trials[-1][1] == math.inf:
            self.trials[-1][1] = now
        if limit > self.best_limit:
            self.trials.append([now, math.inf])
        self.limit, self.phase = limit, phase

    def _settle(self, now: float, probe_every: float) -> None:
        self._set(self.best_limit, "hold", now)
        self.probe_every = min(AUTO_PROBE_MAX, probe_every)
        self.next_probe = now + self.probe_every
        self.settled_rate = self.best_rate

    def _pays(self, rate: float) -> bool:
        step = self.limit / self.best_limit - 1
        return rate >= self.best_rate * (1 + max(AUTO_GAIN, AUTO_STEP_SHARE * step))

    def _decide(self, rate: float, now: float) -> None:
        if self.limit > self.best_limit:
            self._judge_step(rate, now)
        elif self.limit < self.best_limit:              # a step down: refining, or throughput fell
            if rate >= self.best_rate * (1 - AUTO_GAIN / 2):
                self.best_limit, self.best_rate = self.limit, rate    # as fast with fewer in flight
                if self.phase == "probe" and self.limit > 1:
                    self._set(self.limit - 1, "probe", now)           # after a fall: maybe fewer still
                    return
            self._settle(now, AUTO_PROBE_SECONDS)
        elif self.phase == "climb":                     # the first window, at limit 1
            self.best_rate = rate
            self._set(min(AUTO_MAX, 2 * self.limit), "climb", now)
        else:
            self._hold(rate, now)

    def _judge_step(self, rate: float, now: float) -> None:
        """Keep a higher limit that paid and go on; then refine once to the estimated capacity, and hold."""
        tried, base, below = self.limit, self.best_rate, self.best_limit
        # Throughput grows with the limit up to the number the server serves at once, then stays flat
        # (or falls): from the two measurements, the server serves about below × rate ÷ base at once.
        knee = round(below * rate / base) if base else below
        if self._pays(rate):
            self.best_limit, self.best_rate = tried, rate
            if self.phase == "climb" and knee < AUTO_PROPORTIONAL * tried and below < knee < tried:
                self._set(knee, "refine", now)          # as fast with fewer in flight, if the estimate holds
                return
            step = min({"climb": 2 * tried, "probe": tried + 1}.get(self.phase, tried), self.ceiling - 1, AUTO_MAX)
            if step > tried:
                self._set(step, self.phase, now)
            else:
                self._settle(now, AUTO_PROBE_SECONDS)
            return
        self.ceiling = min(self.ceiling, tried)
        if self.phase == "climb" and below < knee < tried:
            self._set(knee, "refine", now)
        else:
            self._settle(now, 2 * self.probe_every if self.phase == "probe" else AUTO_PROBE_SECONDS)

    def _hold(self, rate: float, now: float) -> None:
        """Track the held limit's throughput; probe one step up now and then, down if it fell."""
        self.best_rate = rate
        if not self.settled_rate:
            self.settled_rate = rate
        if rate < AUTO_DROP * self.settled_rate and self.limit > 1:
            if self.phase == "fell":      # a second window confirms the new level: try where it puts the capacity
                self._set(max(1, min(self.limit - 1, round(self.limit * rate / self.settled_rate))), "probe", now)
            else:
                self.phase = "fell"       # less capacity (another user, thermals)? measure once more first
        elif now >= self.next_probe and self.limit < AUTO_MAX:
            self.ceiling = AUTO_MAX + 1
            self._set(self.limit + 1, "probe", now)
        else:
            self.phase = "hold"


class Endpoint:
    """A server in the fleet: its connection pool, health, limit and counters."""

    def __init__(self, spec: EndpointSpec, config: Config) -> None:
        self.spec = spec
        self.name = spec.name
        self.url = spec.url
        self.model = spec.model or config.model
        self.api = spec.api
        fixed = config.concurrency if spec.concurrency == -1 else spec.concurrency
        self.limiter = Limiter(fixed)
        self.client: httpx.AsyncClient | None = None
        # health: pending (never checked) → ready ⇄ backoff → down; gone is final
        self.state = "pending"
        self.detail = ""
        self.server = ""
        self.digest: str | None = None
        self.checked = False
        self.warm = False
        self.proven = False          # answered a scoring request since it last came up
        self.probe_pause = 1.0
        self.faults = 0
        self.backoff_until = 0.0
        self.down_since: float | None = None
        self.ctx_tokens = config.num_ctx
        self.response_format = "json_schema"
        self.inflight: dict[Item, float] = {}       # item → start time
        self._chat_url: httpx.URL | None = None
        self.trouble = asyncio.Event()              # wakes supervise(): down, gone, or run over
        # counters for the display and the summary
        self.done = self.errors = self.fault_count = 0
        self.latency_sum = 0.0
        self.prompt_tokens = self.output_tokens = 0

    @property
    def chat_url(self) -> httpx.URL:
        """The absolute scoring URL, parsed once (httpx re-parses relative ones per request)."""
        path = "/api/chat" if self.api == "ollama" else "/v1/chat/completions"
        if self._chat_url is None or not self._chat_url.path.endswith(path):
            self._chat_url = httpx.URL(self.url + path)
        return self._chat_url

    @property
    def usable(self) -> bool:
        return self.state in ("ready", "backoff")

    @property
    def alive(self) -> bool:
        """Answering, or loading its model: not a reason to pause the run."""
        return self.state in ("ready", "backoff", "warming")

    def can_take(self, now: float) -> bool:
        """Say whether the endpoint may start one more request now."""
        return self.state == "ready" or (self.state == "backoff" and now >= self.backoff_until)

    def record_success(self, latency: float, now: float) -> None:
        """Note a good answer: the endpoint is healthy."""
        self.faults = 0
        self.proven, self.probe_pause = True, 1.0
        if self.state == "backoff":
            self.state = "ready"
        self.done += 1
        self.latency_sum += latency

    def record_fault(self, exc: EndpointFault, now: float) -> bool:
        """Note an endpoint fault; return True if the endpoint should now go down."""
        self.faults += 1
        self.fault_count += 1
        self.detail = str(exc)
        if exc.connect or self.faults >= DOWN_AFTER:
            return True
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (self.faults - 1)) * random.uniform(0.5, 1.5)
        if exc.retry_after:
            delay = max(delay, min(exc.retry_after, 300.0))
        self.state, self.backoff_until = "backoff", now + delay
        return False

    def headers(self) -> dict[str, str]:
        """Build request headers; the key comes from the environment only."""
        if self.spec.key_env:
            return {"Authorization": f"Bearer {os.environ.get(self.spec.key_env, '')}"}
        return {}

    @property
    def status(self) -> str:
        """Say in words what the endpoint is doing."""
        if self.state == "down" and self.down_since is not None:
            return f"down {format_duration(time.monotonic() - self.down_since)}"
        return {"pending": "not answering", "warming": "loading model", "gone": "taken out",
                "backoff": "backing off"}.get(self.state, self.state)

    def label(self) -> str:
        """Return a short status for the progress line: name, items done, limit or trouble."""
        if self.state == "ready":
            return f"{self.name} {self.done} x{self.limiter.limit}"
        return f"{self.name} {self.done} {self.status}"


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every endpoint's pool: each would load the CA bundle (~1 MiB, ~20 ms of CPU)."""
    return httpx.create_ssl_context(trust_env=False)


def make_client(endpoint: Endpoint, config: Config) -> httpx.AsyncClient:
    """Create the endpoint's keep-alive pool; per-request timeouts are set by callers."""
    return httpx.AsyncClient(
        base_url=endpoint.url,
        headers=endpoint.headers(),
        verify=tls_context(),
        timeout=httpx.Timeout(config.timeout, connect=10.0),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=AUTO_MAX),
        trust_env=False,
    )


def error_message(response: httpx.Response) -> str:
    """Pull the human message out of any of the servers' error envelopes."""
    try:
        body = response.json()
    except ValueError:
        return one_line(response.text)[:300] or f"HTTP {response.status_code}"
    if isinstance(body, dict):
        error = body.get("error", body.get("message"))
        if isinstance(error, dict):
            error = error.get("message") or json.dumps(error)
        if error:
            return one_line(str(error))[:300]
    return one_line(response.text)[:300]


def retry_after(response: httpx.Response) -> float | None:
    """Read Retry-After in seconds, if the server sent a usable one."""
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


async def fetch_json(endpoint: Endpoint, path: str, timeout: float, method: str = "GET",
                     body: Any = None) -> Any:
    """GET (or POST) a JSON document for preflight/probes, classifying failures."""
    try:
        response = await endpoint.client.request(method, path, json=body, timeout=timeout)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise EndpointFault(describe_transport(exc), connect=True) from None
    except httpx.TransportError as exc:
        raise EndpointFault(describe_transport(exc)) from None
    if response.status_code in (401, 403):
        raise EndpointGone(f"refused: HTTP {response.status_code} {error_message(response)}")
    if response.status_code != 200:
        raise EndpointFault(f"{path}: HTTP {response.status_code} {error_message(response)}")
    try:
        return response.json()
    except ValueError:
        return response.text


async def identify(endpoint: Endpoint, timeout: float) -> None:
    """Work out the server kind and version (Ollama positively by `GET /`)."""
    if endpoint.api in ("auto", "ollama"):
        try:
            banner = await fetch_json(endpoint, "/", timeout)
        except EndpointFault as exc:
            if exc.connect or endpoint.api == "ollama":
                raise
            banner = ""
        if isinstance(banner, str) and "Ollama is running" in banner:
            endpoint.api = "ollama"
            version = await fetch_json(endpoint, "/api/version", timeout)
            endpoint.server = f"ollama {version.get('version', '?')}" if isinstance(version, dict) else "ollama"
            return
        if endpoint.api == "ollama":
            endpoint.server = "ollama?"
            return
    models = await fetch_json(endpoint, "/v1/models", timeout)
    if not (isinstance(models, dict) and isinstance(models.get("data"), list)):
        raise EndpointGone("neither Ollama nor an OpenAI-compatible server (no /v1/models list)")
    endpoint.api = "openai"
    owner = next((m.get("owned_by") for m in models["data"] if isinstance(m, dict) and m.get("owned_by")), None)
    endpoint.server = f"openai ({owner})" if owner else "openai"


async def list_models(endpoint: Endpoint, timeout: float) -> dict[str, str | None]:
    """Return the endpoint's models and their digests (Ollama) or None (OpenAI)."""
    if endpoint.api == "ollama":
        tags = await fetch_json(endpoint, "/api/tags", timeout)
        if not isinstance(tags, dict):
            raise EndpointFault("/api/tags: not JSON")
        return {m.get("name") or m.get("model"): m.get("digest") for m in tags.get("models") or []}
    models = await fetch_json(endpoint, "/v1/models", timeout)
    return {m.get("id"): None for m in (models or {}).get("data") or [] if isinstance(m, dict)}


async def pull_model(endpoint: Endpoint, config: Config) -> None:
    """Ask an Ollama endpoint to pull its model, showing progress on stderr."""
    warn(f"{endpoint.name}: pulling {endpoint.model} (--pull)")
    last = ""
    async with endpoint.client.stream("POST", "/api/pull", json={"model": endpoint.model},
                                      timeout=httpx.Timeout(None, connect=10.0)) as response:
        if response.status_code != 200:
            raise EndpointGone(f"pull failed: HTTP {response.status_code}")
        async for line in response.aiter_lines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("error"):
                    raise EndpointGone(f"pull failed: {event['error']}")
                status = event.get("status", "")
                if event.get("total"):
                    status += f" {100 * event.get('completed', 0) // event['total']}%"
                if status != last:
                    warn(f"{endpoint.name}: {status}")
                    last = status


async def check_endpoint(endpoint: Endpoint, config: Config) -> None:
    """Preflight one endpoint: identify it and confirm its model (raises on trouble)."""
    await identify(endpoint, PROBE_TIMEOUT)
    models = await list_models(endpoint, PROBE_TIMEOUT)
    found = next((name for name in models if name and model_matches(endpoint.model, name)), None)
    if found is None and config.pull and endpoint.api == "ollama":
        await pull_model(endpoint, config)
        models = await list_models(endpoint, PROBE_TIMEOUT)
        found = next((name for name in models if name and model_matches(endpoint.model, name)), None)
    if found is None:
        have = ", ".join(sorted(str(n) for n in models)[:8]) or "none"
        hint = " (try --pull)" if endpoint.api == "ollama" else ""
        raise EndpointGone(f"model {endpoint.model} not found{hint}; it has: {have}")
    endpoint.digest = models[found]
    endpoint.checked = True


async def warm_up(endpoint: Endpoint, config: Config) -> None:
    """Load the model before dispatch so a cold laptop's load is not taken for a failure."""
    if endpoint.api != "ollama":
        return
    body = {"model": endpoint.model, "messages": [], "keep_alive": config.keep_alive,
            "options": ollama_options(config, config.temperature, config.seed)}
    await fetch_json(endpoint, "/api/chat", config.timeout, method="POST", body=body)


def describe_transport(exc: Exception) -> str:
    """Name a transport error the way a person would."""
    text = one_line(exc)
    if isinstance(exc, httpx.ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, httpx.ReadTimeout):
        return "read timed out"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"connection dropped ({text})" if text else "connection dropped"
    cause: BaseException | None = exc
    while cause is not None:          # httpx hides the OS error ("All connection attempts failed")
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno).lower()
        cause = cause.__cause__ or cause.__context__
    return text or type(exc).__name__


# ── Scoring ─────────────────────────────────────────────────────────────────────


def ollama_options(config: Config, temperature: float, seed: int) -> dict[str, Any]:
    """Build Ollama options; num_ctx never varies, since changing it reloads the model."""
    return {"temperature": temperature, "seed": seed, "num_ctx": config.num_ctx, "num_predict": NUM_PREDICT}


def retry_settings(config: Config, attempt: int) -> tuple[float, int]:
    """Vary a retry: the same prompt at temperature 0 gives the same bad answer again."""
    if attempt == 0:
        return config.temperature, config.seed
    return max(config.temperature, min(1.0, 0.3 * attempt)), config.seed + 1009 * attempt


def render_prompt(template: str, item: Item, budget: int) -> tuple[str, bool]:
    """Fill the template, cutting the code to `budget` characters if it is longer."""
    code = item.text or ""
    truncated = len(code) > budget
    if truncated:
        code = code[:max(0, budget - len(TRUNCATION_MARK))] + TRUNCATION_MARK
    return template.format_map({**item.fields, "code": code}), truncated


def code_budget(endpoint: Endpoint, template: str, item: Item) -> int:
    """Characters of code that fit the endpoint's context beside the instructions and answer."""
    overhead = len(template) + sum(len(str(v)) for v in item.fields.values())
    tokens = endpoint.ctx_tokens - NUM_PREDICT - CONTEXT_MARGIN - math.ceil(overhead / CHARS_PER_TOKEN)
    budget = max(200, int(tokens * CHARS_PER_TOKEN))
    return min(budget, item.max_chars) if item.max_chars else budget


def parse_answer(content: str) -> tuple[int, str]:
    """Validate the model's JSON: an integer score 1..10 and a reason."""
    text = content.strip()
    try:
        data = json.loads(text)
    except ValueError:
        found = re.search(r"\{.*\}", text, re.S)   # servers that ignore the schema add prose or fences
        try:
            data = json.loads(found.group(0)) if found else None
        except ValueError:
            data = None
    if not isinstance(data, dict):
        raise ItemFault(f"answer is not a JSON object: {one_line(text)[:120]!r}")
    score = data.get("score")
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if type(score) is not int:
        raise ItemFault(f"score is not an integer: {score!r}")
    if not 1 <= score <= 10:
        raise ItemFault(f"score {score} is outside 1..10")
    reason = data.get("reason", "")
    return score, reason if isinstance(reason, str) else json.dumps(reason)


CONTEXT_PATTERNS = (
    re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)"),
    re.compile(r"maximum context length is (\d+) tokens.*?(\d+) tokens", re.S),
)


def context_overflow(status: int, response: httpx.Response, message: str) -> ContextOverflow | None:
    """Recognise 'prompt too long' answers and pull out the token counts."""
    lowered = message.lower()
    if status != 400 or not any(k in lowered for k in (
            "context_length_exceeded", "exceed_context_size", "exceed context window",
            "exceeds the available context", "maximum context length", "input length exceeds the context")):
        return None
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        error = response.json().get("error")
        if isinstance(error, dict) and "n_ctx" in error:
            return ContextOverflow(message, int(error.get("n_prompt_tokens") or 0) or None, int(error["n_ctx"]))
    for pattern in CONTEXT_PATTERNS:
        if found := pattern.search(message):
            a, b = int(found.group(1)), int(found.group(2))
            return ContextOverflow(message, max(a, b), min(a, b))
    return ContextOverflow(message, None, None)


def classify(endpoint: Endpoint, response: httpx.Response) -> Exception:
    """Decide whose fault a non-200 answer is."""
    status = response.status_code
    message = f"HTTP {status}: {error_message(response)}"
    if overflow := context_overflow(status, response, message):
        return overflow
    if endpoint.api == "openai" and endpoint.response_format == "json_schema" and status in (400, 422, 500) \
            and re.search(r"response_format|json_schema|literal_error|schema", message, re.I):
        return FormatRejected(message)
    if status in (401, 403):
        return EndpointGone(f"refused: {message}")
    if status == 404:
        return EndpointGone(f"model {endpoint.model} not found: {message}")
    if status == 400 and ("does not support" in message or "model is required" in message):
        return EndpointGone(message)
    if status in (408, 425, 429, 499) or status >= 500:
        return EndpointFault(message, retry_after=retry_after(response), overload=status in (429, 503))
    return ItemFault(message, kind="rejected")


async def request_answer(endpoint: Endpoint, config: Config, prompt: str,
                         temperature: float, seed: int) -> tuple[str, int | None, int | None]:
    """POST one scoring request; return (content, prompt tokens, output tokens) or raise."""
    messages = [{"role": "user", "content": prompt}]
    if endpoint.api == "ollama":
        url = endpoint.chat_url
        body = {"model": endpoint.model, "messages": messages, "stream": False, "format": SCORE_SCHEMA,
                "options": ollama_options(config, temperature, seed), "keep_alive": config.keep_alive}
    else:
        url = endpoint.chat_url
        if endpoint.response_format == "json_schema":
            fmt = {"type": "json_schema", "json_schema": {"name": "score", "schema": SCORE_SCHEMA}}
        else:
            fmt = {"type": "json_object", "schema": SCORE_SCHEMA}
        body = {"model": endpoint.model, "messages": messages, "temperature": temperature, "seed": seed,
                "max_tokens": NUM_PREDICT, "stream": False, "response_format": fmt}
    try:
        response = await endpoint.client.post(url, json=body)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise EndpointFault(describe_transport(exc), connect=True, item_related=False) from None
    except httpx.TransportError as exc:
        raise EndpointFault(describe_transport(exc)) from None
    if response.status_code != 200:
        raise classify(endpoint, response)
    try:
        data = response.json()
    except ValueError:
        raise EndpointFault(f"HTTP 200 with a body that is not JSON: {one_line(response.text)[:120]!r}") from None
    if not isinstance(data, dict):
        raise EndpointFault("HTTP 200 with an unexpected body")
    if data.get("error") and "message" not in data and "choices" not in data:
        raise EndpointFault(f"HTTP 200 carrying an error: {error_message(response)}")  # LM Studio does this
    if endpoint.api == "ollama":
        content = (data.get("message") or {}).get("content")
        return content or "", data.get("prompt_eval_count"), data.get("eval_count")
    choices = data.get("choices") or [{}]
    content = (choices[0].get("message") or {}).get("content")
    usage = data.get("usage") or {}
    return content or "", usage.get("prompt_tokens"), usage.get("completion_tokens")


async def score_item(endpoint: Endpoint, item: Item, config: Config) -> Answer:
    """Score one item on one endpoint: build the prompt, call, validate."""
    temperature, seed = retry_settings(config, item.attempts)
    prompt, truncated = render_prompt(config.prompt, item, code_budget(endpoint, config.prompt, item))
    started = time.monotonic()
    try:
        async with asyncio.timeout(config.timeout):
            try:
                content, p_tokens, o_tokens = await request_answer(endpoint, config, prompt, temperature, seed)
            except FormatRejected as exc:
                endpoint.response_format = "json_object"       # remembered for the endpoint
                warn(f"{endpoint.name}: server rejected response_format json_schema ({str(exc)[:90]}...); "
                     "using json_object from now on")
                content, p_tokens, o_tokens = await request_answer(endpoint, config, prompt, temperature, seed)
    except TimeoutError:
        raise EndpointFault(f"no answer within {config.timeout:g} s (--timeout)", overload=True) from None
    score, reason = parse_answer(content)
    return Answer(score, reason, p_tokens, o_tokens, time.monotonic() - started, truncated, seed, temperature)


# ── Scheduling ──────────────────────────────────────────────────────────────────


class Signal:
    """Wake every waiter when shared state changes; waiters re-check their condition."""

    def __init__(self, also: Callable[[], None] | None = None) -> None:
        self._waiters: list[asyncio.Future] = []
        self.also = also

    def notify(self) -> None:
        """Wake all current waiters (and run the `also` hook)."""
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        if self.also is not None:
            self.also()

    async def wait(self, timeout: float | None = None) -> None:
        """Sleep until the next notify (or timeout)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            if timeout is None:
                await waiter
            else:
                async with asyncio.timeout(timeout):
                    await waiter
        except TimeoutError:
            pass
        finally:
            if waiter in self._waiters and not waiter.done():
                self._waiters.remove(waiter)


@dataclass(slots=True)
class Tally:
    """Counters for the end summary and the exit code."""

    taken: int = 0
    scored: int = 0
    duplicates: int = 0
    skipped: int = 0                # already finished in the checkpoint
    skipped_permanent: int = 0      # finished earlier with a permanent error
    truncated: int = 0
    hedges: int = 0
    hedges_won: int = 0
    requeued: int = 0
    errors: Counter = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Lane:
    """What the dispatch rules know about one endpoint at one moment."""

    ready: bool                  # in service (not down, loading, backing off or taken out)
    service: float | None        # seconds per request when not queued on the server; None = not measured
    slots: int                   # requests it serves at once
    inflight: int                # requests it has now
    oldest: float | None = None  # start time of the oldest of them


def lane_of(endpoint: Endpoint) -> Lane:
    """Freeze what the dispatch rules need to know about an endpoint."""
    oldest = next(iter(endpoint.inflight.values()), None)
    return Lane(endpoint.state == "ready", endpoint.limiter.service, endpoint.limiter.slots,
                len(endpoint.inflight), oldest)


def overdue(lane: Lane, now: float) -> bool:
    """Say whether the lane's oldest request has run past OVERDUE times its service time (stalled?)."""
    return lane.oldest is not None and lane.service is not None and now - lane.oldest > OVERDUE * lane.service


def finish_in(lane: Lane, nth: int, now: float) -> float:
    """Seconds from now until the lane would finish the nth row given to it now.

    It finishes `slots` rows every `service` seconds, counted from when its oldest
    request started; a new row never takes less than one service time.
    """
    service = lane.service
    head = min(service, now - lane.oldest) if lane.oldest is not None else 0.0
    return max(service, (lane.inflight + nth) * service / lane.slots - head)


def rows_before(lane: Lane, deadline: float, now: float) -> int:
    """Count the new rows the lane would finish sooner than `deadline` seconds from now."""
    if not lane.ready or lane.service is None or lane.service >= deadline or overdue(lane, now):
        return 0
    head = min(lane.service, now - lane.oldest) if lane.oldest is not None else 0.0
    # finish_in(lane, n) < deadline  ⟺  inflight + n < (deadline + head) · slots / service
    return max(0, math.ceil((deadline + head) * lane.slots / lane.service - lane.inflight) - 1)


def takes_queued_row(me: Lane, others: Iterator[Lane], queued: int, now: float) -> bool:
    """End of input: say whether an endpoint with room should take one of the `queued` rows.

    A row goes to the endpoint expected to finish it soonest: this one takes it
    unless the others, counting what each already has in flight and its rate
    (slots ÷ service time), would finish all `queued` rows strictly before this one
    could finish one. Equal endpoints therefore share the last rows, and a much
    slower one leaves them to faster ones. An endpoint not yet measured takes it.
    """
    if me.service is None:
        return True
    mine = finish_in(me, 1, now)
    room = 0
    for lane in others:
        room += rows_before(lane, mine, now)
        if room >= queued:
            return False
    return True


def time_left(lane: Lane, started: float, rank: int, now: float) -> float:
    """Expected seconds until a running copy finishes: the `rank`-th oldest request on its lane."""
    if not lane.ready or lane.service is None or overdue(lane, now):
        return math.inf
    own = lane.service - (now - started)
    queue = rank * lane.service / lane.slots - min(lane.service, now - (lane.oldest or started))
    return max(own, queue, 0.0)


def race_target(mine: float | None, copies: Iterator[tuple[Any, Lane, float, int]], now: float) -> Any:
    """Tail racing: return the running copy an idle endpoint should race, or None.

    With nothing left to queue, an idle endpoint whose service time is under
    HEDGE_RATIO of the time a running copy still needs (its lane's service time
    minus what it already ran, or behind the lane's queue; forever if the lane is
    out of service, unmeasured, or overdue) races the copy expected to need longest.
    `copies` are (key, lane, started, rank among the lane's requests, oldest first).
    """
    if mine is None:
        return None
    best, best_left = None, 0.0
    for key, lane, started, rank in copies:
        left = time_left(lane, started, rank, now)
        if mine < HEDGE_RATIO * left and left > best_left:
            best, best_left = key, left
    return best


class Run:
    """Move items from the reader through the fleet into the checkpoint."""

    def __init__(self, config: Config, info: InputInfo, endpoints: list[Endpoint],
                 checkpoint: Checkpoint, resume: ResumeState, meta: dict[str, Any],
                 reader: Iterator[Item], preloaded: list[Item], tally: Tally, progress: Progress) -> None:
        self.config, self.info, self.endpoints = config, info, endpoints
        self.checkpoint, self.resume, self.meta = checkpoint, resume, meta
        self.reader, self.preloaded, self.tally, self.progress = reader, preloaded, tally, progress
        # Each endpoint's driver sleeps on its own event. A rare change (an endpoint up or down,
        # a row back in the queue, the input or the run over) wakes them all; a new row wakes one
        # idle driver, so the cost of a completion does not grow with the fleet.
        self.wakes = {endpoint: asyncio.Event() for endpoint in endpoints}
        self.idle: dict[Endpoint, None] = {}    # drivers asleep with room and nothing worth taking
        self.changed = Signal(also=self.wake_all)
        self.written = Signal()                  # a row was written (the producer waits for duplicates' leaders)
        self.fresh: deque[Item] = deque()
        self.retry: deque[Item] = deque()
        self.leaders: dict[int, Item] = {}       # digest → item whose answer duplicates await
        self.waiting_followers = 0
        self.unfinished = 0
        self.producer_done = False
        self.space = Signal()                    # the producer waits for room in the queue
        self.done = asyncio.Event()
        self.tg: asyncio.TaskGroup | None = None
        self.all_down_since: float | None = None
        self.last_answer = time.monotonic()      # the last good answer from any endpoint

    @property
    def finished(self) -> bool:
        return self.producer_done and self.unfinished == 0

    def check_done(self) -> None:
        """Wake whoever waits for a write; when the last item is written, tell every task to end."""
        self.written.notify()
        if self.finished:
            self.done.set()
            for endpoint in self.endpoints:
                endpoint.trouble.set()
            self.changed.notify()

    def wake_all(self) -> None:
        """Wake every driver to re-check its endpoint (after a rare change)."""
        self.idle.clear()
        for wake in self.wakes.values():
            wake.set()

    def wake_idle(self, every: bool = False) -> None:
        """Wake one idle driver for a new row (or every idle one, to re-check)."""
        while self.idle:
            endpoint = next(iter(self.idle))
            del self.idle[endpoint]
            self.wakes[endpoint].set()
            if not every:
                return

    def wake_faster(self, than: float, ratio: float = 1.0) -> None:
        """Wake the idle drivers whose endpoints serve faster than `than` × `ratio` (end of input)."""
        for endpoint in [e for e in self.idle if (e.limiter.service or math.inf) < than * ratio]:
            del self.idle[endpoint]
            self.wakes[endpoint].set()

    async def run(self) -> None:
        """Score until the input is exhausted and every taken item is written."""
        async with asyncio.TaskGroup() as tg:
            self.tg = tg
            tg.create_task(self.produce())
            tg.create_task(self.watch())
            for endpoint in self.endpoints:
                tg.create_task(self.supervise(endpoint))
                tg.create_task(self.drive(endpoint))

    # ── the producer

    async def produce(self) -> None:
        """Read items in a thread and hand them to the workers through a bounded queue."""
        limit = self.config.limit
        chunk, self.preloaded = self.preloaded, []
        try:
            while limit is None or self.tally.taken < limit:
                if not chunk:
                    chunk = await asyncio.to_thread(take_chunk, self.reader, READ_CHUNK)
                if not chunk:
                    break
                for item in chunk:
                    if limit is not None and self.tally.taken >= limit:
                        break
                    await self.admit(item)
                chunk = []
        finally:
            self.producer_done = True
            self.changed.notify()           # the end-of-input rules apply from now on
            self.check_done()

    async def admit(self, item: Item) -> None:
        """Take one not-yet-done row: record it, fan it out, or queue it."""
        self.tally.taken += 1
        self.unfinished += 1
        if item.problem:
            kind, message = item.problem
            self.write(item, error_record(item, kind, message, self.config.model))
            return
        if item.digest:
            leader = self.leaders.get(item.digest)
            if leader is not None:
                leader.followers = leader.followers or []
                leader.followers.append(item)
                self.waiting_followers += 1
                while self.waiting_followers > 4 * QUEUE_SIZE and not leader.finished:
                    await self.written.wait()
                return
            offset = self.resume.digests.get(item.digest)
            if offset is not None:
                original = self.checkpoint.read_at(offset)
                self.write(item, duplicate_record(item, original))
                return
            self.leaders[item.digest] = item
        while len(self.fresh) >= QUEUE_SIZE:
            await self.space.wait()
        self.fresh.append(item)
        self.wake_idle()

    # ── the workers

    async def drive(self, endpoint: Endpoint) -> None:
        """Keep the endpoint's in-flight count at its limit while there is work."""
        wake = self.wakes[endpoint]
        while not self.finished and endpoint.state != "gone":
            wake.clear()
            item = self.pick(endpoint)
            if item is not None:
                self.launch(endpoint, item)
                continue
            self.rest(endpoint)
            if (self.fresh or self.retry) and not self.producer_done and endpoint not in self.idle:
                self.wake_idle()            # it was woken for a row it cannot take: pass it on
            await wake.wait()

    def rest(self, endpoint: Endpoint) -> None:
        """Note an endpoint whose driver sleeps with room for work: a new row wakes it."""
        if endpoint.can_take(time.monotonic()) and len(endpoint.inflight) < endpoint.limiter.limit:
            self.idle[endpoint] = None

    def pick(self, endpoint: Endpoint) -> Item | None:
        """Choose the next item for an endpoint, or None if it should wait."""
        now = time.monotonic()
        if not endpoint.can_take(now) or len(endpoint.inflight) >= endpoint.limiter.limit:
            return None
        if self.producer_done and not self.worth_starting(endpoint, now):
            return self.hedge_candidate(endpoint, now) if self.config.hedge else None
        fallback = None
        for i, item in enumerate(self.retry):
            if item.finished or item.tasks:
                continue
            if item.avoid == endpoint.name and self.fresh and any(
                    e is not endpoint and e.usable for e in self.endpoints):
                continue            # a preference, not a ban: with nothing else to do, retry it here
            if item.faults and not endpoint.proven:
                # A suspected row goes to a server that has shown it works, so a fault there
                # says something about the row; a server just back proves itself on others first.
                fallback = fallback if fallback is not None else i
                continue
            del self.retry[i]
            return item
        if fallback is not None and not self.fresh:
            item = self.retry[fallback]
            del self.retry[fallback]
            return item
        if self.fresh:
            item = self.fresh.popleft()
            self.space.notify()
            return item
        if self.producer_done and self.config.hedge:
            return self.hedge_candidate(endpoint, now)
        endpoint.limiter.on_starved()
        return None

    def worth_starting(self, endpoint: Endpoint, now: float) -> bool:
        """At the end of the input, leave the last rows to endpoints that will finish them sooner."""
        queued = len(self.fresh) + len(self.retry)
        if not queued:
            return True         # nothing to take: pick() goes on to racing
        me = lane_of(endpoint)
        others = (lane_of(e) for e in self.endpoints if e is not endpoint and e.state == "ready")
        if takes_queued_row(me, others, queued, now):
            return True
        self.wake_faster(finish_in(me, 1, now))     # those may be asleep with room
        return False

    def hedge_candidate(self, endpoint: Endpoint, now: float) -> Item | None:
        """Race an item stuck on a slower endpoint when this one expects to finish well before it."""
        mine = endpoint.limiter.service
        if mine is None:
            return None

        def copies() -> Iterator[tuple[Item, Lane, float, int]]:
            for other in self.endpoints:
                if other is endpoint or not other.inflight:
                    continue
                lane = lane_of(other)
                for rank, (item, started) in enumerate(other.inflight.items(), 1):
                    if not (item.hedged or item.finished or len(item.tasks) > 1):
                        yield item, lane, started, rank

        best = race_target(mine, copies(), now)
        if best is not None:
            best.hedged, best.racer = True, endpoint
            self.tally.hedges += 1
        return best

    def launch(self, endpoint: Endpoint, item: Item) -> None:
        """Start a worker task on the endpoint with this item."""
        self.idle.pop(endpoint, None)
        endpoint.inflight[item] = time.monotonic()
        item.tasks[endpoint] = self.tg.create_task(self.work(endpoint, item))
        if self.producer_done and self.config.hedge and self.idle:
            self.offer_race(endpoint)

    def release(self, endpoint: Endpoint, item: Item) -> None:
        endpoint.inflight.pop(item, None)
        item.tasks.pop(endpoint, None)

    async def work(self, endpoint: Endpoint, item: Item | None) -> None:
        """Score items on one endpoint back to back while there is room; only bugs escape.

        Going straight on to the next item in the same task (rather than waking
        the driver to start a new one) keeps the per-item cost of the coordinator low.
        """
        task = asyncio.current_task()
        while item is not None:
            started = endpoint.inflight[item] = time.monotonic()
            item.tasks[endpoint] = task
            try:
                outcome: Answer | Exception = await score_item(endpoint, item, self.config)
            except asyncio.CancelledError:
                self.release(endpoint, item)
                self.requeue(item)
                raise
            except (EndpointFault, ItemFault, ContextOverflow, EndpointGone) as exc:
                outcome = exc
            self.release(endpoint, item)
            self.settle(endpoint, item, outcome, started)
            item = None if self.finished else self.pick(endpoint)
            self.carry_on(endpoint, item)

    def carry_on(self, endpoint: Endpoint, item: Item | None) -> None:
        """After a completion: wake the endpoint's driver if it has room left, or let racers look."""
        if item is None:
            self.rest(endpoint)
            return
        self.idle.pop(endpoint, None)
        endpoint.inflight[item] = time.monotonic()
        if len(endpoint.inflight) < endpoint.limiter.limit and (self.fresh or self.retry):
            self.wakes[endpoint].set()      # the limit went up
        if self.producer_done and self.config.hedge and self.idle:
            self.offer_race(endpoint)

    def offer_race(self, endpoint: Endpoint) -> None:
        """A last row started on this endpoint: wake idle endpoints fast enough to race it."""
        self.wake_faster(endpoint.limiter.service or math.inf, HEDGE_RATIO)

    def requeue(self, item: Item, *, front: bool = True) -> None:
        """Put an unfinished item back for any endpoint, unless a copy is still running."""
        if item.finished or item.tasks:
            return
        self.tally.requeued += 1
        (self.retry.appendleft if front else self.retry.append)(item)
        self.changed.notify()

    def settle(self, endpoint: Endpoint, item: Item, outcome: Answer | Exception, started: float) -> None:
        """Decide what an outcome means for the item and for the endpoint."""
        now = time.monotonic()
        if isinstance(outcome, Answer):
            self.last_answer = now
            endpoint.record_success(outcome.latency, now)
            endpoint.limiter.on_done(started, now)
            if not item.finished:
                if item.racer is endpoint and item.tasks:
                    self.tally.hedges_won += 1
                self.write(item, success_record(item, endpoint, outcome))
            return
        if isinstance(outcome, EndpointFault):
            if outcome.item_related and (endpoint.proven or (item.faults and endpoint.done)):
                # Only a server that works for other rows can blame this one.
                item.faults += 1
                item.fault_endpoints = (item.fault_endpoints or set()) | {endpoint.name}
            live = sum(1 for e in self.endpoints if e.state != "gone")
            if outcome.item_related and item.faults > POISON_FAULTS and len(item.fault_endpoints) >= min(2, live):
                # This item keeps breaking servers: charge it, and spare the endpoint's health.
                self.charge(endpoint, item, f"endpoints failed on this item {item.faults} times "
                                            f"(last: {outcome})", "poison")
                return
            if outcome.overload:
                endpoint.limiter.on_overload(now)
            if endpoint.record_fault(outcome, now):
                self.take_down(endpoint, str(outcome))
            else:
                asyncio.get_running_loop().call_at(
                    asyncio.get_running_loop().time() + max(0.0, endpoint.backoff_until - now) + 0.01,
                    self.changed.notify)
            self.requeue(item)
        elif isinstance(outcome, ContextOverflow):
            endpoint.limiter.on_done(started, now)
            if outcome.limit:
                endpoint.ctx_tokens = min(endpoint.ctx_tokens, outcome.limit)
            item.shrinks += 1
            if item.shrinks > MAX_SHRINKS:
                self.charge(endpoint, item, f"prompt still too long after {MAX_SHRINKS} cuts: {outcome}", "too_long")
                return
            current = min(len(item.text or ""), code_budget(endpoint, self.config.prompt, item))
            ratio = 0.5
            if outcome.requested and outcome.limit:
                ratio = max(0.1, min(0.9, (outcome.limit - NUM_PREDICT - CONTEXT_MARGIN) / outcome.requested))
            item.max_chars = int(current * ratio)
            self.requeue(item)
        elif isinstance(outcome, ItemFault):
            endpoint.faults = 0               # it answered: healthy, whatever the answer
            endpoint.limiter.on_done(started, now)
            self.charge(endpoint, item, str(outcome), outcome.kind)
        elif isinstance(outcome, EndpointGone):
            self.retire(endpoint, str(outcome))
            self.requeue(item)

    def charge(self, endpoint: Endpoint, item: Item, message: str, kind: str) -> None:
        """Spend one of the item's attempts; write an error record when none are left."""
        if item.finished:
            return
        item.attempts += 1
        item.last_error = f"{endpoint.name}: {message}"
        endpoint.errors += 1
        if item.tasks:              # a raced copy is still running: let it decide
            return
        if item.attempts >= self.config.max_attempts:
            final = "attempts_exhausted" if kind in ("bad_answer", "rejected") else kind
            self.write(item, error_record(item, final, f"{item.attempts} attempts; last: {item.last_error}",
                                          endpoint.model, endpoint.name))
        else:
            item.avoid = endpoint.name
            self.requeue(item, front=False)

    def take_down(self, endpoint: Endpoint, reason: str) -> None:
        """Mark an endpoint down and hand its in-flight items to the others at once."""
        if endpoint.state in ("down", "gone"):
            return
        endpoint.state, endpoint.detail = "down", reason
        endpoint.down_since = endpoint.down_since or time.monotonic()
        if not endpoint.proven:
            endpoint.probe_pause = min(PROBE_CAP, endpoint.probe_pause * 2)
        endpoint.trouble.set()
        self.progress.note(f"{endpoint.name} is down ({reason}); probing it in the background")
        self.cancel_inflight(endpoint)

    def retire(self, endpoint: Endpoint, reason: str) -> None:
        """Take an endpoint out of the run for good."""
        if endpoint.state == "gone":
            return
        endpoint.state, endpoint.detail = "gone", reason
        endpoint.trouble.set()
        self.progress.note(f"{endpoint.name} taken out: {reason}")
        self.cancel_inflight(endpoint)

    def cancel_inflight(self, endpoint: Endpoint) -> None:
        for item in list(endpoint.inflight):
            task = item.tasks.get(endpoint)
            if task is not None:
                task.cancel()       # its CancelledError handler re-queues the item
        self.changed.notify()

    # ── writing

    def write(self, item: Item, record: dict[str, Any]) -> None:
        """Append the item's record, fan it out to duplicates, and cancel raced copies."""
        item.finished = True
        for task in list(item.tasks.values()):
            task.cancel()
        offset = self.checkpoint.append(record)
        self.count(record)
        self.unfinished -= 1
        if item.digest:
            if self.leaders.get(item.digest) is item:
                del self.leaders[item.digest]
            if record["score"] is not None:
                self.resume.digests.add(item.digest, offset)
        followers, item.followers = item.followers or [], None
        self.waiting_followers -= len(followers)
        for follower in followers:
            follower.finished = True
            self.checkpoint.append(duplicate_record(follower, record))
            self.count(record, duplicate=True)
            self.unfinished -= 1
        self.check_done()

    def count(self, record: dict[str, Any], duplicate: bool = False) -> None:
        if record["score"] is not None:
            self.tally.scored += 1
            self.tally.duplicates += duplicate or record.get("duplicate_of") is not None
            self.tally.truncated += bool(record.get("truncated"))
        else:
            self.tally.errors[record["error_kind"]] += 1
        self.progress.advance()

    # ── health and the clock

    async def supervise(self, endpoint: Endpoint) -> None:
        """Bring an endpoint into service, and back after trouble, probing with growing pauses.

        The pause doubles after each failed probe and after each rejoin that ends
        down again without a single good answer (a server whose runner is broken
        answers probes but fails every request), and resets on a good answer.
        """
        while not self.finished and endpoint.state != "gone":
            if endpoint.usable:
                endpoint.trouble.clear()
                await endpoint.trouble.wait()
                continue
            if endpoint.state == "down":
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(endpoint.probe_pause * random.uniform(0.8, 1.2)):
                        await self.done.wait()
                if self.finished:
                    return
            try:
                await self.bring_up(endpoint)
            except EndpointGone as exc:
                self.retire(endpoint, str(exc))
                return
            except EndpointFault as exc:
                endpoint.state = "down" if endpoint.checked else "pending"
                endpoint.detail = str(exc)
                endpoint.probe_pause = min(PROBE_CAP, endpoint.probe_pause * 2)
                if endpoint.state == "pending":
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(endpoint.probe_pause * random.uniform(0.8, 1.2)):
                            await self.done.wait()
                continue
            if endpoint.down_since is not None:
                self.progress.note(f"{endpoint.name} is back after "
                                   f"{format_duration(time.monotonic() - endpoint.down_since)}")
            endpoint.state, endpoint.faults, endpoint.down_since, endpoint.detail = "ready", 0, None, ""
            endpoint.proven = False
            endpoint.limiter.restart(time.monotonic())
            self.changed.notify()

    async def bring_up(self, endpoint: Endpoint) -> None:
        """Check (first time) or probe (after trouble) an endpoint, then load its model."""
        if not endpoint.checked:
            await check_endpoint(endpoint, self.config)
            self.check_digest(endpoint)
        else:
            await fetch_json(endpoint, "/" if endpoint.api == "ollama" else "/v1/models", PROBE_TIMEOUT)
        if endpoint.api == "ollama" and not endpoint.warm:
            endpoint.state = "warming"
            self.changed.notify()
            await warm_up(endpoint, self.config)
            endpoint.warm = True

    def check_digest(self, endpoint: Endpoint) -> None:
        """Retire a late-joining endpoint whose model build differs from the fleet's."""
        if self.config.allow_mixed_models or not endpoint.digest:
            return
        for other in self.endpoints:
            if other is not endpoint and other.digest and other.model == endpoint.model \
                    and other.digest != endpoint.digest:
                raise EndpointGone(f"{endpoint.model} here is build {endpoint.digest[:12]}, but "
                                   f"{other.name} has {other.digest[:12]} (--allow-mixed-models to accept)")
        self.meta["endpoints"][endpoint.name] = {"url": endpoint.url, "model": endpoint.model,
                                                 "digest": endpoint.digest}
        write_meta(self.config.output, self.meta)

    async def watch(self) -> None:
        """Refresh the display, fsync, and end the run if it cannot go on."""
        while not self.finished:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.done.wait()
            await self.checkpoint.sync_soon()
            if self.producer_done or self.fresh or self.retry:
                self.wake_idle(every=True)     # estimates move with time: stalls, overdue copies to race
            now = time.monotonic()
            live = [e for e in self.endpoints if e.state != "gone"]
            if not live:
                raise StopRun("every endpoint has been taken out: "
                              + "; ".join(f"{e.name}: {e.detail}" for e in self.endpoints))
            if any(e.alive for e in live):
                if self.all_down_since is not None:
                    self.progress.note("an endpoint is back; resuming")
                self.all_down_since = None
            elif self.all_down_since is None:
                self.all_down_since = now
                self.progress.note("every endpoint is down: pausing (nothing is lost); waiting for one to return")
            elif self.config.max_downtime is not None and now - self.last_answer > self.config.max_downtime:
                # Counted from the last good answer, not from the last rejoin: a server that answers
                # probes but fails every request keeps rejoining, and must not reset the clock.
                raise StopRun(f"every endpoint is down and none has answered for "
                              f"{format_duration(now - self.last_answer)} (--max-downtime {self.config.max_downtime:g} s)")
            self.progress.show(self.endpoints, paused=self.all_down_since is not None)


def take_chunk(reader: Iterator[Item], size: int) -> list[Item]:
    """Pull up to `size` items from the reader (runs in a thread)."""
    return list(itertools.islice(reader, size))


def done_filter(resume: ResumeState, tally: Tally) -> Callable[[int], bool]:
    """Tell the reader which id keys the checkpoint already finished, counting them."""
    scored, permanent = resume.scored, resume.permanent
    if not len(scored) and not len(permanent):
        return lambda key: False

    def done(key: int) -> bool:
        if key in scored:
            tally.skipped += 1
            return True
        if key in permanent:
            tally.skipped += 1
            tally.skipped_permanent += 1
            return True
        return False
    return done


def base_record(item: Item) -> dict[str, Any]:
    return {"id": item.id, "score": None, "reason": None, "model": None, "model_digest": None,
            "endpoint": None, "attempts": item.attempts, "latency_s": None, "prompt_tokens": None,
            "output_tokens": None, "truncated": False, "temperature": None, "seed": None,
            "hash": format_digest(item.digest) if item.digest else None, "duplicate_of": None,
            "ts": round(time.time(), 3), "error": None, "error_kind": None}


def success_record(item: Item, endpoint: Endpoint, answer: Answer) -> dict[str, Any]:
    record = base_record(item)
    record.update(score=answer.score, reason=answer.reason, model=endpoint.model,
                  model_digest=endpoint.digest[:12] if endpoint.digest else None, endpoint=endpoint.name,
                  attempts=item.attempts + 1, latency_s=round(answer.latency, 3),
                  prompt_tokens=answer.prompt_tokens, output_tokens=answer.output_tokens,
                  truncated=answer.truncated, temperature=answer.temperature, seed=answer.seed)
    endpoint.prompt_tokens += answer.prompt_tokens or 0
    endpoint.output_tokens += answer.output_tokens or 0
    return record


def error_record(item: Item, kind: str, message: str, model: str | None, endpoint: str | None = None) -> dict[str, Any]:
    record = base_record(item)
    record.update(error=message, error_kind=kind, model=model, endpoint=endpoint)
    return record


def duplicate_record(item: Item, original: dict[str, Any]) -> dict[str, Any]:
    """Copy a finished record's verdict to an item with the same text."""
    record = dict(original)
    record.update(id=item.id, attempts=0, latency_s=0.0, prompt_tokens=0, output_tokens=0,
                  duplicate_of=original.get("duplicate_of") or original["id"],
                  ts=round(time.time(), 3))
    return record


# ── Progress and summary ────────────────────────────────────────────────────────


def warn(message: str) -> None:
    """Print a line on stderr without breaking the progress bar."""
    tqdm.write(message, file=sys.stderr)


def one_line(value: object) -> str:
    """Squash an exception or text to a single line."""
    return " ".join(str(value).split())


def format_duration(seconds: float) -> str:
    """Render seconds as 45s, 12m05s, 3h07m or 2d04h."""
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Lay out rows as aligned columns (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def clip(parts: list[str], budget: int, sep: str = ", ") -> str:
    """Join as many parts as fit in `budget` characters, ending with "+N" when N do not."""
    whole = sep.join(parts)
    if len(whole) <= budget:
        return whole
    text = ""
    for i, part in enumerate(parts):
        rest = f"+{len(parts) - i - 1}"
        if len(text) + (len(sep) if text else 0) + len(part) + len(sep) + len(rest) > budget:
            rest = f"+{len(parts) - i}"
            text = f"{text}{sep}{rest}" if text else rest
            return text if len(text) <= budget else ""
        text = f"{text}{sep}{part}" if text else part
    return text


def attention(endpoints: list[Endpoint], erring: set[str], now: float) -> list[str]:
    """Name the endpoints a user should look at, grouped: out of service, failing, stuck on a request."""
    groups: dict[str, list[str]] = {"down": [], "out": [], "errors": [], "slow": []}
    for e in endpoints:
        if e.state in ("down", "pending"):
            groups["down"].append(e.name)
        elif e.state == "gone":
            groups["out"].append(e.name)
        elif e.state == "backoff" or e.name in erring:
            groups["errors"].append(e.name)
        elif e.inflight and overdue(lane_of(e), now):
            groups["slow"].append(e.name)
    return [f"{kind}: {name}" if i == 0 else name
            for kind, names in groups.items() for i, name in enumerate(names)]


def fleet_status(endpoints: list[Endpoint], erring: set[str], rate: float | None, budget: int) -> str:
    """Summarise the fleet in at most `budget` characters: counts, slots in use, rate, and who needs attention."""
    now = time.monotonic()
    counts = Counter("down" if e.state in ("down", "pending") else "out" if e.state == "gone"
                     else "loading" if e.state == "warming" else "busy" if e.inflight else "idle"
                     for e in endpoints)
    live = [e for e in endpoints if e.state in ("ready", "backoff")]
    parts = [", ".join(f"{counts[k]} {k}" for k in ("busy", "idle", "loading", "down", "out") if counts[k]),
             f"{sum(len(e.inflight) for e in live)}/{sum(e.limiter.limit for e in live)} slots"]
    if rate is not None:
        parts.append(f"{rate:.1f}/s" if rate < 10 else f"{rate:.0f}/s")
    names = attention(endpoints, erring, now)
    for keep in range(len(parts), 0, -1):       # names matter more than the rate, then the slots
        head = " · ".join(parts[:keep])
        listed = clip(names, budget - len(head) - 3, sep=" ")
        if not names or (listed and not listed.startswith("+")):
            break
    return (head + " | " + listed if listed else head)[:budget]


class Progress:
    """The live view: a tqdm bar on a terminal, a status line a minute in a log."""

    def __init__(self, enabled: bool, total: int | None, initial: int) -> None:
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=initial, unit="fn", file=sys.stderr, dynamic_ncols=True,
                        disable=not (enabled and self.tty), smoothing=0.05, mininterval=0.5,
                        bar_format=BAR_FORMAT)
        self.count, self.total, self.initial = initial, total, initial
        self.started = time.monotonic()
        self.logged = self.started
        self.recent: deque[tuple[float, int]] = deque()     # (time, count) over the last RATE_WINDOW
        self.trouble: dict[str, tuple[int, float]] = {}      # endpoint → (errors + faults, when they last grew)

    def note(self, message: str) -> None:
        """Print a timestamped event line."""
        warn(f"[{time.strftime('%H:%M:%S')}] {message}")

    def advance(self) -> None:
        self.count += 1
        self.bar.update(1)

    def set_total(self, total: int) -> None:
        self.total = total
        self.bar.total = total
        self.bar.refresh()

    def width(self) -> int:
        """Characters the status may take on the bar's line, leaving the bar at least MIN_BAR wide."""
        try:
            columns = os.get_terminal_size(sys.stderr.fileno()).columns
        except (OSError, ValueError):
            columns = 80
        meter = self.bar.format_meter(**{**self.bar.format_dict, "postfix": None, "ncols": None,
                                         "bar_format": BAR_FORMAT.replace("{bar}", "")})
        return columns - len(meter) - len(", ") - MIN_BAR - 3      # 3: room for the ETA to grow

    def rate(self, now: float) -> float | None:
        """Items per second over the last RATE_WINDOW seconds."""
        self.recent.append((now, self.count))
        while now - self.recent[0][0] > RATE_WINDOW:
            self.recent.popleft()
        then, count = self.recent[0]
        return (self.count - count) / (now - then) if now > then else None

    def erring(self, endpoints: list[Endpoint], now: float) -> set[str]:
        """Endpoints whose errors or faults grew within the last minute."""
        names = set()
        for e in endpoints:
            seen, since = self.trouble.get(e.name, (0, -math.inf))
            if e.errors + e.fault_count > seen:
                seen, since = e.errors + e.fault_count, now
                self.trouble[e.name] = (seen, since)
            if now - since < 60:
                names.add(e.name)
        return names

    def status(self, endpoints: list[Endpoint], paused: bool, budget: int, now: float) -> str:
        """Say what the fleet is doing: each endpoint for a handful, else counts and who needs attention."""
        paused_text = " | PAUSED: all endpoints down" if paused else ""
        budget -= len(paused_text)
        rate = self.rate(now)
        if len(endpoints) <= HANDFUL:
            text = " | ".join(e.label() for e in endpoints)
            if len(text) <= budget:
                return text + paused_text
        return fleet_status(endpoints, self.erring(endpoints, now), rate, max(0, budget)) + paused_text

    def show(self, endpoints: list[Endpoint], paused: bool) -> None:
        """Refresh the fleet's state on the bar; log a status line a minute in non-interactive runs."""
        now = time.monotonic()
        if self.tty and self.enabled:
            self.bar.set_postfix_str(self.status(endpoints, paused, self.width(), now), refresh=False)
        if self.enabled and not self.tty and now - self.logged >= 60:
            self.logged = now
            done = self.count - self.initial
            rate = done / max(1e-9, now - self.started)
            left = f" ETA {format_duration(((self.total or 0) - self.count) / rate)}" if rate and self.total else ""
            of = f"/{self.total:,}" if self.total else ""
            self.note(f"{self.count:,}{of} done, {rate:.2f}/s{left} | {self.status(endpoints, paused, LOG_STATUS, now)}")

    def close(self) -> None:
        self.bar.close()


def preflight_table(endpoints: list[Endpoint]) -> str:
    """Show each endpoint's server, model build and readiness."""
    rows = [["endpoint", "url", "api", "server", "model", "build", "status"]]
    for e in endpoints:
        if e.state == "gone":
            status = f"left out: {e.detail}"
        elif not e.checked:
            status = f"not answering: {e.detail} (will keep trying)"
        else:
            status = "ok"
        rows.append([e.name, e.url, e.api, e.server or "-", e.model, (e.digest or "-")[:12], status])
    return table(rows)


def summary(run: Run, elapsed: float) -> str:
    """Render the end-of-run report: totals, what is missing and why, and per-endpoint figures."""
    t = run.tally
    lines = [f"Scored {t.scored:,} rows in {format_duration(elapsed)} ({t.scored / max(elapsed, 1e-9):.2f}/s)"
             + (f"; {t.duplicates:,} were duplicates (scored once)" if t.duplicates else "")
             + (f"; {t.truncated:,} truncated to fit the context" if t.truncated else "") + "."]
    if t.skipped:
        lines.append(f"Already finished before this run: {t.skipped:,} rows.")
    if t.requeued:
        lines.append(f"Re-sent {t.requeued:,} requests after endpoint trouble or a bad answer.")
    if t.hedges:
        lines.append(f"Raced {t.hedges} slow tail requests on faster endpoints; {t.hedges_won} won.")
    missing = dict(t.errors)
    if t.skipped_permanent:
        missing["earlier permanent errors"] = t.skipped_permanent
    if missing:
        parts = ", ".join(f"{n:,} {k}" for k, n in sorted(missing.items()))
        retry = sum(n for k, n in t.errors.items() if k not in PERMANENT_ERRORS)
        lines.append(f"Rows without a score: {parts}." + (
            f" --resume retries the {retry:,} that are not permanent." if retry else ""))
    rows = [["endpoint", "state", "items", "share", "items/s", "latency", "gen tok/s", "errors", "faults", "limit"]]
    total = sum(e.done for e in run.endpoints) or 1
    for e in run.endpoints:
        rows.append([e.name, e.status, f"{e.done:,}", f"{100 * e.done / total:.1f}%",
                     f"{e.done / max(elapsed, 1e-9):.2f}",
                     f"{e.latency_sum / e.done:.2f}s" if e.done else "-",
                     f"{e.output_tokens / max(elapsed, 1e-9):.1f}" if e.output_tokens else "-",
                     str(e.errors), str(e.fault_count),
                     f"{e.limiter.limit}{' auto' if e.limiter.auto else ''}"])
    lines.append(table(rows, right={2, 3, 4, 5, 6, 7, 8}))
    return "\n".join(lines)


def exit_code(tally: Tally) -> int:
    """0 if every row taken has a score, else 1."""
    return EXIT_INCOMPLETE if tally.errors or tally.skipped_permanent else EXIT_OK


# ── Export and report ───────────────────────────────────────────────────────────

DISAGREE_POINTS = 0.5       # an endpoint whose mean score differs from the rest's by more than this
DISAGREE_MIN_ITEMS = 50     # on at least this many items on each side gets a warning
EXPORT_COLUMNS = ("score", "reason", "model", "endpoint", "error")


@dataclass
class Stats:
    """What a checkpoint says, gathered in one streaming pass."""

    rows_scored: int = 0
    histogram: Counter = field(default_factory=Counter)
    per_endpoint: dict[str, Counter] = field(default_factory=dict)
    errors: Counter = field(default_factory=Counter)
    duplicates: int = 0
    truncated: int = 0
    timeline: dict[str, array] = field(default_factory=dict)    # endpoint -> completion times (8 bytes each)
    first_ts: float | None = None
    last_ts: float | None = None

    def mean(self, counts: Counter) -> float:
        total = sum(counts.values())
        return sum(score * n for score, n in counts.items()) / total if total else float("nan")


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Yield each readable record of a checkpoint, skipping torn or foreign lines."""
    with open(path, "rb", buffering=1 << 20) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "id" in record:
                yield record


def read_stats(path: Path) -> Stats:
    """Stream a checkpoint: score histograms (overall, per endpoint), errors, and timing."""
    stats = Stats()
    scored_keys = array("q")
    last_error: dict[int, str] = {}
    for record in iter_records(path):
        key = id_key(record["id"])
        score = record.get("score")
        if score is None:
            last_error[key] = record.get("error_kind") or "error"
            continue
        scored_keys.append(key)
        stats.rows_scored += 1
        stats.histogram[score] += 1
        stats.truncated += bool(record.get("truncated"))
        if record.get("duplicate_of") is not None:
            stats.duplicates += 1
            continue                  # a copied verdict says nothing about its endpoint
        endpoint = record.get("endpoint") or "?"
        stats.per_endpoint.setdefault(endpoint, Counter())[score] += 1
        ts = record.get("ts")
        if isinstance(ts, (int, float)):
            stats.timeline.setdefault(endpoint, array("d")).append(ts)
            stats.first_ts = ts if stats.first_ts is None else min(stats.first_ts, ts)
            stats.last_ts = ts if stats.last_ts is None else max(stats.last_ts, ts)
    done = KeySet(scored_keys)
    stats.errors = Counter(kind for key, kind in last_error.items() if key not in done)
    return stats


def disagreements(stats: Stats) -> list[str]:
    """Warn about endpoints whose mean score stands apart from the fleet's typical endpoint.

    The reference is the median of the endpoints' means (each with enough items),
    so one outlier cannot drag the others into looking different; a gap must also
    exceed three standard errors of that endpoint's mean, so small samples stay quiet.
    """
    means, errors, sizes = {}, {}, {}
    for name, counts in stats.per_endpoint.items():
        n = sum(counts.values())
        if n >= DISAGREE_MIN_ITEMS:
            mean = stats.mean(counts)
            variance = sum(k * (score - mean) ** 2 for score, k in counts.items()) / max(1, n - 1)
            means[name], errors[name], sizes[name] = mean, math.sqrt(variance / n), n
    if len(means) < 2:
        return []
    reference = statistics.median(means.values())
    warnings = []
    for name, mean in sorted(means.items()):
        gap = mean - reference
        if abs(gap) > max(DISAGREE_POINTS, 3 * errors[name]):
            warnings.append(f"WARNING: {name} scores {abs(gap):.2f} points {'higher' if gap > 0 else 'lower'} than "
                            f"the fleet's typical endpoint ({mean:.2f} on {sizes[name]:,} items; median of "
                            f"endpoint means {reference:.2f}): a different model build, quantization or settings "
                            f"would bias the dataset")
    return warnings


def throughput_series(stats: Stats, buckets: int = 24) -> tuple[float, dict[str, list[float]]]:
    """Items/s per endpoint in equal time buckets over the checkpoint's span."""
    if stats.first_ts is None or stats.last_ts is None:
        return 0.0, {}
    width = max(1e-9, (stats.last_ts - stats.first_ts) / buckets)
    series = {}
    for name, times in stats.timeline.items():
        counts = [0] * buckets
        for t in times:
            counts[min(buckets - 1, int((t - stats.first_ts) / width))] += 1
        series[name] = [c / width for c in counts]
    return width, series


def bucket_label(seconds: float) -> str:
    """Name a bucket width, keeping sub-minute precision for short runs."""
    return f"{seconds:.1f}s" if seconds < 10 else format_duration(seconds)


def spark(values: list[float]) -> str:
    """Render a series as a one-line bar chart."""
    top = max(values) or 1.0
    return "".join(" ▁▂▃▄▅▆▇█"[min(8, round(8 * v / top))] for v in values)


def text_report(stats: Stats) -> str:
    """The terminal report: histograms, means, errors, throughput over time."""
    names = sorted(stats.per_endpoint)
    rows = [["score", "all", *names]]
    for score in range(1, 11):
        rows.append([str(score), f"{stats.histogram[score]:,}", *(f"{stats.per_endpoint[n][score]:,}" for n in names)])
    rows.append(["mean", f"{stats.mean(stats.histogram):.2f}", *(f"{stats.mean(stats.per_endpoint[n]):.2f}"
                                                               for n in names)])
    lines = [f"Score distribution ({stats.rows_scored:,} rows scored"
             + (f", {stats.duplicates:,} as duplicates" if stats.duplicates else "") + "):",
             table(rows, right=set(range(1, len(rows[0]))))]
    lines += disagreements(stats)
    if stats.errors:
        lines.append("Rows without a score: " + ", ".join(f"{n:,} {k}" for k, n in sorted(stats.errors.items())))
    width, series = throughput_series(stats)
    if series:
        lines.append(f"Throughput over time ({bucket_label(width)} buckets, peak items/s):")
        for name in names:
            if name in series:
                lines.append(f"  {name:<12} {spark(series[name])} {max(series[name]):.2f}")
    return "\n".join(lines)


def svg_bars(values: list[float], labels: list[str], width: int = 360, height: int = 140, color: str = "#3b6ea8") -> str:
    """A small inline SVG bar chart with value labels."""
    top = max(values) or 1
    step = width / max(1, len(values))
    parts = [f'<svg width="{width}" height="{height + 30}" role="img">']
    for i, (v, label) in enumerate(zip(values, labels)):
        h = height * v / top
        x = i * step + 2
        parts.append(f'<rect x="{x:.1f}" y="{height - h + 12:.1f}" width="{step - 4:.1f}" height="{h:.1f}" '
                     f'fill="{color}"><title>{html.escape(label)}: {v:g}</title></rect>')
        parts.append(f'<text x="{x + (step - 4) / 2:.1f}" y="{height - h + 9:.1f}" font-size="9" '
                     f'text-anchor="middle">{v:g}</text>')
        parts.append(f'<text x="{x + (step - 4) / 2:.1f}" y="{height + 25}" font-size="10" '
                     f'text-anchor="middle">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_lines(series: dict[str, list[float]], span: float, width: int = 720, height: int = 180) -> str:
    """An inline SVG line chart of items/s per endpoint over time."""
    colors = ["#3b6ea8", "#d9822b", "#3a9a5b", "#a83b6e", "#7b5ea8", "#777777"]
    top = max((max(v) for v in series.values() if v), default=1) or 1
    parts = [f'<svg width="{width + 60}" height="{height + 20}" role="img">',
             f'<text x="{width + 4}" y="12" font-size="10">{top:.2f}/s</text>',
             f'<text x="{width + 4}" y="{height + 5}" font-size="10">0</text>',
             f'<text x="{width - 4}" y="{height + 18}" font-size="10" text-anchor="end">'
             f'{format_duration(span)}</text>',
             f'<line x1="0" y1="{height + 5}" x2="{width}" y2="{height + 5}" stroke="#ccc"/>']
    for i, (name, values) in enumerate(sorted(series.items())):
        n = max(1, len(values) - 1)
        points = " ".join(f"{width * j / n:.1f},{height - height * v / top + 5:.1f}" for j, v in enumerate(values))
        color = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
        parts.append(f'<text x="{8 + 110 * i}" y="{height + 18}" font-size="11" fill="{color}">'
                     f'{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def html_report(stats: Stats, source: Path) -> str:
    """The same report as one self-contained page (inline SVG, no network)."""
    names = sorted(stats.per_endpoint)
    labels = [str(s) for s in range(1, 11)]
    sections = [f"<h2>All rows ({stats.rows_scored:,} scored, mean {stats.mean(stats.histogram):.2f})</h2>",
                svg_bars([stats.histogram[s] for s in range(1, 11)], labels)]
    sections.append("<h2>Per endpoint</h2><div class=row>")
    for name in names:
        counts = stats.per_endpoint[name]
        sections.append(f"<div><h3>{html.escape(name)}: {sum(counts.values()):,} items, mean "
                        f"{stats.mean(counts):.2f}</h3>{svg_bars([counts[s] for s in range(1, 11)], labels, 300)}</div>")
    sections.append("</div>")
    for warning in disagreements(stats):
        sections.append(f'<p class=warn>{html.escape(warning)}</p>')
    shares = [sum(stats.per_endpoint[n].values()) for n in names]
    sections.append("<h2>Share of work</h2>" + svg_bars(shares, names, 120 * max(1, len(names)), 120, "#3a9a5b"))
    width, series = throughput_series(stats)
    if series:
        sections.append(f"<h2>Throughput over time (items/s, {bucket_label(width)} buckets)</h2>"
                        + svg_lines(series, stats.last_ts - stats.first_ts))
    if stats.errors:
        items = "".join(f"<li>{n:,} {html.escape(k)}</li>" for k, n in sorted(stats.errors.items()))
        sections.append(f"<h2>Rows without a score</h2><ul>{items}</ul>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}.row{display:flex;flex-wrap:wrap;gap:2em}"
             ".warn{color:#a00;font-weight:bold}h3{font-size:1em}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>score.py report: {html.escape(source.name)}"
            f"</title><style>{style}</style></head><body><h1>score.py report: {html.escape(source.name)}</h1>"
            + "".join(sections) + "</body></html>\n")


def answer_table(path: Path) -> pa.Table:
    """Reduce a checkpoint to one row per id: the last scored record, else the last error."""
    columns: dict[str, list] = {name: [] for name in ("key", "rank", *EXPORT_COLUMNS)}
    chunks = []
    position = 0

    def flush() -> None:
        if columns["key"]:
            chunks.append(pa.table({
                "key": pa.array(columns["key"], pa.string()), "rank": pa.array(columns["rank"], pa.int64()),
                "score": pa.array(columns["score"], pa.int64()), "reason": pa.array(columns["reason"], pa.string()),
                "model": pa.array(columns["model"], pa.string()),
                "endpoint": pa.array(columns["endpoint"], pa.string()),
                "error": pa.array(columns["error"], pa.string())}))
            for values in columns.values():
                values.clear()

    for record in iter_records(path):
        key = str(record["id"])
        position += 1
        ok = record.get("score") is not None
        columns["key"].append(key)
        columns["rank"].append(position + (1 << 40 if ok else 0))   # any success outranks any error
        for name in EXPORT_COLUMNS:
            value = record.get(name)
            columns[name].append(value if name == "score" or value is None else str(value))
        if len(columns["key"]) >= 65536:
            flush()
    flush()
    if not chunks:
        return pa.table({"key": pa.array([], pa.string()), **{n: pa.array([], pa.int64() if n == "score" else
                                                                          pa.string()) for n in EXPORT_COLUMNS}})
    answers = pa.concat_tables(chunks)
    best = answers.group_by("key").aggregate([("rank", "max")])
    return answers.join(best, keys=["key", "rank"], right_keys=["key", "rank_max"], join_type="inner") \
        .select(["key", *EXPORT_COLUMNS])


def input_batches(info: InputInfo) -> Iterator[tuple[pa.RecordBatch, pa.Array]]:
    """Stream the input as Arrow batches with each row's id as a string key."""
    if info.kind == "parquet":
        row = 0
        for file in info.files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=16384):
                if info.id_column:
                    keys = pc.cast(batch.column(info.id_column), pa.string())
                else:
                    keys = pa.array([str(i) for i in range(row, row + batch.num_rows)], pa.string())
                row += batch.num_rows
                yield batch, keys
        return
    schema: pa.Schema | None = None
    records, keys = [], []

    def batch() -> pa.RecordBatch:
        nonlocal schema
        table = pa.Table.from_pylist(records, schema=schema)
        schema = schema or table.schema
        return table.to_batches()[0] if table.num_rows else pa.RecordBatch.from_pylist([], schema=schema)

    with open_lines(info.files[0]) as lines:
        for number, raw in enumerate(lines):
            try:
                obj = json.loads(raw)
            except ValueError:
                continue                       # blank or malformed: no row to carry scores
            if not isinstance(obj, dict):
                continue
            records.append(obj)
            keys.append(str(obj.get(info.id_column)) if info.id_column else str(number))
            if len(records) >= 16384:
                yield batch(), pa.array(keys, pa.string())
                records, keys = [], []
    if records:
        yield batch(), pa.array(keys, pa.string())


def export_parquet(config: Config, info: InputInfo, target: Path) -> tuple[int, int]:
    """Write the input with the score columns appended, joined by id; return (rows written, scored)."""
    clash = [c for c in EXPORT_COLUMNS if c in info.columns]
    if clash:
        raise UsageError(f"{config.input} already has column(s) {', '.join(clash)}; export would overwrite them")
    answers = answer_table(config.output)
    temp = target.with_name(target.name + ".tmp")
    writer = None
    written = scored = 0
    try:
        for batch, keys in input_batches(info):
            index = pc.index_in(keys, value_set=answers.column("key"))
            picked = answers.take(index)
            table = pa.Table.from_batches([batch])
            for name in EXPORT_COLUMNS:
                table = table.append_column(name, picked.column(name).combine_chunks())
            if config.min_score is not None:
                table = table.filter(pc.fill_null(pc.greater_equal(table.column("score"), config.min_score), False))
            if writer is None:
                writer = pq.ParquetWriter(temp, table.schema)
            writer.write_table(table.cast(writer.schema) if table.schema != writer.schema else table)
            written += table.num_rows
            scored += table.num_rows - table.column("score").null_count
    except (pa.ArrowException, OSError) as exc:
        if writer is not None:
            writer.close()
        temp.unlink(missing_ok=True)
        raise UsageError(f"cannot export to {target}: {one_line(exc)}") from None
    if writer is None:
        raise UsageError(f"{config.input}: no rows to export")
    writer.close()
    os.replace(temp, target)
    return written, scored


def write_reports(config: Config) -> int:
    """Write --export / --report / --report-html from the checkpoint; print the text report."""
    if not config.output.exists():
        raise UsageError(f"{config.output}: no checkpoint to report on (score something first)")
    stats = read_stats(config.output)
    warn(text_report(stats))
    if config.report_html:
        config.report_html.write_text(html_report(stats, config.output))
        warn(f"Report written to {config.report_html}")
    if config.export:
        info = inspect_input(config.input, config.id_column, config.text_column, config.prompt)
        written, scored = export_parquet(config, info, config.export)
        warn(f"Exported {written:,} rows ({scored:,} scored) to {config.export}"
             + (f" (--min-score {config.min_score})" if config.min_score is not None else ""))
    return EXIT_OK


# ── CLI ─────────────────────────────────────────────────────────────────────────


def parse_duration(text: str) -> float:
    """Parse 90, 90s, 15m, 2h or 1d into seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90, 15m, 2h)")
    return float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]


def positive_int(text: str) -> int:
    try:
        value = int(text)
        if value >= 1:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")


def concurrency_arg(text: str) -> int | None:
    return None if text == "auto" else positive_int(text)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="score.py", description="Score every row of a dataset with a local LLM spread over several machines.",
        epilog="Exit codes: 0 all taken rows scored; 1 some rows have no score; 2 bad usage/input or no usable "
               "endpoint; 130 SIGINT; 143 SIGTERM.")
    add = parser.add_argument
    add("input", type=Path, help=".parquet file, directory of .parquet files, or .jsonl/.ndjson (optionally .gz)")
    add("--endpoints", type=Path, metavar="FILE",
        help=f"endpoints file (default: ./endpoints.txt if present, else {DEFAULT_ENDPOINT})")
    add("-o", "--output", type=Path, metavar="FILE", help="checkpoint JSONL (default: <input>.scores.jsonl)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an existing output, skipping finished rows")
    mode.add_argument("--overwrite", action="store_true", help="discard an existing output and start over")
    add("--force", action="store_true", help="resume even if model, prompt or input changed")
    add("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL}); endpoints may override")
    add("--id-column", metavar="COL", help="id column (default: 'id' if present, else the row number)")
    add("--text-column", metavar="COL", help=f"text column (default: first of {', '.join(TEXT_COLUMNS)})")
    add("--prompt-file", type=Path, metavar="FILE", help="prompt template with {code} and any {column}")
    add("--concurrency", type=concurrency_arg, default=None, metavar="N|auto",
        help="requests in flight per endpoint unless its line says (default auto: adaptive)")
    add("--timeout", type=parse_duration, default=600.0, metavar="SECONDS", help="per-request limit (default 600)")
    add("--max-attempts", type=positive_int, default=3, metavar="N",
        help="bad answers allowed per row before it is recorded as failed (default 3)")
    add("--limit", type=positive_int, metavar="N", help="score at most N not-yet-finished rows, then stop")
    add("--num-ctx", type=positive_int, default=8192, metavar="N", help="context tokens sent to Ollama (default 8192)")
    add("--temperature", type=float, default=0.0, metavar="T", help="sampling temperature (default 0)")
    add("--seed", type=int, default=42, metavar="N", help="sampling seed (default 42)")
    add("--keep-alive", default="30m", metavar="DURATION", help="how long Ollama keeps the model loaded (default 30m)")
    add("--max-downtime", type=parse_duration, metavar="DURATION",
        help="give up (exit 1, nothing lost) when every endpoint is down and none has answered for this long "
             "(default: never)")
    add("--startup-timeout", type=parse_duration, default=300.0, metavar="DURATION",
        help="exit 2 if no endpoint has answered at all within this time (default 300s)")
    add("--allow-mixed-models", action="store_true", help="accept different builds of the model across endpoints")
    add("--pull", action="store_true", help="ask Ollama endpoints that lack the model to pull it")
    add("--check", action="store_true", help="run the preflight, print the first prompt, and exit")
    add("--no-hedge", dest="hedge", action="store_false", help="never race slow tail requests on faster endpoints")
    add("--no-dedup", dest="dedup", action="store_false", help="send duplicate texts separately")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar or status lines")
    add("--export", type=Path, metavar="PATH.parquet", help="write the input with score columns added, at the end")
    add("--min-score", type=int, metavar="N", help="with --export: keep only rows scoring at least N")
    add("--report", action="store_true", help="print the run report for the output and exit (scores nothing)")
    add("--report-html", type=Path, metavar="PATH", help="also write the report as a self-contained HTML page")
    add("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def default_output(path: Path) -> Path:
    """Put <input without suffixes>.scores.jsonl beside the input."""
    name = path.name
    for suffix in (".gz", ".parquet", ".jsonl", ".ndjson", ".json"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return path.with_name((name or "scores") + ".scores.jsonl")


def parse_args(argv: list[str] | None) -> Config:
    """Turn the command line into a Config (exit 2 on anything wrong)."""
    args = build_parser().parse_args(argv)
    endpoints_file = args.endpoints
    if endpoints_file is None and Path("endpoints.txt").is_file():
        endpoints_file = Path("endpoints.txt")
    prompt, source = DEFAULT_PROMPT, "built-in"
    if args.prompt_file:
        try:
            prompt, source = args.prompt_file.read_text(), str(args.prompt_file)
        except OSError as exc:
            raise UsageError(f"{args.prompt_file}: cannot read prompt file ({exc.strerror})") from None
    if args.min_score is not None and not args.export:
        raise UsageError("--min-score only applies with --export")
    return Config(
        input=args.input, output=args.output or default_output(args.input),
        endpoints=parse_endpoints(endpoints_file), resume=args.resume, overwrite=args.overwrite,
        force=args.force, model=args.model, id_column=args.id_column, text_column=args.text_column,
        prompt=prompt, prompt_source=source, concurrency=args.concurrency, timeout=args.timeout,
        max_attempts=args.max_attempts, limit=args.limit, num_ctx=args.num_ctx,
        temperature=args.temperature, seed=args.seed, keep_alive=args.keep_alive,
        max_downtime=args.max_downtime, startup_timeout=args.startup_timeout,
        allow_mixed_models=args.allow_mixed_models, pull=args.pull, check=args.check, hedge=args.hedge,
        dedup=args.dedup, progress=args.progress, export=args.export, min_score=args.min_score,
        report=args.report, report_html=args.report_html)


async def preflight(endpoints: list[Endpoint], config: Config) -> None:
    """Check every endpoint in parallel; wait (bounded) if none answers; refuse mixed builds."""
    async def check(endpoint: Endpoint) -> None:
        try:
            await check_endpoint(endpoint, config)
        except EndpointGone as exc:
            endpoint.state, endpoint.detail = "gone", str(exc)
        except EndpointFault as exc:
            endpoint.detail = str(exc)

    deadline = time.monotonic() + config.startup_timeout
    pending = list(endpoints)
    said = False
    while True:
        await asyncio.gather(*(check(e) for e in pending))
        pending = [e for e in endpoints if e.state == "pending" and not e.checked]
        if len(pending) < len(endpoints):
            break                                   # something answered
        if time.monotonic() >= deadline:
            raise UsageError(f"no endpoint answered within {config.startup_timeout:g} s (--startup-timeout):\n"
                             + "\n".join(f"  {e.name} ({e.url}): {e.detail}" for e in endpoints))
        if not said:
            warn(f"No endpoint answers yet; retrying for up to {format_duration(config.startup_timeout)}:")
            for e in endpoints:
                warn(f"  {e.name} ({e.url}): {e.detail}")
            said = True
        await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
    warn(preflight_table(endpoints))
    builds: dict[str, dict[str, str]] = {}
    for e in endpoints:
        if e.digest:
            builds.setdefault(e.model, {})[e.name] = e.digest
    mixed = {model: names for model, names in builds.items() if len(set(names.values())) > 1}
    if mixed and not config.allow_mixed_models:
        rows = [["model", "endpoint", "build"]] + [[m, n, d[:12]] for m, names in mixed.items() for n, d in names.items()]
        raise UsageError("the same model name is a different build on different endpoints, so their scores "
                         "would not be comparable:\n" + table(rows) +
                         "\nmake the builds match (ollama pull on each), or pass --allow-mixed-models")
    if not any(e.checked for e in endpoints) and not pending:
        raise UsageError("no endpoint can score: " + "; ".join(f"{e.name}: {e.detail}" for e in endpoints))


async def amain(config: Config) -> int:
    """Run the whole job; return the exit code."""
    info = inspect_input(config.input, config.id_column, config.text_column, config.prompt)
    if config.report:
        return write_reports(config)
    meta = check_meta(config, info)
    checkpoint, resume = Checkpoint.open(config.output, resume=config.resume, overwrite=config.overwrite)
    try:
        return await run_job(config, info, meta, checkpoint, resume)
    finally:
        checkpoint.close()


async def run_job(config: Config, info: InputInfo, meta: dict[str, Any], checkpoint: Checkpoint,
                  resume: ResumeState) -> int:
    """Preflight, score, summarise, export."""
    if resume.torn_bytes:
        warn(f"{config.output}: removed a torn final line ({resume.torn_bytes} bytes) left by an interrupted run")
    if resume.bad_lines:
        warn(f"{config.output}: ignored {resume.bad_lines} unreadable line(s)")
    if resume.records:
        warn(f"Resuming {config.output}: {len(resume.scored):,} rows scored, {len(resume.permanent):,} with "
             f"permanent errors, {resume.retried:,} failed rows to retry.")
    tally = Tally()
    reader = read_items(info, config.dedup, done_filter(resume, tally))
    first = await asyncio.to_thread(take_chunk, reader, READ_CHUNK)
    if not first and not config.check:
        warn(f"Nothing to do: every row of {config.input} is already in {config.output}.")
        code = EXIT_INCOMPLETE if tally.skipped_permanent else EXIT_OK
        return finish_outputs(config, code)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    received = install_signal_handlers(loop, main_task)
    endpoints = [Endpoint(spec, config) for spec in config.endpoints]
    progress: Progress | None = None
    run: Run | None = None
    code = EXIT_OK
    started = time.monotonic()
    try:
        async with contextlib.AsyncExitStack() as stack:
            for endpoint in endpoints:
                endpoint.client = await stack.enter_async_context(make_client(endpoint, config))
            await preflight(endpoints, config)
            for endpoint in endpoints:
                if endpoint.checked:
                    endpoint.state = "warming"     # supervise() loads the model, then dispatch starts
                if endpoint.digest:
                    meta["endpoints"][endpoint.name] = {"url": endpoint.url, "model": endpoint.model,
                                                        "digest": endpoint.digest}
            if config.check:
                print_first_prompt(config, first, endpoints)
                return EXIT_OK
            write_meta(config.output, meta)
            progress = Progress(config.progress, info.total, len(resume.scored) + len(resume.permanent))
            run = Run(config, info, endpoints, checkpoint, resume, meta, reader, first, tally, progress)
            if info.total is None and config.progress:
                counter = asyncio.create_task(asyncio.to_thread(count_rows, info))
                counter.add_done_callback(lambda t: t.cancelled() or t.exception() or progress.set_total(t.result()))
            started = time.monotonic()
            await run.run()
            code = exit_code(run.tally)
    except asyncio.CancelledError:
        if not received:
            raise
        main_task.uncancel()
        code = EXIT_SIGNAL[received[0]]
    except ExceptionGroup as group:
        expected, rest = group.split((StopRun, UsageError))
        if rest is not None or expected is None:
            raise
        problem = expected.exceptions[0]
        while isinstance(problem, ExceptionGroup):
            problem = problem.exceptions[0]
        if isinstance(problem, UsageError):
            raise problem from None
        warn(f"score.py: stopped: {problem}")
        code = problem.code
    finally:
        if progress is not None:
            progress.close()
        checkpoint.sync()
        for sig in EXIT_SIGNAL:
            loop.remove_signal_handler(sig)
    if run is not None:
        warn(summary(run, time.monotonic() - started))
    if received:
        warn(f"Interrupted. Every finished row is saved in {config.output}; continue with:\n"
             f"  {resume_command(config)}")
        return code
    return finish_outputs(config, code)


def install_signal_handlers(loop: asyncio.AbstractEventLoop, main_task: asyncio.Task) -> list[int]:
    """SIGINT/SIGTERM cancel the run (which then saves and exits 130/143); a second one exits at once."""
    received: list[int] = []

    def on_signal(sig: int) -> None:
        if received:   # every line written is already complete, so leaving now loses nothing
            os._exit(EXIT_SIGNAL[sig])
        received.append(sig)
        main_task.cancel()

    for sig in EXIT_SIGNAL:
        loop.add_signal_handler(sig, on_signal, sig)
    return received


def print_first_prompt(config: Config, first: list[Item], endpoints: list[Endpoint]) -> None:
    """Show (on stdout) the prompt the first pending row would get, for --check."""
    sample = next((item for item in first if item.text is not None), None)
    if sample is None:
        return
    usable = next((e for e in endpoints if e.checked), endpoints[0])
    prompt, _ = render_prompt(config.prompt, sample, code_budget(usable, config.prompt, sample))
    print(f"--- first prompt (row id {sample.id!r}) ---\n{prompt}")


def resume_command(config: Config) -> str:
    """Spell out the command that continues this run."""
    argv = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
    return " ".join(["python", Path(sys.argv[0]).name or "score.py", *argv, "--resume"])


def finish_outputs(config: Config, code: int) -> int:
    """Print the run report, write the export and HTML asked for; keep the run's exit code."""
    return write_reports(config) or code


def main(argv: list[str] | None = None) -> int:
    """Entry point: parse, run, and map every expected failure to a one-line error."""
    try:
        config = parse_args(argv)
        return asyncio.run(amain(config))
    except UsageError as exc:
        print(f"score.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("score.py: interrupted", file=sys.stderr)
        return EXIT_SIGNAL[signal.SIGINT]


if __name__ == "__main__":
    sys.exit(main())
