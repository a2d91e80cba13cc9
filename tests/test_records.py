"""The record rules: each id's final record, read alike by resume, the report and the export."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

import score
from conftest import damage_row_group, run_cli, write_jsonl, write_parquet

BIG = 2 ** 70


def record(ident, score_=None, kind=None, error=None) -> dict:
    """A checkpoint record as score.py writes it (every key, in order)."""
    out = dict.fromkeys(score.RECORD_KEYS)
    out.update(id=ident, score=score_, error_kind=kind, error=error or (kind and f"{kind} happened"),
               attempts=1, truncated=False, ts=1_700_000_000.0, endpoint=None if kind else "gpu")
    return out


def write_checkpoint(path: Path, records: list[dict], foreign: list[dict] = ()) -> Path:
    """Write records as score.py does; `foreign` ones with their keys reordered, as another tool might."""
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    lines += [json.dumps(dict(reversed(list(r.items())))) for r in foreign]
    path.write_text("\n".join(lines) + "\n")
    return path


def resumed(path: Path) -> score.ResumeState:
    checkpoint, state = score.Checkpoint.open(path, resume=True, overwrite=False, check=True)
    checkpoint.close()
    return state


def agree(path: Path, finals: dict[int, tuple[int | None, str | None]], retried: int) -> None:
    """Check resume, report and export reduce the checkpoint at path to `finals` (key -> score, error kind)."""
    state = resumed(path)
    for key, (value, kind) in finals.items():
        assert (key in state.scored) is (value is not None), key
        assert (key in state.permanent) is (kind in score.PERMANENT_ERRORS), key
    assert len(state.scored) == sum(v is not None for v, _ in finals.values())
    assert len(state.permanent) == sum(k in score.PERMANENT_ERRORS for _, k in finals.values())
    assert state.retried == retried

    stats = score.read_stats(path)
    errors = Counter(kind for value, kind in finals.values() if value is None)
    assert Counter({k: n for k, n in stats.errors.items() if k != "duplicate_id"}) == errors
    histogram = Counter(value for value, _ in finals.values() if value is not None)
    assert stats.rows_scored == len(state.scored) and stats.histogram == histogram
    assert sum(stats.per_endpoint.values(), Counter()) == histogram              # none copied a verdict

    table = score.final_answers(path).to_pylist()
    assert len(table) == len(finals)                            # one row per id key
    got = {row["key"]: (row["score"], row["error"]) for row in table}
    for key, (value, kind) in finals.items():
        assert got[key][0] == value, key
        assert (got[key][1] is not None) is (kind is not None), key
        if kind is not None:
            assert got[key][1] == f"{kind} happened"


def test_resume_report_and_export_agree_on_each_ids_final_record(tmp_path):
    path = write_checkpoint(tmp_path / "out.jsonl", [
        record(1, kind="attempts_exhausted"), record("1", 7), record(1, 5),          # success after an error
        record("1", kind="timeout"),                                                  # error after a success
        record(BIG, 3),
        record("line:4", kind="no_id"), record("line:4", 9),                          # a null id's label, a real id
        record("a", kind="empty"), record("a", kind="attempts_exhausted"),            # the last error counts
        record("b", kind="attempts_exhausted"), record("b", kind="template"),
        record(1, kind="duplicate_id", error="line 9: id 1 appeared earlier"),       # a later row's note
        record("c", kind="duplicate_id", error="line 8: id 'c' appeared earlier"),
    ], foreign=[record("d", 4), record("e", kind="bad_id")])                         # read by the slow path
    finals = {score.id_key(1): (5, None), score.id_key("1"): (7, None), score.id_key(BIG): (3, None),
              score.label_key("line:4"): (None, "no_id"), score.id_key("line:4"): (9, None),
              score.id_key("a"): (None, "attempts_exhausted"), score.id_key("b"): (None, "template"),
              score.id_key("d"): (4, None), score.label_key("e"): (None, "bad_id")}
    assert len(set(finals)) == 9                    # 1 and "1", a label and the same text as an id, stay apart
    agree(path, finals, retried=1)
    assert score.read_stats(path).errors["duplicate_id"] == 2


def test_the_report_counts_only_the_final_of_two_scored_records_for_one_id(tmp_path):
    first = {**record("x", 3), "endpoint": "slow", "score_expected": 3.4, "output_tokens": 9, "ts": 1_700_000_001.0}
    second = {**record("x", 8), "endpoint": "fast", "score_expected": 7.6, "output_tokens": 5, "ts": 1_700_000_002.0}
    path = write_checkpoint(tmp_path / "out.jsonl", [first, record("y", 5), second, record("y", kind="timeout")])
    agree(path, {score.id_key("x"): (8, None), score.id_key("y"): (5, None)}, retried=0)
    stats = score.read_stats(path)
    assert stats.per_endpoint == {"fast": Counter({8: 1}), "gpu": Counter({5: 1})}
    assert (stats.expected_rows, stats.tokens, sorted(stats.expected)) == (1, 5, ["fast"])
    assert stats.expected_histogram == Counter({8: 1}) and list(stats.timeline["fast"]) == [1_700_000_002.0]


def test_a_checkpoint_of_only_notes_and_errors_has_no_scored_id(tmp_path):
    path = write_checkpoint(tmp_path / "out.jsonl", [
        record(7, kind="duplicate_id", error="line 3: id 7 appeared earlier"), record(8, kind="attempts_exhausted"),
        record(8, kind="empty")])
    agree(path, {score.id_key(8): (None, "empty")}, retried=0)
    assert score.id_key(7) not in resumed(path).scored


def test_a_hand_edited_detail_does_not_make_resume_and_export_disagree(tmp_path):
    odd = {**record("x", 6), "ts": -1, "prompt_tokens": -1, "latency_s": "slow", "score_expected": 11.0,
           "truncated": "no", "endpoint": 7}
    path = write_checkpoint(tmp_path / "out.jsonl", [odd, record("y", 3)])
    assert score.scan_record(path.read_bytes().splitlines()[0]) is not None     # the fast scanner counts it
    agree(path, {score.id_key("x"): (6, None), score.id_key("y"): (3, None)}, retried=0)
    stats = score.read_stats(path)
    assert stats.rows_scored == 2 and "7" not in stats.per_endpoint      # counted, its odd details left out
    assert score.text_report(stats)                                      # and the report still renders


def test_export_joins_each_jsonl_row_to_its_ids_final_record(tmp_path):
    code = "def f(x):\n    return x\n"
    data = write_jsonl(tmp_path / "fns.jsonl", [
        {"id": 1, "code": code}, {"id": "1", "code": code}, {"id": BIG, "code": code},
        {"id": None, "code": code}, {"id": "line:4", "code": code}, {"id": "a", "code": code},
        {"id": "c", "code": code}, {"id": 1, "code": code}])
    write_checkpoint(tmp_path / "fns.scores.jsonl", [
        record(1, kind="attempts_exhausted"), record(1, 5), record("1", 7), record("1", kind="timeout"),
        record(BIG, 3), record("line:4", kind="no_id"), record("line:4", 9), record("a", 2),
        record("a", kind="attempts_exhausted"), record(1, kind="duplicate_id", error="line 8: id 1 appeared earlier")])
    out = tmp_path / "fns.parquet"
    done = run_cli(data, "--report", "--export", out)
    assert done.returncode == 0, done.stderr
    rows = pq.read_table(out).to_pylist()
    assert [r["score"] for r in rows] == [5, 7, 3, None, 9, 2, None, None]
    assert rows[3]["error"] == "no_id happened"            # the null id's row, keyed by its label line:4
    assert rows[6]["error"] is None                         # "c" has no record
    assert rows[7]["error"].startswith("duplicate_id")      # the repeated id 1: its verdict is the first row's


def test_export_keys_a_null_parquet_id_by_its_row_label(tmp_path):
    code = "def f(x):\n    return x\n"
    data = write_parquet(tmp_path / "fns.parquet", [
        {"id": "x", "code": code}, {"id": "row:2", "code": code}, {"id": None, "code": code}], row_group_size=2)
    write_checkpoint(tmp_path / "fns.scores.jsonl", [
        record("x", 6), record("row:2", 8), record("row:2", kind="no_id")])
    agree(tmp_path / "fns.scores.jsonl", {score.id_key("x"): (6, None), score.id_key("row:2"): (8, None),
                                          score.label_key("row:2"): (None, "no_id")}, retried=0)
    out = tmp_path / "out.parquet"
    done = run_cli(data, "--report", "--export", out)
    assert done.returncode == 0, done.stderr
    assert [(r["score"], r["error"]) for r in pq.read_table(out).to_pylist()] == \
        [(6, None), (8, None), (None, "no_id happened")]


def test_the_reader_hands_its_skips_over_with_each_chunk(tmp_path):
    code = "def f(x):\n    return x\n"
    data = write_jsonl(tmp_path / "fns.jsonl", [{"id": f"r{i}", "code": code} for i in range(6)])
    path = write_checkpoint(tmp_path / "fns.scores.jsonl", [
        record("r0", 4), record("r1", kind="empty"), record("r2", kind="attempts_exhausted")])
    state = resumed(path)
    info = score.inspect_input(data, None, None, score.DEFAULT_PROMPT)
    reader = score.read_items(info, finished=score.FinishedRows(state.scored, state.permanent, state.repeated))
    chunk = score.take_chunk(reader, 2)
    assert [item.id for item in chunk] == ["r2", "r3"]
    assert (chunk.skipped, chunk.skipped_permanent) == (2, 1)
    tally = score.Tally()
    chunk.count_skips(tally)
    rest = score.take_chunk(reader, 10)
    assert [item.id for item in rest] == ["r4", "r5"] and (rest.skipped, rest.skipped_permanent) == (0, 0)
    rest.count_skips(tally)
    assert (tally.skipped, tally.skipped_permanent) == (2, 1)


def test_export_of_a_damaged_parquet_row_group_keeps_the_rows_it_can_read(tmp_path):
    code = "def f(x):\n    return x\n"
    data = write_parquet(tmp_path / "fns.parquet", [{"id": f"r{i}", "code": code * (i + 1)} for i in range(30)],
                         row_group_size=10)
    damage_row_group(data, 1, 1)                                       # the middle group's code column
    write_checkpoint(tmp_path / "fns.scores.jsonl", [record(f"r{i}", 1 + i % 10) for i in range(30)])
    out = tmp_path / "out.parquet"
    done = run_cli(data, "--report", "--export", out)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert f"{data}: cannot read rows 10-19" in done.stderr
    rows = pq.read_table(out).to_pylist()
    assert [(r["id"], r["score"]) for r in rows] == [(f"r{i}", 1 + i % 10) for i in [*range(10), *range(20, 30)]]
