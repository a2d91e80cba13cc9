"""Direct tests of the pure rules: answers, server errors, text hashes, key sets, and argument parsing.

Server answers are the exact bodies real servers send (see PROTOCOL.md and the servers' sources),
wrapped in real httpx.Response objects; expected values are worked out here from those numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import random
from array import array

import httpx
import pytest

import score

# ── parse_answer: the model's JSON ──────────────────────────────────────────────


@pytest.mark.parametrize("content, expected", [
    ('{"score": 7, "reason": "clear names, one job"}', (7, "clear names, one job")),
    ('  \n{"score": 3, "reason": "deep nesting"}\n ', (3, "deep nesting")),
    ('{"score": 1, "reason": "lowest"}', (1, "lowest")),
    ('{"score": 10, "reason": "highest"}', (10, "highest")),
    ('{"reason": "reason first", "score": 4}', (4, "reason first")),
    ('{"score": 6}', (6, None)),
    ('{"score": 6, "reason": null}', (6, None)),
    ('{"score": 6, "reason": ""}', (6, "")),
])
def test_parse_answer_accepts_a_json_object_with_a_score_in_range(content, expected):
    assert score.parse_answer(content) == expected


@pytest.mark.parametrize("content, expected", [
    ('Sure! Here is my rating: {"score": 4, "reason": "ok"} Hope that helps.', (4, "ok")),
    ('```json\n{"score": 9, "reason": "tidy"}\n```', (9, "tidy")),
    ('```\n{\n  "score": 2,\n  "reason": "no tests"\n}\n```\n', (2, "no tests")),
])
def test_parse_answer_digs_the_object_out_of_prose_and_fences(content, expected):
    assert score.parse_answer(content) == expected


def test_parse_answer_takes_a_whole_float_as_an_integer():
    value, _ = score.parse_answer('{"score": 7.0, "reason": "r"}')
    assert value == 7 and type(value) is int


@pytest.mark.parametrize("content", [
    '{"score": 0, "reason": "r"}',
    '{"score": 11, "reason": "r"}',
    '{"score": 15, "reason": "r"}',
    '{"score": -3, "reason": "r"}',
    '{"score": 7.5, "reason": "r"}',
    '{"score": "7", "reason": "r"}',
    '{"score": true, "reason": "r"}',
    '{"score": null, "reason": "r"}',
    '{"reason": "no score at all"}',
    '[7, "a list"]',
    '7',
    '"seven"',
    'null',
    '',
    'Sure! Here is my rating: great code',
    '{"score": 7, "reason": "cut off',
])
def test_parse_answer_refuses_anything_else_as_a_bad_answer(content):
    with pytest.raises(score.ItemFault) as caught:
        score.parse_answer(content)
    assert caught.value.kind == "bad_answer"


@pytest.mark.parametrize("content, reason", [
    ('{"score": 5, "reason": ["short", "clear"]}', '["short", "clear"]'),
    ('{"score": 5, "reason": 42}', "42"),
    ('{"score": 5, "reason": {"why": "ok"}}', '{"why": "ok"}'),
])
def test_parse_answer_keeps_a_non_string_reason_as_its_json_text(content, reason):
    assert score.parse_answer(content) == (5, reason)


# ── classify / context_overflow: the servers' error answers ─────────────────────

OLLAMA_URL = "http://127.0.0.1:11434/api/chat"
OPENAI_URL = "http://127.0.0.1:8080/v1/chat/completions"


@pytest.fixture
def endpoints(tmp_path):
    """An Ollama endpoint and an OpenAI-compatible one, built the way a run builds them."""
    listing = tmp_path / "endpoints.txt"
    listing.write_text("127.0.0.1:11434 name=ollama api=ollama\nhttp://127.0.0.1:8080/v1 name=openai\n")
    config = score.parse_args([str(tmp_path / "fns.jsonl"), "--endpoints", str(listing), "--model", "foo"])
    built = {spec.name: score.Endpoint(spec, config) for spec in config.endpoints}
    return built


def answer(status: int, body, url: str = OLLAMA_URL, headers: dict | None = None) -> httpx.Response:
    """A server's answer as httpx hands it to us."""
    request = httpx.Request("POST", url)
    if isinstance(body, str):
        return httpx.Response(status, text=body, headers=headers, request=request)
    return httpx.Response(status, json=body, headers=headers, request=request)


