"""Direct tests of rules the end-to-end suite reaches only through a run: the dispatch arithmetic on
synthetic lanes with an injected clock, server answers as recorded in the servers' documented shapes,
the checkpoint's line scanner and the id keys resume and export share.

Expected values are worked out here from each rule's meaning, not copied from the function's output.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random

import httpx
import pytest

import score
from score import Lane

# ── dispatch arithmetic, with the clock passed in ──────────────────────────────

T0 = 5000.0


def lane(service: float | None, slots: int = 1, inflight: int = 0, started: float | None = None,
         ready: bool = True) -> Lane:
    return Lane(ready, service, slots, inflight, started)


def test_a_new_row_never_finishes_sooner_than_one_service_time():
    assert score.finish_in(lane(0.5, slots=4), 1, T0) == 0.5               # 4 slots free: still 0.5 s of work
    assert score.finish_in(lane(0.5, slots=4), 4, T0) == 0.5
    assert score.finish_in(lane(0.5, slots=4), 5, T0) == pytest.approx(0.625)   # the fifth waits for a slot


def test_a_busy_lane_finishes_slots_rows_per_service_time_from_its_oldest_start():
    # 4 slots, 0.5 s each, 4 rows running since 0.1 s ago: they end 0.4 s from now, then one
    # row every 0.125 s; the first new row is the fifth: 5 × 0.125 - 0.1 = 0.525 s from now.
    busy = lane(0.5, slots=4, inflight=4, started=T0 - 0.1)
    assert score.finish_in(busy, 1, T0) == pytest.approx(0.525)
    assert score.finish_in(busy, 2, T0) == pytest.approx(0.650)
    # What a request ran beyond one service time counts no more: it is late, not nearly done.
    late = lane(1.0, inflight=1, started=T0 - 2.5)
    assert score.finish_in(late, 1, T0) == pytest.approx(1.0)


def brute_rows_before(one: Lane, deadline: float, now: float) -> int:
    """Count n = 1, 2, ... with finish_in(n) < deadline, one by one."""
    n = 0
    while score.finish_in(one, n + 1, now) < deadline:
        n += 1
    return n


def test_rows_before_counts_exactly_the_rows_that_finish_before_the_deadline():
    rng = random.Random(4)
    for _ in range(3000):
        service = rng.choice([0.05, 0.1, 0.3, 1.0, 2.0, 7.5])
        slots = rng.choice([1, 2, 4, 8])
        inflight = rng.randrange(0, 3 * slots)
        started = T0 - rng.uniform(0, 2.9 * service) if inflight else None     # never overdue here
        one = lane(service, slots, inflight, started)
        deadline = rng.uniform(0.01, 12.0)
        assert score.rows_before(one, deadline, T0) == brute_rows_before(one, deadline, T0), (one, deadline)


def test_lanes_out_of_service_unmeasured_or_stalled_finish_nothing():
    assert score.rows_before(lane(0.1, ready=False), 10.0, T0) == 0
    assert score.rows_before(lane(None), 10.0, T0) == 0
    stalled = lane(0.1, inflight=1, started=T0 - 0.31)                     # past 3 service times
    assert score.overdue(stalled, T0) and score.rows_before(stalled, 10.0, T0) == 0
    merely_slow = lane(0.1, inflight=1, started=T0 - 0.29)
    assert not score.overdue(merely_slow, T0) and score.rows_before(merely_slow, 10.0, T0) > 0


def test_the_same_lanes_decide_differently_as_the_clock_moves():
    # A 1.2 s endpoint beside a 1 s one busy with a row started at T0: a new row there ends at
    # T0 + 2 s. The idle one takes the last row while it would finish first, and leaves it after.
    me, other = lane(1.2), lane(1.0, inflight=1, started=T0)
    for elapsed, takes in ((0.1, True), (0.7, True), (0.9, False), (0.99, False)):
        now = T0 + elapsed
        finish_there = 2.0 - elapsed
        assert (1.2 <= finish_there) is takes
        assert score.takes_queued_row(me, iter([other]), 1, now) is takes, elapsed
    # once that row is overdue (3 service times) the other is not counted on: take it
    assert score.takes_queued_row(me, iter([other]), 1, T0 + 3.5)


def test_a_queue_too_long_for_the_others_is_shared():
    # Two 0.1 s lanes each finish 11 new rows within 1.2 s: 22 rows are theirs, a 23rd is not.
    others = [lane(0.1), lane(0.1)]
    assert not score.takes_queued_row(lane(1.2), iter(others), 22, T0)
    assert score.takes_queued_row(lane(1.2), iter(others), 23, T0)


def test_a_copy_is_raced_while_its_remaining_time_is_long_then_not_then_again_once_stalled():
    slow = lane(4.0, inflight=1, started=T0)
    copies = lambda: iter([("row", slow, T0, 1)])          # noqa: E731
    # an idle 1 s endpoint races a copy that still needs more than 2 s (HEDGE_RATIO 0.5)
    assert score.race_target(1.0, copies(), T0 + 0.5) == "row"       # 3.5 s left
    assert score.race_target(1.0, copies(), T0 + 1.9) == "row"       # 2.1 s left
    assert score.race_target(1.0, copies(), T0 + 2.1) is None        # 1.9 s left: not worth a copy
    assert score.race_target(1.0, copies(), T0 + 11.9) is None       # late, not yet overdue
    assert score.race_target(1.0, copies(), T0 + 12.1) == "row"      # beyond 3 service times: stalled


def test_the_copy_needing_longest_is_raced_first():
    now = T0 + 1.0
    a = lane(3.0, inflight=1, started=T0)          # 2 s left
    b = lane(9.0, inflight=1, started=T0)          # 8 s left
    c = lane(5.0, inflight=1, started=T0)          # 4 s left
    for order in itertools.permutations([("a", a, T0, 1), ("b", b, T0, 1), ("c", c, T0, 1)]):
        assert score.race_target(0.5, iter(order), now) == "b"
    assert score.race_target(1.5, iter([("a", a, T0, 1), ("c", c, T0, 1)]), now) == "c"   # 1.5 < 2.0, not < 1.0


# ── server answers in the servers' documented shapes ───────────────────────────

OLLAMA = "http://127.0.0.1:11434/api/chat"
OPENAI = "http://127.0.0.1:8080/v1/chat/completions"


@pytest.fixture(scope="module")
def endpoints(tmp_path_factory):
    """An Ollama endpoint and an OpenAI-compatible one, built the way a run builds them."""
    folder = tmp_path_factory.mktemp("fleet")
    listing = folder / "endpoints.txt"
    listing.write_text("127.0.0.1:11434 name=ollama api=ollama\nhttp://127.0.0.1:8080/v1 name=openai\n")
    config = score.parse_args([str(folder / "fns.jsonl"), "--endpoints", str(listing), "--model", "foo"])
    return {spec.name: score.Endpoint(spec, config) for spec in config.endpoints}


def answer(status: int, body=None, url: str = OLLAMA, headers: dict | None = None,
           text: str | None = None) -> httpx.Response:
    """A server's answer as httpx hands it over: a JSON body, or raw text."""
    request = httpx.Request("POST", url)
    if text is not None:
        return httpx.Response(status, text=text, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


def test_ollama_request_cancelled_is_a_passing_fault_not_an_overload(endpoints):
    result = score.classify(endpoints["ollama"], answer(499, {"error": "request canceled"}))
    assert type(result) is score.EndpointFault and not result.overload
    assert "request canceled" in str(result)


@pytest.mark.parametrize("header, wait", [("30", 30.0), ("1.5", 1.5), ("0", 0.0), ("-4", 0.0), (None, None),
                                          ("soon", None)])
def test_openai_rate_limit_is_an_overload_with_its_retry_after(endpoints, header, wait):
    body = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
    response = answer(429, body, OPENAI, headers={"Retry-After": header} if header is not None else None)
    result = score.classify(endpoints["openai"], response)
    assert type(result) is score.EndpointFault and result.overload
    assert result.retry_after == wait                # a negative wait is no wait; text is no figure


@pytest.mark.parametrize("status, text", [
    (500, "Internal Server Error"),
    (502, "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"),
    (503, "upstream connect error or disconnect/reset before headers"),
])
def test_plain_text_errors_from_a_proxy_are_passing_faults_that_quote_it(endpoints, status, text):
    result = score.classify(endpoints["openai"], answer(status, text=text, url=OPENAI))
    assert type(result) is score.EndpointFault and result.overload is (status == 503)
    assert f"HTTP {status}" in str(result) and text.split(">")[-1][:10] in str(result)


def test_an_empty_error_body_still_names_the_status(endpoints):
    result = score.classify(endpoints["ollama"], answer(500, text=""))
    assert type(result) is score.EndpointFault and "500" in str(result)


def test_an_error_object_without_a_message_is_shown_whole(endpoints):
    body = {"error": {"code": 500, "type": "server_error"}}
    result = score.classify(endpoints["openai"], answer(500, body, OPENAI))
    assert type(result) is score.EndpointFault
    assert "server_error" in str(result)


@pytest.mark.parametrize("api, body", [
    ("ollama", {"error": "Requested top_logprobs of 20 but logprobs are not supported by this server"}),
    ("openai", {"error": {"message": "logprobs is not supported", "type": "invalid_request_error"}}),
])
def test_a_refusal_of_probabilities_is_told_apart_from_a_bad_row(endpoints, api, body):
    result = score.classify(endpoints[api], answer(400, body, OLLAMA if api == "ollama" else OPENAI))
    assert type(result) is score.LogprobsRejected


def test_a_redirect_takes_the_endpoint_out_and_says_where_it_points(endpoints):
    response = answer(307, text="", headers={"Location": "http://127.0.0.1:9999/api/chat"})
    result = score.classify(endpoints["ollama"], response)
    assert isinstance(result, score.EndpointGone) and "http://127.0.0.1:9999/api/chat" in str(result)


def test_an_unprocessable_request_costs_the_row_an_attempt(endpoints):
    body = {"detail": [{"type": "missing", "loc": ["body", "messages"], "msg": "Field required"}]}
    result = score.classify(endpoints["ollama"], answer(422, body))
    assert type(result) is score.ItemFault and result.kind == "rejected"


@pytest.mark.parametrize("status", [413, 500, 503])
def test_context_words_in_an_answer_other_than_a_400_are_no_overflow(status):
    message = f"HTTP {status}: maximum context length is 2048 tokens, you requested 3000 tokens"
    assert score.context_overflow(status, answer(status, {"error": message}), message) is None


def test_llama_server_overflow_without_the_prompt_count_keeps_the_limit():
    body = {"error": {"code": 400, "message": "the request exceeds the available context size",
                      "type": "exceed_context_size_error", "n_ctx": 4096}}
    message = "HTTP 400: the request exceeds the available context size"
    found = score.context_overflow(400, answer(400, body, OPENAI), message)
    assert (found.requested, found.limit) == (None, 4096)


# ── token probabilities: where each API puts them ──────────────────────────────

ENTRY = {"token": "7", "logprob": -0.1, "bytes": [55], "top_logprobs": [{"token": "7", "logprob": -0.1}]}


def test_ollama_entries_are_read_from_the_top_level():
    data = {"model": "m", "message": {"role": "assistant", "content": "7"}, "done": True, "logprobs": [ENTRY]}
    assert score.token_entries("ollama", data) == [ENTRY]
    assert score.token_entries("openai", data) is None                     # not where OpenAI puts them


def test_openai_entries_are_read_from_the_first_choice():
    data = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "7"},
                         "logprobs": {"content": [ENTRY]}, "finish_reason": "stop"}]}
    assert score.token_entries("openai", data) == [ENTRY]
    assert score.token_entries("ollama", data) is None


