"""Neither the dataset nor a checkpoint is lost by a flag, a failed start, a changed input or a lost terminal."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import score

from conftest import (SCORE, expected_score, function_source, interrupt_after, lines_in, read_records, rows, run_cli,
                      scored, start_cli, wait_for, write_endpoints, write_jsonl, write_parquet)


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under root with its content (or its link target): what 'left as it was' means."""
    out: dict[str, bytes | str] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            out[name] = "-> " + os.readlink(path)
        elif path.is_dir():
            out[name] = "dir"
        else:
            out[name] = path.read_bytes()
    return out


def dead_endpoints(path: Path) -> Path:
    """An endpoints file naming a loopback port that refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return write_endpoints(path, [f"http://127.0.0.1:{port}"])


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """Assert exit 2 with a single error line and no traceback; return the line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("score.py: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def assert_scores_match_lines(records: list[dict], texts: list[str]) -> None:
    """Without an id column, id N is line/row N: each score must be the verdict on that row's text."""
    ok = scored(records)
    assert sorted(ok) == list(range(len(texts)))
    assert all(ok[i]["score"] == expected_score(texts[i]) for i in ok)


# ── the input is never an output

def input_layout(tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """Make an input and an -o that is (or lies inside) it; return (input, output)."""
    if layout.startswith("dir"):
        folder = tmp_path / "data"
        folder.mkdir()
        write_parquet(folder / "part-0.parquet", rows(30))
        return folder, folder / ("part-0.parquet" if layout == "dir-file" else "scores.jsonl")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(30))
    if layout == "same":
        return data, data
    link = tmp_path / "link.jsonl"
    if layout == "symlink":
        link.symlink_to(data)
    else:
        os.link(data, link)
    return data, link


@pytest.mark.parametrize("layout", ["same", "symlink", "hardlink", "dir-file", "dir-inside"])
@pytest.mark.parametrize("flag", [None, "--resume", "--overwrite"])
def test_output_that_is_the_input_is_refused_whatever_the_flags(tmp_path, layout, flag):
    data, output = input_layout(tmp_path, layout)
    endpoints = dead_endpoints(tmp_path / "e.txt")
    before = snapshot(tmp_path)
    result = run_cli(data, "--endpoints", endpoints, "-o", output, "--startup-timeout", "1", *([flag] if flag else []))
    assert "the input" in one_line_error(result)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flag", ["--report-html", "--export"])
def test_report_or_export_onto_the_checkpoint_or_input_is_refused(tmp_path, serve, flag):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert run_cli(data, "--endpoints", endpoints).returncode == 0
    before = snapshot(tmp_path)
    for target in (tmp_path / "fns.scores.jsonl", data):
        result = run_cli(data, "--endpoints", endpoints, "--resume", flag, target)
        one_line_error(result)
        assert snapshot(tmp_path) == before


# ── nothing changes until the first new record

def test_overwrite_keeps_the_old_checkpoint_until_the_first_new_record(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(20))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert run_cli(data, "--endpoints", endpoints).returncode == 0
    nobody = dead_endpoints(tmp_path / "dead.txt")
    before = snapshot(tmp_path)
    one_line_error(run_cli(data, "--endpoints", nobody, "--overwrite", "--startup-timeout", "1"))
    assert snapshot(tmp_path) == before
    one_line_error(run_cli(data, "--endpoints", endpoints, "--overwrite", "--model", "qwen2.5-cdoer:7b"))
    assert snapshot(tmp_path) == before
    check = run_cli(data, "--endpoints", endpoints, "--overwrite", "--check")
    assert check.returncode == 0, check.stderr
    assert snapshot(tmp_path) == before
    asked = len(server.chat_bodies())
    again = run_cli(data, "--endpoints", endpoints, "--overwrite", "--seed", "7")
    assert again.returncode == 0, again.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert len(records) == 20 and len(scored(records)) == 20
    assert all(r["seed"] == 7 for r in records) and len(server.chat_bodies()) == asked + 20


def test_a_run_that_stops_at_the_start_creates_no_files(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    nobody = dead_endpoints(tmp_path / "dead.txt")
    before = snapshot(tmp_path)
    for flags in ([], ["--resume"], ["--overwrite"]):
        one_line_error(run_cli(data, "--endpoints", nobody, "--startup-timeout", "1", *flags))
        assert snapshot(tmp_path) == before
    check = run_cli(data, "--endpoints", endpoints, "--check")
    assert check.returncode == 0, check.stderr
    assert snapshot(tmp_path) == before


def test_a_second_writer_is_refused_from_the_start_of_the_first(tmp_path, serve):
    server = serve(latency=0.01, slots=1, hold_after=0)      # the first run sits in warm-up until released
    data = write_jsonl(tmp_path / "fns.jsonl", rows(30))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    first = start_cli(data, "--endpoints", endpoints, "--no-progress")
    try:
        wait_for(lambda: out.exists() and server.held, what="the first run to take the output and load the model")
        for flags in ([], ["--resume"], ["--overwrite"]):
            assert "another score.py" in one_line_error(run_cli(data, "--endpoints", endpoints, *flags))
        server.release(hold_after=1)                              # one record, then it waits again
        wait_for(lambda: lines_in(out) >= 1 and server.held, what="first record")
        assert "another score.py" in one_line_error(run_cli(data, "--endpoints", endpoints, "--resume"))
        spare = write_endpoints(tmp_path / "spare.txt", [serve()])             # the held one would hold --check too
        check = run_cli(data, "--endpoints", spare, "--resume", "--check")     # only reads: no lock needed
        assert check.returncode == 0, check.stderr
    finally:
        server.release()
        _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert Counter(r["id"] for r in read_records(out)) == Counter(r["id"] for r in rows(30))


# ── the input's identity

def test_changed_jsonl_without_ids_is_refused_unless_forced(tmp_path, serve):
    server = serve()
    texts = [function_source(i) for i in range(12)]
    data = write_jsonl(tmp_path / "fns.jsonl", [{"code": t} for t in texts])
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    assert run_cli(data, "--endpoints", endpoints, "--limit", "5").returncode == 0
    write_jsonl(data, [{"code": t} for t in texts[2:]])                  # two rows removed
    before = snapshot(tmp_path)
    refused = run_cli(data, "--endpoints", endpoints, "--resume")
    one_line_error(refused)
    assert re.search(r"fns\.jsonl: [\d,]+ bytes, now [\d,]+", refused.stderr) and "--force" in refused.stderr
    assert snapshot(tmp_path) == before
    forced = run_cli(data, "--endpoints", endpoints, "--resume", "--force")
    assert forced.returncode == 0 and "WARNING" in forced.stderr
    assert len(scored(read_records(out))) == 10


def test_rows_appended_to_jsonl_without_ids_resume_normally(tmp_path, serve):
    server = serve()
    texts = [function_source(i) for i in range(15)]
    data = write_jsonl(tmp_path / "fns.jsonl", [{"code": t} for t in texts[:10]])
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert run_cli(data, "--endpoints", endpoints, "--limit", "4").returncode == 0
    write_jsonl(data, [{"code": t} for t in texts])                     # five rows added at the end
    result = run_cli(data, "--endpoints", endpoints, "--resume")
    assert result.returncode == 0, result.stderr
    assert_scores_match_lines(read_records(tmp_path / "fns.scores.jsonl"), texts)


def test_parquet_directory_without_ids_refuses_a_file_read_first_but_takes_one_read_last(tmp_path, serve):
    server = serve()
    texts = [function_source(i) for i in range(40)]
    folder = tmp_path / "data"
    folder.mkdir()
    write_parquet(folder / "part-1.parquet", [{"code": t} for t in texts[10:20]])
    write_parquet(folder / "part-2.parquet", [{"code": t} for t in texts[20:30]])
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "data.scores.jsonl"
    assert run_cli(folder, "--endpoints", endpoints, "--limit", "5").returncode == 0
    write_parquet(folder / "part-0.parquet", [{"code": t} for t in texts[:10]])
    before = snapshot(tmp_path)
    refused = run_cli(folder, "--endpoints", endpoints, "--resume")
    one_line_error(refused)
    assert "part-0.parquet: new" in refused.stderr
    assert snapshot(tmp_path) == before
    (folder / "part-0.parquet").unlink()
    write_parquet(folder / "part-3.parquet", [{"code": t} for t in texts[30:]])
    result = run_cli(folder, "--endpoints", endpoints, "--resume")
    assert result.returncode == 0, result.stderr
    assert_scores_match_lines(read_records(out), texts[10:])


def test_changed_input_with_ids_resumes_normally(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(12))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert run_cli(data, "--endpoints", endpoints, "--limit", "5").returncode == 0
    write_jsonl(data, rows(10, start=2))                                 # two rows gone: ids still pair them
    result = run_cli(data, "--endpoints", endpoints, "--resume")
    assert result.returncode == 0, result.stderr
    ok = scored(read_records(tmp_path / "fns.scores.jsonl"))
    assert {f"fn-{i}" for i in range(2, 12)} <= set(ok)
    assert all(r["score"] == expected_score(function_source(int(i[3:]))) for i, r in ok.items())


# ── output streams and signals

def test_stderr_closed_mid_run_does_not_stop_the_work(tmp_path, serve):
    server = serve(latency=0.01)
    server.go_down()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(60))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    proc = subprocess.Popen([sys.executable, SCORE, str(data), "--endpoints", str(endpoints)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr.readline()          # nothing answers yet: the first message
    proc.stderr.close()                    # like `| head -1`: every later message meets a closed pipe
    server.come_back()
    assert proc.wait(timeout=120) == 0
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert sorted(scored(records)) == sorted(r["id"] for r in rows(60)) and len(records) == 60


def test_closed_stderr_from_the_start_does_not_stop_the_work(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(30))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = subprocess.run(["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, SCORE, str(data),
                             "--endpoints", str(endpoints)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
    records = read_records(tmp_path / "fns.scores.jsonl")      # every line a record: no stray messages in it
    assert sorted(scored(records)) == sorted(r["id"] for r in rows(30)) and len(records) == 30


def test_sighup_saves_prints_the_resume_command_and_exits_129(tmp_path, serve):
    server = serve(latency=0.01, slots=2, hold_after=3)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(12))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    stopped, records = interrupt_after(out, data, "--endpoints", endpoints, "--no-progress", sig=signal.SIGHUP,
                                       held=[server])
    assert stopped.returncode == 129, stopped.stderr
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert out.read_bytes().endswith(b"\n") and 3 <= len(records) < 12
    assert run_cli(data, "--endpoints", endpoints, "--resume").returncode == 0
    assert sorted(scored(read_records(out))) == sorted(r["id"] for r in rows(12))


def test_sighup_under_nohup_is_ignored(tmp_path, serve):
    server = serve(latency=0.01, slots=2, hold_after=3)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(12))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    nohup = ["sh", "-c", 'trap "" HUP; exec "$@"', "sh", sys.executable, SCORE, str(data), "--endpoints",
             str(endpoints), "--no-progress"]
    ended, records = interrupt_after(out, command=nohup, sig=signal.SIGHUP, held=[server], release_at_signal=True)
    assert ended.returncode == 0, ended.stderr
    assert len(scored(records)) == 12


# ── one line, exit 2, at the start

@pytest.mark.parametrize("port", ["70000", "0"])
def test_endpoint_port_out_of_range_is_one_line(tmp_path, port):
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text(f"127.0.0.1:{port}\n")
    assert f"e.txt:1" in one_line_error(run_cli(data, "--endpoints", endpoints))


def test_output_folder_that_cannot_take_the_sidecar_stops_at_the_start(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    (tmp_path / "fns.scores.jsonl.meta.json.tmp").mkdir()    # root can't write a file there either
    before = snapshot(tmp_path)
    assert "sidecar" in one_line_error(run_cli(data, "--endpoints", endpoints))
    assert snapshot(tmp_path) == before and server.chat_bodies() == []
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    one_line_error(run_cli(data, "--endpoints", endpoints, "-o", blocker / "out.jsonl"))
    for flags in (["--resume"], ["--resume", "--check"]):
        one_line_error(run_cli(data, "--endpoints", endpoints, "-o", tmp_path, *flags))


@pytest.mark.parametrize("flag, target", [("--report-html", "missing/report.html"), ("--report-html", "."),
                                          ("--export", "missing/x.parquet"), ("--export", ".")])
def test_bad_report_or_export_path_stops_before_any_row(tmp_path, serve, flag, target):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    before = snapshot(tmp_path)
    one_line_error(run_cli(data, "--endpoints", endpoints, flag, tmp_path / target))
    assert snapshot(tmp_path) == before and server.chat_bodies() == []


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and mount), unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_resuming_on_a_full_disk_is_one_line_and_changes_nothing(tmp_path, serve, small_disk):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(30))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = small_disk / "fns.scores.jsonl"
    assert run_cli(data, "--endpoints", endpoints, "-o", out, "--limit", "10").returncode == 0
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space left"):
        while True:
            os.write(fd, b"\0" * 4096)
    os.close(fd)
    before = snapshot(small_disk)
    line = one_line_error(run_cli(data, "--endpoints", endpoints, "-o", out, "--resume"))
    assert "No space left" in line and snapshot(small_disk) == before
    filler.unlink()
    result = run_cli(data, "--endpoints", endpoints, "-o", out, "--resume")
    assert result.returncode == 0, result.stderr
    assert sorted(scored(read_records(out))) == sorted(r["id"] for r in rows(30))


def test_overwrite_that_cannot_write_its_held_back_records_at_the_end_says_how_to_resume(tmp_path, serve, small_disk):
    server = serve()
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = small_disk / "fns.scores.jsonl"
    assert run_cli(write_jsonl(tmp_path / "one.jsonl", rows(1)), "--endpoints", endpoints, "-o", out).returncode == 0
    # Only empty texts: every record is an error, so --overwrite holds them all back until the run ends.
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"id": f"e-{i}", "code": ""} for i in range(200)])
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    with pytest.raises(OSError, match="No space left"):
        while True:
            os.write(fd, b"\0" * 4096)
    os.ftruncate(fd, os.fstat(fd).st_size - (16 << 10))     # room for the sidecar, not for 200 records
    os.close(fd)
    result = run_cli(empty, "--endpoints", endpoints, "-o", out, "--overwrite")
    assert result.returncode == 1, result.stderr
    assert "No space left" in result.stderr and "Nothing was sent" not in result.stderr
    assert "Scored 0 rows" in result.stderr and "Rows without a score: 200 empty" in result.stderr
    assert "--resume" in result.stderr.split("continue with:", 1)[1]
    filler.unlink()
    again = run_cli(empty, "--endpoints", endpoints, "-o", out, "--resume")
    assert again.returncode == 1, again.stderr
    finals = {r["id"]: r for r in read_records(out)}
    assert sorted(finals) == sorted(f"e-{i}" for i in range(200))
    assert {r["error_kind"] for r in finals.values()} == {"empty"}


