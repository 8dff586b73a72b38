"""Streaming throughput of a running OpenAI-compatible server: N concurrent streaming completions
(SSE), each generating exactly M tokens (EOS ignored), all tokens over wall time.

    python3 benches/serve_stream.py --url http://127.0.0.1:8080 --model smollm2-135m-instruct \
        --concurrency 64 --max-tokens 32 --rounds 3

Prints one line per round and the best and median aggregate tok/s, with TTFT and the median gap
between a stream's chunks after its first (ITL p50: the decode step as a client sees it). `--response-format '{...}'`
constrains every request (benches/RESULTS.md, "Structured output", for the A/B). Standard library only (one thread
per stream). Tokens are counted from the usage chunk at the end of each stream.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def one(url, model, prompt, max_tokens, out, i, response_format=None):
    u = urllib.parse.urlsplit(url)
    extra = {"response_format": response_format} if response_format else {}
    body = json.dumps({
        **extra,
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    tokens, first, last, gaps = 0, None, None, []
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        now = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
            continue
        if first is None:
            first = now - t0
        else:
            gaps.append(now - last)
        last = now
    conn.close()
    out[i] = (tokens, first, gaps)


def round_(url, model, n, max_tokens, r, response_format=None):
    out = [None] * n
    threads = [
        threading.Thread(
            target=one,
            args=(url, model, f"Story {r}-{i}: once upon a time, in a quiet town by the sea,", max_tokens, out, i,
                  response_format),
        )
        for i in range(n)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    total = sum(t for t, _, _ in out)
    ttft = statistics.median(f for _, f, _ in out if f is not None)
    gaps = [g for _, _, gs in out for g in gs]
    itl = statistics.median(gaps) if gaps else float("nan")
    return total / wall, ttft, itl


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--response-format", type=json.loads, default=None,
                    help="a response_format object (JSON) every request carries")
    a = ap.parse_args()
    rates, itls = [], []
    for r in range(a.rounds):
        rate, ttft, itl = round_(a.url, a.model, a.concurrency, a.max_tokens, r, a.response_format)
        rates.append(rate)
        itls.append(itl)
        print(f"round {r}: {rate:.1f} tok/s aggregate, TTFT p50 {ttft * 1e3:.0f} ms, "
              f"ITL p50 {itl * 1e3:.1f} ms", flush=True)
    print(f"best {max(rates):.1f} tok/s, median {statistics.median(rates):.1f} tok/s, "
          f"ITL p50 {statistics.median(itls) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
