"""Using the scores: the joined Parquet export, the run report, and the HTML page."""

from __future__ import annotations

import json
import shutil
import subprocess

import pyarrow.parquet as pq
import pytest

import score
from conftest import expected_score, function_source, read_records, rows, run_cli, write_endpoints, write_jsonl, \
    write_parquet


def exported(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_export_joins_scores_onto_parquet_rows_keeping_schema_and_order(tmp_path, serve):
    server = serve(latency=0.002)
    table = rows(40)
    table[5]["code"] = ""                       # an error row
    table[9]["code"] = table[3]["code"]         # a duplicate
    data = write_parquet(tmp_path / "fns.parquet", table, row_group_size=7)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints), "--limit", "30"]) == 1     # fn-5 is empty
    out = tmp_path / "scored.parquet"
    result = run_cli(data, "-o", tmp_path / "fns.scores.jsonl", "--report", "--export", out)   # scores nothing
    assert result.returncode == 0, result.stderr
    got = exported(out)
    assert [r["id"] for r in got] == [r["id"] for r in table]            # every input row, input order
    schema = pq.read_schema(out)
    assert schema.names == ["id", "code", "repo", "score", "score_expected", "reason", "model", "endpoint", "error"]
    by_id = {r["id"]: r for r in got}
    for i in range(40):
        r = by_id[f"fn-{i}"]
        if i == 5:
            assert r["score"] is None and "empty" in r["error"]
        elif i < 30:
            assert r["score"] == expected_score(table[i]["code"]) and r["endpoint"] == "e0"
            assert r["model"] == "qwen2.5-coder:7b" and r["error"] is None
        else:
            assert r["score"] is None and r["error"] is None                   # not yet scored
    assert by_id["fn-9"]["score"] == by_id["fn-3"]["score"]


def test_export_takes_the_last_success_over_failed_retries(tmp_path):
    data = write_jsonl(tmp_path / "fns.jsonl", [{"id": i, "code": function_source(i)} for i in range(4)],
                       raw_lines={2: "{not json"})
    checkpoint = tmp_path / "fns.scores.jsonl"
    records = [
        {"id": 0, "score": None, "error": "bad answer", "error_kind": "attempts_exhausted"},
        {"id": 0, "score": 4, "reason": "first", "model": "m", "endpoint": "a", "error": None},
        {"id": 1, "score": 7, "reason": "ok", "model": "m", "endpoint": "b", "error": None},
        {"id": 0, "score": None, "error": "later failure", "error_kind": "attempts_exhausted"},
        {"id": 3, "score": None, "error": "gave up", "error_kind": "attempts_exhausted"},
        {"id": 1, "score": 8, "reason": "rescored", "model": "m", "endpoint": "c", "error": None},
    ]
    checkpoint.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.parquet"
    result = run_cli(data, "-o", checkpoint, "--report", "--export", out)
    assert result.returncode == 0, result.stderr
    got = {r["id"]: r for r in exported(out)}
    assert sorted(got) == [0, 1, 2, 3]                 # the malformed line has no row to carry
    assert (got[0]["score"], got[0]["reason"], got[0]["error"]) == (4, "first", None)
    assert (got[1]["score"], got[1]["endpoint"]) == (8, "c")
    assert got[2]["score"] is None and got[2]["error"] is None      # never scored
    assert got[3]["score"] is None and got[3]["error"] == "gave up"


def test_min_score_keeps_only_good_rows(tmp_path, serve):
    server = serve()
    table = [{"key": i, "function": function_source(i)} for i in range(60)]
    data = write_parquet(tmp_path / "fns.parquet", table)
    out = tmp_path / "good.parquet"
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--id-column", "key",
                     "--export", out, "--min-score", "7")
    assert result.returncode == 0, result.stderr
    got = exported(out)
    expected = [t["key"] for t in table if expected_score(t["function"]) >= 7]
    assert [r["key"] for r in got] == expected and expected
    assert all(r["score"] >= 7 for r in got)
    assert f"Exported {len(expected)} rows" in result.stderr


def test_finished_checkpoint_exports_without_contacting_any_endpoint(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints)]) == 0
    server.go_down()                                # nothing answers now
    out = tmp_path / "x.parquet"
    result = run_cli(data, "--endpoints", endpoints, "-o", tmp_path / "fns.scores.jsonl", "--resume", "--export", out,
                     timeout=30)
    assert result.returncode == 0, result.stderr
    assert "Nothing to do" in result.stderr and "No endpoint answers" not in result.stderr
    assert [r["score"] for r in exported(out)] == [expected_score(function_source(i)) for i in range(10)]


def test_report_warns_when_an_endpoint_scores_differently(tmp_path):
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    checkpoint = tmp_path / "fns.scores.jsonl"
    lines = []
    for i in range(300):
        endpoint = ["gpu", "mac1", "mac2"][i % 3]
        value = 5 + (i % 4 == 0) if endpoint != "mac2" else 3 + (i % 4 == 0)
        lines.append({"id": i, "score": value, "endpoint": endpoint, "ts": 1000.0 + i})
    checkpoint.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = run_cli(data, "-o", checkpoint, "--report")
    assert result.returncode == 0, result.stderr
    warnings = [l for l in result.stderr.splitlines() if l.startswith("WARNING")]
    assert len(warnings) == 1 and "mac2 scores" in warnings[0] and "lower" in warnings[0]
    assert "Throughput over time" in result.stderr


def test_report_is_quiet_when_endpoints_agree_or_samples_are_small(tmp_path):
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    checkpoint = tmp_path / "fns.scores.jsonl"
    lines = [{"id": i, "score": 3 + i % 5, "endpoint": ["a", "b"][i % 2], "ts": float(i)} for i in range(200)]
    lines += [{"id": 1000 + i, "score": 10, "endpoint": "tiny", "ts": 5.0} for i in range(20)]
    checkpoint.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = run_cli(data, "-o", checkpoint, "--report")
    assert result.returncode == 0 and "WARNING" not in result.stderr


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_html_report_renders_in_headless_chromium(tmp_path, serve):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    a, b = serve(latency=0.01), serve(latency=0.03)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(60))
    page = tmp_path / "report.html"
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [a, b]), "--report-html", page)
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "report.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1000,1400", page.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000            # a real rendered page
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert "<svg" in dom and "All rows (60 scored" in dom
    for name in ("e0", "e1"):
        n = sum(r["endpoint"] == name for r in records)
        assert f"{name}: {n} items" in dom
    assert "http://" not in page.read_text().replace(a.url, "").replace(b.url, "").replace(
        "http://www.w3.org/2000/svg", "")                                  # nothing fetched at view time
