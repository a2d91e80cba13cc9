"""The outcome and dispatch policies as pure rules: plain values in, a decision out, on synthetic fleets."""

from __future__ import annotations

import score
from score import (Act, Answers, ContextOverflow, EndpointFault, ItemFault, blames_row, cut_to, fleet_share,
                   judge_attempts, judge_bad_answer, judge_fault, judge_overflow, suspect, unusable_reason)

NOW = 1000.0
BAD = ItemFault("score 0 outside 1..10")
PROSE = EndpointFault("not a JSON object", unusable=True)


def trusted(**counts) -> Answers:
    """An endpoint that has answered well: 40 first answers, none of them unusable unless told."""
    return Answers(**{"good": 40, "first_seen": 40.0, **counts})


def others(share: float, seen: float = 100.0) -> float | None:
    """The rest of the fleet's share of unusable answers, from endpoints that gave `seen` first answers between them."""
    half = seen / 2
    return fleet_share([Answers(20, first_seen=half, first_bad=half * share)] * 2)


# ── unusable answers: the endpoint's fault or the row's

def test_a_bad_answer_from_a_trusted_endpoint_costs_the_row_an_attempt():
    verdict = judge_bad_answer(BAD, trusted(), others(0.0), True, again=False)
    assert verdict == score.Verdict(Act.CHARGE, "bad_answer", "score 0 outside 1..10")


def test_an_answer_of_the_wrong_shape_is_never_the_rows_fault():
    assert judge_bad_answer(PROSE, trusted(), others(0.0), True, again=True).act is Act.RESEND


def test_an_endpoint_that_never_answered_well_costs_the_row_nothing_and_is_out_after_a_run_of_bad_answers():
    fresh = Answers(0, bad_run=score.UNUSABLE_RUN - 1, bad_rows=1, last_bad="prose")
    assert judge_bad_answer(BAD, fresh, None, False, again=False).act is Act.RESEND
    out = judge_bad_answer(BAD, Answers(0, bad_run=score.UNUSABLE_RUN, last_bad="prose"), None, False, again=False)
    assert out.act is Act.RETIRE and out.message == f"{score.UNUSABLE_RUN} answers in a row, none usable (last: prose)"


def test_a_lone_endpoint_is_judged_on_its_own():
    # No other endpoint to compare with: its bad answers are the rows' until a run of different rows says otherwise.
    assert not suspect(trusted(first_bad=30.0), None, False)
    assert judge_bad_answer(BAD, trusted(first_bad=30.0), None, False, again=False).act is Act.CHARGE
    assert suspect(trusted(), None, True)            # others there but not yet measured: benefit of the doubt
    assert suspect(trusted(bad_rows=score.SUSPECT_RUN), None, False)
    gone_bad = trusted(bad_rows=score.UNUSABLE_RUN, last_bad="x" * 300)
    reason = unusable_reason(gone_bad, None)
    assert reason == f"{score.UNUSABLE_RUN} rows in a row answered, none usable (last: {'x' * 160})"


def test_a_suspect_endpoint_charges_a_row_only_when_it_answered_that_row_badly_before():
    shaky = trusted(bad_rows=score.SUSPECT_RUN)
    assert judge_bad_answer(BAD, shaky, others(0.0), True, again=False).act is Act.RESEND
    assert judge_bad_answer(BAD, shaky, others(0.0), True, again=True).act is Act.CHARGE


def test_one_bad_endpoint_of_many_is_taken_out_once_it_has_given_enough_bad_answers():
    fleet = others(0.02)
    assert fleet == 0.02
    bad = trusted(first_seen=20.0, first_bad=16.0, last_bad="prose")
    assert score.worse_than_fleet(bad, fleet) == (0.8, 0.02)
    assert suspect(bad, fleet, True)
    verdict = judge_bad_answer(BAD, bad, fleet, True, again=False)
    assert verdict.act is Act.RETIRE
    assert verdict.message == "80% of its answers unusable against 2% on the other endpoints (last: prose)"
    early = trusted(first_seen=score.JUDGE_MIN - 1.0, first_bad=score.JUDGE_MIN - 1.0)     # too few to judge yet
    assert unusable_reason(early, fleet) is None and suspect(early, fleet, True)
    assert judge_bad_answer(BAD, early, fleet, True, again=False).act is Act.RESEND


def test_when_the_whole_fleet_answers_badly_the_rows_are_to_blame():
    fleet = others(0.5)
    mine = trusted(first_seen=20.0, first_bad=12.0)              # 60%: bad, but not far above the rest's 50%
    assert score.worse_than_fleet(mine, fleet) is None and not suspect(mine, fleet, True)
    assert unusable_reason(mine, fleet) is None
    assert judge_bad_answer(BAD, mine, fleet, True, again=False).act is Act.CHARGE


def test_the_fleet_is_compared_with_only_once_it_has_answered_enough():
    assert fleet_share([Answers(5, first_seen=score.JUDGE_SEEN - 0.5, first_bad=3.0)]) is None
    assert fleet_share([Answers(5, first_seen=score.JUDGE_SEEN, first_bad=5.0)]) == 5.0 / score.JUDGE_SEEN
    assert fleet_share([]) is None