@pytest.mark.parametrize("api, data", [
    ("ollama", {"done": True}),                                            # an older Ollama: no key at all
    ("ollama", {"logprobs": None}),
    ("ollama", {"logprobs": []}),
    ("ollama", {"logprobs": [ENTRY, "7"]}),
    ("ollama", {"logprobs": [{"logprob": -0.1}]}),                        # an entry without its token
    ("ollama", {"logprobs": {"content": [ENTRY]}}),
    ("openai", {"choices": [{"message": {"content": "7"}, "logprobs": None}]}),   # not asked, or not given
    ("openai", {"choices": []}),
    ("openai", {"choices": None}),
    ("openai", {"choices": [None]}),
    ("openai", {"choices": [{"logprobs": {"content": None}}]}),
    ("openai", {"choices": [{"logprobs": {"content": [{"token": 7, "logprob": -0.1}]}}]}),
])
def test_missing_or_malformed_entries_give_none(api, data):
    assert score.token_entries(api, data) is None


def test_a_recorded_openai_answer_of_ten_yields_its_expected_score():
    # {"score": 10}: "1" then "0". At the first digit the grammar allows "1" (1 or 10) and "9";
    # "." is forbidden. After the "1", "0" (10) against "}" (1) splits the "1" 3 : 1.
    def e(token, p, alts):
        return {"token": token, "logprob": math.log(p),
                "top_logprobs": [{"token": t, "logprob": math.log(q)} for t, q in alts]}
    content = [e('{"', 0.99, [('{"', 0.99)]), e("score", 0.99, [("score", 0.99)]), e('":', 0.99, [('":', 0.99)]),
               e(" ", 0.99, [(" ", 0.99)]), e("1", 0.6, [("1", 0.6), ("9", 0.2), (".", 0.2)]),
               e("0", 0.75, [("0", 0.75), ("}", 0.25)]), e("}", 0.99, [("}", 0.99)])]
    data = {"choices": [{"message": {"content": '{"score": 10}'}, "logprobs": {"content": content}}]}
    entries = score.token_entries("openai", data)
    ones, nine = 0.6 / 0.8, 0.2 / 0.8                   # renormalized without "."
    expected = 10 * ones * 0.75 + 1 * ones * 0.25 + 9 * nine
    assert score.expected_score(entries, 10) == pytest.approx(expected, abs=1e-3)


