"""Measure the offline local model: load time, decode speed, memory.

Run: .venv/bin/python bench/local_model.py
"""

from __future__ import annotations

import asyncio
import json
import resource
import time

from turbobot import LLMRequest
from turbobot.llm.local import LocalLLM


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def main() -> None:
    before = rss_mb()
    llm = LocalLLM()
    start = time.perf_counter()
    await llm.start()
    load = time.perf_counter() - start
    request = LLMRequest(
        messages=[
            {"role": "system", "content": "You are a storyteller."},
            {"role": "user", "content": "Tell me a long story about a lighthouse keeper."},
        ],
        model="smollm2",
        settings={"temperature": 0.7, "max_tokens": 200},
    )
    first: list[float] = []
    start = time.perf_counter()

    async def on_delta(delta: str) -> None:
        if not first:
            first.append(time.perf_counter() - start)

    runs = []
    for _ in range(3):
        first.clear()
        start = time.perf_counter()
        response = await llm.complete(request, on_delta=on_delta)
        elapsed = time.perf_counter() - start
        tokens = response.usage.completion_tokens if response.usage else 0
        runs.append(
            {
                "tokens": tokens,
                "seconds": round(elapsed, 3),
                "first_token_s": round(first[0], 3) if first else None,
                "tokens_per_s": round(tokens / (elapsed - (first[0] if first else 0)), 1),
            }
        )
    await llm.aclose()
    print(
        json.dumps(
            {
                "load_seconds": round(load, 3),
                "rss_before_mb": round(before, 1),
                "rss_peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "runs": runs,
            }
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
