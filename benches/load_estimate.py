#!/usr/bin/env python3
"""Measure how well Hearth's `load` route policy predicts TTFT.

For each queue depth D, D flood requests (distinct ~600-token prompts, max_tokens 1) go straight
to smollm2; once the engine holds them (waiting + running >= D, from /metrics), one streamed
request goes to the route group "probe". Its wall-clock TTFT (send -> first SSE chunk with text)
is compared with the prediction in the final chunk's metrics.route.load[0].ttft_ms.

The server needs a route that always reports the estimate and never moves the request:

    [[routes]]
    name = "probe"
    models = ["smollm2-135m-instruct", "gemma-3-270m"]
    policy = "load"
    ttft_target_ms = 100000000

    python3 benches/load_estimate.py --url http://127.0.0.1:8311
"""
import argparse
import http.client
import json
import re
import statistics
import sys
import threading
import time
import urllib.parse
import uuid

HOST, PORT = "127.0.0.1", 8311
SMOL = "smollm2-135m-instruct"
DEPTHS = [0, 1, 2, 4, 8]
SWEEPS = 3
SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank today. "
FLOOD_REPEAT = 40  # ~600 tokens
PROBE_REPEAT = 3   # ~50 tokens


def post(body, timeout=300):
    c = http.client.HTTPConnection(HOST, PORT, timeout=timeout)
    c.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, json.loads(data)


def queue_depth():
    c = http.client.HTTPConnection(HOST, PORT, timeout=10)
    c.request("GET", "/metrics")
    text = c.getresponse().read().decode()
    c.close()
    n = 0
    for name in ("hearth_num_requests_waiting", "hearth_num_requests_running"):
        m = re.search(r'^%s\{model="%s"\} (\S+)' % (name, re.escape(SMOL)), text, re.M)
        n += int(float(m.group(1))) if m else 0
    return n


def flood(tag, i, out):
    body = {"model": SMOL, "prompt": f"{tag}-{i} " + SENTENCE * FLOOD_REPEAT,
            "max_tokens": 1, "temperature": 0}
    t0 = time.perf_counter()
    status, js = post(body)
    out[i] = {"status": status, "secs": time.perf_counter() - t0,
              "prompt_tokens": js.get("usage", {}).get("prompt_tokens"),
              "cached": js.get("usage", {}).get("prompt_tokens_details", {}).get("cached_tokens")}


def probe(tag):
    body = {"model": "probe", "prompt": f"[{tag}] Question: " + SENTENCE * PROBE_REPEAT + "What next?",
            "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    c = http.client.HTTPConnection(HOST, PORT, timeout=300)
    payload = json.dumps(body)
    t0 = time.perf_counter()
    c.request("POST", "/v1/completions", payload, {"content-type": "application/json"})
    r = c.getresponse()
    t_first = None
    last = None
    while True:
        line = r.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        js = json.loads(data)
        if t_first is None and any(ch.get("text") for ch in js.get("choices", [])):
            t_first = time.perf_counter()
        if js.get("metrics"):
            last = js
    c.close()
    m = last["metrics"] if last else {}
    route = m.get("route") or {}
    load = route.get("load") or []
    return {
        "actual_ms": (t_first - t0) * 1e3 if t_first else None,
        "pred_ms": load[0]["ttft_ms"] if load else None,
        "pred_model": load[0]["model"] if load else None,
        "answered_by": route.get("model"),
        "server_ttft_ms": m.get("time_to_first_token_ms"),
        "queue_ms": m.get("queue_time_ms"),
        "prompt_tokens": (last or {}).get("usage", {}).get("prompt_tokens"),
        "cached": (last or {}).get("usage", {}).get("prompt_tokens_details", {}).get("cached_tokens"),
    }


def trial(sweep, depth):
    tag = uuid.uuid4().hex[:8]
    # warm-up (unique prompt, so no prefix sharing with anything)
    post({"model": SMOL, "prompt": f"<{tag}> Hello there, how are you?", "max_tokens": 2,
          "temperature": 0})
    results = {}
    threads = [threading.Thread(target=flood, args=(tag, i, results)) for i in range(depth)]
    for t in threads:
        t.start()
    reached = True
    seen = 0
    if depth:
        deadline = time.time() + 20
        while True:
            seen = queue_depth()
            if seen >= depth:
                break
            if time.time() > deadline:
                reached = False
                break
            time.sleep(0.003)
    p = probe(tag)
    for t in threads:
        t.join()
    # drain: make sure the engine is idle before the next trial
    while queue_depth() > 0:
        time.sleep(0.02)
    rec = {"sweep": sweep, "D": depth, "seen_depth": seen, "reached": reached, **p,
           "flood_prompt_tokens": sorted({v["prompt_tokens"] for v in results.values()}),
           "flood_cached": sum((v["cached"] or 0) for v in results.values()),
           "flood_status": sorted({v["status"] for v in results.values()})}
    print(json.dumps(rec), flush=True)
    return rec


def main():
    global HOST, PORT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default=f"http://{HOST}:{PORT}")
    u = urllib.parse.urlparse(ap.parse_args().url)
    HOST, PORT = u.hostname, u.port or 80
    t_start = time.time()
    recs = []
    for s in range(SWEEPS):
        for d in DEPTHS:
            recs.append(trial(s, d))
    print(f"\ntotal {time.time() - t_start:.0f}s\n")
    print("| D | predicted ms (median) | actual ms (median) | ratio pred/actual (median) | ratios per sweep |")
    print("|---|---|---|---|---|")
    all_ratios = []
    for d in DEPTHS:
        rs = [r for r in recs if r["D"] == d]
        preds = [r["pred_ms"] for r in rs if r["pred_ms"] is not None]
        acts = [r["actual_ms"] for r in rs if r["actual_ms"] is not None]
        ratios = [r["pred_ms"] / r["actual_ms"] for r in rs
                  if r["pred_ms"] is not None and r["actual_ms"]]
        all_ratios += ratios
        med = lambda xs: f"{statistics.median(xs):.1f}" if xs else "n/a"
        medr = f"{statistics.median(ratios):.2f}" if ratios else "n/a"
        print(f"| {d} | {med(preds)} | {med(acts)} | {medr} | {', '.join(f'{x:.2f}' for x in ratios)} |")
    if all_ratios:
        print(f"\noverall ratio median {statistics.median(all_ratios):.2f}, "
              f"range {min(all_ratios):.2f} .. {max(all_ratios):.2f} (n={len(all_ratios)})")


if __name__ == "__main__":
    sys.exit(main())
