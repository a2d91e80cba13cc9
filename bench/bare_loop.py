"""The baseline for the overhead figure: a bare httpx loop, N workers, no bookkeeping.

    python bench/bare_loop.py URL DATA.jsonl CONCURRENCY   # prints items/s
"""

import asyncio
import json
import sys
import time

import httpx

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
from score import DEFAULT_PROMPT, SCORE_SCHEMA  # noqa: E402  (the same request body as score.py sends)


async def main(url: str, path: str, concurrency: int) -> None:
    rows = [json.loads(line) for line in open(path)]
    queue: asyncio.Queue = asyncio.Queue()
    for row in rows:
        queue.put_nowait(row)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            row = queue.get_nowait()
            body = {"model": "qwen2.5-coder:7b", "stream": False, "format": SCORE_SCHEMA, "keep_alive": "30m",
                    "options": {"temperature": 0.0, "seed": 42, "num_ctx": 8192, "num_predict": 256},
                    "messages": [{"role": "user", "content": DEFAULT_PROMPT.format(code=row["code"])}]}
            response = await client.post(url + "/api/chat", json=body)
            json.loads(response.json()["message"]["content"])

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.time()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        print(f"{len(rows) / (time.time() - started):.1f} items/s")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
