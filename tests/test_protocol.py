"""Odd servers: answers of unexpected shapes or sizes, trickled bytes, models that cannot load, keep_alive."""

from __future__ import annotations

import itertools
import signal
import socket
import threading
from pathlib import Path
from collections import Counter

import pytest

import score
from conftest import expected_score, read_records, rows, run_cli, start_cli, wait_for, write_endpoints, write_jsonl

TEXTS = {r["id"]: r["code"] for r in rows(40)}
OOM = "model requires more system memory (5.6 GiB) than is available (3.1 GiB)"


def assert_all_scored_by(records: list[dict], n: int, endpoint: str) -> None:
    """Every row has exactly one record, a correct score, from the given endpoint."""
    assert Counter(r["id"] for r in records) == Counter(f"fn-{i}" for i in range(n))
    assert all(r["score"] == expected_score(TEXTS[r["id"]]) and r["endpoint"] == endpoint for r in records)


ODD_ANSWERS = [
    ("ollama", {"shape": "content_list"}, "message content is a list"),
    ("ollama", {"shape": "content_number"}, "message content is a number"),
    ("ollama", {"shape": "message_string"}, "message is a string"),
    ("ollama", {"shape": "eval_count_text"}, "prompt_eval_count is a string"),
    ("openai", {"shape": "choices_null"}, "choices are a list ([null])"),
    ("openai", {"shape": "usage_text"}, "usage is a string"),
    ("ollama", {"gzip_broken": True}, "cannot be decoded"),
    ("ollama", {"huge_body": 3 << 20}, "larger than 1,024 KiB"),
]


@pytest.mark.parametrize("api, fault, message", ODD_ANSWERS, ids=[str(f) for _, f, _ in ODD_ANSWERS])
def test_an_odd_answer_is_the_endpoints_fault_and_the_run_goes_on(tmp_path, serve, api, fault, message):
    extra = {"api": "openai", "models": {"smollm2": ""}} if api == "openai" else {}
    odd, good = serve(**fault, **extra), serve(latency=0.1, slots=2, **extra)   # slow enough for odd to go down
    data = write_jsonl(tmp_path / "fns.jsonl", rows(40))
    suffix = "/v1 model=smollm2" if api == "openai" else ""
    (tmp_path / "e.txt").write_text(f"{odd.url}{suffix} name=odd\n{good.url}{suffix} name=good\n")
    result = run_cli(data, "--endpoints", tmp_path / "e.txt", "--no-progress", timeout=90)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and message in result.stderr
    assert odd.chats > 0                                   # the odd endpoint was really asked
    assert_all_scored_by(read_records(tmp_path / "fns.scores.jsonl"), 40, "good")


@pytest.mark.parametrize("data, message", [
    ({"message": {"content": ["7"]}}, "content is a list"),
    ({"message": "7"}, "message is a string"),
    ({"message": {"content": "{}"}, "prompt_eval_count": "x"}, "prompt_eval_count is a string"),
    ({"message": {"content": "{}"}, "eval_count": -3}, "eval_count is a number"),
    ({}, "message is null"),
])
def test_answer_fields_refuses_odd_ollama_shapes(data, message):
    with pytest.raises(score.EndpointFault, match=message):
        score.answer_fields("ollama", data)


@pytest.mark.parametrize("data, message", [
    ({"choices": [None]}, "choices are a list"),
    ({"choices": []}, "choices are a list"),
    ({"choices": "x"}, "choices are a string"),
    ({"choices": [{"message": {"content": "{}"}}], "usage": "n/a"}, "usage is a string"),
    ({"choices": [{"message": {"content": "{}"}}], "usage": {"prompt_tokens": [1]}}, "prompt_tokens is a list"),
    ({"choices": [{"message": None}]}, "message is null"),
])
def test_answer_fields_refuses_odd_openai_shapes(data, message):
    with pytest.raises(score.EndpointFault, match=message):
        score.answer_fields("openai", data)


