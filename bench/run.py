"""Benchmark score.py as a user runs it, against simulated endpoints on loopback.

    python bench/run.py            # all scenarios, ~17 min on 2 cores; writes BENCHMARKS.md
    python bench/run.py --quick    # smaller jobs, for a smoke run
    python bench/run.py --only tail,dedup

Every figure is a ratio of two things measured in the same run, because the
machine is shared and noisy. The simulated endpoint (tests/fake_ollama.py) has k
parallel slots, service time that grows with prompt length, and processor-shared
batching whose throughput rises sub-linearly with requests in flight up to a peak
and then degrades, as real GPUs do.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fake_ollama import Behaviour, FakeFleet, FakeOllama  # noqa: E402

OUT = ROOT / "bench" / "out"
SCORE = ROOT / "score.py"

# One 4-slot GPU box whose throughput peaks at 4 in flight, and laptops 3x slower with one slot.
GPU = dict(latency=0.03, per_char=0.00001, slots=8, alpha=0.9, peak=4, beta=1.0)
LAPTOP = dict(latency=0.09, per_char=0.00003, slots=1)


def functions(n: int, seed: int = 1, dup_share: float = 0.0) -> list[dict]:
    """Synthetic functions of varied length (prompt length drives service time)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if dup_share and i and rng.random() < dup_share:
            out.append({"id": i, "code": out[rng.randrange(len(out))]["code"]})
            continue
        body = "".join(f"    v{j} = values[{j}] * {rng.randint(1, 99)}\n" for j in range(rng.randint(3, 60)))
        out.append({"id": i, "code": f"def f_{i}(values):\n    \"\"\"Compute {i}.\"\"\"\n{body}    return v0\n"})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_score(data: Path, servers: list[tuple[str, FakeOllama, str]], tag: str, *extra: str) -> dict:
    """Run score.py on data against servers [(name, server, options)]; return timing figures."""
    endpoints = OUT / f"{tag}.endpoints.txt"
    endpoints.write_text("".join(f"{s.url} name={name} {opts}\n" for name, s, opts in servers))
    output = OUT / f"{tag}.scores.jsonl"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _, s, _ in servers:
        s.first_chat_at = None
    started = time.time()
    proc = subprocess.run([sys.executable, str(SCORE), str(data), "--endpoints", str(endpoints), "-o", str(output),
                           "--overwrite", "--no-progress", "--no-calibration", *extra], capture_output=True, text=True)
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{tag}: score.py exited {proc.returncode}\n{proc.stderr}")
    records = [json.loads(line) for line in output.read_text().splitlines()]
    stamps = sorted(r["ts"] for r in records)
    firsts = [s.first_chat_at for _, s, _ in servers if s.first_chat_at]
    start = min(firsts) if firsts else started
    lo, hi = stamps[len(stamps) // 10], stamps[len(stamps) * 9 // 10]
    steady = (len(stamps) * 8 // 10) / max(1e-9, hi - lo)
    return {"items": len(records), "steady": steady, "makespan": stamps[-1] - start, "wall": ended - started,
            "cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
            "stderr": proc.stderr, "records": records}


def serve(**behaviour) -> FakeOllama:
    server = FakeOllama(Behaviour(**behaviour)).start()
    server.first_chat_at = None
    original = server._chat

    async def chat(body, reader, openai):        # note when the first scoring request arrives
        if body.get("messages") and server.first_chat_at is None:
            server.first_chat_at = time.time()
        return await original(body, reader, openai)

    server._chat = chat
    return server


def run_fleet(data: Path, specs: list[tuple[str, dict, str]], tag: str, *extra: str) -> dict:
    """Start fresh simulated endpoints [(name, behaviour, endpoint options)], run score.py, stop them."""
    fleet = [(name, serve(**params), opts) for name, params, opts in specs]
    try:
        return run_score(data, fleet, tag, *extra)
    finally:
        for _, server, _ in fleet:
            server.stop()


def best_fixed(data: Path, params: dict, limits: list[int], tag: str) -> tuple[int, float, dict[int, float]]:
    """Measure one endpoint's steady rate at each fixed concurrency; return the best."""
    rates = {}
    for limit in limits:
        rates[limit] = run_fleet(data, [("solo", params, f"concurrency={limit}")], f"{tag}-c{limit}",
                                 "--no-hedge")["steady"]
    best = max(rates, key=rates.get)
    return best, rates[best], rates


def scenario_efficiency(n: int) -> dict:
    data = write_jsonl(OUT / "eff.jsonl", functions(n, seed=2))
    probe = write_jsonl(OUT / "eff-probe.jsonl", functions(max(120, n // 5), seed=3))
    gpu_best, gpu_rate, gpu_rates = best_fixed(probe, GPU, [2, 3, 4, 5, 6], "cap-gpu")
    lap_best, lap_rate, _ = best_fixed(probe, LAPTOP, [1, 2], "cap-laptop")
    capacity = gpu_rate + 2 * lap_rate
    results = {}
    for label, extra, opts in (("score.py defaults", [], ""),
                               ("one worker per endpoint (seed shape)", ["--no-hedge"], "concurrency=1")):
        results[label] = run_fleet(data, [("gpu", GPU, opts), ("mac1", LAPTOP, opts), ("mac2", LAPTOP, opts)],
                                   "eff-" + label.split()[0], *extra)
    # static even split: each machine scores a third on its own, at its best fixed concurrency
    rows = functions(n, seed=2)
    thirds = [rows[i::3] for i in range(3)]
    procs, started = [], time.time()
    for i, (params, limit) in enumerate(((GPU, gpu_best), (LAPTOP, lap_best), (LAPTOP, lap_best))):
        server = serve(**params)
        part = write_jsonl(OUT / f"split{i}.jsonl", thirds[i])
        (OUT / f"split{i}.txt").write_text(f"{server.url} name=m{i} concurrency={limit}\n")
        procs.append((server, subprocess.Popen([sys.executable, str(SCORE), str(part), "--endpoints",
                                                str(OUT / f"split{i}.txt"), "-o", str(OUT / f"split{i}.out"),
                                                "--overwrite", "--no-progress", "--no-hedge"],
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    for server, proc in procs:
        proc.wait()
        server.stop()
    split_rate = n / (time.time() - started)
    auto = results["score.py defaults"]
    seed_shape = results["one worker per endpoint (seed shape)"]
    return {
        "capacity": capacity, "gpu_rates": gpu_rates, "laptop_rate": lap_rate,
        "efficiency": auto["steady"] / capacity, "auto_rate": auto["steady"],
        "job_rate": n / auto["makespan"], "seed_rate": n / seed_shape["makespan"], "split_rate": split_rate,
    }


def scenario_auto(n: int) -> dict:
    params = dict(latency=0.04, per_char=0.00001, slots=8, alpha=0.9, peak=4, beta=1.0)
    data = write_jsonl(OUT / "auto.jsonl", functions(n, seed=4))
    best, best_rate, rates = best_fixed(data, params, [1, 2, 3, 4, 5, 6, 8], "auto-fixed")
    auto = run_fleet(data, [("solo", params, "")], "auto-auto", "--no-hedge")
    limit_line = [line for line in auto["stderr"].splitlines() if line.startswith("solo")]
    return {"rates": rates, "best": best, "auto": auto["steady"], "ratio": auto["steady"] / best_rate,
            "vs_c1": auto["steady"] / rates[1], "final_limit": limit_line[-1].split()[-2] if limit_line else "?"}


def scenario_tail() -> dict:
    """A small job on one fast endpoint and two 20x slower: makespan against the ideal."""
    data = write_jsonl(OUT / "tail.jsonl", functions(40, seed=5))
    fast = dict(latency=0.1, slots=1)
    slow = dict(latency=2.0, slots=1)
    # capacity as measured here: each endpoint alone, at its best (1 slot: concurrency 1)
    fast_rate = 40 / run_fleet(data, [("fast", fast, "concurrency=1")], "tail-cap-fast", "--no-hedge")["makespan"]
    few = write_jsonl(OUT / "tail-few.jsonl", functions(3, seed=9))
    slow_rate = 3 / run_fleet(few, [("slow", slow, "concurrency=1")], "tail-cap-slow", "--no-hedge")["makespan"]
    capacity = fast_rate + 2 * slow_rate
    out = {"capacity": capacity}
    sleepy = dict(latency=30.0)       # a laptop that sleeps mid-request
    cases = (("racing", slow, capacity, []), ("no racing", slow, capacity, ["--no-hedge"]),
             ("stall, racing", sleepy, fast_rate + slow_rate + 1 / 30, []),
             ("stall, no racing", sleepy, fast_rate + slow_rate + 1 / 30, ["--no-hedge"]))
    for label, third, cap, extra in cases:
        result = run_fleet(data, [("fast", fast, ""), ("slow1", slow, ""), ("slow2", third, "")],
                           "tail-" + label.replace(" ", "").replace(",", ""), *extra)
        out[label] = result["makespan"] / (40 / cap)
    return out


def scenario_flaky(n: int) -> dict:
    """The GPU box fails one request in five with a 500 beside two laptops: whole job ÷ the fleet's good capacity."""
    probe = write_jsonl(OUT / "flaky-probe.jsonl", functions(n // 2, seed=11))     # long enough to settle
    _, gpu_rate, _ = best_fixed(probe, GPU, [3, 4, 5], "flaky-cap-gpu")
    few = write_jsonl(OUT / "flaky-probe-laptop.jsonl", functions(max(60, n // 10), seed=11))
    _, lap_rate, _ = best_fixed(few, LAPTOP, [1], "flaky-cap-laptop")
    capacity = (1 - 0.2) * gpu_rate + 2 * lap_rate      # a 500 comes after the work, so 80% of the box is useful
    data = write_jsonl(OUT / "flaky.jsonl", functions(n, seed=12))
    result = run_fleet(data, [("gpu", {**GPU, "fail_500": 0.2, "seed": 13}, ""), ("mac1", LAPTOP, ""),
                              ("mac2", LAPTOP, "")], "flaky")
    gpu_rows = sum(r["endpoint"] == "gpu" for r in result["records"])
    return {"capacity": capacity, "job_rate": n / result["makespan"], "ratio": n / result["makespan"] / capacity,
            "steady": result["steady"] / capacity, "gpu_share": gpu_rows / n,
            "gpu_good_share": 0.8 * gpu_rate / capacity, "downs": result["stderr"].count("gpu is down")}


def scenario_overhead(n: int, concurrency: int = 8) -> dict:
    """score.py vs a bare httpx loop, both against one instant endpoint in its own process."""
    server = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_ollama.py"), "--slots", "64"],
                              stdout=subprocess.PIPE, text=True)
    port = int(server.stdout.readline().split()[1])
    url = f"http://127.0.0.1:{port}"
    data = write_jsonl(OUT / "overhead.jsonl", functions(n, seed=6))
    try:
        (OUT / "overhead.txt").write_text(f"{url} name=instant concurrency={concurrency}\n")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([sys.executable, str(SCORE), str(data), "--endpoints", str(OUT / "overhead.txt"),
                        "-o", str(OUT / "overhead.out"), "--overwrite", "--no-progress", "--no-hedge"],
                       check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        stamps = sorted(json.loads(line)["ts"] for line in (OUT / "overhead.out").read_text().splitlines())
        ours = (len(stamps) - 1) / (stamps[-1] - stamps[0])     # the loop only, as for the bare loop
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        bare = subprocess.run([sys.executable, str(ROOT / "bench" / "bare_loop.py"), url, str(data),
                               str(concurrency)], check=True, capture_output=True, text=True)
        bare_rate = float(bare.stdout.split()[0])
    finally:
        server.kill()
        server.communicate()
    return {"ours": ours, "bare": bare_rate, "ratio": ours / bare_rate, "cpu_ms": 1000 * cpu / n}


def scenario_memory(rows: int, done: int) -> dict:
    """Peak RSS and resume-to-first-request on the tail of a big Parquet with a nearly full checkpoint."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    data = OUT / f"big-{rows}.parquet"
    checkpoint = OUT / f"big-{rows}.scores.jsonl"
    if not data.exists():
        rng = random.Random(7)
        writer = None
        for start in range(0, rows, 50_000):
            ids = list(range(start, min(rows, start + 50_000)))
            codes = [f"def f_{i}(x):\n" + "".join(f"    x = x * {rng.randint(2, 9)} + {i % 97}  # step {j}\n"
                                                  for j in range(14)) + "    return x\n" for i in ids]
            table = pa.table({"id": ids, "code": codes})
            writer = writer or pq.ParquetWriter(data, table.schema)
            writer.write_table(table)
        writer.close()
    with open(checkpoint, "w") as f:
        for i in range(done):
            f.write(json.dumps({"id": i, "score": 1 + i % 10, "reason": "Readable but undocumented helper; fine.",
                                "model": "qwen2.5-coder:7b", "model_digest": "a80c4f17acd5", "endpoint": "gpu",
                                "attempts": 1, "latency_s": 1.2, "prompt_tokens": 300, "output_tokens": 20,
                                "truncated": False, "temperature": 0.0, "seed": 42,
                                "hash": f"{i:016x}", "duplicate_of": None, "ts": 1.0, "error": None,
                                "error_kind": None}) + "\n")
    meta = checkpoint.with_name(checkpoint.name + ".meta.json")
    meta.unlink(missing_ok=True)
    server = serve(slots=64)
    try:
        (OUT / "big.txt").write_text(f"{server.url} name=instant\n")
        started = time.time()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", sys.executable, str(SCORE), str(data), "--endpoints",
                                 str(OUT / "big.txt"), "-o", str(checkpoint), "--resume", "--no-progress"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"memory: score.py exited {proc.returncode}\n{err}")
        peak_kib = int(err.strip().splitlines()[-1])
        first = server.first_chat_at - started
    finally:
        server.stop()
    size = data.stat().st_size
    return {"rows": rows, "done": done, "peak_mib": peak_kib / 1024, "first_request_s": first,
            "parquet_mb": size / 1e6, "code_mb": rows * 640 / 1e6}


def scenario_dedup(n: int) -> dict:
    rows = functions(n, seed=8, dup_share=0.25)
    distinct = len({r["code"] for r in rows})
    data = write_jsonl(OUT / "dedup.jsonl", rows)
    server = serve(latency=0.002, slots=8)
    try:
        run_score(data, [("solo", server, "")], "dedup")
        sent = len(server.chat_bodies())
    finally:
        server.stop()
    return {"rows": n, "distinct": distinct, "sent": sent, "ratio": sent / distinct,
            "dup_share": 1 - distinct / n}


REASON_GPU = dict(latency=0.01, per_char=0.000005, per_token=0.02, slots=4, alpha=0.9, peak=4, beta=1.0,
                  full_tokens=45, short_tokens=15, none_tokens=6)


def scenario_reason(n: int) -> dict:
    """--reason full/short/none on a simulated GPU whose service time is mostly decode (per generated token)."""
    data = write_jsonl(OUT / "reason.jsonl", functions(n, seed=10))
    out = {}
    for mode in ("full", "short", "none"):
        result = run_fleet(data, [("gpu", REASON_GPU, "")], f"reason-{mode}", "--reason", mode)
        records = result["records"]
        out[mode] = {"rate": result["steady"], "tokens": sum(r["output_tokens"] for r in records) / len(records),
                     "expected": sum(r["score_expected"] is not None for r in records) / len(records)}
    return out


def scenario_reason_real(count: int = 20) -> dict:
    """--reason full/short/none on the real two-server llama.cpp fleet (SmolLM2, one CPU thread each)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import llama_cpp.server  # noqa: F401
        import try_it
    except ImportError:
        return {}                 # no real server here: nothing to measure
    rows = [json.loads(line) for line in (ROOT / "examples" / "sample.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["code"].strip() and len(r["code"]) <= 600][:count]
    data = write_jsonl(OUT / "reason-real.jsonl", rows)
    out: dict = {"rows": len(rows)}
    with try_it.fleet(2, OUT) as urls:
        endpoints = try_it.write_endpoints(OUT / "reason-real.txt", urls)
        common = ["--endpoints", str(endpoints), "--model", try_it.MODEL_ALIAS, "--max-attempts", "6", "--no-progress"]
        for mode in ("full", "short", "none"):
            target = OUT / f"reason-real-{mode}.jsonl"
            started = time.time()
            proc = subprocess.run([sys.executable, str(SCORE), str(data), "-o", str(target), "--overwrite",
                                   "--reason", mode, "--no-calibration", *common], capture_output=True, text=True)
            wall = time.time() - started
            records = [r for r in map(json.loads, target.read_text().splitlines()) if r["score"] is not None]
            if not records:
                raise SystemExit(f"reason-real {mode}: nothing scored\n{proc.stderr}")
            out[mode] = {"rate": len(records) / wall, "tokens": sum(r["output_tokens"] for r in records) / len(records),
                         "prompt": sum(r["prompt_tokens"] for r in records) / len(records),
                         "expected": sum(r["score_expected"] is not None for r in records) / len(records),
                         "scores": len({r["score"] for r in records}),
                         "expected_values": len({r["score_expected"] for r in records})}
        check = subprocess.run([sys.executable, str(SCORE), str(data), "-o", str(OUT / "reason-real-cal.jsonl"),
                                "--check", "--calibrate", "--reason", "none", *common], capture_output=True, text=True)
        lines = check.stderr.splitlines()
        head = next((i for i, line in enumerate(lines) if line.startswith("endpoint") and "separation" in line), None)
        out["calibration"] = lines[head:head + 3] if head is not None else []
    return out


def render_reason(r: dict) -> list[str]:
    """BENCHMARKS.md lines for the --reason scenarios."""
    lines = []
    if f := r.get("reason"):
        lines += ["", "## Shorter answers (`--reason`)", "",
                  "Simulated GPU endpoint whose service time is mostly decode (20 ms per generated token, "
                  "45/15/6 tokens for full/short/none, as a 7B model's answers run):", "",
                  "| --reason | generated tokens per row | steady items/s | ÷ full | rows with score_expected |",
                  "|---|---|---|---|---|"]
        for mode in ("full", "short", "none"):
            m = f[mode]
            lines.append(f"| {mode} | {m['tokens']:.1f} | {m['rate']:.1f} | {m['rate'] / f['full']['rate']:.2f}x "
                         f"| {m['expected']:.0%} |")
    if (g := r.get("reason_real")) and "full" in g:
        lines += ["", f"Real fleet: two llama_cpp.server processes (SmolLM2-135M Q4_1, one CPU thread each), "
                  f"{g['rows']} CPython functions of ≤ 600 characters. On a CPU, reading the prompt dominates, "
                  "so dropping the reason gains far less than on a GPU:", "",
                  "| --reason | generated tokens per row | prompt tokens per row | items/s (wall) | ÷ full "
                  "| distinct integer scores | distinct expected scores |", "|---|---|---|---|---|---|---|"]
        for mode in ("full", "short", "none"):
            m = g[mode]
            lines.append(f"| {mode} | {m['tokens']:.1f} | {m['prompt']:.0f} | {m['rate']:.2f} "
                         f"| {m['rate'] / g['full']['rate']:.2f}x | {m['scores']} | {m['expected_values']} |")
        if g.get("calibration"):
            lines += ["", "Calibration on the same fleet (`--check --calibrate --reason none`):", "", "```text",
                      *g["calibration"], "```"]
    return lines


# ── wide fleets: many endpoints on one event loop thread of this process

def watch_first_chat(server: FakeOllama) -> FakeOllama:
    """Note when the first scoring request reaches a server (makespans start there)."""
    server.first_chat_at = None
    original = server._chat

    async def chat(body, reader, openai):
        if body.get("messages") and server.first_chat_at is None:
            server.first_chat_at = time.time()
        return await original(body, reader, openai)

    server._chat = chat
    return server


def run_wide(data: Path, groups: list[tuple[str, int, dict, str]], tag: str, *extra: str) -> dict:
    """Run score.py against fleets [(name prefix, count, behaviour, options)] hosted on one thread."""
    shared = FakeFleet()
    try:
        fleet = [(f"{prefix}{i}", watch_first_chat(shared.add(Behaviour(**params))), opts)
                 for prefix, count, params, opts in groups for i in range(count)]
        return run_measured(data, fleet, tag, *extra)
    finally:
        shared.stop()


def run_measured(data: Path, servers: list[tuple[str, FakeOllama, str]], tag: str, *extra: str) -> dict:
    """run_score, plus this run's own CPU time and peak RSS (not the sum or maximum over earlier children)."""
    endpoints = OUT / f"{tag}.endpoints.txt"
    endpoints.write_text("".join(f"{s.url} name={name} {opts}\n" for name, s, opts in servers))
    output = OUT / f"{tag}.scores.jsonl"
    # /usr/bin/time reports the peak RSS of score.py itself (wait4 would count the pre-exec copy of this process).
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M", sys.executable, str(SCORE), str(data), "--endpoints",
                             str(endpoints), "-o", str(output), "--overwrite", "--no-progress", "--no-calibration",
                             *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{tag}: score.py exited {proc.returncode}\n{err}")
    peak_kib = int(err.strip().splitlines()[-1])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    stamps = sorted(r["ts"] for r in records)
    start = min(s.first_chat_at for _, s, _ in servers if s.first_chat_at)
    return {"items": len(records), "makespan": stamps[-1] - start, "cpu": usage.ru_utime + usage.ru_stime,
            "rss_mib": peak_kib / 1024, "stderr": err, "records": records}


def scenario_wide_equal(sizes: tuple[int, ...], per_endpoint: int, service: float = 1.0) -> dict:
    """Equal single-slot fleets, whole job: makespan against ceil(rows ÷ endpoints) service times."""
    out = {}
    for n in sizes:
        rows = n * per_endpoint - n // 2          # not a multiple: the last round is partly empty
        data = write_jsonl(OUT / f"wide-{n}.jsonl", functions(rows, seed=10 + n))
        result = run_wide(data, [("e", n, dict(latency=service, slots=1), "")], f"wide-{n}")
        ideal = math.ceil(rows / n) * service
        counts = sorted(Counter(r["endpoint"] for r in result["records"]).values())
        out[n] = {"rows": rows, "makespan": result["makespan"], "ratio": result["makespan"] / ideal,
                  "spread": f"{counts[0]}-{counts[-1]}"}
    return out


WIDE_GPU = dict(latency=0.15, per_char=0.00005, slots=8, alpha=0.9, peak=4, beta=1.0)
WIDE_LAPTOP = dict(latency=0.45, per_char=0.00015, slots=1)


def scenario_wide_mixed(gpus: int, laptops: int, seconds: float) -> dict:
    """A few multi-slot GPU boxes and many laptops, whole job (ramp and tail) against the fleet's capacity."""
    probe = write_jsonl(OUT / "wide-mixed-probe.jsonl", functions(150, seed=21))
    _, gpu_rate, gpu_rates = best_fixed(probe, WIDE_GPU, [3, 4, 5], "wide-cap-gpu")
    _, lap_rate, _ = best_fixed(write_jsonl(OUT / "wide-mixed-lap.jsonl", functions(40, seed=22)),
                                WIDE_LAPTOP, [1], "wide-cap-laptop")
    capacity = gpus * gpu_rate + laptops * lap_rate
    rows = int(capacity * seconds)
    data = write_jsonl(OUT / "wide-mixed.jsonl", functions(rows, seed=23))
    result = run_wide(data, [("gpu", gpus, WIDE_GPU, ""), ("lap", laptops, WIDE_LAPTOP, "")], "wide-mixed")
    job_rate = rows / result["makespan"]
    return {"gpus": gpus, "laptops": laptops, "rows": rows, "capacity": capacity, "job_rate": job_rate,
            "ratio": job_rate / capacity, "gpu_rates": gpu_rates, "laptop_rate": lap_rate}


def scenario_auto_short(rows: int) -> dict:
    """Auto concurrency on a job of a few seconds, whole job (ramp included), against the best fixed limit."""
    params = dict(latency=0.04, per_char=0.00001, slots=8, alpha=0.9, peak=4, beta=1.0)
    data = write_jsonl(OUT / f"auto-short-{rows}.jsonl", functions(rows, seed=24))
    fixed = {limit: rows / run_fleet(data, [("solo", params, f"concurrency={limit}")], f"auto-short-c{limit}",
                                     "--no-hedge")["makespan"] for limit in (3, 4, 5)}
    auto = rows / run_fleet(data, [("solo", params, "")], "auto-short-auto", "--no-hedge")["makespan"]
    best = max(fixed, key=fixed.get)
    return {"rows": rows, "fixed": fixed, "best": best, "auto": auto, "ratio": auto / fixed[best],
            "seconds": rows / fixed[best]}


def scenario_auto_shorts(sizes: tuple[int, ...]) -> dict:
    """The short-job case at a few job lengths."""
    return {rows: scenario_auto_short(rows) for rows in sizes}


def scenario_wide_cpu(rows: int, service: float = 2.0) -> dict:
    """Coordinator CPU per row and peak memory with 3 wide endpoints (pinned at their 43 slots, so the rate
    matches from the start) vs 256 single-slot ones."""
    data = write_jsonl(OUT / "wide-cpu.jsonl", functions(rows, seed=25))
    out = {}
    for n, slots, opts in ((3, 43, "concurrency=43"), (256, 1, "")):
        result = run_wide(data, [("e", n, dict(latency=service, slots=slots), opts)], f"wide-cpu-{n}")
        out[n] = {"cpu_ms": 1000 * result["cpu"] / rows, "rss_mib": result["rss_mib"],
                  "rate": rows / result["makespan"]}
    out["ratio"] = out[256]["cpu_ms"] / out[3]["cpu_ms"]
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB, Python {platform.python_version()}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark score.py on simulated endpoints.")
    parser.add_argument("--quick", action="store_true", help="smaller jobs")
    parser.add_argument("--only", default="efficiency,auto,tail,flaky,overhead,memory,dedup,reason,reason_real,"
                                          "wide-equal,wide-mixed,auto-short,wide-cpu")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    q = args.quick
    results: dict[str, dict] = {}
    started = time.time()
    for name, fn in (("efficiency", lambda: scenario_efficiency(600 if q else 1800)),
                     ("auto", lambda: scenario_auto(300 if q else 900)),
                     ("tail", scenario_tail),
                     ("flaky", lambda: scenario_flaky(600 if q else 1800)),
                     ("overhead", lambda: scenario_overhead(1500 if q else 4000)),
                     ("memory", lambda: scenario_memory(100_000, 99_000) if q else scenario_memory(1_000_000, 990_000)),
                     ("dedup", lambda: scenario_dedup(400 if q else 2000)),
                     ("reason", lambda: scenario_reason(150 if q else 400)),
                     ("reason_real", scenario_reason_real),
                     ("wide-equal", lambda: scenario_wide_equal((8, 32) if q else (8, 32, 128), 6 if q else 10)),
                     ("wide-mixed", lambda: scenario_wide_mixed(3, 29, 10 if q else 30)),
                     ("auto-short", lambda: scenario_auto_shorts((300, 600))),
                     ("wide-cpu", lambda: scenario_wide_cpu(1000 if q else 2560))):
        if name in only:
            t = time.time()
            results[name] = fn()
            shown = {k: v for k, v in results[name].items() if k != "records"}
            print(f"{name}: {json.dumps(shown, default=str)}  ({time.time() - t:.0f}s)", flush=True)
    report = render(results, time.time() - started, " ".join(sys.argv[1:]))
    print(report)
    if not args.no_write and only == set(parser.get_default("only").split(",")):
        (ROOT / "BENCHMARKS.md").write_text(report)


def render_wide(r: dict) -> list[str]:
    """Table rows for the wide-fleet cases."""
    lines = []
    if w := r.get("wide-equal"):
        sizes = [n for n in w]
        lines.append(f"| wide: makespan ÷ ceil(rows ÷ endpoints) × service time, equal single-slot fleets of "
                     f"{', '.join(map(str, sizes))} (1 s per row, whole job) | ≤ 1.10 | **"
                     + " / ".join(f"{w[n]['ratio']:.2f}" for n in sizes) + "** (rows per endpoint "
                     + ", ".join(w[n]["spread"] for n in sizes) + ") |")
    if m := r.get("wide-mixed"):
        lines.append(f"| wide: whole-job items/s ÷ capacity, {m['gpus']} GPU boxes + {m['laptops']} laptops "
                     f"({m['rows']} rows) | ≥ 0.95 | **{m['ratio']:.3f}** ({m['job_rate']:.1f} of "
                     f"{m['capacity']:.1f} items/s) |")
    for a in (r.get("auto-short") or {}).values():
        lines.append(f"| auto ÷ best fixed, whole job of {a['seconds']:.0f} s ({a['rows']} rows, ramp included) "
                     f"| ≥ 0.95 | **{a['ratio']:.3f}** (best fixed = {a['best']}) |")
    if c := r.get("wide-cpu"):
        lines.append(f"| coordinator CPU ms per row, 256 endpoints ÷ 3 (same job and rate) | ≤ 1.5 "
                     f"| **{c['ratio']:.2f}** ({c[256]['cpu_ms']:.2f} vs {c[3]['cpu_ms']:.2f} ms; peak RSS "
                     f"{c[256]['rss_mib']:.0f} vs {c[3]['rss_mib']:.0f} MiB) |")
    return lines


def render(r: dict, elapsed: float, argv: str) -> str:
    lines = ["# Benchmarks", "",
             f"Latest run: {time.strftime('%Y-%m-%d')}, on {machine()}.",
             f"Command: `{' '.join(['python bench/run.py', *argv.split()])}` ({elapsed / 60:.1f} min).", "",
             "Every figure is a ratio of two measurements taken in the same run (the machine is shared and noisy).",
             "Endpoints are simulated (`tests/fake_ollama.py`): k slots, service time growing with prompt length,",
             "and batching whose throughput rises sub-linearly up to a peak, then degrades. The calibration at",
             "preflight (a fixed few seconds, on by default for jobs of 1,000 rows or more) is off in these cases",
             "(`--no-calibration`), so they measure scoring alone; its cost is given with the `--reason` figures.", "",
             "| metric | target | measured |", "|---|---|---|"]
    if e := r.get("efficiency"):
        lines.append(f"| efficiency: steady items/s ÷ fleet capacity (1 GPU box + 2 laptops 3x slower), defaults "
                     f"| ≥ 0.97 | **{e['efficiency']:.3f}** ({e['auto_rate']:.1f} of {e['capacity']:.1f} items/s) |")
    if a := r.get("auto"):
        lines.append(f"| auto ÷ best fixed concurrency (server peaking at 4 in flight) | ≥ 0.95 | **{a['ratio']:.3f}** "
                     f"(best fixed = {a['best']}) |")
        lines.append(f"| auto ÷ concurrency=1 | ≥ 3x | **{a['vs_c1']:.2f}x** |")
    if t := r.get("tail"):
        lines.append(f"| tail: makespan ÷ ideal, 40 items, 1 fast + 2 endpoints 20x slower, racing | ≤ 1.15 "
                     f"| **{t['racing']:.2f}** |")
        lines.append(f"| tail, same without racing (`--no-hedge`) | (report) | {t['no racing']:.2f} |")
        lines.append(f"| tail when one slow machine stalls 30 s mid-request: racing / without | (report) "
                     f"| {t['stall, racing']:.2f} / {t['stall, no racing']:.2f} |")
    if f := r.get("flaky"):
        lines.append(f"| flaky fleet: whole-job items/s ÷ good capacity, GPU box failing 20% of requests with a 500 "
                     f"+ 2 laptops | ≥ 0.9 | **{f['ratio']:.2f}** ({f['job_rate']:.1f} of {f['capacity']:.1f} "
                     f"items/s; steady {f['steady']:.2f}; GPU box scored {f['gpu_share']:.0%} of rows, "
                     f"{f['gpu_good_share']:.0%} of good capacity; marked down {f['downs']} times) |")
    if o := r.get("overhead"):
        lines.append(f"| overhead: score.py ÷ bare httpx loop, instant endpoint, concurrency 8 | ≥ 0.7 "
                     f"| **{o['ratio']:.2f}** ({o['ours']:.0f} vs {o['bare']:.0f} items/s; "
                     f"{o['cpu_ms']:.2f} CPU ms per item) |")
    if m := r.get("memory"):
        lines.append(f"| memory: peak RSS, tail of {m['rows']:,} rows with {m['done']:,} done | < 250 MiB "
                     f"| **{m['peak_mib']:.0f} MiB** |")
        lines.append(f"| resume to first request, same job | < 5 s | **{m['first_request_s']:.1f} s** |")
    if d := r.get("dedup"):
        lines.append(f"| dedup: requests sent ÷ distinct texts ({d['dup_share']:.0%} duplicates) | 1.00 "
                     f"| **{d['ratio']:.2f}** ({d['sent']} of {d['rows']} rows) |")
    lines += render_wide(r)
    if e:
        lines += ["", "## Against the baselines (same fleet, same job)", "",
                  "| approach | job items/s | ÷ fleet capacity |", "|---|---|---|",
                  f"| score.py defaults (auto concurrency, racing, shared queue) | {e['job_rate']:.1f} "
                  f"| {e['job_rate'] / e['capacity']:.2f} |",
                  f"| static even split, each machine at its best fixed concurrency | {e['split_rate']:.1f} "
                  f"| {e['split_rate'] / e['capacity']:.2f} |",
                  f"| one worker per endpoint on a shared queue | {e['seed_rate']:.1f} "
                  f"| {e['seed_rate'] / e['capacity']:.2f} |",
                  "", "Job items/s counts the whole job (ramp-up and tail included); efficiency above uses the "
                  "steady middle 80% of completions.",
                  "", "GPU box steady items/s at fixed concurrency: "
                  + ", ".join(f"{k}: {v:.1f}" for k, v in e["gpu_rates"].items())
                  + f"; laptop: {e['laptop_rate']:.1f}."]
    if a:
        lines += ["", "Single server peaking at 4 in flight, steady items/s at fixed concurrency: "
                  + ", ".join(f"{k}: {v:.1f}" for k, v in a["rates"].items())
                  + f"; auto: {a['auto']:.1f} (ended at limit {a['final_limit']})."]
    lines += render_reason(r)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
