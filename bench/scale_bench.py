"""Drives bench/scale.sh: one node at scale, on a release agent on loopback.

1. One app of 1,000 `sleep` instances: POST → all TASK_RUNNING; then DELETE → every process gone,
   without a drain and with the default one (2 s out of discovery before the SIGTERM).
2. 1,000 apps of one instance each: `GET /v2/apps?embed=apps.tasks` (the call marathon-lb and
   Traefik make after every event), first render after a change and warm; `GET /v2/apps` p50/p99
   (wrk); a reconcile pass (the agent's own histogram).
3. 100 subscribers on `/v2/events`: from a write's request to each subscriber's receipt of its
   event, p50/p99.
4. 10,000 instances (100 apps × 100): all TASK_RUNNING, the agent's RSS, its idle CPU, listings,
   reconcile passes (while starting and idle), destroy.

Instances have no ports (`portDefinitions: []`): the node's port range is not what is measured.
"""

import argparse
import json
import os
import selectors
import socket
import statistics
import subprocess
import threading
import time
import urllib.request

from benchlib import Agent, call, cpu_seconds, rss_kib

SLEEP = "exec sleep {marker}"


def app(app_id, instances, marker, **fields):
    return {"id": app_id, "cmd": SLEEP.format(marker=marker), "instances": instances, "cpus": 0.001, "mem": 4,
            "portDefinitions": [], "backoffSeconds": 1, **fields}


def processes_with(marker):
    """PIDs of `sleep MARKER` processes."""
    wanted = f"sleep\0{marker}\0".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    if cmdline.read() == wanted:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def running_count(agent, app_ids):
    apps = call(agent.base, "GET", "/v2/apps")["apps"]
    wanted = set(app_ids)
    return sum(entry["tasksRunning"] for entry in apps if entry["id"] in wanted)


class NotRunning(Exception):
    pass


def wait_running(agent, app_ids, count, timeout):
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        if running_count(agent, app_ids) >= count:
            return time.perf_counter()
        time.sleep(0.05)
    raise NotRunning(f"only {running_count(agent, app_ids):,} of {count:,} running after {timeout} s")


def report(row):
    """One row of the table (name, value), printed at once: a later phase may not finish."""
    print(f"| {row[0]} | {row[1]} |", flush=True)


def timed_get(agent, path):
    started = time.perf_counter()
    with urllib.request.urlopen(agent.base + path, timeout=60) as response:
        body = response.read()
    return (time.perf_counter() - started) * 1000, len(body)


def metric(agent, name, labels=""):
    """The sum and count of a Prometheus histogram the agent exports (the series whose labels
    include `labels`, e.g. 'scope="changed"'), or None."""
    with urllib.request.urlopen(agent.base + "/metrics", timeout=10) as response:
        text = response.read().decode()
    total = count = None
    for line in text.splitlines():
        series = line.split()[0] if line and not line.startswith("#") else ""
        if labels not in series:
            continue
        if series.startswith(name + "_sum"):
            total = float(line.split()[-1])
        elif series.startswith(name + "_count"):
            count = float(line.split()[-1])
    return (total, count) if total is not None and count else None


def report_passes(agent, what):
    """The reconcile passes so far, those that planned what changed and the full ones."""
    for scope, kind in (("changed", "planning the apps that changed"), ("all", "planning every app")):
        passes = metric(agent, "flotilla_reconcile_seconds", f'scope="{scope}"')
        if passes:
            report((f"reconcile pass {kind}, {what} (mean)", f"{1000 * passes[0] / passes[1]:.2f} ms over {passes[1]:.0f} passes"))


def wrk_latency(url, seconds=10, connections=4):
    output = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url], capture_output=True, text=True, check=True).stdout
    figures = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in ("50%", "99%"):
            figures[parts[0]] = parts[1]
        if line.startswith("Requests/sec:"):
            figures["rps"] = float(parts[1])
    return figures


