"""Rows and ids: bad rows, input that ends early, repeated ids, foreign checkpoint lines, one id rule."""

from __future__ import annotations

import gzip
import json
import zlib
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import score
from conftest import (damage_row_group, expected_score, function_source, read_records, rows, run_cli, scored,
                      write_endpoints, write_jsonl, write_parquet)


def exported(path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def strict_records(path) -> list[dict]:
    """Every line must be valid UTF-8 JSON (a lone surrogate would fail here)."""
    return [json.loads(line.decode("utf-8")) for line in path.read_bytes().splitlines()]


def test_lone_surrogate_in_text_or_id_is_an_error_record_and_the_run_goes_on(tmp_path, serve):
    server = serve()
    good = rows(8)
    raw = {2: '{"id": "fn-bad-text", "code": "def f():\\n    return \\"\\ud800\\""}',
           5: '{"id": "fn-\\udc80", "code": "def g():\\n    return 1"}'}
    data = write_jsonl(tmp_path / "fns.jsonl", good, raw_lines=raw)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    out = tmp_path / "fns.scores.jsonl"
    records = strict_records(out)
    errors = {r["id"]: r for r in records if r["score"] is None}
    assert errors["fn-bad-text"]["error_kind"] == "bad_text" and "line 3" in errors["fn-bad-text"]["error"]
    assert errors["line:6"]["error_kind"] == "bad_id" and "line 6" in errors["line:6"]["error"]
    assert set(errors) == {"fn-bad-text", "line:6"}
    assert set(scored(records)) == {r["id"] for r in good} and server.answered == 8
    assert "1 bad_text" in result.stderr and "1 bad_id" in result.stderr
    assert "fns.jsonl: line 3: the text is not valid Unicode" in result.stderr    # named as it happens
    # both are permanent: resume neither crashes nor writes them again
    again = run_cli(data, "--endpoints", endpoints, "--resume", "--no-progress")
    assert again.returncode == 0 and "Traceback" not in again.stderr   # nothing left to score
    assert "1 bad_text" in again.stderr                                   # but still listed
    assert len(strict_records(out)) == len(records)
    export = tmp_path / "x.parquet"
    assert run_cli(data, "--report", "--export", export).returncode == 0
    got = exported(export)
    assert [r["score"] is not None for r in got] == [i not in (2, 5) for i in range(10)]
    assert got[2]["code"] == 'def f():\n    return "?"' and got[2]["error"].startswith("line 3:")


def test_parquet_strings_that_are_not_utf8_are_error_records(tmp_path, serve):
    server = serve()
    ids = [b"fn-0", b"fn-1", b"fn-\xff", b"fn-3"]
    codes = [function_source(0).encode(), b"def f():\n    return '\xfe'\n", function_source(2).encode(),
             function_source(3).encode()]
    table = pa.table({"id": pa.array(ids, pa.binary()).view(pa.string()),
                      "code": pa.array(codes, pa.binary()).view(pa.string())})
    data = tmp_path / "fns.parquet"
    pq.write_table(table, data)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    records = strict_records(tmp_path / "fns.scores.jsonl")
    kinds = {r["id"]: r["error_kind"] for r in records}
    assert kinds == {"fn-0": None, "fn-1": "bad_text", "row:2": "bad_id", "fn-3": None}
    assert scored(records)["fn-3"]["score"] == expected_score(function_source(3))
    # the export finds the same rows: the bad id's record joins through its row:N label
    out = tmp_path / "x.parquet"
    assert run_cli(data, "--report", "--export", out).returncode == 0
    got = pq.read_table(out, columns=["score", "error"]).to_pylist()     # the input's own bytes pass through
    assert [r["score"] is not None for r in got] == [True, False, False, True]
    assert "not valid Unicode" in got[1]["error"] and "id is not valid text" in got[2]["error"]


def readable_lines(cut: bytes) -> int:
    """Count the complete lines a cut gzip stream still holds (decoded independently of score.py)."""
    return zlib.decompressobj(wbits=31).decompress(cut).count(b"\n")


def test_truncated_gzip_scores_every_readable_row_and_exits_1(tmp_path, serve):
    server = serve(latency=0.001, slots=4)
    table = rows(3000)
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in table).encode())
    cut = whole[:len(whole) // 2]
    data = tmp_path / "fns.jsonl.gz"
    data.write_bytes(cut)
    readable = readable_lines(cut)
    assert 0 < readable < 3000
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert sorted(scored(records)) == sorted(r["id"] for r in table[:readable])
    warning = [line for line in result.stderr.splitlines() if "cannot read past line" in line]
    assert warning and str(data) in warning[0] and f"line {readable}" in warning[0]
    assert "Input not read to the end" in result.stderr          # in the summary too
    # resume: nothing readable is left, still says so, still exit 1
    again = run_cli(data, "--endpoints", endpoints, "--resume", "--no-progress")
    assert again.returncode == 1 and "cannot read past line" in again.stderr
    assert len(read_records(tmp_path / "fns.scores.jsonl")) == len(records)


def test_damaged_parquet_row_group_is_skipped_and_the_rest_is_scored(tmp_path, serve):
    server = serve()
    table = rows(30)
    data = write_parquet(tmp_path / "fns.parquet", table, row_group_size=10)
    damage_row_group(data, 1, 1)                                       # the middle group's code column
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--no-progress")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and f"{data}: cannot read rows 10-19" in result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert sorted(scored(records)) == sorted(r["id"] for r in table[:10] + table[20:])


FOREIGN = [
    '{"id": 1, "score": "7", "error": null, "error_kind": null}',       # a string score
    '{"id": 2, "score": 11, "error": null, "error_kind": null}',        # out of range
    '{"id": 3, "score": null, "error": null, "error_kind": null}',      # no score and no reason
    '{"id": 4.0, "score": 5, "error": null, "error_kind": null}',       # an id we never write
    '[4, 5]',
    '{"id": 5, "score": true, "error_kind": null}',
    '{"id": 6, "score": 0, "reason": "x", "hash": null, "error_kind": null}',
]


def test_foreign_checkpoint_lines_count_for_nothing_on_resume_and_in_reports(tmp_path, serve):
    server = serve()
    texts = {i: function_source(i) for i in range(8)}
    data = write_jsonl(tmp_path / "fns.jsonl", [{"id": i, "code": t} for i, t in texts.items()])
    out = tmp_path / "fns.scores.jsonl"
    ours = json.dumps({"id": 0, "score": 4, "reason": "fine", "error": None, "error_kind": None})
    out.write_text("\n".join([ours, *FOREIGN]) + "\n")
    report = run_cli(data, "--report")
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    assert f"skipped {len(FOREIGN)} line(s)" in report.stderr and "line 2, 3, 4, 5, 6, ..." in report.stderr
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--resume", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert f"skipped {len(FOREIGN)} line(s)" in result.stderr
    assert server.answered == 7                                       # every id but 0 is scored now
    final = scored(json.loads(line) for line in out.read_text().splitlines()[1 + len(FOREIGN):])
    assert {i: r["score"] for i, r in final.items()} == {i: expected_score(t) for i, t in texts.items() if i}
    export = tmp_path / "x.parquet"
    assert run_cli(data, "--report", "--export", export).returncode == 0
    assert [r["score"] for r in exported(export)] == [4] + [expected_score(texts[i]) for i in range(1, 8)]


def test_repeated_ids_are_named_recorded_and_only_the_first_row_is_scored(tmp_path, serve):
    server = serve()
    table = rows(12)
    for i in (3, 5, 6, 7, 8, 9, 10):
        table[i]["id"] = "fn-0" if i != 10 else "fn-1"    # 7 repeats, different texts
    data = write_jsonl(tmp_path / "fns.jsonl", table)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 1, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    notes = [r for r in records if r["error_kind"] == "duplicate_id"]
    assert len(notes) == 7 and server.answered == 5
    assert scored(records)["fn-0"]["score"] == expected_score(table[0]["code"])
    named = [line for line in result.stderr.splitlines() if "appeared earlier in the input" in line]
    assert len(named) == 5 and "fns.jsonl: line 4: id 'fn-0'" in named[0] and "only counted" in named[4]
    assert "7 duplicate_id" in result.stderr
    # resume: the ids are finished, so no row is a repeat of anything new
    again = run_cli(data, "--endpoints", endpoints, "--resume", "--no-progress")
    assert "appeared earlier" not in again.stderr and len(read_records(tmp_path / "fns.scores.jsonl")) == 12
    assert again.returncode == 0                       # nothing left to score; the repeats are still listed
    assert "Rows without a score: 7 duplicate_id" in again.stderr                 # the report counts rows
    # the export gives the verdict to the first row with the id only
    out = tmp_path / "x.parquet"
    assert run_cli(data, "--report", "--export", out).returncode == 0
    got = exported(out)
    assert got[0]["score"] == expected_score(table[0]["code"]) and got[3]["score"] is None
    assert "duplicate_id" in got[3]["error"] and got[10]["score"] is None
    assert got[4]["score"] == expected_score(table[4]["code"])


def test_a_repeat_noted_before_its_first_row_was_scored_does_not_finish_the_id(tmp_path, serve):
    server = serve()
    table = rows(3) + [{"id": "fn-0", "code": function_source(99)}]
    data = write_jsonl(tmp_path / "fns.jsonl", table)
    out = tmp_path / "fns.scores.jsonl"
    # as after a kill: the repeat's note was written, the first row's verdict was not
    out.write_text(json.dumps({"id": "fn-0", "score": None, "hash": None, "error": "repeat",
                               "error_kind": "duplicate_id"}) + "\n")
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--resume", "--no-progress")
    assert result.returncode == 1, result.stderr
    assert scored(read_records(out))["fn-0"]["score"] == expected_score(table[0]["code"])


def test_malformed_lines_are_named_as_they_happen_with_their_row_id(tmp_path, serve):
    server = serve()
    texts = [{"code": function_source(i)} for i in range(10)]
    raw = {3: '{"code": ', 5: "[1, 2]"} | {i: "nope" for i in range(7, 12)}
    data = write_jsonl(tmp_path / "fns.jsonl", texts, raw_lines=raw)
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--no-progress")
    assert result.returncode == 1, result.stderr
    errors = {r["id"]: r["error"] for r in read_records(tmp_path / "fns.scores.jsonl") if r["score"] is None}
    assert sorted(errors) == [3, 5, 7, 8, 9, 10, 11]
    assert errors[3].startswith("line 4 (row id 3): not valid JSON")
    named = [line for line in result.stderr.splitlines() if "not valid JSON" in line]
    assert len(named) == 5 and "fns.jsonl: line 4 (row id 3)" in named[0] and "only counted" in named[4]
    assert "7 malformed" in result.stderr


def id_column(kind: str) -> tuple[pa.Array, list]:
    """Six ids of one Arrow type (a null among them where the type allows), and the ids score.py records."""
    if kind == "int":
        return pa.array([10, 11, None, 13, 14, 15]), [10, 11, "row:2", 13, 14, 15]
    if kind == "float":      # what pandas makes of an int column with a gap
        return pa.array([1.0, 2.0, None, 4.0, 5.5, 6.0]), ["1.0", "2.0", "row:2", "4.0", "5.5", "6.0"]
    if kind == "string":
        return pa.array(["a", "1", None, "c", "d", "e"]), ["a", "1", "row:2", "c", "d", "e"]
    if kind == "bytes":
        return pa.array([b"a", b"b", None, b"\xff", b"e", b"f"]), ["b'a'", "b'b'", "row:2", "b'\\xff'", "b'e'", "b'f'"]
    if kind == "struct":
        values = [{"repo": "r", "n": i} for i in range(6)]
        values[2] = None
        return pa.array(values), [str(v) if v else "row:2" for v in values]
    values = [[i, i + 1] for i in range(6)]
    values[2] = None
    return pa.array(values), [str(v) if v else "row:2" for v in values]


@pytest.mark.parametrize("kind", ["int", "float", "string", "bytes", "struct", "list"])
def test_export_finds_the_scores_of_every_kind_of_id(tmp_path, serve, kind):
    server = serve()
    ids, recorded = id_column(kind)
    texts = [function_source(i) for i in range(6)]
    data = tmp_path / "fns.parquet"
    pq.write_table(pa.table({"id": ids, "code": texts}), data, row_group_size=4)
    result = run_cli(data, "--endpoints", write_endpoints(tmp_path / "e.txt", [server]), "--no-progress")
    assert result.returncode == 1, result.stderr                   # the null id is a permanent error
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert [r["id"] for r in records if r["score"] is None] == ["row:2"]
    assert sorted(map(str, scored(records))) == sorted(str(r) for r in recorded if r != "row:2")
    out = tmp_path / "x.parquet"
    exported_run = run_cli(data, "--report", "--export", out)
    assert exported_run.returncode == 0, exported_run.stderr
    got = exported(out)
    assert [r["score"] for r in got] == [None if i == 2 else expected_score(t) for i, t in enumerate(texts)]
    assert "id column is null" in got[2]["error"]
    # resume agrees: nothing is left to do
    again = run_cli(data, "--endpoints", tmp_path / "e.txt", "--resume", "--no-progress")
    assert "Nothing to do" in again.stderr and server.answered == 5


def test_jsonl_ids_1_and_text_1_are_different_rows_everywhere(tmp_path, serve):
    server = serve()
    table = [{"id": 1, "code": function_source(1)}, {"id": "1", "code": function_source(2)},
             {"id": None, "code": function_source(3)}, {"id": 1.0, "code": function_source(4)}]
    data = write_jsonl(tmp_path / "fns.jsonl", table)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 1 and "appeared earlier" not in result.stderr, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert Counter(type(r["id"]).__name__ + ":" + str(r["id"]) for r in records) == \
        {"int:1": 1, "str:1": 1, "str:line:3": 1, "str:1.0": 1}
    out = tmp_path / "x.parquet"
    assert run_cli(data, "--report", "--export", out).returncode == 0
    got = exported(out)
    assert [r["score"] for r in got] == [expected_score(function_source(1)), expected_score(function_source(2)),
                                         None, expected_score(function_source(4))]
    again = run_cli(data, "--endpoints", endpoints, "--resume", "--no-progress")
    assert "Nothing to do" in again.stderr and server.answered == 3


# ── the rules themselves


def test_id_rule_keeps_ints_and_strings_and_writes_anything_else_as_text():
    assert score.row_id(7, "row:0") == 7 and score.row_id("7", "row:0") == "7"
    assert score.row_id(1.0, "row:0") == "1.0" and score.row_id(b"ab", "row:0") == "b'ab'"
    assert score.row_id({"a": 1}, "row:0") == "{'a': 1}" and score.row_id([1, 2], "row:0") == "[1, 2]"
    assert score.row_id(True, "row:0") == "True" and score.row_id(None, "line:4") == "line:4"
    assert score.id_key(1) != score.id_key("1") and score.id_key(1) == 1
    assert score.id_key("fn-1") == score.id_key("fn-1") != score.id_key("fn-2")
    assert score.checked_id(None, "row:3") == ("row:3", ("no_id", "the id column is null"))
    ident, problem = score.checked_id("x\ud800", "row:3")
    assert ident == "row:3" and problem[0] == "bad_id"
    assert score.checked_id("héllo", "row:3") == ("héllo", None)


@pytest.mark.parametrize("record, ok", [
    ({"id": 1, "score": 7, "error_kind": None}, True),
    ({"id": "a", "score": None, "error_kind": "empty"}, True),
    ({"id": "a", "score": "7", "error_kind": None}, False),
    ({"id": "a", "score": 0, "error_kind": None}, False),
    ({"id": "a", "score": 10.0, "error_kind": None}, False),
    ({"id": "a", "score": None, "error_kind": None}, False),
    ({"id": 1.5, "score": 3, "error_kind": None}, False),
    ({"id": True, "score": 3, "error_kind": None}, False),
    ({"id": None, "score": 3, "error_kind": None}, False),
    ({"score": 3, "error_kind": None}, False),
    ({"id": "a", "score": 3, "hash": 12}, False),
    ([1, 2], False),
])
def test_only_records_this_tool_writes_are_valid(record, ok):
    assert score.valid_record(record) is ok
    line = json.dumps(record).encode() + b"\n"
    assert (score.scan_record(line) is not None) is ok


def written(record: dict) -> bytes:
    """Encode a record exactly as the checkpoint does."""
    return (json.dumps(record, ensure_ascii=False) + "\n").encode()


def test_record_builders_match_the_fast_scanner():
    keys = score.RECORD_KEYS
    assert keys[:2] == ("id", "score") and keys[-1] == "error_kind" and "hash" in keys   # what RECORD_FIELDS reads
    item = score.Item(id="fn-\"7\"", text="def f(): pass", fields={})
    item.text_hash = score.text_hash(item.text)
    failed = score.error_record(item, "attempts_exhausted", "bad answers", "m")
    success = score.base_record(item) | {"score": 7, "reason": "ok, \"fine\"\nreally", "endpoint": "é"}
    copied = score.duplicate_record(score.Item(id=12, text=None, fields={}), success)
    for record in (failed, success, copied):
        assert tuple(record) == keys                           # every builder writes RECORD_KEYS in order
        line = written(record)
        assert score.RECORD_FIELDS.match(line), line           # a reorder of RECORD_KEYS fails here
        fields = score.scan_record(line)
        slow = json.loads(line)
        assert fields == (score.id_key(slow["id"]), slow["score"], slow["hash"], slow["error_kind"])


def test_seen_keys_notice_repeats_across_compactions():
    seen = score.SeenKeys()
    assert all(seen.add(k * 7919 % 200_003) for k in range(150_000))
    assert len(seen) == 150_000
    assert not seen.add(7919) and not seen.add(149_999 * 7919 % 200_003)
    assert seen.add(-5) and not seen.add(-5)


# ── a row's label and a real id that reads the same


def test_real_id_reading_like_a_label_is_its_own_row_on_resume_and_export(tmp_path, serve):
    server = serve(bad_for="compute_1(", seed=5)
    table = [{"id": None, "code": function_source(0)}, {"id": "line:1", "code": function_source(1)},
             {"id": "fn-2", "code": function_source(2)}]
    data = write_jsonl(tmp_path / "fns.jsonl", table)
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    first = run_cli(data, "--endpoints", endpoints, "--max-attempts", "2", "--no-progress")
    assert first.returncode == 1, first.stderr
    out = tmp_path / "fns.scores.jsonl"
    kinds = [(r["id"], r["error_kind"]) for r in read_records(out)]
    assert ("line:1", "no_id") in kinds and ("line:1", "attempts_exhausted") in kinds
    # the real row "line:1" failed, the null-id row of line 1 is permanent: resume retries only the real one
    server.behaviour.bad_for = None
    again = run_cli(data, "--endpoints", endpoints, "--resume", "--no-progress")
    assert again.returncode == 1, again.stderr                # the null id stays unscored
    assert scored(read_records(out))["line:1"]["score"] == expected_score(function_source(1))
    export = tmp_path / "x.parquet"
    report = run_cli(data, "-o", out, "--report", "--export", export)
    assert report.returncode == 0, report.stderr
    assert "Rows without a score: 1 no_id" in report.stdout + report.stderr     # not hidden by the real row's score
    got = exported(export)
    assert got[0]["score"] is None and "null" in got[0]["error"]
    assert got[1]["score"] == expected_score(function_source(1))
    assert got[2]["score"] == expected_score(function_source(2))


def test_parquet_real_id_reading_like_a_row_label_is_scored_after_a_failure(tmp_path, serve):
    server = serve(bad_for="compute_1(", seed=6)
    data = write_parquet(tmp_path / "fns.parquet", [{"id": None, "code": function_source(0)},
                                                    {"id": "row:0", "code": function_source(1)}])
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert run_cli(data, "--endpoints", endpoints, "--max-attempts", "2", "--no-progress").returncode == 1
    server.behaviour.bad_for = None
    again = run_cli(data, "--endpoints", endpoints, "--resume", "--no-progress")
    assert again.returncode == 1, again.stderr
    out = tmp_path / "fns.scores.jsonl"
    assert scored(read_records(out))["row:0"]["score"] == expected_score(function_source(1))
    export = tmp_path / "x.parquet"
    assert run_cli(data, "-o", out, "--report", "--export", export).returncode == 0
    assert [r["score"] for r in exported(export)] == [None, expected_score(function_source(1))]


def test_big_int_id_and_the_string_of_its_digits_are_two_rows(tmp_path, serve):
    server = serve()
    big = 2 ** 64
    data = write_jsonl(tmp_path / "fns.jsonl", [{"id": big, "code": function_source(0)},
                                                {"id": str(big), "code": function_source(1)}])
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "fns.scores.jsonl"
    records = read_records(out)
    assert all(r["error_kind"] is None for r in records) and len(records) == 2
    assert scored(records)[big]["score"] == expected_score(function_source(0))
    assert scored(records)[str(big)]["score"] == expected_score(function_source(1))
    export = tmp_path / "x.parquet"
    result = run_cli(data, "-o", out, "--report", "--export", export)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert [r["score"] for r in exported(export)] == [expected_score(function_source(i)) for i in (0, 1)]


def test_labels_and_big_ints_have_keys_of_their_own():
    assert score.label_key("line:1") != score.id_key("line:1")
    assert score.id_key(2 ** 64) != score.id_key(str(2 ** 64))
    assert score.id_key(-(2 ** 64)) != score.id_key(str(-(2 ** 64)))
    assert score.row_key("line:1", ("no_id", "null")) == score.label_key("line:1")
    assert score.row_key("line:1", None) == score.id_key("line:1")
    assert score.record_key("line:1", "no_id") == score.record_key("line:1", "bad_id") == score.label_key("line:1")
    assert score.record_key("line:1", "malformed") == score.label_key("line:1")
    assert score.record_key("line:1", "attempts_exhausted") == score.record_key("line:1", None) == score.id_key("line:1")
    assert score.record_key(4, "malformed") == 4                  # a numbered line keeps its number
    line = written({"id": "row:3", "score": None, "hash": None, "error_kind": "no_id"})
    assert score.scan_record(line)[0] == score.label_key("row:3")
    assert score.scan_record(b'{"id": "row:3", "score": null, "hash": null, "error_kind": "no_id", "x": 1}\n')[0] \
        == score.label_key("row:3")
