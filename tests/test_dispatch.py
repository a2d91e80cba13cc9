"""The dispatch rules as pure functions on synthetic fleets, and wide fleets end to end."""

from __future__ import annotations

import math
import time
from collections import Counter

import score
from conftest import read_records, rows, run_cli, write_endpoints, write_jsonl
from score import Lane, race_target, takes_queued_row

NOW = 1000.0


def busy(service: float, slots: int = 1, inflight: int = 1, ran: float = 0.0) -> Lane:
    """A ready lane whose oldest request has run `ran` seconds."""
    return Lane(True, service, slots, inflight, NOW - ran if inflight else None)


def idle(service: float | None, slots: int = 1) -> Lane:
    return Lane(True, service, slots, 0, None)


# ── end of input: who takes the last rows

def test_an_equal_endpoint_takes_a_last_row_while_the_others_are_busy():
    others = [busy(1.0, ran=0.1 + i / 40) for i in range(31)]
    assert takes_queued_row(idle(1.0), iter(others), 1, NOW)
    assert takes_queued_row(idle(1.0), iter(others), 31, NOW)


def test_equal_idle_endpoints_do_not_leave_a_row_to_each_other():
    # A tie is not "sooner": each of two identical idle endpoints may take it, so one does.
    assert takes_queued_row(idle(1.0), iter([idle(1.0)]), 1, NOW)


def test_a_slightly_faster_idle_endpoint_is_left_the_row():
    assert not takes_queued_row(idle(1.0), iter([idle(0.98)]), 1, NOW)
    assert takes_queued_row(idle(1.0), iter([idle(0.98)]), 2, NOW)


def test_a_machine_20x_slower_leaves_the_last_rows_to_a_faster_one():
    fast = busy(0.1, ran=0.05)
    assert not takes_queued_row(idle(2.0), iter([fast]), 10, NOW)      # the fast one clears 10 in ~1 s
    assert takes_queued_row(idle(2.0), iter([fast]), 30, NOW)          # but not 30 within 2 s


def test_what_an_endpoint_already_has_in_flight_counts():
    # A fast endpoint with 30 rows queued on it finishes a new one after ~3 s: later than a free 1 s one.
    swamped = busy(0.1, inflight=30, ran=0.05)
    assert takes_queued_row(idle(1.0), iter([swamped]), 1, NOW)
    assert not takes_queued_row(idle(1.0), iter([busy(0.1, ran=0.05)]), 1, NOW)


def test_the_rate_is_slots_over_service_time():
    gpu = busy(0.5, slots=4, inflight=4)      # finishes new rows at 0.625, 0.75, 0.875 s, then 1.0 s
    assert not takes_queued_row(idle(1.0), iter([gpu]), 3, NOW)
    assert takes_queued_row(idle(1.0), iter([gpu]), 4, NOW)


def test_the_clock_counts_what_a_running_request_already_did():
    # One slot, 1 s per row: a new row there finishes at 2 s minus what its current request already ran.
    assert not takes_queued_row(idle(1.2), iter([busy(1.0, ran=0.9)]), 1, NOW)    # 1.1 s < 1.2 s
    assert takes_queued_row(idle(1.2), iter([busy(1.0, ran=0.1)]), 1, NOW)        # 1.9 s > 1.2 s


def test_unmeasured_down_and_stalled_endpoints_are_not_counted_on():
    down = Lane(False, 0.1, 1, 0, None)
    stalled = busy(0.1, ran=5.0)                       # 50 service times on one request
    for other in (down, idle(None), stalled):
        assert takes_queued_row(idle(2.0), iter([other]), 1, NOW)
    assert takes_queued_row(idle(None), iter([idle(0.01)]), 1, NOW)    # not yet measured: it takes one


def test_an_endpoint_with_rows_queued_on_it_takes_no_more_when_others_finish_sooner():
    me = busy(1.0, inflight=1, ran=0.5)         # a second row here would finish at 1.5 s
    others = [busy(1.0, ran=0.8) for _ in range(3)]   # each finishes a new row at 1.2 s
    assert not takes_queued_row(me, iter(others), 3, NOW)
    assert takes_queued_row(me, iter(others), 4, NOW)


