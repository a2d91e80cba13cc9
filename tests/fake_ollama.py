"""A fake Ollama (or OpenAI-compatible) server on a real socket, with injectable faults.

It follows the API shapes in Ollama's docs (GET /, /api/version, /api/tags,
POST /api/chat with stream=false, /api/pull) and llama-cpp-python's OpenAI server
(/v1/models, /v1/chat/completions; 500 on json_schema response_format; 400
context_length_exceeded). Its answer for a piece of code is `expected_score(code)`,
so tests can check every record against the text it was given. Asked for token
probabilities (`logprobs`), it returns them in the asking API's shape, digits one
token each, with a known distribution around its answer (`score_distribution`) and
tokens the grammar forbids among the alternatives.

Service model: `slots` requests are served at once (more wait in a FIFO, like
OLLAMA_NUM_PARALLEL); each needs `latency + per_char * len(prompt)` seconds of work
when alone, and with n active the server does `speed(n)` units of work per second
shared between them (processor sharing): `speed(n) = n ** alpha` up to `peak`, then
falling as `(peak ** alpha) * (peak / n) ** beta`. A client disconnect cancels the
work, as in Ollama.

Run as a script to serve from another process (or network namespace):
    python tests/fake_ollama.py --host 127.0.0.1 --port 0 [--latency 0.05 ...]
It prints `PORT <n>` on stdout once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gzip
import hashlib
import json
import math
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DIGEST = "a80c4f17acd55265feec403c7aef86be0c25983ab279d83f3bcd3abbcb5b8b72"


def expected_score(code: str) -> int:
    """The fake model's verdict on a function: stable, spread over 1..10."""
    normal = "\n".join(line.rstrip() for line in code.strip().replace("\r\n", "\n").split("\n"))
    return 1 + hashlib.sha256(normal.encode()).digest()[0] % 10


def documented(code: str) -> bool:
    """Whether code carries a docstring or doc comment (the "docs" verdict)."""
    return '"""' in code or "/**" in code


def score_distribution(score: int) -> dict[int, float]:
    """The fake model's probabilities over 1..10 around its answer (1 and 10 also share mass)."""
    raw = {score: 0.6, score - 1: 0.25, score + 1: 0.15}
    if score in (1, 10):
        raw[11 - score] = 0.1            # the two-token "1"/"10" path then splits on the next token
    raw = {k: v for k, v in raw.items() if 1 <= k <= 10}
    total = sum(raw.values())
    return {k: v / total for k, v in raw.items()}


def expected_mean(score: int) -> float:
    """Σ k·p(k) of score_distribution: what a client should compute from the fake's logprobs."""
    return sum(k * p for k, p in score_distribution(score).items())


def entry(token: str, p: float, alternatives: list[tuple[str, float]] | None = None) -> dict:
    """One logprobs entry in the shape both APIs use."""
    out = {"token": token, "logprob": math.log(p), "bytes": list(token.encode())}
    out["top_logprobs"] = [{"token": t, "logprob": math.log(q), "bytes": list(t.encode())}
                           for t, q in (alternatives or [(token, p)]) if q > 0]
    return out


def pieces(text: str) -> list[str]:
    return re.findall(r"\w+|\s+|[^\w\s]+", text)


