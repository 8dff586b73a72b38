"""Weighted fair share under contention: many concurrent streams from several tenants, each tenant's
share of the generated tokens while all of them still have work queued, against its weight.

Start a server whose config has the tenants (keys sk-<name>) and room for the queue, e.g.

    max_waiting = 4096
    max_seqs = 256
    [[tenants]]
    name = "a"
    api_keys = ["sk-a"]
    weight = 1
    [[tenants]]
    name = "b"
    api_keys = ["sk-b"]
    weight = 1
    [[tenants]]
    name = "c"
    api_keys = ["sk-c"]
    weight = 2

then: python3 benches/fair_share.py --url http://127.0.0.1:8080 --model smollm2-135m-instruct \
          --tenants a:1,b:1,c:2 --streams 2000 --max-tokens 16

Every tenant sends the same number of identical-length requests at once. Tokens are counted per
tenant from the start until the first tenant's last request starts streaming (until then every
tenant has requests waiting, so all are contending); the shares over that window are compared with
weight / sum of weights.
"""
import argparse
import json
import threading
import time
import urllib.request


def stream(url, model, key, max_tokens, stamps, firsts, lock, errors):
    body = {
        "model": model,
        "prompt": "List the numbers from one to fifty in words:",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    req = urllib.request.Request(
        url + "/v1/completions",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    try:
        first = True
        with urllib.request.urlopen(req, timeout=3600) as r:
            for line in r:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["text"]:
                        now = time.monotonic()
                        with lock:
                            stamps.append(now)
                            if first:
                                firsts.append(now)
                        first = False
    except Exception as e:  # noqa: BLE001 - counted and reported
        with lock:
            errors.append(str(e))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tenants", default="a:1,b:1,c:2", help="name:weight,...; keys are sk-<name>")
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()

    tenants = [(n, float(w)) for n, w in (t.split(":") for t in a.tenants.split(","))]
    per = a.streams // len(tenants)
    stamps = {n: [] for n, _ in tenants}
    firsts = {n: [] for n, _ in tenants}
    lock = threading.Lock()
    errors = []
    threads = []
    t0 = time.monotonic()
    # Interleave the tenants' submissions so that arrival order favours nobody.
    for i in range(per):
        for n, _ in tenants:
            t = threading.Thread(
                target=stream,
                args=(a.url, a.model, f"sk-{n}", a.max_tokens, stamps[n], firsts[n], lock, errors),
                daemon=True,
            )
            t.start()
            threads.append(t)
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    # The window: while every tenant still had requests waiting, i.e. until the first tenant's
    # last request started streaming (its first token).
    cut = min(max(f) for f in firsts.values() if f)
    counted = {n: sum(1 for x in stamps[n] if x <= cut) for n, _ in tenants}
    total = sum(counted.values())
    wsum = sum(w for _, w in tenants)
    print(f"{a.streams} streams x {a.max_tokens} tokens, {len(errors)} errors, wall {wall:.0f} s, "
          f"contended window {cut - t0:.0f} s")
    print(f"{'tenant':8} {'weight':>6} {'tokens in window':>17} {'share':>7} {'target':>7} {'off by':>8}")
    for n, w in tenants:
        share = counted[n] / max(total, 1)
        target = w / wsum
        print(f"{n:8} {w:6.0f} {counted[n]:17d} {share:7.3f} {target:7.3f} {100 * (share / target - 1):+7.1f}%")
    if errors:
        print("first error:", errors[0])


if __name__ == "__main__":
    main()