# ── endpoint faults, context overflows and attempts

def test_only_an_endpoint_that_works_for_other_rows_can_blame_a_row_for_a_fault():
    fault = EndpointFault("500 Internal Server Error")
    assert blames_row(fault, proven=True, row_faults=0, answered=0)
    assert not blames_row(fault, proven=False, row_faults=0, answered=50)
    assert blames_row(fault, proven=False, row_faults=1, answered=50)        # the row already broke another one
    assert not blames_row(fault, proven=False, row_faults=1, answered=0)
    assert not blames_row(EndpointFault("connection refused", connect=True, item_related=False), True, 5, 50)


def test_a_row_that_keeps_breaking_servers_is_charged_and_spares_their_health():
    fault = EndpointFault("500 Internal Server Error")
    many = score.POISON_FAULTS + 1
    verdict = judge_fault(fault, many, failed_on=2, by_chance=score.DOWN_AFTER, live=5)
    assert verdict == score.Verdict(Act.CHARGE, "poison", f"endpoints failed on this item {many} times "
                                                          f"(last: 500 Internal Server Error)")
    assert judge_fault(fault, many - 1, 2, score.DOWN_AFTER, 5).act is Act.RESEND
    assert judge_fault(fault, many, 1, score.DOWN_AFTER, 5).act is Act.RESEND      # one server: maybe the server
    assert judge_fault(fault, many, 1, score.DOWN_AFTER, 1).act is Act.CHARGE      # ... unless it is the only one
    assert judge_fault(fault, many, 2, many, 5).act is Act.RESEND                  # a flaky server meets that by chance
    assert judge_fault(EndpointFault("timeout", item_related=False), 9, 3, 3, 5).act is Act.RESEND


def test_a_prompt_too_long_is_cut_then_charged_and_given_up_at_once_when_no_cut_can_fit():
    overflow = ContextOverflow("prompt is 9000 tokens, context is 4096", requested=9000, limit=4096)
    assert judge_overflow(overflow, 1).act is Act.SHRINK
    assert judge_overflow(overflow, score.MAX_SHRINKS).act is Act.SHRINK
    assert judge_overflow(overflow, score.MAX_SHRINKS + 1) == score.Verdict(
        Act.CHARGE, "too_long", f"prompt still too long after {score.MAX_SHRINKS} cuts: {overflow}")
    hopeless = ContextOverflow("the instructions alone fill --num-ctx", None, None, hopeless=True)
    assert judge_overflow(hopeless, 0) == score.Verdict(Act.WRITE, "too_long", str(hopeless))
    fits = (4096 - score.NUM_PREDICT - score.CONTEXT_MARGIN) / 9000
    assert cut_to(10_000, overflow) == int(10_000 * fits)
    assert cut_to(10_000, ContextOverflow("too long", None, None)) == 5_000             # nothing to go by: half
    assert cut_to(10_000, ContextOverflow("too long", 100_000, 4096)) == 1_000          # never below a tenth
    assert cut_to(10_000, ContextOverflow("too long", 4100, 4096)) == 9_000             # always at least a tenth off


def test_a_row_is_given_up_when_its_attempts_run_out_with_one_kind_for_every_bad_answer_end():
    assert judge_attempts(2, 3, "bad_answer", "e0: prose").act is Act.RESEND
    assert judge_attempts(3, 3, "bad_answer", "e0: prose") == score.Verdict(
        Act.WRITE, "attempts_exhausted", "3 attempts; last: e0: prose")
    assert judge_attempts(3, 3, "rejected", "e0: 400").kind == "attempts_exhausted"
    assert judge_attempts(1, 1, "poison", "e0: 500").kind == "poison"
    assert judge_attempts(1, 1, "too_long", "e0: too long").kind == "too_long"


# ── the backlog: which waiting row an endpoint takes, on synthetic fleets with an injected clock

CONFIG = score.parse_args(["x.jsonl"])


def endpoint(name: str, service: float | None = 1.0, limit: int = 1, proven: bool = True) -> score.Endpoint:
    """A ready endpoint that serves `limit` rows at once in `service` seconds each."""
    spec = score.EndpointSpec(url="http://127.0.0.1:9", name=name, api="ollama", model=None, concurrency=limit,
                              key_env=None, line=1)
    e = score.Endpoint(spec, CONFIG)
    e.came_up()
    e.limiter.service, e.proven = service, proven
    return e


def row(i: int, **state) -> score.Item:
    return score.Item(id=i, text=f"def f{i}(): pass", fields={}, **state)


def backlog(*endpoints: score.Endpoint, closed: bool = False, hedge: bool = True) -> tuple[score.Backlog, list]:
    """A backlog over these endpoints, and the list its end-of-input wake-ups land in."""
    woken: list[float] = []
    queue = score.Backlog(list(endpoints), hedge, woken.append)
    queue.closed = closed
    return queue, woken


