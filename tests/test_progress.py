"""The live progress line as a user sees it in a terminal: within the width, bar always shown."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import SCORE, rows, wait_for, write_jsonl

BAR = re.compile(r"\d+%\|.{10,}?\| *\d")     # percentage, a bar of at least 10 columns, the count


def refused_urls(n: int) -> list[str]:
    """Distinct loopback URLs where nothing listens (the ports are held together, so none repeats)."""
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in held:
            s.bind(("127.0.0.1", 0))
        return [f"http://127.0.0.1:{s.getsockname()[1]}" for s in held]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_progress_line_fits_100_columns_with_40_endpoints_and_names_the_ones_in_trouble(tmp_path, fleet):
    servers = fleet(37, latency=0.25, slots=1)
    failing = fleet(2, latency=0.01, fail_500=1.0)
    endpoints = tmp_path / "e.txt"
    endpoints.write_text(f"{refused_urls(1)[0]} name=asleep\n"
                         + "".join(f"{s.url} name=laptop-{i:02d}\n" for i, s in enumerate(servers + failing)))
    data = write_jsonl(tmp_path / "fns.jsonl", rows(37 * 12))
    socket_name = f"score-test-{os.getpid()}-{tmp_path.name}"       # unique across pytest sessions too
    command = shlex.join([sys.executable, SCORE, str(data), "--endpoints", str(endpoints)]) + "; echo EXIT=$?"
    tmux = ["tmux", "-L", socket_name]
    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "50", "-s", "run", command], check=True)
    subprocess.run([*tmux, "set-option", "-t", "run", "remain-on-exit", "on"], check=True)
    screens: list[str] = []

    def capture() -> bool:
        screen = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-t", "run"], capture_output=True,
                                text=True).stdout
        if "EXIT=" in screen:
            screens.append(screen)
            return True
        if BAR.search(screen):
            screens.append(screen)
        return False

    try:
        wait_for(capture, timeout=120, what="the run to end")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    assert "EXIT=0" in screens[-1], screens[-1]
    live = [s for s in screens[:-1] if BAR.search(s)]
    assert len(live) >= 3, screens[-1]
    bars = [[line for line in screen.splitlines() if BAR.search(line)][-1] for screen in live]
    for bar in bars:
        assert len(bar) <= 100, bar           # -J joins wrapped lines: a longer line would show here
    summaries = [bar for bar in bars if "busy" in bar and "slots" in bar]
    assert len(summaries) >= 2, bars
    print("\n".join(summaries[-3:]))
    assert all("down: asleep" in bar for bar in summaries), summaries      # the endpoint that never answered
    # the two whose every request fails are named or counted ("+2") once they fail
    assert any(re.search(r"laptop-3[78]|\+[12]$", bar) for bar in summaries), summaries


def test_clip_names_what_fits_and_counts_the_rest():
    import score
    names = ["down: mac7", "mac9", "errors: gpu2", "slow: mac3"]
    assert score.clip(names, 100, " ") == "down: mac7 mac9 errors: gpu2 slow: mac3"
    assert score.clip(names, 24, " ") == "down: mac7 mac9 +2"
    assert score.clip(names, 13, " ") == "down: mac7 +3"
    assert score.clip(names, 12, " ") == "+4"
    assert score.clip(names, 3, " ") == "+4"
    assert score.clip(names, 1, " ") == ""


def tmux_run(tmp_path, command: str) -> tuple[list[str], callable]:
    """Start `command` in a detached 100-column tmux session; return its argv prefix and a screen reader."""
    tmux = ["tmux", "-L", f"score-test-{os.getpid()}-{tmp_path.name}"]
    subprocess.run([*tmux, "new-session", "-d", "-x", "100", "-y", "50", "-s", "run", command], check=True)
    subprocess.run([*tmux, "set-option", "-t", "run", "remain-on-exit", "on"], check=True)
    return tmux, lambda: subprocess.run([*tmux, "capture-pane", "-p", "-J", "-t", "run"], capture_output=True,
                                        text=True).stdout


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (apt-get install tmux)")
def test_paused_line_with_long_names_says_paused_first_keeps_the_bar_and_shows_no_rate(tmp_path, serve):
    names = ["p40-in-the-basement", "macbook-pro-2019-alice", "macbook-pro-2019-bob", "workstation-upstairs"]
    servers = [serve(latency=0.2, slots=1) for _ in names]
    endpoints = tmp_path / "e.txt"
    endpoints.write_text("".join(f"{s.url} name={n}\n" for s, n in zip(servers, names)))
    data = write_jsonl(tmp_path / "fns.jsonl", rows(400))
    tmux, screen = tmux_run(tmp_path, shlex.join([sys.executable, SCORE, str(data), "--endpoints", str(endpoints)]))
    bars: list[str] = []

    def bar_shows(*words: str) -> bool:
        lines = [line for line in screen().splitlines() if BAR.search(line)]
        if lines and all(w in lines[-1] for w in words):
            bars.append(lines[-1])
            return True
        return False

    try:
        wait_for(lambda: bar_shows("/s"), timeout=60, what="a progress line with a rate")
        for s in servers:
            s.go_down()
        wait_for(lambda: bar_shows("PAUSED", " 0.0/s"), timeout=60, what="the paused line with a rate of 0")
    finally:
        print(screen())
        subprocess.run([*tmux, "kill-server"], capture_output=True)
    print("\n".join(bars))
    running, paused = bars[0], bars[-1]
    assert "/s |" in running and " 0.0/s" not in running, running       # a rate while answers come in
    assert len(running) <= 100 and len(paused) <= 100, bars
    assert re.search(r"\d+%\|.{10,}\|", paused), paused           # the bar keeps its minimum width
    status = paused.split("], ", 1)[1]
    assert status.startswith("PAUSED: all endpoints down"), paused


def test_everything_before_the_run_fits_100_columns_on_a_large_fleet_with_long_names(tmp_path, fleet):
    servers = fleet(37, latency=0.01)
    asleep = [f"macbook-pro-2019-engineering-floor-{i}" for i in range(3)]
    endpoints = tmp_path / "e.txt"
    endpoints.write_text("".join(f"{url} name={n}\n" for url, n in zip(refused_urls(len(asleep)), asleep))
                         + "".join(f"{s.url} name=gpu-box-in-the-basement-{i:02d}\n" for i, s in enumerate(servers)))
    data = write_jsonl(tmp_path / "fns.jsonl", rows(80))
    result = subprocess.run([sys.executable, SCORE, str(data), "--endpoints", str(endpoints), "--limit", "80"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    before = result.stderr.split("Scored ")[0].splitlines()
    print(result.stderr)
    assert max(map(len, before)) <= 100, max(before, key=len)
    assert "37 ok: ollama 0.5.1, qwen2.5-coder:7b a80c4f17acd5" in before
    shown = [line for line in before if line.startswith("macbook-pro")]
    assert len(shown) == 3 and all("127.0.0.1:" in line for line in shown), before   # the ones not ok, in full
    assert not any(line.startswith("gpu-box") for line in before)
    assert sum("not answering" in line for line in before) == 3
    assert max(map(len, result.stderr.splitlines())) <= 100                         # the summary too


def test_no_endpoint_answers_lists_a_large_fleet_within_100_columns(tmp_path):
    endpoints = tmp_path / "e.txt"
    endpoints.write_text("".join(f"{url} name=macbook-pro-2019-engineering-{i:02d}\n"
                                 for i, url in enumerate(refused_urls(40))))
    data = write_jsonl(tmp_path / "fns.jsonl", rows(5))
    result = subprocess.run([sys.executable, SCORE, str(data), "--endpoints", str(endpoints),
                             "--startup-timeout", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    print(result.stderr)
    lines = result.stderr.splitlines()
    assert max(map(len, lines)) <= 100, max(lines, key=len)
    assert any(re.match(r"  40 endpoints: .*refused", line) for line in lines), lines
    assert any("macbook-pro-2019-engineering-00" in line and re.search(r"\+\d+$", line) for line in lines), lines


def test_long_names_are_cut_in_the_middle_and_stay_apart():
    import score
    assert score.short_name("macbook-pro-2019-alice") == "macbook-pro-2019-alice"       # 22 fit as they are
    alice, bob = (score.short_name(f"macbook-pro-2019-engineering-{n}", 20) for n in ("alice", "bob"))
    assert len(alice) == len(bob) == 20 and alice != bob and "…" in alice
    assert alice.startswith("macbook-") and alice.endswith("-alice") and bob.endswith("-bob")
