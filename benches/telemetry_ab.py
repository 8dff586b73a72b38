"""Cost of request tracing at 64 streams: interleaved A/B rounds on two servers from one binary, one
with `otlp_endpoint` unset (off) and one exporting every request's trace over OTLP/HTTP (on) to a
sink in this process that reads and discards the batches (a collector runs elsewhere in production;
decoding here would bill its CPU to the machine under test). Both servers are up for the whole run;
the arms' order flips every round. Per round and arm: aggregate tok/s (client side) and the
server's CPU seconds (utime + stime from /proc). Prints the paired ratios on / off with 95% t
intervals.

    python3 benches/telemetry_ab.py --binary target/release/hearth \
        --model smollm2-135m-instruct=models/smollm2-135m-instruct-q4_1.gguf --rounds 30
"""
import argparse
import http.client
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_stream import round_  # noqa: E402

RECEIVED = {"posts": 0, "bytes": 0}


class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        n = int(self.headers.get("content-length", 0))
        self.rfile.read(n)
        RECEIVED["posts"] += 1
        RECEIVED["bytes"] += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def t95(df):
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
             9: 2.262, 10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 29: 2.045, 30: 2.042,
             40: 2.021, 60: 2.000}
    for k in sorted(table):
        if df <= k:
            return table[k]
    return 1.96


def interval(xs):
    m = statistics.mean(xs)
    h = t95(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, m - h, m + h


def wait_ready(port, proc):
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server on port {port} exited")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/ready")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server on port {port} never got ready")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--binary", default="target/release/hearth")
    ap.add_argument("--model", required=True, help="NAME=PATH")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--ports", default="8211,8212")
    a = ap.parse_args()
    name = a.model.split("=", 1)[0]
    sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    tmp = tempfile.mkdtemp(prefix="hearth-telemetry-ab-")
    servers = {}
    for arm, port in zip(["off", "on"], a.ports.split(",")):
        cfg = os.path.join(tmp, f"{arm}.toml")
        with open(cfg, "w") as f:
            f.write(f'ledger_path = "{tmp}/{arm}.sqlite3"\n')
            if arm == "on":
                f.write(f'otlp_endpoint = "http://127.0.0.1:{sink.server_address[1]}"\n')
        proc = subprocess.Popen(
            [a.binary, "serve", "--config", cfg, "--port", port, "--model", a.model],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env={**os.environ, "RUST_LOG": "warn"})
        servers[arm] = (int(port), proc)
    try:
        for arm, (port, proc) in servers.items():
            wait_ready(port, proc)
            round_(f"http://127.0.0.1:{port}", name, a.concurrency, 8, -1)  # warm-up
        rates = {"off": [], "on": []}
        cpus = {"off": [], "on": []}
        for r in range(a.rounds):
            order = ["off", "on"] if r % 2 == 0 else ["on", "off"]
            for arm in order:
                port, proc = servers[arm]
                c0 = cpu_seconds(proc.pid)
                rate, _, _ = round_(f"http://127.0.0.1:{port}", name, a.concurrency, a.max_tokens, r)
                cpu = cpu_seconds(proc.pid) - c0
                rates[arm].append(rate)
                cpus[arm].append(cpu)
                print(f"round {r} {arm}: {rate:.1f} tok/s, {cpu:.2f} CPU s", flush=True)
        time.sleep(6)  # the exporter's batch interval: let the last batch arrive
        tput = [on / off for on, off in zip(rates["on"], rates["off"])]
        cpu = [on / off for on, off in zip(cpus["on"], cpus["off"])]
        n = len(tput)
        print(f"\noff: {statistics.mean(rates['off']):.1f} tok/s, {statistics.mean(cpus['off']):.2f} CPU s per round")
        print(f"on:  {statistics.mean(rates['on']):.1f} tok/s, {statistics.mean(cpus['on']):.2f} CPU s per round")
        m, lo, hi = interval(tput)
        print(f"throughput on/off: {m:.4f} [{lo:.4f}, {hi:.4f}] (95% t, n = {n})")
        m, lo, hi = interval(cpu)
        print(f"server CPU on/off: {m:.4f} [{lo:.4f}, {hi:.4f}] (95% t, n = {n})")
        print(f"exported: {RECEIVED['posts']} OTLP batches, {RECEIVED['bytes'] / 1e6:.1f} MB")
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
