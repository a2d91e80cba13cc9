"""Direct tests of an endpoint's own rules: its health moves, the API kind and concurrency an
endpoints file gives it, and the error kinds records carry.

Endpoints are built the way a run builds them (an endpoints file through parse_args); nothing here
opens a socket.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import score
from score import Health

README = Path(score.__file__).with_name("README.md")


def endpoints_from(tmp_path, text: str, *flags: str) -> list[score.Endpoint]:
    """Build the endpoints of an endpoints file, with any other command-line flags."""
    listing = tmp_path / "endpoints.txt"
    listing.write_text(text)
    config = score.parse_args([str(tmp_path / "fns.jsonl"), "--endpoints", str(listing), *flags])
    return [score.Endpoint(spec, config) for spec in config.endpoints]


@pytest.fixture
def endpoint(tmp_path) -> score.Endpoint:
    return endpoints_from(tmp_path, "127.0.0.1:9 name=e0\n")[0]


def bring(endpoint: score.Endpoint, health: Health) -> None:
    """Walk a fresh endpoint to the given health the way a run would."""
    if health is Health.PENDING:
        return
    endpoint.passed_check(None)
    if health is Health.WARMING:
        endpoint.loading()
        return
    endpoint.came_up()
    if health is Health.BACKOFF:
        endpoint.backed_off(10.0)
    elif health is Health.DOWN:
        endpoint.went_down("HTTP 500", 1.0)
    elif health is Health.GONE:
        endpoint.taken_out("no such model")
    assert endpoint.health is health


# ── health: the moves and what each resets ──────────────────────────────────────

MOVES = {   # each method with the health it moves to (failed_to_come_up: for an endpoint that passed its check)
    "loading": (lambda e: e.loading(), Health.WARMING),
    "came_up": (lambda e: e.came_up(), Health.READY),
    "backed_off": (lambda e: e.backed_off(20.0), Health.BACKOFF),
    "went_down": (lambda e: e.went_down("refused", 2.0), Health.DOWN),
    "failed_to_come_up": (lambda e: e.failed_to_come_up("cannot load", 2.0), Health.DOWN),
    "taken_out": (lambda e: e.taken_out("refused: HTTP 401"), Health.GONE),
}
LEGAL = {
    Health.PENDING: {"loading", "came_up", "went_down", "failed_to_come_up", "taken_out"},
    Health.WARMING: {"came_up", "went_down", "failed_to_come_up", "taken_out"},
    Health.READY: {"came_up", "backed_off", "went_down", "failed_to_come_up", "taken_out"},
    Health.BACKOFF: {"came_up", "backed_off", "went_down", "failed_to_come_up", "taken_out"},
    Health.DOWN: {"loading", "came_up", "went_down", "failed_to_come_up", "taken_out"},
    Health.GONE: set(),
}


@pytest.mark.parametrize("start", list(Health))
@pytest.mark.parametrize("move", list(MOVES))
def test_each_move_is_taken_from_where_it_is_legal_and_refused_elsewhere(endpoint, start, move):
    bring(endpoint, start)
    call, target = MOVES[move]
    if move == "failed_to_come_up" and not endpoint.checked:
        target = Health.PENDING                         # never passed a check: still pending
    if move in LEGAL[start]:
        call(endpoint)
        assert endpoint.health is target
    else:
        with pytest.raises(RuntimeError, match=f"from {start} to {target}"):
            call(endpoint)
        assert endpoint.health is start                 # a refused move changes nothing


def test_the_table_covers_every_health_and_gone_is_final():
    assert set(score.HEALTH_MOVES) == set(Health)
    assert score.HEALTH_MOVES[Health.GONE] == set()
    assert all(Health.GONE in moves for health, moves in score.HEALTH_MOVES.items() if health is not Health.GONE)


def test_a_fresh_endpoint_is_pending_and_takes_no_request(endpoint):
    assert endpoint.health is Health.PENDING and endpoint.status == "not answering"
    assert not endpoint.usable and not endpoint.alive and not endpoint.gone and not endpoint.can_take(0.0)


def test_loading_is_alive_but_takes_no_request(endpoint):
    bring(endpoint, Health.WARMING)
    assert endpoint.alive and not endpoint.usable and not endpoint.can_take(0.0)
    assert endpoint.status == "loading model"


def test_coming_up_starts_with_a_clean_slate(endpoint):
    bring(endpoint, Health.DOWN)
    endpoint.faults, endpoint.proven = 2, True
    endpoint.loading()
    endpoint.came_up()
    assert (endpoint.faults, endpoint.down_since, endpoint.detail, endpoint.proven) == (0, None, "", False)
    assert endpoint.usable and endpoint.can_take(0.0) and endpoint.label().startswith("e0 0 x")


def test_a_backoff_rests_until_its_time_and_a_good_answer_ends_it(endpoint):
    endpoint.came_up()
    endpoint.backed_off(10.0)
    assert endpoint.usable and endpoint.status == "backing off"
    assert not endpoint.can_take(9.9) and endpoint.can_take(10.0)
    endpoint.record_success()
    assert endpoint.health is Health.READY and endpoint.proven and endpoint.probe_pause == 1.0


def test_a_fault_on_an_unproven_endpoint_backs_it_off(endpoint):
    endpoint.came_up()
    assert not endpoint.record_fault(score.EndpointFault("HTTP 500"), 100.0)
    assert endpoint.health is Health.BACKOFF and endpoint.backoff_until > 100.0
    assert endpoint.detail == "HTTP 500" and endpoint.faults == 1


def test_going_down_notes_when_and_why_and_wakes_the_supervisor(endpoint):
    bring(endpoint, Health.READY)
    endpoint.went_down("connection refused", 5.0)
    assert (endpoint.detail, endpoint.down_since) == ("connection refused", 5.0)
    assert endpoint.trouble.is_set() and not endpoint.alive
    assert endpoint.probe_pause == 2.0                  # never answered since it came up: probe it less often
    endpoint.failed_to_come_up("probe: connection refused", 9.0)
    assert endpoint.down_since == 5.0                   # down since the first failure, not the latest probe
    assert endpoint.status.startswith("down ") and endpoint.detail == "probe: connection refused"


def test_a_proven_endpoint_going_down_keeps_its_probe_pace(endpoint):
    endpoint.came_up()
    endpoint.record_success()
    endpoint.went_down("HTTP 500", 5.0)
    assert endpoint.probe_pause == 1.0


def test_a_failed_start_leaves_an_unchecked_endpoint_pending_and_a_checked_one_down(tmp_path):
    never, loaded = endpoints_from(tmp_path, "127.0.0.1:9 name=never\n127.0.0.1:10 name=loaded\n")
    never.failed_to_come_up("connect timed out", 3.0)
    assert (never.health, never.detail, never.down_since) == (Health.PENDING, "connect timed out", None)
    loaded.passed_check(None)
    loaded.loading()
    loaded.failed_to_come_up("cannot load qwen: out of memory", 3.0)
    assert (loaded.health, loaded.detail, loaded.down_since) == (Health.DOWN, "cannot load qwen: out of memory", 3.0)


def test_a_passed_check_keeps_the_build_and_makes_a_later_failure_down(endpoint):
    endpoint.passed_check("sha256:abc")
    assert endpoint.checked and endpoint.digest == "sha256:abc"
    endpoint.failed_to_come_up("connect refused", 4.0)
    assert endpoint.health is Health.DOWN and endpoint.down_since == 4.0


@pytest.mark.parametrize("exc, health", [
    (score.EndpointGone("model qwen not found"), Health.GONE),
    (score.LoadFailed("cannot load qwen: out of memory"), Health.PENDING),
    (score.EndpointFault("connect refused", connect=True), Health.PENDING),
])
def test_a_failed_start_takes_out_or_leaves_pending_by_one_rule_and_only_the_supervisor_slows_probes(tmp_path, exc,
                                                                                                   health):
    preflight, supervised = endpoints_from(tmp_path, "127.0.0.1:9 name=p\n127.0.0.1:10 name=s\n")
    preflight.start_failed(exc, 2.0)
    supervised.probe_failed(exc, 2.0)
    assert preflight.health is supervised.health is health
    assert preflight.detail == supervised.detail == str(exc)
    assert (preflight.probe_pause, supervised.probe_pause) == (1.0, 2.0)


def test_rows_scored_count_only_the_records_an_endpoint_wrote(endpoint):
    endpoint.came_up()
    answer = score.Answer(7, None, 100, 5, 0.2, False, 1, 0.0)
    endpoint.record_success()                      # a raced copy's answer: the other endpoint wrote the row
    endpoint.record_success()
    endpoint.count_answer(answer)                  # this one wrote it
    assert endpoint.answers == 2 and endpoint.scored == 1
    assert (endpoint.prompt_tokens, endpoint.output_tokens) == (100, 5)
    assert endpoint.label().startswith("e0 1 x")
    assert score.answers_of(endpoint).good == 2    # the judging rules count every usable answer


def test_the_fault_share_can_leave_out_a_rows_own_faults(endpoint):
    for fault in (True, False, True, False):
        endpoint.note_outcome(fault)
    share = endpoint.fault_share()
    assert endpoint.fault_share(excluding=1.0) < share
    assert endpoint.fault_share(excluding=100.0, prior=0.0) == 0.0
    assert endpoint.fault_share(prior=0.0) == pytest.approx(endpoint.fault_weight / (endpoint.outcomes + 10))


def test_a_build_clash_is_the_same_model_name_as_another_build(tmp_path):
    a, b, c, other = endpoints_from(tmp_path, "127.0.0.1:9 name=a\n127.0.0.1:10 name=b\n127.0.0.1:11 name=c\n"
                                              "127.0.0.1:12 name=o model=llama3\n")
    everyone = [a, b, c, other]
    a.passed_check("sha256:one")
    assert score.build_clash(a, everyone) is None and score.build_clash(b, everyone) is None   # b unknown yet
    b.passed_check("sha256:one")
    other.passed_check("sha256:two")                                # another model: no clash
    assert score.build_clash(b, everyone) is None
    c.passed_check("sha256:two")
    assert score.build_clash(c, everyone) is a and score.build_clash(a, everyone) is c


def test_taken_out_is_final_and_says_why(endpoint):
    endpoint.came_up()
    endpoint.taken_out("model qwen not found")
    assert endpoint.gone and endpoint.trouble.is_set() and endpoint.detail == "model qwen not found"
    assert endpoint.status == "taken out" and not endpoint.alive and not endpoint.can_take(1e9)
    with pytest.raises(RuntimeError):
        endpoint.came_up()


def test_health_is_read_only_outside_the_endpoint(endpoint):
    with pytest.raises(AttributeError):
        endpoint.health = Health.READY


# ── the API kind an endpoints file gives ────────────────────────────────────────


@pytest.mark.parametrize("line, api, path", [
    ("127.0.0.1:9", score.Api.AUTO, "/v1/chat/completions"),     # told by the check; until then not Ollama
    ("127.0.0.1:9 api=ollama", score.Api.OLLAMA, "/api/chat"),
    ("127.0.0.1:9 api=openai", score.Api.OPENAI, "/v1/chat/completions"),
    ("http://127.0.0.1:9/v1", score.Api.OPENAI, "/v1/chat/completions"),
    ("http://127.0.0.1:9/v1 api=auto", score.Api.AUTO, "/v1/chat/completions"),
])
def test_the_endpoints_file_names_the_api(tmp_path, line, api, path):
    (endpoint,) = endpoints_from(tmp_path, line + "\n")
    assert endpoint.spec.api is api and endpoint.api is api
    assert endpoint.chat_url.path == path


def test_an_unknown_api_is_one_clear_line(tmp_path):
    with pytest.raises(score.UsageError, match=r"endpoints.txt:2: api must be ollama, openai or auto, not 'grpc'"):
        endpoints_from(tmp_path, "127.0.0.1:9\n127.0.0.1:10 api=grpc\n")


# ── concurrency: a number, auto, or as --concurrency says ───────────────────────


@pytest.mark.parametrize("option, flags, fixed", [
    ("", (), None),                                     # neither says: measured
    ("", ("--concurrency", "3"), 3),                    # the command line's number
    ("", ("--concurrency", "auto"), None),
    (" concurrency=2", (), 2),                          # the file's number
    (" concurrency=2", ("--concurrency", "3"), 2),      # the machine's own line wins
    (" concurrency=auto", (), None),
    (" concurrency=auto", ("--concurrency", "3"), None),
])
def test_concurrency_comes_from_the_line_then_the_command_line(tmp_path, option, flags, fixed):
    (endpoint,) = endpoints_from(tmp_path, f"127.0.0.1:9{option}\n", *flags)
    assert endpoint.spec.concurrency == {"": None, " concurrency=2": 2, " concurrency=auto": score.AUTO}[option]
    assert endpoint.limiter.auto == (fixed is None)
    assert endpoint.limiter.limit == (fixed or 1)        # a measured limit starts its climb at one


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_concurrency_is_one_clear_line(tmp_path, value):
    with pytest.raises(score.UsageError, match=r"endpoints.txt:1: concurrency must be a positive integer or auto"):
        endpoints_from(tmp_path, f"127.0.0.1:9 concurrency={value}\n")
    with pytest.raises(score.UsageError, match=r"--concurrency: concurrency must be a positive integer or auto"):
        endpoints_from(tmp_path, "127.0.0.1:9\n", "--concurrency", value)


# ── error kinds: the words records carry ────────────────────────────────────────


def test_every_error_kind_a_record_can_carry_is_documented():
    table = README.read_text().split("| error_kind |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))
    internal = {score.ErrorKind.BAD_ANSWER, score.ErrorKind.REJECTED}     # recorded as attempts_exhausted
    assert documented == {kind.value for kind in score.ErrorKind} - internal
    permanent = set(re.findall(r"^\| `([a-z_]+)` \|.*\| no \(permanent\) \|$", table, re.M))
    assert permanent == score.PERMANENT_ERRORS


@pytest.mark.parametrize("kind", list(score.ErrorKind))
def test_an_error_kind_is_written_as_its_plain_word_and_read_back(kind):
    record = {"id": "fn-1", "score": None, "hash": None, "error": "why", "error_kind": kind}
    line = score.record_line(record)
    assert line == score.record_line({**record, "error_kind": kind.value})
    assert json.loads(line)["error_kind"] == kind.value
    assert score.scan_record(line)[3] == kind
