"""Mixed fleets: OpenAI-compatible servers, preflight identification, model builds, keys."""

from __future__ import annotations

from collections import Counter

import pytest

import score
from conftest import expected_score, read_records, rows, run_cli, write_endpoints, write_jsonl

LLAMA = {"api": "openai", "models": {"smollm2": ""}}


def test_openai_endpoint_falls_back_to_json_object_once_and_scores(tmp_path, serve):
    server = serve(reject_json_schema=True, **LLAMA)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(15))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text(f"{server.url}/v1 name=llama model=smollm2\n")
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert Counter(r["id"] for r in records) == Counter(f"fn-{i}" for i in range(15))
    assert all(r["score"] == expected_score(rows(15)[int(r["id"][3:])]["code"]) for r in records)
    assert all(r["attempts"] == 1 and r["prompt_tokens"] and r["output_tokens"] == 12 for r in records)
    forms = [b["response_format"]["type"] for b in server.chat_bodies()]
    assert forms[0] == "json_schema" and forms.count("json_schema") == 1 and forms[1:] == ["json_object"] * 15
    assert server.chat_bodies()[-1]["response_format"]["schema"]["properties"]["score"]["maximum"] == 10
    assert result.stderr.count("as json_object from now on") == 1
    assert "openai (fake)" in result.stderr                 # preflight identified it via /v1/models


def test_openai_server_is_detected_without_v1_in_the_url(tmp_path, serve):
    server = serve(**LLAMA)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text(f"{server.url} model=smollm2\n")
    assert score.main([str(data), "--endpoints", str(endpoints)]) == 0
    assert len(server.chat_bodies()) == 5 and ("GET", "/", None) in server.requests


def test_context_overflow_is_cut_and_resent_without_charging_attempts(tmp_path, serve):
    for nested in (True, False):
        server = serve(n_ctx=700, nested_errors=nested, **LLAMA)
        big = "def big():\n" + "".join(f"    total_{i} = compute({i}) + offset\n" for i in range(300))
        data = write_jsonl(tmp_path / "big.jsonl", [{"id": "big", "code": big}, {"id": "small", "code": "def f(): pass"}])
        endpoints = tmp_path / "e.txt"
        endpoints.write_text(f"{server.url}/v1 model=smollm2\n")
        out = tmp_path / f"big-{nested}.jsonl"
        assert score.main([str(data), "--endpoints", str(endpoints), "-o", str(out), "--max-attempts", "1"]) == 0
        record = {r["id"]: r for r in read_records(out)}["big"]
        assert record["score"] is not None and record["truncated"] is True and record["attempts"] == 1
        sent = [len(b["messages"][0]["content"]) // 4 + 256 for b in server.chat_bodies()]
        assert sent[-1] <= 700 and max(sent) > 700               # rejected first, then fitted


def test_lm_studio_style_error_with_status_200_is_not_a_score(tmp_path, serve):
    broken = serve(error_200="Unexpected endpoint or method. (POST /v1/chat/completions)", **LLAMA)
    good = serve(**LLAMA)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(20))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text(f"{broken.url}/v1 model=smollm2 name=studio\n{good.url}/v1 model=smollm2 name=good\n")
    assert score.main([str(data), "--endpoints", str(endpoints), "--max-attempts", "1"]) == 0
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert {r["endpoint"] for r in records} == {"good"} and len(records) == 20


def test_bearer_key_comes_from_the_environment_and_is_never_printed(tmp_path, serve):
    secret = "sk-test-7d1f0c9e"
    server = serve(api_key=secret, **LLAMA)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(6))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text(f"{server.url}/v1 model=smollm2 key_env=FLEET_KEY\n")
    missing = run_cli(data, "--endpoints", endpoints)
    assert missing.returncode == 2 and "FLEET_KEY" in missing.stderr
    result = run_cli(data, "--endpoints", endpoints, env={"FLEET_KEY": secret})
    assert result.returncode == 0, result.stderr
    assert len(read_records(tmp_path / "fns.scores.jsonl")) == 6
    for path in tmp_path.iterdir():
        assert secret not in path.read_text(errors="replace")
    assert secret not in result.stderr + result.stdout
    wrong = run_cli(data, "--endpoints", endpoints, "--overwrite", env={"FLEET_KEY": "nope"})
    assert wrong.returncode == 2 and "401" in wrong.stderr and secret not in wrong.stderr


