"""End-to-end behaviour of a normal run: input formats, ids, the fleet, resume, bad input."""

from __future__ import annotations

import gzip
import json
from collections import Counter

import pyarrow.parquet as pq
import pytest

import score
from conftest import (expected_score, function_source, read_records, rows, run_cli, scored, write_endpoints,
                      write_jsonl, write_parquet)


def assert_each_scored_once(records: list[dict], texts: dict) -> None:
    """Exactly one record per id, each with the fake model's verdict for that id's text."""
    ids = Counter(r["id"] for r in records)
    assert set(ids) == set(texts)
    assert max(ids.values()) == 1, [i for i, n in ids.items() if n > 1]
    for r in records:
        assert r["score"] == expected_score(texts[r["id"]]), r


def test_jsonl_fleet_scores_each_id_once_and_fast_endpoint_does_more(tmp_path, serve):
    fast, medium, slow = serve(latency=0.01, slots=4), serve(latency=0.06, slots=1), serve(latency=0.15, slots=1)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(90))
    endpoints = write_endpoints(tmp_path / "endpoints.txt", [fast, medium, slow])
    assert score.main([str(data), "--endpoints", str(endpoints), "--no-progress"]) == 0
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert_each_scored_once(records, {r["id"]: r["code"] for r in rows(90)})
    share = Counter(r["endpoint"] for r in records)
    assert share["e0"] > share["e1"] >= 1 and share["e0"] > share["e2"]
    assert sum(share.values()) == 90
    assert fast.answered + medium.answered + slow.answered >= 90


def test_request_shape_follows_ollama_api(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(12))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints), "--num-ctx", "4096", "--keep-alive", "1h"]) == 0
    bodies = server.chat_bodies()
    assert len(bodies) == 12
    for body in bodies:
        assert body["stream"] is False and body["keep_alive"] == 3600 and body["model"] == "qwen2.5-coder:7b"
        assert body["format"]["properties"]["score"]["type"] == "integer"
        assert body["options"]["num_ctx"] == 4096 and body["options"]["temperature"] == 0
        assert body["messages"][0]["role"] == "user"
    # the warm-up loads the model with the same runner options before any scoring request
    warm = [b for m, p, b in server.requests if p == "/api/chat" and not b.get("messages")]
    assert warm and warm[0]["options"]["num_ctx"] == 4096


@pytest.mark.parametrize("layout", ["file", "directory"])
def test_parquet_row_groups_and_directories(tmp_path, serve, layout):
    server = serve(latency=0.005, slots=4)
    table = rows(70)
    if layout == "file":
        data = write_parquet(tmp_path / "fns.parquet", table, row_group_size=16)
        assert pq.ParquetFile(data).num_row_groups == 5
    else:
        data = tmp_path / "shards"
        data.mkdir()
        write_parquet(data / "part-0.parquet", table[:30], row_group_size=7)
        write_parquet(data / "part-1.parquet", table[30:], row_group_size=9)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints)]) == 0
    out = tmp_path / ("fns.scores.jsonl" if layout == "file" else "shards.scores.jsonl")
    assert_each_scored_once(read_records(out), {r["id"]: r["code"] for r in table})


def test_row_numbers_are_ids_without_an_id_column(tmp_path, serve):
    server = serve()
    texts = [function_source(i) for i in range(20)]
    data = write_parquet(tmp_path / "noid.parquet", [{"function": t} for t in texts], row_group_size=6)
    lines = tmp_path / "noid.jsonl"
    write_jsonl(lines, [{"content": t} for t in texts[:10]], raw_lines={3: ""})   # a blank line still counts
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints)]) == 0
    assert_each_scored_once(read_records(tmp_path / "noid.scores.jsonl"), dict(enumerate(texts)))
    assert score.main([str(lines), "--endpoints", str(endpoints), "-o", str(tmp_path / "l.jsonl")]) == 0
    expected = {(i if i < 3 else i + 1): t for i, t in enumerate(texts[:10])}
    assert_each_scored_once(read_records(tmp_path / "l.jsonl"), expected)


def test_explicit_columns_and_gzipped_jsonl(tmp_path, serve):
    server = serve()
    data = tmp_path / "fns.jsonl.gz"
    with gzip.open(data, "wt") as f:
        for i in range(15):
            f.write(json.dumps({"key": i * 10, "body": function_source(i), "code": "x"}) + "\n")
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints), "--id-column", "key", "--text-column", "body"]) == 0
    assert_each_scored_once(read_records(tmp_path / "fns.scores.jsonl"),
                            {i * 10: function_source(i) for i in range(15)})