def logprob_entries(content: str, score: int, spaced: bool) -> list[dict]:
    """Tokens of `content` with digits one by one, and known alternatives at the score's digits.

    At the first digit 80% of the raw mass is spread over the score distribution ("1" carries both
    1 and 10) and 20% over tokens the grammar forbids; after a "1", "0" and the terminator split it.
    """
    at = re.search(r'"score":\s*', content).end()
    digits = str(score)
    end = at + len(digits)
    head, lead = content[:at], ""
    if spaced and head.endswith(" "):            # tokenizers that glue the space to the digit
        head, lead = head[:-1], " "
    dist = score_distribution(score)
    first = [(lead + str(k), 0.8 * p) for k, p in dist.items() if k != 10]
    first = [(t, q + (0.8 * dist.get(10, 0.0) if t == lead + "1" else 0.0)) for t, q in first]
    if 10 in dist and 1 not in dist:
        first.append((lead + "1", 0.8 * dist[10]))
    first += [(".", 0.08), (' "', 0.06), ("```", 0.04), ("The", 0.02)]
    chosen = dict(first)[lead + digits[0]]
    entries = [entry(t, 0.99) for t in pieces(head)]
    entries.append(entry(lead + digits[0], chosen, first))
    if digits[0] == "1":
        ones, ten = dist.get(1, 0.0), dist.get(10, 0.0)
        terminator = content[end] if score == 10 else content[at + 1]
        second = [("0", 0.7 * ten / (ones + ten)), (terminator, 0.7 * ones / (ones + ten)), ("5", 0.2), (".", 0.1)]
        entries.append(entry(digits[1:] or terminator, dict(second)[digits[1:] or terminator], second))
        rest = content[end:] if score == 10 else content[at + 2:]
    else:
        rest = content[end:]
    entries += [entry(t, 0.99) for t in pieces(rest)]
    assert "".join(e["token"] for e in entries) == content
    return entries


def damaged(entries: list[dict], values: str) -> list[dict]:
    """Spoil the log-probabilities as the behaviour asks: "probs" turns each into its probability,
    "inf" sets the first position with alternatives (the score's digit) to +infinity."""
    if values == "probs":
        for e in entries:
            for item in [e, *e["top_logprobs"]]:
                item["logprob"] = math.exp(item["logprob"])
    elif values == "inf":
        digit = next(e for e in entries if len(e["top_logprobs"]) > 1)
        digit["logprob"] = digit["top_logprobs"][0]["logprob"] = math.inf
    return entries


def asked_reason(schema: Any) -> str:
    """Which reason the request's schema allows: full, short (maxLength) or none."""
    properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
    if "reason" not in properties and isinstance(schema, dict) and "score" in properties:
        return "none"
    return "short" if isinstance(properties.get("reason"), dict) and "maxLength" in properties["reason"] else "full"


def code_of(prompt: str) -> str:
    """Pull the function back out of a rendered prompt (the last fenced block)."""
    found = re.findall(r"```\n(.*?)\n```", prompt, re.S)
    return found[-1] if found else prompt


