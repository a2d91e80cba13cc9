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
    for JSONL the physical line number); integers and strings are kept, anything else is
    recorded as its text, a null id as row:N / line:N. Text comes from --text-column
    (default the first of code, function, content, text). Bad rows (malformed, not valid
    Unicode, a repeated id) get error records; an input cut short is scored as far as it reads.

Output (<input>.scores.jsonl unless -o): one JSON object per finished row, e.g.
    {"id": "fn-17", "score": 7, "reason": "...", "score_expected": 6.62, "model": "qwen2.5-coder:7b", ...,
     "error": null, "error_kind": null}
    Consumers take the last record with a non-null score per id. score_expected is the
    probability-weighted score from the model's token probabilities (null where the server
    gives none); rank by it, since integer scores tie.

Resuming: --resume skips every id that has a score or a permanent error (empty text,
malformed line), repairs a torn final line, and retries every row whose last record is
not a permanent error (attempts_exhausted, poison, too_long).
A sidecar <output>.meta.json pins model, prompt and input; mixing needs --force.

Exit codes:
    0    every row taken has a score, or nothing was left to score and reports/export succeeded
    1    some rows have no score, the input was cut short, or the run stopped early (nothing lost)
    2    bad usage or input, no usable endpoint, a failed calibration under --require-calibration,
         or an existing output without --resume/--overwrite
    129  terminal closed (SIGHUP);  130  interrupted (SIGINT);  143  terminated (SIGTERM)

Layout of this file (in the order data flows; each name is defined above its first use):
    Constants · Small utilities · Types and errors · Input · Records and checkpoint ·
    Endpoints and HTTP · Scoring protocol · Dispatch and outcome policies · Fleet health · Run ·
    Live view and summary · Reports and export · Job running · CLI
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import enum
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
import shlex
import shutil
import signal
import ssl
import stat
import statistics
import string
import sys
import textwrap
import time
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Callable, Container, Iterable, Iterator, Sized
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; run one writer per file there
    fcntl = None


# ── Constants ─────────────────────────────────────────────────────────────────────
# What several sections share (exit codes, defaults, answer schema, prompt, limits); one section's own open it.


__version__ = "0.3.0"

EXIT_OK, EXIT_INCOMPLETE, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}

DEFAULT_ENDPOINT = "http://localhost:11434"
TEXT_COLUMNS = ("code", "function", "content", "text")

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

REASON_MODES = ("full", "short", "none")
SHORT_REASON_CHARS = 60     # --reason short: the schema caps the clause at this many characters
ANSWER_LINES = {
    "full": 'Answer with JSON only: {{"score": <integer 1-10>, "reason": "<one short sentence>"}}',
    "short": 'Answer with JSON only: {{"score": <integer 1-10>, "reason": "<a few words>"}}',
    "none": 'Answer with JSON only: {{"score": <integer 1-10>}}',
}


def score_schema(reason: str) -> dict[str, Any]:
    """Return the answer schema for a --reason mode (full is SCORE_SCHEMA itself)."""
    if reason == "none":
        return {"type": "object", "properties": {"score": SCORE_SCHEMA["properties"]["score"]}, "required": ["score"]}
    if reason == "short":
        properties = {**SCORE_SCHEMA["properties"], "reason": {"type": "string", "maxLength": SHORT_REASON_CHARS}}
        return {**SCORE_SCHEMA, "properties": properties}
    return SCORE_SCHEMA


def prompt_for(prompt: str, reason: str) -> str:
    """Ask the built-in prompt for the answer shape of a --reason mode; a custom prompt is left as written."""
    return prompt.replace(ANSWER_LINES["full"], ANSWER_LINES[reason]) if prompt == DEFAULT_PROMPT else prompt


CALIBRATE_MIN_ROWS = 1000   # jobs this big are calibrated at preflight unless told otherwise

NUM_PREDICT = 256           # answer budget; a score and one sentence fit easily
CONTEXT_MARGIN = 64         # tokens kept free for the chat template's own markup

PROBE_TIMEOUT = 60.0        # single-slot servers answer probes only between generations

AUTO = "auto"               # a concurrency found by measuring (the limiter's AUTO_* rules), as users spell it
HEDGE_RATIO = 0.5           # race an item when we expect to finish in < this share of its remaining time

READ_CHUNK = 256            # rows per hop from the reader thread to the event loop

FLEET_ROWS = 12             # endpoints listed one by one; beyond this, the notable ones plus "others"
REPORT_WIDTH = 100          # columns the end summary and the text report stay within

NAME_WIDTH = 28             # endpoint names longer than this are cut in the middle in tables and charts
WARN_FIRST = 5              # bad rows of one kind named on the console before they are only counted


# ── Small utilities ───────────────────────────────────────────────────────────────
# Text, numbers, tables and a wake-up that every later section uses.


def one_line(value: object) -> str:
    """Squash an exception or text to a single line."""
    return " ".join(str(value).split())


def plural(n: int, word: str, words: str | None = None) -> str:
    """Say "1 row" / "2 rows"."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def figure(value: float, unit: str = "") -> str:
    """Two decimals for small figures, none for large ones, so columns stay narrow."""
    return f"{value:.2f}{unit}" if value < 100 else f"{value:,.0f}{unit}"


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


def format_rate(rate: float) -> str:
    """Render items/s with one decimal while small, none once large."""
    return f"{rate:.1f}/s" if rate < 10 else f"{rate:.0f}/s"


def sketch(value: Any) -> str:
    """Describe an unexpected JSON value briefly: its type and the start of its text."""
    kind = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")
    return kind if value is None else f"{kind} ({one_line(json.dumps(value))[:60]})"


def name_list(names: list[str], shown: int = 3) -> str:
    """Name a few endpoints and count the rest: "a, b, c and 37 more"."""
    head = ", ".join(names[:shown])
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


def short_name(name: str, width: int = NAME_WIDTH) -> str:
    """Cut a long name in the middle, keeping both ends, so `mac-pro-2019-alice` and `-bob` stay apart."""
    if len(name) <= width:
        return name
    tail = (width - 1) // 2
    return name[:width - 1 - tail] + "…" + name[len(name) - tail:]


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


def fit(lines: list[str]) -> str:
    """Join report lines, wrapping prose (never tables) to REPORT_WIDTH columns."""
    return "\n".join(textwrap.fill(line, REPORT_WIDTH, subsequent_indent="  ")
                     if len(line) > REPORT_WIDTH and "\n" not in line else line for line in lines)


def text_table(rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """Lay out rows as aligned columns (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def cut_names(rows: list[list[str]], limit: int = REPORT_WIDTH) -> list[list[str]]:
    """Cut the first column's names as little as lets the table fit `limit` columns (never below 16)."""
    others = sum(max(len(r[i]) for r in rows) + 2 for i in range(1, len(rows[0])))
    width = max(16, min(NAME_WIDTH, limit - others))
    return [[short_name(r[0], width), *r[1:]] for r in rows]


def warn(message: str) -> None:
    """Print a line on stderr without breaking the progress bar."""
    tqdm.write(message, file=sys.stderr)


def arrow_int64(values: array) -> pa.Array:
    """View an array('q') as an Arrow array without copying."""
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def to_array(values: pa.Array) -> array:
    """Copy an Arrow int64 array back into an array('q')."""
    out = array("q")
    out.frombytes(memoryview(values.buffers()[1])[values.offset * 8:(values.offset + len(values)) * 8])
    return out


def sort_together(keys: array, *others: array) -> tuple[array, ...]:
    """Sort keys (stably, in C++) and carry parallel arrays along; a Python sort of a million
    ints would allocate ~40 MB of int objects."""
    if not keys:
        return (keys, *others)
    order = pc.sort_indices(arrow_int64(keys))
    return tuple(to_array(arrow_int64(a).take(order)) for a in (keys, *others))


class Wakeup:
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


def parse_concurrency(text: str) -> int | str:
    """Read a concurrency as users write it, in endpoints.txt or --concurrency: a positive integer or auto."""
    if text == AUTO:
        return AUTO
    with contextlib.suppress(ValueError):
        if (value := int(text)) >= 1:
            return value
    raise ValueError(f"concurrency must be a positive integer or auto, not {text!r}")


# ── Types and errors ──────────────────────────────────────────────────────────────
# The values a run passes around, and whose fault decides what happens next.


class ErrorKind(enum.StrEnum):
    """Why a row has no score: the `error_kind` of its record (README lists them; never rename one)."""

    EMPTY = "empty"
    MALFORMED = "malformed"
    NO_ID = "no_id"
    TEMPLATE = "template"
    BAD_TEXT = "bad_text"
    BAD_ID = "bad_id"
    DUPLICATE_ID = "duplicate_id"
    BAD_ANSWER = "bad_answer"                   # an answer we cannot use; recorded as attempts_exhausted
    REJECTED = "rejected"                       # an HTTP 400 for this row; recorded as attempts_exhausted
    ATTEMPTS_EXHAUSTED = "attempts_exhausted"
    POISON = "poison"
    TOO_LONG = "too_long"


PERMANENT_ERRORS = frozenset({ErrorKind.EMPTY, ErrorKind.MALFORMED, ErrorKind.NO_ID, ErrorKind.TEMPLATE,
                              ErrorKind.BAD_TEXT, ErrorKind.BAD_ID, ErrorKind.DUPLICATE_ID})


class Api(enum.StrEnum):
    """The protocol an endpoint speaks, as endpoints.txt spells it."""

    AUTO = "auto"               # not known until the check: Ollama if `GET /` says so, else OpenAI-compatible
    OLLAMA = "ollama"
    OPENAI = "openai"


class Health(enum.StrEnum):
    """Where an endpoint stands; it moves only through Endpoint's methods, along HEALTH_MOVES."""

    PENDING = "pending"         # has not passed a check yet
    WARMING = "warming"         # checked (or probed after trouble), loading the model
    READY = "ready"
    BACKOFF = "backoff"         # ready, but rests until backoff_until after a fault
    DOWN = "down"               # failed after passing a check; probed in the background
    GONE = "gone"               # taken out of the run: final


# pending → warming → ready ⇄ backoff; ready/backoff → down → warming → ready; an OpenAI-compatible server
# skips warming; a failed check, probe or load leaves it pending (never checked) or down; anything → gone.
# Staying put is normal for a down endpoint failing another probe, another backoff, and a preflight load
# the supervisor waited for (ready again).
HEALTH_MOVES = {
    Health.PENDING: {Health.PENDING, Health.WARMING, Health.READY, Health.DOWN, Health.GONE},
    Health.WARMING: {Health.READY, Health.DOWN, Health.GONE},
    Health.READY: {Health.READY, Health.BACKOFF, Health.DOWN, Health.GONE},
    Health.BACKOFF: {Health.READY, Health.BACKOFF, Health.DOWN, Health.GONE},
    Health.DOWN: {Health.WARMING, Health.READY, Health.DOWN, Health.GONE},
    Health.GONE: set(),
}


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    """One line of endpoints.txt, validated."""

    url: str
    name: str
    api: Api
    model: str | None                   # per-machine override of --model
    concurrency: int | str | None       # a fixed limit, AUTO to measure it, or None: as --concurrency says
    key_env: str | None
    line: int

    def fixed_limit(self, default: int | str) -> int | None:
        """Return the requests to keep in flight, or None to measure it; default is --concurrency's."""
        value = default if self.concurrency is None else self.concurrency
        return None if value == AUTO else value


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
    concurrency: int | str              # a fixed limit, or AUTO to measure it
    timeout: float
    max_attempts: int
    limit: int | None
    num_ctx: int
    temperature: float
    seed: int
    keep_alive: int             # seconds, as Ollama reads a number: -1 forever, 0 unload after each request
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
    command: tuple[str, ...] = ()    # this run as the user typed it, for the resume hint
    reason: str = "full"                     # full, short or none: how much of a reason to ask for
    top: tuple[float, bool] | None = None    # --top: (N, False) rows or (P, True) percent of scored rows
    calibration: bool | None = None          # None: calibrate jobs of CALIBRATE_MIN_ROWS or more
    require_calibration: bool = False
    endpoints_file: Path | None = None       # files the run reads: never an output
    prompt_file: Path | None = None


@dataclass(slots=True, eq=False)
class Item:
    """One input row on its way through the fleet; identity-hashed."""

    id: int | str
    text: str | None
    fields: dict[str, Any]
    text_hash: int = 0            # for duplicate fan-out (0 = none)
    problem: tuple[ErrorKind, str] | None = None   # (error_kind, message): never sent
    attempts: int = 0             # item faults charged against --max-attempts
    faults: int = 0               # endpoint faults seen while carrying this item
    fault_endpoints: set[str] | None = None
    avoid: set[str] | None = None  # endpoints that gave it an unusable answer
    max_chars: int | None = None  # code budget learned from a context overflow
    shrinks: int = 0
    tasks: dict[Any, asyncio.Task] = field(default_factory=dict)
    hedged: bool = False
    racer: Any = None             # the endpoint that sent the raced copy
    finished: bool = False
    followers: list[Item] | None = None

    def answered_badly_by(self, name: str) -> bool:
        """Say whether the named endpoint already gave this row an unusable answer."""
        return self.avoid is not None and name in self.avoid


@dataclass(slots=True)
class Answer:
    """A validated answer from one request."""

    score: int
    reason: str | None
    prompt_tokens: int | None
    output_tokens: int | None
    latency: float
    truncated: bool
    seed: int
    temperature: float
    score_expected: float | None = None      # Σ k·p(k) from the token probabilities, when the server gave them


# Whose fault decides what happens next: an endpoint's trouble re-queues the item
# for free, an item's trouble costs one of its attempts, a fatal answer retires
# the endpoint, and a UsageError ends the run with exit 2 before damage is done.
class UsageError(Exception):
    """Bad command line, input or environment: one line, exit 2."""


class EndpointFault(Exception):
    """The endpoint could not answer (down, busy, crashed, timed out)."""

    def __init__(self, message: str, *, retry_after: float | None = None, connect: bool = False,
                 item_related: bool = True, overload: bool = False, unusable: bool = False) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.unusable = unusable          # it answered, in a form we cannot use: judged like a bad answer
        self.overload = overload          # busy/slow: fewer requests in flight would help
        self.connect = connect            # never the item's fault: no request was made
        self.item_related = item_related  # could this item have caused it?


class ItemFault(Exception):
    """The endpoint answered, but not usefully for this item."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.BAD_ANSWER) -> None:
        super().__init__(message)
        self.kind = kind


class ContextOverflow(Exception):
    """The prompt does not fit the server's context: cut the code and resend."""

    def __init__(self, message: str, requested: int | None, limit: int | None, hopeless: bool = False) -> None:
        super().__init__(message)
        self.requested = requested
        self.limit = limit
        self.hopeless = hopeless        # found before sending: no cut of the code can make it fit


class EndpointGone(Exception):
    """The endpoint refuses us for good (auth, missing model): take it out."""


class LoadFailed(EndpointFault):
    """The server answers but cannot load the model (out of memory, runner crashed)."""


class FormatRejected(Exception):
    """An OpenAI-compatible server rejected json_schema response_format."""


class LogprobsRejected(Exception):
    """A server refused the logprobs/top_logprobs request fields."""


class StopRun(Exception):
    """The run cannot go on (all endpoints retired, --max-downtime hit, disk full)."""

    def __init__(self, message: str, code: int = EXIT_INCOMPLETE) -> None:
        super().__init__(message)
        self.code = code


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
    cancelled: int = 0              # in flight when the run stopped: not re-sent, left for --resume
    errors: Counter = field(default_factory=Counter)
    unreadable: list[str] = field(default_factory=list)    # parts of the input that could not be read


# ── Input ─────────────────────────────────────────────────────────────────────────
# One reader for Parquet and JSONL: rows, their ids and keys, bad rows, finished rows passed over.


READ_BATCH = 1024           # rows the reader decodes at once for scoring

# Prefixes no UTF-8 text starts with (0xff never occurs in it): a big int, or a row's label, can
# never share a key with a string id that reads the same.
BIG_INT_PREFIX, LABEL_PREFIX = b"\xffi", b"\xffl"

LABEL_KINDS = frozenset({ErrorKind.NO_ID, ErrorKind.BAD_ID, ErrorKind.MALFORMED})    # records whose string id is the row's label
TRAILING_BLANKS = re.compile(r"[ \t]+(?=\n)")
NAMED_PROBLEMS = frozenset({ErrorKind.MALFORMED, ErrorKind.BAD_TEXT, ErrorKind.BAD_ID, ErrorKind.DUPLICATE_ID})


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


def hashed_key(data: bytes) -> int:
    """Return a signed 64-bit hash of data."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def id_key(value: int | str) -> int:
    """Return the compact signed 64-bit key that stands for an id in memory."""
    if type(value) is int:
        if -(1 << 63) <= value < (1 << 63):
            return value
        return hashed_key(BIG_INT_PREFIX + str(value).encode())
    return hashed_key(str(value).encode())


def label_key(label: str) -> int:
    """Return the key of a row known only by its label (row:N / line:N), apart from every real id."""
    return hashed_key(LABEL_PREFIX + label.encode())


def row_key(ident: int | str, problem: tuple[ErrorKind, str] | None) -> int:
    """Return the key of a row after checked_id: a row whose id gave way to its label keys by label."""
    return label_key(ident) if problem is not None and type(ident) is str else id_key(ident)


def record_key(ident: int | str, kind: str | None) -> int:
    """Return the key of a checkpoint record: the row's label for a record of a null, bad or
    unreadable id (the reader's row_key), its id otherwise."""
    return label_key(ident) if kind in LABEL_KINDS and type(ident) is str else id_key(ident)


def text_hash(text: str) -> int:
    """Hash code after a cheap normalization: line endings, trailing blanks, outer whitespace."""
    normal = TRAILING_BLANKS.sub("", text.replace("\r\n", "\n").replace("\r", "\n")).strip()
    value = int.from_bytes(hashlib.blake2b(normal.encode(), digest_size=8).digest(), "little", signed=True)
    return value or 1


def format_hash(value: int) -> str:
    """Render a text hash as 16 hex characters, as stored in records."""
    return (value & 0xFFFFFFFFFFFFFFFF).to_bytes(8, "little").hex()


def parse_hash(text: str) -> int:
    """Invert format_hash."""
    return int.from_bytes(bytes.fromhex(text), "little", signed=True)


def template_fields(template: str) -> tuple[str, ...]:
    """Return the {column} names a prompt template uses, raising ValueError if malformed."""
    names = []
    braces = "write literal braces as {{ and }}"
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{exc}; {braces}") from None
    for _, name, _, _ in parts:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"unsupported placeholder {{{name}}}: use {{column}} names only, and {braces}")
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
    """Return the id a row is recorded under: the one id rule of scoring, resume, export and report.

    Integers and strings stay as they are, so 1 and "1" are different rows; any other value (a
    float such as 1.0, bytes, a struct or list, a date) becomes its text, str(value), as every
    checkpoint has always held it; a null id becomes the row's label (row:N / line:N).
    """
    if ident is None:
        return label
    if type(ident) is int or type(ident) is str:
        return ident
    return str(ident)


def writable(value: Any) -> bool:
    """Tell whether a value can go into a UTF-8 record: a lone surrogate (from a "\\ud800" escape, or
    kept from bytes that were not UTF-8) cannot."""
    if type(value) is not str or value.isascii():
        return True
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def checked_id(raw: Any, label: str) -> tuple[int | str, tuple[ErrorKind, str] | None]:
    """Apply the id rule to a raw id; a null or unwritable id gives way to the row's label, with the problem."""
    if raw is None:
        return label, (ErrorKind.NO_ID, "the id column is null")
    ident = row_id(raw, label)
    if not writable(ident):
        return label, (ErrorKind.BAD_ID, "the id is not valid text (bytes that are not UTF-8, or a lone "
                                 "surrogate escape such as \\ud800)")
    return ident, None


def column_values(column: pa.Array) -> list[Any]:
    """Convert an Arrow column to Python values; strings that are not valid UTF-8 keep their bytes
    as lone surrogates (which writable() refuses) instead of failing the whole batch."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        raw = pc.cast(column, pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary())
        return [None if v is None else v.decode("utf-8", "surrogateescape") for v in raw.to_pylist()]


class InputLog:
    """What the reader met that the user must hear of as it happens: bad rows (the first few of each
    kind named, the rest counted in the summary) and parts of the input that could not be read."""

    def __init__(self, source: object = "", say: Callable[[str], None] = lambda message: None,
                 unreadable: list[str] | None = None) -> None:
        self.source, self.say = source, say
        self.named: Counter = Counter()
        self.unreadable = [] if unreadable is None else unreadable

    def bad_row(self, kind: ErrorKind, message: str) -> None:
        """Name a bad row on the console, unless enough of its kind were named already."""
        self.named[kind] += 1
        if self.named[kind] <= WARN_FIRST:
            more = f" (further {kind} rows are only counted)" if self.named[kind] == WARN_FIRST else ""
            self.say(f"{self.source}: {message}{more}")

    def cut_short(self, message: str) -> None:
        """Record (and say) that part of the input could not be read."""
        self.unreadable.append(message)
        self.say(message)


def row_label(kind: str, number: int) -> str:
    """Name a row by its place, as a null id's stand-in: row:N (0-based) in Parquet, line:N (from 1) in JSONL."""
    return f"row:{number}" if kind == "parquet" else f"line:{number + 1}"


def row_place(info: InputInfo, number: int) -> str:
    """Name a row for messages; without an id column, a JSONL line's id (its 0-based number) is named too."""
    if info.kind == "parquet":
        return f"row {number}"
    return f"line {number + 1}" if info.id_column else f"line {number + 1} (row id {number})"


def row_identity(info: InputInfo, number: int, raw: Any) -> tuple[int | str, tuple[ErrorKind, str] | None, int]:
    """Apply the id rule to one row: its id (the row number without an id column), any problem with
    the id, and its key. The one rule of scoring, resume and export."""
    if info.id_column is None:
        return number, None, number
    if type(raw) is int or type(raw) is str and raw.isascii():      # its own id: no label needed
        return raw, None, id_key(raw)
    ident, problem = checked_id(raw, row_label(info.kind, number))
    return ident, problem, row_key(ident, problem)


class Rows:
    """Rows of the input as read: their columns (an Arrow batch, or JSONL objects) and, per row,
    its number, id, id key, any problem with its id, and whether an earlier row had its id."""

    def __init__(self, data: pa.RecordBatch | list[dict]) -> None:
        self.data = data
        self.numbers: list[int] = []
        self.idents: list[int | str] = []
        self.keys = array("q")
        self.problems: list[tuple[ErrorKind, str] | None] = []
        self.repeated: list[bool] = []

    def add(self, number: int, ident: int | str, problem: tuple[ErrorKind, str] | None, key: int,
            seen: SeenKeys | None) -> None:
        """Add one row; only a row whose id is its own can repeat an earlier one."""
        self.numbers.append(number)
        self.idents.append(ident)
        self.keys.append(key)
        self.problems.append(problem)
        self.repeated.append(problem is None and seen is not None and not seen.add(key))

    def values(self, name: str) -> list[Any]:
        """Return one column's values as Python objects."""
        if isinstance(self.data, pa.RecordBatch):
            return column_values(self.data.column(name))
        return [row.get(name) for row in self.data]


def pending_rows(parquet: pq.ParquetFile, group: int, start: int, end: int, info: InputInfo,
                 skip: Callable[[int], bool]) -> array:
    """Return the in-group positions of rows not skipped (8 bytes each), decoding only their ids."""
    todo = array("q")
    if info.id_column is None:
        todo.extend(i - start for i in range(start, end) if not skip(i))
        return todo
    position = 0
    for batch in parquet.iter_batches(batch_size=65536, row_groups=[group], columns=[info.id_column]):
        for raw in column_values(batch.column(0)):
            # row_identity's own fast path, inlined: this loop runs over every id on resume
            key = id_key(raw) if type(raw) is int or type(raw) is str and raw.isascii() \
                else row_identity(info, start + position, raw)[2]
            if not skip(key):
                todo.append(position)
            position += 1
    return todo


def group_rows(parquet: pq.ParquetFile, group: int, start: int, todo: array | None, info: InputInfo,
               columns: list[str] | None, seen: SeenKeys | None, size: int) -> Iterator[Rows]:
    """Yield the rows at positions `todo` (every row if None) of one row group, batch by batch."""
    position = 0
    for batch in parquet.iter_batches(batch_size=size, row_groups=[group], columns=columns):
        picked, numbers = batch, range(start + position, start + position + batch.num_rows)
        if todo is not None:
            lo = bisect.bisect_left(todo, position)
            hi = bisect.bisect_left(todo, position + batch.num_rows)
            picked = batch.take(pa.array([p - position for p in todo[lo:hi]], pa.int64()))
            numbers = [start + p for p in todo[lo:hi]]
        position += batch.num_rows
        if picked.num_rows:
            rows = Rows(picked)
            ids = column_values(picked.column(info.id_column)) if info.id_column else itertools.repeat(None)
            for number, raw in zip(numbers, ids):
                rows.add(number, *row_identity(info, number, raw), seen)
            yield rows


class SeenKeys:
    """A growing set of 64-bit keys: a sorted array plus a small recent set folded in now and then,
    so a dataset's ids cost ~8 bytes each rather than a Python set's ~70."""

    def __init__(self) -> None:
        self._keys = array("q")
        self._recent: set[int] = set()

    def add(self, key: int) -> bool:
        """Add a key; return False if it was already there."""
        if key in self._recent:
            return False
        i = bisect.bisect_left(self._keys, key)
        if i < len(self._keys) and self._keys[i] == key:
            return False
        self._recent.add(key)
        if len(self._recent) >= 65536:
            keys = array("q", self._keys)
            keys.extend(self._recent)
            (self._keys,), self._recent = sort_together(keys), set()
        return True

    def __len__(self) -> int:
        return len(self._keys) + len(self._recent)


def parquet_rows(info: InputInfo, log: InputLog, skip: Callable[[int], bool] | None,
                 columns: list[str] | None, size: int) -> Iterator[Rows]:
    """Stream Parquet row group by row group. With `skip`, each group's ids are read first to find
    the rows still to do, then the other columns of just those rows: resuming near the end of a big
    file decodes ids, not gigabytes of code. A row group that cannot be read is noted and skipped."""
    seen = SeenKeys() if info.id_column else None
    row = 0
    for file in info.files:
        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowException, OSError) as exc:
            raise UsageError(f"{file}: cannot read ({one_line(exc)})") from None
        for group in range(parquet.num_row_groups):
            start = row
            row += parquet.metadata.row_group(group).num_rows
            try:
                todo = None if skip is None else pending_rows(parquet, group, start, row, info, skip)
                if todo is None or todo:
                    yield from group_rows(parquet, group, start, todo, info, columns, seen, size)
            except (pa.ArrowException, OSError) as exc:
                log.cut_short(f"{file}: cannot read rows {start}-{row - 1} ({one_line(exc)}); "
                              "they are not scored")


def jsonl_rows(path: Path, log: InputLog,
               skip: Callable[[int], bool] = lambda number: False) -> Iterator[tuple[int, dict | None, str]]:
    """Yield (0-based line number, object, "") per JSON object line, or (number, None, why) per
    malformed one; blank lines and numbers `skip` says are passed over unparsed. A file that ends
    early (a cut .gz) or cannot be read further stops the rows there, noted in the log."""
    number = -1
    try:
        with open_lines(path) as lines:
            for number, raw in enumerate(lines):
                if skip(number) or not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                    if not isinstance(obj, dict):
                        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
                except ValueError as exc:
                    yield number, None, one_line(exc)
                    continue
                yield number, obj, ""
    except (OSError, EOFError, zlib.error) as exc:
        log.cut_short(f"{path}: cannot read past line {number + 1} ({one_line(exc)}); "
                      "the rows after it are not scored")


def jsonl_batches(info: InputInfo, log: InputLog, skip: Callable[[int], bool] | None, size: int,
                  malformed: bool) -> Iterator[Rows]:
    """Stream JSONL in runs of `size` rows, passing over the rows `skip` names; a malformed
    line is a row with a problem (with `malformed`) or is left out."""
    numbered, skip = info.id_column is None, skip or (lambda key: False)
    seen = None if numbered else SeenKeys()
    rows = Rows([])
    for number, obj, why in jsonl_rows(info.files[0], log, skip if numbered else lambda number: False):
        if obj is None:
            if not malformed:
                continue
            ident = number if numbered else row_label(info.kind, number)
            problem, obj = (ErrorKind.MALFORMED, f"{row_place(info, number)}: not valid JSON ({why})"), {}
            key = row_key(ident, problem)
        else:
            ident, problem, key = row_identity(info, number, obj.get(info.id_column) if info.id_column else None)
        if not numbered and skip(key):
            continue
        rows.data.append(obj)
        rows.add(number, ident, problem, key, seen)
        if len(rows.numbers) >= size:
            yield rows
            rows = Rows([])
    if rows.numbers:
        yield rows