class Subscribers(threading.Thread):
    """`count` clients of `/v2/events`, read by one thread waiting on all their sockets at once
    (a thread each would measure how Python schedules a hundred threads): the arrival time of
    each event, by subscriber and the app id it names."""

    def __init__(self, port, count):
        super().__init__(daemon=True)
        self.selector = selectors.DefaultSelector()
        self.arrivals = [{} for _ in range(count)]
        self.buffers = [b""] * count
        self.attached = set()
        self.done = False
        for number in range(count):
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            sock.sendall(b"GET /v2/events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n")
            sock.setblocking(False)
            self.selector.register(sock, selectors.EVENT_READ, number)

    def run(self):
        while not self.done:
            for key, _ in self.selector.select(timeout=0.5):
                now = time.perf_counter()
                number = key.data
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.selector.unregister(key.fileobj)
                    continue
                self.attached.add(number)
                buffer = self.buffers[number] + data
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    marker = line.find(b"/bench/sse-")
                    if line.startswith(b"data:") and marker >= 0 and b'"api_post_event"' in line:
                        end = line.find(b'"', marker)
                        self.arrivals[number].setdefault(line[marker:end].decode(), now)
                self.buffers[number] = buffer

    def close(self):
        self.done = True
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", required=True)
    parser.add_argument("--work", required=True)
    parser.add_argument("--big", type=int, default=10_000, help="instances in the last phase (100 apps)")
    parser.add_argument("--phases", default="1234", help="which phases to run (default all: 1234)")
    arguments = parser.parse_args()

    agent = Agent(arguments.binary, arguments.work)
    print("| measure | result |")
    print("|---|---|", flush=True)
    try:
        if "1" in arguments.phases:
            one_app_of_a_thousand(agent)
        if "2" in arguments.phases:
            a_thousand_apps(agent)
        if "3" in arguments.phases:
            event_subscribers(agent)
        if "2" in arguments.phases:
            call(agent.base, "DELETE", "/v2/groups/bench/apps?force=true")
            while processes_with(3602):
                time.sleep(0.1)
        if "4" in arguments.phases:
            ten_thousand(agent, arguments.big)
    finally:
        agent.stop()
        for marker in (3601, 3602, 3603, 3604):
            for pid in processes_with(marker):
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass


def one_app_of_a_thousand(agent):
    """1. One app of 1,000: all running, then destroyed, with the default drain (out of discovery
    for 2 s before the SIGTERM) and without one (`drainSeconds: 0`)."""
    for drain, label in ((0, "`drainSeconds: 0`"), (None, "default 2 s drain first")):
        fields = {} if drain is None else {"drainSeconds": drain}
        started = time.perf_counter()
        call(agent.base, "POST", "/v2/apps", app("/bench/one", 1000, 3601, **fields))
        running = wait_running(agent, ["/bench/one"], 1000, 120)
        report((f"1,000 instances of one app → all TASK_RUNNING ({label})", f"{running - started:.2f} s"))
        wait_deployments(agent)
        started = time.perf_counter()
        call(agent.base, "DELETE", "/v2/apps/bench/one")
        while processes_with(3601) and time.perf_counter() - started < 120:
            time.sleep(0.02)
        gone = time.perf_counter()
        left = len(processes_with(3601))
        report((f"destroy of 1,000 instances → every process gone ({label})", f"{gone - started:.2f} s" + (f" ({left} left)" if left else "")))
        wait_deployments(agent)


def wait_deployments(agent, timeout=120):
    """Until no deployment is under way (a measure of a steady state starts from one)."""
    deadline = time.perf_counter() + timeout
    while call(agent.base, "GET", "/v2/deployments") and time.perf_counter() < deadline:
        time.sleep(0.1)


def a_thousand_apps(agent):
    """2. 1,000 apps of one instance: listings and reconcile passes."""
    apps = [app(f"/bench/apps/a{number:04d}", 1, 3602) for number in range(1000)]
    call(agent.base, "POST", "/v2/groups", {"id": "/bench/apps", "apps": apps})
    wait_running(agent, [entry["id"] for entry in apps], 1000, 120)
    time.sleep(2)
    first, warm = [], []
    for round_ in range(10):
        call(agent.base, "PUT", f"/v2/apps/bench/apps/a{round_:04d}?force=true", {"labels": {"round": str(round_)}})
        time.sleep(0.3)
        first.append(timed_get(agent, "/v2/apps?embed=apps.tasks")[0])
        warm.extend(timed_get(agent, "/v2/apps?embed=apps.tasks")[0] for _ in range(3))
    size = timed_get(agent, "/v2/apps?embed=apps.tasks")[1]
    wait_deployments(agent)
    report(("`GET /v2/apps?embed=apps.tasks`, 1,000 apps / 1,000 tasks, first render after a change (median of 10)",
           f"{statistics.median(first):.1f} ms ({size / 1024:.0f} KiB)"))
    report(("… the same, unchanged since the last render (median)", f"{statistics.median(warm):.1f} ms"))
    # One client at a time (as marathon-lb and Traefik poll), then four at once (both cores busy:
    # the p99 is then mostly waiting for a core).
    for connections in (1, 4):
        plain = wrk_latency(agent.base + "/v2/apps", connections=connections)
        report((f"`GET /v2/apps`, 1,000 apps, wrk -c{connections}: p50 / p99", f"{plain['50%']} / {plain['99%']} ({plain['rps']:,.0f} req/s)"))
    report_passes(agent, "since start, up to 1,000 apps / 1,000 instances")