def test_answer_fields_reads_well_formed_answers():
    ollama = {"message": {"role": "assistant", "content": '{"score": 7}'}, "prompt_eval_count": 28, "eval_count": 16}
    assert score.answer_fields("ollama", ollama) == ('{"score": 7}', 28, 16)
    assert score.answer_fields("ollama", {"message": {"content": None}}) == ("", None, None)
    openai = {"choices": [{"message": {"content": "x"}}], "usage": {"prompt_tokens": 5.0, "completion_tokens": 2}}
    assert score.answer_fields("openai", openai) == ("x", 5, 2)
    assert score.answer_fields("openai", {"choices": [{"message": {"content": "x"}}], "usage": None}) == ("x", None, None)


def test_model_list_of_plain_strings_leaves_that_endpoint_out_of_the_start(tmp_path, serve):
    odd, good = serve(shape="tags_strings"), serve(latency=0.01)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [odd, good]), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "/api/tags: expected a list of model objects, got a list" in result.stderr
    assert_all_scored_by(read_records(tmp_path / "fns.scores.jsonl"), 10, "e1")


def preflight_row(stderr: str, name: str) -> str:
    """An endpoint's preflight row with its status, which may sit on indented lines below it."""
    lines = stderr.split("\n")
    i = next(i for i, line in enumerate(lines) if line.startswith(name + " "))
    more = itertools.takewhile(lambda line: line.startswith("    "), lines[i + 1:])
    return " ".join([lines[i], *(line.strip() for line in more)])


@pytest.mark.parametrize("where", ["root", "load"])
def test_a_trickling_server_does_not_keep_the_run_from_starting_or_ending(tmp_path, serve, where):
    slow, good = serve(trickle=(where,)), serve(latency=0.01)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [slow, good]), "--no-progress",
                     "--startup-timeout", "10", timeout=60)
    assert result.returncode == 0, result.stderr
    status = preflight_row(result.stderr, "e0")
    assert ("not answering" in status) if where == "root" else ("loading the model" in status)
    assert_all_scored_by(read_records(tmp_path / "fns.scores.jsonl"), 10, "e1")


def test_only_a_trickling_server_exits_2_at_the_startup_timeout(tmp_path, serve):
    slow = serve(trickle=("root",))
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [slow]), "--startup-timeout", "3",
                     timeout=60)
    assert result.returncode == 2, result.stderr
    assert "no endpoint answered within 3 s" in result.stderr and "Traceback" not in result.stderr


def test_no_endpoint_can_load_the_model_stops_with_the_servers_message(tmp_path, serve):
    a, b = serve(load_error=OOM), serve(load_error="llama runner process has terminated: signal: killed")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [a, b]), "--no-progress", timeout=60)
    assert result.returncode == 1, result.stderr
    table = " ".join(result.stderr.split("stopped:")[0].split())              # a long status wraps at 100 columns
    assert OOM in table and "llama runner process has terminated" in table          # in the preflight table
    stopped = result.stderr.split("stopped:")[1]
    assert "no endpoint can serve: e0: cannot load qwen2.5-coder:7b" in stopped and OOM in stopped
    assert "Traceback" not in result.stderr and a.chats == b.chats == 0
    assert "run again with:" in result.stderr and "e.txt --no-progress\n" in result.stderr


def test_max_downtime_waits_for_a_model_that_cannot_load_and_says_why(tmp_path, serve):
    a = serve(load_error=OOM)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [a]), "--no-progress",
                     "--max-downtime", "3", timeout=60)
    assert result.returncode == 1, result.stderr
    assert OOM in " ".join(result.stderr.split()) and "--max-downtime 3s" in result.stderr
    assert "continue with:" in result.stderr and "--max-downtime 3 --resume\n" in result.stderr
    loads = [body for method, path, body in a.requests if path == "/api/chat"]
    assert len(loads) >= 2                                 # it kept trying while it waited


