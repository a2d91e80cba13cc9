"""Fixtures: fake servers on loopback (port 0), datasets in tmp_path, and ways to run score.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_ollama import Behaviour, FakeFleet, FakeOllama, expected_score  # noqa: E402

SCORE = str(ROOT / "score.py")


def function_source(i: int) -> str:
    """A distinct, realistic-looking function for row i."""
    return (f"def compute_{i}(values):\n"
            f"    \"\"\"Return the sum of values scaled by {i}.\"\"\"\n"
            f"    total = 0\n"
            f"    for v in values:\n"
            f"        total += v * {i}\n"
            f"    return total\n")


def rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": f"fn-{i}", "code": function_source(i), "repo": f"repo{i % 3}"} for i in range(start, start + n)]


def write_jsonl(path: Path, records: list, raw_lines: dict[int, str] | None = None) -> Path:
    """Write records one per line; raw_lines inserts literal lines at given 0-based positions."""
    lines = [json.dumps(r) for r in records]
    for index, text in sorted((raw_lines or {}).items()):
        lines.insert(index, text)
    path.write_text("\n".join(lines) + "\n")
    return path


def write_parquet(path: Path, records: list[dict], row_group_size: int = 1000) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


def damage_row_group(path: Path, group: int, column: int) -> Path:
    """Flip bytes inside one row group's column chunk of a Parquet file so its pages no longer decode."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(column)
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    raw = bytearray(path.read_bytes())
    for i in range(start + 30, start + chunk.total_compressed_size - 5):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    return path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def scored(records: list[dict]) -> dict:
    """Map id -> last successful record."""
    out = {}
    for r in records:
        if r["score"] is not None:
            out[r["id"]] = r
    return out


def write_endpoints(path: Path, servers: list, extra: list[str] | None = None, options: str = "") -> Path:
    lines = ["# test fleet"]
    for i, s in enumerate(servers):
        url = s if isinstance(s, str) else s.url
        lines.append(f"{url} name=e{i} {options}".rstrip())
    lines += extra or []
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def serve():
    """Start fake servers: serve(latency=0.01, slots=2, ...) -> FakeOllama. All stop at teardown."""
    started = []

    def start(**behaviour) -> FakeOllama:
        server = FakeOllama(Behaviour(**behaviour)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fleet():
    """Start many fake servers on one thread: fleet(n, latency=1.0, slots=1) -> [FakeOllama]."""
    fleets = []

    def start(n: int, **behaviour) -> list[FakeOllama]:
        shared = FakeFleet()
        fleets.append(shared)
        return [shared.add(Behaviour(**behaviour)) for _ in range(n)]

    yield start
    for shared in fleets:
        shared.stop()


def wait_for(predicate, timeout: float = 60.0, what: str = "condition") -> None:
    """Poll a condition that another process or thread will make true (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def lines_in(path: Path) -> int:
    """Count complete lines in a checkpoint that another process is writing."""
    return path.read_bytes().count(b"\n") if path.exists() else 0


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 120, env: dict | None = None):
    """Run score.py as a user would; return the CompletedProcess."""
    return subprocess.run([sys.executable, SCORE, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def start_cli(*args: str, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, SCORE, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)


def interrupt_after(out: Path, *args, records: int = 3, sig: int = signal.SIGTERM, held: tuple = (),
                    release_at_signal: bool = False, command: list[str] | None = None, cwd: Path | None = None
                    ) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """Run score.py, send it `sig` once `out` holds `records` lines; return the ended run and out's whole records.

    `held` are servers started with hold_after: the signal waits until each holds a request in flight,
    so it surely lands mid-run; they are released once the process has ended (or, with
    release_at_signal, right after the signal, for a signal the run should survive).
    """
    proc = subprocess.Popen(command or [sys.executable, SCORE, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd)
    released = False
    try:
        wait_for(lambda: lines_in(out) >= records or proc.poll() is not None, what=f"{records} records")
        wait_for(lambda: all(s.held for s in held) or proc.poll() is not None, what="a request held in flight")
        assert proc.poll() is None, f"score.py ended before the signal: {proc.communicate()[1]}"
        proc.send_signal(sig)
        if release_at_signal:
            released = True
            for server in held:
                server.release()
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if not released:
            for server in held:
                server.release()
    complete = out.read_bytes().split(b"\n")[:-1] if out.exists() else []      # a kill may leave a torn line
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), [json.loads(l) for l in complete]


__all__ = ["expected_score", "function_source", "rows", "write_jsonl", "write_parquet", "damage_row_group",
           "read_records", "scored",
           "write_endpoints", "run_cli", "start_cli", "wait_for", "lines_in", "interrupt_after", "SCORE"]


def pytest_collection_modifyitems(config, items):
    """Run the real-server suite last, so the fast suite reports first."""
    items.sort(key=lambda item: item.get_closest_marker("real") is not None)