@pytest.mark.parametrize("status, body", [
    (404, {"error": "model 'foo' not found"}),
    (404, {"error": 'model "foo" not found, try pulling it first'}),        # older Ollama
    (400, {"error": "model is required"}),
    (400, {"error": '"foo" does not support chat'}),
    (400, {"error": '"foo" does not support thinking'}),
    (401, {"error": "unauthorized"}),
    (403, {"error": "forbidden"}),
])
def test_ollama_refusals_that_no_retry_can_fix_take_the_endpoint_out(endpoints, status, body):
    result = score.classify(endpoints["ollama"], answer(status, body))
    assert isinstance(result, score.EndpointGone)
    assert body["error"] in str(result)


@pytest.mark.parametrize("body", [
    {"error": "llama runner process has terminated: exit status 2"},
    {"error": "model runner has unexpectedly stopped, this may be due to resource limitations"},
    {"error": "model requires more system memory (12.3 GiB) than is available (7.8 GiB)"},
])
def test_ollama_500_is_a_passing_fault_of_the_endpoint(endpoints, body):
    result = score.classify(endpoints["ollama"], answer(500, body))
    assert type(result) is score.EndpointFault
    assert not result.overload and result.retry_after is None
    assert body["error"] in str(result)


def test_ollama_busy_is_overload_and_honours_retry_after(endpoints):
    busy = {"error": "server busy, please try again.  maximum pending requests exceeded"}
    result = score.classify(endpoints["ollama"], answer(503, busy, headers={"Retry-After": "7"}))
    assert type(result) is score.EndpointFault
    assert result.overload and result.retry_after == 7.0
    assert "maximum pending requests exceeded" in str(result)


def test_a_retry_after_date_is_ignored_rather_than_misread(endpoints):
    busy = {"error": "server busy, please try again.  maximum pending requests exceeded"}
    headers = {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}
    result = score.classify(endpoints["ollama"], answer(503, busy, headers=headers))
    assert type(result) is score.EndpointFault and result.overload and result.retry_after is None


@pytest.mark.parametrize("status, overload", [(429, True), (499, False), (408, False), (502, False)])
def test_other_passing_statuses_are_endpoint_faults(endpoints, status, overload):
    body = {"error": {"message": f"status {status} from the server", "type": "api_error"}}
    result = score.classify(endpoints["openai"], answer(status, body, OPENAI_URL))
    assert type(result) is score.EndpointFault
    assert result.overload is overload
    assert f"status {status} from the server" in str(result)


def test_a_proxy_page_that_is_not_json_still_gives_a_readable_fault(endpoints):
    result = score.classify(endpoints["ollama"], answer(502, "<html><body>Bad Gateway</body></html>"))
    assert type(result) is score.EndpointFault
    assert "Bad Gateway" in str(result)


@pytest.mark.parametrize("body", [
    {"error": "missing request body"},
    {"error": "json: cannot unmarshal string into Go struct field ChatRequest.messages of type []api.Message"},
])
def test_a_400_about_the_request_costs_the_item_an_attempt(endpoints, body):
    result = score.classify(endpoints["ollama"], answer(400, body))
    assert type(result) is score.ItemFault and result.kind == "rejected"
    assert body["error"][:40] in str(result)


@pytest.mark.parametrize("body, text", [
    ({"error": {"message": "model 'foo' not found", "type": "not_found_error", "param": None, "code": None}},
     "model 'foo' not found"),                                          # Ollama /v1, nested
    ({"object": "error", "message": "The model `foo` does not exist.", "type": "NotFoundError",
      "param": None, "code": 404}, "The model `foo` does not exist."),  # vLLM before 0.10.1, flat
    ({"error": {"message": "The model `foo` does not exist.", "type": "NotFoundError", "param": None,
                "code": 404}}, "The model `foo` does not exist."),      # vLLM after, nested
])
def test_openai_not_found_in_either_envelope_takes_the_endpoint_out(endpoints, body, text):
    result = score.classify(endpoints["openai"], answer(404, body, OPENAI_URL))
    assert isinstance(result, score.EndpointGone)
    assert text in str(result)


