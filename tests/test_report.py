"""Using the scores: the joined Parquet export, the run report, and the HTML page."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
from collections import Counter

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
        assert f"<td>{name}</td><td>{n}</td>" in dom
    assert "qwen2.5-coder:7b" in dom and "prompt sha256" in dom and "nan" not in dom
    assert "http://" not in page.read_text().replace(a.url, "").replace(b.url, "").replace(
        "http://www.w3.org/2000/svg", "")                                  # nothing fetched at view time


def fleet_checkpoint(path, endpoints: int = 44, per_endpoint: int = 60, gap: float = 3 * 3600.0):
    """Write a checkpoint as a large fleet would leave it: expected scores, tokens, a duplicate, a long pause."""
    lines, start = [], 1_790_000_000.0
    for e in range(endpoints):
        for i in range(per_endpoint):
            n = e * per_endpoint + i
            value = 3 if e == 7 else 6 + (i % 3 == 0)             # node-07 scores far lower
            ts = start + n * 0.5 + (gap if n >= endpoints * per_endpoint // 2 else 0.0)
            lines.append({"id": n, "score": value, "score_expected": value - 0.4 + (i % 5) / 10,
                          "endpoint": f"node-{e:02d}", "output_tokens": 6, "ts": ts})
    lines.append({"id": "dup", "score": 7, "endpoint": "node-00", "duplicate_of": 0, "ts": start})
    lines.append({"id": "bad", "score": None, "error_kind": "empty", "error": "empty text"})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return lines


def test_report_of_a_large_fleet_fits_100_columns_and_names_the_notable_endpoints(tmp_path):
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    checkpoint = tmp_path / "fns.scores.jsonl"
    fleet_checkpoint(checkpoint)
    result = run_cli(data, "-o", checkpoint, "--report")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    fleet = [line.split() for line in lines if line.endswith("|")]            # one per endpoint, or "N others"
    assert ["node-07"] == [r[0] for r in fleet if r[0] == "node-07"]          # the disagreeing one is named
    named = [r[0] for r in fleet if r[0].startswith("node-")]
    folded = [r for r in fleet if r[1] == "others"]
    assert named and len(named) < score.FLEET_ROWS and len(folded) == 1
    assert len(named) + int(folded[0][0]) == 44                               # every endpoint counted once
    warnings = [line for line in lines if line.startswith("WARNING")]
    assert len(warnings) == 2 and all("node-07" in w for w in warnings)     # integer and expected scores
    assert "share the most common score (6)" in result.stderr
    assert "6.0 tokens per answer" in result.stderr
    assert "no answers for 3h00m" in result.stderr


def test_html_report_of_a_large_fleet_renders_every_endpoint_and_the_pause(tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    checkpoint = tmp_path / "fns.scores.jsonl"
    fleet_checkpoint(checkpoint, endpoints=120, per_endpoint=20)
    page = tmp_path / "report.html"
    assert run_cli(data, "-o", checkpoint, "--report", "--report-html", page).returncode == 0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert all(f"<td>node-{e:02d}</td>" in dom for e in range(120)) and dom.count("<svg") > 120
    assert "no answers for 3h00m" in dom                               # the pause is drawn as a gap
    assert "took its verdict" in dom                                   # why the endpoints don't add up
    assert "nan" not in dom and "Expected scores" in dom


def fleet_stats(groups: dict[str, list[int]]) -> score.Stats:
    stats = score.Stats()
    for name, values in groups.items():
        stats.per_endpoint[name] = Counter(values)
    return stats


def spread(mean_tenths: int, n: int = 100) -> list[int]:
    """n scores around 5 (4, 5, 6 in turn) shifted so that their mean is mean_tenths / 10."""
    base = [4 + i % 3 for i in range(n - n % 3)] + [5] * (n % 3)             # mean 5.0
    moved = (mean_tenths - 50) * n // 10                                     # rows one point higher (lower)
    return [v + (i < abs(moved)) * (1 if moved > 0 else -1) for i, v in enumerate(base)]


def test_disagreement_warns_for_two_endpoints_five_against_five_point_nine():
    a, b = spread(50), spread(59)
    assert (sum(a) / 100, sum(b) / 100) == (5.0, 5.9)
    warnings = score.disagreements(fleet_stats({"a": a, "b": b}))
    assert len(warnings) == 1 and "a and b disagree" in warnings[0] and "5.00 vs 5.90" in warnings[0]


def test_disagreement_names_only_the_outlier_among_several():
    warnings = score.disagreements(fleet_stats({"gpu": spread(55), "mac1": spread(54), "mac2": spread(58),
                                                "mac3": spread(42)}))
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: mac3 scores") and "lower" in warnings[0]


@pytest.mark.parametrize("groups", [
    {"a": spread(50, 5000), "b": spread(53, 5000)},                  # real but small: under half a point
    {"a": [1, 10] * 30, "b": [1, 10] * 24 + [10] * 12},              # 0.9 apart, but on noise this wide it is chance
    {"a": spread(50, 40), "b": spread(60, 40)},                      # too few items to judge
])
def test_disagreement_stays_quiet_on_small_gaps_noise_or_few_items(groups):
    assert score.disagreements(fleet_stats(groups)) == []


def test_disagreement_has_no_false_alarms_on_a_large_fleet_of_one_model():
    generator = random.Random(7)
    groups = {f"node-{i}": [generator.choice([3, 4, 5, 5, 6, 6, 7, 9]) for _ in range(80)] for i in range(60)}
    assert score.disagreements(fleet_stats(groups)) == []


def test_disagreement_compares_expected_scores_where_endpoints_have_them():
    stats = fleet_stats({"a": spread(50), "b": spread(50)})       # the integers agree
    for name, shift in (("a", 0.0), ("b", 0.8)):
        stats.expected[name] = score.Moments()
        for i in range(100):
            stats.expected[name].add(4.5 + shift + (i % 5) / 5)
    warnings = score.disagreements(stats)
    assert len(warnings) == 1 and "on expected scores" in warnings[0]


def test_html_endpoint_histograms_share_one_scale(tmp_path):
    stats = fleet_stats({"sure": [5] * 60, "torn": [4, 6] * 30})
    page = score.html_report(stats, tmp_path / "x.scores.jsonl")
    heights = {}
    for name in ("sure", "torn"):
        row = page.split(f"<td>{name}</td>", 1)[1].split("</tr>", 1)[0]
        heights[name] = max(float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', row))
    assert heights["torn"] == pytest.approx(heights["sure"] / 2)       # half the share, half the height
    assert "unknown (no sidecar)" in page and "nan" not in page


ODD_FIELDS = [
    '"endpoint": 5', '"ts": 1e300', '"ts": NaN', '"ts": -5', '"score_expected": Infinity', '"score_expected": 11.5',
    '"score_expected": "7"', '"output_tokens": -3', '"output_tokens": 2.5', '"prompt_tokens": "many"',
    '"latency_s": -1', '"latency_s": NaN', '"reason": 7', '"model": ["m"]', '"error": {"x": 1}',
    '"duplicate_of": 1.5', '"truncated": "yes"', '"endpoint": "\\ud800"',
]


def test_report_and_export_leave_out_details_score_py_never_writes_and_keep_the_verdict(tmp_path):
    data = write_jsonl(tmp_path / "fns.jsonl", [{"id": i, "code": function_source(i)} for i in range(len(ODD_FIELDS) + 1)])
    checkpoint = tmp_path / "fns.scores.jsonl"
    lines = [f'{{"id": {i}, "score": 6, {odd}, "error_kind": null}}' for i, odd in enumerate(ODD_FIELDS)]
    good = len(ODD_FIELDS)
    lines.append(json.dumps({"id": good, "score": 4, "score_expected": 4.2, "endpoint": "a", "ts": 1.7e9,
                             "latency_s": 0.5, "output_tokens": 7, "truncated": True, "error_kind": None}))
    checkpoint.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.parquet"
    result = run_cli(data, "-o", checkpoint, "--report", "--export", out, "--report-html", tmp_path / "r.html")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and "not records" not in result.stderr
    got = exported(out)
    assert [r["score"] for r in got] == [6] * len(ODD_FIELDS) + [4]      # as resume counts them: scored
    assert [r["score_expected"] for r in got] == [None] * len(ODD_FIELDS) + [4.2]
    assert {r["endpoint"] for r in got[:good]} == {None}                # not 5, not a lone surrogate


@pytest.mark.parametrize("odd", ODD_FIELDS)
def test_an_odd_detail_is_left_out_but_the_line_is_still_a_record(odd):
    line = json.loads(f'{{"id": 1, "score": 6, {odd}, "error_kind": null}}')
    name = odd.split('"')[1]
    assert score.valid_record(line)
    assert score.clean_details(line)[name] is None


@pytest.mark.parametrize("fields", [
    {}, {"endpoint": None, "ts": None, "score_expected": None, "output_tokens": None, "latency_s": None},
    {"endpoint": "a", "ts": 1_764_000_000.123, "score_expected": 1, "prompt_tokens": 0, "latency_s": 0.0,
     "reason": "", "model": "m", "error": None, "duplicate_of": "fn-1", "truncated": False},
    {"score_expected": 10.0, "duplicate_of": 3, "truncated": True, "output_tokens": 12},
])
def test_records_score_py_writes_stay_valid(fields):
    assert score.valid_record({"id": 1, "score": 6, "error_kind": None, **fields})


def test_a_null_id_row_never_takes_the_score_of_a_real_id_that_reads_like_its_label(tmp_path):
    data = write_jsonl(tmp_path / "fns.jsonl", [{"id": None, "code": function_source(0)},
                                                {"id": "line:1", "code": function_source(1)}])
    checkpoint = tmp_path / "fns.scores.jsonl"
    checkpoint.write_text(json.dumps({"id": "line:1", "score": None, "error": "line 1: the id column is null",
                                      "error_kind": "no_id"}) + "\n"
                          + json.dumps({"id": "line:1", "score": 7, "error_kind": None}) + "\n")
    out = tmp_path / "out.parquet"
    result = run_cli(data, "-o", checkpoint, "--report", "--export", out)
    assert result.returncode == 0, result.stderr
    assert "Rows without a score: 1 no_id" in result.stdout + result.stderr
    assert [(r["score"], r["error"]) for r in exported(out)] == [(None, "line 1: the id column is null"), (7, None)]


MEASURE = """<script>
const svg = [...document.querySelectorAll('svg')].find(s => s.querySelector('text.legend'));
const box = svg.getBoundingClientRect();
const boxes = [...svg.querySelectorAll('text.legend')].map(t => t.getBoundingClientRect());
let overlaps = 0, outside = 0;
boxes.forEach((a, i) => {
  if (a.left < box.left || a.right > box.right || a.bottom > box.bottom) outside++;
  boxes.slice(i + 1).forEach(b => {
    if (a.left < b.right && b.left < a.right && a.top < b.bottom && b.top < a.bottom) overlaps++;
  });
});
document.body.setAttribute('data-measured', `legend=${boxes.length} overlaps=${overlaps} outside=${outside}`);
</script>"""


def test_html_chart_names_every_endpoint_of_a_small_fleet_in_a_legend_that_does_not_overlap(tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it)")
    names = ["macbook-pro-2019-alice", "macbook-pro-2019-bob", "p40-in-the-basement",
             "workstation-upstairs-left", "workstation-upstairs-right", "a-very-long-name-for-the-old-mac-mini"]
    lines = [{"id": n, "score": 5 + n % 3, "endpoint": names[n % 6], "output_tokens": 6,
              "ts": 1_790_000_000.0 + n} for n in range(600)]
    checkpoint = tmp_path / "fns.scores.jsonl"
    checkpoint.write_text("".join(json.dumps(r) + "\n" for r in lines))
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    page = tmp_path / "report.html"
    result = run_cli(data, "-o", checkpoint, "--report", "--report-html", page)
    assert result.returncode == 0, result.stderr
    text = page.read_text()
    assert "others" not in text                                       # six endpoints: six curves, nothing folded
    measured = tmp_path / "measured.html"
    measured.write_text(text.replace("</body>", MEASURE + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", measured.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert 'data-measured="legend=6 overlaps=0 outside=0"' in dom, re.findall(r'data-measured="[^"]*"', dom)
    for name in names[:5]:
        assert f">{name}</text>" in dom                               # in full up to 28 characters
    assert ">a-very-long-na…-old-mac-mini<" in dom and "<title>a-very-long-name-for-the-old-mac-mini</title>" in dom
    # the text report shows them in full too, and the two macbooks stay apart
    assert "macbook-pro-2019-alice" in result.stderr and "macbook-pro-2019-bob " in result.stderr


def test_export_line_says_one_row_and_names_its_filters_in_one_parenthesis(tmp_path):
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    checkpoint = tmp_path / "fns.scores.jsonl"
    checkpoint.write_text("".join(json.dumps({"id": f"fn-{i}", "score": s, "endpoint": "e0", "output_tokens": 6,
                                              "ts": 1_790_000_000.0 + i}) + "\n" for i, s in enumerate([9, 4, 2])))
    out = tmp_path / "top.parquet"
    result = run_cli(data, "-o", checkpoint, "--report", "--export", out, "--min-score", "9", "--top", "10%")
    assert result.returncode == 0, result.stderr
    assert f"Exported 1 row (1 scored) to {out} (--min-score 9, --top 10%)" in result.stderr, result.stderr
    assert [r["score"] for r in exported(out)] == [9]