def simulate_tail(services: list[float], rows: int) -> tuple[float, Counter]:
    """Run the end-of-input rule on a fleet of single-slot endpoints: return the makespan and who did what."""
    now, queued, free_at = 0.0, rows, [0.0] * len(services)
    inflight: list[float | None] = [None] * len(services)     # start time of the running row
    done: Counter = Counter()
    while queued or any(s is not None for s in inflight):
        for i, service in enumerate(services):                 # completions due now
            if inflight[i] is not None and free_at[i] <= now + 1e-9:
                inflight[i] = None
                done[i] += 1
        for i, service in enumerate(services):                 # free endpoints decide
            if inflight[i] is None and queued:
                me = Lane(True, service, 1, 0, None)
                others = (Lane(True, s, 1, int(inflight[j] is not None), inflight[j])
                          for j, s in enumerate(services) if j != i)
                if takes_queued_row(me, others, queued, now):
                    inflight[i], free_at[i], queued = now, now + service, queued - 1
        pending = [free_at[i] for i in range(len(services)) if inflight[i] is not None]
        if not pending:
            break
        now = min(pending)
    return now, done


def test_simulated_equal_fleet_shares_rows_evenly_to_the_last():
    makespan, done = simulate_tail([1.0 + i * 1e-3 for i in range(32)], 600)
    assert max(done.values()) - min(done.values()) <= 1
    assert makespan <= math.ceil(600 / 32) * 1.04


def test_simulated_mixed_fleet_leaves_the_tail_to_the_fast_machine():
    makespan, done = simulate_tail([0.1, 2.0, 2.0], 40)
    assert sum(done.values()) == 40
    assert makespan <= 40 / (10 + 0.5 + 0.5) + 0.3         # within a fast row or so of the ideal


# ── racing

def test_nothing_is_raced_by_an_unmeasured_endpoint():
    assert race_target(None, iter([("a", idle(None), NOW, 1)]), NOW) is None


def test_a_copy_on_a_much_slower_endpoint_is_raced_and_an_equal_one_is_not():
    slow = busy(2.0, ran=0.1)
    equal = busy(0.1, ran=0.01)
    assert race_target(0.1, iter([("slow", slow, NOW - 0.1, 1)]), NOW) == "slow"
    assert race_target(0.1, iter([("equal", equal, NOW - 0.01, 1)]), NOW) is None
    nearly_done = busy(2.0, ran=1.9)       # 0.1 s left: racing it cannot win
    assert race_target(0.1, iter([("late", nearly_done, NOW - 1.9, 1)]), NOW) is None


def test_copies_on_down_unmeasured_or_stalled_endpoints_are_raced_longest_first():
    down = Lane(False, 0.5, 1, 1, NOW - 0.1)
    stalled = busy(0.5, ran=10.0)
    slow = busy(4.0, ran=0.5)
    copies = [("slow", slow, NOW - 0.5, 1), ("down", down, NOW - 0.1, 1)]
    assert race_target(0.1, iter(copies), NOW) == "down"
    assert race_target(0.1, iter([("stalled", stalled, NOW - 10.0, 1)]), NOW) == "stalled"
    assert race_target(0.1, iter([("new", idle(None), NOW, 1)]), NOW) == "new"


def test_a_copy_queued_behind_others_on_its_server_counts_its_wait():
    # Two rows on a one-slot 1 s server: the second one needs ~1.9 s more, the first only 0.9 s.
    lane = busy(1.0, inflight=2, ran=0.1)
    assert race_target(0.6, iter([("first", lane, NOW - 0.1, 1)]), NOW) is None
    assert race_target(0.6, iter([("second", lane, NOW - 0.05, 2)]), NOW) == "second"


# ── wide fleets end to end