@dataclass
class Behaviour:
    """What the server does; tests change fields while it runs."""

    api: str = "ollama"                   # "ollama" or "openai"
    models: dict[str, str] = field(default_factory=lambda: {"qwen2.5-coder:7b": DIGEST})
    latency: float = 0.0                  # seconds of work per request when alone
    per_char: float = 0.0                 # extra seconds of work per prompt character
    slots: int = 8                        # requests served at once; the rest queue
    alpha: float = 1.0                    # throughput grows as n ** alpha up to peak
    peak: int = 1_000_000
    beta: float = 0.0                     # and falls as (peak / n) ** beta beyond it
    load_delay: float = 0.0               # extra delay of the first chat request (model load)
    fail_500: float = 0.0                 # shares of chat requests that fail in each way
    busy_503: float = 0.0
    reset: float = 0.0                    # connection closed mid-request
    garbage: float = 0.0                  # 200 with content that is not JSON
    garbage_after: int | None = None      # after this many good answers, every answer is prose (a model gone bad)
    hang: float = 0.0                     # never answers
    out_of_range: float = 0.0             # answers score 15
    poison: str | None = None             # code containing this crashes the runner (500)
    bad_for: str | None = None            # code containing this always gets a score of 0
    chat_status: int | None = None        # answer every chat with this status (e.g. 401)
    reject_json_schema: bool = False      # llama-cpp-python: 500 on response_format json_schema
    n_ctx: int | None = None              # OpenAI mode: 400 when prompt tokens exceed this
    api_key: str | None = None            # demand "Authorization: Bearer <key>" (401 otherwise)
    basic_auth: str | None = None         # a proxy demanding "Authorization: Basic" of this "user:password"
    error_200: str | None = None          # LM Studio: answer chats 200 {"error": this}
    redirect: int | None = None           # answer scoring chats with this 3xx status, pointing elsewhere
    raw_200: str | None = None            # answer scoring chats 200 with this text/html body (a proxy's page)
    nested_errors: bool = True            # OpenAI mode: {"error": {"message"}} or flat {"object": "error"}
    shape: str | None = None              # a 200 of an unexpected shape: one of SHAPES
    gzip_broken: bool = False             # answer chats with Content-Encoding: gzip and a corrupt body
    huge_body: int = 0                    # pad each chat answer (valid JSON) to at least this many bytes
    load_error: str | None = None         # the model cannot load: every chat, and the load, get 500 {"error": this}
    trickle: tuple[str, ...] = ()         # "root" (GET /) and/or "load" (empty chat): one byte at a time, forever
    logprobs: str = "on"                  # "on": give them when asked; "spaced": digit tokens carry a leading
                                          # space; "off": never (older Ollama); "reject": 400 when asked
    logprob_values: str = "log"           # "log"; "probs": probabilities 0..1 where log-probabilities belong;
                                          # "inf": the score digit's logprob is Infinity (Python's json.dumps)
    verdict: str = "hash"                 # "hash": expected_score(code); "docs": 8 for documented code, 2
                                          # otherwise; "flat": 5 for everything (a model that cannot tell)
    reason_first: bool = False            # write the reason before the score in the JSON object
    null_reason: bool = False             # write "reason": null (a model the schema does not hold to a string)
    reason_text: str | None = None        # the reason every answer gives (JSON-escaped as any other text)
    per_token: float = 0.0                # extra seconds of work per generated token
    queued_rejections: bool = False       # llama-cpp-python: requests wait their turn (slots) even to be rejected
    full_tokens: int = 12                 # generated tokens per answer for each reason mode
    short_tokens: int = 9
    none_tokens: int = 6
    hold_after: int | None = None         # after this many answers, chats (and the first model load) wait in
                                          # flight until release(): a server that stops answering, on cue
    seed: int = 0
    owned_by: str = "fake"                # OpenAI mode: /v1/models' owned_by (llama.cpp: "llamacpp";
                                          # llama-cpp-python: "me")


SHAPES = {
    # Ollama chat answers
    "content_list": lambda a: {**a, "message": {"role": "assistant", "content": [{"type": "text", "text": "7"}]}},
    "content_number": lambda a: {**a, "message": {"role": "assistant", "content": 7}},
    "message_string": lambda a: {**a, "message": a["message"]["content"]},
    "eval_count_text": lambda a: {**a, "prompt_eval_count": "many"},
    # OpenAI-compatible chat answers
    "choices_null": lambda a: {**a, "choices": [None]},
    "usage_text": lambda a: {**a, "usage": "n/a"},
}


def go_duration_error(text: str) -> str | None:
    """Return the error Go's time.ParseDuration gives for text (None if it parses), as Ollama reports it."""
    if text in ("0", "+0", "-0"):
        return None
    rest = text.lstrip("+-")
    if not rest:
        return f'time: invalid duration "{text}"'
    while rest:
        number = re.match(r"(\d*)(\.\d*)?", rest)
        if not (number.group(1) or (number.group(2) or "")[1:]):
            return f'time: invalid duration "{text}"'
        rest = rest[number.end():]
        unit = re.match(r"[^\d.]*", rest).group(0)
        if not unit:
            return f'time: missing unit in duration "{text}"'
        if unit not in ("ns", "us", "\u00b5s", "\u03bcs", "ms", "s", "m", "h"):
            return f'time: unknown unit "{unit}" in duration "{text}"'
        rest = rest[len(unit):]
    return None


