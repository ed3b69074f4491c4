"""Drives bench/registry.sh: Flotilla's KV against etcd, side by side, on loopback.

With `--store etcd` Flotilla keeps its state in that same etcd (a cluster's setup): the figures
then show what Flotilla's Consul API costs on top of etcd itself.

Both are durable (etcd fsyncs its WAL per commit batch; Flotilla's SQLite store syncs before it
answers), both get the same concurrency, value size and key spread from wrk, and both are asked
for the latency of waking a watcher: a blocking `GET /v1/kv/<key>?index=` on Flotilla, a
`/v3/watch` stream on etcd.
"""

import argparse
import base64
import json
import os
import re
import statistics
import subprocess
import threading
import time
import urllib.request

from benchlib import Agent, free_port

HERE = os.path.dirname(os.path.abspath(__file__))


def wrk(url, script, threads, connections, seconds, value_bytes, operation=""):
    environment = dict(os.environ, VALUE_BYTES=str(value_bytes), ETCD_OP=operation)
    output = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", os.path.join(HERE, "wrk", script), url],
        capture_output=True, text=True, check=True, env=environment).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M).group(1)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if errors:
        raise SystemExit(f"{script}: {errors.group(1)} failed requests\n{output}")
    return rps, p99


class Etcd:
    def __init__(self, work):
        self.client_port, peer_port = free_port(), free_port()
        self.base = f"http://127.0.0.1:{self.client_port}"
        self.log = open(os.path.join(work, "etcd.log"), "w")
        self.process = subprocess.Popen(
            ["etcd", "--name", "bench", "--data-dir", os.path.join(work, "etcd-data"),
             "--listen-client-urls", self.base, "--advertise-client-urls", self.base,
             "--listen-peer-urls", f"http://127.0.0.1:{peer_port}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
             "--initial-cluster", f"bench=http://127.0.0.1:{peer_port}", "--log-level", "error"],
            stdout=self.log, stderr=self.log)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.base + "/health", timeout=1).read()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit("etcd did not start; see " + self.log.name)

    def put(self, key, value):
        body = json.dumps({"key": base64.b64encode(key.encode()).decode(), "value": base64.b64encode(value).decode()}).encode()
        urllib.request.urlopen(urllib.request.Request(self.base + "/v3/kv/put", data=body, method="POST"), timeout=10).read()

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=30)


def flotilla_wake_latency(agent, samples):
    """Per sample: (wake − write sent, wake − write acknowledged)."""
    latencies = []
    key = "/v1/kv/bench-watch/key"
    urllib.request.urlopen(urllib.request.Request(agent.base + key, data=b"0", method="PUT"), timeout=10).read()
    for sample in range(samples):
        with urllib.request.urlopen(agent.base + key, timeout=10) as response:
            index = response.headers["X-Consul-Index"]
        woke = {}

        def watch():
            with urllib.request.urlopen(f"{agent.base}{key}?index={index}&wait=30s", timeout=40) as response:
                response.read()
                woke["at"] = time.perf_counter()

        watcher = threading.Thread(target=watch)
        watcher.start()
        time.sleep(0.02)  # let the blocking query arrive and park
        sent = time.perf_counter()
        urllib.request.urlopen(urllib.request.Request(agent.base + key, data=str(sample).encode(), method="PUT"), timeout=10).read()
        acknowledged = time.perf_counter()
        watcher.join()
        latencies.append((woke["at"] - sent, max(0.0, woke["at"] - acknowledged)))
    return latencies


def etcd_wake_latency(etcd, samples):
    import http.client
    latencies = []
    key = base64.b64encode(b"bench-watch/key").decode()
    connection = http.client.HTTPConnection("127.0.0.1", etcd.client_port, timeout=30)
    connection.request("POST", "/v3/watch", body=json.dumps({"create_request": {"key": key}}), headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.readline()  # the "created" message
    for sample in range(samples):
        sent = time.perf_counter()
        etcd.put("bench-watch/key", str(sample).encode())
        acknowledged = time.perf_counter()
        while True:
            line = response.readline()
            if b'"events"' in line:
                break
        woke = time.perf_counter()
        latencies.append((woke - sent, max(0.0, woke - acknowledged)))
    connection.close()
    return latencies


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--value-bytes", type=int, default=128)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--store", choices=["sqlite", "etcd"], default="sqlite", help="where Flotilla keeps its state")
    arguments = parser.parse_args()

    etcd = Etcd(arguments.work)
    store_args = ["--store", f"etcd://127.0.0.1:{etcd.client_port}", "--etcd-prefix", "/bench-flotilla"] if arguments.store == "etcd" else []
    agent = Agent(arguments.binary, arguments.work, extra_args=store_args)
    rows = {}
    try:
        load = dict(threads=2, connections=arguments.connections, seconds=arguments.seconds, value_bytes=arguments.value_bytes)
        rows["writes"] = (wrk(agent.base, "flotilla-kv-put.lua", **load), wrk(etcd.base, "etcd.lua", operation="put", **load))
        rows["reads"] = (wrk(agent.base, "flotilla-kv-get.lua", **load), wrk(etcd.base, "etcd.lua", operation="range", **load))
        flotilla_wake = flotilla_wake_latency(agent, arguments.samples)
        etcd_wake = etcd_wake_latency(etcd, arguments.samples)
    finally:
        agent.stop()
        etcd.stop()

    print(f"| {arguments.value_bytes}-byte values, {arguments.connections} connections, {arguments.seconds} s each, Flotilla on {arguments.store} | Flotilla | etcd | Flotilla / etcd |")
    print("|---|---|---|---|")
    for name, ((flotilla_rps, flotilla_p99), (etcd_rps, etcd_p99)) in rows.items():
        print(f"| KV {name}/s (p99) | {flotilla_rps:,.0f} ({flotilla_p99}) | {etcd_rps:,.0f} ({etcd_p99}) | {flotilla_rps / etcd_rps:.2f}× |")
    for which, description in ((0, "from the write sent (its sync included)"), (1, "from the write acknowledged")):
        for label, fraction in (("p50", 0.5), ("p99", 0.99)):
            flotilla_ms = percentile([sample[which] for sample in flotilla_wake], fraction) * 1000
            etcd_ms = percentile([sample[which] for sample in etcd_wake], fraction) * 1000
            ratio = f"{flotilla_ms / etcd_ms:.2f}×" if etcd_ms > 0.01 else "–"
            print(f"| watcher wake {description}, {label} ({arguments.samples} samples) | {flotilla_ms:.2f} ms | {etcd_ms:.2f} ms | {ratio} |")


if __name__ == "__main__":
    main()