def tail_share(records: list[dict], n: int) -> Counter:
    """Who scored the last n rows to finish."""
    return Counter(r["endpoint"] for r in sorted(records, key=lambda r: r["ts"])[-n:])


def test_an_equal_fleet_of_32_shares_the_last_rows_evenly(tmp_path, fleet):
    servers = fleet(32, latency=0.4, slots=1)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(32 * 6))
    endpoints = write_endpoints(tmp_path / "e.txt", servers)
    result = run_cli(data, "--endpoints", endpoints, "--no-progress", timeout=180)
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    share = Counter(r["endpoint"] for r in records)
    assert len(records) == 32 * 6 and len(share) == 32
    assert max(share.values()) <= 6 + 2, share              # one endpoint used to take dozens
    assert max(tail_share(records, 32).values()) <= 3, tail_share(records, 32)


def test_a_mixed_fleet_keeps_laptops_busy_to_the_end_and_leaves_the_tail_to_the_gpu(tmp_path, fleet):
    # Service times long beside a loaded machine's scheduling jitter, so only the rule decides who gets a row.
    gpu = fleet(1, latency=0.5, slots=8)[0]
    laptops = fleet(31, latency=2.0, slots=1)
    data = write_jsonl(tmp_path / "fns.jsonl", rows(250))
    endpoints = tmp_path / "e.txt"
    endpoints.write_text(f"{gpu.url} name=gpu\n" + "".join(f"{s.url} name=lap{i}\n" for i, s in enumerate(laptops)))
    result = run_cli(data, "--endpoints", endpoints, "--no-progress", timeout=300)
    assert result.returncode == 0, result.stderr
    records = read_records(tmp_path / "fns.scores.jsonl")
    share = Counter(r["endpoint"] for r in records)
    assert len(records) == 250
    laptop_rows = sorted(share[f"lap{i}"] for i in range(31))
    assert laptop_rows[-1] - laptop_rows[0] <= 1, laptop_rows          # no laptop hoards the last rows
    last_laptop = max(r["ts"] for r in records if r["endpoint"] != "gpu")
    after = sum(r["ts"] > last_laptop for r in records)
    assert after <= 16, after      # laptops idle while the GPU works alone: at most two of its rounds


def fleet_run(n: int) -> tuple[score.Backlog, list[score.Endpoint]]:
    """The backlog of a run over n endpoints with its input read to the end, to ask its dispatch rules."""
    config = score.parse_args(["x.jsonl"])
    endpoints = [score.Endpoint(score.EndpointSpec(url=f"http://127.0.0.1:{9 + i}", name=f"e{i}", api="ollama",
                                                   model=None, concurrency=None, key_env=None, line=i + 1), config)
                 for i in range(n)]
    backlog = score.Backlog(endpoints, config.hedge)
    backlog.closed = True
    return backlog, endpoints


def item(i: int, **state) -> score.Item:
    return score.Item(id=i, text=f"def f{i}(): pass", fields={}, **state)


def test_retries_finished_or_in_flight_elsewhere_neither_count_as_queued_nor_stay_queued():
    run, (fast, slow) = fleet_run(2)
    for endpoint, service in ((fast, 1.0), (slow, 3.5)):
        endpoint.came_up()
        endpoint.limiter.service = service
    fast.inflight = {item(100): time.monotonic()}           # the fast machine has just started one row
    done = [item(i, finished=True) for i in range(5)]       # raced copies finished these meanwhile
    running = item(5, tasks={fast: None})                   # a copy of this one is running on the fast machine
    waiting = item(6)
    run.retry.extend([*done, running, waiting])
    assert run.queued() == 1
    picked = run.take(slow, time.monotonic())
    # one row left: the fast machine finishes it sooner, so the slow one leaves it; with seven rows
    # really queued it would take one, as the fast machine can do only two before the slow one's first
    assert score.takes_queued_row(score.lane_of(slow), iter([score.lane_of(fast)]), 7, time.monotonic())
    assert picked is None, picked
    assert list(run.retry) == [running, waiting]            # finished rows are gone from the queue