def test_limit_then_resume_finishes_exactly_once(tmp_path, serve):
    server = serve(latency=0.01, slots=2)
    data = write_parquet(tmp_path / "fns.parquet", rows(50), row_group_size=8)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints), "--limit", "17"]) == 0
    assert len(read_records(tmp_path / "fns.scores.jsonl")) == 17
    assert score.main([str(data), "--endpoints", str(endpoints), "--resume", "--limit", "10"]) == 0
    assert len(read_records(tmp_path / "fns.scores.jsonl")) == 27
    assert score.main([str(data), "--endpoints", str(endpoints), "--resume"]) == 0
    assert_each_scored_once(read_records(tmp_path / "fns.scores.jsonl"), {r["id"]: r["code"] for r in rows(50)})
    assert server.answered == 50
    # a finished checkpoint: nothing to do, no endpoint contacted
    before = len(server.requests)
    result = run_cli(data, "--endpoints", endpoints, "--resume")
    assert result.returncode == 0 and "Nothing to do" in result.stderr
    assert len(server.requests) == before


def test_endpoint_without_the_model_is_left_out(tmp_path, serve):
    good = serve()
    other = serve(models={"llama3.2:latest": "b" * 64})
    data = write_jsonl(tmp_path / "fns.jsonl", rows(20))
    endpoints = write_endpoints(tmp_path / "e.txt", [good, other])
    result = run_cli(data, "--endpoints", endpoints)
    assert result.returncode == 0, result.stderr
    assert "model qwen2.5-coder:7b not found" in result.stderr and "llama3.2:latest" in result.stderr
    assert other.chat_bodies() == []
    assert Counter(r["endpoint"] for r in read_records(tmp_path / "fns.scores.jsonl")) == {"e0": 20}


def test_no_endpoint_with_the_model_exits_2(tmp_path, serve):
    other = serve(models={"llama3.2:latest": "b" * 64})
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [other]))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "no endpoint can score" in result.stderr


def test_malformed_line_and_empty_function_are_recorded_once(tmp_path, serve):
    server = serve()
    records = rows(10)
    records[4]["code"] = "   \n"
    records[6]["code"] = None
    data = write_jsonl(tmp_path / "fns.jsonl", records, raw_lines={2: '{"id": "broken", "code": '})
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 1, result.stderr
    out = read_records(tmp_path / "fns.scores.jsonl")
    errors = {r["id"]: r for r in out if r["score"] is None}
    assert set(errors) == {"line:3", "fn-4", "fn-6"}
    assert errors["line:3"]["error_kind"] == "malformed" and "line 3" in errors["line:3"]["error"]
    assert errors["fn-4"]["error_kind"] == "empty" and errors["fn-6"]["error_kind"] == "empty"
    assert len(scored(out)) == 8 and server.answered == 8
    assert "2 empty" in result.stderr and "1 malformed" in result.stderr
    # permanent errors are not retried by --resume; with nothing left to score it exits 0, still listing them
    again = run_cli(data, "--endpoints", endpoints, "--resume")
    assert again.returncode == 0 and len(read_records(tmp_path / "fns.scores.jsonl")) == 11
    assert "2 empty" in again.stderr and "1 malformed" in again.stderr


def test_long_function_is_cut_to_fit_the_context(tmp_path, serve):
    server = serve()
    huge = "def big():\n" + "".join(f"    x{i} = {i} * {i}\n" for i in range(4000))
    data = write_jsonl(tmp_path / "fns.jsonl", [{"id": "big", "code": huge}, {"id": "small", "code": "def f(): pass"}])
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints), "--num-ctx", "2048"]) == 0
    out = {r["id"]: r for r in read_records(tmp_path / "fns.scores.jsonl")}
    assert out["big"]["truncated"] is True and out["small"]["truncated"] is False
    prompts = {b["messages"][0]["content"] for b in server.chat_bodies()}
    big_prompt = max(prompts, key=len)
    assert "Answer with JSON only" in big_prompt          # instructions survive
    assert len(big_prompt) / 2.5 + 256 <= 2048            # fits with room for the answer
    assert len(big_prompt) > 2000                          # but still carries most of what fits