def test_openai_401_takes_the_endpoint_out(endpoints):
    body = {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}
    result = score.classify(endpoints["openai"], answer(401, body, OPENAI_URL))
    assert isinstance(result, score.EndpointGone) and "Invalid API Key" in str(result)


def test_llama_server_loading_is_a_passing_overload(endpoints):
    body = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    result = score.classify(endpoints["openai"], answer(503, body, OPENAI_URL))
    assert type(result) is score.EndpointFault and result.overload and "Loading model" in str(result)


def test_llama_server_context_overflow_carries_its_token_counts(endpoints):
    body = {"error": {"code": 400, "message": "request (13392 tokens) exceeds the available context size "
                                              "(8192 tokens), try increasing it",
                      "type": "exceed_context_size_error", "n_prompt_tokens": 13392, "n_ctx": 8192}}
    result = score.classify(endpoints["openai"], answer(400, body, OPENAI_URL))
    assert isinstance(result, score.ContextOverflow)
    assert (result.requested, result.limit) == (13392, 8192)


@pytest.mark.parametrize("body", [
    # llama-cpp-python: its context check counts the prompt plus max_tokens
    {"error": {"message": "This model's maximum context length is 2048 tokens. However, you requested 2300 "
                          "tokens (2044 in the messages, 256 in the completion). Please reduce the length of "
                          "the messages or completion.",
               "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}},
    # vLLM before 0.10.1, flat envelope
    {"object": "error", "message": "This model's maximum context length is 2048 tokens. However, you requested "
                                   "2300 tokens (2044 in the messages, 256 in the completion). Please reduce the "
                                   "length of the messages or completion.",
     "type": "BadRequestError", "param": None, "code": 400},
])
def test_openai_context_length_exceeded_reads_limit_and_request_from_the_message(endpoints, body):
    result = score.classify(endpoints["openai"], answer(400, body, OPENAI_URL))
    assert isinstance(result, score.ContextOverflow)
    assert (result.requested, result.limit) == (2044 + 256, 2048)


def test_llama_cpp_python_raw_context_message_is_read_both_ways_round(endpoints):
    body = {"error": {"message": "Requested tokens (3100) exceed context window of 2048",
                      "type": "invalid_request_error", "code": "context_length_exceeded"}}
    result = score.classify(endpoints["openai"], answer(400, body, OPENAI_URL))
    assert isinstance(result, score.ContextOverflow)
    assert (result.requested, result.limit) == (3100, 2048)


def test_ollama_untruncated_overflow_is_recognised_without_counts(endpoints):
    body = {"error": "the input length exceeds the context length"}
    result = score.classify(endpoints["ollama"], answer(400, body))
    assert isinstance(result, score.ContextOverflow)
    assert (result.requested, result.limit) == (None, None)


def test_context_overflow_ignores_a_400_about_something_else():
    response = answer(400, {"error": "missing request body"})
    assert score.context_overflow(400, response, "HTTP 400: missing request body") is None


def test_context_overflow_reads_the_counts_from_the_body_before_the_message():
    body = {"error": {"code": 400, "message": "request (5000 tokens) exceeds the available context size "
                                              "(4096 tokens), try increasing it",
                      "type": "exceed_context_size_error", "n_prompt_tokens": 5000, "n_ctx": 4096}}
    found = score.context_overflow(400, answer(400, body, OPENAI_URL), "HTTP 400: exceed_context_size_error")
    assert (found.requested, found.limit) == (5000, 4096)


LITERAL_ERROR = {"error": {
    "message": "[{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be "
               "'text' or 'json_object'\", 'input': 'json_schema', 'ctx': {'expected': \"'text' or 'json_object'\"}}]",
    "type": "internal_server_error", "param": None, "code": None}}


def test_llama_cpp_python_rejecting_json_schema_asks_for_the_other_format(endpoints):
    result = score.classify(endpoints["openai"], answer(500, LITERAL_ERROR, OPENAI_URL))
    assert isinstance(result, score.FormatRejected)


def test_the_same_500_once_on_the_fallback_format_is_a_fault_not_another_switch(endpoints):
    endpoint = endpoints["openai"]
    endpoint.response_format = "json_object"
    result = score.classify(endpoint, answer(500, LITERAL_ERROR, OPENAI_URL))
    assert type(result) is score.EndpointFault


def test_an_ollama_500_never_asks_for_another_format(endpoints):
    result = score.classify(endpoints["ollama"], answer(500, {"error": "invalid format"}))
    assert type(result) is score.EndpointFault


# ── text hashes ─────────────────────────────────────────────────────────────────

CODE = "def add(a, b):\n    return a + b"


def stored_hash(text: str) -> str:
    """The record's `hash` field, worked out from its definition: blake2b-64 of the normalized text."""
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


@pytest.mark.parametrize("variant", [
    "def add(a, b):\r\n    return a + b",
    "def add(a, b):\r    return a + b",
    "def add(a, b):   \n    return a + b\t ",
    "def add(a, b): \t\n    return a + b",
    "\n\n  def add(a, b):\n    return a + b\n\n",
    " \t\r\ndef add(a, b):\r\n    return a + b\r\n",
])
def test_text_hash_ignores_line_endings_trailing_blanks_and_outer_whitespace(variant):
    assert score.text_hash(variant) == score.text_hash(CODE)
    assert score.format_hash(score.text_hash(variant)) == stored_hash(CODE)


@pytest.mark.parametrize("other", [
    "def add(a, b):\n  return a + b",             # indentation is meaning
    "def add(a, b):\n\n    return a + b",         # so are inner blank lines
    "def add(a,b):\n    return a + b",
    "def add(a, b):\n    return a - b",
])
def test_text_hash_keeps_differences_that_matter(other):
    assert score.text_hash(other) != score.text_hash(CODE)
    assert score.format_hash(score.text_hash(other)) == stored_hash(other)


def test_text_hash_is_never_zero_because_zero_means_no_hash():
    assert score.text_hash("") != 0
    assert score.text_hash("   \n") == score.text_hash("")


@pytest.mark.parametrize("value, text", [
    (1, "0100000000000000"),
    (-1, "ffffffffffffffff"),
    (0x0102030405060708, "0807060504030201"),
    (-(1 << 63), "0000000000000080"),
    ((1 << 63) - 1, "ffffffffffffff7f"),
])
def test_format_hash_is_little_endian_hex_and_parse_hash_inverts_it(value, text):
    assert score.format_hash(value) == text
    assert score.parse_hash(text) == value


def test_hash_round_trip_over_many_values():
    rng = random.Random(7)
    for _ in range(2000):
        value = rng.randrange(-(1 << 63), 1 << 63)
        text = score.format_hash(value)
        assert len(text) == 16 and text == text.lower()
        assert score.parse_hash(text) == value


# ── HashIndex and KeySet ──────────────────────────────────────────────────────


def first_offsets(keys: list[int], offsets: list[int]) -> dict[int, int]:
    """Each hash's first record, in checkpoint order."""
    first: dict[int, int] = {}
    for key, offset in zip(keys, offsets):
        first.setdefault(key, offset)
    return first


def test_hash_index_gives_the_first_record_of_equal_texts():
    keys = [5, 3, 5, 5, -2, 3]
    offsets = [0, 100, 200, 300, 400, 500]
    index = score.HashIndex(array("q", keys), array("q", offsets))
    assert index.get(5) == 0 and index.get(3) == 100 and index.get(-2) == 400
    assert index.get(4) is None and index.get(-5) is None


def test_hash_index_first_wins_in_a_large_checkpoint():
    rng = random.Random(3)
    keys = [rng.randrange(-500, 500) for _ in range(20_000)]        # many repeats, out of order
    offsets = [i * 37 for i in range(len(keys))]
    index = score.HashIndex(array("q", keys), array("q", offsets))
    expected = first_offsets(keys, offsets)
    assert all(index.get(key) == offset for key, offset in expected.items())
    assert all(index.get(key) is None for key in range(-600, 600) if key not in expected)


def test_hash_index_add_never_replaces_an_earlier_record():
    index = score.HashIndex(array("q", [9]), array("q", [0]))
    index.add(9, 50)
    index.add(7, 60)
    index.add(7, 70)
    assert index.get(9) == 0 and index.get(7) == 60


def test_hash_index_keeps_every_entry_and_the_first_of_each_across_compaction():
    rng = random.Random(11)
    loaded = rng.sample(range(-(1 << 62), 1 << 62, 1 << 40), 1000)
    index = score.HashIndex(array("q", loaded), array("q", range(1000)))
    # more additions than the in-memory buffer holds (50,000), so they get folded into the arrays
    added = [rng.randrange(-(1 << 63), 1 << 63) for _ in range(60_000)]
    for offset, key in enumerate(added, start=1000):
        index.add(key, offset)
    for key in rng.sample(loaded, 100) + rng.sample(added, 100):
        index.add(key, 10**9)                      # a later copy of a text already indexed
    expected = first_offsets(loaded + added, list(range(1000 + len(added))))
    assert len(index) == len(expected)
    assert all(index.get(key) == offset for key, offset in expected.items())


def test_empty_hash_index_knows_nothing():
    index = score.HashIndex()
    assert index.get(0) is None and index.get(123) is None and len(index) == 0


def test_key_set_membership_matches_a_python_set():
    rng = random.Random(5)
    keys = [rng.randrange(-(1 << 63), 1 << 63) for _ in range(5000)] + [-(1 << 63), (1 << 63) - 1, 0, -1]
    members = set(keys)
    key_set = score.KeySet(array("q", keys))
    assert len(key_set) == len(keys)
    assert all(key in key_set for key in keys)
    probes = [rng.randrange(-(1 << 63), 1 << 63) for _ in range(5000)] + [k + 1 for k in keys[:500]]
    assert all((probe in key_set) == (probe in members) for probe in probes)


def test_empty_key_set_holds_nothing():
    key_set = score.KeySet(array("q"))
    assert len(key_set) == 0 and 0 not in key_set and -1 not in key_set


# ── command-line values ─────────────────────────────────────────────────────────


@pytest.mark.parametrize("text, seconds", [
    ("90", 90.0), ("90s", 90.0), ("15m", 900.0), ("2h", 7200.0), ("1d", 86400.0),
    ("1.5h", 5400.0), ("0", 0.0), (" 30m ", 1800.0),
])
def test_parse_duration_reads_seconds_minutes_hours_days(text, seconds):
    assert score.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5", "2w", "1h30m", "ten", "5 minutes", "1e3"])
def test_parse_duration_refuses_what_it_cannot_read(text):
    with pytest.raises(argparse.ArgumentTypeError):
        score.parse_duration(text)


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", ("http://127.0.0.1:11434", None)),
    ("localhost", ("http://localhost:11434", None)),
    ("[::1]", ("http://[::1]:11434", None)),
    ("127.0.0.1:8080", ("http://127.0.0.1:8080", None)),
    ("http://127.0.0.1:11434/", ("http://127.0.0.1:11434", None)),
    ("https://localhost", ("https://localhost", None)),                 # a scheme keeps its own default port
    ("http://127.0.0.1:8080/v1", ("http://127.0.0.1:8080", "openai")),
    ("http://127.0.0.1:8080/v1/", ("http://127.0.0.1:8080", "openai")),
    ("localhost:1234/v1", ("http://localhost:1234", "openai")),
    ("http://127.0.0.1:8080/ollama/", ("http://127.0.0.1:8080/ollama", None)),   # behind a path prefix
])
def test_normalize_url_fills_in_scheme_and_port_and_spots_openai(text, expected):
    assert score.normalize_url(text) == expected


