"""A burst of requests behind one fresh shared prefix (a new system prompt or RAG context), with
unrelated requests sent at the same moment: how many prompt tokens the server computed against the
ideal (the prefix once, then each request's own part), and time to first token of both kinds.

    python3 benches/prefix_burst.py --url http://127.0.0.1:8080 --model smollm2-135m-instruct \
        [--burst 16] [--unrelated 4] [--prefix-words 270] [--rounds 3]

Computed tokens come from each response's usage: prompt_tokens - prompt_tokens_details.cached_tokens.
The ideal counts the prefix in whole KV blocks as the server caches it: after the burst, one more
request with the same prefix reports the cached length B, and ideal = B + sum(prompt_i - B).
Standard library only, one thread per request.
"""
import argparse
import http.client
import json
import random
import statistics
import threading
import time
import urllib.parse

WORDS = ("river market engine ledger quarter harbor signal winter copper garden system tenant "
         "policy archive orbit canvas meadow lantern cipher basalt").split()


def text(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def ask(url, model, prompt, out, i):
    u = urllib.parse.urlsplit(url)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200, r.read()
    first, usage = None, None
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage = chunk["usage"]
        elif first is None and chunk["choices"] and chunk["choices"][0].get("text"):
            first = time.perf_counter() - t0
    conn.close()
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    out[i] = (usage["prompt_tokens"], cached, first)


def burst(url, model, a, seed):
    rng = random.Random(seed)
    prefix = f"Context {seed}: " + text(rng, a.prefix_words)
    prompts = [prefix + f"\nQuestion {i}: " + text(rng, 12) for i in range(a.burst)]
    unrelated = [f"Other {seed}-{i}: " + text(rng, a.prefix_words + 12) for i in range(a.unrelated)]
    every = prompts + unrelated
    order = list(range(len(every)))
    rng.shuffle(order)
    out = [None] * len(every)
    threads = [threading.Thread(target=ask, args=(url, model, every[i], out, i)) for i in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    probe = [None]
    ask(url, model, prefix + "\nQuestion probe: " + text(rng, 12), probe, 0)
    block_prefix = probe[0][1]
    mine = out[:a.burst]
    computed = sum(p - c for p, c, _ in mine)
    ideal = block_prefix + sum(p - block_prefix for p, _, _ in mine)
    return (computed / ideal, statistics.median(f for _, _, f in mine),
            statistics.median(f for _, _, f in out[a.burst:]) if a.unrelated else float("nan"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--burst", type=int, default=16)
    ap.add_argument("--unrelated", type=int, default=4)
    ap.add_argument("--prefix-words", type=int, default=270)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for r in range(a.rounds):
        ratio, ttft_burst, ttft_other = burst(a.url, a.model, a, int(time.time() * 1000) + r)
        rows.append((ratio, ttft_burst, ttft_other))
        print(f"round {r}: computed / ideal {ratio:.3f}, TTFT p50 burst {ttft_burst * 1e3:.0f} ms, "
              f"unrelated {ttft_other * 1e3:.0f} ms", flush=True)
    med = [statistics.median(c) for c in zip(*rows)]
    print(f"median: computed / ideal {med[0]:.3f}, TTFT p50 burst {med[1] * 1e3:.0f} ms, "
          f"unrelated {med[2] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
