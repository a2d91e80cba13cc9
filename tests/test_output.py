"""What a user reads at the end: the resume command, the summary, --help."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import signal
import subprocess
import sys

import score
from conftest import SCORE, interrupt_after, read_records, rows, run_cli, write_endpoints, write_jsonl, write_parquet


def test_resume_command_is_quoted_and_runs_from_the_same_folder(tmp_path, serve):
    server = serve(latency=0.01, slots=2, hold_after=3)
    data_dir = tmp_path / "my data"
    work = tmp_path / "work dir"
    data_dir.mkdir()
    work.mkdir()
    write_jsonl(data_dir / "x.jsonl", rows(12))
    write_endpoints(work / "e.txt", [server])
    out = data_dir / "x.scores.jsonl"
    argv = [sys.executable, SCORE, "../my data/x.jsonl", "--endpoints", "e.txt", "--no-progress", "--overwrite"]
    stopped, _ = interrupt_after(out, command=argv, cwd=work, sig=signal.SIGINT, held=[server])
    assert stopped.returncode == 130, stopped.stderr
    lines = stopped.stderr.splitlines()
    hint = lines[lines.index(next(l for l in lines if l.endswith("continue with:"))) + 1].strip()
    words = shlex.split(hint)
    assert words[1:] == [SCORE, "../my data/x.jsonl", "--endpoints", "e.txt", "--no-progress", "--resume"]
    words[0] = sys.executable if words[0] in ("python", "python3") else words[0]
    again = subprocess.run(words, cwd=work, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert {r["id"] for r in read_records(out) if r["score"] is not None} == {r["id"] for r in rows(12)}


def test_invocation_names_a_console_script_as_typed(tmp_path, monkeypatch):
    script = tmp_path / "bin" / "score"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", str(script.parent))
    assert score.invocation(str(script)) == ["score"]
    assert score.invocation("../tools/score.py")[1:] == ["../tools/score.py"]
    monkeypatch.setenv("PATH", "")
    assert score.invocation(str(script)) == [str(script)]


def summary_numbers(err: str, pattern: str) -> list[int]:
    found = re.search(pattern, err)
    assert found, err
    return [int(g.replace(",", "")) for g in found.groups()]


def test_interrupted_summary_counts_rows_never_attempted_and_no_false_resends(tmp_path, serve):
    server = serve(latency=0.01, slots=2, hold_after=3)
    data = write_parquet(tmp_path / "fns.parquet", rows(60))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    stopped, records = interrupt_after(out, data, "--endpoints", endpoints, "--no-progress", sig=signal.SIGINT,
                                       held=[server])
    assert stopped.returncode == 130, stopped.stderr
    cancelled, never = summary_numbers(stopped.stderr, r"Stopped before the end: ([\d,]+) rows? in flight cancelled "
                                                       r"\(not written\), ([\d,]+) rows? never attempted")
    assert cancelled >= 1 and len(records) + cancelled + never == 60
    assert "Re-sent" not in stopped.stderr          # nothing was re-sent: the cancelled rows wait for --resume


def test_summary_speaks_in_the_singular_for_one(tmp_path, serve):
    server = serve()
    table = rows(3)
    table[2]["code"] = table[0]["code"]
    data = write_jsonl(tmp_path / "fns.jsonl", table)
    page = tmp_path / "report.html"
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--report-html", page)
    assert result.returncode == 0, result.stderr
    for text in (result.stderr, page.read_text()):                  # a run of a fraction of a second
        assert "nan" not in text and "0.0s buckets" not in text
    assert "Scored 3 rows" in result.stderr and "1 was a duplicate (scored once)" in result.stderr
    assert "1 as a duplicate" in result.stderr and "were duplicates" not in result.stderr
    assert "Stopped before the end" not in result.stderr


def test_summary_of_a_large_fleet_fits_100_columns(tmp_path, serve):
    urls = [serve(latency=0.001).url for _ in range(42)]
    data = write_jsonl(tmp_path / "fns.jsonl", rows(200))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text("".join(f"{u} name=laptop-{i:02d} concurrency=1\n" for i, u in enumerate(urls))
                         + "http://127.0.0.1:9/ name=unplugged-box\n")
    result = run_cli(data, "--endpoints", endpoints, "--no-progress", "--startup-timeout", "20")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Scored 200 rows"))
    end = next(i for i, line in enumerate(lines) if line.startswith("Score distribution"))
    summary = lines[start:end]
    assert max(len(line) for line in summary + lines[end:]) <= 100, max(summary, key=len)
    assert any(line.startswith("unplugged-box") for line in summary)           # the one that needs attention
    folded = [line.split() for line in summary if " others " in line]
    named = [line for line in summary if line.startswith("laptop-")]
    assert len(folded) == 1 and len(named) + 1 + int(folded[0][0]) == 43


def test_help_groups_options_states_durations_and_names_the_score_command():
    result = run_cli("--help", env={"COLUMNS": "100"})
    assert result.returncode == 0
    text = result.stdout
    headings = [line for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert [h.split(" (")[0].rstrip(":") for h in headings] == [
        "positional arguments", "options", "input", "fleet", "run", "output", "reports and export"]
    assert "score INPUT" in text and "`score` command" in text
    flat = " ".join(text.split())
    for flag in ("--timeout", "--max-downtime", "--startup-timeout"):
        described = flat.split(f"{flag} DURATION ", 1)[1].split(" --", 1)[0]
        assert "15m, 2h or 1d" in described, (flag, described)


def load_try_it():
    spec = importlib.util.spec_from_file_location("try_it", score.__file__.replace("score.py", "examples/try_it.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_counts_the_planted_empty_row_as_expected_and_says_what_tiny_verdicts_are_worth(tmp_path, capsys):
    try_it = load_try_it()
    out = tmp_path / "sample.scores.jsonl"
    records = [{"id": f"f{i}", "score": 1, "score_expected": 1.5 + i / 20} for i in range(40)]
    records.append({"id": "poor.empty", "score": None, "error_kind": "empty"})
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert try_it.explain(out, 1, 41) == 0
    said = capsys.readouterr().out
    assert "40 of 40 functions got 1" in said and "range from 1.50 to 3.45" in said and "expected" in said
    assert try_it.explain(out, 1, 50) == 1                      # stopped early: rows never attempted
    records[3] = {"id": "f3", "score": None, "error_kind": "attempts_exhausted"}
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert try_it.explain(out, 1, 41) == 1                      # a real failure is not explained away
    assert try_it.explain(out, 130, 41) == 130


def test_summary_says_one_earlier_permanent_error_in_the_singular(tmp_path, serve):
    server = serve(latency=0.01)
    records = rows(4)
    records[2]["code"] = ""                                       # an empty row: a permanent error
    data = write_jsonl(tmp_path / "fns.jsonl", records)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert run_cli(data, "--endpoints", endpoints, "--no-progress", "--limit", "3").returncode == 1
    result = run_cli(data, "--endpoints", endpoints, "--no-progress", "--resume")    # the 4th row is left
    assert "Rows without a score: 1 earlier permanent error." in result.stderr, result.stderr
    assert "2 rows scored, 1 with a permanent error, 0 failed rows to retry" in result.stderr