def input_rows(info: InputInfo, log: InputLog, skip: Callable[[int], bool] | None = None,
               columns: list[str] | None = None, size: int = 16384, malformed: bool = False) -> Iterator[Rows]:
    """Stream the input's rows, passing over those `skip` names (none without it), never holding the dataset in
    memory: the one reader of scoring and export. Parquet reads only `columns` (None: all)."""
    if info.kind == "parquet":
        return parquet_rows(info, log, skip, columns, size)
    return jsonl_batches(info, log, skip, size, malformed)


def make_item(ident: int | str, text: Any, fields: dict[str, Any], dedup: bool,
              problem: tuple[ErrorKind, str] | None, where: str, repeated: bool) -> Item:
    """Build an Item from one row, marking rows that must not be sent.

    A repeated id wins over every other problem: its record must never be a permanent error that
    would make resume skip the first row with that id.
    """
    if repeated:
        problem = (ErrorKind.DUPLICATE_ID, f"{where}: id {ident!r} appeared earlier in the input; "
                                   "only its first row is scored")
    if problem is None:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        elif text is not None and not isinstance(text, str):
            text = str(text)
        if text is None or not text.strip():
            problem = (ErrorKind.EMPTY, "the text is null or empty")
        elif not writable(text) or not all(writable(v) for v in fields.values()):
            problem = (ErrorKind.BAD_TEXT, f"{where}: the text is not valid Unicode (bytes that are not UTF-8, or a "
                                   "lone surrogate escape such as \\ud800)")
        elif missing := [k for k, v in fields.items() if v is None]:
            problem = (ErrorKind.TEMPLATE, f"no value for prompt column(s) {', '.join(missing)}")
    elif problem[0] == ErrorKind.BAD_ID:
        problem = (ErrorKind.BAD_ID, f"{where}: {problem[1]}")
    item = Item(id=ident, text=text if problem is None else None, fields=fields, problem=problem)
    if problem is None and dedup:
        item.text_hash = text_hash(text)
    return item


def row_items(batches: Iterator[Rows], info: InputInfo, dedup: bool, log: InputLog) -> Iterator[Item]:
    """Turn rows into Items, naming bad rows in the log as they are met."""
    for rows in batches:
        texts = rows.values(info.text_column)
        fields = {name: rows.values(name) for name in info.fields}
        for j, number in enumerate(rows.numbers):
            item = make_item(rows.idents[j], texts[j], {name: v[j] for name, v in fields.items()}, dedup,
                             rows.problems[j], row_place(info, number), rows.repeated[j])
            if item.problem and item.problem[0] in NAMED_PROBLEMS:
                log.bad_row(*item.problem)
            yield item


class FinishedRows:
    """Tell the reader which id keys the checkpoint already finished, counting the rows passed over:
    the reader runs in a thread, so take_chunk hands the counts to the loop, which alone has the Tally."""

    def __init__(self, scored: Container[int] = frozenset(), permanent: Container[int] = frozenset(),
                 repeated: Sized = frozenset()) -> None:
        self.scored, self.permanent = scored, permanent
        self.repeated = repeated if len(repeated) else None     # ids noted as duplicate_id
        self.met: set[int] = set()
        self.skipped = self.skipped_permanent = 0

    def skips(self, key: int) -> bool:
        """Tell whether the row with this key is finished, counting it if so."""
        if key in self.scored:
            self.skipped += 1
            if self.repeated is not None and key in self.repeated:
                # rows after the first with this id were noted as duplicate_id: they have no score
                self.skipped_permanent += key in self.met
                self.met.add(key)
            return True
        if key in self.permanent:
            self.skipped += 1
            self.skipped_permanent += 1
            return True
        return False


@dataclass(slots=True)
class Reader:
    """The input's rows still to do, as Items, and the filter that passes over the finished ones."""

    items: Iterator[Item]
    finished: FinishedRows


def read_items(info: InputInfo, dedup: bool = True, finished: FinishedRows | None = None,
               log: InputLog | None = None) -> Reader:
    """Stream the rows not `finished` (by id key) as Items; bad rows are named in the log as they are read."""
    log, finished = log or InputLog(), finished or FinishedRows()
    columns = [c for c in dict.fromkeys([info.id_column, info.text_column, *info.fields]) if c]
    rows = input_rows(info, log, finished.skips, columns, READ_BATCH, malformed=True)
    return Reader(row_items(rows, info, dedup, log), finished)


class Chunk(list):
    """Items pulled from the reader in its thread, and how many finished rows it passed over for them."""

    skipped = skipped_permanent = 0

    def count_skips(self, tally: Tally) -> None:
        """Add the passed-over rows to the tally (on the event loop)."""
        tally.skipped += self.skipped
        tally.skipped_permanent += self.skipped_permanent


def take_chunk(reader: Reader, size: int) -> Chunk:
    """Pull up to `size` items from the reader (runs in a thread)."""
    chunk, finished = Chunk(itertools.islice(reader.items, size)), reader.finished
    chunk.skipped, chunk.skipped_permanent = finished.skipped, finished.skipped_permanent
    finished.skipped = finished.skipped_permanent = 0
    return chunk


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


# ── Records and checkpoint ────────────────────────────────────────────────────────
# The record format, its fast scanner, each id's final record, the checkpoint and its sidecar.


FSYNC_EVERY = 2.0           # seconds between fsyncs of the checkpoint while running

# Every record score.py writes has these keys in this order (base_record builds them so).
RECORD_KEYS = ("id", "score", "reason", "score_expected", "model", "model_digest", "endpoint", "attempts",
               "latency_s", "prompt_tokens", "output_tokens", "truncated", "temperature", "seed", "hash",
               "duplicate_of", "ts", "error", "error_kind")

# So our own lines start with id and score and end with error_kind, with hash between: reading
# just those with one regex is ~6x faster than json.loads, which stays the fallback. A test pins
# this pattern to RECORD_KEYS and the builders.
RECORD_FIELDS = re.compile(rb'\{"id": ("(?:[^"\\]|\\.)*"|-?\d+), "score": (null|\d+), '
                           rb'.*"hash": (null|"[0-9a-f]{16}"), .*"error_kind": (null|"[a-z_]+")\}\r?\n?$', re.S)

LATEST_TS = 1e11            # seconds since 1970: year 5138; a bigger ts is not a clock reading
TAIL_MAX = 1 << 20           # a last line longer than this, without its newline, is no record of ours
HOLD_MAX = (10_000, 4 << 20)    # --overwrite keeps at most this many records / bytes back
PIN_BLOCK = 1 << 16         # bytes hashed at each end of an input file


def last_of_runs(ordered: pa.Array) -> pa.Array:
    """Mark the last of each run of equal values in a sorted array (its unique values, without a hash table)."""
    if not len(ordered):
        return pa.array([], pa.bool_())
    return pa.concat_arrays([pc.not_equal(ordered[:-1], ordered[1:]), pa.array([True])])


class KeySet:
    """A frozen set of 64-bit keys in a sorted array: 8 bytes per key."""

    def __init__(self, keys: array) -> None:
        (ordered,) = sort_together(keys)
        last = last_of_runs(arrow_int64(ordered))
        if not pc.all(last).as_py():        # an id scored twice is one key (a copy only then)
            ordered = to_array(arrow_int64(ordered).filter(last))
        self._keys = ordered

    def __contains__(self, key: int) -> bool:
        i = bisect.bisect_left(self._keys, key)
        return i < len(self._keys) and self._keys[i] == key

    def __len__(self) -> int:
        return len(self._keys)


class HashIndex:
    """Map text hashes to the checkpoint offset of the first scored record with that text."""

    def __init__(self, keys: array | None = None, offsets: array | None = None) -> None:
        # sorted by hash, and stably, so the first of equal hashes is the earliest record
        self._keys, self._offsets = sort_together(keys or array("q"), offsets or array("q"))
        self._recent: dict[int, int] = {}

    def get(self, hashed: int) -> int | None:
        """Return the record offset for a text hash, or None."""
        offset = self._recent.get(hashed)
        if offset is not None:
            return offset
        i = bisect.bisect_left(self._keys, hashed)
        if i < len(self._keys) and self._keys[i] == hashed:
            return self._offsets[i]
        return None

    def add(self, hashed: int, offset: int) -> None:
        """Remember the first scored record of a text."""
        if self.get(hashed) is None:
            self._recent[hashed] = offset
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
class ForeignLines:
    """Checkpoint lines that are not records score.py writes: counted, the first few by line number."""

    count: int = 0
    first: list[int] = field(default_factory=list)

    def add(self, number: int) -> None:
        """Count a foreign line, remembering its number if it is among the first few."""
        self.count += 1
        if len(self.first) < WARN_FIRST:
            self.first.append(number)

    def describe(self, path: Path) -> str:
        """Say which lines were passed over, for a one-line warning."""
        where = ", ".join(map(str, self.first)) + (", ..." if self.count > len(self.first) else "")
        return (f"{path}: skipped {self.count:,} line(s) that are not records score.py writes "
                f"(line {where}); they count for nothing")


@dataclass(slots=True)
class ResumeState:
    """What an existing checkpoint says is finished."""

    scored: KeySet
    permanent: KeySet               # ids with a permanent error and no score
    hashes: HashIndex
    records: int = 0
    retried: int = 0                # ids whose last attempt failed: resume retries them
    foreign: ForeignLines = field(default_factory=ForeignLines)
    torn_bytes: int = 0
    repeated: KeySet = field(default_factory=lambda: KeySet(array("q")))   # ids noted as duplicate_id


class FinalRecords:
    """Each id key's final record in a checkpoint, the one rule of resume, report and export: its last
    scored record, else its last error; a duplicate_id note is a later row's, never its id's own.
    Scored keys cost 8 bytes each (16 with positions); errors, which are few, sit in a dict."""

    def __init__(self, positions: bool = False) -> None:
        self._keys = array("q")
        self._positions = array("q") if positions else None
        self._errors: dict[int, Any] = {}

    def add(self, key: int, score: int | None, kind: str | None, value: Any = None) -> bool:
        """Note a record (value: what to keep of it); return False for a duplicate_id note."""
        if score is None:
            if kind == ErrorKind.DUPLICATE_ID:
                return False
            self._errors[key] = value
        else:
            self._keys.append(key)
            if self._positions is not None:
                self._positions.append(value)
        return True

    def finish(self) -> tuple[KeySet, dict[int, Any]]:
        """Return the keys whose final record is scored, and each other key's last error (its value)."""
        scored = KeySet(self._keys)
        return scored, {key: value for key, value in self._errors.items() if key not in scored}

    def positions(self) -> pa.Array:
        """Return the values (positions, given with positions=True) of every key's final record."""
        # a stable sort keeps each key's records in file order, so a run's last is its final one; an
        # Arrow group_by would need ~180 bytes a record
        keys, at = (arrow_int64(a) for a in sort_together(self._keys, self._positions))
        return pa.concat_arrays([at.filter(last_of_runs(keys)), pa.array(self.finish()[1].values(), pa.int64())])


def finite(value: Any) -> bool:
    """Tell whether a JSON value is a finite number (not a bool, NaN or infinity)."""
    return type(value) is int or type(value) is float and math.isfinite(value)


def is_text(value: Any) -> bool:
    """Tell whether a JSON value is a string."""
    return type(value) is str


def is_count(value: Any) -> bool:
    """Tell whether a JSON value is a whole number of things (an int, not a bool, never negative)."""
    return type(value) is int and value >= 0


# What the report and export read of a record besides its id, score, error_kind and hash, and the
# values score.py writes there. A reason or an error is a server's text and may hold a lone surrogate
# (record_line writes it escaped); an endpoint's name and a model's come from us and never do.
DETAILS: dict[str, Callable[[Any], bool]] = {
    "reason": is_text, "error": is_text,
    "endpoint": lambda v: is_text(v) and writable(v), "model": lambda v: is_text(v) and writable(v),
    "output_tokens": is_count, "prompt_tokens": is_count,
    "ts": lambda v: finite(v) and 0 < v < LATEST_TS,
    "score_expected": lambda v: finite(v) and 1 <= v <= 10,
    "latency_s": lambda v: finite(v) and v >= 0,
    "duplicate_of": lambda v: type(v) is int or is_text(v) and writable(v),
    "truncated": lambda v: type(v) is bool,
}


def clean_details(record: dict[str, Any]) -> dict[str, Any]:
    """Null the details that hold what score.py never writes: the line still counts as its id's
    record, exactly as resume's scanner counts it, but a hand-edited value cannot reach a report."""
    for name, fits in DETAILS.items():
        value = record.get(name)
        if value is not None and not fits(value):
            record[name] = None
    return record


def valid_record(record: Any) -> bool:
    """Tell whether a decoded line is a record score.py could have written; no other line counts.

    The id is an int or a writable string, the score an int in 1..10 or null (and then
    error_kind says why), and error_kind and hash are strings or null: the fields the fast
    scanner reads, so resume, report and export count the same lines.
    """
    if not isinstance(record, dict) or "id" not in record or "score" not in record:
        return False
    ident, score, kind, stored_hash = record["id"], record["score"], record.get("error_kind"), record.get("hash")
    return ((type(ident) is int or type(ident) is str and writable(ident))
            and (type(score) is int and 1 <= score <= 10 or score is None and type(kind) is str)
            and (kind is None or type(kind) is str) and (stored_hash is None or type(stored_hash) is str))


def scan_record(line: bytes) -> tuple[int, int | None, str | None, str | None] | None:
    """Return (id key, score, hash, error_kind) of a checkpoint line, or None if it is not our record."""
    found = RECORD_FIELDS.match(line)
    try:
        if found:
            raw_id, raw_score, raw_hash, raw_kind = found.groups()
            ident = json.loads(raw_id) if raw_id[:1] == b'"' else int(raw_id)
            score = None if raw_score == b"null" else int(raw_score)
            if score is None and raw_kind == b"null" or score is not None and not 1 <= score <= 10:
                return None
            kind = None if raw_kind == b"null" else raw_kind[1:-1].decode()
            return record_key(ident, kind), score, None if raw_hash == b"null" else raw_hash[1:-1].decode(), kind
        record = json.loads(line)
        if not valid_record(record):
            return None
        return record_key(record["id"], record.get("error_kind")), record["score"], record.get("hash"), \
            record.get("error_kind")
    except ValueError:
        return None


def base_record(item: Item) -> dict[str, Any]:
    """Start a row's record: every key of RECORD_KEYS, in that order."""
    record = dict.fromkeys(RECORD_KEYS)
    record.update(id=item.id, attempts=item.attempts, truncated=False, ts=round(time.time(), 3),
                  hash=format_hash(item.text_hash) if item.text_hash else None)
    return record


def success_record(item: Item, endpoint: Endpoint, answer: Answer) -> dict[str, Any]:
    """Build the record of a row scored by endpoint."""
    record = base_record(item)
    record.update(score=answer.score, reason=answer.reason, score_expected=answer.score_expected, model=endpoint.model,
                  model_digest=endpoint.digest[:12] if endpoint.digest else None, endpoint=endpoint.name,
                  attempts=item.attempts + 1, latency_s=round(answer.latency, 3),
                  prompt_tokens=answer.prompt_tokens, output_tokens=answer.output_tokens,
                  truncated=answer.truncated, temperature=answer.temperature, seed=answer.seed)
    return record


def error_record(item: Item, kind: str, message: str, model: str | None, endpoint: str | None = None) -> dict[str, Any]:
    """Build the record of a row that ends in an error of this kind."""
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


def lock_output(path: Path) -> tuple[int, bool]:
    """Open the output for appending and take its single-writer lock; return (fd, created)."""
    for _ in range(5):
        created = False
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND)
            except FileNotFoundError:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"{path}: cannot open for writing ({exc.strerror})") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UsageError(f"{path} is being written by another score.py; wait for it or choose another -o") from None
        # A run that stops before writing removes the file it created; if that happened between
        # our open and our lock, the lock guards a file nobody can see: open the path again.
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd, created
        os.close(fd)
    raise UsageError(f"{path}: keeps disappearing while being opened; is another program removing it?")


def record_line(record: dict[str, Any]) -> bytes:
    """Encode a record as one JSONL line, whatever text a server put in it.

    A lone surrogate (valid in JSON, not in UTF-8) is kept as its \\u escape rather than
    crashing the run on this row and every resume after it.
    """
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(record) + "\n").encode()


def meta_path(output: Path) -> Path:
    """Return the sidecar that pins what a checkpoint's records mean."""
    return output.with_name(output.name + ".meta.json")


def write_meta(output: Path, meta: dict[str, Any]) -> None:
    """Write the sidecar atomically (temp file + rename)."""
    target = meta_path(output)
    temp = target.with_name(target.name + ".tmp")
    try:
        try:
            text = (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode()
        except UnicodeEncodeError:      # a server's text with a lone surrogate: keep it escaped
            text = (json.dumps(meta, indent=2) + "\n").encode()
        temp.write_bytes(text)
        os.replace(temp, target)
    except OSError:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)     # never leave a half-written temp file behind
        raise


def probe_sidecar(output: Path) -> None:
    """Fail now, not at the first record, if the sidecar cannot be written beside the output."""
    target = meta_path(output)
    temp = target.with_name(target.name + ".tmp")
    if target.is_dir():
        raise UsageError(f"{target} is a directory, so the output's sidecar cannot be written there")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        if temp.is_file() and not temp.is_symlink():
            return                  # left by an interrupted run; write_meta replaces it
        raise UsageError(f"{temp} is in the way of the output's sidecar; remove it") from None
    except OSError as exc:
        raise UsageError(f"cannot write the sidecar {temp} beside the output ({exc.strerror})") from None
    try:
        os.write(fd, b" " * 4096)   # a sidecar's worth, so a full disk stops the run here
        os.fsync(fd)
    except OSError as exc:
        raise UsageError(f"cannot write the sidecar {temp} beside the output ({exc.strerror})") from None
    finally:
        os.close(fd)
        temp.unlink(missing_ok=True)


