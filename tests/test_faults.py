"""Nothing lost, nothing scored twice: flaky, dead, hung and poisoned endpoints; kills and signals."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter

import pytest

import score
from conftest import (expected_score, interrupt_after, lines_in, read_records, rows, run_cli, scored, start_cli,
                      wait_for, write_endpoints, write_jsonl, write_parquet)

TEXTS = {r["id"]: r["code"] for r in rows(1000)}


def assert_complete(records: list[dict], ids) -> None:
    """Exactly one successful record per id, each carrying the right verdict."""
    ok = Counter(r["id"] for r in records if r["score"] is not None)
    assert set(ok) == set(ids), set(ids) - set(ok)
    assert max(ok.values()) == 1
    for r in records:
        if r["score"] is not None:
            assert r["score"] == expected_score(TEXTS[r["id"]])


def test_flaky_endpoints_lose_nothing_and_charge_no_attempts(tmp_path, serve):
    flaky = serve(latency=0.01, slots=4, fail_500=0.15, reset=0.1, busy_503=0.1, seed=1)
    steady = serve(latency=0.03, slots=2, seed=2)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(150))
    endpoints = write_endpoints(tmp_path / "e.txt", [flaky, steady])
    assert score.main([str(data), "--endpoints", str(endpoints), "--max-attempts", "1", "--no-progress"]) == 0
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert len(records) == 150
    assert_complete(records, [r["id"] for r in rows(150)])
    assert all(r["attempts"] == 1 for r in records)       # endpoint faults never cost an attempt


def test_bad_answers_are_retried_with_a_different_seed_then_recorded(tmp_path, serve):
    server = serve(bad_for="compute_7(", seed=3)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(12))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--max-attempts", "3")
    assert result.returncode == 1, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    failed = [r for r in records if r["score"] is None]
    assert [r["id"] for r in failed] == ["fn-7"]
    assert failed[0]["error_kind"] == "attempts_exhausted" and "outside 1..10" in failed[0]["error"]
    tries = [b for b in server.chat_bodies() if "compute_7(" in b["messages"][0]["content"]]
    assert len(tries) == 3
    settings = {(b["options"]["seed"], b["options"]["temperature"]) for b in tries}
    assert len(settings) == 3 and tries[0]["options"]["temperature"] == 0
    assert "1 attempts_exhausted" in result.stderr and "--resume retries" in result.stderr
    # resume tries the failed row again (and only it)
    server.behaviour.bad_for = None
    again = run_cli(data, "--endpoints", endpoints, "--resume")
    assert again.returncode == 0, again.stderr
    assert_complete(read_records(tmp_path / "fns.scores.jsonl"), [r["id"] for r in rows(12)])


def test_garbage_and_out_of_range_answers_never_become_scores(tmp_path, serve):
    server = serve(garbage=0.2, out_of_range=0.2, seed=4)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(60))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    code = score.main([str(data), "--endpoints", str(endpoints), "--max-attempts", "6", "--no-progress"])
    records = read_records(tmp_path / "fns.scores.jsonl")
    ids = {r["id"] for r in rows(60)}
    failed = {r["id"] for r in records if r["score"] is None}
    # every row ends either scored (once, with the true verdict) or recorded as failed, never both
    good = set(scored(records))
    assert not good & failed                        # checked first: assert_complete below implies it
    assert_complete(records, ids - failed)
    assert all(r["error_kind"] == "attempts_exhausted" for r in records if r["score"] is None)
    assert code == (0 if good == ids else 1)
    assert len(good) >= 55


def test_dead_endpoint_is_not_drained_and_fails_no_item(tmp_path, serve):
    broken = serve(fail_500=1.0)                 # answers probes, every scoring request crashes
    good = serve(latency=0.02, slots=2)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(80))
    endpoints = write_endpoints(tmp_path / "e.txt", [broken, good], extra=["127.0.0.1:9 name=refused"])
    assert score.main([str(data), "--endpoints", str(endpoints), "--max-attempts", "1", "--no-progress"]) == 0
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert_complete(records, [r["id"] for r in rows(80)])
    assert {r["endpoint"] for r in records} == {"e1"}
    # marked down after a few faults, then only probed (each rejoin costs at most DOWN_AFTER requests)
    assert broken.chats <= 3 * score.DOWN_AFTER
    probes = [p for m, p, b in broken.requests if p in ("/", "/api/tags", "/api/version")]
    assert probes


def test_an_endpoint_failing_every_request_for_long_never_stops_the_run(tmp_path, serve):
    broken = serve(fail_500=1.0)                 # keeps coming back from probes, fails every request
    good = serve(latency=0.01, slots=2, hold_after=10)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(40))
    endpoints = write_endpoints(tmp_path / "e.txt", [good, broken])
    out = tmp_path / "fns.scores.jsonl"
    proc = start_cli(data, "--endpoints", endpoints, "--no-progress")
    # Every request of the broken one fails: after a dozen, its share of faults reads as 1 exactly.
    wait_for(lambda: broken.chats >= 4 * score.DOWN_AFTER + 1 or proc.poll() is not None, timeout=90,
             what="the broken endpoint failing a dozen requests")
    good.release()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert_complete(read_records(out), [r["id"] for r in rows(40)])


def test_an_always_failing_endpoint_has_the_longest_run_of_chance_faults():
    spec = score.EndpointSpec(url="http://127.0.0.1:1", name="a", api="ollama", model=None, concurrency=None,
                              key_env=None, line=1)
    endpoint = score.Endpoint(spec, score.parse_args(["x.jsonl"]))
    assert endpoint.fault_run_limit(1.0) == score.FAULT_RUN_CAP
    assert endpoint.fault_run_limit(0.999) == score.FAULT_RUN_CAP
    assert endpoint.fault_run_limit(0.0) == score.DOWN_AFTER


def test_hung_endpoint_does_not_stall_the_end_of_the_run(tmp_path, serve):
    hung = serve(hang=1.0)
    good = serve(latency=0.01)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(30))
    endpoints = write_endpoints(tmp_path / "e.txt", [hung, good], options="concurrency=2")
    started = time.monotonic()
    assert score.main([str(data), "--endpoints", str(endpoints), "--timeout", "1", "--no-progress"]) == 0
    assert_complete(read_records(tmp_path / "fns.scores.jsonl"), [r["id"] for r in rows(30)])
    assert hung.answered == 0 and hung.cancelled >= 1
    assert time.monotonic() - started < 60


def test_poison_item_is_charged_and_spares_healthy_endpoints(tmp_path, serve):
    a = serve(latency=0.01, poison="compute_5(")
    b = serve(latency=0.01, poison="compute_5(")
    data = write_jsonl(tmp_path / "fns.jsonl", rows(40))
    endpoints = write_endpoints(tmp_path / "e.txt", [a, b])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 1, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    failed = [r for r in records if r["score"] is None]
    assert [(r["id"], r["error_kind"]) for r in failed] == [("fn-5", "poison")]
    assert "llama runner process has terminated" in failed[0]["error"]
    assert_complete([r for r in records if r["score"] is not None], [f"fn-{i}" for i in range(40) if i != 5])
    poisoned = sum("compute_5(" in x["messages"][0]["content"] for s in (a, b) for x in s.chat_bodies())
    assert poisoned <= score.POISON_FAULTS + 3        # bounded, not a loop
    assert "taken out" not in result.stderr


def test_every_endpoint_down_at_start_then_back_completes_with_no_errors(tmp_path, serve):
    a, b = serve(latency=0.01), serve(latency=0.01)
    a.go_down()
    b.go_down()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(40))
    endpoints = write_endpoints(tmp_path / "e.txt", [a, b])
    proc = start_cli(data, "--endpoints", endpoints, "--no-progress")
    first = proc.stderr.readline()
    assert "No endpoint answers yet" in first
    a.come_back()
    b.come_back()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, first + err
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert_complete(records, [r["id"] for r in rows(40)])
    assert all(r["error"] is None for r in records)


def test_all_endpoints_down_mid_run_pauses_then_continues(tmp_path, serve):
    a = serve(latency=0.01, slots=2, hold_after=20)       # the outage comes after 20 rows, surely before the end
    data = write_jsonl(tmp_path / "fns.jsonl", rows(40))
    endpoints = write_endpoints(tmp_path / "e.txt", [a])
    out = tmp_path / "fns.scores.jsonl"
    proc = start_cli(data, "--endpoints", endpoints, "--no-progress")
    wait_for(lambda: lines_in(out) >= 20 and a.held, what="first records")
    a.go_down()
    a.release()
    paused = ""
    while "pausing" not in paused:
        paused = proc.stderr.readline()
        assert paused, "score.py ended without pausing"
    a.come_back()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    records = read_records(out)
    assert_complete(records, [r["id"] for r in rows(40)])
    assert all(r["error"] is None for r in records)


@pytest.mark.parametrize("outage", ["port closed", "answers probes, fails every request"])
def test_max_downtime_ends_the_run_with_exit_1_and_nothing_lost(tmp_path, serve, outage):
    a = serve(latency=0.01, slots=1, hold_after=10)      # the outage comes after 10 rows, surely before the end
    data = write_jsonl(tmp_path / "fns.jsonl", rows(30))
    endpoints = write_endpoints(tmp_path / "e.txt", [a])
    out = tmp_path / "fns.scores.jsonl"
    proc = start_cli(data, "--endpoints", endpoints, "--no-progress", "--max-downtime", "3")
    wait_for(lambda: lines_in(out) >= 10 and a.held, what="first records")
    if outage == "port closed":
        a.go_down()
    else:
        a.behaviour.fail_500 = 1.0        # it keeps rejoining after probes, which must not reset the clock
    a.release()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "none has answered" in err and "--max-downtime 3s)" in err and "Traceback" not in err
    assert f"continue with:\n  " in err and "--max-downtime 3 --resume\n" in err
    assert all(r["score"] is not None for r in read_records(out))      # nothing charged to rows
    if outage == "port closed":
        a.come_back()
    a.behaviour.fail_500 = 0.0
    assert run_cli(data, "--endpoints", endpoints, "--resume").returncode == 0
    assert_complete(read_records(out), [r["id"] for r in rows(30)])


def test_startup_timeout_names_every_endpoint(tmp_path):
    data = write_jsonl(tmp_path / "fns.jsonl", rows(3))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text("127.0.0.1:9 name=first\n127.0.0.1:7 name=second\n")
    result = run_cli(data, "--endpoints", endpoints, "--startup-timeout", "1")
    assert result.returncode == 2
    assert "no endpoint answered within 1 s" in result.stderr
    assert "first (http://127.0.0.1:9)" in result.stderr and "second (http://127.0.0.1:7)" in result.stderr
    assert "connection refused" in result.stderr and "Traceback" not in result.stderr


def test_endpoint_that_loses_its_model_is_taken_out_and_the_run_continues(tmp_path, serve):
    a, b = serve(latency=0.02, slots=1), serve(latency=0.02, slots=1)     # the loss must come before the end
    data = write_jsonl(tmp_path / "fns.jsonl", rows(60))
    endpoints = write_endpoints(tmp_path / "e.txt", [a, b])
    out = tmp_path / "fns.scores.jsonl"
    proc = start_cli(data, "--endpoints", endpoints, "--no-progress")
    wait_for(lambda: lines_in(out) >= 5, what="first records")
    a.behaviour.chat_status = 401
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "e0 taken out" in err and "401" in err
    assert_complete(read_records(out), [r["id"] for r in rows(60)])


@pytest.mark.parametrize("kills", [4])
def test_sigkill_at_random_moments_then_resume_scores_each_id_once(tmp_path, serve, kills):
    a = serve(latency=0.01, slots=4, fail_500=0.05, seed=5)
    b = serve(latency=0.03, slots=2, reset=0.05, seed=6)
    data = write_parquet(tmp_path / "fns.parquet", rows(400), row_group_size=50)
    endpoints = write_endpoints(tmp_path / "e.txt", [a, b])
    out = tmp_path / "fns.scores.jsonl"
    rng = random.Random(11)
    for round_ in range(kills):
        killed, _ = interrupt_after(out, data, "--endpoints", endpoints, "--no-progress",
                                    *(["--resume"] if round_ else []), records=lines_in(out) + rng.randint(5, 60),
                                    sig=signal.SIGKILL)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    final = run_cli(data, "--endpoints", endpoints, "--resume")
    assert final.returncode == 0, final.stderr
    text = out.read_bytes()
    assert text.endswith(b"\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert_complete(records, [r["id"] for r in rows(400)])


def test_torn_final_line_is_repaired_on_resume(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints), "--limit", "4"]) == 0
    out = tmp_path / "fns.scores.jsonl"
    with open(out, "ab") as f:
        f.write(b'{"id": "fn-4", "score": 9, "rea')      # a crash mid-write
    result = run_cli(data, "--endpoints", endpoints, "--resume")
    assert result.returncode == 0, result.stderr
    assert "torn final line" in result.stderr
    assert_complete(read_records(out), [r["id"] for r in rows(10)])


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_promptly_and_resume_completes(tmp_path, serve, sig, code):
    # From the first record on the server holds every request: the signal lands while one is surely
    # in flight and would never end, so stopping at all means abandoning it, not waiting for it.
    server = serve(latency=0.01, slots=2, hold_after=1)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(20))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    stopped, records = interrupt_after(out, data, "--endpoints", endpoints, "--no-progress", records=1, sig=sig,
                                       held=[server])
    assert stopped.returncode == code, stopped.stderr
    assert "--resume" in stopped.stderr and "Traceback" not in stopped.stderr
    assert out.read_bytes().endswith(b"\n") and 1 <= len(records) < 20
    assert server.cancelled >= 1                        # the held request was given up, not waited for
    assert run_cli(data, "--endpoints", endpoints, "--resume").returncode == 0
    assert_complete(read_records(out), [r["id"] for r in rows(20)])


def test_resume_with_another_prompt_needs_force(tmp_path, serve):
    server = serve()
    data = write_jsonl(tmp_path / "fns.jsonl", rows(10))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    assert score.main([str(data), "--endpoints", str(endpoints), "--limit", "3"]) == 0
    prompt = tmp_path / "p.txt"
    prompt.write_text("Score it.\n```\n{code}\n```\n")
    out = tmp_path / "fns.scores.jsonl"
    before = out.read_bytes()
    refused = run_cli(data, "--endpoints", endpoints, "--resume", "--prompt-file", prompt)
    assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr
    assert "written with the built-in prompt: drop --prompt-file" in refused.stderr
    assert out.read_bytes() == before
    forced = run_cli(data, "--endpoints", endpoints, "--resume", "--prompt-file", prompt, "--force")
    assert forced.returncode == 0 and "WARNING" in forced.stderr
    assert len(scored(read_records(out))) == 10


NETNS = shutil.which("ip") is not None and os.geteuid() == 0


def netns_available() -> str | None:
    if not NETNS:
        return "needs root and iproute2 (ip)"
    probe = subprocess.run(["ip", "netns", "add", "scoreprobe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns unavailable: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "scoreprobe"], capture_output=True)
    return None


@pytest.mark.netns
def test_cut_link_to_a_host_in_another_namespace_then_restore(tmp_path, serve):
    reason = netns_available()
    if reason:
        pytest.skip(reason)
    import sys
    from conftest import ROOT
    ns, host_if, ns_if = f"score{os.getpid() % 10000}", f"vs{os.getpid() % 10000}", "eth0"
    subnet = f"10.{200 + os.getpid() % 50}.0"
    sh = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True)  # noqa: E731
    sh("ip", "netns", "add", ns)
    server = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        sh("ip", "addr", "add", f"{subnet}.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{subnet}.2/24", "dev", ns_if)
        sh("ip", "-n", ns, "link", "set", ns_if, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        server = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(ROOT / "tests" / "fake_ollama.py"),
                                   "--host", f"{subnet}.2", "--port", "11434", "--latency", "0.02", "--slots", "2"],
                                  stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().startswith("PORT")
        local = serve(latency=0.05)
        data = write_jsonl(tmp_path / "fns.jsonl", rows(150))
        endpoints = tmp_path / "e.txt"
        endpoints.write_text(f"{subnet}.2 name=remote\n{local.url} name=local\n")
        out = tmp_path / "fns.scores.jsonl"
        proc = start_cli(data, "--endpoints", endpoints, "--no-progress", "--timeout", "3")
        wait_for(lambda: lines_in(out) >= 20, what="first records")
        sh("ip", "link", "set", host_if, "down")            # the cable is pulled
        wait_for(lambda: lines_in(out) >= 60 or proc.poll() is not None, what="records while cut")
        sh("ip", "link", "set", host_if, "up")
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        records = read_records(out)
        assert_complete(records, [r["id"] for r in rows(150)])
        assert all(r["error"] is None for r in records)
        assert {r["endpoint"] for r in records} == {"remote", "local"}
    finally:
        if server is not None:
            server.kill()
            server.communicate()
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.parametrize("trouble, reason", [
    ({"garbage": 1.0}, "not a JSON object"),                          # a model that answers prose to everything
    ({"redirect": 307}, "redirect"),                                  # a proxy sending us elsewhere
    ({"raw_200": "<html><body>Sign in to continue</body></html>"}, "not JSON"),   # a login page
])
def test_endpoint_whose_answers_are_unusable_is_taken_out_and_costs_rows_nothing(tmp_path, serve, trouble, reason):
    healthy = serve(latency=0.02, slots=2, seed=7)
    broken = serve(seed=8, **trouble)                 # answers at once: it would take most rows
    data = write_jsonl(tmp_path / "fns.jsonl", rows(200))
    endpoints = write_endpoints(tmp_path / "e.txt", [healthy, broken])
    result = run_cli(data, "--endpoints", endpoints, "--max-attempts", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert_complete(records, [r["id"] for r in rows(200)])
    assert len(records) == 200 and all(r["attempts"] == 1 for r in records)   # no row paid for e1's answers
    taken_out = [line for line in result.stderr.splitlines() if "e1 taken out" in line]
    assert taken_out and reason in taken_out[0], result.stderr
    assert "e1 was taken out: " in result.stderr                       # and the summary says why
    assert len(broken.chat_bodies()) <= score.UNUSABLE_RUN + 4          # judged within a few answers
    assert "Traceback" not in result.stderr


def test_lone_endpoint_answering_prose_ends_the_run_and_burns_no_row(tmp_path, serve):
    server = serve(garbage=1.0)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(300))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    result = run_cli(data, "--endpoints", endpoints, "--no-progress", timeout=60)
    assert result.returncode == 1, result.stderr
    assert "every endpoint has been taken out" in result.stderr and "none usable" in result.stderr
    assert "not a JSON object" in result.stderr and "Traceback" not in result.stderr
    assert len(server.chat_bodies()) <= score.UNUSABLE_RUN + 4
    assert not out.exists() or read_records(out) == []            # no row was given up on
    server.behaviour.garbage = 0.0                                 # the model is fixed: resume scores everything
    again = run_cli(data, "--endpoints", endpoints, "--resume")
    assert again.returncode == 0, again.stderr
    assert_complete(read_records(out), [r["id"] for r in rows(300)])


def test_flaky_but_productive_endpoint_is_never_marked_down_and_keeps_its_share(tmp_path, serve):
    gpu = serve(latency=0.05, slots=4, fail_500=0.2, seed=9)        # one request in five fails with a 500
    laptops = [serve(latency=0.2, slots=1, seed=10 + i) for i in range(2)]
    data = write_jsonl(tmp_path / "fns.jsonl", rows(400))
    endpoints = write_endpoints(tmp_path / "e.txt", [gpu, *laptops])
    result = run_cli(data, "--endpoints", endpoints, "--max-attempts", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert_complete(records, [r["id"] for r in rows(400)])
    assert gpu.chats - gpu.answered >= 40                           # the faults really happened
    assert "e0 is down" not in result.stderr and "back after" not in result.stderr
    # The box alone does 4 rows at a time in a quarter of a laptop's time for one: it can do about
    # 90% of the fleet's good work, and should score most rows rather than idle between faults.
    share = Counter(r["endpoint"] for r in records)["e0"] / len(records)
    assert share >= 0.7, (share, result.stderr[-2000:])


def test_row_bad_everywhere_is_exhausted_and_no_healthy_endpoint_suffers(tmp_path, serve):
    a = serve(latency=0.01, bad_for="compute_3(", seed=12)
    b = serve(latency=0.01, bad_for="compute_3(", seed=13)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(60))
    endpoints = write_endpoints(tmp_path / "e.txt", [a, b])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 1, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    failed = [r for r in records if r["score"] is None]
    assert [(r["id"], r["error_kind"], r["attempts"]) for r in failed] == [("fn-3", "attempts_exhausted", 3)]
    assert_complete([r for r in records if r["score"] is not None], [f"fn-{i}" for i in range(60) if i != 3])
    assert "taken out" not in result.stderr and "is down" not in result.stderr


def lone_endpoint(tmp_path) -> score.Endpoint:
    endpoints = tmp_path / "e.txt"
    endpoints.write_text("127.0.0.1:9 name=e0\n")
    config = score.parse_args([str(tmp_path / "x.jsonl"), "--endpoints", str(endpoints)])
    return score.Endpoint(config.endpoints[0], config)


def test_plain_faults_on_a_productive_endpoint_take_it_down_only_after_an_unlikely_run(tmp_path):
    endpoint = lone_endpoint(tmp_path)
    endpoint.came_up()
    endpoint.proven = True
    rng = random.Random(1)
    fault = score.EndpointFault("HTTP 500: model runner has unexpectedly stopped")
    for _ in range(300):                              # one request in five fails
        if rng.random() < 0.2:
            assert not endpoint.record_fault(fault, 0.0)
        else:
            endpoint.record_success()
        assert endpoint.health is score.Health.READY and endpoint.can_take(0.0)   # no backoff, no idling
    for _ in range(score.DOWN_AFTER):                 # a run of 3 is common at that rate: still up
        assert not endpoint.record_fault(fault, 0.0)
    downs = [endpoint.record_fault(fault, 0.0) for _ in range(score.FAULT_RUN_CAP)]
    assert any(downs)                                 # a long run is an outage
    steady = lone_endpoint(tmp_path)                  # one that never failed goes down after DOWN_AFTER
    steady.came_up()
    steady.proven = True
    for _ in range(300):
        steady.record_success()
    assert [steady.record_fault(fault, 0.0) for _ in range(score.DOWN_AFTER)] == [False, False, True]


def test_overload_and_unproven_endpoints_still_back_off(tmp_path):
    endpoint = lone_endpoint(tmp_path)
    endpoint.came_up()                                # not proven: no good answer since it came up
    assert not endpoint.record_fault(score.EndpointFault("HTTP 500"), 100.0)
    assert endpoint.health is score.Health.BACKOFF and not endpoint.can_take(100.0)
    busy = lone_endpoint(tmp_path)
    busy.came_up()
    busy.proven = True
    assert not busy.record_fault(score.EndpointFault("HTTP 503", overload=True, retry_after=5), 100.0)
    assert busy.health is score.Health.BACKOFF and not busy.can_take(104.0) and busy.can_take(106.0)


def test_rows_on_a_lone_flaky_endpoint_are_not_mistaken_for_poison(tmp_path, serve):
    server = serve(latency=0.002, slots=4, fail_500=0.3, seed=14)   # a row meets 4 faults by chance, often
    data = write_jsonl(tmp_path / "fns.jsonl", rows(1000))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert sum(r["score"] is not None for r in records) == 1000
    assert server.chats - server.answered >= 300 and "is down" not in result.stderr


def test_row_answered_badly_by_the_fast_endpoint_waits_for_the_slow_one_at_the_end(tmp_path, serve):
    fast = serve(latency=0.001, slots=4, bad_for="compute_59(", seed=15)   # fails this row, in a millisecond
    slow = serve(latency=0.1, slots=1, seed=16)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(60))
    endpoints = write_endpoints(tmp_path / "e.txt", [fast, slow])
    result = run_cli(data, "--endpoints", endpoints, "--no-progress")
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert_complete(records, [r["id"] for r in rows(60)])
    assert scored(records)["fn-59"]["endpoint"] == "e1"
    assert sum("compute_59(" in b["messages"][0]["content"] for b in fast.chat_bodies()) == 1


def test_endpoint_answering_mostly_prose_is_judged_against_the_fleet(tmp_path, serve):
    healthy = serve(latency=0.01, slots=2, seed=17)
    sloppy = serve(latency=0.01, slots=2, garbage=0.7, seed=20)     # some good answers: never "none usable"
    data = write_jsonl(tmp_path / "fns.jsonl", rows(300))
    endpoints = write_endpoints(tmp_path / "e.txt", [healthy, sloppy])
    result = run_cli(data, "--endpoints", endpoints, "--max-attempts", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    assert_complete(records, [r["id"] for r in rows(300)])
    assert all(r["attempts"] == 1 for r in records)
    assert "e1 was taken out: " in result.stderr and "unusable against 0% on the other endpoints" in result.stderr
    assert sloppy.answered - sum(r["endpoint"] == "e1" for r in records) <= 40   # judged within a few dozen


def fleet_run(tmp_path, names=("e0", "e1")):
    """The backlog of a run over idle endpoints with nothing read yet, for checking the dispatch rules directly."""
    endpoints = tmp_path / "e.txt"
    endpoints.write_text("".join(f"127.0.0.1:{9 + i} name={name}\n" for i, name in enumerate(names)))
    config = score.parse_args([str(tmp_path / "x.jsonl"), "--endpoints", str(endpoints)])
    fleet = [score.Endpoint(spec, config) for spec in config.endpoints]
    for endpoint in fleet:
        endpoint.came_up()
    return score.Backlog(fleet, config.hedge)


def row_item(i: int, avoid=None) -> score.Item:
    return score.Item(id=f"fn-{i}", text=f"def f{i}(): pass", fields={}, avoid=avoid)


def test_a_row_answered_badly_waits_for_another_endpoint_but_the_retry_queue_stays_bounded(tmp_path):
    run, now = fleet_run(tmp_path), time.monotonic()
    e0, e1 = run.endpoints
    failed = row_item(0, avoid={"e0"})
    run.retry.append(failed)
    run.fresh.append(row_item(1))
    assert run.take(e0, now).id == "fn-1"             # fresh work first, the failed row waits
    run.closed = True
    assert run.take(e0, now) is None                  # after the input: still left to e1, which has not failed it
    assert run.take(e1, now) is failed
    run.retry.append(failed)
    e1.went_down("asleep", 0.0)
    assert run.take(e0, now) is failed                # nobody else can take it: a preference, not a ban
    e1.came_up()
    run.closed = False
    run.retry.extend(row_item(i, avoid={"e0"}) for i in range(2, 1 + score.RETRY_BOUND))
    run.fresh.extend([row_item(9998), row_item(9999)])
    assert run.take(e0, now).id == "fn-9998"          # below the bound, failed rows still wait
    run.retry.append(row_item(1 + score.RETRY_BOUND, avoid={"e0"}))
    assert run.take(e0, now).id == "fn-2"             # at the bound the oldest waiting row goes first


def test_lone_endpoint_that_starts_answering_prose_stops_the_run_and_leaves_the_rest_for_resume(tmp_path, serve):
    server = serve(latency=0.01, garbage_after=50, seed=14)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(400))
    endpoints = write_endpoints(tmp_path / "e.txt", [server])
    out = tmp_path / "fns.scores.jsonl"
    result = run_cli(data, "--endpoints", endpoints, "--no-progress", timeout=60)
    assert result.returncode == 1, result.stderr
    assert "every endpoint has been taken out" in result.stderr and "none usable" in result.stderr
    assert "Traceback" not in result.stderr and "continue with:" in result.stderr
    assert "--no-progress --resume\n" in result.stderr
    records = read_records(out)
    assert [r for r in records if r["score"] is None] == []        # no row was given up on
    assert 40 <= len(records) <= 50
    assert server.chats <= 50 + score.UNUSABLE_RUN + 10             # judged within a few answers
    server.behaviour.garbage_after = None                          # the model is fixed: resume scores the rest
    again = run_cli(data, "--endpoints", endpoints, "--resume", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert_complete(read_records(out), [r["id"] for r in rows(400)])


def lone_run(config) -> tuple:
    """A fleet of one endpoint, to ask the outcome rules about it."""
    spec = score.EndpointSpec(url="http://127.0.0.1:1", name="a", api="ollama", model=None, concurrency=None,
                              key_env=None, line=1)
    endpoint = score.Endpoint(spec, config)
    fleet = score.Fleet([endpoint], config, {}, None, score.Progress(False, None, 0), score.Wakeup())
    return fleet, endpoint


def suspect(fleet, endpoint) -> bool:
    return score.suspect(score.answers_of(endpoint), *fleet.compare(endpoint))


def unusable_reason(fleet, endpoint) -> str | None:
    return score.unusable_reason(score.answers_of(endpoint), fleet.compare(endpoint)[0])


def test_a_run_of_different_rows_answered_badly_makes_an_endpoint_suspect_then_takes_it_out():
    run, endpoint = lone_run(score.parse_args(["x.jsonl"]))
    endpoint.record_success()
    endpoint.note_answer(True, first=True)
    for n in range(1, score.UNUSABLE_RUN + 1):
        assert unusable_reason(run, endpoint) is None
        endpoint.note_answer(False, first=True, message="not a JSON object")
        endpoint.note_answer(False, first=False, message="not a JSON object")   # a repeat does not lengthen it
        assert suspect(run, endpoint) == (n >= score.SUSPECT_RUN)
    assert "none usable" in unusable_reason(run, endpoint)
    endpoint.note_answer(True, first=True)
    assert not suspect(run, endpoint) and unusable_reason(run, endpoint) is None


def test_one_row_answered_badly_again_and_again_never_takes_a_proven_endpoint_out():
    run, endpoint = lone_run(score.parse_args(["x.jsonl"]))
    endpoint.record_success()
    endpoint.note_answer(False, first=True, message="score 0 outside 1..10")
    for _ in range(3 * score.UNUSABLE_RUN):
        endpoint.note_answer(False, first=False, message="score 0 outside 1..10")
    assert not suspect(run, endpoint) and unusable_reason(run, endpoint) is None
