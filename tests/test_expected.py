"""Expected scores from token probabilities, --reason modes, --top, and the calibration at preflight."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

import score
from conftest import expected_score, read_records, rows, run_cli, write_endpoints, write_jsonl, write_parquet
from fake_ollama import expected_mean, logprob_entries


def entry(token: str, p: float, alternatives: list[tuple[str, float]] | None = None) -> dict:
    return {"token": token, "logprob": math.log(p),
            "top_logprobs": [{"token": t, "logprob": math.log(q)} for t, q in alternatives or [(token, p)]]}


def answer(*middle: dict, tail: str = "}") -> list[dict]:
    """Entries for '{"score": <middle>' + tail, with fixed tokens around the score."""
    return [entry('{"', 0.99), entry("score", 0.99), entry('":', 0.99), entry(" ", 0.99), *middle, entry(tail, 0.99)]


# ── the rules, on hand-made token probabilities


def test_forbidden_alternatives_are_dropped_and_the_rest_renormalized():
    entries = answer(entry("7", 0.3, [("7", 0.3), (".", 0.4), ("8", 0.2), ("```", 0.05), ("6", 0.1), ("0", 0.05)]))
    assert score.expected_score(entries, 7) == pytest.approx((7 * 0.3 + 8 * 0.2 + 6 * 0.1) / 0.6, abs=1e-3)


def test_a_one_on_the_path_taken_is_split_by_the_next_token():
    first = entry("1", 0.5, [("1", 0.5), ("9", 0.5)])
    second = entry("0", 0.6, [("0", 0.6), ("}", 0.2), ("5", 0.2)])       # "15" is not a score
    got = score.expected_score(answer(first, second), 10)
    assert got == pytest.approx(0.5 * 9 + 0.5 * (0.75 * 10 + 0.25 * 1), abs=1e-3)


def test_a_one_only_seen_as_an_alternative_follows_the_rest_of_the_distribution():
    high = answer(entry("9", 0.6, [("9", 0.6), ("8", 0.2), ("1", 0.2)]))
    low = answer(entry("2", 0.6, [("2", 0.6), ("3", 0.2), ("1", 0.2)]))
    assert score.expected_score(high, 9) == pytest.approx(0.6 * 9 + 0.2 * 8 + 0.2 * 10, abs=1e-3)
    assert score.expected_score(low, 2) == pytest.approx(0.6 * 2 + 0.2 * 3 + 0.2 * 1, abs=1e-3)


def test_unreadable_probabilities_give_none_never_a_guess():
    assert score.expected_score(None, 7) is None
    assert score.expected_score(answer(entry("7", 0.9, [("7", 0.9)])), 8) is None         # not the answered score
    no_alternatives = [{"token": t, "logprob": -0.1} for t in ('{"', "score", '":', " ", "7", "}")]
    assert score.expected_score(no_alternatives, 7) is None
    assert score.expected_score(answer(entry("7", 0.9, [("x", 0.9)])), 7) == 7.0          # its own pick remains


def test_a_log_probability_above_zero_makes_its_position_unreadable():
    sure = answer(entry("7", 0.6, [("7", 0.6), ("8", 0.4)]))
    assert score.expected_score(sure, 7) == pytest.approx(7.4, abs=1e-3)
    for bad in (math.inf, 0.5, math.nan):
        spoiled = answer(entry("7", 0.6, [("7", 0.6), ("8", 0.4)]))
        spoiled[4]["top_logprobs"][1]["logprob"] = bad
        assert score.expected_score(spoiled, 7) is None, bad
        picked = answer(entry("7", 0.6, [("7", 0.6), ("8", 0.4)]))
        picked[4]["logprob"] = bad
        assert score.expected_score(picked, 7) is None, bad
    rounded = answer(entry("7", 1.0, [("7", 1.0)]))
    rounded[4]["logprob"] = rounded[4]["top_logprobs"][0]["logprob"] = 1e-7      # rounding, not a fault
    assert score.expected_score(rounded, 7) == 7.0
    first = entry("1", 0.5, [("1", 0.5), ("9", 0.5)])                     # the "1" or "10" position spoiled
    second = entry("0", 0.6, [("0", 0.6), ("}", 0.4)])
    second["top_logprobs"][1]["logprob"] = math.inf
    assert score.expected_score(answer(first, second), 10) is None
    assert score.alternatives({"token": "7", "logprob": 0.3, "top_logprobs": []}) is None
    assert score.alternatives({"token": "7", "logprob": -0.1, "top_logprobs": []}) == {}


@pytest.mark.parametrize("spaced", [False, True])
@pytest.mark.parametrize("content", ['{{"score": {s}, "reason": "fine"}}', '{{"reason": "fine", "score": {s}}}',
                                     '{{"score": {s}}}'])
def test_fake_distributions_read_back_exactly(content, spaced):
    for s in range(1, 11):
        text = content.format(s=s)
        assert score.expected_score(logprob_entries(text, s, spaced), s) == pytest.approx(expected_mean(s), abs=1e-3)


# ── end to end against the fake servers


@pytest.mark.parametrize("api,mode,reason_first", [("ollama", "on", False), ("openai", "spaced", False),
                                                   ("ollama", "spaced", True), ("openai", "on", True)])
def test_records_carry_the_expected_score_of_the_known_distribution(tmp_path, serve, api, mode, reason_first):
    server = serve(api=api, logprobs=mode, reason_first=reason_first)
    if api == "openai":
        server.behaviour.models = {"m": ""}
    table = rows(40)
    data = write_jsonl(tmp_path / "fns.jsonl", table)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--model", "m" if api == "openai" else "qwen2.5-coder:7b")
    assert result.returncode == 0, result.stderr
    texts = {r["id"]: r["code"] for r in table}
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert len(records) == 40
    for r in records:
        assert r["score"] == expected_score(texts[r["id"]])                 # the integer stays what was answered
        assert r["score_expected"] == pytest.approx(expected_mean(r["score"]), abs=1e-3)
    assert len({r["score_expected"] for r in records}) > 3
    assert all(b["logprobs"] is True and b["top_logprobs"] == score.TOP_LOGPROBS for b in server.chat_bodies())
    assert "40 of 40 answers carry score_expected" in result.stderr
    for line in (tmp_path / "fns.scores.jsonl").read_bytes().splitlines(keepends=True):
        assert score.RECORD_FIELDS.match(line), line          # resume keeps its fast scanner


@pytest.mark.parametrize("api,values", [("ollama", "probs"), ("openai", "inf")])
def test_log_probabilities_that_are_not_give_null_never_an_invented_score(tmp_path, serve, api, values):
    server = serve(api=api, logprob_values=values)
    if api == "openai":
        server.behaviour.models = {"m": ""}
    data = write_jsonl(tmp_path / "fns.jsonl", rows(12))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]),
                     "--model", "m" if api == "openai" else "qwen2.5-coder:7b")
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert len(records) == 12 and all(r["score"] is not None for r in records)
    assert [r["score_expected"] for r in records] == [None] * 12


def test_a_null_reason_is_recorded_and_exported_as_null_not_as_text(tmp_path, serve):
    server = serve(null_reason=True)
    data = write_parquet(tmp_path / "fns.parquet", rows(6))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]))
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert len(records) == 6 and all(r["score"] is not None and r["reason"] is None for r in records)
    out = tmp_path / "x.parquet"
    assert run_cli(data, "--report", "--export", out).returncode == 0
    assert pq.read_table(out, columns=["reason"]).column("reason").to_pylist() == [None] * 6


def test_server_without_probabilities_gives_null_and_says_so(tmp_path, serve):
    with_probs, without = serve(), serve(logprobs="off")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(60))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [with_probs, without]))
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    by_endpoint = {name: [r for r in records if r["endpoint"] == name] for name in ("e0", "e1")}
    assert by_endpoint["e0"] and by_endpoint["e1"]
    assert all(r["score_expected"] is not None for r in by_endpoint["e0"])
    assert all(r["score_expected"] is None and r["score"] is not None for r in by_endpoint["e1"])
    assert "no token probabilities from e1" in " ".join(result.stderr.split())   # the summary wraps at 100


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_server_rejecting_probabilities_is_asked_once_then_never(tmp_path, serve, api):
    server = serve(api=api, logprobs="reject", reject_json_schema=api == "openai")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    endpoints = write_endpoints(tmp_path / "e.txt", [server], options="concurrency=1")
    result = run_cli(data, "--endpoints", endpoints)
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert len(records) == 10 and all(r["score"] is not None and r["score_expected"] is None for r in records)
    asked = [b for b in server.chat_bodies() if b.get("logprobs")]
    assert len(asked) == 1 and len(server.chat_bodies()) == 10 + 1 + (api == "openai")
    assert result.stderr.count("refuses token probabilities") == 1
    if api == "openai":       # the json_schema fallback is one calm line, not the server's raw error
        lines = [line for line in result.stderr.splitlines() if "json_schema" in line]
        assert len(lines) == 1 and "literal_error" not in lines[0] and "500" not in lines[0]


@pytest.mark.parametrize("api", ["ollama", "openai"])
def test_reason_modes_shape_the_request_and_the_records(tmp_path, serve, api):
    server = serve(api=api)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(8))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    for mode in ("none", "short", "full"):
        out = tmp_path / f"{mode}.jsonl"
        result = run_cli(data, "--endpoints", endpoints, "--reason", mode, "-o", out)
        assert result.returncode == 0, result.stderr
        bodies = server.chat_bodies()[-8:]
        for body in bodies:
            fmt = body["format"] if api == "ollama" else body["response_format"]["json_schema"]["schema"]
            prompt = body["messages"][0]["content"]
            assert fmt["properties"]["score"]["type"] == "integer"
            if mode == "none":
                assert "reason" not in fmt["properties"] and fmt["required"] == ["score"]
                assert '"reason"' not in prompt and '{"score": <integer 1-10>}' in prompt
            elif mode == "short":
                assert fmt["properties"]["reason"]["maxLength"] == score.SHORT_REASON_CHARS
                assert '"reason": "<a few words>"' in prompt
            else:
                assert fmt == score.SCORE_SCHEMA and "one short sentence" in prompt
        records = read_records(out)
        tokens = {"none": 6, "short": 9, "full": 12}[mode]
        assert all(r["output_tokens"] == tokens and r["score_expected"] is not None for r in records)
        assert all((r["reason"] is None) == (mode == "none") for r in records)
        assert f"Generated {tokens:.1f} tokens per answer (--reason {mode})" in result.stderr
        assert json.loads(score.meta_path(out).read_text())["fingerprint"]["schema_sha256"]


def test_export_has_score_expected_and_top_keeps_the_best_rows(tmp_path, serve):
    server = serve()
    table = rows(60)
    data = write_parquet(tmp_path / "fns.parquet", table)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints), "--no-progress"]) == 0
    checkpoint = tmp_path / "fns.scores.jsonl"
    ranked = sorted(read_records(checkpoint), key=lambda r: (-r["score_expected"], -r["score"], r["id"]))
    for top, count in (("7", 7), ("25%", 15), ("100%", 60)):
        out = tmp_path / f"top{count}.parquet"
        result = run_cli(data, "-o", checkpoint, "--report", "--export", out, "--top", top)
        assert result.returncode == 0, result.stderr
        got = pq.read_table(out).to_pylist()
        assert len(got) == count and f"(--top {top})" in result.stderr
        rank = {r["id"]: (r["score_expected"], r["score"]) for r in ranked}
        cut = rank[ranked[count - 1]["id"]]
        assert {i for i, v in rank.items() if v > cut} <= {r["id"] for r in got}      # all that rank above the cut
        assert all(rank[r["id"]] >= cut for r in got)                                # and only ties at the cut
        again = run_cli(data, "-o", checkpoint, "--report", "--export", out, "--top", top)
        assert again.returncode == 0 and pq.read_table(out).to_pylist() == got       # ties break the same way
        assert [r["id"] for r in got] == [r["id"] for r in table if r["id"] in {g["id"] for g in got}]  # input order
        for r in got:
            assert r["score_expected"] == pytest.approx(expected_mean(r["score"]), abs=1e-3)
    both = run_cli(data, "-o", checkpoint, "--report", "--export", tmp_path / "b.parquet", "--top", "20",
                   "--min-score", "9")
    got = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert both.returncode == 0 and got and all(r["score"] >= 9 for r in got)
    cut = (ranked[19]["score_expected"], ranked[19]["score"])
    assert {r["id"] for r in ranked if (r["score_expected"], r["score"]) > cut and r["score"] >= 9} \
        <= {r["id"] for r in got}
    assert all((r["score_expected"], r["score"]) >= cut for r in got)


@pytest.mark.parametrize("bad", ["0", "0%", "101%", "x", "2.5"])
def test_top_needs_a_count_or_percentage_and_export(tmp_path, bad):
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    result = run_cli(data, "--export", tmp_path / "o.parquet", "--top", bad)
    assert result.returncode == 2 and "--top" in result.stderr and "Traceback" not in result.stderr
    alone = run_cli(data, "--top", "10")
    assert alone.returncode == 2 and "--top only applies with --export" in alone.stderr


# ── calibration


def test_calibration_runs_on_every_endpoint_and_lands_in_the_sidecar(tmp_path, serve):
    good, other = serve(verdict="docs", latency=0.05), serve(verdict="docs", api="openai", latency=0.05)
    other.behaviour.models = {"qwen2.5-coder:7b": ""}
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = write_endpoints(tmp_path / "e.txt", [good, other], extra=[])
    endpoints.write_text(endpoints.read_text().replace("name=e1", "name=e1 concurrency=1"))
    result = run_cli(data, "--endpoints", endpoints, "--calibrate")
    assert result.returncode == 0, result.stderr
    assert len(read_records(tmp_path / "fns.scores.jsonl")) == 5         # calibration is never written
    samples = len(score.CALIBRATION_GOOD) + len(score.CALIBRATION_POOR)
    assert len(good.chat_bodies()) + len(other.chat_bodies()) == 5 + 2 * samples
    meta = json.loads(score.meta_path(tmp_path / "fns.scores.jsonl").read_text())
    for name in ("e0", "e1"):
        c = meta["calibration"][name]
        assert c["verdict"] == "ok" and c["measure"] == "score_expected" and c["probabilities"] is True
        assert c["good_mean"] == pytest.approx(expected_mean(8), abs=1e-3)
        assert c["poor_mean"] == pytest.approx(expected_mean(2), abs=1e-3)
        assert len(c["good"]) == len(score.CALIBRATION_GOOD)
    assert "separation" in result.stderr and "WARNING" not in result.stderr
    assert other.active_max == 1 and good.active_max > 1           # a pinned concurrency holds for calibration


def test_a_model_that_cannot_tell_good_from_poor_is_flagged_and_can_stop_the_run(tmp_path, serve):
    fine, flat = serve(verdict="docs"), serve(verdict="flat", logprobs="off")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = write_endpoints(tmp_path / "e.txt", [fine, flat])
    stopped = run_cli(data, "--endpoints", endpoints, "--require-calibration", "-o", tmp_path / "a.jsonl")
    assert stopped.returncode == 2, stopped.stderr
    assert "WARNING: e1 scores clearly poor functions about as high" in stopped.stderr
    assert "calibration failed on e1 (--require-calibration)" in stopped.stderr
    assert not (tmp_path / "a.jsonl").exists() or not (tmp_path / "a.jsonl").read_text()
    warned = run_cli(data, "--endpoints", endpoints, "--calibrate", "-o", tmp_path / "b.jsonl")
    assert warned.returncode == 0 and "WARNING: e1" in warned.stderr
    meta = json.loads(score.meta_path(tmp_path / "b.jsonl").read_text())
    assert meta["calibration"]["e1"]["verdict"] == "no separation"
    assert meta["calibration"]["e1"]["measure"] == "score" and meta["calibration"]["e1"]["separation"] == 0
    assert meta["calibration"]["e0"]["verdict"] == "ok"


def test_check_shows_calibration_and_no_calibration_skips_it(tmp_path, serve):
    server = serve(verdict="docs")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    checked = run_cli(data, "--endpoints", endpoints, "--check")
    assert checked.returncode == 0 and "probabilities" in checked.stderr and "separation" in checked.stderr
    assert len(server.chat_bodies()) == len(score.CALIBRATION_GOOD) + len(score.CALIBRATION_POOR)
    skipped = run_cli(data, "--endpoints", endpoints, "--check", "--no-calibration")
    assert skipped.returncode == 0 and "separation" not in skipped.stderr
    assert len(server.chat_bodies()) == len(score.CALIBRATION_GOOD) + len(score.CALIBRATION_POOR)


def test_an_endpoint_far_from_the_fleet_is_marked_unlike_the_others():
    def result(good: float, poor: float) -> dict:
        return {"measure": "score_expected", "good_mean": good, "poor_mean": poor, "separation": good - poor,
                "verdict": "ok"}
    results = {"a": result(8.0, 2.0), "b": result(7.5, 2.5), "c": result(9.9, 6.0)}
    score.compare_calibrations(results)
    assert [results[n]["verdict"] for n in "abc"] == ["ok", "ok", "unlike the others"]
    assert any("c scores the calibration set very differently" in line for line in score.calibration_warnings(results))


def test_calibration_runs_by_default_only_for_big_jobs(tmp_path, serve):
    server = serve(verdict="docs")
    samples = len(score.CALIBRATION_GOOD) + len(score.CALIBRATION_POOR)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    big = write_parquet(tmp_path / "big.parquet", rows(score.CALIBRATE_MIN_ROWS))
    result = run_cli(big, "--endpoints", endpoints, "--limit", "5")
    assert result.returncode == 0, result.stderr
    assert len(server.chat_bodies()) == 5 + samples and "separation" in result.stderr
    small = write_jsonl(tmp_path / "small.jsonl", rows(300))
    result = run_cli(small, "--endpoints", endpoints, "--limit", "5")
    assert result.returncode == 0, result.stderr
    assert len(server.chat_bodies()) == 5 + samples + 5 and "separation" not in result.stderr


def test_requests_in_flight_when_a_fallback_is_learned_are_resent_not_failed(tmp_path, serve):
    server = serve(api="openai", reject_json_schema=True, logprobs="reject", verdict="docs", latency=0.05, slots=1,
                   queued_rejections=True)
    server.behaviour.models = {"qwen2.5-coder:7b": ""}
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--check")
    assert result.returncode == 0, result.stderr
    line = [line for line in result.stderr.splitlines() if line.startswith("e0 ")][-1]      # the calibration line
    assert line.split()[1:5] == ["no", "8.00", "2.00", "6.00"] and "ok" in line, result.stderr
    assert result.stderr.count("json_schema") == 1 and result.stderr.count("refuses token probabilities") == 1


def test_calibration_of_a_large_fleet_reads_as_a_few_lines_within_100_columns(tmp_path, fleet):
    passing, flat = fleet(20, verdict="docs"), fleet(24, verdict="flat", logprobs="off")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", passing + flat), "--check",
                     "--calibrate")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("endpoint") and "separation" in line)
    table = lines[head + 1:head + 3]
    assert table[0].startswith("24 endpoints") and "no separation" in table[0]      # the same failure: one line
    assert table[1].startswith("20 others") and "ok (averages)" in table[1]         # the passing ones: one line
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: 24 endpoints (e20, e21, e22 and 21 more) score")
    assert all(len(line) <= 100 for line in lines), max(lines, key=len)