class Checkpoint:
    """Append-only JSONL of finished items: the only source of truth for resume.

    Nothing is changed on disk until the first record is about to be written: only then is
    an --overwrite'n file emptied, a torn tail cut and the sidecar written, so a run that
    stops before that (no endpoint, a typo, Ctrl-C in preflight) leaves every file as it was.
    """

    def __init__(self, path: Path, fd: int, created: bool = False) -> None:
        self.path = path
        self._fd = fd
        self.size = os.lseek(fd, 0, os.SEEK_END) if fd >= 0 else 0
        self._synced_at = time.monotonic()
        self._dirty = False
        self._created = created          # we made the file: remove it if nothing gets written
        self._cut_to: int | None = None  # length to cut the file to before the first write
        self._started = False
        self._newline = False            # the last line lacks its newline: add it before the first record
        self._held: list[bytes] | None = None   # --overwrite: records kept back until a row is scored
        self._held_bytes = 0
        self.meta: dict[str, Any] | None = None

    @property
    def untouched(self) -> bool:
        """True while the file still holds exactly what it held before this run."""
        return not self._started

    @classmethod
    def open(cls, path: Path, *, resume: bool, overwrite: bool,
             check: bool = False) -> tuple[Checkpoint, ResumeState]:
        """Lock the output (creating it if needed) and scan it on resume; change nothing yet.

        With check=True (--check) the file is only read: never created, cut or locked.
        """
        if path.exists() and not path.is_file():
            raise UsageError(f"{path}: the output must be a regular file")
        exists = path.exists() and path.stat().st_size > 0
        if exists and not (resume or overwrite or check):
            raise UsageError(f"{path} already holds results ({path.stat().st_size:,} bytes); "
                             "continue it with --resume or start over with --overwrite")
        if path.parent and not path.parent.is_dir():
            raise UsageError(f"{path.parent}: output directory does not exist")
        if check:
            checkpoint = cls(path, os.open(path, os.O_RDONLY) if exists and resume else -1)
        else:
            checkpoint = cls(path, *lock_output(path))
            try:
                probe_sidecar(path)
            except UsageError:
                checkpoint.close()
                raise
        state = ResumeState(KeySet(array("q")), KeySet(array("q")), HashIndex())
        if overwrite and not resume and checkpoint.size:
            checkpoint._cut_to = 0
            checkpoint._held = []
        elif resume and checkpoint.size:
            try:
                state = checkpoint._resume_state()
            except UsageError:
                checkpoint.close()
                raise
        return checkpoint, state

    def _resume_state(self) -> ResumeState:
        """Scan the file to resume; plan to cut only a torn record, and refuse a file that is no checkpoint."""
        end = self._complete_end()
        tail = os.pread(self._fd, min(self.size - end, TAIL_MAX), end) if end < self.size else b""
        torn = tail.startswith(b'{"id": ') and (len(tail) == TAIL_MAX or scan_record(tail) is None)
        if torn:
            self._cut_to = end
        else:
            self._newline = bool(tail)      # a complete last line (ours or not) only lacks its newline
            end = self.size
        state = self._scan(end, self.size - end)
        if not state.records and not meta_path(self.path).exists():
            raise UsageError(f"{self.path} is not a score.py checkpoint (no record in it and no sidecar), so "
                             "--resume would write into it; choose another -o")
        return state

    def _complete_end(self) -> int:
        """Return where the last complete line ends (a crash mid-write can leave a torn one)."""
        size = self.size
        if os.pread(self._fd, 1, size - 1) == b"\n":
            return size
        end = size
        while end > 0:
            start = max(0, end - 65536)
            block = os.pread(self._fd, end - start, start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                return start + cut + 1
            end = start
        return 0

    def _start(self) -> None:
        """Before the first record: empty an overwritten file or cut a torn tail, then pin the sidecar."""
        self._started = True
        try:
            if self._cut_to is not None:
                os.ftruncate(self._fd, self._cut_to)
                os.fsync(self._fd)
                self.size = self._cut_to
            if self._newline:
                self.size += os.write(self._fd, b"\n")
            if self.meta is not None:
                write_meta(self.path, self.meta)
        except OSError as exc:
            raise StopRun(f"cannot write {self.path} or its sidecar: {exc.strerror}; "
                          "fix that and rerun with --resume") from None

    def save_meta(self, meta: dict[str, Any]) -> None:
        """Keep the sidecar in step with the run; before the first record, only remember it."""
        self.meta = meta
        if self._started:
            try:
                write_meta(self.path, meta)
            except OSError as exc:
                warn(f"{meta_path(self.path)}: cannot update ({exc.strerror}); records are unaffected")

    def _scan(self, end: int, torn: int) -> ResumeState:
        """Read every complete line (up to end) once to learn what is finished (FinalRecords' rule)."""
        finals = FinalRecords()
        add = finals.add
        hash_keys, hash_offsets = array("q"), array("q")
        foreign, repeated = ForeignLines(), array("q")
        records = 0
        offset = 0
        with open(self.path, "rb", buffering=1 << 20) as f:
            for number, line in enumerate(f, 1):
                if offset >= end:
                    break
                here, offset = offset, offset + len(line)
                fields = scan_record(line)
                if fields is None:
                    foreign.add(number)
                    continue
                key, score, stored_hash, kind = fields
                records += 1
                if not add(key, score, kind, kind):
                    repeated.append(key)
                elif score is not None and stored_hash:
                    with contextlib.suppress(ValueError):
                        hash_keys.append(parse_hash(stored_hash))
                        hash_offsets.append(here)
        scored, errors = finals.finish()
        permanent = array("q", (key for key, kind in errors.items() if kind in PERMANENT_ERRORS))
        hashes = HashIndex(hash_keys, hash_offsets)
        return ResumeState(scored, KeySet(permanent), hashes, records, len(errors) - len(permanent), foreign,
                           torn, KeySet(repeated))

    def append(self, record: dict[str, Any]) -> int:
        """Write one record as one complete line; return its offset."""
        data = record_line(record)
        if self._held is not None:
            if record["score"] is None and len(self._held) < HOLD_MAX[0] and self._held_bytes < HOLD_MAX[1]:
                self._held.append(data)
                self._held_bytes += len(data)
                return self._held_bytes - len(data)     # where it will land once the file is emptied
            self.write_held()
        if not self._started:
            self._start()
        return self._write(data)

    def write_held(self) -> None:
        """Write the records held back under --overwrite: the run has scored a row or ended normally."""
        held, self._held = self._held, None
        if held:
            self._start()
            self._write(b"".join(held))

    def _write(self, data: bytes) -> int:
        """Append bytes at the end of the file; return where they start."""
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
            if self._created and not self._started:
                # still locked, so a run waiting to open this path sees it gone and makes its own
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            with contextlib.suppress(OSError):
                self.sync()
            os.close(self._fd)
            self._fd = -1


def block_hash(f, start: int, length: int) -> str:
    """Hash `length` bytes of an open file from `start`."""
    f.seek(start)
    return hashlib.blake2b(f.read(length), digest_size=16).hexdigest()


def pin_file(path: Path, name: str, kind: str) -> dict[str, Any]:
    """Pin an input file cheaply: size, Parquet row count, hashes of its first and last 64 KiB."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            pin = {"file": name, "size": size, "head": block_hash(f, 0, min(size, PIN_BLOCK)),
                   "tail": block_hash(f, max(0, size - PIN_BLOCK), min(size, PIN_BLOCK))}
        if kind == "parquet":
            pin["rows"] = pq.read_metadata(path).num_rows
    except (OSError, pa.ArrowException) as exc:
        raise UsageError(f"{path}: cannot read ({one_line(exc)})") from None
    return pin


def pin_input(source: Path, info: InputInfo) -> list[dict[str, Any]]:
    """Pin every input file, named relative to the input directory (so the file list is pinned too)."""
    return [pin_file(f, str(f.relative_to(source)) if source.is_dir() else f.name, info.kind) for f in info.files]


def appended_to(path: Path, old: dict[str, Any]) -> bool:
    """Tell whether a JSONL file is the pinned one with lines added at its end (line ids stay put)."""
    size, old_size = path.stat().st_size, old["size"]
    if size <= old_size:
        return False
    with open(path, "rb") as f:
        return (block_hash(f, 0, min(old_size, PIN_BLOCK)) == old["head"]
                and block_hash(f, max(0, old_size - PIN_BLOCK), min(old_size, PIN_BLOCK)) == old["tail"])


def input_changes(info: InputInfo, old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[str]:
    """Say how the input differs from its pins, ignoring what keeps row numbers (appends, files added last)."""
    old_by = {pin["file"]: pin for pin in old}
    new_by = {pin["file"]: pin for pin in new}
    changes = [f"{name}: removed" for name in old_by if name not in new_by]
    kept = [i for i, pin in enumerate(new) if pin["file"] in old_by]
    for i, pin in enumerate(new):
        name, before = pin["file"], old_by.get(pin["file"])
        if before is None:
            if kept and i < kept[-1]:
                follows = new[next(k for k in kept if k > i)]["file"]
                changes.append(f"{name}: new, and read before {follows}, so every later row moves")
        elif before != pin:
            if info.kind == "jsonl" and appended_to(info.files[i], before):
                continue
            if before.get("rows") != pin.get("rows"):
                changes.append(f"{name}: {before['rows']:,} rows, now {pin['rows']:,}")
            elif before["size"] != pin["size"]:
                changes.append(f"{name}: {before['size']:,} bytes, now {pin['size']:,}")
            else:
                changes.append(f"{name}: same size, different content")
    return changes


def sha256_of(text: str) -> str:
    """Return the hex SHA-256 of a text (the sidecar pins the prompt and the answer schema by it)."""
    return hashlib.sha256(text.encode()).hexdigest()


def schema_sha256(reason: str) -> str:
    """Hash the answer schema of a --reason mode, as the sidecar pins it."""
    return sha256_of(json.dumps(score_schema(reason), sort_keys=True))


def fingerprint(config: Config, info: InputInfo) -> dict[str, Any]:
    """Describe what makes two runs' scores comparable, and pin the input's content."""
    return {
        "model": config.model,
        "reason": config.reason,
        "prompt_source": config.prompt_source,
        "prompt_sha256": sha256_of(config.prompt),
        "schema_sha256": schema_sha256(config.reason),
        "input": str(config.input.resolve()),
        "id_column": info.id_column,
        "text_column": info.text_column,
        "input_files": pin_input(config.input, info),
    }


def written_reason(old: dict[str, Any]) -> str | None:
    """Say which --reason mode wrote a sidecar (older sidecars tell only by the schema's hash)."""
    if old.get("reason") in REASON_MODES:
        return old["reason"]
    return next((mode for mode in REASON_MODES if schema_sha256(mode) == old.get("schema_sha256")), None)


def prompt_difference(config: Config, old: dict[str, Any], reason: str) -> str | None:
    """Say how the prompt differs from the one that wrote the output, and which option gives that one back."""
    raw = DEFAULT_PROMPT if config.prompt_source == "built-in" else config.prompt
    if sha256_of(prompt_for(raw, reason)) == old.get("prompt_sha256"):
        return None
    source = old.get("prompt_source")
    if source == "built-in" and config.prompt_source != "built-in":
        return "written with the built-in prompt: drop --prompt-file"
    if source and source != config.prompt_source:
        return f"written with --prompt-file {source}: add --prompt-file {shlex.quote(source)}"
    if config.prompt_source == "built-in":
        return "written with another version's built-in prompt"
    return f"written with another text of the prompt (has {config.prompt_source} been edited?)"


def same_content(old: Any, new: list[dict[str, Any]]) -> bool:
    """Tell whether the input files are the pinned ones, whatever they are called now."""
    def bare(pins: Any) -> list:
        """Drop the file names from the pins, keeping what the files hold."""
        return [{k: v for k, v in pin.items() if k != "file"} for pin in pins] if isinstance(pins, list) else []
    return bool(new) and bare(old) == bare(new)


def setup_differences(config: Config, info: InputInfo, old: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Say, option by option, how this run differs from the one that wrote the output; note a moved input."""
    lines = []
    reason = written_reason(old)
    if reason is None:
        lines.append("written with another version's answer schema")
    elif reason != config.reason:
        lines.append(f"written with --reason {reason}: add --reason {reason}")
    if (prompt := prompt_difference(config, old, reason or config.reason)) is not None:
        lines.append(prompt)
    if old.get("model") != config.model:
        lines.append(f"written with --model {old.get('model')}: add --model {shlex.quote(str(old.get('model')))}")
    for key, flag in (("id_column", "--id-column"), ("text_column", "--text-column")):
        if old.get(key) != current[key]:
            fix = f": add {flag} {shlex.quote(old[key])}" if old.get(key) else ""
            lines.append(f"{flag.removeprefix('--').replace('-', ' ')}: was {old.get(key)!r}, now {current[key]!r}{fix}")
    if old.get("input") != current["input"]:
        if info.id_column is not None or same_content(old.get("input_files"), current["input_files"]):
            why = "ids pair the scores" if info.id_column is not None else "its content is unchanged"
            warn(f"note: the input was {old.get('input')}, now {current['input']}; resuming, as {why}")
        else:
            lines.append(f"input: was {old.get('input')}, now {current['input']}")
    return ["  " + line for line in lines]


def warn_unchecked(config: Config, info: InputInfo) -> None:
    """Warn loudly when a resumed output has lost the sidecar that pins its setup (ids still pair the rows)."""
    if config.resume and info.id_column is not None and config.output.exists() \
            and not meta_path(config.output).exists():
        warn(f"WARNING: {meta_path(config.output)} is missing, so the model, prompt and input that wrote "
             f"{config.output} cannot be checked; resuming as if they were this run's")


def unpinned(config: Config, info: InputInfo, why: str) -> None:
    """Refuse to resume by row position when nothing pins the input the records were made from."""
    if not (config.resume and info.id_column is None and not config.force):
        return
    with contextlib.suppress(OSError), open(config.output, "rb") as f:
        if f.read(7) == b'{"id": ':         # else not a checkpoint at all: Checkpoint.open says so
            raise UsageError(f"{config.output} {why}, so nothing shows whether {config.input} changed since it "
                             "was written; without an id column, rows are paired with their scores by position, "
                             "so a changed input would give old scores to other rows; rerun with --force to "
                             "resume it as it is, or score into another -o")


def check_meta(config: Config, info: InputInfo) -> dict[str, Any]:
    """Compare the run with the checkpoint's sidecar; refuse to mix, or to mispair rows, unless --force."""
    current = fingerprint(config, info)
    path = meta_path(config.output)
    if not (config.resume and path.exists()):
        warn_unchecked(config, info)
        unpinned(config, info, f"has no sidecar ({path.name})")
        return {"fingerprint": current, "endpoints": {}}
    try:
        meta = json.loads(path.read_text())
        old = meta["fingerprint"]
        setup = setup_differences(config, info, old, current)
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as exc:
        unpinned(config, info, f"has an unreadable sidecar ({path.name}: {one_line(exc)})")
        warn(f"{path}: unreadable ({one_line(exc)}); it will be rewritten")
        return {"fingerprint": current, "endpoints": {}}
    problems = []
    if setup:
        problems.append(f"{config.output} was written with a different setup; "
                        "resuming would mix incomparable scores:\n" + "\n".join(setup))
    if info.id_column is None and isinstance(old.get("input_files"), list) \
            and not same_content(old["input_files"], current["input_files"]):
        changes = input_changes(info, old["input_files"], current["input_files"])
        if changes:
            problems.append(f"{config.input} changed since {config.output} was written; without an id column, "
                            "rows are paired with their scores by position, so resuming would give old scores "
                            "to other rows:\n" + "\n".join(f"  {c}" for c in changes))
    if problems:
        message = "\n".join(problems)
        if not config.force:
            raise UsageError(message + "\nrerun with --force to resume anyway, or score into another -o")
        warn("WARNING: " + message + "\n(--force given: resuming anyway)")
    meta["fingerprint"] = current
    if not isinstance(meta.get("endpoints"), dict):
        meta["endpoints"] = {}
    return meta


# ── Endpoints and HTTP ────────────────────────────────────────────────────────────
# The endpoints file, each endpoint's health and limit, and the requests of preflight.


OLLAMA_PORT = 11434
ENDPOINT_KEYS = ("concurrency", "model", "name", "api", "key_env")
DOWN_AFTER = 3              # consecutive endpoint faults that take an endpoint down
FAULT_RUN_ODDS = 1e-6       # a productive endpoint goes down on a run of faults this unlikely by chance
FAULT_RUN_CAP = 12          # ... but never needs a longer run than this
OUTCOME_DECAY = 1 / 64      # weight of one request in an endpoint's running fault and bad-answer shares
BACKOFF_BASE, BACKOFF_CAP = 0.5, 30.0
PROBE_CAP = 60.0            # longest wait between probes of a down endpoint
DOCUMENT_CAP = 8 << 20      # bytes read of a model list, banner or error page
AUTO_MAX = 64               # ceiling for adaptive concurrency
AUTO_GAIN = 0.08            # a higher limit must raise throughput by this share to stay,
AUTO_STEP_SHARE = 0.25      # and by this share of the step's relative size (x2 must gain 25%)
AUTO_PROPORTIONAL = 0.85    # a doubling that raised throughput less than this share of x2 passed the server's capacity
AUTO_WINDOW = 4             # completions per measurement window (at least the limit) while ramping,
AUTO_STEADY = 4             # times this while holding, where a noisy window could talk it down
AUTO_FIRST_WINDOW = 2       # completions per measurement at limits 1 and 2 of the first climb
AUTO_QUEUED = 1.4           # latency at limit 2 over the service time that says the second request only waited
AUTO_PROBE_SECONDS = 30.0   # first upward re-probe after settling; doubles while probes do not pay
AUTO_PROBE_MAX = 600.0
AUTO_DROP = 0.8             # a held limit whose throughput falls below this share is probed downward


def normalize_url(text: str) -> tuple[str, Api | None]:
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
        return base[:-3], Api.OPENAI
    return base, None


def hide_password(text: str) -> str:
    """Mask the password of any URL in text (user:***@host): it must reach neither the screen nor the sidecar."""
    return re.sub(r"(://[^/@:\s]*):[^/@\s]+@", r"\1:***@", text)


def read_text_file(path: Path, what: str) -> str:
    """Read a UTF-8 text file the user named; any problem is one usage line."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read {what} ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: {what} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def parse_endpoint_line(text: str, number: int, source: str) -> EndpointSpec:
    """Parse `URL [key=value ...]` from one line of an endpoints file."""
    where = f"{source}:{number}"
    first, *pairs = text.split()
    try:
        url, implied_api = normalize_url(first)
    except (ValueError, httpx.InvalidURL) as exc:
        raise UsageError(hide_password(f"{where}: bad endpoint {first!r} ({one_line(exc)})")) from None
    port = httpx.URL(url).port
    if port is not None and not 1 <= port <= 65535:
        raise UsageError(hide_password(f"{where}: bad endpoint {first!r} (port {port} is outside 1-65535)"))
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not value:
            raise UsageError(f"{where}: expected key=value, got {pair!r}")
        if key not in ENDPOINT_KEYS:
            raise UsageError(f"{where}: unknown key {key!r} (known: {', '.join(ENDPOINT_KEYS)})")
        if key in options:
            raise UsageError(f"{where}: {key}= given twice ({options[key]!r} and {value!r}); keep one")
        options[key] = value
    try:
        concurrency = parse_concurrency(options["concurrency"]) if "concurrency" in options else None
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None
    try:
        api = Api(options.get("api", implied_api or Api.AUTO))
    except ValueError:
        raise UsageError(f"{where}: api must be ollama, openai or auto, not {options['api']!r}") from None
    key_env = options.get("key_env")
    if key_env is not None and key_env not in os.environ:
        raise UsageError(f"{where}: key_env={key_env} but the environment variable {key_env} is not set")
    name = options.get("name") or httpx.URL(url).netloc.decode()
    return EndpointSpec(url=url, name=name, api=api, model=options.get("model"), concurrency=concurrency,
                        key_env=key_env, line=number)


def parse_endpoints(path: Path | None) -> tuple[EndpointSpec, ...]:
    """Read endpoints.txt (or fall back to the local Ollama)."""
    if path is None:
        return (parse_endpoint_line(DEFAULT_ENDPOINT, 0, "default"),)
    lines = read_text_file(path, "endpoints file").splitlines()
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
                raise UsageError(f"{path}:{spec.line}: {kind} {hide_password(value)} already on line {seen[value]}")
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

    The first climb judges limits 1 and 2 on AUTO_FIRST_WINDOW completions, as a short
    job cannot afford long windows at limits far below the best. Two completions are
    too few to tell a single-slot server's throughput at 2 from noise, so the step
    from 1 to 2 also has to keep the latency below AUTO_QUEUED times the service time
    measured at 1: on a single-slot server the second request waits for the first,
    and latency doubles.
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
        """Start a new measurement window."""
        self.since, self.first, self.count, self.starved = now, None, 0, False
        self.latency = 0.0               # summed over the window's completions
        self.seen, self.seen_first = 0, now

    @property
    def slots(self) -> int:
        """Requests the server is known to serve at once without queueing them."""
        return self.best_limit

    def queued(self, started: float) -> bool:
        """Say whether a request started during a trial, so it may have waited on the server."""
        return any(begin <= started <= end for begin, end in self.trials)

    def on_answered(self, started: float, now: float, answered: bool = True) -> None:
        """Account one completed request (successful, answered, or failed after the server worked on it)."""
        if answered and not self.queued(started):
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
        self.latency += now - started
        if self.count < self.window() or now <= self.first:
            return
        if self.starved:       # not enough work to fill the limit: the window says nothing
            self.restart(now)
            return
        self._decide(self.count / (now - self.first), now)
        self.restart(now)

    def window(self) -> int:
        """Completions per measurement: few while ramping, more while holding, where noise is the enemy."""
        if self.phase == "climb" and self.limit <= 2:
            return AUTO_FIRST_WINDOW
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
            self._hold_at_best(now, AUTO_PROBE_SECONDS)

    def _set(self, limit: int, phase: str, now: float) -> None:
        """Move to a limit and phase, noting when a trial above the best limit begins and ends."""
        if self.trials and self.trials[-1][1] == math.inf:
            self.trials[-1][1] = now
        if limit > self.best_limit:
            self.trials.append([now, math.inf])
        self.limit, self.phase = limit, phase

    def _hold_at_best(self, now: float, probe_every: float) -> None:
        """Go back to the best limit measured and hold it, probing again after `probe_every` seconds."""
        self._set(self.best_limit, "hold", now)
        self.probe_every = min(AUTO_PROBE_MAX, probe_every)
        self.next_probe = now + self.probe_every
        self.settled_rate = self.best_rate

    def _pays(self, rate: float) -> bool:
        """Say whether a step up raised throughput enough to keep."""
        step = self.limit / self.best_limit - 1
        if self.best_limit == 1 and self.service and self.count:
            if self.latency / self.count > AUTO_QUEUED * self.service:
                return False    # the second request waited for the first: a single-slot server
        return rate >= self.best_rate * (1 + max(AUTO_GAIN, AUTO_STEP_SHARE * step))

    def _decide(self, rate: float, now: float) -> None:
        """Judge a full window's throughput according to the phase."""
        if self.limit > self.best_limit:
            self._judge_step(rate, now)
        elif self.limit < self.best_limit:              # a step down: refining, or throughput fell
            if rate >= self.best_rate * (1 - AUTO_GAIN / 2):
                self.best_limit, self.best_rate = self.limit, rate    # as fast with fewer in flight
                if self.phase == "probe" and self.limit > 1:
                    self._set(self.limit - 1, "probe", now)           # after a fall: maybe fewer still
                    return
            self._hold_at_best(now, AUTO_PROBE_SECONDS)
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
                self._hold_at_best(now, AUTO_PROBE_SECONDS)
            return
        self.ceiling = min(self.ceiling, tried)
        if self.phase == "climb" and below < knee < tried:
            self._set(knee, "refine", now)
        else:
            self._hold_at_best(now, 2 * self.probe_every if self.phase == "probe" else AUTO_PROBE_SECONDS)

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
        self.url = hide_password(spec.url)          # what is shown and stored
        self.base_url = spec.url                    # what requests use, with any user:password
        self.model = spec.model or config.model
        self.api = Api(spec.api)
        self.limiter = Limiter(spec.fixed_limit(config.concurrency))
        self.client: httpx.AsyncClient | None = None
        self._health = Health.PENDING                # moved only by the methods under "health" below
        self.detail = ""
        self.server = ""
        self.digest: str | None = None
        self.checked = False
        self.load_error: str | None = None        # the server's message when it last failed to load the model
        self.starting: asyncio.Task | None = None  # preflight's check-and-load, still running when dispatch began
        self.proven = False          # answered a scoring request since it last came up
        self.probe_pause = 1.0
        self.faults = 0
        self.backoff_until = 0.0
        self.down_since: float | None = None
        self.ctx_tokens = config.num_ctx
        self.response_format = "json_schema"
        self.logprobs = True                        # ask for token probabilities until the server refuses them
        self.gave_probabilities = False
        self.expected = 0                           # answers that carried an expected score
        self.inflight: dict[Item, float] = {}       # item → start time
        self._chat_url: httpx.URL | None = None
        self.trouble = asyncio.Event()              # wakes supervise(): down, gone, or run over
        # counters for the display and the summary
        self.answers = 0                             # usable answers, whether or not a race had already finished the row
        self.scored = self.errors = self.fault_count = 0   # scored: rows whose record this endpoint wrote
        self.bad = self.bad_run = 0                  # unusable answers: in all, and since the last usable one
        self.bad_rows = 0                            # rows answered unusably (first answers) since the last usable one
        self.last_bad = ""
        self.first_seen = self.first_bad = 0.0       # running counts of first answers to a row, and bad ones
        self.outcomes = self.fault_weight = 0.0      # running counts of requests, and of faults among them
        self.run_share = 0.0                         # the fault share when the current run of faults began
        self.prompt_tokens = self.output_tokens = 0

    @property
    def chat_url(self) -> httpx.URL:
        """The absolute scoring URL, parsed once (httpx re-parses relative ones per request)."""
        path = "/api/chat" if self.api == Api.OLLAMA else "/v1/chat/completions"
        if self._chat_url is None or not self._chat_url.path.endswith(path):
            self._chat_url = httpx.URL(self.base_url + path)
        return self._chat_url

    # ── health

    @property
    def health(self) -> Health:
        return self._health

    @property
    def usable(self) -> bool:
        """Serving rows, now or after its back-off."""
        return self._health in (Health.READY, Health.BACKOFF)

    @property
    def alive(self) -> bool:
        """Answering, or loading its model: not a reason to pause the run."""
        return self._health in (Health.READY, Health.BACKOFF, Health.WARMING)

    @property
    def gone(self) -> bool:
        return self._health is Health.GONE

    def _move(self, health: Health) -> None:
        """Move to another health, refusing any move HEALTH_MOVES does not list."""
        if health not in HEALTH_MOVES[self._health]:
            raise RuntimeError(f"{self.name}: health cannot go from {self._health} to {health}")
        self._health = health

    def loading(self) -> None:
        """Note that the endpoint passed its check or probe and is loading the model."""
        self._move(Health.WARMING)

    def came_up(self) -> None:
        """Put the endpoint (back) in service, with a clean slate: it has yet to prove itself."""
        self._move(Health.READY)
        self.faults, self.down_since, self.detail, self.proven = 0, None, "", False

    def passed_check(self, digest: str | None) -> None:
        """Note that the endpoint answered its check serving the model (build `digest`): from now on a failure is down."""
        self.digest, self.checked = digest, True

    def failed_to_come_up(self, reason: str, now: float) -> None:
        """Note a failed check, probe or load: still pending if it never passed a check, else down."""
        self._move(Health.DOWN if self.checked else Health.PENDING)
        self.detail = reason
        if self.checked:
            self.down_since = self.down_since or now

    def start_failed(self, exc: EndpointFault | EndpointGone, now: float) -> None:
        """Note why a check, probe or load failed: out of the run if the server refused for good, else not up yet."""
        if isinstance(exc, EndpointGone):
            self.taken_out(str(exc))
        else:
            self.failed_to_come_up(str(exc), now)

    def probe_failed(self, exc: EndpointFault | EndpointGone, now: float) -> None:
        """Note a failed attempt to bring the endpoint (back) into service, and probe it less often."""
        self.start_failed(exc, now)
        self.probe_pause = min(PROBE_CAP, self.probe_pause * 2)

    def backed_off(self, until: float) -> None:
        """Rest the endpoint until the given time after a fault."""
        self._move(Health.BACKOFF)
        self.backoff_until = until

    def went_down(self, reason: str, now: float) -> None:
        """Take the endpoint out of service until a probe finds it back; probe less one that never proved itself."""
        self._move(Health.DOWN)
        self.detail = reason
        self.down_since = self.down_since or now
        if not self.proven:
            self.probe_pause = min(PROBE_CAP, self.probe_pause * 2)
        self.trouble.set()

    def taken_out(self, reason: str) -> None:
        """Take the endpoint out of the run for good."""
        self._move(Health.GONE)
        self.detail = reason
        self.trouble.set()

    def can_take(self, now: float) -> bool:
        """Say whether the endpoint may start one more request now."""
        return self._health is Health.READY or (self._health is Health.BACKOFF and now >= self.backoff_until)

    def record_success(self) -> None:
        """Note a good answer: the endpoint is healthy."""
        self.faults = 0
        self.note_outcome(fault=False)
        self.proven, self.probe_pause = True, 1.0
        if self._health is Health.BACKOFF:
            self._move(Health.READY)
        self.answers += 1

    def count_answer(self, answer: Answer) -> None:
        """Count a row this endpoint's answer scored: its record, its tokens, whether it carried an expected score."""
        self.scored += 1
        self.prompt_tokens += answer.prompt_tokens or 0
        self.output_tokens += answer.output_tokens or 0
        self.expected += answer.score_expected is not None

    def note_outcome(self, fault: bool) -> None:
        """Update the running share of requests that ended in an endpoint fault."""
        self.outcomes = self.outcomes * (1 - OUTCOME_DECAY) + 1
        self.fault_weight = self.fault_weight * (1 - OUTCOME_DECAY) + fault

    def note_answer(self, usable: bool, first: bool, message: str = "") -> None:
        """Count an answer; first answers to a row (not repeats of a bad one) are compared across the fleet."""
        if usable:
            self.bad_run = self.bad_rows = 0
        else:
            self.bad_rows += first
            self.faults = 0               # it answered: not down, whatever the answer
            self.note_outcome(fault=False)
            self.bad, self.bad_run, self.last_bad = self.bad + 1, self.bad_run + 1, message
        if first:
            self.first_seen = self.first_seen * (1 - OUTCOME_DECAY) + 1
            self.first_bad = self.first_bad * (1 - OUTCOME_DECAY) + (not usable)

    def fault_share(self, excluding: float = 0.0, prior: float = 0.5) -> float:
        """Estimate the share of requests that fail here, leaving out `excluding` faults; `prior` faults in ten
        requests to start."""
        return (max(0.0, self.fault_weight - excluding) + prior) / (self.outcomes + 10)

    def fault_run_limit(self, share: float | None = None) -> int:
        """Consecutive faults too unlikely by chance at this fault share: more for an endpoint that often fails."""
        share = self.run_share if share is None else share
        if share <= 0:
            return DOWN_AFTER
        if share >= 1:                    # it fails every request: no run of faults is unlikely there
            return FAULT_RUN_CAP
        run = math.ceil(math.log(FAULT_RUN_ODDS) / math.log(share))
        return max(DOWN_AFTER, min(FAULT_RUN_CAP, run))

    def record_fault(self, exc: EndpointFault, now: float) -> bool:
        """Note an endpoint fault; return True if the endpoint should now go down.

        An endpoint that has answered well since it came up keeps its slots on a
        plain fault (a 500, a dropped connection): the row is re-sent, and only a
        run of faults unlikely at its usual fault rate takes it down. Overload
        signals, and endpoints not yet proven, back off.
        """
        if self.faults == 0:              # the share before this run, with a prior of a little under one in ten
            self.run_share = self.fault_share()
        self.faults += 1
        self.fault_count += 1
        self.detail = str(exc)
        self.note_outcome(fault=True)
        if exc.connect or self.faults >= (self.fault_run_limit() if self.proven else DOWN_AFTER):
            return True
        if self.proven and not exc.overload:
            return False
        delay = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (self.faults - 1)) * random.uniform(0.5, 1.5)
        if exc.retry_after:
            delay = max(delay, min(exc.retry_after, 300.0))
        self.backed_off(now + delay)
        return False

    def sidecar_entry(self) -> dict[str, str | None]:
        """Say what the sidecar keeps of the endpoint: where it is, and which model and build it serves."""
        return {"url": self.url, "model": self.model, "digest": self.digest}

    def headers(self) -> dict[str, str]:
        """Build request headers; the key comes from the environment only."""
        if self.spec.key_env:
            return {"Authorization": f"Bearer {os.environ.get(self.spec.key_env, '')}"}
        return {}

    @property
    def status(self) -> str:
        """Say in words what the endpoint is doing."""
        if self._health is Health.DOWN and self.down_since is not None:
            return f"down {format_duration(time.monotonic() - self.down_since)}"
        return {Health.PENDING: "not answering", Health.WARMING: "loading model", Health.GONE: "taken out",
                Health.BACKOFF: "backing off"}.get(self._health, self._health.value)

    def label(self) -> str:
        """Return a short status for the progress line: name, rows scored, limit or trouble."""
        if self._health is Health.READY:
            return f"{self.name} {self.scored} x{self.limiter.limit}"
        return f"{self.name} {self.scored} {self.status}"


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every endpoint's pool: each would load the CA bundle (~1 MiB, ~20 ms of CPU)."""
    return httpx.create_ssl_context(trust_env=False)


def make_client(endpoint: Endpoint, config: Config) -> httpx.AsyncClient:
    """Create the endpoint's keep-alive pool; per-request timeouts are set by callers."""
    return httpx.AsyncClient(
        base_url=endpoint.base_url,
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


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Read Retry-After in seconds, if the server sent a usable one."""
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


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


async def exchange(endpoint: Endpoint, method: str, url: str | httpx.URL, body: Any, cap: int,
                   timeout: Any = httpx.USE_CLIENT_DEFAULT) -> tuple[httpx.Response, bytes]:
    """Send one request and read at most `cap` bytes of the answer; trouble on the wire is the endpoint's."""
    chunks: list[bytes] = []
    try:
        async with endpoint.client.stream(method, url, json=body, timeout=timeout) as response:
            size = 0
            async for chunk in response.aiter_bytes():   # decoded: a gzip bomb counts at its real size
                size += len(chunk)
                if size > cap:
                    raise EndpointFault(f"HTTP {response.status_code} with an answer larger than "
                                        f"{cap // 1024:,} KiB", item_related=False, unusable=True)
                chunks.append(chunk)
    except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
        raise EndpointFault(describe_transport(exc), connect=True, item_related=False) from None
    except httpx.TransportError as exc:
        raise EndpointFault(describe_transport(exc)) from None
    except httpx.DecodingError as exc:
        raise EndpointFault(f"an answer that cannot be decoded ({one_line(exc)[:80]})", item_related=False,
                            unusable=True) from None
    return response, b"".join(chunks)


def readable(response: httpx.Response, data: bytes) -> httpx.Response:
    """Rebuild a streamed answer as a plain response, for the error parsers."""
    headers = [(k, v) for k, v in response.headers.multi_items()
               if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
    return httpx.Response(response.status_code, headers=headers, content=data, request=response.request)


@contextlib.asynccontextmanager
async def deadline(seconds: float, what: str):
    """Bound a whole exchange by the clock: a server that trickles bytes resets every read timeout."""
    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError:
        raise EndpointFault(f"{what}: no complete answer within {format_duration(seconds)}",
                            item_related=False) from None


async def fetch_json(endpoint: Endpoint, path: str, timeout: float, method: str = "GET",
                     body: Any = None) -> Any:
    """GET (or POST) a JSON document for preflight/probes, classifying failures."""
    response, data = await exchange(endpoint, method, path, body, DOCUMENT_CAP, timeout)
    if response.status_code in (401, 403):
        raise EndpointGone(f"refused: HTTP {response.status_code} {error_message(readable(response, data))}")
    if response.status_code != 200:
        raise EndpointFault(f"{path}: HTTP {response.status_code} {error_message(readable(response, data))}")
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return data.decode("utf-8", "replace")


async def identify(endpoint: Endpoint, timeout: float) -> None:
    """Work out the server kind and version (Ollama positively by `GET /`)."""
    if endpoint.api in (Api.AUTO, Api.OLLAMA):
        try:
            banner = await fetch_json(endpoint, "/", timeout)
        except EndpointFault as exc:
            if exc.connect or endpoint.api == Api.OLLAMA:
                raise
            banner = ""
        if isinstance(banner, str) and "Ollama is running" in banner:
            endpoint.api = Api.OLLAMA
            version = await fetch_json(endpoint, "/api/version", timeout)
            number = version.get("version") if isinstance(version, dict) else None
            endpoint.server = f"ollama {number}" if isinstance(number, str) else "ollama"
            return
        if endpoint.api == Api.OLLAMA:
            endpoint.server = "ollama?"
            return
    models = await fetch_json(endpoint, "/v1/models", timeout)
    if not (isinstance(models, dict) and isinstance(models.get("data"), list)):
        raise EndpointGone("neither Ollama nor an OpenAI-compatible server (no /v1/models list)")
    endpoint.api = Api.OPENAI
    owner = next((m.get("owned_by") for m in models["data"] if isinstance(m, dict) and m.get("owned_by")), None)
    # llama.cpp's server says "llamacpp", vLLM "vllm"; llama-cpp-python says "me", which names nobody
    known = {"llamacpp": "llama.cpp", "me": None, "system": None, "owner": None}.get(owner or "", owner)
    endpoint.server = f"openai ({known})" if known else "openai"


async def list_models(endpoint: Endpoint, timeout: float) -> dict[str, str | None]:
    """Return the endpoint's models and their digests (Ollama) or None (OpenAI)."""
    if endpoint.api == Api.OLLAMA:
        path, field, name_keys, digest_key = "/api/tags", "models", ("name", "model"), "digest"
    else:
        path, field, name_keys, digest_key = "/v1/models", "data", ("id",), None
    document = await fetch_json(endpoint, path, timeout)
    entries = document.get(field) if isinstance(document, dict) else None
    if entries is None and isinstance(document, dict) and field not in document:
        entries = []
    if not isinstance(entries, list) or not all(isinstance(m, dict) for m in entries):
        got = sketch(entries if entries is not None else document)
        raise EndpointFault(f"{path}: expected a list of model objects, got {got}", item_related=False)
    models: dict[str, str | None] = {}
    for entry in entries:
        name = next((entry[k] for k in name_keys if isinstance(entry.get(k), str) and entry[k]), None)
        digest = entry.get(digest_key) if digest_key else None
        if name:
            models[name] = digest if isinstance(digest, str) else None
    return models


async def pull_model(endpoint: Endpoint) -> None:
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
    async with deadline(PROBE_TIMEOUT, "identifying the server"):
        await identify(endpoint, PROBE_TIMEOUT)
        models = await list_models(endpoint, PROBE_TIMEOUT)
    found = next((name for name in models if name and model_matches(endpoint.model, name)), None)
    if found is None and config.pull and endpoint.api == Api.OLLAMA:
        await pull_model(endpoint)
        async with deadline(PROBE_TIMEOUT, "listing models"):
            models = await list_models(endpoint, PROBE_TIMEOUT)
        found = next((name for name in models if name and model_matches(endpoint.model, name)), None)
    if found is None:
        have = ", ".join(sorted(str(n) for n in models)[:8]) or "none"
        hint = " (try --pull)" if endpoint.api == Api.OLLAMA else ""
        raise EndpointGone(f"model {endpoint.model} not found{hint}; it has: {have}")
    endpoint.passed_check(models[found])


def ollama_options(config: Config, temperature: float, seed: int) -> dict[str, Any]:
    """Build Ollama options; num_ctx never varies, since changing it reloads the model."""
    return {"temperature": temperature, "seed": seed, "num_ctx": config.num_ctx, "num_predict": NUM_PREDICT}


async def warm_up(endpoint: Endpoint, config: Config) -> None:
    """Load the model before dispatch so a cold laptop's load is not taken for a failure."""
    if endpoint.api != Api.OLLAMA:
        return
    body = {"model": endpoint.model, "messages": [], "keep_alive": config.keep_alive,
            "options": ollama_options(config, config.temperature, config.seed)}
    response, data = await exchange(endpoint, "POST", endpoint.chat_url, body, DOCUMENT_CAP, config.timeout)
    status = response.status_code
    if status == 200:
        return
    message = f"HTTP {status}: {error_message(readable(response, data))}"
    if status in (401, 403):
        raise EndpointGone(f"refused: {message}")
    if status == 404:
        raise EndpointGone(f"model {endpoint.model} not found: {message}")
    if status == 400:               # the same request would be refused again
        raise EndpointGone(f"the server refuses to load {endpoint.model}: {message}")
    if status >= 500 and status != 503:
        raise LoadFailed(f"cannot load {endpoint.model}: {message}")
    raise EndpointFault(message, retry_after=retry_after_seconds(response))


async def load_model(endpoint: Endpoint, config: Config) -> None:
    """Warm an Ollama endpoint up within --timeout by the clock, and remember the outcome."""
    if endpoint.api != Api.OLLAMA:
        return
    try:
        async with deadline(config.timeout, "loading the model"):
            await warm_up(endpoint, config)
    except LoadFailed as exc:
        endpoint.load_error = str(exc)
        raise
    endpoint.load_error = None


async def start_endpoint(endpoint: Endpoint, config: Config) -> None:
    """Check an endpoint and load its model: what preflight waits for."""
    await check_endpoint(endpoint, config)
    if endpoint.api == Api.OLLAMA:          # an OpenAI-compatible server loads its model on its own
        endpoint.loading()
    await load_model(endpoint, config)
    endpoint.came_up()


def load_failures(endpoints: list[Endpoint]) -> str | None:
    """Say why nothing can serve when every endpoint still in the run has failed to load the model."""
    live = [e for e in endpoints if not e.gone]
    if not live or any(e.alive or not e.load_error for e in live):
        return None
    return "no endpoint can serve: " + "; ".join(f"{e.name}: {e.load_error}" for e in live)


def build_clash(endpoint: Endpoint, endpoints: Iterable[Endpoint]) -> Endpoint | None:
    """Return another endpoint serving the same model name as a different build: their scores would not compare."""
    if not endpoint.digest:
        return None
    return next((other for other in endpoints if other is not endpoint and other.model == endpoint.model
                 and other.digest and other.digest != endpoint.digest), None)


# ── Scoring protocol ──────────────────────────────────────────────────────────────
# Prompt, request, answer and expected score; the calibration sets at preflight.


TOP_LOGPROBS = 20           # alternatives asked for at each generated token (Ollama's maximum)
CALIBRATION_GAP = 1.0       # good samples must outscore poor ones by this much
CALIBRATION_DRIFT = 2.0     # an endpoint whose means differ from the rest of the fleet's by more is suspect
CALIBRATION_PARALLEL = 4    # calibration requests in flight per endpoint

# Clearly good and clearly poor functions, varied in size and style, that every endpoint scores at
# preflight: a model (or a machine serving another build) that cannot tell them apart shows up
# before it spends days scoring. They are never written to the checkpoint.
CALIBRATION_GOOD = (
    '''def clamp(value: float, low: float, high: float) -> float:
    """Return value limited to the closed interval [low, high]."""
    if low > high:
        raise ValueError(f"empty interval: {low} > {high}")
    return max(low, min(value, high))
''',
    '''def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Yield successive lists of at most `size` items from `items`.

    >>> list(chunked(range(5), 2))
    [[0, 1], [2, 3], [4]]
    """
    if size < 1:
        raise ValueError("size must be at least 1")
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
''',
    '''/**
 * Delay calls to `fn` until `wait` milliseconds have passed without a new call.
 * @param {Function} fn  the function to call
 * @param {number} wait  the quiet period in milliseconds
 * @returns {Function} the debounced function
 */
function debounce(fn, wait) {
  let timer = null;
  return function (...args) {
    clearTimeout(timer);
    timer = setTimeout(() => fn.apply(this, args), wait);
  };
}
''',
    '''    def get(self, key: str, default: V | None = None) -> V | None:
        """Return the cached value for key and mark it most recently used."""
        try:
            value = self._entries.pop(key)
        except KeyError:
            self.misses += 1
            return default
        self._entries[key] = value      # re-insert: dicts keep insertion order
        self.hits += 1
        return value
''',
)

CALIBRATION_POOR = (
    '''def f(a,b,c,d):
  x=a
  if b==1: x=x+1
  if b==1: x=x+1
  if c: x=x
  return x;d
''',
    '''def proc(l=[]):
    global cnt
    try:
        for i in range(len(l)):
            if l[i] != None:
                cnt = cnt + 1
                l[i] = l[i]
    except:
        pass
    return l
''',
    '''function doIt(a){var b=a;var c=0;for(var i=0;i<b.length;i++){c=c+b[i]*1;};return c;c=0;}
''',
    '''def calc(x):
    # TODO fix
    y = 0
    if x == 1:
        y = 1
    if x == 2:
        y = 2
    if x == 3:
        y = 3
    #if x == 4:
    #    y = 4
    return y
''',
)

CHARS_PER_TOKEN = 2.5       # conservative for code: cut more rather than overflow
TRUNCATION_MARK = "\n... [truncated]"
ANSWER_CAP = 1 << 20        # bytes read of one scoring answer (a real one is a few hundred)
MIN_CODE_CHARS = 200        # less code than this (where the code is longer) is not worth a verdict
SCORE_KEY = re.compile(r'(?<!\\)"score"\s*:\s*(?=\d)')   # the key anywhere in the object, not inside a string
SCORE_TAIL = re.compile(r"\s*(?:[,}].*)?", re.S)           # what may follow the score's digits in one token
ONE_OR_TEN = 5.5    # "1" seen only as an alternative counts as 10 when the other scores centre above this
LOGPROB_SLACK = 1e-6        # a log-probability is at most 0; rounding may leave a hair above
CONTEXT_PATTERNS = (
    re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)"),
    re.compile(r"maximum context length is (\d+) tokens.*?(\d+) tokens", re.S),
)


def retry_settings(config: Config, attempt: int) -> tuple[float, int]:
    """Vary a retry: the same prompt at temperature 0 gives the same bad answer again."""
    if attempt == 0:
        return config.temperature, config.seed
    return max(config.temperature, min(1.0, 0.3 * attempt)), config.seed + 1009 * attempt


def cut_text(text: str, limit: int) -> str:
    """Cut text to `limit` characters, ending in the truncation mark."""
    return text[:max(0, limit - len(TRUNCATION_MARK))] + TRUNCATION_MARK


def render_prompt(template: str, item: Item, budget: int, cap: int | None = None) -> tuple[str, bool]:
    """Fill the template, cutting the code to `budget` characters and every other column's value
    to `cap` if they are longer; say whether anything was cut."""
    code = item.text or ""
    truncated = len(code) > budget
    if truncated:
        code = cut_text(code, budget)
    fields = item.fields
    if cap is not None and any(len(str(v)) > cap for v in fields.values()):
        fields = {k: cut_text(str(v), cap) if len(str(v)) > cap else v for k, v in fields.items()}
        truncated = True
    return template.format_map({**fields, "code": code}), truncated


@functools.cache
def placeholder_uses(template: str) -> Counter:
    """Count how often each {column} appears in the template."""
    return Counter(name for _, name, _, _ in string.Formatter().parse(template) if name is not None)


def field_cap(room: int, uses: Counter, fields: dict[str, Any]) -> int | None:
    """Return the longest value the other columns may keep for all to fit `room` characters
    (longest cut first), or None if they fit whole."""
    lengths = sorted((len(str(v)), uses[name]) for name, v in fields.items() if uses[name])
    if sum(n * times for n, times in lengths) <= room:
        return None
    left, times_left = max(0, room), sum(times for _, times in lengths)
    for n, times in lengths:
        if n * times_left > left:
            return max(len(TRUNCATION_MARK), left // times_left)
        left, times_left = left - n * times, times_left - times
    return None


def prompt_plan(ctx_tokens: int, template: str, item: Item) -> tuple[int, int | None]:
    """Split a context between the code (characters at each {code}) and the other columns (their
    cut, or None): the columns are cut only where they would leave the code less than MIN_CODE_CHARS."""
    uses = placeholder_uses(template)
    codes = max(1, uses["code"])
    room = int((ctx_tokens - NUM_PREDICT - CONTEXT_MARGIN) * CHARS_PER_TOKEN) - len(template)
    cap = field_cap(room - codes * MIN_CODE_CHARS, uses, item.fields)
    fields = sum(uses[name] * (len(str(v)) if cap is None else min(len(str(v)), cap))
                 for name, v in item.fields.items())
    return (room - fields) // codes, cap


def learned_cut(budget: int, item: Item) -> int:
    """Cap a plan's characters of code by what a context overflow taught about the row."""
    budget = max(0, budget)
    return min(budget, item.max_chars) if item.max_chars else budget


def code_budget(endpoint: Endpoint, template: str, item: Item) -> int:
    """Characters of code that fit, at each {code}, the endpoint's context beside the instructions,
    the other columns and the answer."""
    return learned_cut(prompt_plan(endpoint.ctx_tokens, template, item)[0], item)


def fit_prompt(endpoint: Endpoint, config: Config, item: Item) -> tuple[str, bool]:
    """Render the prompt to fit the endpoint's context, or raise a hopeless ContextOverflow when
    even the template with the other columns cut leaves too little room for the code at --num-ctx."""
    budget, cap = prompt_plan(endpoint.ctx_tokens, config.prompt, item)
    widest = budget if endpoint.ctx_tokens == config.num_ctx else prompt_plan(config.num_ctx, config.prompt, item)[0]
    if widest < min(MIN_CODE_CHARS, len(item.text or "")):
        raise ContextOverflow(f"the prompt cannot fit --num-ctx {config.num_ctx} even with its columns cut "
                              f"(template {len(config.prompt):,} characters)", None, None, hopeless=True)
    return render_prompt(config.prompt, item, learned_cut(budget, item), cap)


def parse_answer(content: str) -> tuple[int, str | None]:
    """Validate the model's JSON: an integer score 1..10 and a reason (None if missing or null)."""
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
    reason = data.get("reason")
    return score, reason if reason is None or isinstance(reason, str) else json.dumps(reason)


def token_entries(api: Api, data: dict[str, Any]) -> list[dict[str, Any]] | None:
    """Return an answer's per-token probability entries (Ollama or OpenAI shape), or None."""
    if api == Api.OLLAMA:
        entries = data.get("logprobs")
    else:
        choice = (data.get("choices") or [{}])[0]
        logprobs = choice.get("logprobs") if isinstance(choice, dict) else None
        entries = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(entries, list) or not entries:
        return None
    if not all(isinstance(e, dict) and isinstance(e.get("token"), str) for e in entries):
        return None
    return entries


def probability(logprob: int | float) -> float | None:
    """Turn a log-probability into a probability, or None if it cannot be one (NaN, +inf, above 0)."""
    if math.isnan(logprob) or logprob > LOGPROB_SLACK:
        return None
    return math.exp(min(0.0, logprob))


def alternatives(entry: dict[str, Any]) -> dict[str, float] | None:
    """Return {token text: probability} at one position: the model's top alternatives and its pick;
    None if a log-probability there is not one (a position that cannot be read, never a guess)."""
    out: dict[str, float] = {}
    for alt in entry.get("top_logprobs") if isinstance(entry.get("top_logprobs"), list) else []:
        logprob = alt.get("logprob") if isinstance(alt, dict) else None
        if isinstance(alt, dict) and isinstance(alt.get("token"), str) and isinstance(logprob, (int, float)):
            if (p := probability(logprob)) is None:
                return None
            out[alt["token"]] = out.get(alt["token"], 0.0) + p
    logprob = entry.get("logprob")
    if isinstance(logprob, (int, float)):
        if (p := probability(logprob)) is None:
            return None
        if out and entry["token"] not in out:
            out[entry["token"]] = p
    return out


def read_digits(token: str, prefix: str) -> tuple[int, bool] | None:
    """Read a token at the score's first position as (score, complete), or None if the grammar forbids it."""
    if not token.startswith(prefix):
        return None
    found = re.fullmatch(r"([1-9]\d?)(.*)", token[len(prefix):], re.S)
    if not found or not SCORE_TAIL.fullmatch(found.group(2)) or int(found.group(1)) > 10:
        return None
    value = int(found.group(1))
    return value, not (value == 1 and not found.group(2))     # a bare "1" may be the start of 10


def ten_share(entries: list[dict[str, Any]], index: int, prefix: str, mass: dict[int, float],
              score: int) -> float | None:
    """Return how much of a bare "1" at entries[index] means 10 rather than 1 (None: unreadable)."""
    taken = entries[index]["token"][len(prefix):] == "1"
    if taken and index + 1 < len(entries):
        ten = one = 0.0
        following = alternatives(entries[index + 1])
        if following is None:
            return None
        for token, p in following.items():
            if token[:1] == "0" and SCORE_TAIL.fullmatch(token[1:]):
                ten += p
            elif token and SCORE_TAIL.fullmatch(token):
                one += p
        if ten + one > 0:
            return ten / (ten + one)
    if taken or not mass:
        return 1.0 if score == 10 else 0.0
    centre = sum(k * p for k, p in mass.items()) / sum(mass.values())
    return 1.0 if centre >= ONE_OR_TEN else 0.0


def expected_score(entries: list[dict[str, Any]] | None, score: int) -> float | None:
    """Return Σ k·p(k) over the scores 1..10 the model could have written, or None if unreadable."""
    if not entries:
        return None
    text, starts = "", []
    for entry in entries:
        starts.append(len(text))
        text += entry["token"]
    found = SCORE_KEY.search(text)
    if not found or int(re.match(r"\d+", text[found.end():]).group()) != score:
        return None
    at = found.end()
    index = bisect.bisect_right(starts, at) - 1
    prefix = text[starts[index]:at]
    mass: dict[int, float] = {}
    ones = 0.0
    picks = alternatives(entries[index])
    if picks is None:
        return None
    for token, p in picks.items():
        reading = read_digits(token, prefix)
        if reading is None:
            continue                      # forbidden by the grammar: dropped, the rest renormalized
        value, complete = reading
        if complete:
            mass[value] = mass.get(value, 0.0) + p
        else:
            ones += p
    if ones:
        share = ten_share(entries, index, prefix, mass, score)
        if share is None:
            return None
        mass[10] = mass.get(10, 0.0) + ones * share
        mass[1] = mass.get(1, 0.0) + ones * (1 - share)
    total = sum(mass.values())
    if not total > 0:
        return None
    return round(sum(k * p for k, p in mass.items()) / total, 3)


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
    if status in (400, 422, 500) and "logprob" in message.lower():      # only sent when asked for
        return LogprobsRejected(message)
    if endpoint.api == Api.OPENAI and endpoint.response_format == "json_schema" and status in (400, 422, 500) \
            and re.search(r"response_format|json_schema|literal_error|schema", message, re.I):
        return FormatRejected(message)
    if 300 <= status < 400:       # not followed: a POST re-sent elsewhere may not arrive as a POST
        where = response.headers.get("location", "?")
        return EndpointGone(f"answers with a redirect (HTTP {status} to {where}); put the final URL in endpoints.txt")
    if status in (401, 403):
        return EndpointGone(f"refused: {message}")
    if status == 404:
        return EndpointGone(f"model {endpoint.model} not found: {message}")
    if status == 400 and ("does not support" in message or "model is required" in message):
        return EndpointGone(message)
    if status in (408, 425, 429, 499) or status >= 500:
        return EndpointFault(message, retry_after=retry_after_seconds(response), overload=status in (429, 503))
    return ItemFault(message, kind=ErrorKind.REJECTED)


async def post_chat(endpoint: Endpoint, url: httpx.URL, body: dict[str, Any]) -> dict[str, Any]:
    """POST one scoring request; return the answer's JSON object, or raise whose fault it is."""
    response, raw = await exchange(endpoint, "POST", url, body, ANSWER_CAP)
    if response.status_code != 200:
        raise classify(endpoint, readable(response, raw))
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        text = raw.decode("utf-8", "replace")
        raise EndpointFault(f"HTTP 200 with a body that is not JSON: {one_line(text)[:120]!r}",
                            unusable=True) from None
    if not isinstance(data, dict):
        raise EndpointFault("HTTP 200 with an unexpected body", unusable=True)
    if data.get("error") and "message" not in data and "choices" not in data:   # LM Studio does this
        raise EndpointFault(f"HTTP 200 carrying an error: {error_message(readable(response, raw))}")
    return data


def token_count(value: Any, name: str) -> int | None:
    """Validate a token count from an answer (absent is fine, nonsense is the endpoint's fault)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if value is None or (type(value) is int and value >= 0):
        return value
    raise EndpointFault(f"HTTP 200 whose {name} is {sketch(value)}, not a count", item_related=False,
                        unusable=True)


def answer_fields(api: Api, data: dict[str, Any]) -> tuple[str, int | None, int | None]:
    """Pull (content, prompt tokens, output tokens) out of a chat answer; an odd shape is the endpoint's fault."""
    if api == Api.OLLAMA:
        message, usage, keys = data.get("message"), data, ("prompt_eval_count", "eval_count")
    else:
        choices = data.get("choices")
        if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
            raise EndpointFault(f"HTTP 200 whose choices are {sketch(choices)}", item_related=False, unusable=True)
        message, usage, keys = choices[0].get("message"), data.get("usage") or {}, ("prompt_tokens", "completion_tokens")
        if not isinstance(usage, dict):
            raise EndpointFault(f"HTTP 200 whose usage is {sketch(usage)}", item_related=False, unusable=True)
    if not isinstance(message, dict):
        raise EndpointFault(f"HTTP 200 whose message is {sketch(message)}", item_related=False, unusable=True)
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise EndpointFault(f"HTTP 200 whose message content is {sketch(content)}", item_related=False, unusable=True)
    return content or "", token_count(usage.get(keys[0]), keys[0]), token_count(usage.get(keys[1]), keys[1])


async def request_answer(endpoint: Endpoint, config: Config, prompt: str,
                         temperature: float, seed: int) -> tuple[str, int | None, int | None, list | None]:
    """POST one scoring request; return (content, prompt tokens, output tokens, token probabilities) or raise."""
    messages = [{"role": "user", "content": prompt}]
    schema = score_schema(config.reason)
    if endpoint.api == Api.OLLAMA:
        body = {"model": endpoint.model, "messages": messages, "stream": False, "format": schema,
                "options": ollama_options(config, temperature, seed), "keep_alive": config.keep_alive}
    else:
        if endpoint.response_format == "json_schema":
            fmt = {"type": "json_schema", "json_schema": {"name": "score", "schema": schema}}
        else:
            fmt = {"type": "json_object", "schema": schema}
        body = {"model": endpoint.model, "messages": messages, "temperature": temperature, "seed": seed,
                "max_tokens": NUM_PREDICT, "stream": False, "response_format": fmt}
    if endpoint.logprobs:
        body.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
    data = await post_chat(endpoint, endpoint.chat_url, body)
    content, prompt_tokens, output_tokens = answer_fields(endpoint.api, data)    # validates the shape first
    return content, prompt_tokens, output_tokens, token_entries(endpoint.api, data)


async def request_with_fallbacks(endpoint: Endpoint, config: Config, prompt: str,
                                 temperature: float, seed: int) -> tuple[str, int | None, int | None, list | None]:
    """Send a scoring request, dropping what the server refuses (once per endpoint, remembered)."""
    while True:
        asked, form = endpoint.logprobs, endpoint.response_format
        try:
            return await request_answer(endpoint, config, prompt, temperature, seed)
        except (EndpointFault, ItemFault):
            if (asked, form) == (endpoint.logprobs, endpoint.response_format):
                raise
            # a concurrent request learned meanwhile that the server refuses what this one carried
        except FormatRejected:
            if endpoint.response_format == "json_schema":     # concurrent requests learn it once
                warn(f"{endpoint.name}: the server does not take response_format json_schema; "
                     "sending the schema as json_object from now on")
            endpoint.response_format = "json_object"
        except LogprobsRejected as exc:
            if not asked:
                raise ItemFault(str(exc), kind=ErrorKind.REJECTED) from None
            if endpoint.logprobs:
                warn(f"{endpoint.name}: the server refuses token probabilities (logprobs); "
                     "its rows get score_expected null")
            endpoint.logprobs = False


async def score_item(endpoint: Endpoint, item: Item, config: Config) -> Answer:
    """Score one item on one endpoint: build the prompt, call, validate."""
    temperature, seed = retry_settings(config, item.attempts)
    prompt, truncated = fit_prompt(endpoint, config, item)
    started = time.monotonic()
    try:
        async with asyncio.timeout(config.timeout):
            content, p_tokens, o_tokens, entries = await request_with_fallbacks(
                endpoint, config, prompt, temperature, seed)
    except TimeoutError:
        raise EndpointFault(f"no answer within {config.timeout:g} s (--timeout)", overload=True) from None
    score, reason = parse_answer(content)
    expected = expected_score(entries, score)
    endpoint.gave_probabilities = endpoint.gave_probabilities or expected is not None
    return Answer(score, None if config.reason == "none" else reason, p_tokens, o_tokens,
                  time.monotonic() - started, truncated, seed, temperature, expected)


def wants_calibration(config: Config, info: InputInfo, resume: ResumeState) -> bool:
    """Calibrate when asked, for --check, and for jobs of CALIBRATE_MIN_ROWS rows or more."""
    if config.calibration is not None:
        return config.calibration
    if config.check or config.require_calibration:
        return True
    if info.total is not None:
        return info.total - len(resume.scored) - len(resume.permanent) >= CALIBRATE_MIN_ROWS
    # JSONL is counted only later, in the background: judge by size (a function is ~1 kB of JSON)
    return sum(f.stat().st_size for f in info.files) >= CALIBRATE_MIN_ROWS * 1000


async def calibrate_endpoint(endpoint: Endpoint, config: Config) -> dict[str, Any]:
    """Score the built-in good and poor samples on one endpoint and summarise how far apart they land."""
    fields = {name: "" for name in template_fields(config.prompt)}
    fixed = not endpoint.limiter.auto        # a pinned concurrency is the machine owner's word
    limit = asyncio.Semaphore(min(CALIBRATION_PARALLEL, endpoint.limiter.limit) if fixed else CALIBRATION_PARALLEL)

    async def one(text: str) -> Answer:
        async with limit:
            return await score_item(endpoint, Item(id="calibration", text=text, fields=fields), config)

    samples = CALIBRATION_GOOD + CALIBRATION_POOR
    try:
        async with asyncio.timeout(config.timeout):     # the budget of one request, model load included
            results = await asyncio.gather(*(one(text) for text in samples), return_exceptions=True)
    except TimeoutError:
        return {"verdict": "failed", "detail": f"no answers within {config.timeout:g} s (--timeout)",
                "probabilities": endpoint.gave_probabilities}
    for result in results:
        if isinstance(result, BaseException) and not isinstance(
                result, (EndpointFault, ItemFault, ContextOverflow, EndpointGone)):
            raise result
    answers = [r if isinstance(r, Answer) else None for r in results]
    good, poor = answers[:len(CALIBRATION_GOOD)], answers[len(CALIBRATION_GOOD):]
    if sum(a is not None for a in good) < 2 or sum(a is not None for a in poor) < 2:
        problem = next((one_line(r)[:120] for r in results if isinstance(r, BaseException)), "too few answers")
        return {"verdict": "failed", "detail": problem, "probabilities": endpoint.gave_probabilities}
    expected = all(a.score_expected is not None for a in answers if a is not None)

    def values(side: list[Answer | None]) -> list[float]:
        return [a.score_expected if expected else float(a.score) for a in side if a is not None]

    good_mean, poor_mean = statistics.fmean(values(good)), statistics.fmean(values(poor))
    gap = good_mean - poor_mean
    return {"measure": "score_expected" if expected else "score", "probabilities": endpoint.gave_probabilities,
            "good": values(good), "poor": values(poor), "good_mean": round(good_mean, 3),
            "poor_mean": round(poor_mean, 3), "separation": round(gap, 3),
            "verdict": "ok" if gap >= CALIBRATION_GAP else "no separation"}


def compare_calibrations(results: dict[str, dict[str, Any]]) -> None:
    """Mark endpoints whose calibration means sit far from the rest of the fleet's."""
    measured = {name: r for name, r in results.items() if "good_mean" in r}
    measures = {r["measure"] for r in measured.values()}
    if len(measured) < 2 or len(measures) > 1:
        return                    # nothing to compare, or scales that do not compare
    for name, result in measured.items():
        # three or more: the fleet's median resists one odd endpoint; two: each is compared with the other
        others = list(measured.values()) if len(measured) > 2 else [r for n, r in measured.items() if n != name]
        drift = max(abs(result["good_mean"] - statistics.median(r["good_mean"] for r in others)),
                    abs(result["poor_mean"] - statistics.median(r["poor_mean"] for r in others)))
        result["drift"] = round(drift, 3)
        if drift > CALIBRATION_DRIFT and result["verdict"] == "ok":
            result["verdict"] = "unlike the others"


def calibration_table(endpoints: list[Endpoint], results: dict[str, dict[str, Any]]) -> str:
    """Render one line per endpoint: probabilities, good mean, poor mean, separation, verdict.

    Beyond FLEET_ROWS endpoints, the ones that passed share one line (their average figures)
    and endpoints with the very same figures and verdict share one too, so 40 laptops that
    all fail the same way read as one line, not forty.
    """
    groups: dict[tuple[str, ...], list[str]] = {}
    for e in endpoints:
        if (r := results.get(e.name)) is not None:
            numbers = [f"{r[k]:.2f}" for k in ("good_mean", "poor_mean", "separation")] if "good_mean" in r \
                else ["-"] * 3
            verdict = r["verdict"] + (f" ({r['detail']})" if r.get("detail") else "") + \
                (" (integer scores)" if r.get("measure") == "score" else "")
            groups.setdefault(("yes" if r.get("probabilities") else "no", *numbers, verdict), []).append(e.name)
    rows = [["endpoint", "probabilities", "good", "poor", "separation", "calibration"]]
    fold = len(results) > FLEET_ROWS
    passed = [name for cells, names in groups.items() if cells[-1] == "ok" for name in names] if fold else []
    for cells, names in groups.items():
        if fold and cells[-1] == "ok":
            continue
        rows += [[f"{len(names)} endpoints", *cells]] if fold and len(names) > 1 else [[n, *cells] for n in names]
    if passed:
        figures = [results[n] for n in passed]
        means = [f"{statistics.fmean(r[k] for r in figures):.2f}" for k in ("good_mean", "poor_mean", "separation")]
        probabilities = {"yes" if r.get("probabilities") else "no" for r in figures}
        rows.append([f"{len(passed)} others", probabilities.pop() if len(probabilities) == 1 else "some",
                     *means, "ok (averages)"])
    return text_table(cut_names(rows), right={2, 3, 4})


def calibration_warnings(results: dict[str, dict[str, Any]]) -> list[str]:
    """Say loudly what a failed calibration means for the scores, once per kind of failure."""
    by_kind: dict[tuple[str, str], list[str]] = {}
    for name, r in results.items():
        detail = f"{r['separation']:.2f}" if r["verdict"] == "no separation" else \
            f"{r['drift']:.2f}" if r["verdict"] == "unlike the others" else str(r.get("detail"))
        if r["verdict"] != "ok":
            by_kind.setdefault((r["verdict"], detail), []).append(name)
    lines = []
    for (verdict, detail), names in by_kind.items():
        one = len(names) == 1
        who = names[0] if one else f"{len(names)} endpoints ({name_list(names)})"
        if verdict == "no separation":
            lines.append(f"WARNING: {who} {'scores' if one else 'score'} clearly poor functions about as high as "
                         f"clearly good ones (separation {detail} < {CALIBRATION_GAP:g}): {'its' if one else 'their'} "
                         "scores would rank your data close to randomly. Check the model, the prompt and the "
                         "server's chat template.")
        elif verdict == "unlike the others":
            lines.append(f"WARNING: {who} {'scores' if one else 'score'} the calibration set very differently from "
                         f"the other endpoints (means differ by {detail}): probably another model, quantization or "
                         "template, and mixing those scores with the rest would skew the ranking.")
        else:
            lines.append(f"WARNING: {who} could not be calibrated: {detail}")
    return [textwrap.fill(line, REPORT_WIDTH, subsequent_indent="  ") for line in lines]


async def calibrate(endpoints: list[Endpoint], config: Config) -> dict[str, dict[str, Any]]:
    """Calibrate every checked endpoint in parallel; print the table and warnings; enforce --require-calibration."""
    checked = [e for e in endpoints if e.checked and not e.gone]
    found = await asyncio.gather(*(calibrate_endpoint(e, config) for e in checked))
    results = {e.name: r for e, r in zip(checked, found)}
    compare_calibrations(results)
    warn(calibration_table(endpoints, results))
    for line in calibration_warnings(results):
        warn(line)
    failed = [name for name, r in results.items() if r["verdict"] != "ok"]
    if config.require_calibration and failed:
        raise UsageError(f"calibration failed on {', '.join(failed)} (--require-calibration); nothing was scored")
    return results


# ── Dispatch and outcome policies ─────────────────────────────────────────────────
# Pure rules: which endpoint takes which row, which row to race, what an outcome means.


MAX_SHRINKS = 4             # context-overflow re-cuts of one item before giving up
UNUSABLE_RUN = 10           # unusable answers in a row (to different rows, once it has answered well) that take
                            # an endpoint out
SUSPECT_RUN = 3             # rows in a row answered unusably after which its answers no longer cost rows attempts
JUDGE_MIN = 8               # unusable answers before an endpoint can be judged against the fleet
JUDGE_SEEN = 20             # answers the rest of the fleet must have given to compare with
JUDGE_SHARE = 0.5           # an endpoint is out when this share of its answers is unusable,
JUDGE_RATIO = 4.0           # and that is this many times the rest of the fleet's share
RETRY_BOUND = 256           # rows waiting for a retry beyond which no preference delays them
POISON_FAULTS = 3           # endpoint faults one item may cause before it is suspect
OVERDUE = 3.0               # a request running this many service times may be stalled: not counted on


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
    return Lane(endpoint.health is Health.READY, endpoint.limiter.service, endpoint.limiter.slots,
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


def rows_before(lane: Lane, within: float, now: float) -> int:
    """Count the new rows the lane would finish sooner than `within` seconds from now."""
    if not lane.ready or lane.service is None or lane.service >= within or overdue(lane, now):
        return 0
    head = min(lane.service, now - lane.oldest) if lane.oldest is not None else 0.0
    # finish_in(lane, n) < within  ⟺  inflight + n < (within + head) · slots / service
    return max(0, math.ceil((within + head) * lane.slots / lane.service - lane.inflight) - 1)


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


class Act(enum.Enum):
    """What happens to a row after an outcome."""

    # give it up (an error record), spend an attempt, send it again free, cut its code, take the endpoint out
    WRITE, CHARGE, RESEND, SHRINK, RETIRE = range(5)


@dataclass(frozen=True, slots=True)
class Verdict:
    """An outcome rule's decision, with the error kind and message it needs."""

    act: Act
    kind: ErrorKind | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class Answers:
    """What the outcome rules know about one endpoint's answers at one moment."""

    good: int                   # usable answers in all
    bad_run: int = 0            # unusable answers since the last usable one
    bad_rows: int = 0           # rows answered unusably (first answers) since the last usable one
    first_seen: float = 0.0     # running count of first answers to a row
    first_bad: float = 0.0      # and of the unusable ones among them
    last_bad: str = ""


def answers_of(endpoint: Endpoint) -> Answers:
    """Freeze what the outcome rules need to know about an endpoint's answers."""
    return Answers(endpoint.answers, endpoint.bad_run, endpoint.bad_rows, endpoint.first_seen, endpoint.first_bad,
                   endpoint.last_bad)


def fleet_share(others: Iterable[Answers]) -> float | None:
    """Return the share of unusable answers on the rest of the fleet, once it has answered enough to tell."""
    seen = bad = 0.0
    for other in others:
        seen, bad = seen + other.first_seen, bad + other.first_bad
    return bad / seen if seen >= JUDGE_SEEN else None


def worse_than_fleet(mine: Answers, fleet: float | None) -> tuple[float, float] | None:
    """Return (its share, the fleet's) of unusable answers if this endpoint's is far above the rest's."""
    if fleet is None or not mine.first_seen:
        return None
    share = mine.first_bad / mine.first_seen
    return (share, fleet) if share >= JUDGE_SHARE and share >= JUDGE_RATIO * fleet else None


def suspect(mine: Answers, fleet: float | None, others_usable: bool) -> bool:
    """Say whether an endpoint's bad answers may be its own fault rather than the rows'.

    It is, if it is far worse than the rest of the fleet, or while the rest has
    not answered enough to compare with; a lone endpoint is judged on its own.
    Whatever the fleet, several different rows in a row answered unusably,
    with none usable between, say the endpoint has gone bad (a model that
    started answering prose), not that the rows are.
    """
    if mine.bad_rows >= SUSPECT_RUN:
        return True
    if fleet is None:
        return others_usable
    return worse_than_fleet(mine, fleet) is not None


def unusable_reason(mine: Answers, fleet: float | None) -> str | None:
    """Say why an endpoint's unusable answers are its own fault, if they are: then it is taken out.

    By comparison when the rest of the fleet has answered enough rows (first
    answers to each row; rows failed elsewhere count for the rest, which only
    makes it slower to blame an endpoint); alone, after UNUSABLE_RUN answers in
    a row with not one usable, so a lone endpoint answering prose cannot loop.
    An endpoint that has answered well is out after UNUSABLE_RUN different
    rows in a row answered unusably: a row bad everywhere is retried between
    good answers, so it never makes such a run.
    """
    last = mine.last_bad[:160]
    if mine.good == 0 and mine.bad_run >= UNUSABLE_RUN:
        return f"{mine.bad_run} answers in a row, none usable (last: {last})"
    if mine.bad_rows >= UNUSABLE_RUN:
        return f"{mine.bad_rows} rows in a row answered, none usable (last: {last})"
    worse = worse_than_fleet(mine, fleet)
    if worse and mine.first_bad >= JUDGE_MIN:
        return f"{worse[0]:.0%} of its answers unusable against {worse[1]:.0%} on the other endpoints (last: {last})"
    return None


def judge_bad_answer(outcome: Exception, mine: Answers, fleet: float | None, others_usable: bool,
                     again: bool) -> Verdict:
    """Decide on an unusable answer: the endpoint's fault, the row's, or neither.

    A row pays one of its attempts for a bad answer from an endpoint that has
    answered well and is not suspect, or that already answered this row badly
    once (so every row's retries are bounded); otherwise it is simply re-sent
    elsewhere. An answer of the wrong shape is never the row's fault.
    """
    if reason := unusable_reason(mine, fleet):
        return Verdict(Act.RETIRE, message=reason)
    if isinstance(outcome, ItemFault) and mine.good and (again or not suspect(mine, fleet, others_usable)):
        return Verdict(Act.CHARGE, outcome.kind, str(outcome))
    return Verdict(Act.RESEND)


def blames_row(fault: EndpointFault, proven: bool, row_faults: int, answered: int) -> bool:
    """Say whether an endpoint fault counts against the row: only a server that works for other rows can blame it."""
    return fault.item_related and (proven or bool(row_faults and answered))


def judge_fault(fault: EndpointFault, row_faults: int, failed_on: int, by_chance: int, live: int) -> Verdict:
    """Charge a row that keeps breaking servers, sparing their health; otherwise send it again for free.

    `by_chance` is how many faults in a row the endpoint meets by chance at its
    usual fault rate; `failed_on` counts the endpoints that failed on the row.
    """
    if fault.item_related and row_faults > max(POISON_FAULTS, by_chance) and failed_on >= min(2, live):
        return Verdict(Act.CHARGE, ErrorKind.POISON, f"endpoints failed on this item {row_faults} times (last: {fault})")
    return Verdict(Act.RESEND)


def judge_overflow(overflow: ContextOverflow, shrinks: int) -> Verdict:
    """Decide on a prompt too long for the server: give up, charge the row, or cut its code."""
    if overflow.hopeless:        # nothing was sent, and no endpoint has more room than --num-ctx
        return Verdict(Act.WRITE, ErrorKind.TOO_LONG, str(overflow))
    if shrinks > MAX_SHRINKS:
        return Verdict(Act.CHARGE, ErrorKind.TOO_LONG, f"prompt still too long after {MAX_SHRINKS} cuts: {overflow}")
    return Verdict(Act.SHRINK)


def cut_to(chars: int, overflow: ContextOverflow) -> int:
    """Return the code budget to resend with: what the server's numbers say fits, or half."""
    ratio = 0.5
    if overflow.requested and overflow.limit:
        ratio = max(0.1, min(0.9, (overflow.limit - NUM_PREDICT - CONTEXT_MARGIN) / overflow.requested))
    return int(chars * ratio)


def judge_attempts(attempts: int, max_attempts: int, kind: ErrorKind, last_error: str) -> Verdict:
    """After a row paid an attempt: give it up when none are left, else send it again."""
    if attempts >= max_attempts:
        final = ErrorKind.ATTEMPTS_EXHAUSTED if kind in (ErrorKind.BAD_ANSWER, ErrorKind.REJECTED) else kind
        return Verdict(Act.WRITE, final, f"{attempts} attempts; last: {last_error}")
    return Verdict(Act.RESEND)


class Backlog:
    """The rows waiting for an endpoint, and the rules that give an endpoint its next one."""

    def __init__(self, endpoints: list[Endpoint], hedge: bool,
                 wake_faster: Callable[[float], None] = lambda than: None) -> None:
        self.endpoints, self.hedge = endpoints, hedge
        self.wake_faster = wake_faster          # wakes idle drivers of endpoints faster than the given service time
        self.fresh: deque[Item] = deque()
        self.retry: deque[Item] = deque()
        self.closed = False                     # the input is read to the end: the end-of-input rules apply
        self.space = Wakeup()                   # the producer waits for room in the queue

    @property
    def waiting(self) -> bool:
        return bool(self.fresh or self.retry)

    def take(self, endpoint: Endpoint, now: float) -> Item | None:
        """Choose the next item for an endpoint, or None if it should wait."""
        if not endpoint.can_take(now) or len(endpoint.inflight) >= endpoint.limiter.limit:
            return None
        self.drop_finished()
        if self.closed and not self.worth_starting(endpoint, now):
            if (item := self.left_for(endpoint, now)) is not None:
                return item
            return self.hedge_candidate(endpoint, now) if self.hedge else None
        fallback = None
        for i, item in enumerate(self.retry):
            if item.tasks:
                continue
            if (item.avoid or item.fault_endpoints) and self.leave_to_others(endpoint, item):
                continue
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
        if self.closed and self.hedge:
            return self.hedge_candidate(endpoint, now)
        endpoint.limiter.on_starved()
        return None

    def drop_finished(self) -> None:
        """Forget retries a raced copy finished meanwhile, so they are neither scanned nor counted again."""
        if any(item.finished for item in self.retry):
            for _ in range(len(self.retry)):
                item = self.retry.popleft()
                if not item.finished:
                    self.retry.append(item)

    def queued(self) -> int:
        """Count the rows waiting that an endpoint could take now (not finished, no copy in flight)."""
        return len(self.fresh) + sum(1 for item in self.retry if not (item.finished or item.tasks))

    def leave_to_others(self, endpoint: Endpoint, item: Item) -> bool:
        """Say whether a row this endpoint failed should wait for other work or another endpoint.

        A preference, not a ban, and bounded: past RETRY_BOUND waiting rows it
        lapses. While fresh rows remain, a row answered badly here waits, and one
        that faulted here goes to another endpoint if there is one. After the
        input, a row answered badly here still waits for any other usable
        endpoint that has not answered it badly (see left_for).
        """
        bad = item.answered_badly_by(endpoint.name)
        faulted = item.fault_endpoints is not None and endpoint.name in item.fault_endpoints
        if not (bad or faulted) or len(self.retry) >= RETRY_BOUND:
            return False
        if self.fresh:
            if bad:
                return True
            failed = (item.avoid or set()) | item.fault_endpoints
        elif bad:
            failed = item.avoid
        else:
            return False
        return any(e is not endpoint and e.usable and e.name not in failed for e in self.endpoints)

    def left_for(self, endpoint: Endpoint, now: float) -> Item | None:
        """Take a waiting row that others answered badly, if no endpoint the end-of-input rule prefers may take it."""
        for i, item in enumerate(self.retry):
            if item.finished or item.tasks or not item.avoid or item.answered_badly_by(endpoint.name):
                continue
            if not any(e is not endpoint and e.usable and e.name not in item.avoid and self.prefers(e, now)
                       for e in self.endpoints):
                del self.retry[i]
                return item
        return None

    def prefers(self, endpoint: Endpoint, now: float) -> bool:
        """Say whether the end-of-input rule lets this endpoint take one of the queued rows (no side effects)."""
        queued = self.queued()
        others = (lane_of(e) for e in self.endpoints if e is not endpoint and e.health is Health.READY)
        return not queued or takes_queued_row(lane_of(endpoint), others, queued, now)

    def worth_starting(self, endpoint: Endpoint, now: float) -> bool:
        """At the end of the input, leave the last rows to endpoints that will finish them sooner."""
        if self.prefers(endpoint, now):     # with nothing queued, take() goes on to racing
            return True
        self.wake_faster(finish_in(lane_of(endpoint), 1, now))     # those may be asleep with room
        return False

    def hedge_candidate(self, endpoint: Endpoint, now: float) -> Item | None:
        """Race an item stuck on a slower endpoint when this one expects to finish well before it."""
        mine = endpoint.limiter.service
        if mine is None:
            return None

        def copies() -> Iterator[tuple[Item, Lane, float, int]]:
            """Yield each copy in flight elsewhere that this endpoint may race, with its lane, start and rank."""
            for other in self.endpoints:
                if other is endpoint or not other.inflight:
                    continue
                lane = lane_of(other)
                for rank, (item, started) in enumerate(other.inflight.items(), 1):
                    if not (item.hedged or item.finished or len(item.tasks) > 1
                            or item.answered_badly_by(endpoint.name)):
                        yield item, lane, started, rank

        best = race_target(mine, copies(), now)
        if best is not None:
            best.hedged, best.racer = True, endpoint
        return best


# ── Fleet health ──────────────────────────────────────────────────────────────────
# Endpoints into service and back, down or out; the run paused or stopped when none is left.


class Fleet:
    """The run's endpoints and their health: bring each into service and back, take it down or out."""

    def __init__(self, endpoints: list[Endpoint], config: Config, meta: dict[str, Any], checkpoint: Checkpoint,
                 progress: Progress, changed: Wakeup) -> None:
        self.endpoints, self.config, self.meta, self.checkpoint = endpoints, config, meta, checkpoint
        self.progress, self.changed = progress, changed     # `changed` wakes every driver to re-check
        self.over = asyncio.Event()                         # the run is over: supervisors stop
        self.supervisors: list[asyncio.Task] = []
        self.all_down_since: float | None = None
        self.last_answer = time.monotonic()                 # the last good answer from any endpoint

    def end(self) -> None:
        """Stop supervising: a probe or model load still under way must not hold the end."""
        self.over.set()
        for endpoint in self.endpoints:
            endpoint.trouble.set()
        for task in self.supervisors:
            task.cancel()

    def live(self) -> int:
        """Count the endpoints not taken out."""
        return sum(1 for e in self.endpoints if not e.gone)

    def compare(self, endpoint: Endpoint) -> tuple[float | None, bool]:
        """Return what the outcome rules compare an endpoint with: the rest's share of unusable answers, any usable."""
        fleet = fleet_share(answers_of(other) for other in self.endpoints
                            if other is not endpoint and not other.gone)
        return fleet, any(e is not endpoint and e.usable for e in self.endpoints)

    def stop_or_pause(self, now: float) -> None:
        """End the run if it cannot go on; pause it (nothing is lost) while every endpoint is down."""
        live = [e for e in self.endpoints if not e.gone]
        if not live:
            raise StopRun("every endpoint has been taken out: "
                          + "; ".join(f"{e.name}: {e.detail}" for e in self.endpoints))
        if (reason := load_failures(self.endpoints)) and self.config.max_downtime is None:
            raise StopRun(f"{reason} (--max-downtime waits for one to recover)")
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
                          f"{format_duration(now - self.last_answer)} (--max-downtime {self.config.max_downtime:g}s)")

    def answered(self, endpoint: Endpoint, first: bool, started: float, now: float) -> None:
        """Count a usable answer: the endpoint is healthy."""
        self.last_answer = now
        endpoint.record_success()
        endpoint.note_answer(True, first=first)
        endpoint.limiter.on_answered(started, now)

    def judge_answer(self, endpoint: Endpoint, outcome: Exception, again: bool, started: float,
                     now: float) -> Verdict:
        """Count an unusable answer and judge it against the fleet; take the endpoint out if it is to blame."""
        endpoint.limiter.on_answered(started, now)
        endpoint.note_answer(False, first=not again, message=str(outcome))
        verdict = judge_bad_answer(outcome, answers_of(endpoint), *self.compare(endpoint), again)
        if verdict.act is Act.RETIRE:
            self.retire(endpoint, verdict.message)
        return verdict

    def note_overflow(self, endpoint: Endpoint, overflow: ContextOverflow, started: float, now: float) -> None:
        """Learn the endpoint's context size from a prompt it found too long."""
        endpoint.limiter.on_answered(started, now)
        if overflow.limit:
            endpoint.ctx_tokens = min(endpoint.ctx_tokens, overflow.limit)

    def note_fault(self, endpoint: Endpoint, fault: EndpointFault, started: float, now: float) -> None:
        """Count an endpoint fault against the endpoint: fewer in flight, a back-off, or down."""
        if fault.overload:
            endpoint.limiter.on_overload(now)
        elif not fault.connect:
            # The server spent a slot on it: counting it keeps a few random faults in a short
            # window from reading as a limit that does not pay (its latency says nothing of service).
            endpoint.limiter.on_answered(started, now, answered=False)
        if endpoint.record_fault(fault, now):
            self.take_down(endpoint, str(fault))
        else:
            asyncio.get_running_loop().call_at(
                asyncio.get_running_loop().time() + max(0.0, endpoint.backoff_until - now) + 0.01,
                self.changed.notify)

    def take_down(self, endpoint: Endpoint, reason: str) -> None:
        """Mark an endpoint down and hand its in-flight items to the others at once."""
        if endpoint.health in (Health.DOWN, Health.GONE):
            return
        endpoint.went_down(reason, time.monotonic())
        self.progress.note(f"{endpoint.name} is down ({reason}); probing it in the background")
        self.cancel_inflight(endpoint)

    def retire(self, endpoint: Endpoint, reason: str) -> None:
        """Take an endpoint out of the run for good."""
        if endpoint.gone:
            return
        endpoint.taken_out(reason)
        self.gone_out(endpoint, reason)

    def gone_out(self, endpoint: Endpoint, reason: str) -> None:
        """Say an endpoint was taken out, and hand its in-flight items to the others."""
        self.progress.note(f"{endpoint.name} taken out: {reason}")
        self.cancel_inflight(endpoint)

    def cancel_inflight(self, endpoint: Endpoint) -> None:
        """Cancel the endpoint's requests in flight: each puts its row back in the queue."""
        for item in list(endpoint.inflight):
            task = item.tasks.get(endpoint)
            if task is not None:
                task.cancel()       # its CancelledError handler re-queues the item
        self.changed.notify()

    async def supervise(self, endpoint: Endpoint) -> None:
        """Bring an endpoint into service, and back after trouble, probing with growing pauses.

        The pause doubles after each failed probe and after each rejoin that ends
        down again without a single good answer (a server whose runner is broken
        answers probes but fails every request), and resets on a good answer.
        """
        while not self.over.is_set() and not endpoint.gone:
            if endpoint.usable:
                endpoint.trouble.clear()
                await endpoint.trouble.wait()
                continue
            if endpoint.health is Health.DOWN:
                await self.pause_before_probe(endpoint)
                if self.over.is_set():
                    return
            try:
                await self.bring_up(endpoint)
            except (EndpointGone, EndpointFault) as exc:
                if isinstance(exc, LoadFailed) and endpoint.detail != str(exc):
                    self.progress.note(f"{endpoint.name} {exc}; trying again in the background")
                endpoint.probe_failed(exc, time.monotonic())
                if endpoint.gone:
                    self.gone_out(endpoint, str(exc))
                    return
                if endpoint.health is Health.PENDING:
                    await self.pause_before_probe(endpoint)
                continue
            if endpoint.down_since is not None:
                self.progress.note(f"{endpoint.name} is back after "
                                   f"{format_duration(time.monotonic() - endpoint.down_since)}")
            endpoint.came_up()
            endpoint.limiter.restart(time.monotonic())
            self.changed.notify()

    async def pause_before_probe(self, endpoint: Endpoint) -> None:
        """Wait the endpoint's probe pause (give or take a fifth, so a fleet's probes spread), or until the run ends."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(endpoint.probe_pause * random.uniform(0.8, 1.2)):
                await self.over.wait()

    async def bring_up(self, endpoint: Endpoint) -> None:
        """Check (first time) or probe (after trouble) an endpoint, then load its model.

        Loading again after trouble is cheap when the model is still loaded, and
        catches a server that answers probes but can no longer load it.
        """
        if endpoint.starting is not None:          # preflight's check-and-load, still under way
            starting, endpoint.starting = endpoint.starting, None
            await starting
            self.check_digest(endpoint)
            return
        if not endpoint.checked:
            await check_endpoint(endpoint, self.config)
            self.check_digest(endpoint)
        else:
            async with deadline(PROBE_TIMEOUT, "probe"):
                await fetch_json(endpoint, "/" if endpoint.api == Api.OLLAMA else "/v1/models", PROBE_TIMEOUT)
        if endpoint.api == Api.OLLAMA:
            endpoint.loading()
            self.changed.notify()
            await load_model(endpoint, self.config)

    def check_digest(self, endpoint: Endpoint) -> None:
        """Retire a late-joining endpoint whose model build differs from the fleet's."""
        if self.config.allow_mixed_models or not endpoint.digest:
            return
        if other := build_clash(endpoint, self.endpoints):
            raise EndpointGone(f"{endpoint.model} here is build {endpoint.digest[:12]}, but "
                               f"{other.name} has {other.digest[:12]} (--allow-mixed-models to accept)")
        self.meta["endpoints"][endpoint.name] = endpoint.sidecar_entry()
        self.checkpoint.save_meta(self.meta)


# ── Run ───────────────────────────────────────────────────────────────────────────
# The core loop: read rows, dispatch them, write their records, watch the clock.


QUEUE_SIZE = 256            # bounded hand-off between the reader and the workers


class Drivers:
    """When each endpoint's driver wakes up.

    Each driver sleeps on its own event. A rare change (an endpoint up or down, a row back in the
    queue, the input or the run over) wakes them all; a new row wakes one idle driver, so the cost
    of a completion does not grow with the fleet.
    """

    def __init__(self, endpoints: list[Endpoint]) -> None:
        self.wakes = {endpoint: asyncio.Event() for endpoint in endpoints}
        self.idle: dict[Endpoint, None] = {}    # drivers asleep with room and nothing worth taking

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

    def rest(self, endpoint: Endpoint) -> None:
        """Note an endpoint whose driver sleeps with room for work: a new row wakes it."""
        if endpoint.can_take(time.monotonic()) and len(endpoint.inflight) < endpoint.limiter.limit:
            self.idle[endpoint] = None


class Run:
    """Move items from the reader through the fleet into the checkpoint."""

    def __init__(self, config: Config, endpoints: list[Endpoint], checkpoint: Checkpoint, hashes: HashIndex,
                 meta: dict[str, Any], reader: Reader, preloaded: list[Item], tally: Tally,
                 progress: Progress) -> None:
        self.config, self.endpoints, self.checkpoint, self.hashes = config, endpoints, checkpoint, hashes
        self.reader, self.preloaded, self.tally, self.progress = reader, preloaded, tally, progress
        self.drivers = Drivers(endpoints)
        self.changed = Wakeup(also=self.drivers.wake_all)
        self.written = Wakeup()                  # a row was written (the producer waits for duplicates' leaders)
        self.backlog = Backlog(endpoints, config.hedge, self.drivers.wake_faster)
        self.fleet = Fleet(endpoints, config, meta, checkpoint, progress, self.changed)
        self.leaders: dict[int, Item] = {}       # text hash → item whose answer duplicates await
        self.waiting_followers = self.unfinished = 0
        self.tg: asyncio.TaskGroup | None = None

    @property
    def finished(self) -> bool:
        return self.backlog.closed and self.unfinished == 0

    def check_finished(self) -> None:
        """Wake whoever waits for a write; when the last item is written, tell every task to end."""
        self.written.notify()
        if self.finished:
            self.fleet.end()
            self.changed.notify()

    async def run(self) -> None:
        """Score until the input is exhausted and every taken item is written."""
        async with asyncio.TaskGroup() as tg:
            self.tg = tg
            tg.create_task(self.produce())
            tg.create_task(self.watch())
            for endpoint in self.endpoints:
                self.fleet.supervisors.append(tg.create_task(self.fleet.supervise(endpoint)))
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
                    chunk.count_skips(self.tally)
                if not chunk:
                    break
                for item in chunk:
                    if limit is not None and self.tally.taken >= limit:
                        break
                    await self.admit(item)
                chunk = []
        finally:
            self.backlog.closed = True
            self.changed.notify()           # the end-of-input rules apply from now on
            self.check_finished()

    async def admit(self, item: Item) -> None:
        """Take one row the checkpoint has not finished: record it, fan it out, or queue it."""
        self.tally.taken += 1
        self.unfinished += 1
        if item.problem:
            kind, message = item.problem
            self.write(item, error_record(item, kind, message, self.config.model))
            return
        if item.text_hash:
            leader = self.leaders.get(item.text_hash)
            if leader is not None:
                leader.followers = leader.followers or []
                leader.followers.append(item)
                self.waiting_followers += 1
                while self.waiting_followers > 4 * QUEUE_SIZE and not leader.finished:
                    await self.written.wait()
                return
            offset = self.hashes.get(item.text_hash)
            if offset is not None:
                original = self.checkpoint.read_at(offset)
                self.write(item, duplicate_record(item, original))
                return
            self.leaders[item.text_hash] = item
        while len(self.backlog.fresh) >= QUEUE_SIZE:
            await self.backlog.space.wait()
        self.backlog.fresh.append(item)
        self.drivers.wake_idle()

    # ── the workers

    async def drive(self, endpoint: Endpoint) -> None:
        """Keep the endpoint's in-flight count at its limit while there is work."""
        wake = self.drivers.wakes[endpoint]
        while not self.finished and not endpoint.gone:
            wake.clear()
            item = self.backlog.take(endpoint, time.monotonic())
            if item is not None:
                item.tasks[endpoint] = self.tg.create_task(self.work(endpoint, item))
                self.launch(endpoint, item)
                continue
            self.drivers.rest(endpoint)
            if self.backlog.waiting and not self.backlog.closed and endpoint not in self.drivers.idle:
                self.drivers.wake_idle()            # it was woken for a row it cannot take: pass it on
            await wake.wait()

    def launch(self, endpoint: Endpoint, item: Item) -> None:
        """Count a row as started here (a race, if it is the raced copy); if it is one of the last, wake idle
        endpoints fast enough to race it."""
        self.drivers.idle.pop(endpoint, None)
        endpoint.inflight[item] = time.monotonic()
        if item.racer is endpoint and any(other is not endpoint for other in item.tasks):
            self.tally.hedges += 1
        if self.backlog.closed and self.config.hedge and self.drivers.idle:
            self.drivers.wake_faster(endpoint.limiter.service or math.inf, HEDGE_RATIO)

    def free_slot(self, endpoint: Endpoint, item: Item) -> None:
        """Forget an item's request on an endpoint: the slot is free again."""
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
                self.free_slot(endpoint, item)
                # Cancelled because its endpoint went down: a real re-send; otherwise the run is stopping.
                self.requeue(item, resent=endpoint.health in (Health.DOWN, Health.GONE))
                raise
            except (EndpointFault, ItemFault, ContextOverflow, EndpointGone) as exc:
                outcome = exc
            self.free_slot(endpoint, item)
            self.settle(endpoint, item, outcome, started)
            item = None if self.finished else self.backlog.take(endpoint, time.monotonic())
            self.carry_on(endpoint, item)

    def carry_on(self, endpoint: Endpoint, item: Item | None) -> None:
        """After a completion: wake the endpoint's driver if it has room left, or let racers look."""
        if item is None:
            self.drivers.rest(endpoint)
            return
        self.launch(endpoint, item)
        if len(endpoint.inflight) < endpoint.limiter.limit and self.backlog.waiting:
            self.drivers.wakes[endpoint].set()      # the limit went up

    def requeue(self, item: Item, *, front: bool = True, resent: bool = True) -> None:
        """Put an unfinished item back for any endpoint, unless a copy is still running."""
        if not (item.finished or item.tasks):
            if resent:
                self.tally.requeued += 1
            else:
                self.tally.cancelled += 1
            (self.backlog.retry.appendleft if front else self.backlog.retry.append)(item)
        self.changed.notify()       # either way a slot is free: a row left to this endpoint may be waiting

    # ── outcomes: the rules decide, the run carries it out

    def settle(self, endpoint: Endpoint, item: Item, outcome: Answer | Exception, started: float) -> None:
        """Carry out what an outcome means for the item and for the endpoint."""
        now = time.monotonic()
        if isinstance(outcome, Answer):
            self.settle_answer(endpoint, item, outcome, started, now)
        elif isinstance(outcome, ItemFault) or (isinstance(outcome, EndpointFault) and outcome.unusable):
            self.settle_unusable(endpoint, item, outcome, started, now)
        elif isinstance(outcome, EndpointFault):
            self.settle_fault(endpoint, item, outcome, started, now)
        elif isinstance(outcome, ContextOverflow):
            self.settle_overflow(endpoint, item, outcome, started, now)
        elif isinstance(outcome, EndpointGone):
            self.settle_gone(endpoint, item, outcome)

    def settle_answer(self, endpoint: Endpoint, item: Item, answer: Answer, started: float, now: float) -> None:
        """Count a usable answer, and write the row's record unless a raced copy already did."""
        self.fleet.answered(endpoint, not item.answered_badly_by(endpoint.name), started, now)
        if not item.finished:
            if item.racer is endpoint and item.tasks:
                self.tally.hedges_won += 1
            self.write(item, success_record(item, endpoint, answer))
            endpoint.count_answer(answer)

    def settle_unusable(self, endpoint: Endpoint, item: Item, outcome: Exception, started: float, now: float) -> None:
        """Judge an unusable answer: charge the row, or send it to another endpoint."""
        again = item.answered_badly_by(endpoint.name)
        verdict = self.fleet.judge_answer(endpoint, outcome, again, started, now)
        item.avoid = (item.avoid or set()) | {endpoint.name}
        if verdict.act is Act.CHARGE:
            self.charge(endpoint, item, verdict.message, verdict.kind)
            return
        endpoint.errors += 1
        self.requeue(item, front=False)

    def settle_fault(self, endpoint: Endpoint, item: Item, fault: EndpointFault, started: float, now: float) -> None:
        """Charge a row that keeps breaking servers; otherwise count the fault on the endpoint and resend the row."""
        if blames_row(fault, endpoint.proven, item.faults, endpoint.answers):
            item.faults += 1
            item.fault_endpoints = (item.fault_endpoints or set()) | {endpoint.name}
        # On an endpoint that often fails a request (not counting this row's faults), a row meets faults by chance.
        chance = endpoint.fault_run_limit(endpoint.fault_share(excluding=item.faults, prior=0.0))
        verdict = judge_fault(fault, item.faults, len(item.fault_endpoints or ()), chance, self.fleet.live())
        if verdict.act is Act.CHARGE:
            self.charge(endpoint, item, verdict.message, verdict.kind)
            return
        self.fleet.note_fault(endpoint, fault, started, now)
        self.requeue(item)

    def settle_overflow(self, endpoint: Endpoint, item: Item, overflow: ContextOverflow, started: float,
                        now: float) -> None:
        """Give up on a prompt that cannot fit, charge the row, or resend it with less code."""
        if not overflow.hopeless:
            self.fleet.note_overflow(endpoint, overflow, started, now)
            item.shrinks += 1
        verdict = judge_overflow(overflow, item.shrinks)
        if verdict.act is Act.WRITE and not item.finished:
            self.write(item, error_record(item, verdict.kind, verdict.message, endpoint.model, endpoint.name))
        elif verdict.act is Act.CHARGE:
            self.charge(endpoint, item, verdict.message, verdict.kind)
        elif verdict.act is Act.SHRINK:
            chars = min(len(item.text or ""), code_budget(endpoint, self.config.prompt, item))
            item.max_chars = cut_to(chars, overflow)
            self.requeue(item)

    def settle_gone(self, endpoint: Endpoint, item: Item, gone: EndpointGone) -> None:
        """Take out an endpoint that refused for good, and resend its row."""
        self.fleet.retire(endpoint, str(gone))
        self.requeue(item)

    def charge(self, endpoint: Endpoint, item: Item, message: str, kind: ErrorKind) -> None:
        """Spend one of the item's attempts; write an error record when none are left."""
        if item.finished:
            return
        item.attempts += 1
        endpoint.errors += 1
        if item.tasks:              # a raced copy is still running: let it decide
            return
        verdict = judge_attempts(item.attempts, self.config.max_attempts, kind, f"{endpoint.name}: {message}")
        if verdict.act is Act.WRITE:
            self.write(item, error_record(item, verdict.kind, verdict.message, endpoint.model, endpoint.name))
        else:
            item.avoid = (item.avoid or set()) | {endpoint.name}
            self.requeue(item, front=False)

    # ── writing

    def write(self, item: Item, record: dict[str, Any]) -> None:
        """Append the item's record, fan it out to duplicates, and cancel raced copies."""
        item.finished = True
        for task in list(item.tasks.values()):
            task.cancel()
        offset = self.checkpoint.append(record)
        self.count(record)
        self.unfinished -= 1
        if item.text_hash:
            if self.leaders.get(item.text_hash) is item:
                del self.leaders[item.text_hash]
            if record["score"] is not None:
                self.hashes.add(item.text_hash, offset)
        followers, item.followers = item.followers or [], None
        self.waiting_followers -= len(followers)
        for follower in followers:
            follower.finished = True
            self.checkpoint.append(duplicate_record(follower, record))
            self.count(record, duplicate=True)
            self.unfinished -= 1
        self.check_finished()

    def count(self, record: dict[str, Any], duplicate: bool = False) -> None:
        """Count a written record in the tally and on the progress bar."""
        if record["score"] is not None:
            self.tally.scored += 1
            self.tally.duplicates += duplicate or record.get("duplicate_of") is not None
            self.tally.truncated += bool(record.get("truncated"))
        else:
            self.tally.errors[record["error_kind"]] += 1
        self.progress.advance()

    async def watch(self) -> None:
        """Refresh the display, fsync, and end the run if it cannot go on."""
        while not self.finished:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.fleet.over.wait()
            await self.checkpoint.sync_soon()
            if self.backlog.closed or self.backlog.waiting:
                self.drivers.wake_idle(every=True)     # estimates move with time: stalls, overdue copies to race
            self.fleet.stop_or_pause(time.monotonic())
            self.progress.show(self.endpoints, paused=self.fleet.all_down_since is not None)


# ── Live view and summary ─────────────────────────────────────────────────────────
# The progress line, the preflight table and the end-of-run summary.


HANDFUL = 4                 # up to this many endpoints, the progress line names each; beyond, it summarises
MIN_BAR = 10                # the progress bar keeps at least this many columns
BAR_FORMAT = "{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"   # the rate is in the status
RATE_WINDOW = 30.0          # seconds over which the progress line's items/s is measured
LOG_STATUS = 160            # characters of fleet status in the once-a-minute log line


def attention(endpoints: list[Endpoint], erring: set[str], now: float) -> list[str]:
    """Name the endpoints a user should look at, grouped: out of service, failing, stuck on a request."""
    groups: dict[str, list[str]] = {"down": [], "out": [], "errors": [], "slow": []}
    for e in endpoints:
        if e.health in (Health.DOWN, Health.PENDING):
            groups["down"].append(e.name)
        elif e.gone:
            groups["out"].append(e.name)
        elif e.health is Health.BACKOFF or e.name in erring:
            groups["errors"].append(e.name)
        elif e.inflight and overdue(lane_of(e), now):
            groups["slow"].append(e.name)
    return [f"{kind}: {name}" if i == 0 else name
            for kind, names in groups.items() for i, name in enumerate(names)]


def fleet_status(endpoints: list[Endpoint], erring: set[str], budget: int) -> str:
    """Summarise the fleet in at most `budget` characters: counts, slots in use, and who needs attention."""
    now = time.monotonic()
    counts = Counter("down" if e.health in (Health.DOWN, Health.PENDING) else "out" if e.gone
                     else "loading" if e.health is Health.WARMING else "busy" if e.inflight else "idle"
                     for e in endpoints)
    live = [e for e in endpoints if e.usable]
    parts = [", ".join(f"{counts[k]} {k}" for k in ("busy", "idle", "loading", "down", "out") if counts[k]),
             f"{sum(len(e.inflight) for e in live)}/{sum(e.limiter.limit for e in live)} slots"]
    names = attention(endpoints, erring, now)
    for keep in range(len(parts), 0, -1):       # names matter more than the slots
        head = " · ".join(parts[:keep])
        listed = clip(names, budget - len(head) - 3, sep=" ")
        if not names or (listed and not listed.startswith("+")):
            break
    else:                                       # not one name fits: a bare "+N" would only repeat the counts
        head, listed = " · ".join(parts), ""
    return (head + " | " + listed if listed else head)[:budget]


class Bar(tqdm):
    """A tqdm bar whose ETA follows the recent rate, so it shows "?" rather than freezing while nothing completes."""

    recent_rate: float | None = None

    @property
    def format_dict(self) -> dict[str, Any]:
        found = super().format_dict
        if self.recent_rate is not None:
            found["rate"] = self.recent_rate
        return found


class Progress:
    """The live view: a tqdm bar on a terminal, a status line a minute in a log."""

    def __init__(self, enabled: bool, total: int | None, initial: int) -> None:
        self.tty = sys.stderr.isatty()
        self.enabled = enabled
        self.bar = Bar(total=total, initial=initial, unit="fn", file=sys.stderr, dynamic_ncols=True,
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
        grow = 8 if "<?]" in meter else 3       # room for the ETA to grow before the next refresh ("?" → 12:34:56)
        return columns - len(meter) - len(", ") - MIN_BAR - grow

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
        """Say what the fleet is doing: a pause first, the recent rate, then each endpoint for a handful,
        else counts and who needs attention."""
        rate = self.rate(now)
        if paused:
            rate = 0.0                      # nothing can complete: the window's older completions are history
        self.bar.recent_rate = rate
        head = ("PAUSED: all endpoints down | " if paused else "") + (
            format_rate(rate) + " | " if rate is not None else "")
        if len(head) > budget:
            return head[:budget].rstrip(" |")
        budget -= len(head)
        if len(endpoints) <= HANDFUL:
            text = " | ".join(e.label() for e in endpoints)
            if len(text) <= budget:
                return head + text
        return (head + fleet_status(endpoints, self.erring(endpoints, now), budget)).rstrip(" |")

    def show(self, endpoints: list[Endpoint], paused: bool) -> None:
        """Refresh the fleet's state on the bar; log a status line a minute in non-interactive runs."""
        now = time.monotonic()
        if self.tty and self.enabled:
            self.bar.set_postfix_str(self.status(endpoints, paused, self.width(), now))   # a pause must show
        if self.enabled and not self.tty and now - self.logged >= 60:
            self.logged = now
            written = self.count - self.initial
            rate = written / max(1e-9, now - self.started)
            left = f", ETA {format_duration(((self.total or 0) - self.count) / rate)}" if rate and self.total else ""
            of = f"/{self.total:,}" if self.total else ""         # the status says the recent rate
            self.note(f"{self.count:,}{of} done{left} | {self.status(endpoints, paused, LOG_STATUS, now)}")

    def close(self) -> None:
        self.bar.close()


def preflight_status(e: Endpoint) -> str:
    """Say whether an endpoint is ready, and if not, why."""
    if e.gone:
        return f"left out: {e.detail}"
    if e.load_error:
        return e.load_error
    if not e.checked:
        return f"not answering: {e.detail or 'no complete answer yet'} (will keep trying)"
    if e.health is Health.WARMING:
        return "loading the model (continues in the background)"
    if e.health is Health.DOWN:
        return f"down: {e.detail} (will keep trying)"
    return "ok"


def squeeze(rows: list[list[str]], cuttable: tuple[int, ...], limit: int, floor: int = 12) -> list[list[str]]:
    """Cut the widest of the `cuttable` columns in the middle until the table fits `limit` columns."""
    rows = [list(r) for r in rows]
    while True:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        over = sum(widths) + 2 * (len(widths) - 1) - limit
        wide = max(cuttable, key=lambda i: widths[i])
        if over <= 0 or widths[wide] <= floor:
            return rows
        second = max((widths[i] for i in cuttable if i != wide), default=0)
        width = max(floor, widths[wide] - over, min(widths[wide] - 1, second))
        for r in rows[1:]:
            r[wide] = short_name(r[wide], width)


def preflight_table(endpoints: list[Endpoint]) -> str:
    """Show each endpoint's server, model build and readiness within REPORT_WIDTH columns.

    A long status goes on an indented line of its own; a large fleet lists the
    endpoints that are not ok, and counts the ok ones by server and build.
    """
    status = {e: preflight_status(e) for e in endpoints}
    listed = endpoints if len(endpoints) <= FLEET_ROWS else [e for e in endpoints if status[e] != "ok"]
    rows = [["endpoint", "url", "server", "model", "build"]]      # the server names the API too
    rows += [[e.name, e.url.removeprefix("http://"), e.server or (e.api if e.api != Api.AUTO else "-"), e.model,
              (e.digest or "-")[:12]] for e in listed]
    rows = squeeze(rows, (1, 3, 0, 2), REPORT_WIDTH - len("  status"))
    prefix = len(text_table(rows).splitlines()[0]) if listed else 0
    wide = [i for i, e in enumerate(listed, 1) if prefix + 2 + len(status[e]) > REPORT_WIDTH]
    for i, e in enumerate(listed, 1):
        rows[i].append("" if i in wide else status[e])
    rows[0].append("status")
    lines = text_table(rows).splitlines() if listed else []
    for i in reversed(wide):
        lines.insert(i + 1, textwrap.fill(status[listed[i - 1]], REPORT_WIDTH, initial_indent="    ",
                                          subsequent_indent="    "))
    ok = Counter((e.server or "-", e.model, (e.digest or "-")[:12]) for e in endpoints if e not in listed)
    lines += [f"{n} ok: {server}, {model} {build}" for (server, model, build), n in ok.most_common()]
    return "\n".join(lines)


def waiting_lines(endpoints: list[Endpoint], default: str) -> str:
    """List endpoints that do not answer yet, each on its own line; those failing alike together."""
    groups: dict[str, list[Endpoint]] = {}
    for e in endpoints:
        groups.setdefault(e.detail or default, []).append(e)
    lines = []
    for detail, group in groups.items():
        if len(group) == 1 or len(endpoints) <= FLEET_ROWS:
            lines += [textwrap.fill(f"{e.name} ({e.url}): {detail}", REPORT_WIDTH, initial_indent="  ",
                                    subsequent_indent="      ") for e in group]
        else:
            lines.append(textwrap.fill(f"{len(group)} endpoints: {detail}", REPORT_WIDTH, initial_indent="  ",
                                       subsequent_indent="      "))
            lines.append("      " + clip([e.name for e in group], REPORT_WIDTH - 6))
    return "\n".join(lines)


def notable(names: list[str], flags: list[tuple[Callable[[str], float], int]]) -> list[str]:
    """Keep up to FLEET_ROWS - 1 names, the ones the flags mark, in the flags' order of concern.

    Each flag weighs every name (0 = nothing to see) and contributes at most its
    cap of the heaviest, so a large fleet shows what needs attention and folds the rest.
    """
    if len(names) <= FLEET_ROWS:
        return names
    picked: dict[str, None] = {}
    for flag, cap in flags:
        weighed = sorted(((flag(n), n) for n in names), key=lambda wn: -wn[0])
        for weight, name in weighed[:cap]:
            if weight > 0 and len(picked) < FLEET_ROWS - 1:
                picked.setdefault(name)
    return [n for n in names if n in picked]


def endpoint_row(label: str, state: str, group: list[Endpoint], elapsed: float, total: int) -> list[str]:
    """One summary row for an endpoint, or for several taken together."""
    scored = sum(e.scored for e in group)
    tokens = sum(e.output_tokens for e in group)
    limits = sorted(e.limiter.limit for e in group)
    limit = str(limits[0]) if limits[0] == limits[-1] else f"{limits[0]}-{limits[-1]}"
    service = [e.limiter.service for e in group if e.limiter.service is not None]
    return [label, state[:13], f"{scored:,}", f"{100 * scored / total:.1f}%", figure(scored / max(elapsed, 1e-9)),
            figure(statistics.median(service), "s") if service else "-",
            figure(tokens / max(elapsed, 1e-9)) if tokens else "-", str(sum(e.errors for e in group)),
            str(sum(e.fault_count for e in group)),
            limit + (" auto" if len(group) == 1 and group[0].limiter.auto else "")]


def endpoint_rows(run: Run, elapsed: float) -> list[list[str]]:
    """One summary row per endpoint, or the notable ones plus an aggregate "others" row."""
    rate = {e.name: e.scored / max(elapsed, 1e-9) for e in run.endpoints}
    by_name = {e.name: e for e in run.endpoints}
    typical = statistics.median(rate.values()) if rate else 0.0
    shown = notable(list(by_name), [
        (lambda n: by_name[n].health not in (Health.READY, Health.WARMING), FLEET_ROWS),
        (lambda n: by_name[n].errors + by_name[n].fault_count, 3),
        (lambda n: (rate[n] < typical / 2) / (1e-9 + rate[n]), 3)])
    total = sum(e.scored for e in run.endpoints) or 1
    rows = [["endpoint", "state", "items", "share", "items/s", "service", "tok/s", "errors", "faults", "limit"]]
    rows += [endpoint_row(n, by_name[n].status, [by_name[n]], elapsed, total) for n in shown]
    rest = [e for e in run.endpoints if e.name not in shown]
    if rest:
        state = "ok" if all(e.health is Health.READY for e in rest) else "mixed"
        rows.append(endpoint_row(f"{len(rest)} others", state, rest, elapsed, total))
    return cut_names(rows)


def stop_line(run: Run) -> str:
    """After an interrupt or early stop, say how much of the input is still to do."""
    t = run.tally
    written = t.taken - run.unfinished
    left = None
    if run.progress.total is not None:
        left = max(0, run.progress.total - run.progress.count)
        if run.config.limit is not None:
            left = min(left, run.config.limit - written)
    cancelled = f"{plural(t.cancelled, 'row')} in flight cancelled (not written)"
    if left is None:
        return f"Stopped before the end: {cancelled}; the rest of the input was never attempted. --resume continues."
    never = max(0, left - t.cancelled)
    return (f"Stopped before the end: {cancelled}, {plural(never, 'row')} never attempted. "
            f"--resume continues with them.")


def answer_line(run: Run) -> str:
    """Say how many tokens an answer cost and how many rows got an expected score."""
    answered = sum(e.scored for e in run.endpoints)
    if not answered:
        return ""
    tokens = sum(e.output_tokens for e in run.endpoints)
    expected = sum(e.expected for e in run.endpoints)
    without = [e.name for e in run.endpoints if e.scored and not e.expected]
    return (f"Generated {tokens / answered:.1f} tokens per answer (--reason {run.config.reason}); "
            f"{expected:,} of {answered:,} answers carry score_expected"
            + (f" (no token probabilities from {name_list(without)})" if without else "") + ".")


def summary(run: Run, elapsed: float) -> str:
    """Render the end-of-run report: totals, what is missing and why, and per-endpoint figures."""
    t = run.tally
    lines = [f"Scored {plural(t.scored, 'row')} in {format_duration(elapsed)} ({t.scored / max(elapsed, 1e-9):.2f}/s)"
             + (f"; {t.duplicates:,} {'was a duplicate' if t.duplicates == 1 else 'were duplicates'} (scored once)"
                if t.duplicates else "")
             + (f"; {t.truncated:,} truncated to fit the context" if t.truncated else "") + "."]
    if line := answer_line(run):
        lines.append(line)
    if t.skipped:
        lines.append(f"Already finished before this run: {plural(t.skipped, 'row')}.")
    if not run.finished:
        lines.append(stop_line(run))
    if t.requeued:
        lines.append(f"Re-sent {plural(t.requeued, 'request')} after endpoint trouble or a bad answer.")
    if t.hedges:
        lines.append(f"Raced {plural(t.hedges, 'slow tail request')} on faster endpoints; {t.hedges_won} won.")
    missing = dict(t.errors)
    if t.skipped_permanent:
        missing["earlier permanent error" if t.skipped_permanent == 1 else "earlier permanent errors"] = \
            t.skipped_permanent
    if missing:
        parts = ", ".join(f"{n:,} {k}" for k, n in sorted(missing.items()))
        retry = sum(n for k, n in t.errors.items() if k not in PERMANENT_ERRORS)
        lines.append(f"Rows without a score: {parts}." + (
            f" --resume retries the {retry:,} that are not permanent." if retry else ""))
    gone = [e for e in run.endpoints if e.gone]
    lines += [f"{e.name} was taken out: {e.detail}" for e in gone[:5]]
    if len(gone) > 5:
        lines.append(f"{len(gone) - 5} more endpoints were taken out; the log above says why.")
    for message in t.unreadable:
        lines.append(f"Input not read to the end: {message}.")
    lines.append(text_table(endpoint_rows(run, elapsed), right={2, 3, 4, 5, 6, 7, 8}))
    return fit(lines)


def exit_code(tally: Tally) -> int:
    """0 if every row taken has a score and the whole input was read, else 1."""
    return EXIT_INCOMPLETE if tally.errors or tally.skipped_permanent or tally.unreadable else EXIT_OK


# ── Reports and export ────────────────────────────────────────────────────────────
# The text and HTML reports and the Parquet export, read back from the checkpoint.


DISAGREE_POINTS = 0.5       # an endpoint whose mean score differs from the rest's by more than this
DISAGREE_MIN_ITEMS = 50     # on at least this many items on each side
DISAGREE_ALPHA = 0.01       # and beyond chance (family-wise, across the fleet) gets a warning
GAP_SECONDS = 120.0         # no answer from any endpoint for this long (and 20× the usual pace) is a gap
EXPORT_COLUMNS = ("score", "score_expected", "reason", "model", "endpoint", "error")
NUMERIC_COLUMNS = {"score": pa.int64(), "score_expected": pa.float64()}
CURVE_COLORS = ["#3b6ea8", "#d9822b", "#3a9a5b", "#a83b6e", "#7b5ea8", "#8c6d31",
                "#17a2b8", "#9a9a1f", "#d4589f", "#1f3f6e", "#c0392b", "#2e7d32"]
OTHERS_COLOR = "#777777"


@dataclass(slots=True)
class Moments:
    """Count, mean and spread of a stream of numbers, kept in three floats."""

    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, value: float, times: int = 1) -> None:
        """Count value `times` times."""
        self.n += times
        self.total += value * times
        self.squares += value * value * times

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.n + other.n, self.total + other.total, self.squares + other.squares)

    def __sub__(self, other: Moments) -> Moments:
        return Moments(self.n - other.n, self.total - other.total, self.squares - other.squares)

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")

    @property
    def variance(self) -> float:
        """The sample variance (0 below two values)."""
        if self.n < 2:
            return 0.0
        return max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))


def moments(counts: Counter) -> Moments:
    """Summarize a score histogram."""
    result = Moments()
    for score, n in counts.items():
        result.add(score, n)
    return result


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
    foreign: ForeignLines = field(default_factory=ForeignLines)
    expected: dict[str, Moments] = field(default_factory=dict)  # endpoint -> moments of score_expected
    expected_histogram: Counter = field(default_factory=Counter)  # score_expected rounded to the nearest score
    expected_rows: int = 0
    token_rows: int = 0             # answers that report output_tokens, and their sum
    tokens: int = 0


def iter_records(path: Path, foreign: ForeignLines | None = None) -> Iterator[dict[str, Any]]:
    """Yield each record score.py could have written, counting torn or foreign lines in `foreign`."""
    foreign = foreign if foreign is not None else ForeignLines()
    with open(path, "rb", buffering=1 << 20) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if valid_record(record):
                yield clean_details(record)
            else:
                foreign.add(number)


def add_answer_stats(stats: Stats, endpoint: str, record: dict[str, Any]) -> None:
    """Count a scored record's expected score and generated tokens (clean_details nulled odd ones)."""
    expected = record.get("score_expected")
    if expected is not None:
        stats.expected.setdefault(endpoint, Moments()).add(float(expected))
        stats.expected_histogram[min(10, max(1, math.floor(expected + 0.5)))] += 1
        stats.expected_rows += 1
    tokens = record.get("output_tokens")
    if tokens is not None:
        stats.token_rows += 1
        stats.tokens += tokens


def add_scored(stats: Stats, record: dict[str, Any]) -> None:
    """Count a final scored record in the histograms, per endpoint and on the timeline."""
    score = record["score"]
    stats.rows_scored += 1
    stats.histogram[score] += 1
    stats.truncated += bool(record.get("truncated"))
    if record.get("duplicate_of") is not None:
        stats.duplicates += 1
        return                        # a copied verdict says nothing about its endpoint
    endpoint = record.get("endpoint") or "?"
    stats.per_endpoint.setdefault(endpoint, Counter())[score] += 1
    add_answer_stats(stats, endpoint, record)
    ts = record.get("ts")
    if ts is not None:
        stats.timeline.setdefault(endpoint, array("d")).append(ts)
        stats.first_ts = ts if stats.first_ts is None else min(stats.first_ts, ts)
        stats.last_ts = ts if stats.last_ts is None else max(stats.last_ts, ts)


def recount_final(path: Path, finals: FinalRecords, stats: Stats) -> Stats:
    """Count the scored records again, each id key's final one only (an id was scored twice)."""
    wanted = finals.positions()
    wanted = to_array(wanted.take(pc.sort_indices(wanted)))
    fresh = Stats(errors=stats.errors, foreign=stats.foreign)
    taken = 0
    for position, record in enumerate(iter_records(path)):
        if taken == len(wanted):
            break                     # records appended since the first pass are not in its count
        if position == wanted[taken]:
            taken += 1
            if record["score"] is not None:
                add_scored(fresh, record)
    return fresh


def read_stats(path: Path) -> Stats:
    """Stream a checkpoint: score histograms (overall, per endpoint), errors, and timing, each id
    key counted by its final record (FinalRecords' rule)."""
    stats = Stats()
    finals, kinds, repeated_keys = FinalRecords(positions=True), {}, array("q")
    for position, record in enumerate(iter_records(path, stats.foreign)):
        score, kind = record["score"], record.get("error_kind")
        if not finals.add(record_key(record["id"], kind), score, kind, position):
            # a later row's note says nothing of the id's own row; it names the row's line, so
            # equal notes are one row noted again by a later run
            repeated_keys.append(id_key(str(record.get("error"))))
        elif score is None:
            kinds[position] = kind
        else:
            add_scored(stats, record)
    scored, errors = finals.finish()
    stats.errors = Counter(kinds[position] for position in errors.values())
    if repeated_keys:
        stats.errors[ErrorKind.DUPLICATE_ID] = len(pc.unique(arrow_int64(repeated_keys)))
    if len(scored) < stats.rows_scored:
        stats = recount_final(path, finals, stats)
    return stats


def separation(one: Moments, other: Moments) -> tuple[float, float]:
    """The gap between two groups' means and its size in standard errors (Welch)."""
    gap = one.mean - other.mean
    error = math.sqrt(one.variance / one.n + other.variance / other.n)
    return gap, (abs(gap) / error if error else math.inf if gap else 0.0)


def outliers(groups: dict[str, Moments]) -> tuple[list[tuple[str, float, Moments, Moments]], list[str]]:
    """Find the endpoints that differ from the rest of the fleet by a real, sizable gap.

    Each endpoint with enough items is compared with all the others pooled: a gap
    of more than DISAGREE_POINTS that is also beyond chance (a two-sample z test
    at DISAGREE_ALPHA shared across the endpoints tested). The most significant
    one is set aside and the rest tested again, so one outlier cannot make its
    peers look different. Two endpoints left that still differ cannot say which
    is right: they come back as a pair.
    """
    left = {name: m for name, m in groups.items() if m.n >= DISAGREE_MIN_ITEMS}
    critical = statistics.NormalDist().inv_cdf(1 - DISAGREE_ALPHA / (2 * max(1, len(left))))
    found: list[tuple[str, float, Moments, Moments]] = []
    while len(left) >= 2:
        tested = []
        fleet = sum(left.values(), Moments())
        for name, own in left.items():
            rest = fleet - own
            gap, z = separation(own, rest)
            if abs(gap) > DISAGREE_POINTS and z > critical:
                tested.append((z, name, gap, own, rest))
        if not tested:
            break
        if len(left) == 2:
            return found, sorted(left)
        _, name, gap, own, rest = max(tested)
        found.append((name, gap, own, rest))
        del left[name]
    return found, []


def disagreements(stats: Stats) -> list[str]:
    """Warn about endpoints whose scores (integer, or expected where both have them) stand apart."""
    warnings = []
    integer = {name: moments(counts) for name, counts in stats.per_endpoint.items()}
    for label, groups in (("scores", integer), ("expected scores", stats.expected)):
        found, pair = outliers(groups)
        on = "" if groups is integer else " on expected scores"
        for name, gap, own, rest in found:
            warnings.append(f"WARNING: {name} scores {abs(gap):.2f} points {'higher' if gap > 0 else 'lower'} than "
                            f"the rest of the fleet{on} ({own.mean:.2f} on {own.n:,} items vs {rest.mean:.2f} "
                            f"on {rest.n:,}): a different model build, quantization or settings would bias the "
                            f"dataset")
        if pair:
            a, b = (groups[n] for n in pair)
            warnings.append(f"WARNING: {pair[0]} and {pair[1]} disagree on {label}: {a.mean:.2f} vs {b.mean:.2f} "
                            f"on {a.n:,} and {b.n:,} items: a different model build, quantization or settings "
                            f"on one of them would bias the dataset")
    return warnings


def find_gaps(stats: Stats) -> list[tuple[float, float]]:
    """Find stretches with no answers at all (the run stopped or every endpoint was down).

    Sorted and differenced in Arrow: as Python floats, a resumed million-row checkpoint's
    times and steps would cost ~70 MB at the end of the run."""
    chunks = [pa.Array.from_buffers(pa.float64(), len(t), [None, pa.py_buffer(t)]) for t in stats.timeline.values()]
    if sum(map(len, chunks)) < 2:
        return []
    times = pa.concat_arrays(chunks)
    times = times.take(pc.sort_indices(times))
    steps = pc.subtract(times[1:], times[:-1])
    # the exact median (of two middle steps, their mean), as statistics.median gives
    median = pc.quantile(steps, q=0.5, interpolation="midpoint")[0].as_py()
    threshold = max(GAP_SECONDS, 20 * median)
    found = pc.indices_nonzero(pc.greater(steps, threshold)).to_pylist()
    return [(times[i].as_py(), times[i + 1].as_py()) for i in found]


def clock(ts: float, span: float) -> str:
    """Label a moment for a time axis: HH:MM, with seconds for short runs and the date for long ones."""
    return time.strftime("%m-%d %H:%M" if span > 86400 else "%H:%M:%S" if span < 600 else "%H:%M", time.gmtime(ts))


def throughput_series(stats: Stats, buckets: int = 24) -> tuple[float, dict[str, list[float]]]:
    """Items/s per endpoint in up to `buckets` equal time buckets (about 20 answers or 1 s each at least).

    None for a span under 2 s: a rate over a fraction of a second says nothing.
    """
    if stats.first_ts is None or stats.last_ts is None or stats.last_ts - stats.first_ts < 2:
        return 0.0, {}
    events = sum(map(len, stats.timeline.values()))
    buckets = max(4, min(buckets, events // 20, int(stats.last_ts - stats.first_ts)))
    width = (stats.last_ts - stats.first_ts) / buckets
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


def spark(values: list[float], top: float | None = None) -> str:
    """Render a series as a one-line bar chart (scaled to top, by default its own maximum)."""
    top = top or max(values, default=0) or 1.0
    return "".join(" ▁▂▃▄▅▆▇█"[min(8, round(8 * v / top))] for v in values)


def format_mean(value: float) -> str:
    """Show a mean to two decimals, or "-" where there was nothing to average."""
    return "-" if math.isnan(value) else f"{value:.2f}"


def report_endpoints(stats: Stats) -> list[str]:
    """The endpoints a report names one by one: all of a small fleet, the notable ones of a large one."""
    names = sorted(stats.per_endpoint)
    odd, pair = outliers({n: moments(c) for n, c in stats.per_endpoint.items()})
    flagged = {name for name, *_ in odd} | set(pair)
    items = {n: sum(stats.per_endpoint[n].values()) for n in names}
    typical = statistics.median(items.values()) if items else 0
    return notable(names, [(lambda n: n in flagged, FLEET_ROWS),
                           (lambda n: (items[n] < typical / 2) / (1 + items[n]), 3)])


def tie_line(stats: Stats) -> str | None:
    """Say how many rows share the most common score, and what breaks the tie."""
    if not stats.rows_scored:
        return None
    mode, count = max(stats.histogram.items(), key=lambda kv: kv[1])
    line = f"Ties: {100 * count / stats.rows_scored:.0f}% of scored rows share the most common score ({mode})"
    if stats.expected_rows:
        return line + (f"; {plural(stats.expected_rows, 'row')} {'has' if stats.expected_rows == 1 else 'have'} "
                       f"an expected score (score_expected), which ranks rows within a tie.")
    return line + "; the records have no expected scores to rank them within a tie."


def distribution_lines(stats: Stats) -> list[str]:
    """The overall histogram, one row per score, with expected scores beside it."""
    if not stats.rows_scored:
        return ["No rows scored yet."]
    total = stats.rows_scored or 1
    top = max(stats.histogram.values(), default=0) or 1
    head = ["score", "rows", "share", "", "expected"] if stats.expected_rows else ["score", "rows", "share", ""]
    rows = [head]
    for score in range(1, 11):
        n = stats.histogram[score]
        row = [str(score), f"{n:,}", f"{100 * n / total:.1f}%", "█" * round(40 * n / top)]
        rows.append(row + [f"{stats.expected_histogram[score]:,}"] if stats.expected_rows else row)
    mean = format_mean(moments(stats.histogram).mean)
    rows.append(["mean", mean, "", ""] + ([format_mean(sum(stats.expected.values(), Moments()).mean)]
                                          if stats.expected_rows else []))
    lines = [f"Score distribution ({plural(stats.rows_scored, 'row')} scored"
             + (f", {stats.duplicates:,} as {'a duplicate' if stats.duplicates == 1 else 'duplicates'}"
                if stats.duplicates else "") + "):",
             text_table(rows, right={1, 2, 4})]
    if stats.expected_rows:
        lines.append("  (expected: rows whose score_expected rounds to that score)")
    return lines


def endpoint_lines(stats: Stats, shown: list[str]) -> list[str]:
    """One row per endpoint: items, means, and its histogram on the fleet's shared scale."""
    groups = {n: stats.per_endpoint[n] for n in shown}
    expected = {n: stats.expected.get(n, Moments()) for n in shown}
    rest = [n for n in stats.per_endpoint if n not in groups]
    if rest:
        groups[f"{len(rest)} others"] = sum((stats.per_endpoint[n] for n in rest), Counter())
        expected[f"{len(rest)} others"] = sum((stats.expected.get(n, Moments()) for n in rest), Moments())
    shares = {n: [c[s] / (sum(c.values()) or 1) for s in range(1, 11)] for n, c in groups.items()}
    top = max((max(v) for v in shares.values()), default=1.0)
    rows = [["endpoint", "items", "mean", *(["expected"] if stats.expected_rows else []), "scores 1..10"]]
    for name, counts in groups.items():
        rows.append([name, f"{sum(counts.values()):,}", format_mean(moments(counts).mean),
                     *([format_mean(expected[name].mean)] if stats.expected_rows else []),
                     "|" + spark(shares[name], top) + "|"])
    laid = text_table(cut_names(rows, REPORT_WIDTH - 2), right={1, 2, 3} if stats.expected_rows else {1, 2})
    return ["Per endpoint (histograms share one scale):", *("  " + line for line in laid.splitlines())]


def text_report(stats: Stats, tokens: bool = True) -> str:
    """The terminal report: histograms, means, ties, errors, throughput over time; within 100 columns."""
    shown = report_endpoints(stats)
    lines = distribution_lines(stats)
    lines += filter(None, [tie_line(stats)])
    if stats.token_rows and tokens:
        lines.append(f"Generated {stats.tokens / stats.token_rows:.1f} tokens per answer on average "
                     f"(output_tokens of {stats.token_rows:,} records).")
    if stats.per_endpoint:
        lines += endpoint_lines(stats, shown)
    lines += disagreements(stats)
    if stats.errors:
        lines.append("Rows without a score: " + ", ".join(f"{n:,} {k}" for k, n in sorted(stats.errors.items())))
    width, series = throughput_series(stats)
    if series:
        lines.append(f"Throughput over time ({bucket_label(width)} buckets, peak items/s):")
        rest = [n for n in series if n not in shown]
        series = {n: series[n] for n in shown if n in series} | (
            {f"{len(rest)} others": [sum(v) for v in zip(*(series[n] for n in rest))]} if rest else {})
        width = min(NAME_WIDTH, max(map(len, series)))
        for name, values in series.items():
            lines.append(f"  {short_name(name, width):<{width}} {spark(values)} {max(values):.2f}")
        for a, b in find_gaps(stats):
            lines.append(f"  no answers for {format_duration(b - a)}, {clock(a, b - a + 3600)} to "
                         f"{clock(b, b - a + 3600)} UTC (stopped, or every endpoint down)")
    return fit(lines)


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


def curve_groups(stats: Stats, names: list[str]) -> dict[str, list[str]]:
    """Lines to draw: each named endpoint, and the others together."""
    groups = {n: [n] for n in names}
    rest = [n for n in stats.timeline if n not in groups]
    if rest:
        groups[f"{len(rest)} others" if names else "fleet"] = rest
    return groups


def active_spans(stats: Stats, gaps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The stretches between gaps, in real time."""
    edges = [stats.first_ts or 0.0, *itertools.chain.from_iterable(gaps), stats.last_ts or 0.0]
    return list(zip(edges[::2], edges[1::2]))


def span_rates(times: list[float], lo: float, hi: float, buckets: int) -> list[float]:
    """Items/s in equal buckets over [lo, hi]."""
    width = (hi - lo) / buckets
    counts = [0] * buckets
    for t in times[bisect.bisect_left(times, lo):bisect.bisect_right(times, hi)]:
        counts[min(buckets - 1, int((t - lo) / width))] += 1
    return [c / width for c in counts]


def svg_legend(colors: dict[str, str], left: float, top: float, width: float) -> tuple[str, float]:
    """Lay legend entries out in rows that wrap before `width`; return the SVG and the height it takes."""
    parts, x, y = [], left, top
    for label, color in colors.items():
        text = short_name(label)
        step = 16 + 7 * len(text) + 18          # swatch, text at ~7 px a character at 11 px, spacing
        if x > left and x + step > left + width:
            x, y = left, y + 16
        parts.append(f'<rect x="{x:.0f}" y="{y - 9:.0f}" width="10" height="10" fill="{color}"/>'
                     f'<text class=legend x="{x + 14:.0f}" y="{y:.0f}" font-size="11" fill="{color}">'
                     f'<title>{html.escape(label)}</title>{html.escape(text)}</text>')
        x += step
    return "".join(parts), y - top + 16


def svg_lines(stats: Stats, names: list[str], width: int = 720, height: int = 180) -> str:
    """An inline SVG chart of items/s over time: a clock axis, and each pause drawn as a narrow gap."""
    gaps = find_gaps(stats)
    spans = active_spans(stats, gaps)
    groups = curve_groups(stats, names[:len(CURVE_COLORS)])
    times = {label: sorted(itertools.chain.from_iterable(stats.timeline[n] for n in members))
             for label, members in groups.items()}
    active = sum(hi - lo for lo, hi in spans) or 1e-9
    usable, gap_px = width - 60 * len(gaps), 60
    span = (stats.last_ts or 0.0) - (stats.first_ts or 0.0)
    curves: list[tuple[float, float, dict[str, list[float]]]] = []     # (x, px width, rates per label)
    # Enough answers per bucket to be a rate, not a comb of single completions; at most 96, at least 1 s wide.
    resolution = max(4, min(96, sum(map(len, times.values())) // 20, int(active)))
    x = 40.0
    for lo, hi in spans:
        px = max(4.0, usable * (hi - lo) / active)
        if hi - lo > 1e-6:
            buckets = max(1, round(resolution * (hi - lo) / active))
            curves.append((x, px, {label: span_rates(t, lo, hi, buckets) for label, t in times.items()}))
        x += px + gap_px
    top = max((max(r) for _, _, rates in curves for r in rates.values()), default=1) or 1
    colors = {label: OTHERS_COLOR if len(members) > 1 else CURVE_COLORS[i % len(CURVE_COLORS)]
              for i, (label, members) in enumerate(groups.items())}
    legend, legend_height = svg_legend(colors, 40, height + 50, width)
    parts = [f'<svg width="{width + 80}" height="{height + 42 + legend_height}" role="img">',
             f'<text x="0" y="14" font-size="10">{top:.2f}/s</text><text x="0" y="{height + 5}" font-size="10">0</text>',
             f'<line x1="40" y1="{height + 5}" x2="{width + 40}" y2="{height + 5}" stroke="#999"/>']
    x, last_label = 40.0, -1e9
    for i, (lo, hi) in enumerate(spans):
        px = max(4.0, usable * (hi - lo) / active)
        for t in (lo, hi) if px < 200 else (lo, lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3, hi):
            at = x + px * (t - lo) / max(1e-9, hi - lo)
            if at - last_label >= 70:
                parts.append(f'<line x1="{at:.1f}" y1="{height + 5}" x2="{at:.1f}" y2="{height + 9}" stroke="#999"/>'
                             f'<text x="{at:.1f}" y="{height + 21}" font-size="10" text-anchor="middle">'
                             f'{clock(t, span)}</text>')
                last_label = at
        x += px
        if i < len(gaps):
            a, b = gaps[i]
            parts.append(f'<rect x="{x + 4:.1f}" y="5" width="{gap_px - 8}" height="{height}" fill="#eee">'
                         f'<title>no answers for {format_duration(b - a)}</title></rect>'
                         f'<text x="{x + gap_px / 2:.1f}" y="{height / 2:.0f}" font-size="9" text-anchor="middle" '
                         f'fill="#777"><tspan x="{x + gap_px / 2:.1f}">no answers</tspan><tspan x="'
                         f'{x + gap_px / 2:.1f}" dy="12">{format_duration(b - a)}</tspan></text>')
            x += gap_px
    for label, color in colors.items():
        for left, px, rates in curves:
            values = rates[label]
            points = " ".join(f"{left + px * (j + 0.5) / len(values):.1f},{height - height * v / top + 5:.1f}"
                              for j, v in enumerate(values))
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{points}"/>')
    parts.append(legend)
    parts.append(f'<text x="{width + 40}" y="{height + 33}" font-size="10" text-anchor="end">time (UTC)</text></svg>')
    return "".join(parts)


def svg_mini(shares: list[float], top: float, width: int = 120, height: int = 24) -> str:
    """A tiny histogram of scores 1..10 on a scale shared by every endpoint."""
    step = width / len(shares)
    bars = "".join(f'<rect x="{i * step:.1f}" y="{height - height * v / top:.1f}" width="{step - 1:.1f}" '
                   f'height="{height * v / top:.1f}" fill="#3b6ea8"><title>{i + 1}: {100 * v:.1f}%</title></rect>'
                   for i, v in enumerate(shares))
    return f'<svg width="{width}" height="{height}" role="img">{bars}</svg>'


def read_meta(output: Path) -> dict[str, Any]:
    """Read the checkpoint's sidecar, or nothing if it is missing or unreadable."""
    try:
        meta = json.loads(meta_path(output).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def html_header(stats: Stats, source: Path) -> str:
    """Name what the page describes: model, prompt, when the answers came."""
    meta = read_meta(source)
    found = meta.get("fingerprint") or {}
    builds = sorted({f"{e.get('model')} ({str(e.get('digest'))[:12]})" for e in (meta.get("endpoints") or {}).values()
                     if isinstance(e, dict) and e.get("digest")})
    facts = [("model", ", ".join(builds) or found.get("model") or "unknown (no sidecar)"),
             ("prompt sha256", str(found.get("prompt_sha256") or "unknown")[:16]),
             ("input", found.get("input") or "unknown")]
    if stats.first_ts is not None and stats.last_ts is not None:
        first, last = time.gmtime(stats.first_ts), time.gmtime(stats.last_ts)
        same_day = first[:3] == last[:3]
        facts.append(("answers", f"{time.strftime('%Y-%m-%d %H:%M:%S', first)} to "
                                 f"{time.strftime('%H:%M:%S' if same_day else '%Y-%m-%d %H:%M:%S', last)} UTC"))
    facts.append(("report written", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    return "<table class=facts>" + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                                           for k, v in facts) + "</table>"


def html_endpoints(stats: Stats) -> str:
    """A table of every endpoint with a small histogram each, all on one scale."""
    names = sorted(stats.per_endpoint)
    total = sum(sum(c.values()) for c in stats.per_endpoint.values()) or 1
    shares = {n: [c[s] / (sum(c.values()) or 1) for s in range(1, 11)] for n, c in stats.per_endpoint.items()}
    top = max((max(v) for v in shares.values()), default=1.0) or 1.0
    odd, pair = outliers({n: moments(c) for n, c in stats.per_endpoint.items()})
    flagged = {name for name, *_ in odd} | set(pair)
    head = "<tr><th>endpoint</th><th>items</th><th>share</th><th>mean</th>" + (
        "<th>expected</th>" if stats.expected_rows else "") + "<th>scores 1..10 (share of its items)</th></tr>"
    rows = []
    for n in names:
        items = sum(stats.per_endpoint[n].values())
        expected = f"<td>{format_mean(stats.expected.get(n, Moments()).mean)}</td>" if stats.expected_rows else ""
        rows.append(f"<tr{' class=warn' if n in flagged else ''}><td>{html.escape(n)}</td><td>{items:,}</td>"
                    f"<td>{100 * items / total:.1f}%</td><td>{format_mean(moments(stats.per_endpoint[n]).mean)}</td>"
                    f"{expected}<td>{svg_mini(shares[n], top)}</td></tr>")
    note = ""
    if stats.duplicates:
        note = (f"<p>The endpoints' items add up to {total:,}, not {stats.rows_scored:,}: "
                f"{plural(stats.duplicates, 'row')} had the same text as another row and took its verdict "
                f"without a request; they count in All rows only.</p>")
    return f"<h2>Per endpoint</h2>{note}<table class=fleet>{head}{''.join(rows)}</table>"


def html_report(stats: Stats, source: Path) -> str:
    """The same report as one self-contained page (inline SVG, no network)."""
    labels = [str(s) for s in range(1, 11)]
    sections = [html_header(stats, source),
                f"<h2>All rows ({stats.rows_scored:,} scored, mean {format_mean(moments(stats.histogram).mean)})</h2>",
                svg_bars([stats.histogram[s] for s in range(1, 11)], labels)]
    sections += [f"<p>{html.escape(line)}</p>" for line in filter(None, [tie_line(stats)])]
    if stats.expected_rows:
        sections.append(f"<h2>Expected scores ({stats.expected_rows:,} rows, rounded to the nearest score)</h2>"
                        + svg_bars([stats.expected_histogram[s] for s in range(1, 11)], labels, color="#7b5ea8"))
    if stats.token_rows:
        sections.append(f"<p>Generated {stats.tokens / stats.token_rows:.1f} tokens per answer on average.</p>")
    if stats.per_endpoint:
        sections.append(html_endpoints(stats))
    for warning in disagreements(stats):
        sections.append(f'<p class=warn>{html.escape(warning)}</p>')
    if find_gaps(stats) or throughput_series(stats)[1]:
        sections.append("<h2>Throughput over time (items/s)</h2>" + svg_lines(stats, report_endpoints(stats)))
    if stats.errors:
        items = "".join(f"<li>{n:,} {html.escape(k)}</li>" for k, n in sorted(stats.errors.items()))
        sections.append(f"<h2>Rows without a score</h2><ul>{items}</ul>")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;color:#222}.warn{color:#a00;font-weight:bold}"
             "table{border-collapse:collapse}td,th{padding:2px 10px;text-align:left}.fleet td{border-top:1px solid #eee}"
             ".facts th{color:#555;font-weight:normal}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>score.py report: {html.escape(source.name)}"
            f"</title><style>{style}</style></head><body><h1>score.py report: {html.escape(source.name)}</h1>"
            + "".join(sections) + "</body></html>\n")


def clean_strings(value: Any) -> Any:
    """Replace what UTF-8 cannot hold (lone surrogates) in a JSON value."""
    if isinstance(value, str):
        return value if writable(value) else value.encode("utf-8", "replace").decode()
    if isinstance(value, dict):
        return {clean_strings(k): clean_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_strings(v) for v in value]
    return value


def final_answers(path: Path) -> pa.Table:
    """Reduce a checkpoint to one row per id key: its final record (FinalRecords' rule)."""
    columns: dict[str, list] = {name: [] for name in ("key", *EXPORT_COLUMNS)}
    chunks = []
    finals = FinalRecords(positions=True)
    position = 0

    def flush() -> None:
        """Turn the columns gathered so far into an Arrow chunk (one, empty, for an empty checkpoint)."""
        if columns["key"] or not chunks:
            chunks.append(pa.table({"key": pa.array(columns["key"], pa.int64()),
                                    **{name: pa.array(columns[name], NUMERIC_COLUMNS.get(name, pa.string()))
                                       for name in EXPORT_COLUMNS}}))
            for values in columns.values():
                values.clear()

    for record in iter_records(path):
        key = record_key(record["id"], record.get("error_kind"))
        if not finals.add(key, record["score"], record.get("error_kind"), position):
            continue
        position += 1
        columns["key"].append(key)
        for name in EXPORT_COLUMNS:
            value = record.get(name)
            columns[name].append(value if name in NUMERIC_COLUMNS or value is None else clean_strings(str(value)))
        if len(columns["key"]) >= 65536:
            flush()
    flush()
    return pa.concat_tables(chunks).take(finals.positions())


def arrow_rows(records: list[dict], schema: pa.Schema | None) -> pa.Table:
    """Build an Arrow table from JSONL objects; when Arrow refuses them, a column whose values mix
    types (1 and "1") or hold integers beyond 64 bits becomes text and unwritable strings are mended,
    so the row is still exported."""
    try:
        return pa.Table.from_pylist(records, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError, OverflowError):
        pass
    kinds: dict[str, set] = {}
    for record in records:
        for name, value in record.items():
            if value is not None:
                big = type(value) is int and not -(1 << 63) <= value < (1 << 63)
                kinds.setdefault(name, set()).add("big" if big else type(value))
    mixed = {name for name, types in kinds.items() if len(types) > 1 or "big" in types}
    mended = [{name: clean_strings(str(value) if name in mixed and value is not None else value)
               for name, value in record.items()} for record in records]
    return pa.Table.from_pylist(mended, schema=schema)


def rows_arrow(rows: Rows, schema: pa.Schema | None) -> pa.Table:
    """Return rows read for export as an Arrow table (JSONL objects in the schema of the first run)."""
    if isinstance(rows.data, pa.RecordBatch):
        return pa.Table.from_batches([rows.data])
    return arrow_rows(rows.data, schema)


def blank_repeats(table: pa.Table, repeated: pa.Array) -> pa.Table:
    """Take the verdict off rows whose id appeared earlier in the input: it belongs to the first."""
    if not pc.any(repeated).as_py():
        return table
    for name in EXPORT_COLUMNS:
        index = table.schema.get_field_index(name)
        note = "duplicate_id: an earlier row has this id" if name == "error" else None
        table = table.set_column(index, name, pc.if_else(repeated, pa.scalar(note, table.schema.field(index).type),
                                                         table.column(index)))
    return table


def top_keys(answers: pa.Table, top: tuple[float, bool]) -> pa.Array:
    """Return the id keys of the best scored rows: by score_expected (else score), ties by score, then key."""
    scored = answers.filter(pc.is_valid(answers.column("score")))
    rank = pc.coalesce(scored.column("score_expected"), pc.cast(scored.column("score"), pa.float64()))
    scored = scored.append_column("rank_value", rank)
    value, percent = top
    count = math.ceil(scored.num_rows * value / 100) if percent else int(value)
    order = pc.sort_indices(scored, sort_keys=[("rank_value", "descending"), ("score", "descending"),
                                               ("key", "ascending")])
    return scored.column("key").take(order[:count]).combine_chunks()


def export_parquet(config: Config, info: InputInfo, target: Path, log: InputLog) -> tuple[int, int]:
    """Write the input with the score columns appended, joined by id; return (rows written, scored)."""
    clash = [c for c in EXPORT_COLUMNS if c in info.columns]
    if clash:
        raise UsageError(f"{config.input} already has column(s) {', '.join(clash)}; export would overwrite them")
    answers = final_answers(config.output)
    keep = top_keys(answers, config.top) if config.top else None     # a threshold needs every row first
    temp = target.with_name(target.name + ".tmp")
    writer, schema = None, None
    written = scored = 0
    try:
        for rows in input_rows(info, log):
            keys, repeated = arrow_int64(rows.keys), pa.array(rows.repeated, pa.bool_())
            picked = answers.take(pc.index_in(keys, value_set=answers.column("key")))
            table = rows_arrow(rows, schema)
            schema = schema or table.schema
            for name in EXPORT_COLUMNS:
                table = table.append_column(name, picked.column(name).combine_chunks())
            table = blank_repeats(table, repeated)
            if keep is not None:
                table = table.filter(pc.and_(pc.is_in(keys, value_set=keep), pc.is_valid(table.column("score"))))
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


def write_reports(config: Config, ran: bool = False) -> int:
    """Write --export / --report / --report-html from the checkpoint; print the text report.

    After a run (`ran`), the run's summary has already said what an answer cost in tokens.
    """
    if not config.output.exists():
        raise UsageError(f"{config.output}: no checkpoint to report on (score something first)")
    stats = read_stats(config.output)
    if stats.foreign.count:
        warn(stats.foreign.describe(config.output))
    warn(text_report(stats, tokens=not ran))
    if config.report_html:
        config.report_html.write_text(html_report(stats, config.output))
        warn(f"Report written to {config.report_html}")
    if config.export:
        info = inspect_input(config.input, config.id_column, config.text_column, config.prompt)
        log = InputLog(config.input, warn)
        written, scored = export_parquet(config, info, config.export, log)
        filters = ([f"--min-score {config.min_score}"] if config.min_score is not None else []) + (
            [f"--top {config.top[0]:g}{'%' if config.top[1] else ''}"] if config.top else [])
        warn(f"Exported {plural(written, 'row')} ({scored:,} scored) to {config.export}"
             + (f" ({', '.join(filters)})" if filters else ""))
        if log.unreadable:
            return EXIT_INCOMPLETE
    return EXIT_OK


# ── Job running ───────────────────────────────────────────────────────────────────
# Preflight, one whole job from the first request to its exit code, signals, the resume command.


PREFLIGHT_GRACE = 5.0       # once one endpoint is ready, seconds the others get to join the preflight table


class QuietStream:
    """A console stream that falls silent, instead of raising, once nobody reads it.

    A closed pipe (`2>&1 | head -1`) or a hung-up terminal must cost the messages, never the run.
    """

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        """Write text, or nothing once the reader has gone; always report it all written."""
        if not self.broken:
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                self.silence()
        return len(text)

    def flush(self) -> None:
        """Flush, unless the reader has gone."""
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.silence()

    def isatty(self) -> bool:
        """Tell whether a terminal still reads the stream."""
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def silence(self) -> None:
        """Stop writing; point the descriptor at /dev/null so the interpreter's last flush succeeds."""
        self.broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def guard_streams() -> Callable[[], None]:
    """Make stdout/stderr safe to lose mid-run; return what undoes it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:     # closed (`2>&-`): the checkpoint would get this number, and stray writes with it
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    saved = sys.stdout, sys.stderr
    opened = [open(os.devnull, "w") for stream in saved if stream is None]
    spare = iter(opened)
    sys.stdout, sys.stderr = (QuietStream(stream if stream is not None else next(spare)) for stream in saved)

    def restore() -> None:
        """Put the original streams back and close the ones opened here."""
        sys.stdout, sys.stderr = saved
        for stream in opened:
            stream.close()
    return restore


def interpreter() -> str:
    """Name the running Python the way a shell on this machine would find it."""
    for name in ("python", "python3"):
        found = shutil.which(name)
        if found and os.path.abspath(found) == os.path.abspath(sys.executable):
            return name
    return sys.executable


def invocation(argv0: str) -> list[str]:
    """Spell how this program was started, valid again from the same folder."""
    if argv0.endswith(".py"):
        return [interpreter(), argv0]
    name = Path(argv0).name                # the `score` console script
    found = shutil.which(name)
    if found and os.path.realpath(found) == os.path.realpath(argv0):
        return [name]
    return [argv0]


def resume_command(config: Config) -> str:
    """Spell out, shell-quoted, the command that continues this run."""
    words = [w for w in config.command or ("score.py", str(config.input)) if w not in ("--overwrite", "--resume")]
    return shlex.join([*words, "--resume"])


def rerun_command(config: Config) -> str:
    """Spell out, shell-quoted, this very command (nothing was written: run it again as it was)."""
    return shlex.join(config.command) if config.command else resume_command(config)


def record_start(endpoint: Endpoint, task: asyncio.Task) -> None:
    """Record what preflight's check-and-load of one endpoint came to."""
    exc = task.exception()
    if exc is None:
        return
    if not isinstance(exc, (EndpointGone, EndpointFault)):
        raise exc
    endpoint.start_failed(exc, time.monotonic())


def try_it_command() -> str | None:
    """Spell the command that runs examples/try_it.py from this folder, if it ships beside score.py."""
    path = Path(__file__).resolve().parent / "examples" / "try_it.py"
    if not path.is_file():
        return None
    relative = os.path.relpath(path)
    shown = relative if not relative.startswith("..") else str(path)
    return shlex.join([interpreter(), shown])


def first_run_hint(endpoints: list[Endpoint], config: Config) -> str:
    """Say what to do when the fleet is one local Ollama that is not running (the quick start, as shipped)."""
    if len(endpoints) != 1 or "refused" not in endpoints[0].detail \
            or httpx.URL(endpoints[0].url).host not in ("localhost", "127.0.0.1", "::1"):
        return ""
    lines = [f"\nNothing listens at {endpoints[0].url}: Ollama is not running on this machine.",
             "To go on, either",
             f"  - start Ollama (`ollama serve`, or open the Ollama app), then `ollama pull {config.model}`;",
             "  - or list your machines in endpoints.txt, one URL per line (or name a file with --endpoints);"]
    if (command := try_it_command()) is not None:
        lines += ["  - or try score.py without Ollama:", f"      {command}"]
    return "\n".join(lines + ["Ctrl-C stops the wait; nothing has been scored."])


async def wait_for_fleet(endpoints: list[Endpoint], config: Config, tasks: dict[Endpoint, asyncio.Task]) -> None:
    """Check and load every endpoint until one is ready (the rest get a grace) or each has answered."""
    started = time.monotonic()
    give_up = started + config.startup_timeout
    retry_at: dict[Endpoint, float] = {}
    ready_at: float | None = None
    told, told_loading, next_left = False, False, started + 15.0
    while True:
        for e in endpoints:
            if e.health is Health.PENDING and e not in tasks and time.monotonic() >= retry_at.get(e, 0.0):
                tasks[e] = asyncio.create_task(start_endpoint(e, config))
        if tasks:
            await asyncio.wait(tasks.values(), timeout=1.0)
        else:
            await asyncio.sleep(1.0)
        now = time.monotonic()
        for e, task in list(tasks.items()):
            if task.done():
                del tasks[e]
                record_start(e, task)
                retry_at[e] = now + 5.0
        if ready_at is None and any(e.health is Health.READY for e in endpoints):
            ready_at = now
        answered = any(e.checked or e.gone for e in endpoints)
        if (ready_at is not None and (not tasks or now - ready_at >= PREFLIGHT_GRACE)) or (answered and not tasks):
            return
        if not answered and now >= give_up:
            raise UsageError(f"no endpoint answered within {config.startup_timeout:g} s (--startup-timeout):\n"
                             + waiting_lines(endpoints, "no complete answer"))
        if not answered and not told and (all(e in retry_at for e in endpoints) or now - started >= 10.0):
            told = True
            warn(f"No endpoint answers yet; retrying for up to {format_duration(config.startup_timeout)}:\n"
                 + waiting_lines(endpoints, "no complete answer yet")
                 + first_run_hint(endpoints, config))
        if told and not answered and now >= next_left:
            next_left += 15.0
            warn(f"[{time.strftime('%H:%M:%S')}] still no endpoint answers; giving up in "
                 f"{format_duration(give_up - now)} (--startup-timeout)")
        loading = [e.name for e in tasks if e.health is Health.WARMING]
        if loading and not told_loading and ready_at is None and now - started >= 3.0:
            told_loading = True
            warn(f"Loading the model on {clip(loading, REPORT_WIDTH - 60)} (a cold start can take minutes)")


async def preflight(endpoints: list[Endpoint], config: Config) -> None:
    """Check every endpoint and load its model in parallel; refuse mixed builds; start on what is ready.

    Endpoints still checking or loading when dispatch begins keep their task
    (endpoint.starting), which the run's supervisor takes over.
    """
    tasks: dict[Endpoint, asyncio.Task] = {}
    handed = False
    try:
        await wait_for_fleet(endpoints, config, tasks)
        warn(preflight_table(endpoints))
        mixed = [e for e in endpoints if build_clash(e, endpoints)]
        if mixed and not config.allow_mixed_models:
            models = list(dict.fromkeys(e.model for e in mixed))
            rows = [["model", "endpoint", "build"]] + [[e.model, e.name, e.digest[:12]]
                                                       for e in sorted(mixed, key=lambda e: models.index(e.model))]
            raise UsageError("the same model name is a different build on different endpoints, so their scores "
                             "would not be comparable:\n" + text_table(rows) +
                             "\nmake the builds match (ollama pull on each), or pass --allow-mixed-models")
        if not any(e.checked for e in endpoints) and all(e.gone for e in endpoints):
            raise UsageError("no endpoint can score: " + "; ".join(f"{e.name}: {e.detail}" for e in endpoints))
        if (reason := load_failures(endpoints)) and config.max_downtime is None:
            raise StopRun(f"{reason} (free memory or pick a smaller model; --max-downtime waits for one to recover)")
        for endpoint, task in tasks.items():
            endpoint.starting = task
        handed = True
    finally:
        if not handed:
            for task in tasks.values():
                task.cancel()


def path_key(path: Path) -> tuple:
    """Identify a file by inode when it exists (so links count as the same file), else by its resolved name."""
    try:
        stat = path.stat()
        return ("inode", stat.st_dev, stat.st_ino)
    except OSError:
        return ("path", str(path.resolve()))


def replaceable(flag: str, path: Path) -> None:
    """Refuse a target that exists and is not a regular file; for --export / --report-html, one we did not write."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot check it ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{flag} {path}: exists and is not a regular file; choose another path")
    if flag not in ("--export", "--report-html") or not info.st_size:
        return
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot read it ({exc.strerror})") from None
    if flag == "--export" and not head.startswith(b"PAR1"):
        raise UsageError(f"{flag} {path}: exists and is not a Parquet file, so it is not an export to replace; "
                         "choose another path or remove it")
    if flag == "--report-html" and not (head.lower().startswith(b"<!doctype html>")
                                        and b"<title>score.py report: " in head):
        raise UsageError(f"{flag} {path}: exists and is not a report score.py wrote, so it is not one to replace; "
                         "choose another path or remove it")


def check_writable(flag: str, path: Path, probe: bool) -> None:
    """Fail at the start, not after days of scoring, if a report or export path cannot be written."""
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {path}: folder {path.parent} does not exist")
    replaceable(flag, path)
    if not probe:
        return
    existed = path.exists()
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write ({exc.strerror})") from None
    if not existed:
        path.unlink(missing_ok=True)


def check_outputs(config: Config, info: InputInfo) -> None:
    """Refuse, before anything is opened for writing, outputs that would overwrite the input or each other."""
    if not config.output.name:
        raise UsageError(f"-o {str(config.output)!r}: needs a file name")
    if config.output.absolute().parts[1:2] in (("dev",), ("proc",)):
        # /dev/stdout can be a regular file when redirected, but its sidecar would land in /dev
        raise UsageError(f"-o {config.output}: a checkpoint must be a file of its own, not a device or stream")
    outputs = [(flag, path) for flag, path in (("-o", config.output), ("the sidecar", meta_path(config.output)),
                                               ("--export", config.export), ("--report-html", config.report_html))
               if path is not None]
    inputs = {path_key(file) for file in info.files}
    folder = config.input.resolve() if config.input.is_dir() else None
    read = {path_key(path): f"{what} {path}" for what, path in (("the endpoints file", config.endpoints_file),
                                                               ("the prompt file", config.prompt_file)) if path}
    seen: dict[tuple, str] = {}
    for flag, path in outputs:
        key = path_key(path)
        if key in read:
            raise UsageError(f"{flag} {path} is {read[key]}, which this run reads; choose another path")
        if key in inputs or (folder is not None and path.resolve().is_relative_to(folder)):
            where = "is" if key in inputs else "is inside"
            raise UsageError(f"{flag} {path} {where} the input {config.input}: writing there would destroy "
                             "the dataset; choose a path outside it")
        if key in seen:
            raise UsageError(f"{flag} {path} is the same file as {seen[key]}; choose another path")
        seen[key] = f"{flag} {path}"
        if flag in ("-o", "the sidecar"):
            replaceable(flag, path)
    for flag, path in outputs[2:]:
        check_writable(flag, path, probe=not config.check)


def stop_starting(endpoints: list[Endpoint]) -> None:
    """Cancel check-and-load tasks the run never took over (--check, or an early stop)."""
    for endpoint in endpoints:
        if endpoint.starting is not None:
            endpoint.starting.cancel()


def install_signal_handlers(loop: asyncio.AbstractEventLoop, main_task: asyncio.Task) -> list[int]:
    """SIGINT/SIGTERM/SIGHUP cancel the run (which then saves and exits 130/143/129); a second one exits at once."""
    received: list[int] = []

    def on_signal(sig: int) -> None:
        """Cancel the job on the first signal; leave at once on the second."""
        if received:   # every line written is already complete, so leaving now loses nothing
            os._exit(EXIT_SIGNAL[sig])
        received.append(sig)
        main_task.cancel()

    for sig in EXIT_SIGNAL:
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue            # started under nohup: a closed terminal must not stop the run
        loop.add_signal_handler(sig, on_signal, sig)
    return received


def print_first_prompt(config: Config, first: list[Item], endpoints: list[Endpoint]) -> None:
    """Show (on stdout) the prompt the first pending row would get, for --check."""
    sample = next((item for item in first if item.text is not None), None)
    if sample is None:
        return
    usable = next((e for e in endpoints if e.checked), endpoints[0])
    try:
        prompt, _ = fit_prompt(usable, config, sample)
    except ContextOverflow as exc:
        prompt = f"(not sent: {exc})"
    print(f"--- first prompt (row id {sample.id!r}) ---\n{prompt}")


def finish_outputs(config: Config, code: int) -> int:
    """Print the run report, write the export and HTML asked for; keep the run's exit code."""
    return write_reports(config, ran=True) or code


def describe_resume(config: Config, resume: ResumeState) -> None:
    """Say what resuming found in the checkpoint."""
    if resume.torn_bytes:
        warn(f"{config.output}: ends with a torn final line ({resume.torn_bytes} bytes) left by an interrupted "
             "run; it is cut before the next record")
    if resume.foreign.count:
        warn(resume.foreign.describe(config.output))
    if resume.records:
        permanent = "a permanent error" if len(resume.permanent) == 1 else "permanent errors"
        warn(f"Resuming {config.output}: {plural(len(resume.scored), 'row')} scored, "
             f"{len(resume.permanent):,} with {permanent}, "
             f"{plural(resume.retried, 'failed row')} to retry.")


def run_stopper(group: ExceptionGroup) -> StopRun:
    """Find the StopRun that ended the run's task group; a UsageError or a bug goes on up."""
    expected, rest = group.split((StopRun, UsageError))
    if rest is not None or expected is None:
        raise group
    problem = expected.exceptions[0]
    while isinstance(problem, ExceptionGroup):
        problem = problem.exceptions[0]
    if isinstance(problem, UsageError):
        raise problem from None
    return problem


def after_run(config: Config, checkpoint: Checkpoint, code: int, began: bool, interrupted: bool,
              stopped: bool) -> int:
    """Tell the user how to go on after the run, then write reports and exports; return the exit code."""
    if interrupted and not began:
        warn("Interrupted before scoring began: nothing was scored in this run.")
        return code
    if config.overwrite and checkpoint.untouched:
        warn(f"Nothing new was written: {config.output} is left as it was.")
        return code
    if interrupted:
        warn(f"Interrupted. Every finished row is saved in {config.output}; continue with:\n"
             f"  {resume_command(config)}")
        return code
    if stopped:
        warn(f"Stopped early. Every finished row is saved in {config.output}; once that is fixed, continue with:\n"
             f"  {resume_command(config)}")
    return finish_outputs(config, code)


async def run_job(config: Config, info: InputInfo, meta: dict[str, Any], checkpoint: Checkpoint,
                  resume: ResumeState) -> int:
    """Preflight, score, summarise, export."""
    describe_resume(config, resume)
    tally = Tally()
    log = InputLog(config.input, warn, tally.unreadable)
    reader = read_items(info, config.dedup, FinishedRows(resume.scored, resume.permanent, resume.repeated), log)
    first = await asyncio.to_thread(take_chunk, reader, READ_CHUNK)
    first.count_skips(tally)
    if not first and not config.check:
        warn(f"Nothing to do: every {'readable ' if tally.unreadable else ''}row of {config.input} "
             f"is already in {config.output}.")
        # Only reports and exports run: their success is the answer, unless the input itself is cut short.
        return finish_outputs(config, EXIT_INCOMPLETE if tally.unreadable else EXIT_OK)
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    received = install_signal_handlers(loop, main_task)
    endpoints = [Endpoint(spec, config) for spec in config.endpoints]
    progress: Progress | None = None
    run: Run | None = None
    code = EXIT_OK
    stopped = False
    started = time.monotonic()
    try:
        async with contextlib.AsyncExitStack() as stack:
            for endpoint in endpoints:
                endpoint.client = await stack.enter_async_context(make_client(endpoint, config))
            stack.callback(stop_starting, endpoints)
            await preflight(endpoints, config)
            if wants_calibration(config, info, resume):
                meta.setdefault("calibration", {}).update(await calibrate(endpoints, config))
            meta["endpoints"].update((e.name, e.sidecar_entry()) for e in endpoints if e.digest)
            if config.check:
                print_first_prompt(config, first, endpoints)
                return EXIT_OK
            checkpoint.save_meta(meta)
            progress = Progress(config.progress, info.total, len(resume.scored) + len(resume.permanent))
            run = Run(config, endpoints, checkpoint, resume.hashes, meta, reader, first, tally, progress)
            if info.total is None and config.progress:
                counter = asyncio.create_task(asyncio.to_thread(count_rows, info))
                counter.add_done_callback(lambda t: t.cancelled() or t.exception() or progress.set_total(t.result()))
            started = time.monotonic()
            await run.run()
            checkpoint.write_held()
            code = exit_code(run.tally)
    except asyncio.CancelledError:
        if not received:
            raise
        main_task.uncancel()
        code = EXIT_SIGNAL[received[0]]
    except StopRun as problem:
        warn(f"score.py: stopped: {problem}")
        if run is None:                       # from preflight: nothing was sent
            if problem.code == EXIT_INCOMPLETE:
                warn(f"Nothing was sent; once that is fixed, run again with:\n  {rerun_command(config)}")
            return problem.code
        code, stopped = problem.code, True    # writing the records held back under --overwrite failed
    except ExceptionGroup as group:
        problem = run_stopper(group)
        warn(f"score.py: stopped: {problem}")
        code, stopped = problem.code, True
    finally:
        if progress is not None:
            progress.close()
        checkpoint.sync()
        for sig in EXIT_SIGNAL:
            loop.remove_signal_handler(sig)
    if run is not None:
        warn(summary(run, time.monotonic() - started))
    return after_run(config, checkpoint, code, began=run is not None, interrupted=bool(received), stopped=stopped)


async def amain(config: Config) -> int:
    """Run the whole job; return the exit code."""
    info = inspect_input(config.input, config.id_column, config.text_column, config.prompt)
    check_outputs(config, info)
    if config.report:
        return write_reports(config)
    meta = check_meta(config, info)
    checkpoint, resume = Checkpoint.open(config.output, resume=config.resume, overwrite=config.overwrite,
                                         check=config.check)
    checkpoint.save_meta(meta)
    try:
        return await run_job(config, info, meta, checkpoint, resume)
    finally:
        checkpoint.close()


# ── CLI ───────────────────────────────────────────────────────────────────────────
# Arguments become a Config at the boundary; main.


DEFAULT_MODEL = "qwen2.5-coder:7b"
DURATION_HELP = "90, 90s, 15m, 2h or 1d"


def parse_duration(text: str) -> float:
    """Parse 90, 90s, 15m, 2h or 1d into seconds."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not found:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90, 15m, 2h)")
    return float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]


def keep_alive_arg(text: str) -> int:
    """Parse --keep-alive into whole seconds; any negative value means keep the model loaded for good."""
    if re.fullmatch(r"\s*-\s*\d+(?:\.\d+)?\s*[smhd]?\s*", text):
        return -1
    try:
        return round(parse_duration(text))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 90, 15m, 2h, 1d; -1 keeps the model "
                                         "loaded, 0 unloads it after each request)") from None


def positive_int(text: str) -> int:
    """Parse an option that takes a whole number of at least 1."""
    try:
        value = int(text)
        if value >= 1:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")


def at_least_a_second(text: str) -> float:
    """Parse a duration that paces the run: below a second, requests and probes would spin."""
    seconds = parse_duration(text)
    if seconds < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1s, got {text!r}")
    return seconds


def above_zero(text: str) -> float:
    """Parse a duration that must be longer than nothing."""
    seconds = parse_duration(text)
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be longer than 0, got {text!r}")
    return seconds


def temperature_arg(text: str) -> float:
    """Parse a sampling temperature: a finite number from 0 to 2."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 2:             # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 2, got {text!r}")
    return value


def score_arg(text: str) -> int:
    """Parse a score threshold: a whole number from 1 to 10."""
    try:
        value = int(text)
        if 1 <= value <= 10:
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected a whole score from 1 to 10, got {text!r}")


def concurrency_arg(text: str) -> int | str:
    """Parse --concurrency N or auto (as endpoints.txt's concurrency= reads it)."""
    try:
        return parse_concurrency(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def top_arg(text: str) -> tuple[float, bool]:
    """Parse --top N (rows) or P% (percent of scored rows)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", text)
    if found:
        value, percent = float(found.group(1)), bool(found.group(2))
        if (percent and 0 < value <= 100) or (not percent and value >= 1 and value.is_integer()):
            return value, percent
        if value == 0:
            raise argparse.ArgumentTypeError(f"{text!r} would keep no row: give at least 1 row or more than 0%")
    raise argparse.ArgumentTypeError(f"expected a row count or a percentage like 20%, got {text!r}")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line like every other error."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """Declare the options, grouped as a user looks for them: input, fleet, run, output, reports."""
    parser = Parser(
        allow_abbrev=False,     # an abbreviation would survive into the printed resume command
        prog="score.py", usage="python score.py INPUT [options]   (or: score INPUT [options])",
        description="Score every row of a dataset with a local LLM spread over several machines. Installed with "
                    "pip, the same program is the `score` command.",
        epilog=f"Durations are written {DURATION_HELP}. Exit codes: 0 all taken rows scored; 1 some rows have no "
               "score or the run stopped early; 2 bad usage/input or no usable endpoint; 129 SIGHUP; 130 SIGINT; 143 SIGTERM.")
    parser.add_argument("input", type=Path,
                        help=".parquet file, directory of .parquet files, or .jsonl/.ndjson (optionally .gz)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups = {name: parser.add_argument_group(title) for name, title in (
        ("input", "input"), ("fleet", "fleet (endpoints and model)"), ("run", "run (requests, retries, pacing)"),
        ("output", "output (checkpoint and resuming)"), ("reports", "reports and export"))}
    add = groups["input"].add_argument
    add("--id-column", metavar="COL", help="id column (default: 'id' if present, else the row number)")
    add("--text-column", metavar="COL", help=f"text column (default: first of {', '.join(TEXT_COLUMNS)})")
    add("--prompt-file", type=Path, metavar="FILE", help="prompt template with {code} and any {column}")
    add("--limit", type=positive_int, metavar="N", help="score at most N not-yet-finished rows, then stop")
    add("--no-dedup", dest="dedup", action="store_false", help="send duplicate texts separately")
    add = groups["fleet"].add_argument
    add("--endpoints", type=Path, metavar="FILE",
        help=f"endpoints file (default: ./endpoints.txt if present, else {DEFAULT_ENDPOINT})")
    add("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL}); endpoints may override")
    add("--allow-mixed-models", action="store_true", help="accept different builds of the model across endpoints")
    add("--pull", action="store_true", help="ask Ollama endpoints that lack the model to pull it")
    add("--check", action="store_true", help="run the preflight, print the first prompt, and exit")
    add("--startup-timeout", type=at_least_a_second, default=300.0, metavar="DURATION",
        help=f"exit 2 if no endpoint has answered at all within this time ({DURATION_HELP}; default 300s)")
    add("--keep-alive", type=keep_alive_arg, default=1800, metavar="DURATION",
        help=f"how long Ollama keeps the model loaded after a request ({DURATION_HELP}; -1 forever, 0 unload; "
             "default 30m)")
    add = groups["run"].add_argument
    add("--concurrency", type=concurrency_arg, default=AUTO, metavar="N|auto",
        help="requests in flight per endpoint unless its line says (default auto: adaptive)")
    add("--timeout", type=at_least_a_second, default=600.0, metavar="DURATION",
        help=f"per-request limit ({DURATION_HELP}; default 600s)")
    add("--max-attempts", type=positive_int, default=3, metavar="N",
        help="bad answers allowed per row before it is recorded as failed (default 3)")
    add("--max-downtime", type=above_zero, metavar="DURATION",
        help=f"give up (exit 1, nothing lost) when every endpoint is down and none has given a good answer for this long "
             f"({DURATION_HELP}; default: never)")
    add("--num-ctx", type=positive_int, default=8192, metavar="N", help="context tokens sent to Ollama (default 8192)")
    add("--temperature", type=temperature_arg, default=0.0, metavar="T", help="sampling temperature (default 0)")
    add("--seed", type=int, default=42, metavar="N", help="sampling seed (default 42)")
    add("--no-hedge", dest="hedge", action="store_false", help="never race slow tail requests on faster endpoints")
    add("--no-progress", dest="progress", action="store_false", help="no progress bar or status lines")
    add = groups["output"].add_argument
    add("-o", "--output", type=Path, metavar="FILE", help="checkpoint JSONL (default: <input>.scores.jsonl)")
    mode = groups["output"].add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue an existing output, skipping finished rows")
    mode.add_argument("--overwrite", action="store_true", help="discard an existing output and start over")
    add("--force", action="store_true", help="resume even if model, prompt or input changed")
    add = groups["reports"].add_argument
    add("--report", action="store_true", help="print the run report for the output and exit (scores nothing)")
    add("--report-html", type=Path, metavar="PATH", help="also write the report as a self-contained HTML page")
    add("--export", type=Path, metavar="PATH.parquet", help="write the input with score columns added, at the end")
    add("--min-score", type=score_arg, metavar="N", help="with --export: keep only rows scoring at least N")
    add("--top", type=top_arg, metavar="N|P%",
        help="with --export: keep only the best N rows (or P%% of scored rows) by score_expected, else score")
    groups["run"].add_argument(
        "--reason", choices=REASON_MODES, default="full",
        help="full: a one-sentence reason (default); short: a few words; none: the score alone (fastest)")
    add = groups["fleet"].add_argument
    calibration = groups["fleet"].add_mutually_exclusive_group()
    calibration.add_argument("--calibrate", dest="calibration", action="store_true", default=None,
                             help=f"always score the built-in calibration set at preflight (default: for jobs "
                                  f"of {CALIBRATE_MIN_ROWS:,}+ rows, and with --check or --require-calibration)")
    calibration.add_argument("--no-calibration", dest="calibration", action="store_false",
                             help="skip the calibration at preflight")
    add("--require-calibration", action="store_true",
        help="exit 2 before scoring if an endpoint fails the calibration")
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
        prompt, source = read_text_file(args.prompt_file, "prompt file"), str(args.prompt_file)
    if args.min_score is not None and not args.export:
        raise UsageError("--min-score only applies with --export")
    if args.top is not None and not args.export:
        raise UsageError("--top only applies with --export")
    if args.require_calibration and args.calibration is False:
        raise UsageError("--require-calibration and --no-calibration contradict each other")
    prompt = prompt_for(prompt, args.reason)
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
        report=args.report, report_html=args.report_html, reason=args.reason, top=args.top,
        calibration=args.calibration, require_calibration=args.require_calibration,
        endpoints_file=endpoints_file, prompt_file=args.prompt_file)


def main(argv: list[str] | None = None, command: list[str] | None = None) -> int:
    """Entry point: parse, run, and map every expected failure to a one-line error.

    `command` is how the user started this run (program and arguments), for the
    resume hint; by default it is read from the real command line.
    """
    restore = guard_streams()
    args = sys.argv[1:] if argv is None else list(argv)
    if command is None:
        command = [*invocation(sys.argv[0]), *args] if argv is None else [interpreter(), "score.py", *args]
    try:
        config = replace(parse_args(args), command=tuple(command))
        return asyncio.run(amain(config))
    except UsageError as exc:
        print(f"score.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("score.py: interrupted", file=sys.stderr)
        return EXIT_SIGNAL[signal.SIGINT]
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
