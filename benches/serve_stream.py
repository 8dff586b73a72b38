"""Streaming throughput of a running OpenAI-compatible server: N concurrent streaming completions
(SSE), each generating exactly M tokens (EOS ignored), all tokens over wall time.

    .venv-test/bin/python benches/serve_stream.py --url http://127.0.0.1:8080 --model smollm2-135m-instruct \
        --concurrency 64 --max-tokens 32 --rounds 3

Prints one line per round and the best and median aggregate tok/s. Uses httpx (installed with the
openai client in .venv-test). A token is one SSE chunk that carries text; the usage chunk at the end
gives the exact count, which is what is reported.
"""
import argparse
import asyncio
import json
import statistics
import time

import httpx


async def one(client, url, model, prompt, max_tokens):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    first = None
    t0 = time.perf_counter()
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif first is None:
                first = time.perf_counter() - t0
    return tokens, first


async def round_(url, model, n, max_tokens, r):
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        prompts = [f"Story {r}-{i}: once upon a time, in a quiet town by the sea," for i in range(n)]
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, model, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    total = sum(t for t, _ in results)
    ttft = statistics.median(f for _, f in results if f is not None)
    return total / wall, ttft


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rates = []
    for r in range(a.rounds):
        rate, ttft = asyncio.run(round_(a.url, a.model, a.concurrency, a.max_tokens, r))
        rates.append(rate)
        print(f"round {r}: {rate:.1f} tok/s aggregate, TTFT p50 {ttft * 1e3:.0f} ms", flush=True)
    print(f"best {max(rates):.1f} tok/s, median {statistics.median(rates):.1f} tok/s")


if __name__ == "__main__":
    main()