def test_an_endpoint_takes_fresh_rows_in_order_up_to_its_limit_and_not_while_backing_off():
    e0 = endpoint("e0", limit=2)
    queue, _ = backlog(e0)
    first, second, third = row(1), row(2), row(3)
    queue.fresh.extend([first, second, third])
    assert queue.take(e0, NOW) is first
    e0.inflight[first] = NOW
    assert queue.take(e0, NOW) is second
    e0.inflight[second] = NOW
    assert queue.take(e0, NOW) is None                       # at its limit
    e0.inflight.clear()
    e0.backed_off(NOW + 5)
    assert queue.take(e0, NOW) is None
    assert queue.take(e0, NOW + 5) is third                  # the back-off is over
    assert queue.take(e0, NOW + 5) is None and e0.limiter.starved


def test_a_retry_goes_first_but_a_suspected_row_waits_for_a_proven_endpoint():
    new = endpoint("new", proven=False)
    queue, _ = backlog(new, endpoint("old"))
    suspected, fresh = row(1, faults=1), row(2)
    queue.retry.append(suspected)
    queue.fresh.append(fresh)
    assert queue.take(new, NOW) is fresh                     # an endpoint just back proves itself on others first
    assert queue.take(new, NOW) is suspected                 # ... unless nothing else is left
    resent = row(3)
    queue.retry.append(resent)
    queue.fresh.append(row(4))
    assert queue.take(new, NOW) is resent


def test_a_row_that_faulted_here_goes_elsewhere_while_fresh_rows_remain():
    e0, e1 = endpoint("e0"), endpoint("e1")
    queue, _ = backlog(e0, e1)
    faulted, fresh = row(1, faults=1, fault_endpoints={"e0"}), row(2)
    queue.retry.append(faulted)
    queue.fresh.append(fresh)
    assert queue.take(e0, NOW) is fresh
    assert queue.take(e0, NOW) is faulted                    # no fresh rows left: a fault here is no reason to wait
    queue.retry.append(faulted)
    queue.fresh.append(row(3))
    e1.went_down("asleep", NOW)
    assert queue.take(e0, NOW) is faulted                    # nobody else can take it


def test_after_the_input_a_slow_endpoint_leaves_the_last_row_to_a_faster_one_and_wakes_it():
    fast, slow = endpoint("fast", service=1.0), endpoint("slow", service=5.0)
    queue, woken = backlog(fast, slow, closed=True, hedge=False)
    last = row(1)
    queue.fresh.append(last)
    assert queue.queued() == 1
    assert queue.take(slow, NOW) is None
    assert woken == [5.0]                                    # idle endpoints faster than the slow one's 5 s
    assert queue.take(fast, NOW) is last
    fast.inflight = {row(9): NOW - 0.5, row(10): NOW - 0.5}  # the fast one is busy for a while: the slow one is needed
    queue.fresh.extend(row(i) for i in range(2, 9))
    assert queue.take(slow, NOW) is not None


def test_a_row_the_faster_endpoint_answered_badly_goes_to_the_slower_one_after_the_input():
    fast, slow = endpoint("fast", service=1.0), endpoint("slow", service=10.0)
    queue, _ = backlog(fast, slow, closed=True, hedge=False)
    failed = row(1, avoid={"fast"})
    queue.retry.append(failed)
    assert queue.take(slow, NOW) is failed
    assert not queue.retry


def test_an_idle_fast_endpoint_races_a_row_stuck_on_a_slow_one_once():
    fast, slow = endpoint("fast", service=1.0), endpoint("slow", service=10.0)
    queue, _ = backlog(fast, slow, closed=True)
    stuck = row(1)
    stuck.tasks[slow] = None
    slow.inflight[stuck] = NOW - 1.0                         # nine seconds to go on the slow one
    assert queue.take(fast, NOW) is stuck
    assert stuck.hedged and stuck.racer is fast
    assert queue.take(fast, NOW) is None                     # raced once only


def test_a_copy_about_to_finish_or_answered_badly_by_the_racer_is_not_raced():
    fast, slow = endpoint("fast", service=1.0), endpoint("slow", service=10.0)
    queue, _ = backlog(fast, slow, closed=True)
    nearly = row(1)
    slow.inflight[nearly] = NOW - 9.0                        # one second to go: racing would not win
    assert queue.take(fast, NOW) is None
    assert queue.take(fast, NOW - 8.0) is nearly             # the same copy seen earlier, eight seconds to go
    failed = row(2, avoid={"fast"})
    slow.inflight = {failed: NOW - 1.0}
    assert queue.take(fast, NOW) is None
    queue.hedge = False
    slow.inflight = {row(3): NOW - 1.0}
    assert queue.take(fast, NOW) is None                     # racing is off


def test_a_row_knows_which_endpoints_answered_it_badly():
    assert not row(1).answered_badly_by("e0")
    marked = row(2, avoid={"e0"})
    assert marked.answered_badly_by("e0") and not marked.answered_badly_by("e1")