def test_every_prompt_fits_the_context_whatever_the_template_and_columns(tmp_path, serve):
    server = serve()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Answer with JSON only: rate this code.\nDocs: {doc}\n```\n{code}\n```\n"
                      "Once more:\n```\n{code}\n```\n")
    huge = "def big():\n" + "".join(f"    x{i} = {i} * {i}\n" for i in range(4000))
    table = [{"id": "long-doc", "code": function_source(1), "doc": "word " * 12_000},
             {"id": "long-code", "code": huge, "doc": "short"},
             {"id": "both", "code": huge.replace("big", "bigger"), "doc": "word " * 12_000},
             {"id": "small", "code": function_source(2), "doc": "fine"}]
    data = write_jsonl(tmp_path / "fns.jsonl", table)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--num-ctx", "2048", "--prompt-file", prompt, "--no-progress")
    assert result.returncode == 0, result.stderr
    out = {r["id"]: r for r in read_records(tmp_path / "fns.scores.jsonl")}
    assert all(r["score"] is not None for r in out.values()) and len(out) == 4
    assert {k: r["truncated"] for k, r in out.items()} == {"long-doc": True, "long-code": True, "both": True,
                                                          "small": False}
    prompts = [b["messages"][0]["content"] for b in server.chat_bodies()]
    assert len(prompts) == 4
    for sent in prompts:
        assert sent.startswith("Answer with JSON only")                  # the instructions are never dropped
        assert len(sent) / 2.5 + 256 <= 2048, len(sent)                   # fits with room for the answer
    small = next(p for p in prompts if "fine" in p)
    assert small.count(function_source(2)) == 2                          # a prompt that fits is left whole
    both = next(p for p in prompts if "def bigger" in p)
    assert both.count("def bigger") == 2 and len(both) > 3000               # still carries most of what fits


def test_a_template_too_big_for_the_context_gives_too_long_records_and_sends_nothing(tmp_path, serve):
    server = serve()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Rate this code. " * 400 + "\n```\n{code}\n```\n")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--num-ctx", "2048", "--prompt-file", prompt, "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert [r["error_kind"] for r in records] == ["too_long"] * 3
    assert "--num-ctx 2048" in records[0]["error"]
    assert not any("compute_" in b["messages"][0]["content"] for b in server.chat_bodies())
    # a bigger context on resume scores them
    again = run_cli(data, "--endpoints", endpoints, "--num-ctx", "8192", "--prompt-file", prompt, "--resume",
                    "--no-progress")
    assert again.returncode == 0, again.stderr
    assert len(scored(read_records(tmp_path / "fns.scores.jsonl"))) == 3