def event_subscribers(agent):
    """3. 100 subscribers on /v2/events: from a write's request, and from its response (the
    write is committed, fsync included, before its event goes out), to each subscriber's receipt."""
    subscribers = Subscribers(agent.port, 100)
    subscribers.start()
    call(agent.base, "POST", "/v2/apps", app("/bench/sse-warmup", 0, 3603))
    deadline = time.perf_counter() + 10
    while len(subscribers.attached) < 100 and time.perf_counter() < deadline:
        time.sleep(0.05)
    sent, answered = {}, {}
    for number in range(50):
        app_id = f"/bench/sse-{number:03d}"
        sent[app_id] = time.perf_counter()
        call(agent.base, "POST", "/v2/apps", app(app_id, 0, 3603))
        answered[app_id] = time.perf_counter()
        time.sleep(0.05)
    time.sleep(2)
    subscribers.close()
    from_request, from_response = [], []
    for arrivals in subscribers.arrivals:
        for app_id, at in arrivals.items():
            if app_id in sent:
                from_request.append(1000 * (at - sent[app_id]))
                from_response.append(1000 * (at - answered[app_id]))
    missing = 100 * len(sent) - len(from_request)
    writes = sorted(1000 * (answered[a] - sent[a]) for a in sent)
    for name, delays in (("write's request", from_request), ("write's response", from_response)):
        delays.sort()
        report((f"`/v2/events`, 100 subscribers: {name} → each subscriber has the event, p50 / p99",
               f"{delays[len(delays) // 2]:.1f} / {delays[int(len(delays) * 0.99)]:.1f} ms" + (f" ({missing} not delivered)" if missing else "")))
    report(("… the write itself (`POST /v2/apps`, committed), p50 / max", f"{writes[len(writes) // 2]:.1f} / {writes[-1]:.1f} ms"))


def ten_thousand(agent, big_count):
    """4. 10,000 instances (100 apps): all running, RSS, idle CPU, listings, destroy."""
    per_app = big_count // 100
    big = [app(f"/bench/big/b{number:03d}", per_app, 3604) for number in range(100)]
    passes_before = metric(agent, "flotilla_reconcile_seconds", 'scope="changed"') or (0.0, 0.0)
    started = time.perf_counter()
    call(agent.base, "POST", "/v2/groups", {"id": "/bench/big", "apps": big})
    try:
        running = wait_running(agent, [entry["id"] for entry in big], per_app * 100, 600)
    except NotRunning as shortfall:
        report((f"{per_app * 100:,} instances (100 apps × {per_app}) → all TASK_RUNNING", str(shortfall)))
        return
    report((f"{per_app * 100:,} instances (100 apps × {per_app}) → all TASK_RUNNING", f"{running - started:.1f} s"))
    time.sleep(10)
    cpu_before, clock_before = cpu_seconds(agent.process.pid), time.perf_counter()
    time.sleep(30)
    idle = (cpu_seconds(agent.process.pid) - cpu_before) / (time.perf_counter() - clock_before)
    report((f"… agent RSS / idle CPU with {per_app * 100:,} instances", f"{rss_kib(agent.process.pid) / 1024:.0f} MiB / {100 * idle:.1f} % of a core"))
    for path in ("/v2/apps", "/v2/apps?embed=apps.tasks"):
        times = [timed_get(agent, path)[0] for _ in range(5)]
        report((f"`GET {path}` with {per_app * 100:,} instances (median of 5)", f"{statistics.median(times):.1f} ms"))
    passes = metric(agent, "flotilla_reconcile_seconds", 'scope="changed"') or (0.0, 0.0)
    if passes[1] > passes_before[1]:
        report((f"reconcile pass planning the apps that changed, while {per_app * 100:,} instances start (mean)",
               f"{1000 * (passes[0] - passes_before[0]) / (passes[1] - passes_before[1]):.2f} ms over {passes[1] - passes_before[1]:.0f} passes"))
    report_passes(agent, f"since start, up to {per_app * 100:,} instances")
    before = metric(agent, "flotilla_reconcile_seconds", 'scope="changed"') or (0.0, 0.0)
    time.sleep(10)
    after = metric(agent, "flotilla_reconcile_seconds", 'scope="changed"') or (0.0, 0.0)
    if after[1] > before[1]:
        report((f"… idle passes with {per_app * 100:,} instances (10 s, mean)",
               f"{1000 * (after[0] - before[0]) / (after[1] - before[1]):.2f} ms over {after[1] - before[1]:.0f} passes"))
    started = time.perf_counter()
    call(agent.base, "DELETE", "/v2/groups/bench/big?force=true")
    while processes_with(3604) and time.perf_counter() - started < 600:
        time.sleep(0.1)
    report((f"destroy of {per_app * 100:,} instances → every process gone", f"{time.perf_counter() - started:.1f} s"))


if __name__ == "__main__":
    main()