def test_different_model_builds_stop_the_run_before_any_work(tmp_path, serve):
    a = serve()
    b = serve(models={"qwen2.5-coder:7b": "f" * 64})
    data = write_jsonl(tmp_path / "fns.jsonl", rows(8))
    endpoints = write_endpoints(tmp_path / "e.txt", [a, b])
    result = run_cli(data, "--endpoints", endpoints)
    assert result.returncode == 2
    assert "different build" in result.stderr and "ffffffffffff" in result.stderr and "a80c4f17acd5" in result.stderr
    assert a.chat_bodies() == [] and b.chat_bodies() == []
    assert not (tmp_path / "fns.scores.jsonl").exists() or (tmp_path / "fns.scores.jsonl").stat().st_size == 0
    allowed = run_cli(data, "--endpoints", endpoints, "--allow-mixed-models")
    assert allowed.returncode == 0, allowed.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert {r["model_digest"] for r in records} <= {"a80c4f17acd5", "ffffffffffff"}
    meta = (tmp_path / "fns.scores.jsonl.meta.json").read_text()
    assert "a80c4f17acd5" in meta and "f" * 64 in meta


def test_pull_fetches_a_missing_model_on_ollama(tmp_path, serve):
    server = serve(models={})
    data = write_jsonl(tmp_path / "fns.jsonl", rows(4))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    refused = run_cli(data, "--endpoints", endpoints)
    assert refused.returncode == 2 and "--pull" in refused.stderr
    result = run_cli(data, "--endpoints", endpoints, "--pull")
    assert result.returncode == 0, result.stderr
    assert "pulling" in result.stderr and ("POST", "/api/pull", {"model": "qwen2.5-coder:7b"}) in server.requests
    assert len(read_records(tmp_path / "fns.scores.jsonl")) == 4


def test_per_endpoint_model_override_is_sent_and_recorded(tmp_path, serve):
    big = serve()
    small = serve(models={"qwen2.5-coder:3b": "c" * 64})
    data = write_jsonl(tmp_path / "fns.jsonl", rows(30))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text(f"{big.url} name=big\n{small.url} name=small model=qwen2.5-coder:3b\n")
    assert score.main([str(data), "--endpoints", str(endpoints)]) == 0
    assert {b["model"] for b in small.chat_bodies()} == {"qwen2.5-coder:3b"}
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert {(r["endpoint"], r["model"]) for r in records} <= {("big", "qwen2.5-coder:7b"),
                                                             ("small", "qwen2.5-coder:3b")}


def test_a_password_in_an_endpoint_url_is_used_but_never_shown_or_stored(tmp_path, serve):
    server = serve(basic_auth="alice:s3cret-pw")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text(server.url.replace("http://", "http://alice:s3cret-pw@") + "\n")
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 0, result.stderr              # the proxy let every request through
    assert len(read_records(tmp_path / "fns.scores.jsonl")) == 5
    shown = result.stdout + result.stderr + (tmp_path / "fns.scores.jsonl").read_text() \
        + score.meta_path(tmp_path / "fns.scores.jsonl").read_text()
    assert "s3cret-pw" not in shown
    assert "alice:***@127.0.0.1" in result.stderr + result.stdout
    endpoints.write_text(f"{endpoints.read_text()}{endpoints.read_text()}")   # the same URL twice
    again = run_cli(data, "--endpoints", endpoints, "--overwrite")
    assert again.returncode == 2 and "already on line 1" in again.stderr and "s3cret-pw" not in again.stderr


@pytest.mark.parametrize("owner, shown", [("me", "openai "), ("llamacpp", "openai (llama.cpp)"),
                                          ("vllm", "openai (vllm)")])
def test_preflight_names_the_openai_server_only_when_its_owner_means_something(tmp_path, serve, owner, shown):
    server = serve(api="openai", owned_by=owner)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--no-progress")
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stderr.splitlines() if line.startswith("e0 "))
    assert shown in row and "(me)" not in row, row
