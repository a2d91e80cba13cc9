"""What a user reads at the end: the resume command, the summary, --help."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys

import score
from conftest import SCORE, lines_in, read_records, rows, wait_for, write_endpoints, write_jsonl


def test_resume_command_is_quoted_and_runs_from_the_same_folder(tmp_path, serve):
    server = serve(latency=0.3, slots=2)
    data_dir = tmp_path / "my data"
    work = tmp_path / "work dir"
    data_dir.mkdir()
    work.mkdir()
    write_jsonl(data_dir / "x.jsonl", rows(40))
    write_endpoints(work / "e.txt", [server])
    out = data_dir / "x.scores.jsonl"
    argv = [sys.executable, SCORE, "../my data/x.jsonl", "--endpoints", "e.txt", "--no-progress", "--overwrite"]
    proc = subprocess.Popen(argv, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: lines_in(out) >= 3, what="first records")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    lines = err.splitlines()
    hint = lines[lines.index(next(l for l in lines if l.endswith("continue with:"))) + 1].strip()
    words = shlex.split(hint)
    assert words[1:] == [SCORE, "../my data/x.jsonl", "--endpoints", "e.txt", "--no-progress", "--resume"]
    words[0] = sys.executable if words[0] in ("python", "python3") else words[0]
    again = subprocess.run(words, cwd=work, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert {r["id"] for r in read_records(out) if r["score"] is not None} == {r["id"] for r in rows(40)}


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