def keep_alive_error(body: dict) -> str | None:
    """Ollama's api.Duration: a number of seconds, or a Go duration string; anything else is a 400."""
    value = body.get("keep_alive") if isinstance(body, dict) else None
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return None
    if isinstance(value, str):
        return go_duration_error(value)
    return f"Unsupported type: '{type(value).__name__}'"


class FakeOllama:
    """One fake server on its own event loop thread."""

    def __init__(self, behaviour: Behaviour | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.behaviour = behaviour or Behaviour()
        self.host, self.port = host, port
        self.rng = random.Random(self.behaviour.seed)
        self.requests: list[tuple[str, str, Any]] = []     # (method, path, body)
        self.chats = 0                # chat requests that reached the model
        self.answered = 0             # chat requests answered 200 with a score
        self.cancelled = 0            # chat requests abandoned by the client
        self.active_max = 0
        self.held = 0                 # chat requests waiting for release()
        self.loaded = False
        self._released: asyncio.Event | None = None
        self._active: dict[int, list] = {}     # id -> [remaining work, future]
        self._waiting: list[tuple[int, float, asyncio.Future]] = []
        self._wake: asyncio.Event | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ids = 0

    # ── lifecycle (called from the test thread)

    def start(self) -> FakeOllama:
        ready = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._open())
            ready.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _call(self, coro) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def go_down(self) -> None:
        """Close the listening socket and every open connection (the port refuses)."""
        self._call(self._close())

    def come_back(self) -> None:
        """Listen again on the same port."""
        self._call(self._listen())

    def release(self, hold_after: int | None = None) -> None:
        """Let every held request go on; hold again once `hold_after` answers have been given in all."""
        self._call(self._release(hold_after))

    def stop(self) -> None:
        if self._loop is not None:
            self._call(self._close())
            self._call(self._halt())
            if self._thread is not None:          # its own loop; a fleet stops its shared one
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(5)

    def chat_bodies(self) -> list[dict]:
        return [body for method, path, body in self.requests if path in ("/api/chat", "/v1/chat/completions")
                and isinstance(body, dict) and body.get("messages")]

    # ── server internals

    async def _open(self) -> None:
        self._released = asyncio.Event()
        await self._listen()
        self._scheduler_task = asyncio.get_running_loop().create_task(self._scheduler())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._connection, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _halt(self) -> None:
        self._scheduler_task.cancel()
        try:
            await self._scheduler_task
        except asyncio.CancelledError:
            pass

    async def _release(self, hold_after: int | None) -> None:
        self.behaviour.hold_after = hold_after
        self._released.set()
        self._released = asyncio.Event()       # the next hold waits on a fresh event

    async def _hold(self, reader: asyncio.StreamReader) -> bool:
        """Keep a chat request waiting until release(); False if the client left meanwhile."""
        released = asyncio.ensure_future(self._released.wait())
        gone = asyncio.ensure_future(reader.read(1))
        self.held += 1
        try:
            await asyncio.wait([released, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.held -= 1
            for waiting in (released, gone):
                if not waiting.done():
                    waiting.cancel()
                    try:
                        await waiting
                    except asyncio.CancelledError:
                        pass
        return released.done() and not gone.done()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
                raw = await reader.readexactly(int(headers.get("content-length", 0)))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                path = target.split("?", 1)[0]
                self.requests.append((method, path, body))
                if self.behaviour.api_key and headers.get("authorization") != f"Bearer {self.behaviour.api_key}":
                    reply = (401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}},
                             "application/json")
                elif self.behaviour.basic_auth and headers.get("authorization") != \
                        "Basic " + base64.b64encode(self.behaviour.basic_auth.encode()).decode():
                    reply = 401, b"401 Authorization Required", "text/html"
                else:
                    reply = await self._route(method, path, body, reader, writer)
                if reply is None:          # connection dropped on purpose
                    return
                status, payload, ctype, *extra = reply
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                more = "".join(f"{k}: {v}\r\n" for k, v in (extra[0] if extra else {}).items())
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {len(data)}\r\n"
                             f"{more}Connection: keep-alive\r\n\r\n".encode() + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    async def _route(self, method, path, body, reader, writer):
        b = self.behaviour
        if b.api == "ollama":
            if path == "/" and method in ("GET", "HEAD"):
                if "root" in b.trickle:
                    return await self._trickle(writer, reader)
                return 200, b"Ollama is running", "text/plain"
            if path == "/api/version":
                return 200, {"version": "0.5.1"}, "application/json"
            if path == "/api/tags":
                if b.shape == "tags_strings":
                    return 200, {"models": list(b.models)}, "application/json"
                return 200, {"models": [{"name": n, "model": n, "digest": d, "size": 4_683_087_332,
                                         "details": {"format": "gguf", "quantization_level": "Q4_K_M"}}
                                        for n, d in b.models.items()]}, "application/json"
            if path == "/api/pull" and method == "POST":
                name = body.get("model", "")
                b.models[name if ":" in name else name + ":latest"] = DIGEST
                lines = [{"status": "pulling manifest"}, {"status": "pulling a80c", "total": 100, "completed": 100},
                         {"status": "success"}]
                return 200, "\n".join(json.dumps(x) for x in lines).encode() + b"\n", "application/x-ndjson"
            if path == "/api/chat" and method == "POST":
                if problem := keep_alive_error(body):
                    return 400, {"error": problem}, "application/json"
                if "load" in b.trickle and not (body or {}).get("messages"):
                    return await self._trickle(writer, reader)
                return await self._chat(body, reader, openai=False)
        else:
            if path == "/v1/models":
                return 200, {"object": "list", "data": [{"id": n, "object": "model", "owned_by": b.owned_by}
                                                        for n in b.models]}, "application/json"
            if path == "/v1/chat/completions" and method == "POST":
                return await self._chat(body, reader, openai=True)
        return 404, {"detail": "Not Found"} if b.api != "ollama" else b"404 page not found", "application/json"

    async def _chat(self, body: dict, reader: asyncio.StreamReader, openai: bool):
        b = self.behaviour
        model = body.get("model", "")
        known = model if openai or ":" in model else model + ":latest"
        if b.chat_status:
            return b.chat_status, {"error": f"status {b.chat_status}"}, "application/json"
        if b.error_200:
            return 200, {"error": b.error_200}, "application/json"
        if known not in b.models:
            if openai:
                return 404, {"error": {"message": f"The model `{model}` does not exist.", "type": "not_found_error"}}, \
                    "application/json"
            return 404, {"error": f"model '{model}' not found"}, "application/json"
        if b.load_error:
            return 500, {"error": b.load_error}, "application/json"
        messages = body.get("messages") or []
        if b.hold_after is not None and self.answered >= b.hold_after and (messages or not self.loaded) \
                and not await self._hold(reader):
            self.cancelled += 1
            return None
        if not messages:                                   # Ollama: an empty chat loads the model
            await self._load()
            return 200, {"model": model, "created_at": "2024-12-06T00:48:09Z",
                         "message": {"role": "assistant", "content": ""}, "done_reason": "load", "done": True}, \
                "application/json"
        if b.redirect:
            target = "/v2/chat" if not openai else "/v2/chat/completions"
            return b.redirect, b"", "text/plain", {"Location": f"http://{self.host}:{self.port}{target}"}
        if b.raw_200 is not None:
            return 200, b.raw_200.encode(), "text/html"
        prompt = messages[-1].get("content", "")
        code = code_of(prompt)
        if b.queued_rejections and not await self._serve(b.latency, reader):
            return None
        if body.get("logprobs") and b.logprobs == "reject":
            message = "Requested top_logprobs of 20 but logprobs are not supported by this server"
            if openai:
                return 400, {"error": {"message": message, "type": "invalid_request_error"}}, "application/json"
            return 400, {"error": message}, "application/json"
        if openai:
            fmt = body.get("response_format") or {}
            if b.reject_json_schema and fmt.get("type") == "json_schema":
                return 500, {"error": {"message": "[{'type': 'literal_error', 'loc': ('body', 'response_format', "
                                                  "'type'), 'msg': \"Input should be 'text' or 'json_object'\"}]",
                                       "type": "internal_server_error"}}, "application/json"
            tokens = len(prompt) // 4
            if b.n_ctx and tokens + int(body.get("max_tokens") or 0) > b.n_ctx:
                message = f"Requested tokens ({tokens}) exceed context window of {b.n_ctx}"
                if not b.nested_errors:         # vLLM before 0.10.1
                    return 400, {"object": "error", "message": message, "type": "BadRequestError",
                                 "code": 400}, "application/json"
                return 400, {"error": {"message": message, "type": "invalid_request_error", "param": "messages",
                                       "code": "context_length_exceeded"}}, "application/json"
        self.chats += 1
        roll = self.rng.random()
        edges = [b.fail_500, b.busy_503, b.reset, b.hang, b.garbage, b.out_of_range]
        fault = None
        for name, share in zip(("500", "503", "reset", "hang", "garbage", "range"), edges):
            if roll < share:
                fault = name
                break
            roll -= share
        if b.poison and b.poison in code:
            fault = "poison"
        if fault == "503":
            return 503, {"error": "server busy, please try again.  maximum pending requests exceeded"}, \
                "application/json"
        if fault == "poison":
            return 500, {"error": "llama runner process has terminated: exit status 2"}, "application/json"
        if fault == "hang":
            await reader.read()          # until the client gives up
            self.cancelled += 1
            return None
        await self._load()
        if openai:
            fmt = body.get("response_format") or {}
            reason = asked_reason(fmt.get("schema") or (fmt.get("json_schema") or {}).get("schema"))
        else:
            reason = asked_reason(body.get("format"))
        generated = {"full": b.full_tokens, "short": b.short_tokens, "none": b.none_tokens}[reason]
        work = b.latency + b.per_char * len(prompt) + b.per_token * generated
        if not await self._serve(work, reader):
            self.cancelled += 1
            return None
        if fault == "500":
            return 500, {"error": "model runner has unexpectedly stopped, this may be due to resource limitations"}, \
                "application/json"
        if fault == "reset":
            return None
        score = {"hash": expected_score(code), "docs": 8 if documented(code) else 2, "flat": 5}[b.verdict]
        if fault == "range" or (b.bad_for and b.bad_for in code):
            score = 15 if fault == "range" else 0
        answer = {"score": score}
        if reason != "none":
            answer["reason"] = (b.reason_text if b.reason_text is not None
                                else f"fake verdict for {len(code)} chars")[:30 if reason == "short" else None]
            if b.null_reason:
                answer["reason"] = None
        if b.reason_first:
            answer = dict(reversed(answer.items()))
        content = json.dumps(answer)
        logprobs = None
        if body.get("logprobs") and b.logprobs in ("on", "spaced") and 1 <= score <= 10:
            logprobs = damaged(logprob_entries(content, score, spaced=b.logprobs == "spaced"), b.logprob_values)
        if fault == "garbage" or (b.garbage_after is not None and self.answered >= b.garbage_after):
            content, logprobs = "Sure! Here is my rating: great code", None
        self.answered += 1
        if openai:
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            if logprobs:
                choice["logprobs"] = {"content": logprobs}
            answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()), "model": model,
                      "choices": [choice],
                      "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": generated,
                                "total_tokens": len(prompt) // 4 + generated}}
        else:
            answer = {"model": model, "created_at": "2024-12-06T00:48:09.983619Z",
                      "message": {"role": "assistant", "content": content}, "done_reason": "stop", "done": True,
                      "total_duration": int(work * 1e9), "prompt_eval_count": len(prompt) // 4,
                      "eval_count": generated}
            if logprobs:
                answer["logprobs"] = logprobs
        return self._encode(SHAPES[b.shape](answer) if b.shape in SHAPES else answer)

    def _encode(self, answer: dict):
        """Serialize a 200 answer, damaged or bloated as the behaviour asks."""
        b = self.behaviour
        data = json.dumps(answer).encode()
        if b.huge_body:
            data += b" " * max(0, b.huge_body - len(data))        # still valid JSON
        if b.gzip_broken:
            return 200, gzip.compress(data)[:12] + b"\x00not gzip at all", "application/json", \
                {"Content-Encoding": "gzip"}
        return 200, data, "application/json"

    async def _trickle(self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader):
        """Promise a long answer and send it one byte at a time until the client leaves."""
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 1000000000\r\n\r\n")
        gone = asyncio.ensure_future(reader.read(1))
        try:
            while not gone.done():
                writer.write(b"O")
                await writer.drain()
                await asyncio.wait([gone], timeout=0.2)
        finally:
            gone.cancel()
        return None

    async def _load(self) -> None:
        if not self.loaded:
            self.loaded = True
            if self.behaviour.load_delay:
                await asyncio.sleep(self.behaviour.load_delay)

    # ── processor-sharing service

    def _speed(self, n: int) -> float:
        b = self.behaviour
        if n <= b.peak:
            return n ** b.alpha
        return (b.peak ** b.alpha) * (b.peak / n) ** b.beta

    async def _serve(self, work: float, reader: asyncio.StreamReader) -> bool:
        """Do `work` seconds of solo work under the service model; False if the client left."""
        if work <= 0:
            return True
        done = asyncio.get_running_loop().create_future()
        self._ids += 1
        ident = self._ids
        self._waiting.append((ident, work, done))
        self._wake.set()
        gone = asyncio.ensure_future(reader.read(1))
        try:
            await asyncio.wait([done, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not done.done():
                done.cancel()
                self._waiting = [w for w in self._waiting if w[0] != ident]
                self._active.pop(ident, None)
                self._wake.set()
            if not gone.done():
                gone.cancel()
                try:
                    await gone       # let the reader forget the cancelled read before the next request
                except asyncio.CancelledError:
                    pass
        return done.done() and not done.cancelled()

    async def _scheduler(self) -> None:
        self._wake = asyncio.Event()
        last = time.monotonic()
        while True:
            now = time.monotonic()
            n = len(self._active)
            if n:
                each = self._speed(n) / n
                for ident, entry in list(self._active.items()):
                    entry[0] -= (now - last) * each
                    if entry[0] <= 1e-6:
                        del self._active[ident]
                        if not entry[1].done():
                            entry[1].set_result(True)
            last = now
            while self._waiting and len(self._active) < self.behaviour.slots:
                ident, work, fut = self._waiting.pop(0)
                if not fut.done():
                    self._active[ident] = [work, fut]
            self.active_max = max(self.active_max, len(self._active))
            n = len(self._active)
            timeout = None
            if n:
                each = self._speed(n) / n
                timeout = max(0.0005, min(e[0] for e in self._active.values()) / each)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except asyncio.TimeoutError:
                pass


class FakeFleet:
    """Many fake servers sharing one event loop thread: a wide fleet without a thread per server."""

    def __init__(self) -> None:
        self.servers: list[FakeOllama] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def add(self, behaviour: Behaviour | None = None, host: str = "127.0.0.1") -> FakeOllama:
        """Start one more server on the shared loop."""
        server = FakeOllama(behaviour, host)
        server._loop = self._loop
        asyncio.run_coroutine_threadsafe(server._open(), self._loop).result(10)
        self.servers.append(server)
        return server

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    for name, kind in (("latency", float), ("per_char", float), ("slots", int), ("alpha", float), ("peak", int),
                       ("beta", float), ("load_delay", float), ("fail_500", float), ("api", str)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(Behaviour(), name))
    args = parser.parse_args()
    behaviour = Behaviour(**{k: v for k, v in vars(args).items() if k not in ("host", "port")})
    server = FakeOllama(behaviour, args.host, args.port).start()
    print(f"PORT {server.port}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
