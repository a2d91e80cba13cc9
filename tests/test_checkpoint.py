"""The checkpoint and every other output: always writable, never written over something that is not ours."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import (SCORE, function_source, read_records, rows, run_cli, scored, write_endpoints, write_jsonl,
                      write_parquet)
from test_safety import dead_endpoints, one_line_error


def snapshot(root: Path) -> dict[str, object]:
    """Every path under root with its content; special files by type and inode (reading a fifo would block)."""
    out: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        name, info = str(path.relative_to(root)), path.lstat()
        if stat.S_ISLNK(info.st_mode):
            out[name] = "-> " + os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            out[name] = path.read_bytes()
        else:
            out[name] = (stat.S_IFMT(info.st_mode), info.st_ino, info.st_rdev)
    return out


# ── every record can be written

def test_an_answer_with_a_lone_surrogate_is_saved_on_one_line_and_resumes(tmp_path, serve):
    server = serve(reason_text="looks fine \ud800 until encoded")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(6))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    first = run_cli(data, "--endpoints", endpoints, "--limit", "3")
    assert first.returncode == 0, first.stderr
    rest = run_cli(data, "--endpoints", endpoints, "--resume")
    assert rest.returncode == 0, rest.stderr
    records = read_records(out)
    assert len(records) == 6 and len(scored(records)) == 6
    assert all(r["reason"] == "looks fine \ud800 until encoded" for r in records)
    again = run_cli(data, "--endpoints", endpoints, "--resume", "--export", tmp_path / "x.parquet")
    assert again.returncode == 0 and "Nothing to do" in again.stderr, again.stderr
    exported = pq.read_table(tmp_path / "x.parquet").column("reason").to_pylist()
    assert exported == ["looks fine ? until encoded"] * 6      # Parquet strings are UTF-8: replaced, not lost


# ── --resume only continues a checkpoint

@pytest.mark.parametrize("content", [b"my notes\nmore notes, no newline", b"my notes\n", b"\x00\x9f\x01binary blob"])
def test_resume_refuses_a_file_that_is_not_a_checkpoint_and_leaves_it_alone(tmp_path, serve, content):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(4))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    notes = tmp_path / "notes.txt"
    notes.write_bytes(content)
    before = snapshot(tmp_path)
    assert "not a score.py checkpoint" in one_line_error(run_cli(data, "--endpoints", endpoints, "-o", notes,
                                                                 "--resume"))
    assert snapshot(tmp_path) == before and server.chat_bodies() == []


def test_resume_keeps_a_complete_last_record_or_a_foreign_last_line_and_cuts_only_a_torn_record(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(12))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    assert run_cli(data, "--endpoints", endpoints, "--limit", "4").returncode == 0
    whole = out.read_bytes()
    out.write_bytes(whole[:-1])                                  # only the final newline is missing
    result = run_cli(data, "--endpoints", endpoints, "--resume", "--limit", "4")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(whole) and "torn" not in result.stderr
    with open(out, "ab") as f:
        f.write(b"# checked by hand on Monday")                 # a user's note, no newline
    result = run_cli(data, "--endpoints", endpoints, "--resume", "--limit", "2")
    assert result.returncode == 0, result.stderr
    assert b"# checked by hand on Monday\n{" in out.read_bytes()
    assert "torn" not in result.stderr and "line 9" in result.stderr
    with open(out, "ab") as f:
        f.write(b'{"id": "fn-10", "score": 7, "rea')            # a record cut by a crash
    result = run_cli(data, "--endpoints", endpoints, "--resume")
    assert result.returncode == 0, result.stderr
    assert "torn final line" in result.stderr and b'"rea{' not in out.read_bytes()
    lines = out.read_bytes().splitlines()
    ids = [json.loads(line)["id"] for line in lines if line.startswith(b"{")]
    assert sorted(ids) == sorted(r["id"] for r in rows(12))     # each row once


def test_resume_by_row_position_without_a_sidecar_needs_force(tmp_path, serve):
    server = serve()
    texts = [function_source(i) for i in range(10)]
    data = write_jsonl(tmp_path / "fns.jsonl", [{"code": t} for t in texts])
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    sidecar = tmp_path / "fns.scores.jsonl.meta.json"
    assert run_cli(data, "--endpoints", endpoints, "--limit", "4").returncode == 0
    write_jsonl(data, [{"code": t} for t in texts[2:]])         # the input changed: rows moved
    for damage in ("deleted", "unreadable"):
        if damage == "deleted":
            sidecar.unlink()
        else:
            sidecar.write_text("{not json")
        before = snapshot(tmp_path)
        line = one_line_error(run_cli(data, "--endpoints", endpoints, "--resume"))
        assert "sidecar" in line and "position" in line and "--force" in line
        assert snapshot(tmp_path) == before
    forced = run_cli(data, "--endpoints", endpoints, "--resume", "--force")
    assert forced.returncode == 0, forced.stderr
    assert len(read_records(out)) == 8


# ── --overwrite empties nothing until a row is scored

def test_overwrite_that_scores_nothing_leaves_the_old_checkpoint_even_after_bad_first_rows(tmp_path, serve):
    good = serve()
    records = rows(8)
    data = write_jsonl(tmp_path / "fns.jsonl", records)
    endpoints = write_endpoints(tmp_path / "e.txt", [good])
    assert run_cli(data, "--endpoints", endpoints).returncode == 0
    for record in records[:3]:
        record["code"] = "   "                                   # permanently bad: recorded without a request
    write_jsonl(data, records)
    failing = serve(fail_500=1.0)
    before = snapshot(tmp_path)
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "f.txt", [failing]), "--overwrite",
                     "--max-downtime", "2", "--no-progress")
    after = snapshot(tmp_path)
    after.pop("f.txt")
    assert result.returncode == 1 and "Nothing new was written" in result.stderr, result.stderr
    assert after == {k: v for k, v in before.items() if k != "f.txt"}
    all_bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "a", "code": ""}, {"id": "b", "code": " "}])
    out = tmp_path / "bad.scores.jsonl"
    out.write_text(json.dumps({"id": "old", "score": 5, "hash": None, "error_kind": None}) + "\n")
    ended = run_cli(all_bad, "--endpoints", endpoints, "--overwrite")
    assert ended.returncode == 1, ended.stderr                  # a normal end writes what it found
    assert [(r["id"], r["error_kind"]) for r in read_records(out)] == [("a", "empty"), ("b", "empty")]


# ── outputs are never something else's file

def special_targets(tmp_path: Path) -> list[Path]:
    """A fifo, a link to it and (as root) a character device like /dev/null, all made in tmp_path."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "pipe-link"
    link.symlink_to(fifo)
    made = [fifo, link]
    if os.geteuid() == 0:
        device = tmp_path / "null-device"
        os.mknod(device, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        made.append(device)
    return made


@pytest.mark.parametrize("flag", ["--export", "--report-html"])
def test_export_and_report_refuse_targets_they_did_not_write_before_scoring(tmp_path, serve, flag):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Rate this code from 1 to 10.\n{code}\n")
    dataset = write_jsonl(tmp_path / "other-dataset.jsonl", rows(3))
    page = tmp_path / "page.html"
    page.write_text("<!doctype html><html><head><title>My notes</title></head></html>\n")
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("id,score\n")
    targets = special_targets(tmp_path) + [dataset, page, not_parquet, endpoints, prompt,
                                           tmp_path / "fns.scores.jsonl.meta.json"]
    (tmp_path / "fns.scores.jsonl.meta.json").write_text("{}")
    before = snapshot(tmp_path)
    for target in targets:
        result = run_cli(data, "--endpoints", endpoints, "--prompt-file", prompt, flag, target)
        one_line_error(result)
        assert snapshot(tmp_path) == before, target
    assert server.chat_bodies() == []


@pytest.mark.parametrize("flag, name", [("--export", "fns.parquet"), ("--report-html", "report.html")])
def test_export_and_report_replace_their_own_earlier_file(tmp_path, serve, flag, name):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    target = tmp_path / name
    assert run_cli(data, "--endpoints", endpoints, "--limit", "2", flag, target).returncode == 0
    first = target.read_bytes()
    result = run_cli(data, "--endpoints", endpoints, "--resume", flag, target)
    assert result.returncode == 0, result.stderr
    assert target.read_bytes() != first
    if flag == "--export":
        assert pq.read_table(target).column("score").null_count == 0


def test_output_that_is_not_a_regular_file_or_has_no_name_is_one_line(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    targets = special_targets(tmp_path)
    before = snapshot(tmp_path)
    for target in [*targets, ""]:
        for flags in ([], ["--resume"], ["--overwrite"], ["--report"]):
            one_line_error(run_cli(data, "--endpoints", endpoints, "-o", target, *flags))
            assert snapshot(tmp_path) == before, (target, flags)
    assert server.chat_bodies() == []


def test_output_to_dev_stdout_redirected_to_a_file_is_refused(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    sidecar = Path("/dev/stdout.meta.json")
    assert not sidecar.exists()
    try:
        with open(tmp_path / "stdout.txt", "w") as stdout:
            result = subprocess.run([sys.executable, SCORE, data, "--endpoints", endpoints, "-o", "/dev/stdout"],
                                    stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)
        one_line_error(result)
        assert not sidecar.exists() and (tmp_path / "stdout.txt").read_text() == ""
    finally:
        sidecar.unlink(missing_ok=True)
    assert server.chat_bodies() == []


def test_check_reads_an_existing_output_without_resume_and_changes_nothing(tmp_path, serve):
    server = serve()
    data = write_parquet(tmp_path / "fns.parquet", rows(6))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert run_cli(data, "--endpoints", endpoints, "--limit", "3").returncode == 0
    before = snapshot(tmp_path)
    check = run_cli(data, "--endpoints", endpoints, "--check")
    assert check.returncode == 0, check.stderr
    assert snapshot(tmp_path) == before