def test_an_endpoint_that_cannot_load_is_shown_and_the_rest_score(tmp_path, serve):
    bad, good = serve(load_error=OOM), serve(latency=0.01)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [bad, good]), "--no-progress")
    assert result.returncode == 0, result.stderr
    status = preflight_row(result.stderr, "e0")
    assert f"cannot load qwen2.5-coder:7b: HTTP 500: {OOM}" in status
    assert_all_scored_by(read_records(tmp_path / "fns.scores.jsonl"), 10, "e1")


@pytest.mark.parametrize("typed, sent", [("90", 90), ("1d", 86400), ("15m", 900), ("-1", -1), ("0", 0)])
def test_keep_alive_is_sent_as_seconds_ollama_accepts(tmp_path, serve, typed, sent):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--no-progress",
                     "--keep-alive", typed, timeout=60)
    assert result.returncode == 0, result.stderr
    chats = [body for method, path, body in server.requests if path == "/api/chat"]
    assert len(chats) == 4 and all(body["keep_alive"] == sent for body in chats)     # the load and 3 rows


def test_keep_alive_junk_is_a_usage_error(tmp_path):
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    result = run_cli(data, "--keep-alive", "soon")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "not a duration: 'soon'" in result.stderr


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_quick_start_without_ollama_says_what_to_do_and_ctrl_c_saves_nothing(tmp_path):
    if port_open(score.OLLAMA_PORT):
        pytest.skip("something listens on the default Ollama port here")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    proc = start_cli(data, "--startup-timeout", "120", cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("examples/try_it.py" in line for line in lines), timeout=30, what="the hint")
        text = "".join(lines)
        assert "connection refused" in text and "ollama serve" in text and "endpoints.txt" in text
        wait_for(lambda: any("giving up in 1m" in line for line in lines), timeout=40, what="the time left")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        proc.kill()
        proc.wait()
    reader.join(10)
    proc.stdout.close()
    proc.stderr.close()
    text = "".join(lines)
    assert "nothing was scored" in text and "saved" not in text and "--resume" not in text
    assert "Traceback" not in text


def test_model_that_stops_loading_mid_run_is_noted_and_ends_the_run_with_nothing_lost(tmp_path, serve):
    server = serve(latency=0.05, slots=2)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(40))
    out = tmp_path / "fns.scores.jsonl"
    proc = start_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--no-progress")
    try:
        wait_for(lambda: out.exists() and out.read_text().count("\n") >= 5, what="first records")
        server.behaviour.load_error = OOM              # evicted, and there is no memory to load it again
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == 1, stderr
    assert f"e0 cannot load qwen2.5-coder:7b: HTTP 500: {OOM}; trying again in the background" in stderr
    assert "stopped: no endpoint can serve" in stderr and "Traceback" not in stderr
    records = read_records(out)
    assert records and all(r["score"] == expected_score(TEXTS[r["id"]]) for r in records)   # no row charged
    assert len({r["id"] for r in records}) == len(records)


def test_the_shipped_endpoints_file_without_ollama_still_says_what_to_do_from_any_folder(tmp_path):
    if port_open(score.OLLAMA_PORT):
        pytest.skip("something listens on the default Ollama port here")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    shipped = Path(score.__file__).with_name("endpoints.txt").read_text()
    (tmp_path / "endpoints.txt").write_text(shipped)              # the quick start, as it ships
    result = run_cli(data, "--startup-timeout", "2", cwd=tmp_path, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    hint = result.stderr.split("Nothing listens at", 1)[1].split("nothing has been scored", 1)[0]
    assert "ollama serve" in hint and "endpoints.txt" in hint
    assert all(len(line) <= 100 for line in hint.splitlines()), hint
    command = hint.split("without Ollama:\n", 1)[1].splitlines()[0].split()
    assert command[-1].endswith("try_it.py") and (tmp_path / command[-1]).is_file()   # right from this folder