@pytest.mark.parametrize("text", ["ftp://127.0.0.1", "http://", "file:///tmp/x"])
def test_normalize_url_refuses_what_is_not_http(text):
    with pytest.raises(ValueError):
        score.normalize_url(text)


@pytest.mark.parametrize("wanted, name, same", [
    ("qwen2.5-coder:7b", "qwen2.5-coder:7b", True),
    ("llama3.2", "llama3.2:latest", True),
    ("llama3.2:latest", "llama3.2", True),
    ("llama3.2", "llama3.2:3b", False),
    ("qwen2.5-coder:7b", "qwen2.5-coder:14b", False),
    ("qwen2.5-coder", "qwen2.5-coder-instruct", False),
    ("hf.co/bartowski/SmolLM2-GGUF", "hf.co/bartowski/SmolLM2-GGUF:latest", True),
    ("localhost:5000/library/llama3.2", "localhost:5000/library/llama3.2:latest", True),
    ("localhost:5000/library/llama3.2", "localhost:5000/library/llama3.2:1b", False),
])
def test_model_matches_treats_a_missing_tag_as_latest(wanted, name, same):
    assert score.model_matches(wanted, name) is same


# ── prompt_plan / render_prompt: what fits the context


def plan_item(code: str, **fields) -> score.Item:
    return score.Item(id="x", text=code, fields=fields)


