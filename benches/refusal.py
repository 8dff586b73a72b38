"""Cost of refusing an oversized prompt: a 4 MiB completion prompt sent to a running server (whose
`max_body_bytes` admits it) is refused by its length in characters before tokenization. Reports the
median and worst time of the refusals, and /health latency alone and while 4 clients keep sending
such prompts.

    python3 benches/refusal.py --url http://127.0.0.1:8080 --model smollm2-135m-instruct
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse


def request(url, method, path, body=None):
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    t0 = time.perf_counter()
    conn.request(method, path, body, {"content-type": "application/json"} if body else {})
    r = conn.getresponse()
    r.read()
    conn.close()
    return r.status, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--n", type=int, default=20)
    a = ap.parse_args()
    body = json.dumps({"model": a.model, "prompt": "a" * (4 << 20), "max_tokens": 1})
    times = []
    for _ in range(a.n):
        status, t = request(a.url, "POST", "/v1/completions", body)
        assert status == 400, status
        times.append(t)
    print(f"4 MiB prompt refused: median {statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms")
    alone = [request(a.url, "GET", "/health")[1] for _ in range(50)]
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            request(a.url, "POST", "/v1/completions", body)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    busy = [request(a.url, "GET", "/health")[1] for _ in range(50)]
    stop.set()
    for t in threads:
        t.join()
    print(
        f"/health p50 alone {statistics.median(alone) * 1e3:.2f} ms, "
        f"while 4 clients send 4 MiB prompts {statistics.median(busy) * 1e3:.2f} ms "
        f"(max {max(busy) * 1e3:.1f} ms)"
    )


if __name__ == "__main__":
    main()