# ── the checkpoint's lines: fast scan and fallback agree ───────────────────────

# The field order README shows for a record; score.py writes every record in it.
FIELDS = ("id", "score", "reason", "score_expected", "model", "model_digest", "endpoint", "attempts", "latency_s",
          "prompt_tokens", "output_tokens", "truncated", "temperature", "seed", "hash", "duplicate_of", "ts",
          "error", "error_kind")


def record(ident, value, kind=None, digest="d7bba0ea396eed5d", **more) -> dict:
    out = dict.fromkeys(FIELDS)
    out.update(id=ident, score=value, error_kind=kind, hash=digest, attempts=1, truncated=False, ts=1795673575.1,
               **more)
    if kind is not None:
        out["error"] = "what went wrong"
    return out


def blake(data: bytes) -> int:
    """The rule's digest: blake2b-64, read as a signed little-endian integer."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little", signed=True)


def key_by_meaning(ident, kind) -> int:
    """A record's key from the documented rule, without score.py's helpers."""
    if type(ident) is str and kind in ("no_id", "bad_id", "malformed"):
        return blake(b"\xffl" + ident.encode())                  # the row's label, apart from any real id
    if type(ident) is int:
        return ident if -(1 << 63) <= ident < (1 << 63) else blake(b"\xffi" + str(ident).encode())
    return blake(ident.encode())


IDS = ["fn-1", "1", 1, 0, -7, (1 << 63) - 1, -(1 << 63), 1 << 63, -(1 << 63) - 1, 1 << 64, str(1 << 64),
       'say "hi"', "back\\slash", "tab\there", "naïve", "日本語", "emoji 🎉", "line:4", "row:0", ""]
KINDS = [None, "attempts_exhausted", "poison", "too_long", "empty", "no_id", "bad_id", "malformed", "duplicate_id"]


@pytest.mark.parametrize("ident", IDS, ids=repr)
def test_every_record_score_py_writes_is_read_on_the_fast_path_with_the_documented_key(ident):
    for kind, value, digest in itertools.product(KINDS, (None, 1, 7, 10), ("d7bba0ea396eed5d", None)):
        if value is None and kind is None:
            continue                                             # no such record: a null score says why
        line = score.record_line(record(ident, value, kind, digest))
        assert score.RECORD_FIELDS.match(line), line              # the fast path takes it
        assert score.scan_record(line) == (key_by_meaning(ident, kind), value, digest, kind), line


@pytest.mark.parametrize("ident", IDS[:12], ids=repr)
def test_the_fallback_reads_a_record_in_another_key_order_the_same(ident):
    for kind, value in ((None, 7), ("no_id", None), ("attempts_exhausted", None), ("malformed", None)):
        fields = record(ident, value, kind)
        shuffled = dict(reversed(list(fields.items())))
        line = (json.dumps(shuffled) + "\n").encode()
        assert not score.RECORD_FIELDS.match(line)
        assert score.scan_record(line) == (key_by_meaning(ident, kind), value, fields["hash"], kind)


def test_a_last_line_without_newline_or_with_crlf_is_still_a_record():
    line = score.record_line(record("fn-1", 7))
    expected = (key_by_meaning("fn-1", None), 7, "d7bba0ea396eed5d", None)
    assert score.scan_record(line.rstrip(b"\n")) == expected
    assert score.scan_record(line.rstrip(b"\n") + b"\r\n") == expected


@pytest.mark.parametrize("changes", [
    {"score": 0}, {"score": 11}, {"score": 100},                            # out of 1..10
    {"score": None},                                                         # null score, no error_kind
    {"score": 7.0}, {"score": "7"}, {"score": True},
    {"id": None}, {"id": 1.5}, {"id": True}, {"id": ["a"]},
    {"hash": 12}, {"error_kind": 3},
])
def test_lines_no_version_of_score_py_writes_are_not_records_on_either_path(changes):
    fields = record("fn-1", 7)
    fields.update(changes)
    for line in ((json.dumps(fields) + "\n").encode(), (json.dumps(dict(reversed(fields.items()))) + "\n").encode()):
        assert score.scan_record(line) is None, line


@pytest.mark.parametrize("changes", [{"ts": -1}, {"prompt_tokens": -1}, {"score_expected": 11.5}, {"latency_s": "1s"},
                                     {"truncated": "no"}, {"endpoint": 3}])
def test_an_odd_detail_leaves_a_record_a_record_on_both_paths(changes):
    fields = record("fn-1", 7)
    fields.update(changes)
    fast, slow = ((json.dumps(f) + "\n").encode() for f in (fields, dict(reversed(fields.items()))))
    assert score.scan_record(fast) == score.scan_record(slow) == (score.id_key("fn-1"), 7, fields["hash"], None)


@pytest.mark.parametrize("line", [b"", b"\n", b"# my notes\n", b"[1, 2]\n", b'{"id": "fn-1", "score": 7', b"\xff\xfe\n",
                                  b'{"id": "fn-1"}\n', b"null\n"])
def test_foreign_and_torn_lines_are_not_records(line):
    assert score.scan_record(line) is None


# ── id keys: what resume and export use to pair a row with its records ─────────


def test_an_int_id_is_its_own_key_within_64_bits_and_a_digest_beyond():
    for ident in (0, 1, -1, (1 << 63) - 1, -(1 << 63)):
        assert score.id_key(ident) == ident
    for ident in (1 << 63, -(1 << 63) - 1, 1 << 64, 10 ** 30):
        assert score.id_key(ident) == blake(b"\xffi" + str(ident).encode())


def test_ids_that_read_the_same_but_differ_in_type_are_different_rows():
    for number in (0, 1, -5, (1 << 63) - 1, 1 << 63, 1 << 64):
        assert score.id_key(number) != score.id_key(str(number)), number
        assert score.row_key(number, None) != score.row_key(str(number), None), number
    assert score.id_key("1") == blake(b"1") and score.id_key("") == blake(b"")


@pytest.mark.parametrize("raw, label", [(None, "line:4"), (None, "row:0"), ("x\ud800", "row:3"), ("line:4", "line:9"),
                                        (1, "row:1"), ("1", "row:1"), (1.0, "row:2"), (1 << 64, "line:1")])
def test_the_reader_and_the_record_of_a_row_agree_on_its_key(raw, label):
    ident, problem = score.checked_id(raw, label)
    reader = score.row_key(ident, problem)
    kinds = [problem[0]] if problem else [None, "attempts_exhausted", "poison", "too_long", "empty", "duplicate_id"]
    for kind in kinds:
        assert score.record_key(ident, kind) == reader, (raw, kind)
        line = score.record_line(record(ident, 7 if kind is None else None, kind))
        assert score.scan_record(line)[0] == reader, (raw, kind)


def test_a_null_id_row_and_a_real_id_that_reads_like_its_label_never_share_a_key():
    ident, problem = score.checked_id(None, "line:4")
    assert ident == "line:4" and problem[0] == "no_id"
    real, none = score.checked_id("line:4", "line:9")
    assert real == "line:4" and none is None
    assert score.row_key(ident, problem) != score.row_key(real, none)
    assert score.record_key("line:4", "no_id") != score.record_key("line:4", "attempts_exhausted")