def test_code_used_twice_gets_half_the_room_each():
    once, twice = "Rate:\n{code}\n", "Rate:\n{code}\nAgain:\n{code}\n"
    budget_once, _ = score.prompt_plan(2048, once, plan_item("x" * 9000))
    budget_twice, _ = score.prompt_plan(2048, twice, plan_item("x" * 9000))
    room = int((2048 - score.NUM_PREDICT - score.CONTEXT_MARGIN) * score.CHARS_PER_TOKEN)
    assert budget_once == room - len(once)
    assert budget_twice == (room - len(twice)) // 2


def test_other_columns_are_cut_longest_first_only_when_the_code_would_starve():
    template = "{a} {b}\n{code}"
    room = int((2048 - score.NUM_PREDICT - score.CONTEXT_MARGIN) * score.CHARS_PER_TOKEN) - len(template)
    assert score.prompt_plan(2048, template, plan_item("c", a="x" * 100, b="y" * 100)) == (room - 200, None)
    budget, cap = score.prompt_plan(2048, template, plan_item("c", a="x" * 100, b="y" * 60_000))
    assert cap is not None and budget == score.MIN_CODE_CHARS and 100 + cap == room - score.MIN_CODE_CHARS
    text, cut = score.render_prompt(template, plan_item("c" * 50, a="x" * 100, b="y" * 60_000), budget, cap)
    assert cut and text.startswith("x" * 100 + " ") and len(text) <= room + len(template)
    assert score.TRUNCATION_MARK in text and text.endswith("c" * 50)