# ── exit codes of runs that only report or export

def test_resume_export_with_nothing_left_exits_0_and_still_lists_permanent_errors(tmp_path, serve):
    server = serve()
    records = rows(6)
    records[2]["code"] = "   "
    data = write_jsonl(tmp_path / "fns.jsonl", records)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert run_cli(data, "--endpoints", endpoints).returncode == 1       # a row without a score
    server.go_down()
    target = tmp_path / "x.parquet"
    result = run_cli(data, "--endpoints", endpoints, "--resume", "--export", target)
    assert result.returncode == 0, result.stderr
    assert "1 empty" in result.stderr and target.exists()
    kinds = {r["id"]: r["error_kind"] for r in read_records(tmp_path / "fns.scores.jsonl")}
    assert kinds["fn-2"] == "empty" and list(kinds.values()).count(None) == 5


# ── what the sidecar says when a resume does not match

def test_resume_of_a_reason_none_run_says_which_option_to_add_and_never_advises_overwrite(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    assert run_cli(data, "--endpoints", endpoints, "--reason", "none", "--limit", "4").returncode == 0
    before = snapshot(tmp_path)
    refused = run_cli(data, "--endpoints", endpoints, "--resume", "--export", tmp_path / "best.parquet",
                      "--top", "20%")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "written with --reason none: add --reason none" in refused.stderr
    assert "sha256" not in refused.stderr and "--overwrite" not in refused.stderr and "--force" in refused.stderr
    assert snapshot(tmp_path) == before
    fixed = run_cli(data, "--endpoints", endpoints, "--resume", "--reason", "none", "--export",
                    tmp_path / "best.parquet", "--top", "20%")
    assert fixed.returncode == 0, fixed.stderr
    assert len(scored(read_records(out))) == 10


def test_a_sidecar_without_the_reason_mode_still_names_it_from_the_schema(tmp_path):
    config = score.parse_args([str(tmp_path / "x.jsonl"), "--reason", "short"])
    old = {"schema_sha256": score.schema_sha256("none"), "model": config.model}
    assert score.written_reason(old) == "none"
    assert score.written_reason({"schema_sha256": "0" * 64}) is None
    assert score.prompt_difference(config, {"prompt_sha256": score.sha256_of(score.prompt_for(
        score.DEFAULT_PROMPT, "none"))}, "none") is None


@pytest.mark.parametrize("ids", [True, False])
def test_a_moved_input_resumes_with_a_note_when_ids_or_content_pair_the_scores(tmp_path, serve, ids):
    server = serve()
    records = rows(10) if ids else [{"code": r["code"]} for r in rows(10)]
    (tmp_path / "old").mkdir()
    data = write_jsonl(tmp_path / "old" / "fns.jsonl", records)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    assert run_cli(data, "--endpoints", endpoints, "-o", out, "--limit", "4").returncode == 0
    moved = tmp_path / "new" / "fns.jsonl"
    moved.parent.mkdir()
    data.rename(moved)
    result = run_cli(moved, "--endpoints", endpoints, "-o", out, "--resume")
    assert result.returncode == 0, result.stderr
    assert "note: the input was" in result.stderr and "different setup" not in result.stderr
    assert len(scored(read_records(out))) == 10


def test_a_moved_and_changed_input_without_ids_is_still_refused(tmp_path, serve):
    server = serve()
    for folder in ("old", "new"):
        (tmp_path / folder).mkdir()
    data = write_jsonl(tmp_path / "old" / "fns.jsonl", [{"code": r["code"]} for r in rows(10)])
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    assert run_cli(data, "--endpoints", endpoints, "-o", out, "--limit", "4").returncode == 0
    moved = write_jsonl(tmp_path / "new" / "fns.jsonl", [{"code": r["code"]} for r in rows(10)[2:]])
    refused = run_cli(moved, "--endpoints", endpoints, "-o", out, "--resume")
    assert refused.returncode == 2 and "input: was" in refused.stderr and "--overwrite" not in refused.stderr


def test_resume_without_the_sidecar_warns_that_the_setup_cannot_be_checked(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    assert run_cli(data, "--endpoints", endpoints, "--limit", "4").returncode == 0
    score.meta_path(out).unlink()
    result = run_cli(data, "--endpoints", endpoints, "--resume")
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "cannot be checked" in result.stderr
    assert len(scored(read_records(out))) == 10
