"""How well the device-time cost model splits a batched step: each request kind's attributed
device time inside a mixed batch, against the same request's device time run alone.

A batch is cheaper per token than the same requests one after another, so every request gets less
device time in a mix than alone; a fair split gives every kind the same discount. The report shows
each kind's mixed / alone ratio and that ratio over the whole batch's (the error of the split:
0% means the kind got exactly its share of the batching discount).

    python3 benches/metering_accuracy.py --url http://127.0.0.1:8080 --model smollm2-135m-instruct
"""
import argparse
import json
import statistics
import threading
import urllib.request

FILLER = "The committee reviewed the quarterly figures and the plans for next year in detail. "
KINDS = {
    # name: (prompt, max_tokens)
    "short prompt, decode-heavy": ("Write a long story about a lighthouse keeper.", 64),
    "long prompt, prefill-heavy": (FILLER * 30 + "Summarize.", 2),
    "medium prompt and output": (FILLER * 6 + "Continue:", 24),
    "long prompt, long output": (FILLER * 15 + "Continue:", 48),
}


SERIAL = iter(range(10**9))


def device_ms(url, model, key, prompt, max_tokens):
    # A unique first line: no request reuses another's cached prefix.
    prompt = f"Ticket {next(SERIAL):06d}.\n{prompt}"
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())["metrics"]["device_time_ms"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--key")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--copies", type=int, default=4, help="requests of each kind in the mixed batch")
    a = ap.parse_args()

    alone = {}
    for name, (prompt, n) in KINDS.items():
        device_ms(a.url, a.model, a.key, prompt, n)  # warm-up
        alone[name] = statistics.median(device_ms(a.url, a.model, a.key, prompt, n) for _ in range(a.rounds))

    mixed = {name: [] for name in KINDS}
    for _ in range(a.rounds):
        out, threads = [], []
        for name, (prompt, n) in KINDS.items():
            for _ in range(a.copies):
                def run(name=name, prompt=prompt, n=n):
                    out.append((name, device_ms(a.url, a.model, a.key, prompt, n)))
                threads.append(threading.Thread(target=run))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, ms in out:
            mixed[name].append(ms)

    total_alone = sum(alone[k] * a.copies for k in KINDS)
    total_mixed = sum(sum(v) for v in mixed.values()) / a.rounds
    batch = total_mixed / total_alone
    print(f"batch discount: mixed / alone = {batch:.3f} over all {len(KINDS) * a.copies} requests")
    print(f"{'kind':32} {'alone ms':>9} {'mixed ms (mean)':>16} {'mixed/alone':>12} {'error vs batch':>15}")
    for k in KINDS:
        m = statistics.mean(mixed[k])
        r = m / alone[k]
        print(f"{k:32} {alone[k]:9.1f} {m:16.1f} {r:12.3f} {100 * (r / batch - 1):+14.1f}%")
    # Every request's error against the batch discount, all kinds and rounds together.
    errors = sorted(100 * (ms / alone[k] / batch - 1) for k in KINDS for ms in mixed[k])
    q = lambda p: errors[min(len(errors) - 1, int(p * (len(errors) - 1) + 0.5))]
    print(f"per-request error vs batch over {len(errors)} requests: min {errors[0]:+.1f}%, "
          f"p10 {q(0.1):+.1f}%, p50 {q(0.5):+.1f}%, p90 {q(0.9):+.1f}%, max {errors[-1]:+.1f}%")


if __name__ == "__main__":
    main()