def test_a_template_beyond_the_context_leaves_no_room_for_code():
    budget, _ = score.prompt_plan(2048, "x" * 5000 + "{code}", plan_item("def f(): pass"))
    assert budget < 0
    budget, cap = score.prompt_plan(2048, "x" * 4200 + "{doc}{code}", plan_item("def f(): pass", doc="d" * 900))
    assert cap == len(score.TRUNCATION_MARK) and budget < score.MIN_CODE_CHARS


def test_a_new_parquet_file_is_named_with_the_file_it_now_precedes():
    def pin(name: str) -> dict:
        return {"file": name, "size": 10, "head": "h", "tail": "t", "rows": 1}
    info = score.InputInfo("parquet", (), ("code",), 2, None, "code", ())
    old = [pin("part-b.parquet"), pin("part-c.parquet")]
    new = [pin("part-a.parquet"), *old]
    assert score.input_changes(info, old, new) == [
        "part-a.parquet: new, and read before part-b.parquet, so every later row moves"]
    assert score.input_changes(info, old, [*old, pin("part-d.parquet")]) == []


@pytest.mark.parametrize("template", ['Rate {code}. Answer {"score": 5}', "Rate {code} {"])
def test_a_prompt_with_literal_braces_says_to_double_them(template):
    with pytest.raises(ValueError, match=r"write literal braces as \{\{ and \}\}"):
        score.template_fields(template)
