"""Structured output over a set of schemas: every answer must parse and validate.

    .venv-test/bin/python benches/structured_bench.py --url http://127.0.0.1:8080 \
        --model smollm2-135m-instruct [--endpoint chat|completions] [--data benches/structured_set.jsonl]

For each schema (benches/structured_set.py writes the set), one greedy request with
`response_format: json_schema` (strict); the answer is parsed and checked with the `jsonschema`
package (Draft 2020-12), independent of Hearth's grammar compiler. Prints a table and any failure;
exits 1 when an answer that finished with `stop` does not parse or validate.
"""
import argparse
import http.client
import json
import statistics
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import jsonschema


def ask(url, model, endpoint, item, max_tokens):
    u = urllib.parse.urlsplit(url)
    fmt = {"type": "json_schema", "json_schema": {"name": item["id"], "schema": item["schema"], "strict": True}}
    if endpoint == "chat":
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": item["prompt"]}]}
    else:
        path = "/v1/completions"
        body = {"prompt": item["prompt"] + "\n"}
    body.update(model=model, max_tokens=max_tokens, temperature=0, response_format=fmt)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    conn.request("POST", path, json.dumps(body), {"content-type": "application/json"})
    r = conn.getresponse()
    v = json.loads(r.read())
    conn.close()
    if r.status != 200:
        return {"id": item["id"], "status": r.status, "error": v}
    c = v["choices"][0]
    text = c["message"]["content"] if endpoint == "chat" else c["text"]
    out = {"id": item["id"], "status": 200, "finish": c["finish_reason"], "text": text,
           "tokens": v["usage"]["completion_tokens"], "parsed": False, "valid": False, "why": ""}
    try:
        value = json.loads(text)
        out["parsed"] = True
    except ValueError as e:
        out["why"] = f"parse: {e}"
        return out
    errors = list(jsonschema.Draft202012Validator(item["schema"]).iter_errors(value))
    out["valid"] = not errors
    out["why"] = errors[0].message if errors else ""
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--data", default="benches/structured_set.jsonl")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()
    items = [json.loads(line) for line in open(a.data)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.concurrency) as pool:
        results = list(pool.map(lambda it: ask(a.url, a.model, a.endpoint, it, a.max_tokens), items))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200]
    stop = [r for r in ok if r["finish"] == "stop"]
    tokens = [r["tokens"] for r in ok]
    print("| model | endpoint | schemas | HTTP 200 | finished (stop) | parsed | valid | median / max tokens | wall s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {a.model} | {a.endpoint} | {len(items)} | {len(ok)} | {len(stop)} | "
          f"{sum(r['parsed'] for r in ok)} | {sum(r['valid'] for r in ok)} | "
          f"{statistics.median(tokens) if tokens else 0:.0f} / {max(tokens, default=0)} | {wall:.0f} |")
    bad = [r for r in results if r["status"] != 200 or not r["valid"]]
    for r in bad:
        print(f"- {r['id']}: status {r['status']}, finish {r.get('finish')}, {r.get('why') or r.get('error')}: "
              f"{(r.get('text') or '')[:200]!r}")
    broken = [r for r in stop if not r["valid"]] + [r for r in results if r["status"] != 200]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
