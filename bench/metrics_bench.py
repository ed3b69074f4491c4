"""Drives bench/metrics.sh on a release agent on loopback.

1. 100 `sleep` instances (one app): the agent's CPU over SECONDS_IDLE idle seconds and its RSS,
   with `--metrics-interval 5` (the default) and with `--metrics-interval 0`, side by side, three
   runs each alternating; median of the runs.
2. 100 apps × 3 instances: `GET /metrics` render time (wrk, one connection, p50/p99) and its size.
3. Log throughput: an instance writing 64-byte lines as fast as it can for 5 s, counted from its
   log file, against the same writer writing to a plain file outside the agent; median of 3.
"""

import argparse
import os
import statistics
import subprocess
import time
import urllib.request

from benchlib import Agent, call, cpu_seconds, rss_kib, wrk

# Writes 64-byte lines for 5 s (to stdout, or to the file named), then the number it wrote to $COUNT_FILE.
WRITER = (
    "import os, sys, time\n"
    "out = sys.stdout if len(sys.argv) < 2 else open(sys.argv[1], 'w')\n"
    "block = ('x' * 63 + '\\n') * 1000\n"
    "written = 0\n"
    "end = time.monotonic() + 5\n"
    "while time.monotonic() < end:\n"
    "    out.write(block)\n"
    "    written += 1000\n"
    "out.flush()\n"
    "open(os.environ['COUNT_FILE'], 'w').write(str(written))\n"
    "time.sleep(3600)\n"
)


def report(row):
    print(f"| {row[0]} | {row[1]} |", flush=True)


def wait_running(agent, app_ids, count, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        apps = call(agent.base, "GET", "/v2/apps")["apps"]
        if sum(a["tasksRunning"] for a in apps if a["id"] in app_ids) >= count:
            return
        time.sleep(0.1)
    raise SystemExit(f"{count} instances did not start in {timeout} s")


def idle_cost(binary, work, interval, idle):
    agent = Agent(binary, work, extra_args=["--metrics-interval", str(interval)])
    try:
        call(agent.base, "POST", "/v2/apps", {
            "id": "/bench/idle", "cmd": "exec sleep 3600", "instances": 100, "cpus": 0.001, "mem": 4, "portDefinitions": []})
        wait_running(agent, {"/bench/idle"}, 100)
        time.sleep(10)  # the start settles
        before = cpu_seconds(agent.process.pid)
        time.sleep(idle)
        used = cpu_seconds(agent.process.pid) - before
        return used / idle * 100, rss_kib(agent.process.pid) / 1024
    finally:
        agent.stop()


def render_time(binary, work):
    agent = Agent(binary, work, extra_args=["--metrics-interval", "5"])
    try:
        ids = set()
        for number in range(100):
            app_id = f"/bench/m{number:03d}"
            ids.add(app_id)
            call(agent.base, "POST", "/v2/apps", {
                "id": app_id, "cmd": "exec sleep 3600", "instances": 3, "cpus": 0.001, "mem": 4, "portDefinitions": []})
        wait_running(agent, ids, 300, timeout=300)
        time.sleep(12)  # two rounds of measurements: every series exists
        with urllib.request.urlopen(agent.base + "/metrics", timeout=30) as response:
            body = response.read()
        series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
        figures = wrk(agent.base + "/metrics", 1, seconds=10)
        return figures, len(body), series
    finally:
        agent.stop()


def log_throughput(binary, work):
    script = os.path.join(work, "writer.py")
    with open(script, "w") as handle:
        handle.write(WRITER)

    def counted(path, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if os.path.exists(path) and os.path.getsize(path) > 0:
                return int(open(path).read()) / 5
            time.sleep(0.2)
        raise SystemExit(f"the writer wrote no count to {path}")

    plain = []
    for run in range(3):
        count_file = os.path.join(work, f"plain-{run}.count")
        process = subprocess.Popen(["python3", script, os.path.join(work, f"plain-{run}.log")], env={**os.environ, "COUNT_FILE": count_file})
        plain.append(counted(count_file))
        process.kill()
        process.wait()
    agent = Agent(binary, work)
    through = []
    try:
        for run in range(3):
            app_id = f"/bench/log{run}"
            count_file = os.path.join(work, f"agent-{run}.count")
            call(agent.base, "POST", "/v2/apps", {
                "id": app_id, "cmd": f"exec python3 {script}", "env": {"COUNT_FILE": count_file}, "instances": 1, "cpus": 1,
                "mem": 256, "portDefinitions": []})
            through.append(counted(count_file))
            call(agent.base, "DELETE", f"/v2/apps{app_id}")
    finally:
        agent.stop()
    return statistics.median(plain), statistics.median(through)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--idle", type=int, default=60)
    args = parser.parse_args()

    print("| measure | value |\n|---|---|")
    on, off = [], []
    for _ in range(3):
        on.append(idle_cost(args.binary, args.work, 5, args.idle))
        off.append(idle_cost(args.binary, args.work, 0, args.idle))
    report(("agent CPU, 100 instances idle, metrics every 5 s (median of 3)", f"{statistics.median(c for c, _ in on):.2f} % of a core"))
    report(("agent CPU, 100 instances idle, metrics off (median of 3)", f"{statistics.median(c for c, _ in off):.2f} % of a core"))
    report(("agent RSS, metrics on / off", f"{statistics.median(r for _, r in on):.0f} MiB / {statistics.median(r for _, r in off):.0f} MiB"))

    figures, size, series = render_time(args.binary, args.work)
    report(("GET /metrics, 100 apps × 3 instances: p50 / p99 (wrk, 1 connection)", f"{figures['50%']} / {figures['99%']}"))
    report(("GET /metrics size and series", f"{size / 1024:.0f} KiB, {series:,} series"))

    plain, through = log_throughput(args.binary, args.work)
    report(("lines/s written to a plain file (median of 3)", f"{plain:,.0f}"))
    report(("lines/s written to an instance's log under the agent (median of 3)", f"{through:,.0f} ({through / plain:.2f}×)"))


if __name__ == "__main__":
    main()