@pytest.mark.parametrize("case", ["missing-file", "missing-column", "corrupt-parquet", "empty-endpoints",
                                  "bad-endpoint-key", "existing-output", "unknown-suffix", "template-field",
                                  "bad-option-value"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, serve, case):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    args = [data, "--endpoints", endpoints]
    expect = ""
    if case == "missing-file":
        args[0], expect = tmp_path / "nope.parquet", "no such file"
    elif case == "missing-column":
        args += ["--text-column", "body"]
        expect = "columns are: id, code, repo"
    elif case == "corrupt-parquet":
        bad = tmp_path / "bad.parquet"
        bad.write_bytes(b"PAR1 this is not parquet")
        args[0], expect = bad, "not a readable Parquet file"
    elif case == "empty-endpoints":
        (tmp_path / "e.txt").write_text("# nothing here\n\n")
        expect = "no endpoints"
    elif case == "bad-endpoint-key":
        (tmp_path / "e.txt").write_text(f"# fleet\n{server.url}\nlocalhost:9 colour=red\n")
        expect = "e.txt:3: unknown key 'colour'"
    elif case == "existing-output":
        (tmp_path / "fns.scores.jsonl").write_text('{"id": "fn-0", "score": 3}\n')
        expect = "--resume"
    elif case == "unknown-suffix":
        other = tmp_path / "fns.csv"
        other.write_text("id,code\n")
        args[0], expect = other, "unknown input type"
    elif case == "template-field":
        prompt = tmp_path / "p.txt"
        prompt.write_text("Rate {code} from {language}")
        args += ["--prompt-file", prompt]
        expect = "language"
    elif case == "bad-option-value":
        args += ["--timeout", "soon"]
        expect = "not a duration"
    before = (tmp_path / "fns.scores.jsonl").read_bytes() if case == "existing-output" else None
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("score.py: error:") and expect in lines[0], result.stderr
    if before is not None:
        assert (tmp_path / "fns.scores.jsonl").read_bytes() == before
    assert server.chat_bodies() == []


def test_endpoints_file_forms(tmp_path):
    path = tmp_path / "endpoints.txt"
    path.write_text("# comment\n\ngpu-box\nmac1:8080 concurrency=2 name=laptop  # trailing comment\n"
                    "http://10.0.0.9:11434/ model=qwen2.5-coder:3b\nhttps://box.example/v1 concurrency=auto\n")
    specs = score.parse_endpoints(path)
    assert [s.url for s in specs] == ["http://gpu-box:11434", "http://mac1:8080", "http://10.0.0.9:11434",
                                      "https://box.example"]
    assert specs[1].concurrency == 2 and specs[1].name == "laptop" and specs[3].concurrency == score.AUTO
    assert specs[2].model == "qwen2.5-coder:3b" and specs[3].api == "openai" and specs[0].api == "auto"


def test_prompt_file_can_use_other_columns(tmp_path, serve):
    server = serve()
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Repository {repo}. Rate this code 1-10 as JSON.\n```\n{code}\n```\n")
    data = write_parquet(tmp_path / "fns.parquet", rows(6))
    assert score.main([str(data), "--endpoints", str(write_endpoints(tmp_path / "e.txt", [server])),
                       "--prompt-file", str(prompt)]) == 0
    sent = sorted(b["messages"][0]["content"].split(".")[0] for b in server.chat_bodies())
    assert sent == sorted(f"Repository repo{i % 3}" for i in range(6))


def test_check_prints_preflight_and_first_prompt_without_scoring(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(4))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--check")
    assert result.returncode == 0, result.stderr
    assert "ollama 0.5.1" in result.stderr and "a80c4f17acd5" in result.stderr
    assert "first prompt" in result.stdout and function_source(0).splitlines()[0] in result.stdout
    sent = [m["content"] for b in server.chat_bodies() for m in b.get("messages") or []]
    assert not any(function_source(i) in text for text in sent for i in range(4))   # calibration samples only
    assert not (tmp_path / "fns.scores.jsonl").exists()


@pytest.mark.parametrize("case, extra, expect", [
    ("endpoints-latin1", [], "endpoints file is not UTF-8"),
    ("prompt-latin1", [], "prompt file is not UTF-8"),
    ("duplicate-key", [], "e.txt:1: name= given twice"),
    ("option", ["--temperature", "nan"], "--temperature: expected a number from 0 to 2"),
    ("option", ["--temperature", "inf"], "--temperature: expected a number from 0 to 2"),
    ("option", ["--temperature", "-0.5"], "--temperature: expected a number from 0 to 2"),
    ("option", ["--timeout", "0"], "--timeout: must be at least 1s"),
    ("option", ["--timeout", "0.2s"], "--timeout: must be at least 1s"),
    ("option", ["--startup-timeout", "0"], "--startup-timeout: must be at least 1s"),
    ("option", ["--max-downtime", "0"], "--max-downtime: must be longer than 0"),
    ("option", ["--export", "o.parquet", "--min-score", "11"], "--min-score: expected a whole score from 1 to 10"),
    ("option", ["--export", "o.parquet", "--min-score", "0"], "--min-score: expected a whole score from 1 to 10"),
    ("option", ["--export", "o.parquet", "--top", "0"], "would keep no row"),
    ("option", ["--overw"], "unrecognized arguments: --overw"),
])
def test_unusable_file_or_option_value_is_one_line_and_exit_2(tmp_path, serve, case, extra, expect):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    args = [data, "--endpoints", endpoints, *extra]
    if case == "endpoints-latin1":
        endpoints.write_bytes(f"{server.url} name=caf\xe9\n".encode("latin-1"))
    elif case == "prompt-latin1":
        prompt = tmp_path / "p.txt"
        prompt.write_bytes("Rate {code} \xe0 10\n".encode("latin-1"))
        args += ["--prompt-file", prompt]
    elif case == "duplicate-key":
        endpoints.write_text(f"{server.url} name=a name=b\n")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("score.py: error:") and expect in lines[0], result.stderr
    assert server.chat_bodies() == [] and not (tmp_path / "fns.scores.jsonl").exists()


def test_a_finite_temperature_up_to_2_and_a_one_second_timeout_are_accepted():
    config = score.parse_args(["x.jsonl", "--temperature", "2", "--timeout", "1", "--startup-timeout", "1s",
                               "--max-downtime", "0.5"])
    assert (config.temperature, config.timeout, config.startup_timeout, config.max_downtime) == (2.0, 1.0, 1.0, 0.5)
